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
    out/decision.json            what was submitted (whalesub.workflows.decision): models, TTA, embed
                                 settings, k, scoring, new_individual rule; applied by predict_from_decision
    out/gallery_labels.csv       the train.csv rows of the gallery images (the decision's labels)

A rerun reuses what is still valid, decided by fingerprints: an export is
reused when its ``export.json`` fingerprint (ModelSpec + weights digest) equals that of the
checkpoint it comes from; an embedding file when its ``meta["fingerprint"]`` equals the models'
combined fingerprint and its ``.key.json`` equals the current key (image listing, each image file's
size and modification time, image folder, box file digest, embed options). A changed checkpoint,
photo or setting recomputes exactly what depends on it. ``score.json``, ``tune.json`` and
``report.html`` of an earlier run are removed before the new submission is made (each is written
again when this run makes it), and the folds' out-of-fold fingerprints must equal the exported
models' before their share is used.

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
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError
from whalesub.embedding.embed import EmbedOptions, digest_image_files, digest_names, run_embed
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
from whalesub.workflows.decision import FILE as DECISION_FILE
from whalesub.workflows.decision import (
    centres_from_of,
    check_decision,
    describe_rule,
    read_decision,
    read_stamp,
    resolve,
    same_scoring,
    scoring_of,
    stamp_of,
)
from whalesub.workflows.oof import (
    fold_fingerprint,
    has_oof,
    no_new_message,
    oof_new_counts,
    tune_folds,
    unique_folds,
)
from whalesub.workflows.scorefiles import dumps_json, read_thresholds
from whalesub.workflows.submit import check_centre_inputs, check_threshold_inputs, submit_files

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


#: Files of an earlier run that belong to its submission only; a rerun writes those that apply again.
RESULT_FILES = ("score.json", "tune.json", "report.html")


def clear_stale_results(out: Path) -> list[str]:
    """Remove ``out``'s :data:`RESULT_FILES` before a new run, so none is left beside a submission it
    does not describe (a rerun without --truth keeping the old score.json, a fixed --threshold keeping
    the old tune.json); return the names removed."""
    removed = []
    for name in RESULT_FILES:
        path = Path(out) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    if removed:
        log.info("removed %s of the previous run in %s (written again when this run makes them)",
                 ", ".join(removed), out)
    return removed


def check_oof_fingerprints(sources: list[ModelSource], exports: list[Path]) -> None:
    """ConfigError unless each fold's out-of-fold files come from the very model predict exports.

    The pooled share is tuned on the folds' OOF embeddings; OOF files of another checkpoint (``last.pt``
    passed while the OOF files are the best epoch's, a fold retrained without validation) would choose
    the threshold for a model that is not in the submission.
    """
    for source, export in zip(sources, exports, strict=True):
        if source.fold_dir is None:
            continue
        oof, model = fold_fingerprint(source.fold_dir), export_fingerprint(export)
        if oof != model:
            raise ConfigError(
                f"fold {source.fold_dir}: its out-of-fold files (oof_embeddings.npz) come from model "
                f"fingerprint {oof}, but predict uses {source.path} with fingerprint {model}; the pooled "
                "share would be tuned on another model. Pass the checkpoint the fold validated (best.pt), "
                "validate this one again, or give --threshold / --new-share")


def ensure_embedding(models: list[Path], out: Path, options: EmbedOptions, images: Path,
                     listing: Path | None, boxes: Path | None, runner=None) -> Path:
    """``run_embed`` unless ``out`` already holds these models' vectors of these images/settings."""
    fingerprint = combined_fingerprint([SimpleNamespace(fingerprint=export_fingerprint(m)) for m in models])
    names, folder = list_images(images, listing)
    key = {"fingerprint": fingerprint, "images": digest_names(names), "n": len(names),
           "image_files": digest_image_files(folder, names),  # a photo replaced in place is embedded again
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
    run_embed(models, out, options, images=images, listing=listing, boxes=boxes, runner=runner)
    atomic_write_text(key_file, json.dumps(key, indent=1, sort_keys=True) + "\n")
    return out


def predict(models: list[Path], train_csv: Path, train_images: Path, test_images: Path, out: Path, *,
            sample: Path | None = None, truth: Path | None = None, boxes: Path | None = None,
            threshold: float | None = None, new_share: float | None = None, grid: str = "0.0:1.0:0.02",
            k: int = 100, options: EmbedOptions | None = None, runner=None, **submit_extra) -> dict:
    """Export, embed, choose the threshold, submit, validate and (with ``truth``) score; return the
    summary written to ``out/predict.json``.

    ``models``: run folders, fold folders, checkpoints or export folders. ``sample``:
    sample_submission.csv giving the test rows and their order (default: every image of
    ``test_images``). ``options``: the embedding settings (backend, device, batch size, workers,
    fp16, box type/conf); TTA is fixed: flipped gallery, flip-TTA queries. ``runner``: where the
    embedding chunks run (``whalesub.embedding.distributed.RayRunner`` for ``--ray``; default: this
    process); the result is the same either way. Extra keyword
    arguments go to :func:`whalesub.workflows.submit.submit_files` unchanged (``thresholds``: a per-species
    file instead of the pooled share; ``knn_ratio`` < 1 blends with centres from ``centres_from``
    (default "gallery"; "head" without ``centres``: the exports' own ``class_centres.npz``, in
    model order), and the out-of-fold tuning uses the same source). The report (``whalesub predict
    --report``) is written by the CLI from this summary: the report package sits above the workflows.
    """
    per_species = submit_extra.pop("thresholds", None)
    if sum(x is not None for x in (threshold, new_share, per_species)) > 1:
        raise ConfigError("give at most one of --threshold, --new-share and --thresholds")
    check_threshold_inputs(threshold, per_species, submit_extra.get("knn_ratio", 1.0),
                           submit_extra.get("centre_k"), k, submit_extra.get("threshold_knn_ratio"),
                           submit_extra.get("centres_from", "gallery"))
    source = submit_extra.get("centres_from", "gallery")
    # "head" without --centres takes the exports' class_centres.npz (checked after the export)
    check_centre_inputs(submit_extra.get("knn_ratio", 1.0), source,
                        submit_extra.get("centres") or (["exports"] if source == "head" else None))
    options = options or EmbedOptions()
    if options.box_type is not None and boxes is None:
        raise ConfigError("--box-type needs --boxes CSV")
    if options.shard is not None:
        raise ConfigError("predict embeds every image; shard with `whalesub embed --shard` instead")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = find_model_sources(models)
    folds = unique_folds(s.fold_dir for s in sources if s.fold_dir is not None)
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
    if threshold is None and new_share is None and per_species is None:
        check_oof_fingerprints(sources, exports)
    emb = out / "embeddings"
    gallery = ensure_embedding(exports, emb / "gallery.npz", replace(options, tta="none", flip_views=True),
                               train_images, train_csv, boxes, runner)
    # the test images are embedded by predict_from_decision below: the step the Kaggle kernel runs
    summary = {"models": [{"name": s.name, "source": str(s.path), "export": str(e),
                           "fingerprint": export_fingerprint(e)}
                          for s, e in zip(sources, exports, strict=True)],
               "gallery": str(gallery),
               "oof_queries": None if oof is None else oof["n"],
               "oof_new_share": None if oof is None else oof["share"], "warnings": warnings}
    clear_stale_results(out)  # from here on this run writes the results that apply to it
    knn_ratio, centre_k = submit_extra.pop("knn_ratio", 1.0), submit_extra.pop("centre_k", None)
    centres = submit_extra.pop("centres", None)
    centres_from = submit_extra.pop("centres_from", "gallery")
    if knn_ratio < 1.0 and centres_from == "head" and centres is None:
        centres = [e / CENTRES for e in exports]
        if missing := [str(c) for c in centres if not c.is_file()]:
            raise ConfigError(f"--centres-from head needs class centres, but {', '.join(missing)} do not "
                              "exist (the checkpoint had no ArcFace head); use --centres-from gallery")
    scoring = scoring_of(knn_ratio, centre_k, [_rel(c, out) for c in centres or []], centres_from)
    if per_species is not None:
        summary["threshold_source"] = f"--thresholds {per_species}"
        rule = per_species_rule(per_species)
    elif threshold is None and new_share is None:
        tuned = tune_folds(folds, train_csv, grid, k=k, knn_ratio=knn_ratio, centre_k=centre_k,
                           centres_from=centres_from)
        atomic_write_text(out / "tune.json", dumps_json(tuned, indent=1) + "\n")
        new_share = tuned["best"]["new_share"]
        best = tuned["best"]
        summary["threshold_source"] = (f"pooled out-of-fold share over {len(folds)} folds (OOF threshold "
                                       f"{best['threshold']:.4f}, MAP@5 {best['map5']:.4f})")
        rule = {"rule": "share", "new_share": float(new_share), "tuned_on": read_stamp(tuned),
                "oof_share": {"folds": len(folds), "threshold": float(best["threshold"]),
                              "map5": float(best["map5"])}}
    else:
        summary["threshold_source"] = "--threshold" if threshold is not None else "--new-share"
        rule = ({"rule": "cosine", "threshold": float(threshold), "tuned_on": None} if threshold is not None
                else {"rule": "share", "new_share": float(new_share), "oof_share": None, "tuned_on": None})
    decision = make_decision(out, sources, exports, gallery, train_csv, options, boxes, k, scoring, rule)
    decision_file = out / DECISION_FILE
    check_decision(decision, decision_file)
    _write_if_changed(decision_file, json.dumps(decision, indent=1, sort_keys=True) + "\n")
    applied = predict_from_decision(decision_file, test_images, out, sample=sample, train_csv=train_csv,
                                    boxes=boxes, device=options.device, batch_size=options.batch_size,
                                    workers=options.workers, truth=truth, runner=runner, **submit_extra)
    s = applied["submit"]
    summary.update(queries=applied["queries"], submit=s, threshold=s["threshold"], new_share=new_share,
                   per_species=per_species is not None, decision=str(decision_file),
                   submission=applied["submission"], truth=None if truth is None else str(truth),
                   validated=applied["validated"])
    if truth is not None:
        summary["score"] = applied["score"]
        atomic_write_text(out / "score.json", json.dumps(summary["score"], indent=1) + "\n")
    atomic_write_text(out / "predict.json", json.dumps(summary, indent=1, default=str) + "\n")
    log.info("wrote %s (threshold %.4f, %s)", applied["submission"], s["threshold"],
             summary["threshold_source"])
    return summary


# --- the decision: written by predict, applied by predict_from_decision (predict, report, Kaggle) -------
GALLERY_LABELS = "gallery_labels.csv"


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically unless ``path`` holds it already (a rerun keeps its time stamp)."""
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)


def _rel(path, base: Path) -> str:
    """``path`` relative to ``base`` (``..`` allowed), POSIX separators."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def per_species_rule(path) -> dict:
    """The ``per_species`` rule of a threshold file (``tune --per-species``), with its scoring stamp."""
    default, table = read_thresholds(path)
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return {"rule": "per_species", "default": default, "species": table, "tuned_on": read_stamp(doc)}


def gallery_images_digest(names) -> str:
    """The digest a decision keeps of a gallery's image set: sha256 of the sorted unique names."""
    return digest_names(sorted(set(map(str, names))))


def make_decision(out: Path, sources: list[ModelSource], exports: list[Path], gallery: Path, train_csv: Path,
                  options: EmbedOptions, boxes: Path | None, k: int, scoring: dict, rule: dict) -> dict:
    """The decision of one predict run (paths relative to ``out``); also writes ``out/gallery_labels.csv``."""
    from whalesub.data.contract import read_train_csv

    ids = load_embeddings(gallery).ids
    train = read_train_csv(train_csv)
    labels = train[train["image"].isin(set(ids.tolist()))]
    _write_if_changed(out / GALLERY_LABELS, labels.to_csv(index=False))
    fingerprints = [export_fingerprint(e) for e in exports]  # each export.json read once
    decision = {
        "format": "whalesub.decision", "version": 1,
        "models": [{"name": s.name, "fingerprint": fp, "export": _rel(e, out)}
                   for s, e, fp in zip(sources, exports, fingerprints, strict=True)],
        "fingerprint": combined_fingerprint([SimpleNamespace(fingerprint=fp) for fp in fingerprints]),
        "embed": {"backend": options.backend, "fp16": bool(options.fp16), "box_type": options.box_type,
                  "box_conf": options.box_conf, "boxes_sha256": sha256_file(boxes) if boxes else None},
        "gallery": {"file": _rel(gallery, out), "labels": GALLERY_LABELS, "tta": "none", "flip_views": True,
                    "images": gallery_images_digest(ids), "n": int(np.unique(ids).size)},
        "queries": {"tta": "flip", "flip_views": False},
        "k": int(k), "scoring": scoring, "new_individual": rule,
    }
    stamp = rule.get("tuned_on")
    if rule["rule"] != "share" and not same_scoring(stamp, scoring, k):
        log.warning("the new_individual threshold was tuned on %s but the submission ranks with %s: the "
                    "cosine does not transfer; tune with the same scoring options", stamp, scoring)
    return decision


def check_gallery(decision: dict, decision_path: Path, train_csv: Path | None = None) -> Path:
    """The decision's gallery file after checking it against the decision (models, image set, embed
    settings through its ``.key.json`` when present) and, with ``train_csv``, against that listing."""
    from whalesub.data.contract import read_test_listing

    g = decision["gallery"]
    gallery = resolve(decision_path, g["file"])
    if not gallery.is_file():
        raise DataError(f"the gallery {gallery} named by {decision_path} (gallery.file) does not exist")
    emb = load_embeddings(gallery)
    check_gallery_embeddings(emb, fingerprint=decision["fingerprint"], flip_views=g["flip_views"],
                             tta=g["tta"], box_type=decision["embed"]["box_type"],
                             where=f"decision {decision_path}", fp16=bool(decision["embed"].get("fp16")))
    if gallery_images_digest(emb.ids) != g["images"] or np.unique(emb.ids).size != g["n"]:
        raise DataError(f"the gallery {gallery} holds other images than the {g['n']} the decision "
                        f"{decision_path} was made with (gallery.images): it was replaced; run predict again")
    if train_csv is not None:
        names = [str(n) for n in read_test_listing(train_csv)]
        if gallery_images_digest(names) != g["images"]:
            extra = sorted(set(map(str, emb.ids.tolist())) - set(names))
            raise DataError(f"the gallery {gallery} was not embedded from the images of {train_csv} "
                            f"({len(names)} images; the gallery has {g['n']}"
                            + (f", {len(extra)} not in it, e.g. {extra[:3]}" if extra else "")
                            + "): embed the gallery from that train.csv (test embeddings are no gallery)")
    key_file = gallery.with_suffix(".key.json")
    if key_file.is_file():
        key = json.loads(key_file.read_text(encoding="utf-8"))
        opts, emb_s = key.get("options", {}), decision["embed"]
        want = {"tta": g["tta"], "flip_views": g["flip_views"], "fp16": emb_s["fp16"],
                "box_type": emb_s["box_type"], "box_conf": emb_s["box_conf"], "backend": emb_s["backend"]}
        bad = {k: (opts.get(k), v) for k, v in want.items() if opts.get(k) != v}
        if key.get("boxes") != emb_s["boxes_sha256"]:
            bad["boxes"] = (key.get("boxes"), emb_s["boxes_sha256"])
        if bad:
            diff = ", ".join(f"{k}: {a!r} != {b!r}" for k, (a, b) in bad.items())
            raise DataError(f"the gallery {gallery} was embedded with other settings than the decision "
                            f"{decision_path} says ({diff}): embed it again with the decision's settings")
    return gallery


def check_gallery_embeddings(emb, *, fingerprint: str, flip_views: bool, tta: str, box_type: str | None,
                             listing: list[str] | None = None, where: str = "",
                             fp16: bool | None = None) -> None:
    """DataError unless the gallery ``emb`` (:class:`~whalesub.ranking.store.Embeddings`) comes from
    these models (``fingerprint``), with these views (both views stored with ``flip_views``, else one
    view, or the flip mean with ``tta`` flip) and boxes, at this precision (``fp16``, where given and
    the file records it: the queries are embedded so), and, with ``listing``, holds exactly its images."""
    meta, name = emb.meta, emb.path
    problems = []
    if meta.get("fingerprint") != fingerprint:
        problems.append(f"its fingerprint {meta.get('fingerprint')} is not the models' {fingerprint} "
                        "(embed it with the same models, in the same order)")
    precisions = [m.get("precision") for m in meta.get("models", []) if isinstance(m, dict)]
    if fp16 is not None and precisions and set(precisions) <= {"fp16", "fp32"}:
        want = "fp16" if fp16 else "fp32"
        if set(precisions) != {want}:
            problems.append(f"it was embedded at {'/'.join(precisions)} but the queries are embedded at "
                            f"{want} (embed the gallery {'with' if fp16 else 'without'} --fp16)")
    views = meta.get("views_per_image")
    if views is not None:
        want = (2, None) if flip_views else ((2, "mean") if tta == "flip" else (1, None))
        have = (int(views), meta.get("tta_reduce"))
        if have != want:
            problems.append(f"it holds {have[0]} view(s) per image (reduce {have[1]}) but the gallery is "
                            f"embedded with flip_views={flip_views}, tta={tta}")
    if "box_type" in meta and meta["box_type"] != box_type:
        problems.append(f"it was cropped to box_type {meta['box_type']!r}, not {box_type!r}")
    if listing is not None:
        have_ids, want_ids = set(map(str, emb.ids.tolist())), set(map(str, listing))
        if have_ids != want_ids:
            extra, missing = sorted(have_ids - want_ids), sorted(want_ids - have_ids)
            problems.append(f"its images are not those of train.csv ({len(extra)} not in train.csv, e.g. "
                            f"{extra[:3]}; {len(missing)} train images missing, e.g. {missing[:3]}): a "
                            "gallery is the train images (test embeddings are no gallery)")
    if problems:
        raise DataError(f"the gallery {name}" + (f" ({where})" if where else "") + " does not fit:", problems)


def submit_extra_of(decision: dict, decision_path: Path, tmp: Path) -> dict:
    """The :func:`submit_files` arguments of the decision's scoring and new_individual rule."""
    scoring, rule = decision["scoring"], decision["new_individual"]
    extra: dict = {"threshold": None}
    if scoring["kind"] == "blend":
        source = centres_from_of(scoring)
        extra.update(knn_ratio=float(scoring["knn_ratio"]), centre_k=scoring.get("centre_k"),
                     centres_from=source, centres=([resolve(decision_path, c) for c in scoring["centres"]]
                                                   if source == "head" else None))
    if rule["rule"] == "cosine":
        extra["threshold"] = float(rule["threshold"])
    elif rule["rule"] == "share":
        extra["new_share"] = float(rule["new_share"])
    else:
        table = tmp / "species_thresholds.json"
        # stamped with the scoring it was tuned on (a hand-given table: the decision's own), so that
        # submit_files checks it against the decision's scoring like any threshold file
        doc = {"global": rule["default"], "species": rule["species"],
               "scoring": rule.get("tuned_on") or stamp_of(scoring, decision["k"])}
        table.write_text(json.dumps(doc), encoding="utf-8")
        extra["thresholds"] = table
    return extra


def predict_from_decision(decision_path, test_images, out, *, sample=None, train_csv=None, boxes=None,
                          device: str | None = None, batch_size: int | None = None,
                          workers: int | None = None, truth=None, runner=None, **submit_extra) -> dict:
    """Apply a decision to a test folder: embed the test images with the decision's models, TTA and
    embed settings (``out/embeddings/test.npz``, reused when its key matches), rank them against the
    decision's gallery with its scoring, place new_individual by its rule, write and validate
    ``out/submission.csv`` (and score it with ``truth``). ``train_csv``: checked to be the gallery's
    listing (the decision's own ``gallery_labels.csv`` gives the labels). ``boxes``: the box file,
    needed when the decision crops boxes (its sha256 must match). ``device`` / ``batch_size`` /
    ``workers`` override the embedding defaults (auto, 32, one per core); ``runner``: where the chunks
    are embedded (a Ray runner, or None for this process). Extra keyword arguments go to
    :func:`submit_files` (``candidates_out``, ``use_gpu``, ``progress``). Returns a summary.
    """
    import tempfile

    decision_path = Path(decision_path)
    if decision_path.is_dir():
        decision_path = decision_path / DECISION_FILE
    decision = read_decision(decision_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exports = [resolve(decision_path, m["export"]) for m in decision["models"]]
    for m, e in zip(decision["models"], exports, strict=True):
        if (have := export_fingerprint(e)) != m["fingerprint"]:
            raise DataError(f"the export {e} has fingerprint {have} but the decision {decision_path} was "
                            f"made with {m['fingerprint']} (models[{m['name']}]): run predict again")
    gallery = check_gallery(decision, decision_path, train_csv)
    labels = resolve(decision_path, decision["gallery"]["labels"])
    emb_s = decision["embed"]
    if emb_s["box_type"]:
        if boxes is None:
            raise ConfigError(f"the decision {decision_path} crops {emb_s['box_type']!r} boxes: pass the box "
                              "file it was made with (--boxes)")
        if sha256_file(boxes) != emb_s["boxes_sha256"]:
            raise DataError(f"the box file {boxes} is not the one the decision {decision_path} was made with "
                            "(embed.boxes_sha256): pass that box file")
    else:
        boxes = None
    q = decision["queries"]
    options = EmbedOptions(tta=q["tta"], flip_views=q["flip_views"], backend=emb_s["backend"],
                           fp16=emb_s["fp16"], box_type=emb_s["box_type"], box_conf=emb_s["box_conf"],
                           device=device or "auto", batch_size=batch_size or 32, workers=workers)
    queries = ensure_embedding(exports, out / "embeddings" / "test.npz", options, Path(test_images),
                               sample, boxes, runner)
    submission = out / "submission.csv"
    listing = sample if sample is not None else test_images
    log.info("applying %s: %s", decision_path, describe_rule(decision))
    with tempfile.TemporaryDirectory(prefix=".decision.", dir=out) as tmp:
        extra = submit_extra_of(decision, decision_path, Path(tmp))
        threshold = extra.pop("threshold")
        s = submit_files(gallery, queries, labels, threshold, submission, decision["k"], sample=listing,
                         **extra, **submit_extra)
    result = {"decision": str(decision_path), "rule": describe_rule(decision), "gallery": str(gallery),
              "queries": str(queries), "submission": str(submission), "submit": s,
              "validated": check_submission_file(submission, listing, labels)}
    if truth is not None:
        result["score"] = score_submission(submission, truth)
    return result


def rank_by_decision(data: dict, decision: dict, decision_path, *, n_max: int = 5,
                     use_gpu: bool | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Candidates [Q, n_max] of :func:`whalesub.workflows.submit.load_ranking_inputs`'s ``data`` ranked
    with the decision's scoring (kNN, or the blend with its class centres), as ``submit_files`` does."""
    from whalesub.ranking.centres import rank_with_centres
    from whalesub.ranking.rank import rank_queries
    from whalesub.workflows.scorefiles import blend_centres

    scoring, k = decision["scoring"], int(decision["k"])
    if scoring["kind"] != "blend":
        return rank_queries(data["gallery"], data["gallery_labels"], data["queries"], k, n_max,
                            use_gpu=use_gpu, progress=progress)
    source = centres_from_of(scoring)
    centres = [resolve(decision_path, c) for c in scoring["centres"]] if source == "head" else None
    mat = blend_centres(data, source, centres)
    return rank_with_centres(data["gallery"], data["gallery_labels"], data["queries"], mat,
                             np.ones(mat.shape[0], dtype=bool),
                             float(scoring["knn_ratio"]), k, n_max, centre_k=scoring.get("centre_k"),
                             use_gpu=use_gpu, progress=progress)


def decision_thresholds(decision: dict, labels: np.ndarray, scores: np.ndarray, class_species: np.ndarray):
    """The new_individual threshold the decision's rule gives these candidates: a float (cosine, share)
    or one per row [Q] (per-species), exactly as :func:`submit_files` computes it."""
    from whalesub.ranking.threshold import row_thresholds, threshold_for_new_share

    rule = decision["new_individual"]
    if rule["rule"] == "cosine":
        return float(rule["threshold"])
    if rule["rule"] == "share":
        return threshold_for_new_share(scores, float(rule["new_share"]))
    return row_thresholds(labels, class_species, rule["species"], float(rule["default"]))
