"""Catalogue speed at scale: identify vs a bare FAISS search, and a small add vs building it whole.

Random unit vectors stand in for photos (the network is bypassed: vectors go in through
:func:`whalesub.catalogue.add.add_vectors`, the function every ``catalogue add`` ends in), with
``--n`` photos of ``--n / 3`` individuals, all labelled. Measured side by side in one run, each the
best of ``--repeats``:

1. build: a new catalogue with all ``--n`` photos in one ``add_vectors`` call (SQLite rows + index file);
2. add: open the built catalogue, add ``--add`` new photos, close (the repair check on open included);
3. identify: open the catalogue read-only, load the labelled gallery and the cached calibration, rank
   ``--queries`` query vectors (candidates per individual and per image, probabilities, grouping);
4. bare: ``faiss.IndexFlatIP`` built from the same vectors in memory + ``search`` of the same queries
   with the same k (identify searches ``max(100, 10 x top) + 1`` neighbours to collect ``top``
   individuals).

Goals (issue 16): identify <= 1.5 x bare; add <= 2% of build. The calibration is fitted once after
the build (its time is printed too) and cached in the catalogue, as it is in use. identify and bare
run interleaved, so that a busy spell of a shared machine slows both alike.

Usage: ``python benchmarks/catalogue.py [--n 100000] [--dim 512] [--queries 1000] [--add 100]
[--top 12] [--repeats 3] [--folder DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from whalesub.catalogue.add import NewPhoto, add_vectors  # noqa: E402
from whalesub.catalogue.identify import calibration_of, identify_vectors, load_gallery  # noqa: E402
from whalesub.catalogue.store import Catalogue  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def photos(vectors: np.ndarray, start: int, labels: np.ndarray | None) -> list[NewPhoto]:
    return [
        NewPhoto(
            f"p{start + i:07d}.jpg",
            hashlib.sha256(v.tobytes()).hexdigest(),
            individual_id=None if labels is None else f"ind{labels[i]:06d}",
        )
        for i, v in enumerate(vectors)
    ]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000, help="photos in the catalogue")
    ap.add_argument("--dim", type=int, default=512, help="vector dimension")
    ap.add_argument("--queries", type=int, default=1000, help="photos identified at once")
    ap.add_argument("--add", type=int, default=100, help="photos added to the built catalogue")
    ap.add_argument("--top", type=int, default=12, help="candidates per individual and per image")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    ap.add_argument("--folder", type=Path, default=None, help="where to build (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import faiss

    rng = np.random.default_rng(args.seed)
    n_ind = max(2, args.n // 3)
    centres = unit(rng.standard_normal((n_ind, args.dim)))
    labels = rng.integers(0, n_ind, args.n)
    vectors = unit(centres[labels] + 0.9 * unit(rng.standard_normal((args.n, args.dim))))
    queries = unit(
        centres[rng.integers(0, n_ind, args.queries)]
        + 0.9 * unit(rng.standard_normal((args.queries, args.dim)))
    )
    items = photos(vectors, 0, labels)
    root = Path(tempfile.mkdtemp(prefix="catbench-", dir=args.folder))
    try:

        def build() -> None:
            folder = root / "build"
            shutil.rmtree(folder, ignore_errors=True)
            with Catalogue.create(folder, "bench", args.dim, {}) as cat:
                add_vectors(cat, items, vectors, "bench")

        t_build = best_of(args.repeats, build)
        folder = root / "build"
        with Catalogue.open(folder) as cat:
            t = time.perf_counter()
            calib, why = calibration_of(cat, load_gallery(cat))
            t_calib = time.perf_counter() - t
        print(
            f"built {args.n} photos x {args.dim} in {t_build:.2f} s; calibration fitted in {t_calib:.2f} s "
            f"({'ok' if calib else why})"
        )
        added = [args.n]

        def add_small() -> None:
            extra = unit(rng.standard_normal((args.add, args.dim)))
            with Catalogue.open(folder) as cat:
                add_vectors(cat, photos(extra, added[0], rng.integers(0, n_ind, args.add)), extra, "bench")
            added[0] += args.add

        t_add = best_of(args.repeats, add_small)
        rows = np.full(args.queries, -1)

        def identify() -> None:
            with Catalogue.open(folder, write=False) as cat:
                gallery = load_gallery(cat)
                calib, _ = calibration_of(cat, gallery)
                identify_vectors(gallery, queries, rows, args.top, calib)

        with Catalogue.open(folder, write=False) as cat:
            same = np.array(cat.vectors())  # the vectors identify searches (with the added rows)
        k = min(len(same), max(100, 10 * args.top) + 1)

        def bare() -> None:
            index = faiss.IndexFlatIP(args.dim)
            index.add(same)
            index.search(queries, k)

        identify()  # warm the page cache and the database caches once
        # interleaved, so that a busy spell of a shared machine hits both sides alike
        t_bare = t_identify = float("inf")
        for _ in range(args.repeats):
            t_bare = min(t_bare, best_of(1, bare))
            t_identify = min(t_identify, best_of(1, identify))
        print(f"{'measure':<44} {'seconds':>9} {'ratio':>8} {'goal':>8}")
        print(f"{'bare FAISS: IndexFlatIP add + search k=' + str(k):<44} {t_bare:>9.3f} {1:>8.2f}")
        print(
            f"{'catalogue identify (' + str(args.queries) + ' photos, top ' + str(args.top) + ')':<44} "
            f"{t_identify:>9.3f} {t_identify / t_bare:>8.2f} {'<= 1.5':>8}"
        )
        print(f"{'build whole (' + str(args.n) + ' photos)':<44} {t_build:>9.3f} {1:>8.3f}")
        print(
            f"{'add ' + str(args.add) + ' photos to it':<44} {t_add:>9.3f} {t_add / t_build:>8.3%} "
            f"{'<= 2%':>8}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
