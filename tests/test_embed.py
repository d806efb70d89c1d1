"""whalesub embed: flip TTA, fold concatenation, resume after SIGKILL, sharding, errors.

Tiny timm models (test_efficientnet / test_resnet at 32-64 px, pretrained=False) exported once per
session; photos from the suite's synthetic set and again from ../shared/data/nyala when present.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import export_tiny, make_checkpoint

from whalesub.core.errors import WhalesubError
from whalesub.embedding.embed import EmbedOptions, embed_images, run_embed
from whalesub.ranking.store import load_embeddings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two exported tiny models (different backbones and sizes) and their checkpoints."""
    root = tmp_path_factory.mktemp("models")
    a_ckpt = make_checkpoint(root / "run_a" / "best.pt", "test_efficientnet", 64, seed=0)
    b_ckpt = make_checkpoint(root / "run_b" / "best.pt", "test_resnet", 48, seed=1)
    return {"a": export_tiny(a_ckpt, root / "a"), "b": export_tiny(b_ckpt, root / "b"),
            "a_ckpt": a_ckpt, "b_ckpt": b_ckpt}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Six small RGB PNGs with structure (gradients + blocks) and their mirror images."""
    root = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:72, 0:96]
    for i in range(6):
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 40) % 256, (xx * yy) % 256], -1).astype(np.uint8)
        y0, x0 = rng.integers(0, 40, 2)
        img[y0:y0 + 20, x0:x0 + 30] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(root / f"img{i}.png")
        Image.fromarray(img[:, ::-1].copy()).save(root / f"mir{i}.png")
    return root


def _opts(**kw) -> EmbedOptions:
    base = dict(backend="onnx", device="cpu", batch_size=4, workers=0, chunk=8, tta="flip")
    base.update(kw)
    return EmbedOptions(**base)


def _embed(models, names, folder, out, **kw):
    embed_images(models, names, folder, out, _opts(**kw))
    return load_embeddings(out)


def test_flip_tta_mirror_invariant(models, pictures, tmp_path):
    names = [f"img{i}.png" for i in range(6)] + [f"mir{i}.png" for i in range(6)]
    e = _embed([models["a"]], names, pictures, tmp_path / "e.npz")
    v = e.vectors
    np.testing.assert_allclose(v[:6], v[6:], atol=2e-5)
    # Without TTA the mirrored image gives a different vector (the test can fail).
    n = _embed([models["a"]], names, pictures, tmp_path / "n.npz", tta="none").vectors
    assert np.abs(n[:6] - n[6:]).max() > 1e-3
    # Oracle: TTA row = normalised sum of the plain rows of the image and its mirror.
    s = n[:6] + n[6:]
    np.testing.assert_allclose(v[:6], s / np.linalg.norm(s, axis=1, keepdims=True), atol=2e-5)
    assert e.meta["tta"] == ["orig", "hflip"] and e.meta["views_per_image"] == 1
    # single model: the model's own fingerprint (as training's OOF files carry it)
    assert e.meta["fingerprint"] == json.loads((models["a"] / "export.json").read_text())["fingerprint"]


def test_flip_views_rows(models, pictures, tmp_path):
    names = ["img0.png", "img1.png", "mir0.png"]
    e = _embed([models["a"]], names, pictures, tmp_path / "v.npz", tta="none", flip_views=True)
    plain = _embed([models["a"]], ["img0.png", "img1.png", "mir0.png"], pictures, tmp_path / "p.npz",
                   tta="none").vectors
    assert e.ids.tolist() == ["img0.png", "img0.png", "img1.png", "img1.png", "mir0.png", "mir0.png"]
    np.testing.assert_allclose(e.vectors[0::2], plain, atol=1e-6)  # orig views
    np.testing.assert_allclose(e.vectors[1], plain[2], atol=2e-5)  # hflip(img0) == mir0
    assert e.meta["views_per_image"] == 2


def test_multi_model_concat(models, pictures, tmp_path):
    names = [f"img{i}.png" for i in range(5)]
    ea = _embed([models["a"]], names, pictures, tmp_path / "a.npz")
    eb = _embed([models["b"]], names, pictures, tmp_path / "b.npz")
    a, b = ea.vectors, eb.vectors
    ab = _embed([models["a"], models["b"]], names, pictures, tmp_path / "ab.npz")
    want = np.concatenate([a, b], 1) / np.sqrt(2.0)  # both parts unit: norm sqrt(2)
    np.testing.assert_allclose(ab.vectors, want, atol=1e-6)
    # inner product = mean of per-model cosines
    np.testing.assert_allclose(ab.vectors @ ab.vectors.T, (a @ a.T + b @ b.T) / 2, atol=1e-5)
    assert len(ab.meta["models"]) == 2
    assert ab.meta["fingerprint"] not in (ea.meta["fingerprint"], eb.meta["fingerprint"])


def test_torch_backend_matches_onnx(models, pictures, tmp_path):
    names = [f"img{i}.png" for i in range(3)]
    o = _embed([models["a"]], names, pictures, tmp_path / "o.npz")
    t = _embed([models["a_ckpt"]], names, pictures, tmp_path / "t.npz", backend="torch")
    t2 = _embed([models["a"]], names, pictures, tmp_path / "t2.npz", backend="torch")  # via export.json
    np.testing.assert_array_equal(t.vectors, t2.vectors)
    assert (o.vectors * t.vectors).sum(1).min() > 0.9999
    assert o.meta["fingerprint"] == t.meta["fingerprint"]  # same weights + spec, any backend


def test_fixed_batches_padding_does_not_change_rows(models, pictures, tmp_path):
    names = [f"img{i}.png" for i in range(5)]
    b1 = _embed([models["a"]], names, pictures, tmp_path / "1.npz", batch_size=1).vectors
    b4 = _embed([models["a"]], names, pictures, tmp_path / "4.npz", batch_size=4).vectors
    np.testing.assert_allclose(b1, b4, atol=1e-5)


def test_missing_images_all_listed(models, pictures, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("image\nimg0.png\nnope1.jpg\nimg1.png\nnope2.jpg\nnope3.jpg\n")
    with pytest.raises(WhalesubError) as exc:
        run_embed([models["a"]], tmp_path / "x.npz", _opts(), images=pictures, listing=listing)
    msg = str(exc.value)
    assert "3 of 5" in msg and all(f"nope{i}.jpg" in msg for i in (1, 2, 3))
    assert not (tmp_path / "x.npz").exists()


def test_bad_model_dir(pictures, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WhalesubError, match="not an export folder"):
        run_embed([tmp_path / "empty"], tmp_path / "x.npz", _opts(), images=pictures)


def test_boxes_mismatch(models, pictures, tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x1,y1,x2,y2,box_type\nother.jpg,0,0,10,10,body\n")
    with pytest.raises(WhalesubError, match="no box for any"):
        run_embed([models["a"]], tmp_path / "x.npz", _opts(box_type="body"), images=pictures, boxes=boxes)
    with pytest.raises(WhalesubError, match="'fin' not in box file"):
        run_embed([models["a"]], tmp_path / "x.npz", _opts(box_type="fin"), images=pictures, boxes=boxes)


def test_boxes_crop_changes_only_boxed_rows(models, pictures, tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x1,y1,x2,y2\nimg1.png,10,5,60,50\n")
    names = ["img0.png", "img1.png"]
    listing = tmp_path / "l.csv"
    listing.write_text("image\n" + "\n".join(names) + "\n")
    run_embed([models["a"]], tmp_path / "c.npz", _opts(), images=pictures, listing=listing, boxes=boxes)
    c = load_embeddings(tmp_path / "c.npz").vectors
    full = _embed([models["a"]], names, pictures, tmp_path / "f.npz").vectors
    # Oracle for the crop: the same crop saved as its own image, embedded uncropped.
    Image.open(pictures / "img1.png").crop((10, 5, 60, 50)).save(tmp_path / "crop.png")
    crop = _embed([models["a"]], ["crop.png"], tmp_path, tmp_path / "k.npz").vectors
    np.testing.assert_allclose(c[0], full[0], atol=1e-6)
    np.testing.assert_allclose(c[1], crop[0], atol=2e-5)
    assert np.abs(c[1] - full[1]).max() > 1e-3  # the crop did change the vector


def test_box_conf_follows_the_models_training_cut(models, pictures, tmp_path):
    """A box below the model's box_conf is ignored (whole frame), exactly as training's BoxTable does."""
    import pandas as pd

    from train.dataset import BoxTable
    from whalesub.models.network import load_embedding_net, save_embedding_net

    net, spec = load_embedding_net(models["a_ckpt"])
    net2 = net.__class__(spec.replace(box_conf=0.5))  # the same weights, trained with box_conf 0.5
    net2.load_state_dict(net.state_dict())
    (tmp_path / "run").mkdir()
    ckpt = save_embedding_net(net2.eval(), tmp_path / "run" / "best.pt")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x1,y1,x2,y2,conf\nimg0.png,10,5,60,50,0.9\nimg1.png,10,5,60,50,0.2\n")
    names = ["img0.png", "img1.png"]
    listing = tmp_path / "l.csv"
    listing.write_text("image\n" + "\n".join(names) + "\n")
    opts = _opts(backend="torch", tta="none")
    got = load_embeddings(run_embed([ckpt], tmp_path / "c.npz", opts, images=pictures, listing=listing,
                                    boxes=boxes)).vectors
    full = _embed([ckpt], names, pictures, tmp_path / "f.npz", backend="torch", tta="none").vectors
    # oracle: training's box table with the same cut keeps img0's box and drops img1's
    table = BoxTable(pd.read_csv(boxes), {"box": 1.0}, 0.5)
    assert table.best("img0.png", None) is not None and table.best("img1.png", None) is None
    assert np.abs(got[0] - full[0]).max() > 1e-3  # confident box: cropped
    np.testing.assert_allclose(got[1], full[1], atol=1e-6)  # low-confidence box: whole frame
    # --box-conf overrides the model's cut: now img1 is cropped too
    over = load_embeddings(run_embed([ckpt], tmp_path / "o.npz", _opts(backend="torch", tta="none",
                                     box_conf=0.1), images=pictures, listing=listing, boxes=boxes)).vectors
    assert np.abs(over[1] - full[1]).max() > 1e-3


def test_cuda_without_provider_is_a_clear_error(models, pictures, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the error path is not reachable here")
    with pytest.raises(WhalesubError) as exc:
        run_embed([models["a"]], tmp_path / "x.npz", _opts(device="cuda"), images=pictures)
    msg = str(exc.value)
    assert "CUDAExecutionProvider" in msg and "CUDA 13" in msg and "onnxruntime-gpu<1.27" in msg


def test_shards_merge_equal_full_run(models, pictures, tmp_path):
    from whalesub.embedding.shards import merge_embeddings

    full = run_embed([models["a"]], tmp_path / "full.npz", _opts(), images=pictures)
    parts = [run_embed([models["a"]], tmp_path / f"s{i}.npz", _opts(shard=f"{i}/3"), images=pictures)
             for i in (2, 0, 1)]
    merged = load_embeddings(merge_embeddings(parts, tmp_path / "m.npz"))
    ref = load_embeddings(full)
    assert merged.ids.tolist() == ref.ids.tolist() and len(ref) == 12
    np.testing.assert_allclose(merged.vectors, ref.vectors, atol=1e-6)
    assert merged.meta["fingerprint"] == ref.meta["fingerprint"]
    with pytest.raises(WhalesubError, match=r"shard\(s\) \[1\] of 3 missing"):
        merge_embeddings([parts[0], parts[1]], tmp_path / "bad.npz")
    other = run_embed([models["b"]], tmp_path / "o1.npz", _opts(shard="1/3"), images=pictures)
    with pytest.raises(WhalesubError, match="fingerprint"):
        merge_embeddings([parts[0], parts[1], other], tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_parts_of_another_run_are_refused(models, pictures, tmp_path):
    out = tmp_path / "e.npz"
    parts = tmp_path / "e.npz.parts"
    parts.mkdir()
    (parts / "run.json").write_text('{"fingerprint": "something else"}')
    with pytest.raises(WhalesubError, match="different settings"):
        run_embed([models["a"]], out, _opts(), images=pictures)


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "from whalesub.cli import app; app()", *map(str, args)]


def test_resume_after_sigkill_gives_identical_output(models, nyala, tmp_path):
    names = sorted(p.name for p in (nyala / "train_images").iterdir())[:160]
    listing = tmp_path / "list.csv"
    listing.write_text("image\n" + "\n".join(names) + "\n")
    out = tmp_path / "killed.npz"
    args = ["embed", "--model", models["a"], "--list", listing, "--images", nyala / "train_images",
            "--out", out, "--device", "cpu", "--batch-size", "8", "--chunk", "16", "--workers", "1"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(parts.glob("chunk_*.npz")):
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"embed finished before it could be killed: {proc.stderr.read().decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("chunk_*.npz")))
    assert not out.exists() and 1 <= done_before < 10
    rerun = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stderr and not parts.exists()
    ref = run_embed([models["a"]], tmp_path / "ref.npz",
                    _opts(batch_size=8, chunk=16, workers=0), images=nyala / "train_images", listing=listing)
    a, b = load_embeddings(out), load_embeddings(ref)
    assert a.ids.tolist() == b.ids.tolist() == names
    assert np.array_equal(a.vectors, b.vectors)  # bit-identical, not merely close
    drop = {"created"}
    assert {k: v for k, v in a.meta.items() if k not in drop} == {
        k: v for k, v in b.meta.items() if k not in drop}


def test_undecodable_image_is_named(models, pictures, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(pictures / "img0.png", folder / "a.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(WhalesubError, match="broken.jpg"):
        run_embed([models["a"]], tmp_path / "x.npz", _opts(workers=1), images=folder)
    assert not (tmp_path / "x.npz").exists()


def test_cli_embed_and_merge(models, pictures, tmp_path):
    from typer.testing import CliRunner

    from whalesub.cli import app

    run = CliRunner().invoke
    base = ["embed", "--model", str(models["a"]), "--images", str(pictures), "--device", "cpu",
            "--workers", "0", "--batch-size", "4"]
    res = run(app, base + ["--out", str(tmp_path / "v.npz"), "--flip-views"])
    assert res.exit_code == 0, res.output
    v = load_embeddings(tmp_path / "v.npz")
    assert v.meta["views_per_image"] == 2 and len(v) == 24 and v.meta["tta_reduce"] is None
    res = run(app, base + ["--out", str(tmp_path / "x.npz"), "--flip-views", "--tta", "flip"])
    assert res.exit_code == 2 and "--tta none" in res.output
    for i in range(2):
        assert run(app, base + ["--out", str(tmp_path / f"s{i}.npz"), "--shard", f"{i}/2"]).exit_code == 0
    res = run(app, ["merge-embeddings", str(tmp_path / "s1.npz"), str(tmp_path / "s0.npz"),
                    "--out", str(tmp_path / "m.npz")])
    assert res.exit_code == 0, res.output
    m = load_embeddings(tmp_path / "m.npz")
    assert m.ids.tolist() == sorted(p.name for p in pictures.iterdir()) and m.meta["tta_reduce"] == "mean"
    res = run(app, base + ["--out", str(tmp_path / "y.npz"), "--shard", "2/2"])
    assert res.exit_code == 2 and "0 <= i < n" in res.output


@pytest.mark.gpu
def test_cuda_embed_matches_cpu(models, pictures, tmp_path):
    """Needs a GPU with a working ONNX Runtime CUDA provider: FP32 and FP16 graphs vs the CPU run."""
    from whalesub.models.runtime import cuda_provider_active

    if not cuda_provider_active(models["a"] / "model.onnx"):
        pytest.skip("ONNX Runtime's CUDAExecutionProvider is not active (CUDA/cuDNN mismatch?)")
    cpu = run_embed([models["a"]], tmp_path / "cpu.npz", _opts(), images=pictures)
    gpu = run_embed([models["a"]], tmp_path / "gpu.npz", _opts(device="cuda", workers=2), images=pictures)
    half = run_embed([models["a"]], tmp_path / "h.npz", _opts(device="cuda", fp16=True), images=pictures)
    torch16 = run_embed([models["a_ckpt"]], tmp_path / "t.npz",
                        _opts(device="cuda", fp16=True, backend="torch"), images=pictures)
    c = load_embeddings(cpu).vectors
    assert (c * load_embeddings(gpu).vectors).sum(1).min() >= 0.9999
    assert (c * load_embeddings(half).vectors).sum(1).min() >= 0.999
    assert (c * load_embeddings(torch16).vectors).sum(1).min() >= 0.999
    assert load_embeddings(gpu).meta["models"][0]["device"] == "cuda"


def test_tampered_onnx_file_is_refused(models, pictures, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(models["a"], copy)
    with open(copy / "model.onnx", "r+b") as fh:  # truncate: a broken upload
        fh.truncate(1000)
    with pytest.raises(WhalesubError, match="sha256"):
        run_embed([copy], tmp_path / "x.npz", _opts(), images=pictures)


def test_same_vectors_as_training_validation(models, photo_set, tmp_path):
    """whalesub embed --flip-views == training's validation (train.dataset.EvalSet + the same net),
    with box crops: the kernel and CV cannot drift apart (the classic CV/LB-gap bug)."""
    import torch

    from train.dataset import EvalSet
    from whalesub.models.network import load_embedding_net

    names = sorted(p.name for p in (photo_set / "test_images").iterdir())[:6]
    boxes = [(10.0, 20.0, 200.0, 150.0) if i % 2 else None for i in range(len(names))]
    csv = tmp_path / "boxes.csv"
    csv.write_text("image,x1,y1,x2,y2\n" + "".join(f"{n},{b[0]},{b[1]},{b[2]},{b[3]}\n"
                                                      for n, b in zip(names, boxes, strict=True) if b))
    listing = tmp_path / "l.csv"
    listing.write_text("image\n" + "\n".join(names) + "\n")
    opts = _opts(backend="torch", tta="none", flip_views=True)
    out = run_embed([models["a_ckpt"]], tmp_path / "e.npz", opts, images=photo_set / "test_images",
                    listing=listing, boxes=csv)
    got = load_embeddings(out).vectors.reshape(len(names), 2, -1)
    net, spec = load_embedding_net(models["a_ckpt"])
    ds = EvalSet(names, photo_set / "test_images", spec, boxes, flip=True)
    with torch.no_grad():
        want = np.stack([net(ds[i][0]).numpy() for i in range(len(names))])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunk_batches_stay_in_their_chunk_and_are_drawn_lazily():
    """The batches of the chunks taken (a Ray worker's queue is a generator): rows in order, never
    crossing a chunk (a single process computes every row in the same batch), and a chunk is only
    taken when its first batch is asked for."""
    from whalesub.embedding.embed import _ChunkBatches, _Parts

    parts = _Parts(Path("unused"), chunk=4, n=10)  # chunks: rows 0-3, 4-7, 8-9
    taken: list[int] = []

    def queue():
        for c in (2, 0, 1):
            taken.append(c)
            yield c

    it = iter(_ChunkBatches(parts, queue(), batch_size=3))
    assert next(it) == [8, 9] and taken == [2]
    assert next(it) == [0, 1, 2] and taken == [2, 0]
    assert next(it) == [3] and taken == [2, 0]
    assert list(it) == [[4, 5, 6], [7]] and taken == [2, 0, 1]
    # a list gives the same batches as the lazy queue
    assert list(_ChunkBatches(parts, [2, 0, 1], 3)) == [[8, 9], [0, 1, 2], [3], [4, 5, 6], [7]]
