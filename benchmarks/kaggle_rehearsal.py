"""Rehearse the Kaggle kernel in a fresh virtual environment: proves the wheel list complete.

Not part of CI (it downloads wheels from PyPI). Steps:

1. a tiny exported model and a small synthetic competition (or ``--export DIR --data DIR``);
2. ``whalesub kaggle build`` for THIS machine's Python (``--python-version`` = the local one,
   manylinux x86_64), downloading the default wheels (faiss-gpu-cu12, onnxruntime-gpu<1.27) with
   ``pip download --no-deps --only-binary=:all:``;
3. a fresh venv whose only other packages are a stand-in for Kaggle's image: the distributions of
   :data:`IMAGE` and their dependencies, linked from this environment (FAISS, ONNX Runtime and
   whalesub are NOT among them);
4. the kernel script run with the venv's Python under ``unshare -n`` (no network): it installs the
   wheels with ``pip install --no-index --no-deps`` into the venv, embeds, submits, validates;
5. its submission compared row for row with ``whalesub embed`` + ``submit`` run here.

With ``--predict OUT --data DIR`` the build packages the decision of a ``whalesub predict`` run
(``whalesub kaggle build --predict OUT``; DIR is the competition folder predict used) and the
kernel's submission is compared row for row with ``OUT/submission.csv``.

    python benchmarks/kaggle_rehearsal.py [--work DIR] [--keep] [--predict OUT --data DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path

# What Kaggle's GPU image already has and whalesub uses at inference (KAGGLE.md: torch and timm
# preinstalled; numpy, pandas, Pillow, OpenCV, tqdm, PyYAML, packaging come with them or the base).
IMAGE = ("numpy", "pandas", "pillow", "opencv-python-headless", "torch", "timm", "tqdm", "pyyaml",
         "packaging", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12")
SHIPPED = ("whalesub", "faiss-gpu", "faiss-gpu-cu12", "faiss-cpu", "onnxruntime", "onnxruntime-gpu")


def closure(names) -> list:
    """The installed distributions of ``names`` and of everything they require (markers honoured)."""
    from packaging.requirements import Requirement

    seen, todo, dists = set(), list(names), []
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen or name in SHIPPED:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        dists.append(dist)
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return dists


def make_image_standin(folder: Path) -> list[str]:
    """Symlinks to the top-level files of the image's distributions (nothing copied)."""
    folder.mkdir(parents=True)
    names = []
    for dist in closure(IMAGE):
        names.append(f"{dist.metadata['Name']}=={dist.version}")
        for f in dist.files or []:
            top = Path(str(f)).parts[0]
            src = Path(dist.locate_file(top))
            if top != ".." and src.exists() and not (folder / top).exists():
                (folder / top).symlink_to(src)
    return sorted(names)


def make_inputs(work: Path) -> tuple[Path, Path]:
    """A tiny exported model (random weights) and a small synthetic competition."""
    import torch

    from whalesub.models.export import export_model
    from whalesub.models.network import EmbeddingNet, save_embedding_net
    from whalesub.models.spec import ModelSpec
    from whalesub.synth import make_dataset

    torch.manual_seed(0)
    net = EmbeddingNet(ModelSpec(backbone="test_efficientnet", image_size=64, embed_dim=32, neck="linear_bn"))
    save_embedding_net(net.eval(), work / "run" / "best.pt")
    export_model(work / "run", work / "export", fp16=True)
    make_dataset(work / "data", seed=1, n_individuals=20, n_species=2, max_images=4, progress=False)
    return work / "export", work / "data"


def reference_submission(export: Path, data: Path, out: Path, new_share: float) -> float:
    """``whalesub embed`` + ``submit`` here; the threshold puts new_individual first in ``new_share``."""
    from whalesub.embedding.embed import EmbedOptions, run_embed
    from whalesub.workflows.submit import submit_files

    run_embed([export], out / "gallery.npz", EmbedOptions(tta="none", flip_views=True),
              images=data / "train_images", listing=data / "train.csv")
    run_embed([export], out / "test.npz", EmbedOptions(tta="flip"), images=data / "test_images",
              listing=data / "sample_submission.csv")
    s = submit_files(out / "gallery.npz", out / "test.npz", data / "train.csv", None, out / "submission.csv",
                     sample=data / "sample_submission.csv", new_share=new_share)
    return s["threshold"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--export", type=Path, help="export folder to package (default: a tiny random model)")
    ap.add_argument("--data", type=Path, help="competition folder (default: a small synthetic one)")
    ap.add_argument("--new-share", type=float, default=0.3, help="share of rows with new_individual first")
    ap.add_argument("--predict", type=Path, help="a `whalesub predict` output folder: package its decision "
                    "and compare with its submission.csv (needs --data)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if args.predict is not None and args.data is None:
        ap.error("--predict needs --data (the competition folder predict used)")
    import pandas as pd

    from whalesub.kaggle.package import BuildOptions, build_package
    from whalesub.kaggle.wheels import DEFAULT_PACKAGES

    work = args.work or Path(tempfile.mkdtemp(prefix="kaggle_rehearsal."))
    work.mkdir(parents=True, exist_ok=True)
    times = {}
    try:
        t = time.perf_counter()
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        if args.predict is not None:  # the decision of a predict run, compared with its submission
            data, reference = args.data, args.predict / "submission.csv"
            opts = BuildOptions(owner="rehearsal", predict=args.predict, python_version=py)
            build_package([], work / "build", opts, overwrite=True)
        else:
            export, data = (args.export, args.data) if args.export else make_inputs(work)
            threshold = reference_submission(export, data, work / "reference", args.new_share)
            reference = work / "reference" / "submission.csv"
            opts = BuildOptions(owner="rehearsal", threshold=threshold, python_version=py)
            build_package([export], work / "build", opts, overwrite=True)
        times["build (wheels downloaded)"] = time.perf_counter() - t
        wheels = json.loads((work / "build" / "wheels" / "manifest.json").read_text())["install"]
        t = time.perf_counter()
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        image = make_image_standin(work / "image")
        site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        (site / "kaggle_image.pth").write_text(str(work / "image") + "\n")
        times["fresh venv + image stand-in"] = time.perf_counter() - t
        root = work / "input"
        for sub, rel in (("models", "whalesub-models"), ("wheels", "whalesub-wheels")):
            shutil.copytree(work / "build" / sub, root / "datasets" / "rehearsal" / rel)
        shutil.copytree(data, root / "competitions" / "happy-whale-and-dolphin",
                        ignore=shutil.ignore_patterns("test_truth*"))
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "WHALESUB_KAGGLE_INPUT": str(root),
               "WHALESUB_KAGGLE_WORKING": str(work / "working"), "PYTHONNOUSERSITE": "1"}
        t = time.perf_counter()
        proc = subprocess.run(["unshare", "-n", str(venv / "bin" / "python"),
                               str(work / "build" / "kernel" / "whalesub_kernel.py")],
                              cwd=work, env=env, capture_output=True, text=True)
        times["kernel (offline)"] = time.perf_counter() - t
        print(proc.stdout[-6000:])
        if proc.returncode != 0:
            print(proc.stderr[-6000:], file=sys.stderr)
            print(f"FAILED: the kernel exited {proc.returncode} in the fresh venv")
            return 1
        got = pd.read_csv(work / "working" / "submission.csv", dtype=str)
        same = got.equals(pd.read_csv(reference, dtype=str))
        mb = sum(p.stat().st_size for p in (work / "build" / "wheels").iterdir()) / 1e6
        print(f"\nimage stand-in ({len(image)} distributions): {', '.join(image)}")
        print(f"wheels installed offline with --no-index --no-deps: {' '.join(wheels)} ({mb:.0f} MB; "
              f"defaults {DEFAULT_PACKAGES})")
        for k, v in times.items():
            print(f"{k}: {v:.1f} s")
        print(f"submission ({len(got)} rows, new_individual first in "
              f"{got['predictions'].str.startswith('new_individual').sum()}) equals "
              f"{'predict' if args.predict else 'whalesub embed + submit'} ({reference}) row for row: {same}")
        return 0 if same else 1
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
