"""Training-loader benchmark: training samples per second from large frames, whalesub vs full decode.

On a GPU the training loader, not the network, often bounds an epoch of 3600 px photos. Both
loaders below produce the same kind of sample (random resized crop of the squashed frame, the
configured albumentations, normalised float32 [3, S, S]) with the same per-sample seeds, and are
measured side by side, repetitions interleaved round-robin so load on the machine hits both alike:

- whalesub: ``train.dataset.TrainSet`` (JPEG DCT-domain downscale to the smallest size that keeps
  the smallest random crop >= S, crop at that resolution, one resize, augmentations).
- cv2 full decode (reference): ``cv2.imread`` of the whole frame + BGR->RGB, then exactly the same
  crop, resize, augmentations and normalisation (``train.dataset.augment``, ``to_model_input``).

Frames are synthetic (smooth colour noise plus fine noise, like a busy sea photo), written at run
time; nothing is downloaded. One process, cv2 on 1 thread: what one data-loader worker does.
Usage::

    python benchmarks/train_loader.py [--frames 6] [--width 3600 --height 2400] [--sizes 224 384]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

# `python benchmarks/train_loader.py` puts benchmarks/, not the repository root, on sys.path; train/
# is not installed, so the root goes first (this checkout's whalesub then comes with it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import make_config  # noqa: E402
from train.dataset import BoxTable, TrainSet, augment, sample_seed  # noqa: E402
from whalesub.data.image import to_model_input  # noqa: E402
from whalesub.models.spec import ModelSpec  # noqa: E402


def make_frames(out: Path, n: int, w: int, h: int, noise: float) -> list[str]:
    """Write ``n`` distinct w x h JPEGs (q90); returns their names."""
    names = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = cv2.GaussianBlur(rng.integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8), (0, 0), 3)
        big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        big = np.clip(big + rng.normal(0, noise, big.shape), 0, 255).astype(np.uint8)
        names.append(f"frame{i}.jpg")
        cv2.imwrite(str(out / names[-1]), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return names


class FullDecodeTrainSet(TrainSet):
    """The reference: the same sample as TrainSet, from a full-resolution cv2 decode."""

    def __getitem__(self, i: int):
        import torch

        seed = sample_seed(self.cfg.seed, self.epoch, i)
        rng = np.random.default_rng(seed)
        self.boxes.sample(self.images[i], rng)  # same draws as TrainSet (no boxes here)
        img = cv2.imread(str(self.image_dir / self.images[i]), cv2.IMREAD_COLOR)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        img = augment(img, self.transform, rng, seed, self.cfg)
        return torch.from_numpy(to_model_input(np.ascontiguousarray(img), self.spec)), 0, 0, i


def run(folder: Path, names: list[str], sizes: list[int], reps: int) -> None:
    df = pd.DataFrame({"image": names})
    zeros = np.zeros(len(names), np.int64)
    print(f"{'input':>6}  {'loader':<28}{'samples/s':>10}{'vs cv2':>9}")
    for size in sizes:
        cfg = make_config({"image_size": size})
        spec = ModelSpec(backbone="resnet18", image_size=size)
        common = (df, folder, zeros, zeros, spec, cfg, BoxTable(None, {}, 0.0))
        loaders = {"whalesub TrainSet": TrainSet(*common),
                   "cv2 full decode (reference)": FullDecodeTrainSet(*common)}
        for ds in loaders.values():
            ds[0]  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for rep in range(reps):
            for name, ds in loaders.items():
                ds.set_epoch(rep)
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                rates[name].append(len(ds) / (time.perf_counter() - t0))
        ref = statistics.median(rates["cv2 full decode (reference)"])
        for name, r in rates.items():
            med = statistics.median(r)
            print(f"{size:>6}  {name:<28}{med:>10.1f}{med / ref:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=6, help="distinct frames (one pass = one sample of each)")
    ap.add_argument("--width", type=int, default=3600)
    ap.add_argument("--height", type=int, default=2400)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    ap.add_argument("--reps", type=int, default=5, help="interleaved passes per loader (median reported)")
    ap.add_argument("--noise", type=float, default=6.0, help="fine Gaussian noise (sigma, 0-255 scale)")
    ap.add_argument("--threads", type=int, default=1, help="cv2 threads (1 = one data-loader worker)")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_frames(Path(tmp), args.frames, args.width, args.height, args.noise)
        size_mb = sum((Path(tmp) / n).stat().st_size for n in names) / len(names) / 1e6
        print(f"{args.frames} frames {args.width}x{args.height} JPEG q90 ({size_mb:.1f} MB each), default "
              f"augmentations, cv2 threads {args.threads}, median of {args.reps} interleaved passes\n")
        run(Path(tmp), names, args.sizes, args.reps)


if __name__ == "__main__":
    main()
