"""``whalesub embed`` against ``--ray local:1`` and ``--ray local:2``, side by side in one run on the
same model, images and options.

Measured (images per second, each the best of ``--repeat`` runs):

1. what bounds the work: the model alone (ONNX Runtime, every core, preprocessed batches) and the
   decoding alone (the embed loader, one process); the slower of the two bounds the run;
2. plain ``whalesub embed`` (no Ray);
3. ``--ray local:1`` and ``--ray local:2``: a private Ray on this machine with 1 or 2 workers
   sharing the machine's CPUs (Ray started before the clock, its start-up printed apart).

Goals (issue 15): Ray at one worker costs at most 1.15x plain embed; two workers reach at least
1.6x one worker where the model, not decoding, bounds the work.

    python benchmarks/embed_ray.py                                  # resnet18 @ 224, small JPEGs
    python benchmarks/embed_ray.py --synthetic 3600x2400 --n 48     # Happywhale-size JPEGs: decoding

Needs the cluster extra (``pip install -e ".[cluster]"``). Random weights (pretrained=False).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.embed import make_images  # noqa: E402  (same synthetic JPEGs as benchmarks/embed.py)
from benchmarks.embed import timed as best_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224, help="model input size (px)")
    ap.add_argument("--n", type=int, default=192, help="images")
    ap.add_argument("--synthetic", default="512x384", help="WxH of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="images per chunk (default: n / 8)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    import ray
    import torch

    from whalesub.data.image import load_for_model
    from whalesub.embedding.distributed import RayRunner
    from whalesub.embedding.embed import EmbedOptions, embed_images
    from whalesub.embedding.loader import make_loader
    from whalesub.models.export import INPUT_NAME, export_model
    from whalesub.models.network import EmbeddingNet, save_embedding_net
    from whalesub.models.runtime import ort_session
    from whalesub.models.spec import ModelSpec
    from whalesub.ranking.store import load_embeddings

    tmp = Path(tempfile.mkdtemp(prefix="whalesub-bench-ray-"))
    names = make_images(tmp / "images", args.n, args.synthetic)
    n, b = len(names), args.batch_size
    chunk = args.chunk or max(b, -(-n // 8 // b) * b)
    spec = ModelSpec(backbone=args.backbone, image_size=args.size)
    torch.manual_seed(0)
    net = EmbeddingNet(spec).eval()
    export_model(save_embedding_net(net, tmp / "run" / "best.pt"), tmp / "export")
    paths = [str(tmp / "images" / m) for m in names]

    # 1. the bounds: model alone (every core) and decoding alone (one process)
    x = np.stack([load_for_model(p, net.spec) for p in paths[:4 * b]]).astype(np.float32)
    sess = ort_session(tmp / "export" / "model.onnx")
    batches = [x[i:i + b] for i in range(0, len(x), b)]
    model_rate = len(x) / best_of(lambda: [sess.run(None, {INPUT_NAME: t}) for t in batches], args.repeat)
    groups = [list(range(s, min(n, s + b))) for s in range(0, n, b)]
    decode_rate = n / best_of(lambda: list(make_loader(paths, [None] * n, [net.spec], groups, b, 0)), 1)

    opts = EmbedOptions(tta="none", backend="onnx", device="cpu", batch_size=b, chunk=chunk)

    def run(out: Path, runner=None) -> float:
        def once():
            shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
            out.unlink(missing_ok=True)
            embed_images([tmp / "export"], names, tmp / "images", out, opts, runner=runner)
        return n / best_of(once, args.repeat)

    rate = {"plain embed": run(tmp / "plain.npz")}
    startup = {}
    for workers in (1, 2):
        t = time.perf_counter()
        with RayRunner(f"local:{workers}") as runner:
            startup[workers] = time.perf_counter() - t
            rate[f"--ray local:{workers}"] = run(tmp / f"ray{workers}.npz", runner)
        assert not ray.is_initialized()
    ref = load_embeddings(tmp / "plain.npz")
    same = all(np.array_equal(load_embeddings(tmp / f"ray{w}.npz").vectors, ref.vectors) for w in (1, 2))
    shutil.rmtree(tmp, ignore_errors=True)

    bound = "model" if model_rate < decode_rate else "decoding"
    print(f"\n{args.backbone} @ {args.size} px (pretrained=False), batch {b}, chunk {chunk}, {n} synthetic "
          f"{args.synthetic} JPEGs, ONNX Runtime on CPU; best of {args.repeat}")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (1 min, at the end); "
          f"Ray {ray.__version__}")
    print(f"  {'model only (onnxruntime, all cores)':<38s} {model_rate:8.1f} img/s")
    print(f"  {'decode only (1 process)':<38s} {decode_rate:8.1f} img/s   -> the {bound} bounds the work")
    for k, v in rate.items():
        print(f"  {k:<38s} {v:8.1f} img/s")
    print(f"  {'Ray start-up local:1 / local:2':<38s} {startup[1]:5.1f} s / {startup[2]:.1f} s "
          "(not in the rates)")
    cost = rate["plain embed"] / rate["--ray local:1"]
    speedup = rate["--ray local:2"] / rate["--ray local:1"]
    print(f"  {'time local:1 / plain embed':<38s} {cost:8.2f}x  (goal <= 1.15)")
    print(f"  {'rate local:2 / local:1':<38s} {speedup:8.2f}x  (goal >= 1.6 where the model bounds)")
    print(f"  identical vectors (local:1, local:2 vs plain): {same}")


if __name__ == "__main__":
    main()
