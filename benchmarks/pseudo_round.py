"""Pseudo-labelling, measured: a second training round on confident test predictions vs the first.

    python benchmarks/pseudo_round.py [--out runs/pseudo_bench] [--min-score 0.75] [--min-margin 0.05]

Round 1 trains the debug recipe (synthetic data, fold 0, CPU), embeds the train and test images with
that fold (PyTorch backend, flipped gallery, flip TTA), and `whalesub pseudo-label` keeps the
confident test predictions (precision measured against the synthetic truth). Round 2 trains the
same recipe with ``--pseudo_csv``. Both rounds score the synthetic test set the same way (training's
``test_metrics.json``: gallery = every train image, threshold from validation), so the two MAP@5
figures are side by side. The commands it runs are printed; everything lands in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "pseudo_bench")
    ap.add_argument("--min-score", type=float, default=0.75)
    ap.add_argument("--min-margin", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args()
    out, py = a.out.resolve(), sys.executable
    data = out / "data"
    common = ["--config", "train/configs/debug.yaml", f"--out_dir={out}", f"--train_csv={data / 'train.csv'}",
              f"--image_dir={data / 'train_images'}", f"--boxes_csv={data / 'boxes.csv'}",
              f"--test_csv={data / 'test_truth.csv'}", f"--test_image_dir={data / 'test_images'}",
              f"--epochs={a.epochs}"]
    run([py, "-m", "train", *common, "--run_name=round1"])
    fold1 = out / "round1" / "fold0"
    emb = ["embed", "--backend", "torch", "--model", str(fold1), "--boxes", str(data / "boxes.csv"),
           "--box-type", "body", "--workers", "1"]
    cli = [py, "-m", "whalesub.cli"]
    run([*cli, *emb, "--list", str(data / "train.csv"), "--images", str(data / "train_images"),
         "--out", str(out / "gallery.npz"), "--flip-views"])
    run([*cli, *emb, "--images", str(data / "test_images"), "--out", str(out / "test.npz")])
    run([*cli, "pseudo-label", "--gallery", str(out / "gallery.npz"), "--queries",
         str(out / "test.npz"), "--train-csv", str(data / "train.csv"), "--out", str(out / "pseudo.csv"),
         "--min-score", str(a.min_score), "--min-margin", str(a.min_margin), "--truth",
         str(data / "test_truth.csv")])
    run([py, "-m", "train", *common, "--run_name=round2", f"--pseudo_csv={out / 'pseudo.csv'}",
         f"--pseudo_truth_csv={data / 'test_truth.csv'}"])
    r1 = json.loads((fold1 / "test_metrics.json").read_text())
    r2 = json.loads((out / "round2" / "fold0" / "test_metrics.json").read_text())
    p = json.loads((out / "round2" / "fold0" / "pseudo.json").read_text())
    print(f"\npseudo-labels: {p['added']} added to fold 0's training part ({p['rows']} selected), "
          f"precision {p.get('precision', float('nan')):.3f}")
    print(f"{'round':<8}{'test MAP@5':>12}{'known':>8}{'new':>8}{'all-new':>9}")
    for name, r in (("1", r1), ("2 (+PL)", r2)):
        print(f"{name:<8}{r['map5']:>12.4f}{r['map5_known']:>8.4f}{r['map5_new']:>8.4f}"
              f"{r['all_new_baseline']:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
