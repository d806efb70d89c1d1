"""MAP@5 of kNN blended with class centres (``submit --knn-ratio r``) on the synthetic demo.

Uses the output folder of ``python -m train.demo --out DIR`` (runs it first when DIR has no
submission yet): its gallery and test embeddings, the exported ``class_centres.npz`` and the
synthetic test truth. For each r the submission is written with the same new-individual share
(``--new-share``, default 0.2: the synthetic generator's share of unseen test animals, so every r
is compared at the same operating point) and scored; also the MAP@5 on known animals.
Quality only: the timing of the ranking is ``benchmarks/submit_scale.py``'s business.

``--constructed`` instead ranks constructed embeddings (no training, seconds): 400 individuals
with true directions mu (D=32, long-tailed 1-12 images each, image = unit(mu + u), u a random
unit vector), a centre per individual = the normalised mean of its gallery images (roughly what a
head trained on those images learns), 1,000 queries of which 20% are unseen animals. It shows
the mechanism under these assumptions, not what a trained model gives.

``--centres-from`` (demo only, default head): the heads' ``class_centres.npz`` (refused if the
head lacks a gallery individual) or every individual's gallery mean (``submit --centres-from``).

Usage: ``python benchmarks/centres.py [--demo runs/demo | --constructed] [--ratios 0,0.25,0.5,0.75,1]
[--new-share 0.2] [--centres-from head|gallery]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's whalesub, installed or not

from whalesub.ranking.centres import rank_with_centres  # noqa: E402
from whalesub.ranking.metric import score_breakdown  # noqa: E402
from whalesub.ranking.rank import decode_labels, insert_new_individual, rank_queries  # noqa: E402
from whalesub.ranking.submission import score_submission  # noqa: E402
from whalesub.ranking.threshold import threshold_for_new_share  # noqa: E402
from whalesub.workflows.submit import submit_files  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def constructed(ratios: list[float], new_share: float, k: int, seed: int = 0) -> None:
    """The r sweep on constructed embeddings (see the module docstring); prints one row per r."""
    rng = np.random.default_rng(seed)
    n_ind, d = 400, 32
    mu = _unit(rng.standard_normal((n_ind, d)))
    counts = np.minimum(rng.geometric(0.35, n_ind), 12)
    labels = np.repeat(np.arange(n_ind), counts)
    gallery = _unit(mu[labels] + _unit(rng.standard_normal((labels.size, d))))
    sums = np.zeros((n_ind, d))
    np.add.at(sums, labels, gallery)
    centres = _unit(sums)
    n_q = 1000
    is_new = rng.random(n_q) < 0.2
    truth_ind = rng.integers(0, n_ind, n_q)
    base = np.where(is_new[:, None], _unit(rng.standard_normal((n_q, d))), mu[truth_ind])
    queries = _unit(base + _unit(rng.standard_normal((n_q, d))))
    classes = np.array([f"ind{i:03d}" for i in range(n_ind)])
    truth = np.where(is_new, "new_individual", classes[truth_ind]).tolist()
    for r in ratios:
        if r == 1.0:
            lab, sc = rank_queries(gallery, labels, queries, k)
        else:
            lab, sc = rank_with_centres(gallery, labels, queries, centres, np.ones(n_ind, bool), r, k)
        preds = decode_labels(insert_new_individual(lab, sc, threshold_for_new_share(sc, new_share)), classes)
        s = score_breakdown(preds, truth)
        print(f"{r:>5.2f} {s['map5']:>7.4f} {s['map5_known']:>7.4f} {s['map5_new']:>7.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="folder of `python -m train.demo --out`")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75,1", help="comma list of r")
    parser.add_argument("--new-share", type=float, default=0.2)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--constructed", action="store_true", help="constructed embeddings, no training")
    parser.add_argument("--centres-from", default="head", choices=("head", "gallery"),
                        help="centre source of the demo's blend (submit --centres-from)")
    args = parser.parse_args(argv)
    ratios = [float(x) for x in args.ratios.split(",")]
    if args.constructed:
        print(f"{'r':>5} {'MAP@5':>7} {'known':>7} {'new':>7}")
        constructed(ratios, args.new_share, args.k)
        return 0
    demo = Path(args.demo)
    if not (demo / "submission.csv").is_file():
        subprocess.run([sys.executable, "-m", "train.demo", "--out", str(demo)], check=True)
    data, emb = demo / "data", demo / "embeddings"
    centres = demo / "models" / "fold0" / "class_centres.npz"
    print(f"{'r':>5} {'MAP@5':>7} {'known':>7} {'new':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in ratios:
            out = Path(tmp) / f"sub_{r}.csv"
            submit_files(emb / "gallery.npz", emb / "test.npz", data / "train.csv", None, out, args.k,
                         data / "sample_submission.csv", new_share=args.new_share,
                         centres=[centres] if args.centres_from == "head" else None,
                         centres_from=args.centres_from, knn_ratio=r, progress=False)
            s = score_submission(out, data / "test_truth.csv")
            print(f"{r:>5.2f} {s['map5']:>7.4f} {s['map5_known']:>7.4f} {s['map5_new']:>7.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
