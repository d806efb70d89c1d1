"""whalesub export: ONNX FP32 parity on photos (synthetic, and real ones when present), FP16 graph layout,
loud failures, class centres."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whalesub.core.errors import WhalesubError
from whalesub.models.export import FP32_COSINE_MIN, INPUT_NAME, export_model
from whalesub.models.network import EmbeddingNet, save_embedding_net
from whalesub.models.runtime import ort_session
from whalesub.models.spec import ModelSpec


def make_checkpoint(path: Path, backbone: str = "test_efficientnet", size: int = 64, seed: int = 0,
                    head: tuple[list[str], int] | None = None, stages: int = 1) -> Path:
    """A tiny EmbeddingNet (random weights, BN statistics made non-trivial) saved as a checkpoint.

    ``head=(labels, k)`` adds an ArcFace weight [len(labels) * k, D] as train/checkpoint.py stores it.
    """
    torch.manual_seed(seed)
    spec = ModelSpec(backbone=backbone, image_size=size, embed_dim=32, neck="linear_bn", stages=stages)
    net = EmbeddingNet(spec)
    with torch.no_grad():  # running stats away from (0, 1) so eval-mode BN folding is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if head is not None:
        labels, k = head
        extra = {"heads": {"head.weight": torch.randn(len(labels) * k, 32)}, "classes": list(labels)}
    return save_embedding_net(net, path, **extra)


def export_tiny(ckpt: Path, out: Path, **kw) -> Path:
    export_model(ckpt, out, **kw)
    return out


def _torch_and_onnx(ckpt: Path, onnx_path: Path, x: np.ndarray):
    from whalesub.models.network import load_embedding_net

    net, _ = load_embedding_net(ckpt)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = ort_session(onnx_path).run(None, {INPUT_NAME: x})[0]
    return ref, got


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "run" / "best.pt", head=(["whale_b", "whale_a", "whale_c"], 2))
    export_model(root / "run", root / "out", fp16=True)
    return ckpt, root / "out"


def test_fp32_parity_on_photos(exported, photo_set):
    from whalesub.data.image import load_for_model

    ckpt, out = exported
    spec = ModelSpec.load(out)
    photos = sorted((photo_set / "test_images").iterdir())[:12]
    x = np.stack([load_for_model(p, spec) for p in photos]).astype(np.float32)
    ref, got = _torch_and_onnx(ckpt, out / "model.onnx", x)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= FP32_COSINE_MIN
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # dynamic batch: one image alone gives the same row
    alone = ort_session(out / "model.onnx").run(None, {INPUT_NAME: x[3:4]})[0]
    np.testing.assert_allclose(alone[0], got[3], atol=1e-5)


def _first_principles_fingerprint(ckpt: Path, spec_json: Path) -> str:
    """The documented fingerprint, recomputed with hashlib from the files alone (no whalesub code):
    sha256 over "name|dtype|shape|" + raw bytes per tensor in sorted name order, then 16 hex of
    sha256 over the compact, key-sorted JSON {"spec": <model_spec.json>, "weights": digest}."""
    import hashlib
    import json

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    payload = {"spec": json.loads(spec_json.read_text()), "weights": h.hexdigest()}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_manifest_and_spec(exported):
    import json

    from whalesub.models.backends import open_model
    from whalesub.models.network import load_embedding_net

    ckpt, out = exported
    m = json.loads((out / "export.json").read_text())
    assert m["fingerprint"] == _first_principles_fingerprint(ckpt, out / "model_spec.json")
    # the torch backend (embed --backend torch) and the ONNX export agree on the model's identity
    assert open_model(ckpt, "torch", "cpu").fingerprint == m["fingerprint"]
    assert open_model(out, "onnx", "cpu").fingerprint == m["fingerprint"]
    net, spec = load_embedding_net(ckpt)
    assert ModelSpec.load(out).to_dict() == spec.to_dict()
    assert m["input"]["shape"] == ["batch", 3, 64, 64] and m["output"]["shape"] == ["batch", 32]
    assert m["opset"] >= 17 and m["files"]["fp32"]["parity"]["min_cosine"] >= FP32_COSINE_MIN
    assert set(m["files"]) == {"fp32", "fp16"}


def test_fingerprint_changes_with_one_weight_or_the_spec_mean(tmp_path):
    """Exports of the same network agree; one changed weight or a changed mean gives another one."""
    import json

    from whalesub.models.network import load_embedding_net

    ckpt = make_checkpoint(tmp_path / "a" / "best.pt")
    net, spec = load_embedding_net(ckpt)
    with torch.no_grad():
        next(net.neck.parameters()).view(-1)[0] += 1e-3
    save_embedding_net(net, tmp_path / "b" / "best.pt")
    net, _ = load_embedding_net(ckpt)
    save_embedding_net(net.__class__(spec.replace(mean=(0.5, 0.5, 0.5))), tmp_path / "c" / "best.pt")
    c_net, _ = load_embedding_net(tmp_path / "c" / "best.pt")
    c_net.load_state_dict(net.state_dict())
    save_embedding_net(c_net, tmp_path / "c" / "best.pt")
    prints = {}
    for name in ("a", "b", "c"):
        export_model(tmp_path / name / "best.pt", tmp_path / f"out_{name}")
        prints[name] = json.loads((tmp_path / f"out_{name}" / "export.json").read_text())["fingerprint"]
        assert prints[name] == _first_principles_fingerprint(tmp_path / name / "best.pt",
                                                             tmp_path / f"out_{name}" / "model_spec.json")
    export_model(tmp_path / "a" / "best.pt", tmp_path / "out_a2")
    assert json.loads((tmp_path / "out_a2" / "export.json").read_text())["fingerprint"] == prints["a"]
    assert len(set(prints.values())) == 3, prints


def _types(model) -> dict[str, int]:
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    t = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


def test_fp16_graph_layout(exported):
    import onnx
    from onnx import TensorProto

    _, out = exported
    m = onnx.load(str(out / "model_fp16.onnx"))
    types = _types(m)
    g = m.graph
    assert [types[i.name] for i in g.input] == [TensorProto.FLOAT]
    assert [types[o.name] for o in g.output] == [TensorProto.FLOAT]
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs)
    # GeM (Clip -> Pow -> GlobalAveragePool -> Pow), the neck and the L2 normalisation: FP32 in and out.
    tail_ops = {"Pow", "GlobalAveragePool", "ReduceL2", "Div", "Gemm", "MatMul", "BatchNormalization"}
    tail = [n for n in g.node if n.op_type in tail_ops]  # test_efficientnet's backbone has none of these
    assert {"Pow", "GlobalAveragePool", "Div"} <= {n.op_type for n in tail}
    for n in tail:
        for name in list(n.input) + list(n.output):
            if name and types.get(name) in (TensorProto.FLOAT16, TensorProto.FLOAT):
                assert types[name] == TensorProto.FLOAT, (n.name, name)
    pows = [n for n in g.node if n.op_type == "Pow"]
    assert pows and all(types[n.input[0]] == TensorProto.FLOAT for n in pows)


def test_fp16_two_stage_gem_converts_both_branches(tmp_path):
    """GeM over the last two stages: /pool/ and /pool_1/ scopes; every conv still goes FP16."""
    import onnx
    from onnx import TensorProto

    ckpt = make_checkpoint(tmp_path / "r" / "best.pt", "test_resnet", 32, stages=2)
    m = export_model(ckpt, tmp_path / "out", fp16=True)
    model = onnx.load(str(tmp_path / "out" / "model_fp16.onnx"))
    types = _types(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    from whalesub.models.network import load_embedding_net

    net, _ = load_embedding_net(ckpt)
    n_conv = sum(isinstance(mod, torch.nn.Conv2d) for mod in net.modules())
    assert len(convs) == n_conv and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    assert m["files"]["fp16"]["structure"]["fp16_initializers"] >= n_conv


def test_fp16_runs_on_cpu_close_to_fp32(exported, photo_set):
    from whalesub.data.image import load_for_model

    ckpt, out = exported
    spec = ModelSpec.load(out)
    x = np.stack([load_for_model(p, spec) for p in sorted((photo_set / "train_images").iterdir())[:6]])
    ref, got = _torch_and_onnx(ckpt, out / "model_fp16.onnx", x.astype(np.float32))
    assert got.dtype == np.float32
    assert ((ref * got).sum(1)).min() > 0.999  # weights rounded to FP16 only (CPU upcasts)


def test_structure_check_rejects_all_fp16_graph(exported):
    import onnx

    from whalesub.models.fp16 import check_fp16_structure

    _, out = exported
    m = onnx.load(str(out / "model.onnx"))
    with pytest.raises(ValueError, match="no FLOAT16 initializer"):
        check_fp16_structure(m)
    # GeM converted too (the all-FP16 mistake): rejected, naming the GeM node.
    from whalesub.models.fp16 import backbone_nodes, convert_to_fp16

    pool = {i for i, n in enumerate(m.graph.node) if n.name.startswith("/pool/")}
    bad = convert_to_fp16(m, backbone_nodes(m) | pool)
    with pytest.raises(ValueError, match="tail node '/pool/"):
        check_fp16_structure(bad)


def test_parity_failure_is_loud_and_leaves_nothing(tmp_path, monkeypatch):
    import whalesub.models.export as ex

    ckpt = make_checkpoint(tmp_path / "c.pt")
    real_export = ex.export_onnx

    def broken_export(net, spec, path, opset=17, batch=2):  # exports a perturbed copy of the net
        import copy

        bad = copy.deepcopy(net)
        with torch.no_grad():
            for p in bad.neck.parameters():
                p.add_(torch.randn_like(p))
        real_export(bad, spec, path, opset, batch)

    monkeypatch.setattr(ex, "export_onnx", broken_export)
    with pytest.raises(WhalesubError, match="disagree"):
        export_model(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    from typer.testing import CliRunner

    from whalesub.cli import app

    res = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "disagree" in res.output and not (tmp_path / "out2").exists()


def test_class_centres_match_sub_centre_oracle(exported):
    from whalesub.ranking.store import load_embeddings

    ckpt, out = exported
    c = load_embeddings(out / "class_centres.npz")
    raw = torch.load(ckpt, weights_only=True)
    w = raw["heads"]["head.weight"].double().numpy()
    assert c.ids.tolist() == ["whale_b", "whale_a", "whale_c"]
    for i in range(3):  # independent formula: rows 2i, 2i+1 are class i's sub-centres
        a, b = w[2 * i] / np.linalg.norm(w[2 * i]), w[2 * i + 1] / np.linalg.norm(w[2 * i + 1])
        want = (a + b) / np.linalg.norm(a + b)
        np.testing.assert_allclose(c.vectors[i], want, atol=1e-6)
    assert c.meta["sub_centres"] == 2 and c.meta["fingerprint"]


@pytest.mark.gpu
def test_fp16_parity_on_cuda(exported, photo_set):
    """Needs ONNX Runtime's CUDA provider: per-row cosine >= 0.999 and top-5 agreement >= 99 %."""
    from whalesub.data.image import load_for_model
    from whalesub.models.runtime import cuda_provider_active

    ckpt, out = exported
    if not cuda_provider_active(out / "model_fp16.onnx"):
        pytest.skip("ONNX Runtime's CUDAExecutionProvider is not active (CUDA/cuDNN mismatch?)")
    spec = ModelSpec.load(out)
    gal = np.stack([load_for_model(p, spec) for p in sorted((photo_set / "train_images").iterdir())[:200]])
    qry = np.stack([load_for_model(p, spec) for p in sorted((photo_set / "test_images").iterdir())[:100]])

    def run(file, x):
        s = ort_session(out / file, ("CUDAExecutionProvider",))
        assert "CUDAExecutionProvider" in s.get_providers()
        return np.concatenate([s.run(None, {INPUT_NAME: x[i:i + 32]})[0] for i in range(0, len(x), 32)])

    g32, q32 = run("model.onnx", gal), run("model.onnx", qry)
    g16, q16 = run("model_fp16.onnx", gal), run("model_fp16.onnx", qry)
    assert (q32 * q16).sum(1).min() >= 0.999 and (g32 * g16).sum(1).min() >= 0.999
    top32 = np.argsort(-q32 @ g32.T, axis=1)[:, :5]
    top16 = np.argsort(-q16 @ g16.T, axis=1)[:, :5]
    assert (top32 == top16).all(axis=1).mean() >= 0.99


def test_resolve_checkpoint_layouts(tmp_path):
    from whalesub.models.sources import resolve_checkpoint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "last.pt").touch()
    assert resolve_checkpoint(tmp_path / "a") == tmp_path / "a" / "last.pt"
    (tmp_path / "a" / "best.pt").touch()  # best wins over last
    assert resolve_checkpoint(tmp_path / "a") == tmp_path / "a" / "best.pt"
    run = tmp_path / "run"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "best.pt").touch()
    assert resolve_checkpoint(run) == run / "fold0" / "best.pt"
    (run / "fold1").mkdir()
    (run / "fold1" / "last.pt").touch()
    with pytest.raises(WhalesubError, match="several folds"):
        resolve_checkpoint(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WhalesubError, match="no checkpoint found"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(WhalesubError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_parity_uses_the_runs_training_images(tmp_path, photo_set):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt")
    raw = torch.load(ckpt, weights_only=True)
    raw["config"] = {"image_dir": str(photo_set / "train_images")}
    torch.save(raw, ckpt)
    m = export_model(ckpt, tmp_path / "out")
    assert m["files"]["fp32"]["parity"]["rows"] == 4 + 8  # 4 random + the first 8 photos
