"""MAP@5 of the class-centre blend (``--knn-ratio r``) on a trained fold ensemble, tuned on the same r.

For a training run with out-of-fold files in every fold (``python -m train ... --fold=all
--n_folds=2``) and a labelled test set, this benchmark does what a user does for each r:

1. exports every fold (ONNX + ``class_centres.npz``) and embeds the train images (gallery) and
   the test images (queries) with all folds combined (reused on a rerun when the fingerprints match);
2. tunes on the pooled out-of-fold rows with the same r (``whalesub tune --run RUN --knn-ratio r``:
   each fold blended with its own head's centres) and applies the pooled best share of
   ``new_individual`` first to the test scores (as ``whalesub predict`` does);
3. scores the test set: MAP@5 at that share and at the test set's own best threshold (an oracle
   upper bound), with centre-less individuals filled with their gallery mean (today) and, for
   comparison, scored by kNN alone (before: two scales) and with gallery means as the centres of
   every individual (no head centres at all).

Also printed per r: the share of test top-1 picks that go to individuals lacking a head centre
in some fold, with and without the fill (with 2 folds every individual held out of a fold's
training part lacks that fold's centre).

Usage (from the repo root)::

    python benchmarks/blend_ratio.py --run runs/blend/run --data runs/blend/data --out runs/blend/bench

``--data`` holds train.csv, train_images/, test_images/, test_truth.csv (and, if present,
sample_submission.csv and boxes.csv). Quality only; no timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder with fold*/ OOF files")
    parser.add_argument("--data", type=Path, required=True, help="folder of train.csv, train_images/, "
                        "test_images/, test_truth.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for exports and embeddings")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75,1", help="knn ratios r, comma separated")
    parser.add_argument("--grid", default="0.0:1.0:0.01", help="threshold grid (OOF and test oracle)")
    parser.add_argument("--k", type=int, default=100, help="neighbours (and centres) searched per query")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    import logging

    import numpy as np
    import yaml

    from whalesub.embedding.embed import EmbedOptions
    from whalesub.models.export import CENTRES
    from whalesub.ranking.centres import fill_centres, rank_with_centres
    from whalesub.ranking.rank import rank_queries
    from whalesub.ranking.store import load_embeddings
    from whalesub.ranking.threshold import grid_search, parse_grid, threshold_for_new_share, truth_codes
    from whalesub.workflows.oof import find_oof_folds, tune_folds
    from whalesub.workflows.predict import ensure_embedding, ensure_export, find_model_sources
    from whalesub.workflows.scorefiles import load_centres
    from whalesub.workflows.submit import load_ranking_inputs, read_truth_for

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ratios = [float(r) for r in args.ratios.split(",")]
    grid = parse_grid(args.grid)
    data_dir, out = args.data, args.out
    folds = find_oof_folds(args.run)
    sources = find_model_sources(folds)
    cfg = yaml.safe_load((folds[0] / "config.yaml").read_text())
    boxes = data_dir / "boxes.csv" if cfg.get("boxes_csv") and (data_dir / "boxes.csv").is_file() else None
    views = "flip" if cfg.get("tta_flip") else "none"  # embed as training validated
    options = EmbedOptions(tta=views, workers=0, box_type=cfg.get("eval_box_type") if boxes else None)
    exports = [ensure_export(s, out / "models", fp16=False, parity_images=None) for s in sources]
    sample = data_dir / "sample_submission.csv"
    gallery = ensure_embedding(exports, out / "gallery.npz", options, data_dir / "train_images",
                               data_dir / "train.csv", boxes)
    queries = ensure_embedding(exports, out / "test.npz", options, data_dir / "test_images",
                               sample if sample.is_file() else data_dir / "test_truth.csv", boxes)
    data = load_ranking_inputs(gallery, queries, data_dir / "train.csv")
    truth = truth_codes(read_truth_for(data_dir / "test_truth.csv", data["query_ids"].tolist(), queries),
                        data["classes"])
    paths = [e / CENTRES for e in exports]
    filled, _ = load_centres(paths, data["classes"], data["queries_file"], data["gallery"],
                             data["gallery_labels"])
    head, has = load_centres(paths, data["classes"], data["queries_file"])
    n_ind = data["classes"].size
    means, _ = fill_centres([np.zeros((n_ind, load_embeddings(p).dim), np.float32) for p in paths],
                            [np.zeros(n_ind, bool)] * len(paths), data["gallery"], data["gallery_labels"])
    lacking = ~has
    print(f"{len(folds)} folds; test: {truth.size} queries ({int((truth == -2).sum())} new); "
          f"{data['classes'].size} individuals, {int(lacking.sum())} lack a head centre in some fold")

    rows = []
    for r in ratios:
        oof = tune_folds(folds, data_dir / "train.csv", args.grid, k=args.k, knn_ratio=r)
        share = oof["best"]["new_share"]
        row = {"knn_ratio": r, "oof_map5": oof["best"]["map5"], "oof_new_share": share}
        everyone = np.ones_like(has)
        for name, centres, have in (("fill", filled, everyone), ("kNN-alone", head, has),
                                    ("means", means, everyone)):
            if r == 1.0:
                labels, scores = rank_queries(data["gallery"], data["gallery_labels"], data["queries"],
                                              args.k)
            else:
                labels, scores = rank_with_centres(data["gallery"], data["gallery_labels"], data["queries"],
                                                   centres, have, r, args.k)
            at_share = grid_search(labels, scores, truth, np.array([threshold_for_new_share(scores, share)]))
            best = grid_search(labels, scores, truth, grid)
            row[name] = {"test_map5_at_oof_share": float(at_share.map5[0]),
                         "test_map5_best": best.best_map5,
                         "top1_share_lacking": float(lacking[labels[:, 0]].mean())}
        rows.append(row)
        f, o = row["fill"], row["kNN-alone"]
        print(f"r={r:<5g} OOF MAP@5 {row['oof_map5']:.4f} (new@1 {share:.3f}) | fill: test "
              f"{f['test_map5_at_oof_share']:.4f} best {f['test_map5_best']:.4f} top1-lacking "
              f"{f['top1_share_lacking']:.3f} | kNN-alone: test "
              f"{o['test_map5_at_oof_share']:.4f} best {o['test_map5_best']:.4f} "
              f"top1-lacking {o['top1_share_lacking']:.3f} | means: test "
              f"{row['means']['test_map5_at_oof_share']:.4f} "
              f"top1-lacking {row['means']['top1_share_lacking']:.3f}", flush=True)

    print("\n| r | OOF MAP@5 | OOF new@1 | test MAP@5 (OOF share) | test MAP@5 (best thr.) | top-1 to "
          "centre-less | before: test MAP@5 (OOF share) | before: top-1 to centre-less | means only: test "
          "MAP@5 (OOF share) | means only: top-1 to centre-less |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        f, o = row["fill"], row["kNN-alone"]
        print(f"| {row['knn_ratio']:g} | {row['oof_map5']:.4f} | {row['oof_new_share']:.3f} | "
              f"{f['test_map5_at_oof_share']:.4f} | {f['test_map5_best']:.4f} | "
              f"{f['top1_share_lacking']:.3f} | {o['test_map5_at_oof_share']:.4f} | "
              f"{o['top1_share_lacking']:.3f} | {row['means']['test_map5_at_oof_share']:.4f} | "
              f"{row['means']['top1_share_lacking']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
