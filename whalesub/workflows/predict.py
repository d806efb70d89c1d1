"""``whalesub predict``: trained runs -> ONNX exports -> embeddings -> threshold -> validated submission.

One call does what a competitor otherwise chains by hand (export each fold, embed with every
model, tune, submit, validate, score) and leaves every intermediate file in ``out``::

    out/models/<run>_<fold>/     whalesub export of each checkpoint source (export folders are used in place)
    out/embeddings/gallery.npz   train images, every model combined, flipped gallery (--flip-views)
    out/embeddings/test.npz      test images, every model combined, flip TTA
    out/embeddings/*.key.json    what each embedding file was computed from (see below)
    out/tune.json                pooled out-of-fold threshold search (whalesub.workflows.oof), when it is used
    out/submission.csv           validated against the sample (or test folder) and train.csv
    out/score.json               with ``truth``: MAP@5 and its known/new breakdown
    out/predict.json             the summary: models, fingerprints, threshold and how it was chosen

A rerun reuses what is still valid, decided by fingerprints, never by file times: an export is
reused when its ``export.json`` fingerprint (ModelSpec + weights digest) equals that of the
checkpoint it comes from; an embedding file when its ``meta["fingerprint"]`` equals the models'
combined fingerprint and its ``.key.json`` equals the current key (image listing, image folder,
box file digest, embed options). A changed checkpoint or setting recomputes exactly what depends on it.

Threshold (in this order): ``threshold`` (a cosine), ``new_share`` (a share of test rows), else the
share of rows that put ``new_individual`` first at the best threshold of the pooled out-of-fold
search over the models' folds, applied to the test set's own ensemble scores. A raw cosine tuned
on one model against an 80% gallery does not transfer to a several-model ensemble with the full
gallery; a share of new animals does. ``predict.json`` records, beside the share applied, the share of
out-of-fold queries that truly show new animals (``oof_new_share``): when it is 0 (folds without
singletons or held-out animals) the pooled share carries no information, so the default is refused
(pass ``new_share`` or ``threshold``, or retrain with ``target_new_share``); with an explicit
choice it is a warning in ``warnings``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError
from whalesub.embedding.embed import EmbedOptions, digest_names, run_embed
from whalesub.embedding.loader import list_images
from whalesub.models.export import (
    CENTRES,
    MANIFEST,
    export_model,
    model_fingerprint,
    pick_parity_images,
    sha256_file,
)
from whalesub.models.sources import load_source, resolve_checkpoint
from whalesub.ranking.store import combined_fingerprint, load_embeddings
from whalesub.ranking.submission import check_submission_file, score_submission
from whalesub.workflows.oof import has_oof, no_new_message, oof_new_counts, tune_folds
from whalesub.workflows.submit import submit_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """One model of the ensemble: a checkpoint source to export, or an export folder used as is."""

    name: str  # <run>_<fold>: its folder under out/models
    path: Path  # fold folder / checkpoint file, or export folder
    exported: bool  # True: ``path`` is already an export folder
    fold_dir: Path | None  # where its out-of-fold files are (None: not known)


def find_model_sources(paths: list[Path]) -> list[ModelSource]:
    """Run folders (every ``fold*/``), fold folders, checkpoints or export folders -> model sources."""
    found: list[ModelSource] = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            source = Path(read_manifest(path).get("source", ""))
            fold = source.parent if source.name and has_oof(source.parent) else None
            found.append(ModelSource(path.name, path, True, fold))
            continue
        subs = sorted(path.iterdir()) if path.is_dir() else []
        folds = [p for p in subs if p.is_dir() and (p.name.startswith("fold") or p.name == "full")]
        for fold in folds or [path]:
            resolve_checkpoint(fold)  # a clear error for anything that is neither run, checkpoint nor export
            fold_dir = fold if fold.is_dir() else fold.parent
            name = f"{fold_dir.parent.name}_{fold_dir.name}" + ("" if fold.is_dir() else f"_{fold.stem}")
            found.append(ModelSource(name, fold, False, fold_dir if has_oof(fold_dir) else None))
    names = [s.name for s in found]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"several models would share the export folder name(s) {dupes}: "
                          "pass each model once (or export them to differently named folders yourself)")
    if not found:
        raise ConfigError("pass at least one --model: a training run folder, a fold folder, a checkpoint "
                          "or an export folder")
    return found


def ensure_export(source: ModelSource, models_dir: Path, *, fp16: bool, parity_images) -> Path:
    """The export folder of ``source``: reused when its fingerprint matches the checkpoint's."""
    if source.exported:
        return source.path
    out = models_dir / source.name
    fingerprint = model_fingerprint(*_net_and_spec(source.path))
    manifest = out / MANIFEST
    if manifest.is_file():
        have = read_manifest(out)
        if have.get("fingerprint") == fingerprint and (not fp16 or "fp16" in have.get("files", {})):
            log.info("reusing export %s (fingerprint %s)", out, fingerprint[:12])
            return out
        log.info("export %s is stale (fingerprint %s, checkpoint %s): exporting again", out,
                 str(have.get("fingerprint"))[:12], fingerprint[:12])
    log.info("exporting %s -> %s", source.path, out)
    export_model(source.path, out, fp16=fp16, parity_images=parity_images)
    return out


def _net_and_spec(path: Path):
    src = load_source(path)
    return src.net, src.spec


def read_manifest(export_dir: Path) -> dict:
    """An export folder's ``export.json``; an unreadable one is an error naming it."""
    path = Path(export_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({exc}): export the model again with `whalesub export`"
                        ) from None
    if not isinstance(manifest, dict) or "fingerprint" not in manifest:
        raise DataError(f"{path} has no 'fingerprint': export the model again with `whalesub export`")
    return manifest


def export_fingerprint(export_dir: Path) -> str:
    return str(read_manifest(export_dir)["fingerprint"])


def ensure_embedding(models: list[Path], out: Path, options: EmbedOptions, images: Path,
                     listing: Path | None, boxes: Path | None) -> Path:
    """``run_embed`` unless ``out`` already holds these models' vectors of these images/settings."""
    fingerprint = combined_fingerprint([SimpleNamespace(fingerprint=export_fingerprint(m)) for m in models])
    names, folder = list_images(images, listing)
    key = {"fingerprint": fingerprint, "images": digest_names(names), "n": len(names),
           "image_dir": str(folder.resolve()), "boxes": sha256_file(boxes) if boxes is not None else None,
           "options": {k: v for k, v in asdict(options).items() if k not in ("workers", "chunk")}}
    key_file = out.with_suffix(".key.json")
    if out.is_file() and key_file.is_file():
        same = json.loads(key_file.read_text(encoding="utf-8")) == key
        if same and load_embeddings(out).meta.get("fingerprint") == fingerprint:
            log.info("reusing embeddings %s (fingerprint %s)", out, fingerprint[:12])
            return out
    log.info("computing embeddings of %d images of %s -> %s", len(names), folder, out)
    key_file.unlink(missing_ok=True)  # a crash mid-embed must not leave an old key beside a new file
    run_embed(models, out, options, images=images, listing=listing, boxes=boxes)
    atomic_write_text(key_file, json.dumps(key, indent=1, sort_keys=True) + "\n")
    return out


def predict(models: list[Path], train_csv: Path, train_images: Path, test_images: Path, out: Path, *,
            sample: Path | None = None, truth: Path | None = None, boxes: Path | None = None,
            threshold: float | None = None, new_share: float | None = None, grid: str = "0.0:1.0:0.02",
            k: int = 100, options: EmbedOptions | None = None, **submit_extra) -> dict:
    """Export, embed, choose the threshold, submit, validate and (with ``truth``) score; return the
    summary written to ``out/predict.json``.

    ``models``: run folders, fold folders, checkpoints or export folders. ``sample``:
    sample_submission.csv giving the test rows and their order (default: every image of
    ``test_images``). ``options``: the embedding settings (backend, device, batch size, workers,
    fp16, box type/conf); TTA is fixed: flipped gallery, flip-TTA queries. Extra keyword
    arguments go to :func:`whalesub.workflows.submit.submit_files` unchanged (``thresholds``: a per-species
    file instead of the pooled share; ``knn_ratio`` < 1 without ``centres``: the exports' own
    ``class_centres.npz``, in model order). The report (``whalesub predict --report``) is written by
    the CLI from this summary: the report package sits above the workflows.
    """
    per_species = submit_extra.get("thresholds")
    if sum(x is not None for x in (threshold, new_share, per_species)) > 1:
        raise ConfigError("give at most one of --threshold, --new-share and --thresholds")
    options = options or EmbedOptions()
    if options.box_type is not None and boxes is None:
        raise ConfigError("--box-type needs --boxes CSV")
    if options.shard is not None:
        raise ConfigError("predict embeds every image; shard with `whalesub embed --shard` instead")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = find_model_sources(models)
    folds = list(dict.fromkeys(s.fold_dir for s in sources if s.fold_dir is not None))
    if threshold is None and new_share is None and per_species is None and not folds:  # before the long work
        raise ConfigError("none of the models has out-of-fold files (fold*/oof_*.npz) to choose the "
                          "threshold on: pass --threshold or --new-share (e.g. 0.165)")
    oof = oof_new_counts(folds) if folds else None
    warnings = []
    if oof is not None and oof["n_new"] == 0:
        if threshold is None and new_share is None and per_species is None:
            raise ConfigError(f"cannot choose the new_individual share: {no_new_message(oof, len(folds))}")
        warnings.append(no_new_message(oof, len(folds)))
        log.warning(warnings[-1])
    parity = pick_parity_images(train_images)
    exports = [ensure_export(s, out / "models", fp16=options.fp16, parity_images=parity) for s in sources]
    emb = out / "embeddings"
    gallery = ensure_embedding(exports, emb / "gallery.npz", replace(options, tta="none", flip_views=True),
                               train_images, train_csv, boxes)
    queries = ensure_embedding(exports, emb / "test.npz", replace(options, tta="flip", flip_views=False),
                               test_images, sample, boxes)
    summary = {"models": [{"name": s.name, "source": str(s.path), "export": str(e),
                           "fingerprint": export_fingerprint(e)}
                          for s, e in zip(sources, exports, strict=True)],
               "gallery": str(gallery), "queries": str(queries),
               "oof_queries": None if oof is None else oof["n"],
               "oof_new_share": None if oof is None else oof["share"], "warnings": warnings}
    if submit_extra.get("knn_ratio", 1.0) < 1.0 and submit_extra.get("centres") is None:
        submit_extra["centres"] = [e / CENTRES for e in exports]
        if missing := [str(c) for c in submit_extra["centres"] if not c.is_file()]:
            raise ConfigError(f"--knn-ratio < 1 needs class centres, but {', '.join(missing)} do not exist "
                              "(the checkpoint had no ArcFace head); pass --centres or --knn-ratio 1")
    if per_species is not None:
        summary["threshold_source"] = f"--thresholds {per_species}"
    elif threshold is None and new_share is None:
        tuned = tune_folds(folds, train_csv, grid, k=k)
        atomic_write_text(out / "tune.json", json.dumps(tuned, indent=1) + "\n")
        new_share = tuned["best"]["new_share"]
        best = tuned["best"]
        summary["threshold_source"] = (f"pooled out-of-fold share over {len(folds)} folds (OOF threshold "
                                       f"{best['threshold']:.4f}, MAP@5 {best['map5']:.4f})")
    else:
        summary["threshold_source"] = "--threshold" if threshold is not None else "--new-share"
    submission = out / "submission.csv"
    listing = sample if sample is not None else test_images
    s = submit_files(gallery, queries, train_csv, threshold, submission, k, sample=listing,
                     new_share=new_share, **submit_extra)
    summary.update(submit=s, threshold=s["threshold"], new_share=new_share,
                   per_species=per_species is not None,
                   submission=str(submission), truth=None if truth is None else str(truth),
                   validated=check_submission_file(submission, listing, train_csv))
    if truth is not None:
        summary["score"] = score_submission(submission, truth)
        atomic_write_text(out / "score.json", json.dumps(summary["score"], indent=1) + "\n")
    atomic_write_text(out / "predict.json", json.dumps(summary, indent=1, default=str) + "\n")
    log.info("wrote %s (threshold %.4f, %s)", submission, s["threshold"], summary["threshold_source"])
    return summary

