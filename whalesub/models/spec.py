"""``ModelSpec``: everything needed to rebuild an embedding network and feed it the same pixels.

A spec travels as ``model_spec.json`` beside every weight file (checkpoint, ONNX FP32/FP16) and as a
plain dict inside checkpoints. Inference never guesses a setting: it reads the run's own spec.

Its :meth:`ModelSpec.fingerprint` is a short sha256 over every field (all of them change either the
pixels the network sees or the network itself) plus, optionally, a digest of the weights
(:func:`weights_digest`). Embedding files carry it so that ``whalesub submit`` can refuse to mix a
gallery and queries embedded by different models or preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError

SPEC_FILENAME = "model_spec.json"
POOLS = ("gem", "avg")
NECKS = ("bn", "linear_bn")
INTERPOLATIONS = ("area", "linear", "cubic", "lanczos")
PREPROCESS_VERSIONS = ("v1",)


@dataclass(frozen=True)
class ModelSpec:
    """The embedding network and its input preprocessing.

    Fields:
        backbone: timm model name (``tf_efficientnet_b5.ns_jft_in1k``, ``resnet18``...).
        image_size: side of the square network input in pixels (the image or box crop is resized,
            not padded, to ``image_size`` x ``image_size``; aspect ratio is not kept).
        in_chans: input channels, 3 (RGB) or 1 (grey).
        mean, std: per-channel normalisation on the 0-1 scale; default: the backbone's timm
            ``pretrained_cfg`` (averaged to one value when ``in_chans == 1``).
        embed_dim: embedding size. ``neck='bn'``: the pooled feature size (``None`` = resolved
            when the network is built; ``EmbeddingNet.spec`` holds the resolved value).
            ``neck='linear_bn'``: required, the output size of the linear projection.
        pool: ``'gem'`` (generalised mean) or ``'avg'`` (global average).
        gem_p: GeM exponent (initial value when learnable); ``gem_eps``: clamp floor before the power.
        gem_learnable: learn p (then it is a parameter in the state dict).
        stages: 1 = the backbone's final feature map (``forward_features``); 2 = the last two
            stages (``features_only``), each pooled, then concatenated.
        neck: ``'bn'`` (BatchNorm1d) or ``'linear_bn'`` (Linear without bias, then BatchNorm1d).
        interpolation: resize to ``image_size``: ``'area'`` (cv2 INTER_AREA when shrinking both
            sides, INTER_LINEAR otherwise), ``'linear'``, ``'cubic'``, ``'lanczos'``.
        preprocess: version of :func:`whalesub.data.image.to_model_input` / ``load_image``; bump it when
            their output changes.
        box_margin: when a box is given, each side is widened by this fraction of the box's width
            (left/right) or height (top/bottom) before cropping.
        box_conf: boxes whose ``conf`` is below this are ignored and the whole frame is used, at
            training, validation and ``whalesub embed`` alike (training's ``box_conf``).
    """

    backbone: str
    image_size: int
    in_chans: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    embed_dim: int | None = None
    pool: str = "gem"
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    gem_learnable: bool = False
    stages: int = 1
    neck: str = "bn"
    interpolation: str = "area"
    preprocess: str = "v1"
    box_margin: float = 0.0
    box_conf: float = 0.0

    def __post_init__(self) -> None:
        problems = _check_types(self)
        if problems:
            raise ConfigError("invalid model spec; fix these fields:", problems=problems)
        set_ = object.__setattr__
        set_(self, "gem_p", float(self.gem_p))
        set_(self, "gem_eps", float(self.gem_eps))
        set_(self, "box_margin", float(self.box_margin))
        set_(self, "box_conf", float(self.box_conf))
        if self.mean is None or self.std is None:
            mean, std = _timm_mean_std(self.backbone, self.in_chans)
            set_(self, "mean", mean if self.mean is None else self.mean)
            set_(self, "std", std if self.std is None else self.std)
        set_(self, "mean", tuple(float(v) for v in self.mean))
        set_(self, "std", tuple(float(v) for v in self.std))
        problems = _check_values(self)
        if problems:
            raise ConfigError("invalid model spec; fix these fields:", problems=problems)

    # --- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready plain data (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model spec") -> ModelSpec:
        """Build from plain data; unknown keys or wrong types raise ConfigError listing valid keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of spec fields, got {type(data).__name__}")
        valid = field_names()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(
                f"{source}: unknown model spec key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid)}"
            )
        missing = [k for k in ("backbone", "image_size") if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required model spec key(s) {', '.join(missing)}")
        kwargs = dict(data)
        for key in ("mean", "std"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        """Indented, key-sorted JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the spec as JSON, atomically. A folder means ``folder/model_spec.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelSpec:
        """Read a spec JSON file (or ``folder/model_spec.json``); errors name the file."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        if not path.is_file():
            raise ConfigError(f"model spec not found: {path}; every weight file needs its {SPEC_FILENAME} "
                              "beside it (written by training and by `whalesub export`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read model spec {path}: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed (checked like a new spec)."""
        return dataclasses.replace(self, **changes)

    # --- identity ------------------------------------------------------------------------------
    def fingerprint(self, weights_digest: str | None = None) -> str:
        """Short (16 hex digits) sha256 over all fields and the weights digest, if given.

        Equal specs give equal fingerprints however they were built (tuple or list, 3 or 3.0,
        JSON round trip); any change of a field or of the weights changes it.
        """
        payload = {"spec": self.to_dict(), "weights": weights_digest}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def field_names() -> list[str]:
    """The valid spec keys, in declaration order."""
    return [f.name for f in dataclasses.fields(ModelSpec)]


def weights_digest(state_dict) -> str:
    """sha256 (hex) over a state dict: names, dtypes, shapes and raw bytes, in sorted key order.

    Deterministic across runs and devices (tensors are copied to CPU); any changed value, shape,
    dtype or name changes it.
    """
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_TYPES: dict[str, tuple[type, ...]] = {
    "backbone": (str,), "image_size": (int,), "in_chans": (int,), "mean": (tuple, list, type(None)),
    "std": (tuple, list, type(None)), "embed_dim": (int, type(None)), "pool": (str,),
    "gem_p": (int, float), "gem_eps": (int, float), "gem_learnable": (bool,), "stages": (int,),
    "neck": (str,), "interpolation": (str,), "preprocess": (str,), "box_margin": (int, float),
    "box_conf": (int, float),
}


def _check_types(spec: ModelSpec) -> list[str]:
    problems = []
    for name, types in _TYPES.items():
        value = getattr(spec, name)
        # bool is an int subclass: refuse True where a number is meant, and 1 where a bool is meant.
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{name}: expected {want}, got {value!r} ({type(value).__name__})")
    for name in ("mean", "std"):
        value = getattr(spec, name)
        if isinstance(value, tuple | list) and not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            problems.append(f"{name}: expected a list of numbers, got {value!r}")
    return problems


def _check_values(s: ModelSpec) -> list[str]:
    problems = []
    if not s.backbone:
        problems.append("backbone: empty; give a timm model name such as 'tf_efficientnet_b5'")
    if s.image_size < 16:
        problems.append(f"image_size: {s.image_size} px is too small (>= 16)")
    if s.in_chans not in (1, 3):
        problems.append(f"in_chans: {s.in_chans}; use 3 (RGB) or 1 (grey)")
    if len(s.mean) != s.in_chans or len(s.std) != s.in_chans:
        problems.append(f"mean/std: need {s.in_chans} values each, got {len(s.mean)} and {len(s.std)}")
    if any(v <= 0 for v in s.std):
        problems.append(f"std: values must be > 0, got {list(s.std)}")
    if s.pool not in POOLS:
        problems.append(f"pool: {s.pool!r}; valid: {', '.join(POOLS)}")
    if not s.gem_p > 0:
        problems.append(f"gem_p: {s.gem_p}; must be > 0 (3.0 is the usual value)")
    if not s.gem_eps > 0:
        problems.append(f"gem_eps: {s.gem_eps}; must be > 0")
    if s.stages not in (1, 2):
        problems.append(f"stages: {s.stages}; use 1 (last feature map) or 2 (last two stages)")
    if s.neck not in NECKS:
        problems.append(f"neck: {s.neck!r}; valid: {', '.join(NECKS)}")
    if s.neck == "linear_bn" and s.embed_dim is None:
        problems.append("embed_dim: required with neck='linear_bn' (e.g. 512)")
    if s.embed_dim is not None and s.embed_dim < 1:
        problems.append(f"embed_dim: {s.embed_dim}; must be >= 1")
    if s.interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation: {s.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    if s.preprocess not in PREPROCESS_VERSIONS:
        problems.append(f"preprocess: {s.preprocess!r}; this whalesub knows {', '.join(PREPROCESS_VERSIONS)} "
                        "(upgrade whalesub to use this model)")
    if not 0 <= s.box_margin <= 2:
        problems.append(f"box_margin: {s.box_margin}; use a fraction of the box size in [0, 2]")
    if not 0 <= s.box_conf <= 1:
        problems.append(f"box_conf: {s.box_conf}; use a detector confidence in [0, 1]")
    return problems


def _timm_mean_std(backbone: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's pretrained mean/std from timm's registry (no model is built, nothing downloaded)."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    if cfg is None:
        if not timm.is_model(backbone):
            import difflib

            close = difflib.get_close_matches(backbone, timm.list_models(), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise ConfigError(f"backbone: unknown timm model {backbone!r}{hint}")
        raise ConfigError(f"backbone: timm has no pretrained config for {backbone!r}; give mean and std")
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if in_chans == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std
