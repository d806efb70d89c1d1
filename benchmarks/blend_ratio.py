"""MAP@5 of the class-centre blend (``--knn-ratio r``) per centre source, on a trained fold ensemble.

For a training run with out-of-fold files in every fold (``python -m train ... --fold=all
--n_folds=2``) and a labelled test set, this benchmark does what a user does for each r and each
``--centres-from`` source:

1. exports every fold (ONNX + ``class_centres.npz``) and embeds the train images (gallery) and
   the test images (queries) with all folds combined (reused on a rerun when the fingerprints match);
2. tunes on the pooled out-of-fold rows with the same r and source (``whalesub tune --run RUN
   --knn-ratio r --centres-from S``: each fold blended with its own gallery means, or its own
   head's centres) and applies the pooled best share of ``new_individual`` first to the test
   scores (as ``whalesub predict`` does);
3. scores the test set: MAP@5 at that share and at the test set's own best threshold (an oracle
   upper bound), and the share of test top-1 picks that go to individuals lacking a head centre
   in some fold (with 2 folds every individual held out of a fold's training part lacks that
   fold's centre).

Sources: ``gallery`` (every centre the per-model gallery mean: ``--centres-from gallery``, the
default), ``head`` (the heads' centres: refused, as ``submit`` refuses it, when an individual lacks
one; the count is printed) and, for reference, ``fill``: the removed per-individual mix (head
centres where a model has one, gallery means elsewhere), tuned like ``head``.

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

    from whalesub.core.errors import ConfigError
    from whalesub.embedding.embed import EmbedOptions
    from whalesub.models.export import CENTRES
    from whalesub.ranking.centres import gallery_centres, model_slices, rank_with_centres
    from whalesub.ranking.rank import rank_queries
    from whalesub.ranking.store import load_embeddings, unit_float32
    from whalesub.ranking.threshold import grid_search, parse_grid, threshold_for_new_share, truth_codes
    from whalesub.workflows.oof import find_oof_folds, tune_folds
    from whalesub.workflows.predict import ensure_embedding, ensure_export, find_model_sources
    from whalesub.workflows.scorefiles import blend_centres
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
    classes, n_ind = data["classes"], data["classes"].size
    centres = {"gallery": blend_centres(data, "gallery")}
    try:
        centres["head"] = blend_centres(data, "head", paths)
    except ConfigError as exc:
        print(f"--centres-from head is refused on the test ensemble: {exc}")
    # the removed per-individual fill, rebuilt here for reference: head rows where a model has one
    dims = model_slices(data["gallery"], len(paths))
    assert dims == [load_embeddings(p).dim for p in paths], dims
    means = gallery_centres(data["gallery"], data["gallery_labels"], n_ind, dims) * np.sqrt(len(dims))
    blocks, lacking, lo = [], np.zeros(n_ind, bool), 0
    for p, d in zip(paths, dims, strict=True):
        f = load_embeddings(p)
        pos = np.searchsorted(classes, f.ids).clip(0, n_ind - 1)
        known = classes[pos] == f.ids
        block = means[:, lo:lo + d].copy()
        block[pos[known]] = unit_float32(f)[known]
        present = np.zeros(n_ind, bool)
        present[pos[known]] = True
        lacking |= ~present
        blocks.append(block)
        lo += d
    centres["fill"] = (np.concatenate(blocks, axis=1) / np.sqrt(len(dims))).astype(np.float32)
    print(f"{len(folds)} folds; test: {truth.size} queries ({int((truth == -2).sum())} new); "
          f"{n_ind} individuals, {int(lacking.sum())} lack a head centre in some fold")

    rows = []
    everyone = np.ones(n_ind, bool)
    for r in ratios:
        row = {"knn_ratio": r}
        for name in ("gallery", "head", "fill"):
            oof = tune_folds(folds, data_dir / "train.csv", args.grid, k=args.k, knn_ratio=r,
                             centres_from="gallery" if name == "gallery" else "head")
            share = oof["best"]["new_share"]
            cell = {"oof_map5": oof["best"]["map5"], "oof_new_share": share}
            if r == 1.0:
                labels, scores = rank_queries(data["gallery"], data["gallery_labels"], data["queries"],
                                              args.k)
            elif name in centres:
                labels, scores = rank_with_centres(data["gallery"], data["gallery_labels"], data["queries"],
                                                   centres[name], everyone, r, args.k)
            else:
                cell["refused"] = int(lacking.sum())
                row[name] = cell
                continue
            at_share = grid_search(labels, scores, truth, np.array([threshold_for_new_share(scores, share)]))
            best = grid_search(labels, scores, truth, grid)
            cell.update(test_map5_at_oof_share=float(at_share.map5[0]), test_map5_best=best.best_map5,
                        top1_share_lacking=float(lacking[labels[:, 0]].mean()))
            row[name] = cell
        rows.append(row)
        print(f"r={r:g}: " + " | ".join(f"{n}: {_cell(row[n])}" for n in ("gallery", "head", "fill")),
              flush=True)

    print("\n| r | gallery: OOF MAP@5 | gallery: test MAP@5 (OOF share) | gallery: test MAP@5 (best thr.) | "
          "gallery: top-1 to centre-less | head: OOF MAP@5 | head: test MAP@5 (OOF share) | "
          "head: top-1 to centre-less | removed fill: test MAP@5 (OOF share) | removed fill: top-1 to "
          "centre-less |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        g, h, f = row["gallery"], row["head"], row["fill"]
        head_test = (f"refused ({h['refused']} lack a centre)" if "refused" in h
                     else f"{h['test_map5_at_oof_share']:.4f}")
        head_top1 = "-" if "refused" in h else f"{h['top1_share_lacking']:.3f}"
        print(f"| {row['knn_ratio']:g} | {g['oof_map5']:.4f} | {g['test_map5_at_oof_share']:.4f} | "
              f"{g['test_map5_best']:.4f} | {g['top1_share_lacking']:.3f} | {h['oof_map5']:.4f} | "
              f"{head_test} | {head_top1} | {f['test_map5_at_oof_share']:.4f} | "
              f"{f['top1_share_lacking']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _cell(c: dict) -> str:
    if "refused" in c:
        return f"OOF {c['oof_map5']:.4f}, test refused ({c['refused']} lack a head centre)"
    return (f"OOF {c['oof_map5']:.4f} (new@1 {c['oof_new_share']:.3f}), test "
            f"{c['test_map5_at_oof_share']:.4f} best {c['test_map5_best']:.4f} "
            f"top1-lacking {c['top1_share_lacking']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
