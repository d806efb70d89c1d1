"""ModelSpec: plain-data round trips, strict keys and types, timm defaults, fingerprint, weights digest."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

from whalesub.core.errors import ConfigError
from whalesub.models.spec import ModelSpec, field_names, weights_digest

BASE = dict(backbone="resnet18", image_size=64)


def test_round_trip_dict_json_and_file(tmp_path):
    spec = ModelSpec(**BASE, stages=2, gem_p=4, box_margin=0.1)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec
    path = spec.save(tmp_path / "model_spec.json")
    assert ModelSpec.load(path) == spec
    assert ModelSpec.load(tmp_path) == spec  # a folder means folder/model_spec.json
    assert not [p.name for p in tmp_path.iterdir() if p.name != "model_spec.json"]  # no temp file left


def test_mean_std_default_to_the_backbones_timm_config():
    # Hand-copied constants: ImageNet for resnet18, OpenAI CLIP for the CLIP ViT.
    assert ModelSpec(**BASE).mean == pytest.approx((0.485, 0.456, 0.406))
    assert ModelSpec(**BASE).std == pytest.approx((0.229, 0.224, 0.225))
    clip = ModelSpec(backbone="vit_base_patch16_clip_224.openai", image_size=224)
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    grey = ModelSpec(**BASE, in_chans=1)
    assert grey.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    given = ModelSpec(**BASE, mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25])
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.25, 0.25, 0.25)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        ModelSpec.from_dict({**BASE, "img_size": 512, "gem": 3}, source="run/model_spec.json")
    msg = str(exc.value)
    assert "run/model_spec.json" in msg and "'img_size'" in msg and "'gem'" in msg
    for key in field_names():
        assert key in msg


def test_missing_required_key():
    with pytest.raises(ConfigError, match="image_size"):
        ModelSpec.from_dict({"backbone": "resnet18"})


@pytest.mark.parametrize("field,value", [
    ("image_size", "64"), ("image_size", 64.0), ("stages", True), ("gem_learnable", 1),
    ("mean", ("a", "b", "c")), ("gem_p", "3"), ("embed_dim", 1.5),
])
def test_wrong_types_are_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelSpec(**{**BASE, field: value})


def test_all_bad_values_are_listed_at_once():
    with pytest.raises(ConfigError) as exc:
        ModelSpec(**BASE, stages=3, neck="mlp", pool="max", interpolation="nearest", std=(0.2, 0.0, 0.2))
    msg = str(exc.value)
    for field in ("stages", "neck", "pool", "interpolation", "std"):
        assert f"{field}:" in msg


def test_linear_neck_needs_embed_dim_and_unknown_backbone_is_named():
    with pytest.raises(ConfigError, match="embed_dim"):
        ModelSpec(**BASE, neck="linear_bn")
    with pytest.raises(ConfigError, match="resnet18"):  # suggested close match
        ModelSpec(backbone="resnet_18", image_size=64)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nothere.json"):
        ModelSpec.load(tmp_path / "nothere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        ModelSpec.load(bad)


def test_fingerprint_is_the_same_for_equal_specs_however_built(tmp_path):
    a = ModelSpec(**BASE, gem_p=3, mean=[0.5, 0.5, 0.5], std=(0.2, 0.2, 0.2))
    b = ModelSpec(**BASE, gem_p=3.0, mean=(0.5, 0.5, 0.5), std=[0.2, 0.2, 0.2])
    c = ModelSpec.load(a.save(tmp_path / "s.json"))
    assert a.fingerprint() == b.fingerprint() == c.fingerprint()
    assert a.fingerprint("abc") == c.fingerprint("abc")
    fp = a.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_fingerprint_changes_with_every_field_and_the_weights():
    base = ModelSpec(**BASE, embed_dim=None)
    changed = {
        "backbone": "resnet34", "image_size": 65, "in_chans": 1, "mean": (0.5, 0.456, 0.406),
        "std": (0.229, 0.224, 0.2251), "embed_dim": 512, "pool": "avg", "gem_p": 3.5, "gem_eps": 1e-5,
        "gem_learnable": True, "stages": 2, "neck": "linear_bn", "interpolation": "linear",
        "preprocess": "v1", "box_margin": 0.05, "box_conf": 0.3,
    }
    assert set(changed) == set(field_names())  # a new field must be added here too
    seen = {base.fingerprint()}
    for field, value in changed.items():
        if getattr(base, field) == value:  # only one preprocess version exists so far
            continue
        extra = {"embed_dim": 512} if field == "neck" else {}
        extra |= {"mean": (0.45,), "std": (0.22,)} if field == "in_chans" else {}
        spec = base.replace(**{field: value}, **extra)
        fp = spec.fingerprint()
        assert fp not in seen, field
        seen.add(fp)
    assert base.fingerprint("0" * 64) != base.fingerprint() != base.fingerprint("1" * 64)
    assert base.fingerprint("0" * 64) != base.fingerprint("1" * 64)


def _state():
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [("a.weight", torch.randn(3, 4, generator=g)), ("a.bias", torch.zeros(3)),
         ("bn.num_batches_tracked", torch.tensor(7)), ("h", torch.randn(5, generator=g).to(torch.bfloat16))]
    )


def test_weights_digest_is_deterministic_and_order_free():
    sd = _state()
    reordered = OrderedDict(reversed(list(sd.items())))
    cloned = {k: v.clone() for k, v in sd.items()}
    assert weights_digest(sd) == weights_digest(reordered) == weights_digest(cloned)
    assert len(weights_digest(sd)) == 64


@pytest.mark.parametrize("change", ["value", "dtype", "shape", "name"])
def test_weights_digest_changes_with_any_tensor_change(change):
    sd = _state()
    other = {k: v.clone() for k, v in sd.items()}
    if change == "value":
        other["a.weight"][1, 2] += 1e-6
    elif change == "dtype":
        other["a.bias"] = other["a.bias"].double()
    elif change == "shape":
        other["a.bias"] = other["a.bias"].reshape(1, 3)
    else:
        other["a.bias2"] = other.pop("a.bias")
    assert weights_digest(sd) != weights_digest(other)
