"""FP16 export of networks that interpolate (Resize): scales stay FP32, converter failures are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whalesub.models.export as ex
from whalesub.models.network import GeM
from whalesub.models.sources import Source
from whalesub.models.spec import ModelSpec

SCALE = 1.1  # not representable in FP16 (1.0996): 10 px * 1.0996 floors to 10 instead of 11


class _Upsampling(nn.Module):
    """conv (stride 2) -> bilinear interpolate by SCALE -> conv: a Resize inside the backbone."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(torch.relu(self.a(x)), scale_factor=SCALE, mode="bilinear", align_corners=False)
        return torch.relu(self.b(x))


class _Net(nn.Module):
    """EmbeddingNet's layout (backbone / pool / neck attributes, L2-normalised output)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone, self.pool, self.neck = _Upsampling(), GeM(), nn.Sequential(nn.BatchNorm1d(8))

    def forward(self, x):
        return F.normalize(self.neck(self.pool(self.backbone(x))), dim=1)


SPEC = ModelSpec(backbone="test_efficientnet", image_size=20, embed_dim=8)


@pytest.fixture
def upsampling_source(monkeypatch, tmp_path):
    """export_model reads this network instead of a checkpoint (nothing else of the path changes)."""
    net = _Net().eval()
    src = Source(tmp_path / "fake.pt", net, SPEC, {})
    monkeypatch.setattr(ex, "load_source", lambda source: src)
    return net


def _value_read(model, name: str) -> np.ndarray:
    """The constant an input slot reads: an initializer or a Constant node's value (else a failure)."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if name in node.output:
            assert node.op_type == "Constant", f"{name} is computed by {node.op_type} {node.name}"
            return numpy_helper.to_array(node.attribute[0].t)
    raise AssertionError(f"{name} has no producer")


def _resize_scales(model) -> list[np.ndarray]:
    return [_value_read(model, n.input[2]) for n in model.graph.node if n.op_type == "Resize"]


def test_resize_scales_stay_exact_fp32_in_the_fp16_export(upsampling_source, tmp_path):
    import onnx

    m = ex.export_model("fake", tmp_path / "out", fp16=True)
    fp32, fp16 = (onnx.load(str(tmp_path / "out" / f)) for f in ("model.onnx", "model_fp16.onnx"))
    want = np.array([1, 1, SCALE, SCALE], dtype=np.float32)
    assert [s.tolist() for s in _resize_scales(fp32)] == [want.tolist()]  # the oracle: torch's own graph
    got = _resize_scales(fp16)
    assert len(got) == 1 and got[0].dtype == np.float32 and np.array_equal(got[0], want)
    convs = [n for n in fp16.graph.node if n.op_type == "Conv"]
    half = {i.name for i in fp16.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert len(convs) == 2 and all(n.input[1] in half for n in convs)  # the backbone did go FP16
    assert m["files"]["fp16"]["cpu_check"]["min_cosine"] >= ex.FP16_COSINE_MIN


def test_resize_scales_held_as_initializers_convert(tmp_path):
    """Graphs whose Resize scales are initializers (constant folding, onnx-simplifier) convert too."""
    import onnx
    from onnx import numpy_helper

    net = _Net().eval()
    path = tmp_path / "m.onnx"
    ex.export_onnx(net, SPEC, path)
    model = onnx.load(str(path))
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.name.startswith("/backbone/")]:
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t),
                                                               node.output[0]))
        model.graph.node.remove(node)
    onnx.save(model, str(path))
    x = ex.parity_inputs(SPEC)
    entry = ex.export_fp16(net, path, tmp_path / "m16.onnx", x, "interpolating net")
    assert entry["structure"]["fp16_initializers"] == 4  # two conv weights, two biases
    got = _resize_scales(onnx.load(str(tmp_path / "m16.onnx")))
    assert len(got) == 1 and got[0].dtype == np.float32 and np.isclose(got[0][-1], np.float32(SCALE))
    assert entry["cpu_check"]["min_cosine"] >= ex.FP16_COSINE_MIN


def test_any_converter_failure_is_a_named_error_with_exit_2_and_nothing_written(upsampling_source,
                                                                               tmp_path, monkeypatch):
    import onnx
    from typer.testing import CliRunner

    from whalesub.cli import app

    def failing(model, prefix):  # what onnx raises on an invalid graph: not a ValueError
        raise onnx.checker.ValidationError("Resize scales must be float")

    monkeypatch.setattr(ex, "convert_backbone_to_fp16", failing)
    with pytest.raises(ex.FP16ExportError, match="FP16 conversion .* failed .*ValidationError"):
        ex.export_model("fake", tmp_path / "out", fp16=True)
    res = CliRunner().invoke(app, ["export", "fake.pt", "--out", str(tmp_path / "out"), "--fp16"])
    assert res.exit_code == 2, res.output
    assert "FP16 conversion" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".out")]
