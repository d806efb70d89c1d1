"""The whole path on a real competition-format folder: train folds, `whalesub predict`, MAP@5 vs baselines.

Default data: ``../shared/data/nyala`` (real photos of 100 nyala antelope, 544 train / 356 test
images; Dlamini & van Zyl, "Automated identification of individuals in wildlife population using
Siamese neural networks", ISCMI 2020). The data is read in place and never copied.

Steps, all on CPU:

1. ``python -m train --config train/configs/nyala.yaml`` with ``--fold=all --n_folds=N --epochs=E
   --image_size=S`` (resnet18 from scratch; a finished run is reused; the test set is left to step 2);
2. :func:`whalesub.workflows.predict.predict` on the run: export every fold, embed the flipped gallery and the
   flip-TTA test set with all folds combined, threshold from the pooled out-of-fold share, submit,
   validate, score against ``test_truth.csv``;
3. baselines scored the same way: every row ``new_individual`` (the sample submission), and a kNN
   on 16x16 raw pixels (flipped gallery), once at the same new share as the network and once at
   its best threshold on the test truth (optimistic; the README's earlier reference protocol).

Usage: ``python benchmarks/realdata.py [--data ../shared/data/nyala] [--out runs/realdata]
[--folds 2] [--epochs 10] [--image-size 128]``
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


def raw_pixels(folder: Path, names: list[str], flip: bool = False) -> np.ndarray:
    """16x16 RGB pixels per image, centred and L2-normalised: [N, 768] float32."""
    from PIL import Image, ImageOps

    out = []
    for name in names:
        with Image.open(folder / name) as im:
            im.draft("RGB", (64, 64))
            im = im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
            out.append(np.asarray(ImageOps.mirror(im) if flip else im, dtype=np.float32).ravel())
    x = np.stack(out)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pixel_knn(data: Path, out: Path, new_share: float) -> dict:
    """The raw-pixel kNN baseline: MAP@5 at ``new_share`` and at its best test threshold."""
    from whalesub.ranking.store import save_embeddings
    from whalesub.ranking.submission import score_submission
    from whalesub.workflows.submit import submit_files, tune_files

    train = pd.read_csv(data / "train.csv", dtype=str)["image"].tolist()
    tests = pd.read_csv(data / "sample_submission.csv", dtype=str)["image"].tolist()
    images = data / "train_images"
    gallery = np.vstack([raw_pixels(images, train), raw_pixels(images, train, flip=True)])
    meta = {"fingerprint": "raw16"}
    save_embeddings(out / "pixels_gallery.npz", train + train, gallery, meta)
    save_embeddings(out / "pixels_test.npz", tests, raw_pixels(data / "test_images", tests), meta)
    args = (out / "pixels_gallery.npz", out / "pixels_test.npz", data / "train.csv")
    submit_files(*args, None, out / "pixels_submission.csv", sample=data / "sample_submission.csv",
                 new_share=new_share, progress=False)
    best = tune_files(*args, data / "test_truth.csv", progress=False)["best"]
    at_share = score_submission(out / "pixels_submission.csv", data / "test_truth.csv")
    return {"at_share": at_share, "best": best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "nyala")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "realdata")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128, help="input side in px (the recipe's 128)")
    parser.add_argument("--models", type=Path, nargs="*", help="skip training: predict with these run/fold "
                        "folders (e.g. OUT/run/fold0 while the other folds still train)")
    args = parser.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve()
    if not (data / "train.csv").is_file():
        print(f"no competition-format data in {data} (train.csv, train_images/, test_images/, "
              "sample_submission.csv, test_truth.csv): pass --data", file=sys.stderr)
        return 2
    from whalesub.ranking.metric import score_breakdown
    from whalesub.workflows.predict import predict

    started = time.perf_counter()
    cmd = [sys.executable, "-m", "train", "--config", "train/configs/nyala.yaml", "--fold=all",
           f"--n_folds={args.folds}", f"--epochs={args.epochs}", f"--image_size={args.image_size}",
           f"--out_dir={out}", "--run_name=run", f"--train_csv={data / 'train.csv'}",
           f"--image_dir={data / 'train_images'}", "--test_csv=null", "--test_image_dir=null"]
    if not args.models:
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    trained = time.perf_counter()
    r = predict(args.models or [out / "run"], data / "train.csv", data / "train_images", data / "test_images",
                out / "predict", sample=data / "sample_submission.csv", truth=data / "test_truth.csv")
    done = time.perf_counter()
    truth = pd.read_csv(data / "test_truth.csv", dtype=str)["individual_id"].tolist()
    all_new = score_breakdown([["new_individual"]] * len(truth), truth)
    pixels = pixel_knn(data, out, r["new_share"])
    s = r["score"]
    rows = [("whalesub predict (pooled OOF share)", s),
            ("all new_individual (sample submission)", all_new),
            ("kNN on 16x16 raw pixels, same new share", pixels["at_share"])]
    print(f"\n{data.name}: {s['n']} test images ({s['n_new']} new); {len(r['models'])} folds x {args.epochs} "
          f"epochs at {args.image_size} px; train {trained - started:.0f} s, predict {done - trained:.0f} s")
    print(f"threshold {r['threshold']:.4f} from {r['threshold_source']}; new share {r['new_share']:.3f}")
    print(f"{'method':<44} {'MAP@5':>7} {'known':>7} {'new':>7}")
    for name, m in rows:
        print(f"{name:<44} {m['map5']:7.4f} {m['map5_known'] or 0:7.4f} {m['map5_new'] or 0:7.4f}")
    print(f"{'kNN on 16x16 raw pixels, best test threshold':<44} {pixels['best']['map5']:7.4f} (optimistic)")
    (out / "realdata.json").write_text(json.dumps({"predict": r, "all_new": all_new, "pixels": pixels},
                                                  indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
