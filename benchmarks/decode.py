"""Decoding benchmark: a 3600x2400 JPEG to a 512 / 1024 px model input, whalesub vs the usual paths.

Measured side by side in one run, repetitions interleaved round-robin so load on the machine hits
every method alike; the median ms per image is printed with its ratio to the cv2 path.

- whalesub: ``whalesub.data.image.load_image(path, target=S)`` (JPEG DCT-domain downscale) + cv2 INTER_AREA
  to S x S, i.e. the uint8 part of ``load_for_model``; ``+normalise`` adds the float32 normalisation.
- cv2: ``cv2.imread`` (full decode) + BGR->RGB + ``cv2.resize`` INTER_AREA (the popular baseline).
- pillow-full: ``Image.open().convert('RGB')`` (full decode) + ``Image.resize`` bilinear.
- cv2-reduced (for reference): ``cv2.imread`` with ``IMREAD_REDUCED_COLOR_{2,4}`` (OpenCV's own DCT
  scaling, a fixed factor the caller must choose) + resize.

The image is made at run time by upscaling a real photo from ../shared/data/nyala (or a synthetic
one when that set is absent); nothing is downloaded. Usage::

    python benchmarks/decode.py [--reps 40] [--sizes 512 1024] [--threads 1] [--noise 6]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's whalesub, installed or not

from whalesub.data.image import draft_scale, load_for_model, load_image  # noqa: E402
from whalesub.models.spec import ModelSpec  # noqa: E402

NYALA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nyala"
W, H = 3600, 2400


def make_jpeg(out: Path, quality: int, noise: float) -> str:
    """Write a 3600x2400 JPEG; return where its content came from."""
    photos = sorted((NYALA / "train_images").glob("*.jpg")) if NYALA.is_dir() else []
    if photos:
        src = np.asarray(Image.open(photos[0]).convert("RGB"))
        origin = f"upscaled real photo {photos[0].name}"
    else:
        rng = np.random.default_rng(0)
        src = cv2.GaussianBlur(rng.integers(0, 256, (240, 360, 3), dtype=np.uint8), (0, 0), 3)
        origin = "synthetic (nyala set not found)"
    big = cv2.resize(src, (W, H), interpolation=cv2.INTER_CUBIC)
    if noise > 0:
        # Fine detail (sensor noise, waves) makes the file bigger and its entropy decoding, which no
        # DCT-domain trick avoids, slower: --noise 6 gives a busy ~2 MB frame.
        big = np.clip(big + np.random.default_rng(1).normal(0, noise, big.shape), 0, 255).astype(np.uint8)
        origin += f" + Gaussian noise sigma {noise:g}"
    Image.fromarray(big).save(out, quality=quality)
    return origin


def methods(path: str, size: int, spec: ModelSpec) -> dict:
    s = draft_scale(W, H, (size, size))
    reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}[s]

    def whalesub_decode():
        return cv2.resize(load_image(path, target=size), (size, size), interpolation=cv2.INTER_AREA)

    def whalesub_full():
        return load_for_model(path, spec)

    def cv2_path():
        img = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

    def pillow_full():
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))

    def cv2_reduced():
        img = cv2.cvtColor(cv2.imread(path, reduced), cv2.COLOR_BGR2RGB)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

    return {"whalesub": whalesub_decode, "whalesub+normalise": whalesub_full, "cv2 imread+resize": cv2_path,
            "pillow full+resize": pillow_full, f"cv2 REDUCED_{s} (ref)": cv2_reduced}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run(reps: int, sizes: list[int], quality: int, noise: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.jpg"
        origin = make_jpeg(path, quality, noise)
        print(f"image: {W}x{H} JPEG q{quality}, {path.stat().st_size / 1e6:.2f} MB, {origin}")
        print(f"cv2 threads: {cv2.getNumThreads()}, repetitions: {reps} (interleaved), median ms/image\n")
        for size in sizes:
            spec = ModelSpec(backbone="resnet18", image_size=size)
            fns = methods(str(path), size, spec)
            outs = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs to compare
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(reps):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            ref = statistics.median(times["cv2 imread+resize"])
            s = draft_scale(W, H, (size, size))
            print(f"-> {size}x{size} (whalesub decodes at 1/{s}: {math.ceil(W / s)}x{math.ceil(H / s)})")
            print(f"   {'method':<24}{'ms/image':>10}{'vs cv2':>10}{'PSNR vs cv2 (dB)':>19}")
            for name, ts in times.items():
                med = statistics.median(ts)
                out = outs[name]
                q = psnr(out, outs["cv2 imread+resize"]) if out.dtype == np.uint8 else float("nan")
                print(f"   {name:<24}{med:>10.2f}{ref / med:>9.2f}x{q:>19.1f}")
            print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--noise", type=float, default=0.0, help="add Gaussian noise (sigma, 0-255 scale)")
    ap.add_argument("--threads", type=int, default=1,
                    help="cv2 threads (1 = as in one data-loader worker; 0 = OpenCV's default)")
    args = ap.parse_args()
    if args.threads > 0:
        cv2.setNumThreads(args.threads)
    run(args.reps, args.sizes, args.quality, args.noise)


if __name__ == "__main__":
    main()
