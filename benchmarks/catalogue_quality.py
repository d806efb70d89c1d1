"""Catalogue quality on the demo: top-k hit rates, calibration on fresh photos, new-animal groups.

Uses the output folder of ``python -m train.demo --out DIR`` (runs it first when DIR has no export
yet): its exported model, the synthetic train set (with labels and body boxes) as the catalogue, and
the synthetic test photos (about 20% of them new animals) as a new batch. It runs, printing each:

1. ``whalesub catalogue init`` (``--tta`` as the run validated) and ``catalogue add`` of the train
   photos with ``--labels`` and the boxes;
2. ``whalesub catalogue identify`` of the test photos (``--top 12``, CSV and HTML review page);

and scores the CSV against the synthetic truth: hit rates at 1 and 12 (known animals), the expected
calibration error (10 equal-width bins) of ``p_same`` over all individual candidates and of ``p_new``
over all queries, and the new-animal groups as pairwise precision and recall (two new photos of one
animal in one group) among the truly new photos.

Usage: ``python benchmarks/catalogue_quality.py [--demo runs/demo] [--top 12] [--out DIR]``
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


def run(cmd: list[str]) -> None:
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    b = np.minimum((p * bins).astype(int), bins - 1)
    return float(
        sum((b == i).mean() * abs(p[b == i].mean() - y[b == i].mean()) for i in range(bins) if (b == i).any())
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="python -m train.demo output folder")
    ap.add_argument("--top", type=int, default=12, help="candidates per individual and per image")
    ap.add_argument("--out", type=Path, default=None, help="catalogue and outputs (default: DEMO/catalogue)")
    args = ap.parse_args(argv)
    demo, out = args.demo, args.out or args.demo / "catalogue"
    model, data = demo / "models" / "fold0", demo / "data"
    if not (model / "export.json").is_file():
        run([sys.executable, "-m", "train.demo", "--out", str(demo)])
    cfg = yaml.safe_load((demo / "run" / "fold0" / "config.yaml").read_text())
    cli = [sys.executable, "-m", "whalesub.cli", "catalogue"]
    boxes = (
        ["--boxes", str(data / "boxes.csv"), "--box-type", cfg["eval_box_type"]]
        if cfg.get("boxes_csv")
        else []
    )
    cat = out / "cat"
    if not (cat / "catalogue.sqlite").is_file():
        run(cli + ["init", str(cat), "--model", str(model), "--tta", "flip" if cfg["tta_flip"] else "none"])
        run(
            cli
            + ["add", str(data / "train_images"), "-c", str(cat), "--labels", str(data / "train.csv"), *boxes]
        )
    csv = out / "review.csv"
    run(
        cli
        + [
            "identify",
            str(data / "test_images"),
            "-c",
            str(cat),
            "--top",
            str(args.top),
            "--out",
            str(csv),
            "--html",
            str(out / "review.html"),
            *boxes,
        ]
    )

    cand = pd.read_csv(csv, keep_default_na=False)
    truth = pd.read_csv(data / "test_truth_full.csv", keep_default_na=False).set_index("image")
    ind = cand[cand.kind == "individual"].copy()
    ind["true"] = truth.loc[ind["query"], "true_individual_id"].to_numpy()
    ind["hit"] = ind.individual_id == ind.true
    per_query = cand.groupby("query").first()
    is_new = truth.loc[per_query.index, "is_new"].astype(str).isin(["True", "1", "true"]).to_numpy()
    known = set(truth.index[~truth.is_new.astype(str).isin(["True", "1", "true"])])
    kq = ind[ind["query"].isin(known)]
    hit1 = kq[kq["rank"] == 1].groupby("query").hit.any().mean()
    hitk = kq.groupby("query").hit.any().mean()
    rows = [
        ("queries (new animals)", f"{len(per_query)} ({int(is_new.sum())})"),
        ("hit rate @1, known animals", f"{hit1:.3f}"),
        (f"hit rate @{args.top}, known animals", f"{hitk:.3f}"),
    ]
    if (ind.p_same != "").all():
        p = ind.p_same.astype(float).to_numpy()
        pn = per_query.p_new.astype(float).to_numpy()
        rows += [
            (
                "ECE of p_same, individual candidates",
                f"{ece(p, ind.hit.to_numpy(float)):.3f} ({len(p)} pairs)",
            ),
            ("ECE of p_new, queries", f"{ece(pn, is_new.astype(float)):.3f}"),
            ("mean p_new: new / known animals", f"{pn[is_new].mean():.2f} / {pn[~is_new].mean():.2f}"),
        ]
    new_q = per_query.index[is_new]
    group = per_query.loc[new_q, "group"].to_dict()
    true_id = truth.loc[new_q, "true_individual_id"].to_dict()
    pairs = list(itertools.combinations(new_q, 2))
    same_true = np.array([true_id[a] == true_id[b] for a, b in pairs], bool)
    same_group = np.array([bool(group[a]) and group[a] == group[b] for a, b in pairs], bool)
    flagged = np.mean([bool(group[q]) for q in new_q]) if len(new_q) else float("nan")
    prec = same_true[same_group].mean() if same_group.any() else float("nan")
    rec = same_group[same_true].mean() if same_true.any() else float("nan")
    rows += [
        ("new photos flagged new (in a group)", f"{flagged:.3f}"),
        (
            "groups: pairwise precision / recall",
            f"{prec:.3f} / {rec:.3f} ({int(same_true.sum())} true pairs)",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
