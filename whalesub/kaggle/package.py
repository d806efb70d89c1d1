"""``whalesub kaggle build``: export folders (or training runs) -> three Kaggle datasets and a kernel.

Build folder (default ``kernels/build``)::

    models/   dataset-metadata.json, manifest.json, fold0/ fold1/ ... (export folders: model.onnx,
              model_fp16.onnx, model_spec.json, export.json, class_centres.npz), [gallery.npz]
    wheels/   dataset-metadata.json, manifest.json, whalesub-*.whl and the wheels Kaggle lacks (flat)
    boxes/    (optional) dataset-metadata.json, manifest.json, the box table
    kernel/   kernel-metadata.json, whalesub_kernel.py

Every dataset's ``manifest.json`` holds its ``kind`` (the marker the kernel searches for), the
version of the whalesub wheel in this build (from git: one per commit, so the kernel tells two builds
apart) and the sha256 of every file; the models manifest also holds what the kernel
needs to run exactly like ``whalesub embed`` + ``submit`` (threshold, k, TTA, boxes, batch size).

``--predict OUT`` (:func:`build_decision`) packages a ``whalesub predict`` decision instead:
``models/`` then holds ``decision.json`` (paths rewritten inside the dataset), each export it names
under its model name, ``gallery.npz`` (+ ``gallery.key.json``), ``gallery_labels.csv`` and the
class centres of a blend, and the kernel applies it with
:func:`whalesub.workflows.predict.predict_from_decision`.
The build is made in a temporary sibling folder and moved into place when complete, then every
metadata rule (:mod:`whalesub.kaggle.metadata`) is checked.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError
from whalesub.embedding.embed import EmbedOptions
from whalesub.kaggle import (
    DATASET_METADATA,
    DATASETS,
    KERNEL_DIR,
    KERNEL_FILE,
    KERNEL_METADATA,
    KIND_BOXES,
    KIND_MODELS,
    KIND_WHEELS,
    MANIFEST,
)
from whalesub.kaggle.kernel import installed_version, same_version
from whalesub.kaggle.kernel_script import sha256_file
from whalesub.kaggle.metadata import check_build, dataset_metadata, kernel_metadata, read_json
from whalesub.kaggle.wheels import DEFAULT_PACKAGES, DEFAULT_PLATFORMS, DEFAULT_PYTHON, collect_wheels
from whalesub.models.backends import read_export_manifest
from whalesub.models.export import MANIFEST as EXPORT_MANIFEST
from whalesub.models.export import export_model
from whalesub.ranking.rank import check_threshold
from whalesub.ranking.store import combined_fingerprint, load_embeddings
from whalesub.workflows.decision import FILE as DECISION_FILE
from whalesub.workflows.decision import describe_rule, read_decision, resolve, write_decision
from whalesub.workflows.predict import check_gallery, check_gallery_embeddings

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    """Settings of ``whalesub kaggle build`` (the CLI options of the same names)."""

    owner: str
    competition: str | None = "happy-whale-and-dolphin"
    prefix: str = "whalesub"  # dataset titles: "<prefix> models", "<prefix> wheels", ...
    threshold: float | None = None
    threshold_json: Path | None = None  # `whalesub tune --json` output: its best threshold
    k: int = 100
    gallery_tta: str = "none"
    flip_gallery: bool = True  # flipped gallery: both views stored (--flip-views)
    query_tta: str = "flip"
    fp16: bool = False
    batch_size: int = 32
    box_type: str | None = None
    box_conf: float | None = None
    boxes: Path | None = None
    gallery: Path | None = None  # precomputed gallery .npz
    predict: Path | None = None  # `whalesub predict` OUT folder (or its decision.json): package its decision
    train_images: str = "train_images"
    test_images: str = "test_images"
    packages: list[str] = field(default_factory=lambda: list(DEFAULT_PACKAGES))
    python_version: str = DEFAULT_PYTHON
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS
    whalesub_wheel: Path | None = None
    source: Path | None = None
    wheels_from: Path | None = None
    machine_shape: str = "NvidiaTeslaT4"
    license_name: str = "CC0-1.0"


def resolve_threshold(opts: BuildOptions) -> float:
    """``--threshold``, or the best threshold of a ``whalesub tune --json`` file.

    Refused: a ``predict.json`` / ``decision.json`` (package those with ``--predict OUT``) and a pooled
    out-of-fold ``tune.json`` (its raw cosine was tuned against 80% galleries and is not what predict
    applied; ``--predict OUT`` packages the share predict used), a tune file stamped with a
    centre blend (this kernel ranks by plain kNN) or with another ``k`` than ``--k``.
    """
    if (opts.threshold is None) == (opts.threshold_json is None):
        raise ConfigError(
            "give exactly one of --threshold (cosine score of new_individual), "
            "--threshold-json (the output of `whalesub tune --json`) and --predict (a `whalesub predict` "
            "output folder)"
        )
    if opts.threshold is not None:
        return check_threshold(opts.threshold)
    tuned = read_json(opts.threshold_json)
    from_predict = isinstance(tuned, dict) and (
        tuned.get("format") == "whalesub.decision" or "threshold_source" in tuned
    )
    if from_predict:
        raise ConfigError(
            f"{opts.threshold_json} is the output of `whalesub predict`, not of `whalesub tune --json`: "
            "package what predict submitted with "
            f"`whalesub kaggle build --predict {opts.threshold_json.parent}`"
        )
    if isinstance(tuned, dict) and "folds" in tuned:
        raise ConfigError(
            f"{opts.threshold_json} is a pooled out-of-fold search: its raw cosine "
            f"({tuned.get('best', {}).get('threshold')}) was tuned on single models against partial "
            "galleries and is not the threshold predict applied; use `whalesub kaggle build --predict OUT` "
            "(the share predict used) or pass --threshold"
        )
    stamp = tuned.get("scoring") if isinstance(tuned, dict) else None
    if isinstance(stamp, dict) and stamp.get("k") is not None and int(stamp["k"]) != opts.k:
        raise ConfigError(
            f"{opts.threshold_json} was tuned ranking k={stamp['k']} neighbours but this build ranks "
            f"--k {opts.k}: pass --k {stamp['k']} (a threshold is tuned for one scoring)"
        )
    if isinstance(stamp, dict) and stamp.get("kind") == "blend" and float(stamp.get("knn_ratio", 1.0)) < 1:
        raise ConfigError(
            f"{opts.threshold_json} was tuned on a centre blend (knn_ratio {stamp.get('knn_ratio')}) but "
            "--threshold-json builds rank by plain kNN: use `whalesub kaggle build --predict OUT`"
        )
    try:
        return check_threshold(float(tuned["best"]["threshold"]))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{opts.threshold_json} has no best.threshold: give the JSON printed by `whalesub tune --json`"
        ) from None


def stage_exports(sources: list[Path], out: Path) -> list[str]:
    """Copy each export folder (or export each training run) to ``out/fold<i>``; return the names."""
    if not sources:
        raise ConfigError("pass at least one export folder or training run (one per fold), or --predict OUT")
    names = []
    for i, src in enumerate(sources):
        dest = out / f"fold{i}"
        if (src / EXPORT_MANIFEST).is_file():
            shutil.copytree(src, dest)
        elif src.exists():
            log.info("%s is not an export folder: exporting it (FP32 + FP16)", src)
            export_model(src, dest, fp16=True)
        else:
            raise ConfigError(f"{src} does not exist (pass export folders from `whalesub export`, or runs)")
        names.append(dest.name)
    return names


def models_fingerprint(folders: list[Path]) -> str:
    """The fingerprint ``whalesub embed`` gives these models together (from their export.json)."""
    return combined_fingerprint(
        [SimpleNamespace(fingerprint=read_export_manifest(f)["fingerprint"]) for f in folders]
    )


def write_manifest(folder: Path, kind: str, version: str, **extra) -> dict:
    """``manifest.json``: kind, whalesub ``version`` (the build's wheel), sha256 of every other file.
    No time stamp: the same inputs give the same manifest (a dataset that did not change reads so)."""
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, DATASET_METADATA)
    }
    manifest = {
        "kind": kind,
        "whalesub_version": version,
        **extra,
        "files": files,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def wheel_version(install: list[str]) -> str:
    """The whalesub version of a build: its wheel's (``whalesub==V`` in the install list), which the
    kernel will run; a warning when it is not the whalesub running the build (``--whalesub-wheel`` or
    ``--source`` from another commit: the models were exported here, the kernel runs that wheel)."""
    (version,) = [spec.split("==", 1)[1] for spec in install if spec.startswith("whalesub==")]
    running = installed_version()
    if not same_version(version, running):
        log.warning("the whalesub wheel of this build is %s but whalesub %s runs the build", version, running)
    return version


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def build_models(tmp: Path, sources: list[Path], opts: BuildOptions) -> dict:
    """The models dataset's files in ``tmp/models``; returns its manifest's fields (the manifest itself
    is written once the whalesub wheel, hence the build's version, is known)."""
    folder = tmp / "models"
    folder.mkdir()
    if opts.predict is not None:
        return build_decision(folder, sources, opts)
    threshold = resolve_threshold(opts)
    names = stage_exports(sources, folder)
    if opts.fp16:  # the kernel would stop on Kaggle, after the upload: refuse now
        if no16 := [str(src) for n, src in zip(names, sources, strict=True)
                    if "fp16" not in read_export_manifest(folder / n).get("files", {})]:
            raise ConfigError(f"--fp16 but {', '.join(no16)} has no FP16 graph: export it again with "
                              "`whalesub export --fp16`, or build without --fp16")
    fingerprint = models_fingerprint([folder / n for n in names])
    gallery_opts = {"tta": opts.gallery_tta, "flip_views": opts.flip_gallery}
    for o in (gallery_opts, {"tta": opts.query_tta}):  # the kernel's embed options, checked now
        EmbedOptions(**o, box_type=opts.box_type, box_conf=opts.box_conf, batch_size=opts.batch_size).check()
    if opts.box_type and opts.boxes is None:
        raise ConfigError(
            f"--box-type {opts.box_type} needs --boxes CSV (the table the models were trained with)"
        )
    gallery_file = None
    if opts.gallery is not None:
        try:
            check_gallery_embeddings(
                load_embeddings(opts.gallery),
                fingerprint=fingerprint,
                flip_views=opts.flip_gallery,
                tta=opts.gallery_tta,
                box_type=opts.box_type,
                where="--gallery",
                fp16=opts.fp16,
            )
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        gallery_file = "gallery.npz"
        shutil.copy2(opts.gallery, folder / gallery_file)
    return dict(
        models=names,
        fingerprint=fingerprint,
        threshold=threshold,
        k=opts.k,
        gallery=gallery_opts,
        queries={"tta": opts.query_tta},
        fp16=opts.fp16,
        batch_size=opts.batch_size,
        box_type=opts.box_type,
        box_conf=opts.box_conf,
        boxes_file=opts.boxes.name if opts.boxes else None,
        boxes_sha256=sha256_file(opts.boxes) if opts.boxes else None,  # the kernel checks the boxes dataset
        gallery_file=gallery_file,
        train_images=opts.train_images,
        test_images=opts.test_images,
    )


def build_decision(folder: Path, sources: list[Path], opts: BuildOptions) -> dict:
    """The models dataset of a ``whalesub predict`` decision: its exports, gallery (+ key), gallery
    labels and class centres, and the decision rewritten with paths inside ``folder``; returns the
    manifest's fields (written by :func:`build_package` with the wheel's version)."""
    if sources or opts.threshold is not None or opts.threshold_json is not None or opts.gallery is not None:
        raise ConfigError(
            "--predict packages the decision of a predict run as it is: give no models, --threshold, "
            "--threshold-json or --gallery with it"
        )
    path = opts.predict / DECISION_FILE if opts.predict.is_dir() else opts.predict
    try:
        decision = read_decision(path)
        gallery = check_gallery(decision, path)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    emb = decision["embed"]
    if emb["box_type"]:
        if opts.boxes is None:
            raise ConfigError(
                f"the decision {path} crops {emb['box_type']!r} boxes: pass the box file it was made with "
                "(--boxes)"
            )
        if sha256_file(opts.boxes) != emb["boxes_sha256"]:
            raise ConfigError(f"--boxes {opts.boxes} is not the box file the decision {path} was made with")
    fixed = {
        "--box-type": opts.box_type is not None and opts.box_type != emb["box_type"],
        "--fp16": opts.fp16 and not emb["fp16"],
        "--no-flip-gallery": opts.flip_gallery != decision["gallery"]["flip_views"],
        "--query-tta": opts.query_tta != decision["queries"]["tta"],
        "--k": opts.k != BuildOptions.k and opts.k != decision["k"],
        "--box-conf": opts.box_conf is not None and opts.box_conf != emb["box_conf"],
    }
    if clash := [name for name, bad in fixed.items() if bad]:
        raise ConfigError(
            f"{', '.join(clash)}: with --predict the embed settings come from the decision {path}; drop them"
        )
    packed = copy.deepcopy(decision)
    names, exports = [], []
    for m, pm in zip(decision["models"], packed["models"], strict=True):
        src = resolve(path, m["export"])
        shutil.copytree(src, folder / m["name"])
        names.append(m["name"])
        exports.append(src)
        pm["export"] = m["name"]
    shutil.copy2(gallery, folder / "gallery.npz")
    key = gallery.with_suffix(".key.json")
    if key.is_file():
        shutil.copy2(key, folder / "gallery.key.json")
    shutil.copy2(resolve(path, decision["gallery"]["labels"]), folder / "gallery_labels.csv")
    packed["gallery"].update(file="gallery.npz", labels="gallery_labels.csv")
    if decision["scoring"]["kind"] == "blend" and decision["scoring"].get("centres_from", "head") == "head":
        centres = []
        pairs = zip(decision["scoring"]["centres"], exports, names, strict=True)
        for i, (rel, src, name) in enumerate(pairs):
            c = resolve(path, rel)
            if c.parent == src.resolve():
                centres.append(f"{name}/{c.name}")
            else:  # centres from elsewhere (--centres): travel beside the exports
                (folder / "centres").mkdir(exist_ok=True)
                shutil.copy2(c, folder / "centres" / f"centres{i}.npz")
                centres.append(f"centres/centres{i}.npz")
        packed["scoring"]["centres"] = centres
    write_decision(folder / DECISION_FILE, packed)
    log.info("packaging the decision of %s: %s", path, describe_rule(decision))
    return dict(
        models=names,
        fingerprint=decision["fingerprint"],
        decision=DECISION_FILE,
        rule=describe_rule(decision),
        threshold=None,
        k=decision["k"],
        fp16=emb["fp16"],
        batch_size=opts.batch_size,
        box_type=emb["box_type"],
        box_conf=emb["box_conf"],
        boxes_file=opts.boxes.name if emb["box_type"] else None,
        boxes_sha256=emb["boxes_sha256"] if emb["box_type"] else None,
        gallery_file="gallery.npz",
        train_images=opts.train_images,
        test_images=opts.test_images,
    )


KERNEL_SCRIPT = "whalesub/kaggle/kernel_script.py"


def kernel_script_of(wheel: Path) -> bytes:
    """The kernel's own file, from the whalesub wheel it will install (not from the whalesub running
    the build: with --whalesub-wheel or --source of another commit the two would differ, and the
    script calls that wheel's ``whalesub.kaggle.kernel``)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(KERNEL_SCRIPT)
    except KeyError:
        raise ConfigError(f"the whalesub wheel {wheel.name} has no {KERNEL_SCRIPT}: it is too old for "
                          "`whalesub kaggle build`; build the wheel from this checkout (drop "
                          "--whalesub-wheel)") from None
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"the whalesub wheel {wheel} is not a zip file ({exc})") from None


def check_out(out: Path, overwrite: bool) -> None:
    """``--out`` is new, empty, or (with ``--overwrite``) a previous build and nothing else: a build
    never deletes a folder it did not make (an export, the user's notes)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the build")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"{out} is not empty: pass --overwrite to replace the previous build")
    foreign = [n for n in entries if n not in (*DATASETS, KERNEL_DIR)]
    if foreign or not (out / KERNEL_DIR / KERNEL_METADATA).is_file():
        what = f"holds {', '.join(foreign[:5])}" if foreign else f"has no {KERNEL_DIR}/{KERNEL_METADATA}"
        raise ConfigError(f"--overwrite replaces a previous `whalesub kaggle build` only, but {out} {what}: "
                          "choose a new or empty --out (nothing was deleted)")


def replace_build(tmp: Path, out: Path) -> None:
    """Put the finished build ``tmp`` at ``out``; a previous build there is moved aside first and
    deleted only once the new one is in place (a crash leaves one of the two, never neither)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_package(sources: list[Path], out: Path, opts: BuildOptions, overwrite: bool = False) -> dict:
    """Build the three datasets and the kernel in ``out``; return a summary (slugs, files, sizes)."""
    check_out(out, overwrite)
    if opts.boxes is not None and not opts.boxes.is_file():
        raise ConfigError(f"--boxes {opts.boxes} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        models = build_models(tmp, sources, opts)
        wheels = collect_wheels(
            opts.packages,
            tmp / "wheels",
            whalesub_wheel=opts.whalesub_wheel,
            source=opts.source,
            wheels_from=opts.wheels_from,
            python_version=opts.python_version,
            platforms=opts.platforms,
        )
        version = wheel_version(wheels["install"])
        write_manifest(tmp / "models", KIND_MODELS, version, **models)
        write_manifest(
            tmp / "wheels",
            KIND_WHEELS,
            version,
            install=wheels["install"],
            python_version=opts.python_version,
            platforms=list(opts.platforms),
        )
        if opts.boxes is not None:
            (tmp / "boxes").mkdir()
            shutil.copy2(opts.boxes, tmp / "boxes" / opts.boxes.name)
            write_manifest(tmp / "boxes", KIND_BOXES, version)
        refs = []
        for sub in DATASETS:
            if (tmp / sub).is_dir():
                meta = dataset_metadata(opts.owner, f"{opts.prefix} {sub}", opts.license_name)
                _write_json(tmp / sub / DATASET_METADATA, meta)
                refs.append(meta["id"])
        kernel = tmp / KERNEL_DIR
        kernel.mkdir()
        script = kernel_script_of(tmp / "wheels" / wheels["wheels"]["whalesub"])
        (kernel / KERNEL_FILE).write_bytes(script)  # inside tmp: in place only once the build is whole
        _write_json(
            kernel / KERNEL_METADATA,
            kernel_metadata(
                opts.owner,
                f"{opts.prefix} inference",
                KERNEL_FILE,
                refs,
                opts.competition,
                opts.machine_shape,
            ),
        )
        check_build(tmp)
        replace_build(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out),
        "datasets": refs,
        "install": wheels["install"],
        "bytes": {
            sub: sum(p.stat().st_size for p in (out / sub).rglob("*") if p.is_file())
            for sub in (*DATASETS, KERNEL_DIR)
            if (out / sub).is_dir()
        },
    }
