"""Which out-of-fold threshold transfers to the test set: pooled share, one fold's raw cosine, or neither?

For each fold design (``--design KEY=VALUE``, e.g. ``holdout_individuals=0.25`` or
``target_new_share=0.2``) this trains every fold of a small run (``python -m train --fold=all``; a
finished run is reused; to save CPU each fold validates once, after its last epoch), runs
:func:`whalesub.workflows.predict.predict` on it (every fold exported and combined, flipped gallery,
flip-TTA test set, pooled out-of-fold share), then ranks the test set once and scores, against the
test truth, the ``new_individual`` rule chosen each way:

- ``pooled share``: the share of pooled OOF rows that put new_individual first at the best pooled OOF
  threshold, applied as a share of test rows (what ``whalesub predict`` does by default);
- ``pooled thr``: that best pooled OOF cosine, applied as a raw threshold;
- ``fold k thr``: fold k's own best OOF cosine, applied as a raw threshold;
- ``truth share``: the test set's true share of new animals, applied as a share (the share rule's
  ceiling when the share is known);
- ``ceiling``: the best threshold of a fine grid chosen with the test truth (optimistic).

Data: ``--data synth`` (default) generates the debug recipe's synthetic set
(``train/configs/debug.yaml``) under OUT/data; a folder in competition format (e.g.
``/work/shared/data/nyala``) uses ``train/configs/nyala.yaml`` and reads the data in place.

Usage: ``python benchmarks/cv_share.py [--data synth] [--out runs/cv_share] [--folds 2] [--epochs 8]
[--image-size 48] [--individuals 60] [--folds-only] [--design holdout_individuals=0 --design
target_new_share=0.2 ...]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DESIGNS = ["holdout_individuals=0", "holdout_individuals=0.25", "target_new_share=0.2"]


def train_command(data: str, out: Path, name: str, design: str, folds: int, epochs: int,
                  image_size: int | None) -> list[str]:
    """``python -m train`` for one design, every fold, no test scoring (predict does that)."""
    cmd = [sys.executable, "-m", "train", "--fold=all", f"--n_folds={folds}", f"--epochs={epochs}",
           f"--out_dir={out}", f"--run_name={name}", "--test_csv=null", "--test_image_dir=null",
           "--holdout_individuals=0", f"--{design}", "--val_before_train=false", f"--val_every={epochs}"]
    if data == "synth":
        d = out / "data"
        cmd[3:3] = ["--config", "train/configs/debug.yaml", f"--train_csv={d / 'train.csv'}",
                    f"--image_dir={d / 'train_images'}", f"--boxes_csv={d / 'boxes.csv'}"]
    else:
        d = Path(data)
        cmd[3:3] = ["--config", "train/configs/nyala.yaml", f"--train_csv={d / 'train.csv'}",
                    f"--image_dir={d / 'train_images'}"]
    if image_size:
        cmd.append(f"--image_size={image_size}")
    return cmd


def ensure_synth(out: Path, individuals: int | None) -> Path:
    """The debug recipe's synthetic set under ``out/data`` (made once; ``individuals`` overrides
    its ``synth_individuals``)."""
    import yaml

    from whalesub.synth import make_dataset

    d = out / "data"
    cfg = yaml.safe_load((REPO / "train/configs/debug.yaml").read_text())
    n = individuals or cfg["synth_individuals"]
    if (d / "stats.json").is_file():
        have = json.loads((d / "stats.json").read_text())["settings"]["n_individuals"]
        if have != n:
            raise SystemExit(f"{d} holds a synthetic set of {have} animals, not {n}: pass another --out")
        return d
    make_dataset(d, seed=cfg.get("synth_seed", 0), n_individuals=n, **cfg.get("synth_options", {}),
                 progress=False)
    return d


def measure(run_dir: Path, data: Path, out: Path, boxes: Path | None, box_type: str | None) -> dict:
    """Predict with every fold of ``run_dir`` and score each threshold rule on the test truth."""
    from whalesub.embedding.embed import EmbedOptions
    from whalesub.ranking.rank import NEW, rank_queries
    from whalesub.ranking.threshold import grid_search, threshold_for_new_share, truth_codes
    from whalesub.workflows.predict import predict
    from whalesub.workflows.submit import load_ranking_inputs

    r = predict([run_dir], data / "train.csv", data / "train_images", data / "test_images", out,
                sample=data / "sample_submission.csv", truth=data / "test_truth.csv", boxes=boxes,
                options=EmbedOptions(box_type=box_type, workers=0))
    tuned = json.loads((out / "tune.json").read_text())
    inputs = load_ranking_inputs(r["gallery"], r["queries"], data / "train.csv")
    labels, scores = rank_queries(inputs["gallery"], inputs["gallery_labels"], inputs["queries"], 100)
    truth_of = pd.read_csv(data / "test_truth.csv", dtype=str).set_index("image")["individual_id"]
    truth = truth_codes(truth_of.reindex(inputs["query_ids"]).to_numpy(), inputs["classes"])

    def at(thresholds):
        return grid_search(labels, scores, truth, np.asarray(thresholds, dtype=np.float64))

    test_share = float((truth == NEW).mean())
    rules = {"pooled share": threshold_for_new_share(scores, r["new_share"]),
             "pooled thr": tuned["best"]["threshold"]}
    for i, f in enumerate(tuned["folds"]):
        rules[f"fold {i} thr"] = f["best"]["threshold"]
    rules["truth share"] = threshold_for_new_share(scores, test_share)
    found = at(list(rules.values()))
    row = {name: {"threshold": float(t), "map5": float(found.map5[i]), "new_share": float(found.new_share[i])}
           for i, (name, t) in enumerate(rules.items())}
    fine = at(np.round(np.arange(-0.2, 1.0001, 0.005), 4))
    row["ceiling"] = {"threshold": fine.best_threshold, "map5": fine.best_map5,
                      "new_share": float(fine.new_share[int(np.argmax(fine.map5))])}
    if abs(row["pooled share"]["map5"] - r["score"]["map5"]) > 1e-6:  # the same rule, scored twice
        print(f"warning: predict scored {r['score']['map5']:.4f}, "
              f"this ranking {row['pooled share']['map5']:.4f}")
    return {"oof_n": tuned["n"], "oof_new_share": tuned["n_new"] / max(tuned["n"], 1),
            "applied_share": r["new_share"], "test_new_share": test_share, "rules": row}


def fold_shares(data: Path, designs: list[str], folds: int, seed: int = 42) -> None:
    """No training: the pooled out-of-fold share of new animals each fold design gives on ``data``."""
    from train.folds import fold_summary, make_folds

    train = pd.read_csv(data / "train.csv", dtype=str)
    counts = train["individual_id"].value_counts()
    single = int((counts == 1).sum())
    print(f"\n{data.name}: {len(train)} images of {len(counts)} animals, {single} singletons "
          f"({single / len(train):.3f} of images); {folds} folds, seed {seed}")
    print("| design | pooled OOF new share | per fold |")
    print("|---|---|---|")
    for design in designs:
        key, value = design.split("=")
        summary = fold_summary(make_folds(train, folds, seed, **{key: float(value)}))
        pooled = summary["n_valid_new"].sum() / summary["n_valid"].sum()
        print(f"| {design} | {pooled:.3f} | {', '.join(f'{x:.3f}' for x in summary['new_share'])} |")


def print_table(results: dict, header: str) -> None:
    names = list(next(iter(results.values()))["rules"])
    print(f"\n{header}")
    print("| design | OOF new | applied share | test new | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for design, m in results.items():
        cells = [f"{m['rules'][n]['map5']:.4f}" if n in m["rules"] else "-" for n in names]
        shares = f"{m['oof_new_share']:.3f} | {m['applied_share']:.3f} | {m['test_new_share']:.3f}"
        print(f"| {design} | {shares} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", default="synth",
                        help="'synth' (debug recipe) or a competition-format folder")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "cv_share")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side in px (default: the recipe's)")
    parser.add_argument("--individuals", type=int, default=None, help="synthetic animals (default: the debug "
                        "recipe's 60)")
    parser.add_argument("--folds-only", action="store_true", help="no training: print the pooled OOF share "
                        "of new animals of each design")
    parser.add_argument("--design", action="append", help="fold key=value (repeatable); default: "
                        + " ".join(DEFAULT_DESIGNS))
    args = parser.parse_args(argv)
    designs = args.design or DEFAULT_DESIGNS
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "synth":
        data, boxes, box_type = ensure_synth(out, args.individuals), out / "data" / "boxes.csv", "body"
    else:
        data, boxes, box_type = Path(args.data).resolve(), None, None
        if not (data / "train.csv").is_file():
            print(f"no competition-format data in {data}: pass --data synth or a folder with train.csv, "
                  "train_images/, test_images/, sample_submission.csv, test_truth.csv", file=sys.stderr)
            return 2
    if args.folds_only:
        fold_shares(data, designs, args.folds)
        return 0
    results, started = {}, time.perf_counter()
    for design in designs:
        name = design.replace("=", "_").replace(".", "")
        cmd = train_command(args.data if args.data == "synth" else str(data), out, name, design, args.folds,
                            args.epochs, args.image_size)
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
        results[design] = measure(out / name, data, out / f"predict_{name}", boxes, box_type)
        (out / "cv_share.json").write_text(json.dumps(results, indent=1))
    print_table(results, f"{data.name}: {args.folds} folds x {args.epochs} epochs; test MAP@5 per threshold "
                f"rule ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
