"""What the offline kernel runs once whalesub is installed from its wheel.

``kernel_script.py`` finds the inputs and installs the wheels, then calls :func:`run_kernel`:
check the models dataset against its manifest, print the environment (Python, CUDA, the ONNX
Runtime providers a session really uses, FAISS GPUs), then, for a ``kaggle build --predict OUT``
build, :func:`whalesub.workflows.predict.predict_from_decision` on the packaged ``decision.json``
(exactly the step ``whalesub predict`` ends with), else :func:`predict_submission`, which is
``whalesub embed`` (train images as the gallery unless the models dataset carries a precomputed
gallery, test images as queries) + ``whalesub submit`` with the packaged threshold + ``whalesub
validate`` against the ``sample_submission.csv`` found at run time. Every step reuses whalesub's
own functions: the kernel decodes, embeds and ranks exactly as the workstation does.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from whalesub.core.errors import WhalesubError
from whalesub.data.contract import read_test_listing
from whalesub.embedding.embed import EmbedOptions, run_embed
from whalesub.kaggle import KIND_BOXES, KIND_MODELS, MANIFEST
from whalesub.kaggle.kernel_script import COMPETITION, sha256_file, timed, verify_files
from whalesub.models.backends import open_model
from whalesub.ranking.store import load_embeddings
from whalesub.ranking.submission import check_submission_file
from whalesub.workflows.predict import check_gallery_embeddings, predict_from_decision
from whalesub.workflows.submit import submit_files

SUBMISSION = "submission.csv"


def installed_version() -> str:
    """The version of the whalesub running here: the installed wheel's (the kernel), or the
    checkout's from git (a workstation; see :func:`whalesub._find_version`)."""
    import whalesub

    return whalesub.__version__


def same_version(a: str | None, b: str | None) -> bool:
    """Whether two version strings name the same release under PEP 440 (``1.0`` == ``1.0.0``; the
    local part ``+g<commit>`` counts, so two commits differ). Unparsable strings: exact equality."""
    if not a or not b:
        return False
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging is on Kaggle's image; without it, the strings themselves
        return a == b
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def check_models(folder: Path, have: str | None = None) -> dict:
    """The models manifest after checking every file's sha256 and the whalesub version.

    ``have``: the whalesub version to compare with (default: the running one, installed from the
    wheels dataset). The models manifest records the version of the wheel built beside them, so a
    models dataset and a wheels dataset of two different builds (two commits) are refused.
    """
    return check_dataset(folder, KIND_MODELS, have)


def check_dataset(folder: Path, kind: str, have: str | None = None,
                  problems: list[str] | None = None) -> dict:
    """The manifest of the dataset ``folder`` (models or boxes) after checking its kind, every
    file's sha256 and the whalesub version of its build; ``problems``: found by the caller."""
    what = kind.removeprefix("whalesub-")
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    problems = [*(problems or []), *verify_files(folder, manifest.get("files", {}))]
    if manifest.get("kind") != kind:
        problems.append(f"{folder / MANIFEST} has kind {manifest.get('kind')!r}, not {kind!r}")
    have = installed_version() if have is None else have
    packaged = manifest.get("whalesub_version")
    if not same_version(packaged, have):
        problems.append(
            f"the {what} were packaged for whalesub {packaged} (the wheel of their build) but whalesub "
            f"{have} is installed: attach the datasets of the same `whalesub kaggle build` (upload "
            "them again)"
        )
    if problems:
        raise WhalesubError(f"the {what} dataset {folder} failed its checks:", problems)
    return manifest


def check_boxes(folder: Path, models: dict, have: str | None = None) -> Path:
    """The box table the models dataset names, after checking the boxes dataset (its manifest, as
    the models', and the table's sha256 against the one the models were packaged with)."""
    table = folder / models["boxes_file"]
    problems = []
    want = models.get("boxes_sha256")
    if want and table.is_file() and (got := sha256_file(table)) != want:
        problems.append(f"{table} is not the box table the models were packaged with (sha256 {got[:12]}..., "
                        f"packaged {want[:12]}...): attach the boxes dataset of the same build")
    elif not table.is_file():
        problems.append(f"{table} is missing: attach the boxes dataset of the same build")
    check_dataset(folder, KIND_BOXES, have, problems)
    return table


def report_environment(model_dir: Path, fp16: bool) -> dict:
    """Print and return Python, CUDA, the providers ONNX Runtime really uses, FAISS's GPUs."""
    env: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "whalesub": installed_version(),
        "whalesub_path": str(Path(__file__).resolve().parents[1]),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - informative only
        env["torch"] = f"unavailable ({exc})"
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"unavailable ({exc.__class__.__name__})"
    import faiss
    import onnxruntime as ort

    model = open_model(model_dir, "onnx", "auto", fp16)
    env["onnxruntime"] = ort.__version__
    env["ort_available"] = ort.get_available_providers()
    env["ort_active"] = model.info.get("providers")
    env["embed_device"] = model.device
    env["faiss"] = getattr(faiss, "__version__", "?")
    env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    for key, value in env.items():
        print(f"[whalesub]   {key}: {value}", flush=True)
    return env


def predict_submission(
    model_dirs: list[Path], competition: Path, manifest: dict, working: Path, boxes: Path | None, times: dict
) -> dict:
    """Embed (gallery unless packaged, then the test images), submit, validate; returns submit's counts."""
    emb = working / "whalesub_embeddings"
    train_csv, sample = competition / "train.csv", competition / "sample_submission.csv"
    common = {
        "device": "auto",
        "fp16": bool(manifest.get("fp16")),
        "batch_size": int(manifest["batch_size"]),
        "box_type": manifest.get("box_type"),
        "box_conf": manifest.get("box_conf"),
    }

    def embed(name: str, images: str, listing: Path, options: dict) -> Path:
        return run_embed(model_dirs, emb / name, EmbedOptions(**options, **common),
                         images=competition / images, listing=listing, boxes=boxes)

    if manifest.get("gallery_file"):
        gallery = model_dirs[0].parent / manifest["gallery_file"]
        packed = load_embeddings(gallery)
        check_gallery_embeddings(
            packed,
            fingerprint=manifest["fingerprint"],
            flip_views=bool(manifest["gallery"].get("flip_views")),
            tta=manifest["gallery"].get("tta", "none"),
            box_type=manifest.get("box_type"),
            listing=[str(i) for i in read_test_listing(train_csv)],
            where="packaged",
            fp16=bool(manifest.get("fp16")),
        )
        print(f"[whalesub] packaged gallery {gallery.name}: fingerprint {packed.fingerprint}, views and the "
              f"images of {train_csv.name} match", flush=True)
    else:
        with timed("embed train images (gallery)", times):
            gallery = embed("gallery.npz", manifest["train_images"], train_csv, manifest["gallery"])
    with timed("embed test images", times):
        queries = embed("test.npz", manifest["test_images"], sample, manifest["queries"])
    out = working / SUBMISSION
    with timed("submit", times):
        summary = submit_files(
            gallery,
            queries,
            train_csv,
            float(manifest["threshold"]),
            out,
            k=int(manifest["k"]),
            sample=sample,
            progress=False,
        )
    with timed("validate", times):
        check = check_submission_file(out, sample, train_csv)
    print(
        f"[whalesub] wrote {out}: {check['n_rows']} rows (as many as {sample.name}), new_individual first "
        f"in {check['n_new_at1']} ({100 * check['new_share_at1']:.1f}%), threshold {summary['threshold']:g}",
        flush=True,
    )
    return summary


def run_kernel(inputs: dict, working: Path, times: dict | None = None) -> dict:
    """The kernel after installation: ``inputs`` maps input kinds to the folders found for them."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    times = {} if times is None else times
    models = inputs[KIND_MODELS]
    with timed("check models", times):
        manifest = check_models(models)
        model_dirs = [models / m for m in manifest["models"]]
    with timed("environment", times):
        report_environment(model_dirs[0], bool(manifest.get("fp16")))
    boxes = None
    if manifest.get("box_type"):
        box_dir = inputs.get(KIND_BOXES)
        if box_dir is None:
            raise WhalesubError(
                f"the models crop {manifest['box_type']!r} boxes but no boxes dataset "
                "(manifest.json of kind whalesub-boxes) is attached to the kernel"
            )
        with timed("check boxes", times):
            boxes = check_boxes(box_dir, manifest)
    working.mkdir(parents=True, exist_ok=True)
    if manifest.get("decision"):
        return apply_packaged_decision(models / manifest["decision"], inputs[COMPETITION], manifest, working,
                                       boxes, times)
    return predict_submission(model_dirs, inputs[COMPETITION], manifest, working, boxes, times)


def apply_packaged_decision(decision: Path, competition: Path, manifest: dict, working: Path,
                            boxes: Path | None, times: dict) -> dict:
    """A ``--predict`` build: :func:`whalesub.workflows.predict.predict_from_decision` on the test
    images, the packaged gallery checked against the competition's train.csv first."""
    train_csv, sample = competition / "train.csv", competition / "sample_submission.csv"
    print(f"[whalesub] decision {decision.name}: {manifest.get('rule')}", flush=True)
    with timed("predict from decision", times):
        r = predict_from_decision(decision, competition / manifest["test_images"], working, sample=sample,
                                  train_csv=train_csv, boxes=boxes, device="auto",
                                  batch_size=int(manifest["batch_size"]), progress=False)
    with timed("validate", times):
        check = check_submission_file(working / SUBMISSION, sample, train_csv)
    s = r["submit"]
    print(
        f"[whalesub] wrote {r['submission']}: {check['n_rows']} rows (as many as {sample.name}), "
        f"new_individual first in {check['n_new_at1']} ({100 * check['new_share_at1']:.1f}%), "
        f"threshold {s['threshold']}",
        flush=True,
    )
    return s
