"""``whalesub embed`` against ``--ray local:1`` and ``--ray local:2``, side by side in one run on the
same model, images and options.

Measured (images per second):

1. what bounds the work: the model alone (ONNX Runtime, every core, preprocessed batches) and the
   decoding alone (the embed loader, one process); the slower of the two bounds the run;
2. plain ``whalesub embed`` (no Ray, every core);
3. Ray's cost: ``--ray local:1``, one worker with every core, against plain ``embed``;
4. Ray's scaling: ``--ray local:1 --ray-cpus 1`` against ``--ray local:2 --ray-cpus 1``, one worker
   against two of the same size (one core each, as one machine against two identical machines).
   ``local:1`` with every core against ``local:2`` is printed too: on one machine two workers
   share the cores one worker had, so there is nothing to gain there.

One Ray is started for all three Ray configurations (its start-up printed apart), with as many
logical CPUs as their workers together ask for, so that every worker stays warm all along (the
workers set their ONNX Runtime threads from the CPUs they ask for, not from Ray's count); each
configuration's first run, which starts its worker processes (Python, torch, the model), is
printed apart. Then ``--rounds`` rounds each time all four runs back to back, in a rotating
order. A shared machine drifts over minutes, so the ratios are the medians of the ratios within
a round; the rates are the best of the rounds.

Goals (issue 15): Ray at one worker costs at most 1.15x plain embed; two workers reach at least
1.6x one worker where the model, not decoding, bounds the work.

    python benchmarks/embed_ray.py                                  # resnet18 @ 224, small JPEGs
    python benchmarks/embed_ray.py --synthetic 3600x2400 --n 48     # Happywhale-size JPEGs: decoding

Needs the cluster extra (``pip install -e ".[cluster]"``). Random weights (pretrained=False).
"""

from __future__ import annotations

import argparse
import contextlib
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
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the four warm runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    import ray
    import torch

    from whalesub.data.image import load_for_model
    from whalesub.embedding.distributed import LOCAL_OBJECT_STORE, RayRunner, parse_address
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
    model_rate = len(x) / best_of(lambda: [sess.run(None, {INPUT_NAME: t}) for t in batches], 3)
    groups = [list(range(s, min(n, s + b))) for s in range(0, n, b)]
    decode_rate = n / best_of(lambda: list(make_loader(paths, [None] * n, [net.spec], groups, b, 0)), 1)

    opts = EmbedOptions(tta="none", backend="onnx", device="cpu", batch_size=b, chunk=chunk)
    cpus_all = os.cpu_count() or 1

    def once(out: Path, runner=None) -> float:
        shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        embed_images([tmp / "export"], names, tmp / "images", out, opts, runner=runner)
        return time.perf_counter() - t

    # label -> (--ray address, --ray-cpus): the CPUs each worker asks for
    configs = {"--ray local:1": ("local:1", cpus_all), "--ray local:1 --ray-cpus 1": ("local:1", 1),
               "--ray local:2": ("local:2", max(1, cpus_all // 2))}
    labels = ["plain embed (every core)", *configs]
    times: dict[str, list[float]] = {k: [] for k in labels}
    once(tmp / "plain.npz")  # warms this process (imports, page cache)
    t = time.perf_counter()
    ray.init(num_cpus=sum(parse_address(a)[1] * c for a, c in configs.values()), include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE, configure_logging=False)
    startup = time.perf_counter() - t
    with contextlib.ExitStack() as stack:
        runners = {k: stack.enter_context(RayRunner(a, cpus_per_worker=c)) for k, (a, c) in configs.items()}
        outs = {k: tmp / f"ray_{i}.npz" for i, k in enumerate(configs)} | {labels[0]: tmp / "plain.npz"}
        cold = {k: once(outs[k], r) for k, r in runners.items()}
        for i in range(args.rounds):
            for k in labels[i % 4:] + labels[:i % 4]:
                times[k].append(once(outs[k], runners.get(k)))
        ref = load_embeddings(outs[labels[0]])
        same = all(np.array_equal(load_embeddings(outs[k]).vectors, ref.vectors) for k in configs)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    def ratio(num: str, den: str) -> float:  # median over the rounds of time(num) / time(den)
        return float(np.median(np.array(times[num]) / np.array(times[den])))

    rate = {k: n / min(v) for k, v in times.items()}
    bound = "model" if model_rate < decode_rate else "decoding"
    print(f"\n{args.backbone} @ {args.size} px (pretrained=False), batch {b}, chunk {chunk}, {n} synthetic "
          f"{args.synthetic} JPEGs, ONNX Runtime on CPU; {args.rounds} rounds")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (1 min, at the end); "
          f"Ray {ray.__version__}, start-up {startup:.1f} s (not in the rates)")
    print(f"  {'model only (onnxruntime, all cores)':<38s} {model_rate:8.1f} img/s")
    print(f"  {'decode only (1 process)':<38s} {decode_rate:8.1f} img/s   -> the {bound} bounds the work")
    for k, v in rate.items():
        first = f"   (first run, workers starting: {cold[k]:.1f} s)" if k in cold else ""
        print(f"  {k:<38s} {v:8.1f} img/s{first}")
    print(f"  {'time local:1 / plain embed':<38s} {ratio(labels[1], labels[0]):8.2f}x  (goal <= 1.15)")
    print(f"  {'rate local:2 / local:1, 1 CPU each':<38s} {ratio(labels[2], labels[3]):8.2f}x  "
          "(goal >= 1.6 where the model bounds)")
    print(f"  {'rate local:2 / local:1 (every core)':<38s} {ratio(labels[1], labels[3]):8.2f}x  "
          "(same cores, shared out)")
    print(f"  identical vectors (every Ray run vs plain): {same}")


if __name__ == "__main__":
    main()
