"""MAP@5 of kNN blended with class centres (``submit --knn-ratio r``) on the synthetic demo.

Uses the output folder of ``python -m train.demo --out DIR`` (runs it first when DIR has no
submission yet): its gallery and test embeddings, the exported ``class_centres.npz`` and the
synthetic test truth. For each r the submission is written with the same new-individual share
(``--new-share``, default 0.2: the synthetic generator's share of unseen test animals, so every r
is compared at the same operating point) and scored; also the MAP@5 on known animals.
Quality only: the timing of the ranking is ``benchmarks/submit_scale.py``'s business.

Usage: ``python benchmarks/centres.py [--demo runs/demo] [--ratios 0,0.25,0.5,0.75,1] [--new-share 0.2]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from whalesub.pipeline import submit_files
from whalesub.submission import score_submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="folder of `python -m train.demo --out`")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75,1", help="comma list of r")
    parser.add_argument("--new-share", type=float, default=0.2)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args(argv)
    demo = Path(args.demo)
    if not (demo / "submission.csv").is_file():
        subprocess.run([sys.executable, "-m", "train.demo", "--out", str(demo)], check=True)
    data, emb = demo / "data", demo / "embeddings"
    centres = demo / "models" / "fold0" / "class_centres.npz"
    print(f"{'r':>5} {'MAP@5':>7} {'known':>7} {'new':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in (float(x) for x in args.ratios.split(",")):
            out = Path(tmp) / f"sub_{r}.csv"
            submit_files(emb / "gallery.npz", emb / "test.npz", data / "train.csv", None, out, args.k,
                         data / "sample_submission.csv", new_share=args.new_share, centres=[centres],
                         knn_ratio=r, progress=False)
            s = score_submission(out, data / "test_truth.csv")
            print(f"{r:>5.2f} {s['map5']:>7.4f} {s['map5_known']:>7.4f} {s['map5_new']:>7.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
