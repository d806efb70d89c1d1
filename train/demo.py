"""The built-in demo: the whole pipeline, from training to a scored submission, on synthetic data.

``python -m train.demo [--out runs/demo] [--epochs N]`` runs, on CPU in a few minutes, exactly the
commands a user runs (each one is printed before it runs):

1. ``python -m train --config train/configs/debug.yaml``: synthesise a Happywhale-format set of
   marked animals (``whalesub synth``), train one fold with sub-center ArcFace, validate with
   whalesub's ranking and MAP@5, and save checkpoints plus OOF embeddings;
2. ``whalesub export``: ONNX FP32 + FP16, checked against PyTorch;
3. ``whalesub embed``: the train images as the gallery, the test images as queries, with the
   box type and flip TTA setting the run validated with;
4. ``whalesub tune``: the ``new_individual`` threshold from the fold's OOF embeddings;
5. ``whalesub submit``, ``whalesub validate``, ``whalesub score`` against the synthetic truth.

Re-running it resumes or skips what is already done (training resumes from ``last.pt``; the other
steps are cheap and are redone).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml


def run(cmd: list[str], capture: bool = False) -> str:
    """Print and run one command; stop the demo with its exit status if it fails."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        print(f"demo: step failed with exit status {proc.returncode}: {shlex.join(cmd)}", file=sys.stderr)
        raise SystemExit(proc.returncode)
    print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)
    return proc.stdout or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for data, run, models, embeddings")
    parser.add_argument("--epochs", type=int, default=None, help="override the debug recipe's epochs")
    args = parser.parse_args(argv)

    out = Path(args.out)
    data, run_dir = out / "data", out / "run"
    whalesub = [sys.executable, "-m", "whalesub.cli"]
    train_cmd = [
        sys.executable, "-m", "train", "--config", "train/configs/debug.yaml",
        f"--out_dir={out}", "--run_name=run",
        f"--train_csv={data / 'train.csv'}", f"--image_dir={data / 'train_images'}",
        f"--boxes_csv={data / 'boxes.csv'}", f"--test_csv={data / 'test_truth.csv'}",
        f"--test_image_dir={data / 'test_images'}",
    ]
    if args.epochs is not None:
        train_cmd.append(f"--epochs={args.epochs}")
    run(train_cmd)

    fold = run_dir / "fold0"
    models = out / "models" / "fold0"
    emb = out / "embeddings"
    run(whalesub + ["export", str(fold), "--out", str(models), "--fp16",
                    "--parity-images", str(data / "test_images")])
    # embed exactly as the run's validation did: its box type and its TTA (the debug recipe's
    # synthetic marks are chiral, so it trains and validates without flips)
    cfg = yaml.safe_load((fold / "config.yaml").read_text())
    # the same box rule (whalesub.data.contract.choose_box_type): no box file -> whole frames; no type named
    # -> the file's only type (training refuses a file of several types without eval_box_type)
    box_type = cfg.get("eval_box_type")
    boxes = (["--boxes", str(data / "boxes.csv")] + (["--box-type", box_type] if box_type else [])
             if cfg.get("boxes_csv") else [])
    gallery_tta, query_tta = (["--flip-views"], ["--tta", "flip"]) if cfg["tta_flip"] else (
        ["--tta", "none"], ["--tta", "none"])
    run(whalesub + ["embed", "--model", str(models), "--list", str(data / "train.csv"),
                    "--images", str(data / "train_images"), "--out", str(emb / "gallery.npz"),
                    *gallery_tta, *boxes])
    run(whalesub + ["embed", "--model", str(models), "--list", str(data / "sample_submission.csv"),
                    "--images", str(data / "test_images"), "--out", str(emb / "test.npz"),
                    *query_tta, *boxes])
    tuned = json.loads(run(whalesub + [
        "tune", "--gallery", str(fold / "oof_gallery.npz"), "--queries", str(fold / "oof_embeddings.npz"),
        "--train-csv", str(data / "train.csv"), "--truth", str(fold / "oof_labels.csv"), "--json",
    ], capture=True))
    threshold = float(tuned["best"]["threshold"])
    print(f"  OOF MAP@5 {tuned['best']['map5']:.4f} at threshold {threshold:.2f}")
    submission = out / "submission.csv"
    run(whalesub + ["submit", "--gallery", str(emb / "gallery.npz"), "--queries", str(emb / "test.npz"),
                    "--train-csv", str(data / "train.csv"), "--threshold", f"{threshold:.4f}",
                    "--out", str(submission), "--sample", str(data / "sample_submission.csv")])
    run(whalesub + ["validate", str(submission), "--sample", str(data / "sample_submission.csv"),
                    "--train-csv", str(data / "train.csv")])
    run(whalesub + ["score", str(submission), "--truth", str(data / "test_truth.csv")])
    print(f"\ndemo: done; submission at {submission}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
