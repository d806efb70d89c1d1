"""EmbeddingNet: GeM against the formula, shapes, unit norm, FP32 tail under autocast, strict loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from whalesub.core.errors import ConfigError
from whalesub.models.network import (
    EmbeddingNet,
    GeM,
    build_embedding_net,
    load_embedding_net,
    save_embedding_net,
)
from whalesub.models.spec import SPEC_FILENAME, ModelSpec

S = 64


def _net(backbone="test_efficientnet", seed=0, **kw) -> EmbeddingNet:
    torch.manual_seed(seed)
    return EmbeddingNet(ModelSpec(backbone=backbone, image_size=S, **kw)).eval()


def _x(b=2, seed=1) -> torch.Tensor:
    return torch.randn(b, 3, S, S, generator=torch.Generator().manual_seed(seed))


# --- GeM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1.0, 2.5, 3.0, 6.0])
def test_gem_equals_the_generalised_mean_formula(p):
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4 - 1  # some negatives
    got = GeM(p=p, eps=1e-6)(x).numpy()
    xx = np.maximum(x.double().numpy(), 1e-6)
    want = np.mean(xx**p, axis=(2, 3)) ** (1.0 / p)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_gem_p1_is_average_pooling_and_learnable_p_gets_gradients():
    x = torch.rand(2, 4, 3, 3) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), F.avg_pool2d(x, 3).flatten(1))
    gem = GeM(p=3.0, learnable=True)
    assert isinstance(gem.p, torch.nn.Parameter) and "p" in gem.state_dict()
    gem(x).sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all() and gem.p.grad.abs().item() > 0
    assert "p" not in GeM(p=3.0).state_dict()  # a fixed p comes from the spec, not the weights


def test_gem_stays_fp32_for_half_inputs_and_under_autocast():
    # 100^3 = 1e6 overflows FP16 (max 65504): a half-precision GeM would return inf.
    x = torch.full((1, 2, 4, 4), 100.0, dtype=torch.float16)
    out = GeM(p=3.0)(x)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full((1, 2), 100.0), rtol=1e-5)
    xb = (torch.rand(2, 3, 4, 4) * 50 + 1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = GeM(p=3.0)(xb)
    want = (xb.double() ** 3).mean((2, 3)) ** (1 / 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


# --- the network -------------------------------------------------------------------------------
def test_nhwc_backbone_is_pooled_over_its_spatial_axes():
    net = _net("test_mambaout")
    with torch.no_grad():
        fmap = net.backbone.forward_features(_x())  # [B, H, W, C]
        assert fmap.shape[-1] == net.embed_dim
        want = (fmap.clamp(min=1e-6) ** 3).mean((1, 2)) ** (1 / 3)
        torch.testing.assert_close(net.pooled(_x()), want, rtol=1e-5, atol=1e-6)


def test_output_shape_unit_norm_and_features_relation():
    import timm

    net = _net()
    ref = timm.create_model("test_efficientnet", pretrained=False, num_classes=0, global_pool="")
    with torch.no_grad():
        y, f = net(_x()), net.features(_x())
    assert y.shape == (2, ref.num_features) and y.dtype == torch.float32
    assert net.spec.embed_dim == ref.num_features and net.embed_dim == ref.num_features
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(y, f / f.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("backbone", ["test_efficientnet", "resnet18", "test_mambaout"])  # mambaout: NHWC
def test_two_stages_concatenate_gem_of_the_last_two_feature_maps(backbone):
    import timm

    net = _net(backbone, stages=2)
    feats = timm.create_model(backbone, pretrained=False, features_only=True)
    chans = feats.feature_info.channels()
    assert net.pooled_dims == chans[-2:] and net.embed_dim == sum(chans[-2:])
    with torch.no_grad():
        maps = net.backbone(_x())  # the two stage outputs
        axes = (1, 2) if maps[-1].shape[-1] == chans[-1] else (2, 3)  # NHWC or NCHW
        want = torch.cat([(m.clamp(min=1e-6) ** 3).mean(axes) ** (1 / 3) for m in maps], dim=1)
        torch.testing.assert_close(net.pooled(_x()), want, rtol=1e-5, atol=1e-6)
        assert net(_x()).shape == (2, sum(chans[-2:]))


def test_linear_neck_projects_to_embed_dim_and_bn_neck_refuses_a_wrong_size():
    net = _net(neck="linear_bn", embed_dim=24)
    with torch.no_grad():
        assert net(_x()).shape == (2, 24)
    with pytest.raises(ConfigError, match="linear_bn"):
        _net(embed_dim=24)


def test_bf16_autocast_gives_fp32_unit_vectors_close_to_fp32():
    net = _net(neck="linear_bn", embed_dim=32)
    with torch.no_grad():
        ref = net(_x())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = net.features(_x())
            out = net(_x())
    assert feats.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert F.cosine_similarity(out, ref).min().item() > 0.98


def test_channels_last_input_gives_the_same_embedding():
    net = _net("resnet18")
    with torch.no_grad():
        a = net(_x())
        b = net.to(memory_format=torch.channels_last)(_x().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pretrained_weights_come_from_a_local_file_only(tmp_path):
    import timm

    torch.manual_seed(123)
    src = timm.create_model("resnet18", pretrained=False)  # has a classifier, like a real timm file
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    for stages in (1, 2):
        net = EmbeddingNet(ModelSpec(backbone="resnet18", image_size=S, stages=stages), weights_file=path)
        sd = net.backbone.state_dict()
        torch.testing.assert_close(sd["conv1.weight"], src.state_dict()["conv1.weight"])
        torch.testing.assert_close(sd["layer4.1.bn2.weight"], src.state_dict()["layer4.1.bn2.weight"])
    spec = ModelSpec(backbone="resnet18", image_size=S)
    # timm drops the classifier with strict=False and only logs missing keys: a wrong file must not
    # silently leave random weights.
    wrong = tmp_path / "wrong.pth"
    torch.save({"something.else": torch.zeros(3)}, wrong)
    for stages in (1, 2):
        with pytest.raises(ConfigError, match="conv1.weight"):
            EmbeddingNet(spec.replace(stages=stages), weights_file=wrong)
    with pytest.raises(ConfigError, match="layer1.2"):  # resnet18 weights for a resnet34
        EmbeddingNet(spec.replace(backbone="resnet34"), weights_file=path)
    with pytest.raises(ConfigError, match="weights_file"):
        EmbeddingNet(spec, pretrained=True)
    with pytest.raises(ConfigError, match="missing.pth"):
        build_embedding_net(spec, weights_file=tmp_path / "missing.pth")


@pytest.fixture
def reworded_timm_log():
    """timm rewords (here: hides) its "Missing keys" log line: the check must not depend on it."""
    import logging

    class Reword(logging.Filter):
        def filter(self, record):
            record.msg, record.args = "some keys were not found in the checkpoint", ()
            return True

    logger, f = logging.getLogger("timm.models._builder"), Reword()
    logger.addFilter(f)
    yield
    logger.removeFilter(f)


@pytest.mark.parametrize("stages", [1, 2])
def test_pretrained_fit_is_judged_from_the_state_dict(tmp_path, reworded_timm_log, stages):
    import timm

    torch.manual_seed(7)
    full = timm.create_model("resnet18", pretrained=False).state_dict()  # with fc, like a timm file
    spec = ModelSpec(backbone="resnet18", image_size=S, stages=stages)

    def save(name, sd):
        torch.save(sd, tmp_path / name)
        return tmp_path / name

    net = EmbeddingNet(spec, weights_file=save("ok.pth", full))  # matches: every tensor is the file's
    for k, v in net.backbone.state_dict().items():
        torch.testing.assert_close(v, full[k])
    missing = {k: v for k, v in full.items() if not k.startswith("layer4.1.bn2.")}
    with pytest.raises(ConfigError, match=r"missing from the file: .*layer4\.1\.bn2\.weight"):
        EmbeddingNet(spec, weights_file=save("missing.pth", missing))
    shapes = dict(full, **{"layer3.0.conv1.weight": torch.zeros(256, 128, 1, 1)})
    with pytest.raises(ConfigError, match=r"layer3\.0\.conv1\.weight"):
        EmbeddingNet(spec, weights_file=save("shapes.pth", shapes))
    if stages == 1:  # a tensor with no place in the backbone means another architecture
        with pytest.raises(ConfigError, match=r"no place in the backbone: 'layer5\.weight'"):
            EmbeddingNet(spec, weights_file=save("extra.pth", dict(full, **{"layer5.weight": torch.ones(2)})))


# --- saving and strict loading -------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    net = _net(stages=2, gem_learnable=True, neck="linear_bn", embed_dim=16)
    with torch.no_grad():
        net.pool.p.fill_(2.5)
    path = save_embedding_net(net, tmp_path / "best.pt", epoch=3)
    assert json.loads((tmp_path / SPEC_FILENAME).read_text()) == net.spec.to_dict()
    loaded, spec = load_embedding_net(path)
    assert spec == net.spec and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), net(_x()))
    assert loaded.pool.p.item() == pytest.approx(2.5)


def _checkpoint(tmp_path, mutate):
    net = _net()
    sd = dict(net.state_dict())
    mutate(sd)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "spec": net.spec.to_dict(), "optimizer": {}}, path)
    return path


def test_missing_keys_are_listed_and_nothing_loads(tmp_path):
    path = _checkpoint(tmp_path, lambda sd: [sd.pop("neck.0.weight"), sd.pop("neck.0.running_var")])
    with pytest.raises(ConfigError) as exc:
        load_embedding_net(path)
    msg = str(exc.value)
    assert "2 missing" in msg and "neck.0.weight" in msg and "neck.0.running_var" in msg and "ckpt.pt" in msg


def test_unexpected_keys_and_shape_mismatches_are_listed(tmp_path):
    def mutate(sd):
        sd["heads.arcface.weight"] = torch.zeros(3, 3)
        sd["neck.0.bias"] = torch.zeros(7)

    with pytest.raises(ConfigError) as exc:
        load_embedding_net(_checkpoint(tmp_path, mutate))
    msg = str(exc.value)
    assert "unexpected" in msg and "heads.arcface.weight" in msg and "neck.0.bias" in msg and "(7,)" in msg


def test_bare_state_dict_with_json_beside_and_ddp_prefix(tmp_path):
    net = _net()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "weights.pth")
    with pytest.raises(ConfigError, match=SPEC_FILENAME):
        load_embedding_net(tmp_path / "weights.pth")
    net.spec.save(tmp_path / SPEC_FILENAME)
    loaded, _ = load_embedding_net(tmp_path / "weights.pth")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), net(_x()))


def test_safetensors_weights_with_json_beside(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    net = _net(stages=2)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    safetensors.save_file(state, tmp_path / "w.safetensors")
    net.spec.save(tmp_path)
    loaded, spec = load_embedding_net(tmp_path / "w.safetensors")
    assert spec == net.spec
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), net(_x()))


def test_stale_json_beside_a_checkpoint_is_an_error(tmp_path):
    net = _net()
    path = save_embedding_net(net, tmp_path / "best.pt")
    net.spec.replace(image_size=S * 2).save(tmp_path / SPEC_FILENAME)
    with pytest.raises(ConfigError, match="image_size"):
        load_embedding_net(path)


def test_pickled_objects_and_garbage_are_refused(tmp_path):
    bad = tmp_path / "pickle.pt"
    torch.save({"model": {}, "spec": {}, "args": ConfigError("x")}, bad)  # needs full unpickling
    with pytest.raises(ConfigError, match="pickle.pt"):
        load_embedding_net(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt"):
        load_embedding_net(junk)
    with pytest.raises(ConfigError, match="nowhere.pt"):
        load_embedding_net(tmp_path / "nowhere.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kw", [dict(), dict(stages=2, gem_learnable=True, neck="linear_bn", embed_dim=16)])
def test_onnx_export_with_the_torchscript_exporter_matches_torch(tmp_path, kw):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = _net(**kw)
    path = tmp_path / "net.onnx"
    axes = {"input": {0: "batch"}, "embedding": {0: "batch"}}
    torch.onnx.export(net, (_x(1),), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["embedding"], dynamic_axes=axes)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _x(3, seed=5)
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = net(x).numpy()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert got.shape == want.shape and cos.min() > 0.9999


@pytest.mark.gpu
def test_fp16_autocast_on_cuda_keeps_gem_and_the_tail_in_fp32():
    net = _net("resnet18", neck="linear_bn", embed_dim=32).cuda()
    x = _x(4).cuda() * 30  # large inputs -> large activations, where an FP16 cube would overflow
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cuda", dtype=torch.float16):
            out = net(x)
            pooled = net.pooled(x)
    assert out.dtype == torch.float32 and pooled.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(pooled).all()
    assert F.cosine_similarity(out, ref).min().item() > 0.99
