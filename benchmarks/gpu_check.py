"""One short check of everything that only a CUDA GPU can prove; exits 0 with a message on CPU.

    python benchmarks/gpu_check.py [--images ../shared/data/nyala] [--pytest]

1. versions and providers: torch CUDA, ONNX Runtime providers (CUDA really active in a session,
   not a silent CPU fallback), FAISS GPUs;
2. ``whalesub export --fp16`` of a random-weight efficientnet_b0 @ 256: the export-time FP16
   parity now runs on the CUDA provider (per-row cosine >= 0.999);
3. ``whalesub embed`` on real photos with --device cuda: FP32 vs FP16 graphs (per-row cosine,
   top-5 agreement of a gallery/query split) and the torch backend with FP16 autocast;
4. FAISS on the GPU: whalesub.ranking.index.search vs a NumPy brute force;
5. a few AMP (FP16 autocast + GradScaler) training steps of EmbeddingNet + sub-center ArcFace on one
   batch: finite, decreasing loss;
6. with --pytest: the repository's ``@pytest.mark.gpu`` tests.
Prints PASS/FAIL per check; exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NYALA = REPO.parent / "shared" / "data" / "nyala"
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    def wrap(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                detail = fn(*a, **kw) or ""
                ok = True
            except Exception as exc:  # noqa: BLE001 - report every check, then exit non-zero
                detail, ok = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", False
            RESULTS.append((name, ok, detail))
            took = time.perf_counter() - t
            print(f"[{'PASS' if ok else 'FAIL'}] {name} ({took:.1f} s) {detail}", flush=True)
        return run
    return wrap


@check("versions / providers")
def versions() -> str:
    import faiss
    import onnxruntime as ort
    import torch

    return (f"torch {torch.__version__} CUDA {torch.version.cuda} {torch.cuda.get_device_name(0)}; "
            f"onnxruntime {ort.__version__} {ort.get_available_providers()}; "
            f"faiss GPUs {faiss.get_num_gpus()}")


@check("export --fp16: CUDA provider active, FP16 parity at export time")
def export(tmp: Path) -> str:
    import torch

    from whalesub.models.export import export_model
    from whalesub.models.network import EmbeddingNet, save_embedding_net
    from whalesub.models.runtime import cuda_provider_active
    from whalesub.models.spec import ModelSpec

    torch.manual_seed(0)
    net = EmbeddingNet(ModelSpec(backbone="efficientnet_b0", image_size=256, embed_dim=512, neck="linear_bn"))
    ckpt = save_embedding_net(net.eval(), tmp / "run" / "best.pt")
    images = sorted((NYALA / "test_images").iterdir())[:8] if NYALA.is_dir() else []
    m = export_model(ckpt, tmp / "export", fp16=True, parity_images=images)
    assert cuda_provider_active(tmp / "export" / "model_fp16.onnx"), "CUDAExecutionProvider not active"
    p = m["files"]["fp16"]["parity"]
    assert isinstance(p, dict) and "CUDAExecutionProvider" in p["providers"], p
    fp32 = m["files"]["fp32"]["parity"]["min_cosine"]
    return f"fp32 min cos {fp32:.6f}, fp16 (CUDA) min cos {p['min_cosine']:.6f}"


@check("embed --device cuda: FP32 vs FP16 graphs vs torch autocast on real photos")
def embed(tmp: Path) -> str:
    from whalesub.embedding.embed import EmbedOptions, run_embed
    from whalesub.ranking.store import load_embeddings

    if not NYALA.is_dir():
        return "skipped: no nyala photos"
    out = {}
    for tag, kw, model in (("fp32", {}, tmp / "export"), ("fp16", {"fp16": True}, tmp / "export"),
                           ("torch16", {"fp16": True, "backend": "torch"}, tmp / "run" / "best.pt")):
        for part in ("train", "test"):
            opts = EmbedOptions(device="cuda", batch_size=32, workers=4, **kw)
            t = time.perf_counter()
            path = run_embed([model], tmp / f"{tag}_{part}.npz", opts, images=NYALA / f"{part}_images")
            out[tag, part] = load_embeddings(path).vectors.astype(np.float32)
            out[tag, part, "s"] = time.perf_counter() - t
    lines = []
    for tag in ("fp16", "torch16"):
        cos = (out["fp32", "test"] * out[tag, "test"]).sum(1)
        top = lambda t: np.argsort(-out[t, "test"] @ out[t, "train"].T, axis=1)[:, :5]  # noqa: E731
        agree = (top("fp32") == top(tag)).all(1).mean()
        assert cos.min() >= 0.999 and agree >= 0.99, (tag, cos.min(), agree)
        lines.append(f"{tag}: min cos {cos.min():.5f}, top-5 equal {100 * agree:.1f}%")
    n = len(out["fp32", "train"])
    lines.append(f"train set {n} imgs: " + ", ".join(f"{t} {n / out[t, 'train', 's']:.0f} img/s"
                                                    for t in ("fp32", "fp16", "torch16")))
    return "; ".join(lines)


@check("FAISS on the GPU = brute force")
def faiss_gpu() -> str:
    import faiss

    from whalesub.ranking.index import search

    assert faiss.get_num_gpus() > 0, "faiss sees no GPU (faiss-gpu for CUDA 12 vs the driver?)"
    rng = np.random.default_rng(0)
    g = rng.standard_normal((20000, 256)).astype(np.float32)
    q = rng.standard_normal((500, 256)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s, i = search(g, q, 10, use_gpu=True)
    ref = np.sort(q @ g.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(s, ref, atol=1e-4)
    return f"max |score diff| {np.abs(s - ref).max():.2e}"


@check("AMP training steps (fp16 autocast + GradScaler)")
def amp_steps() -> str:
    import torch

    from train.heads import ArcMarginHead
    from whalesub.models.network import EmbeddingNet
    from whalesub.models.spec import ModelSpec

    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = EmbeddingNet(ModelSpec(backbone="efficientnet_b0", image_size=256, embed_dim=512, neck="linear_bn"))
    head = ArcMarginHead(512, 16, k=2, s=30.0, m=0.3)
    net, head = net.to(dev).train(), head.to(dev)
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(32, 3, 256, 256, device=dev), torch.arange(32, device=dev) % 16
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(head(net.features(x), y), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    return "loss " + " -> ".join(f"{v:.3f}" for v in (losses[0], losses[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pytest", action="store_true", help="also run the @pytest.mark.gpu tests")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
              "nothing to check. Run this on a machine with an NVIDIA GPU.")
        return 0
    sys.path.insert(0, str(REPO))  # train/ is imported from the repository root
    with tempfile.TemporaryDirectory(prefix="whalesub-gpu-check-") as d:
        tmp = Path(d)
        versions()
        export(tmp)
        embed(tmp)
        faiss_gpu()
        amp_steps()
    if args.pytest:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=REPO)
        RESULTS.append(("pytest -m gpu", r.returncode == 0, ""))
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed"
          + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
