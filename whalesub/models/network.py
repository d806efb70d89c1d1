"""``EmbeddingNet``: timm backbone -> GeM -> neck -> L2-normalised embedding.

Checkpoint format accepted by :func:`load_embedding_net` (training writes it this way):

1. A torch file (``.pt``/``.pth``/``.ckpt``) holding a dict with
   ``"model"``: ``EmbeddingNet.state_dict()`` (keys ``backbone.*``, ``pool.*``, ``neck.*``; the
   ArcFace heads live under another key such as ``"heads"``, never inside ``"model"``) and
   ``"spec"``: ``ModelSpec.to_dict()``. Other keys (optimizer, scheduler, epoch, config...) are
   ignored. Every value must be plain data or tensors (``torch.load(weights_only=True)``).
   A ``model_spec.json`` beside it, if present, must agree with ``"spec"``.
2. A bare state dict (torch file, or ``.safetensors``) with ``model_spec.json`` in the same folder.

A whole-state-dict prefix ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) is stripped. Loading
is strict: missing or unexpected keys, or shape mismatches, raise ConfigError listing them.
:func:`save_embedding_net` writes format 1 plus the JSON beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from whalesub.core.atomic import atomic_open
from whalesub.core.errors import ConfigError, first_few
from whalesub.models.spec import SPEC_FILENAME, ModelSpec, weights_digest


class GeM(nn.Module):
    """Generalised-mean pooling: [B, C, H, W] -> [B, C] float32, (mean(clamp(x, eps)^p))^(1/p).

    Always computed in FP32, also under autocast: cubing activations overflows FP16 above ~40.
    p = 1 is average pooling; large p approaches max pooling. Exports to ONNX as
    Clip/Pow/GlobalAveragePool/Pow.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False):
        super().__init__()
        self.eps = float(eps)
        self.learnable = bool(learnable)
        if learnable:
            self.p = nn.Parameter(torch.tensor([float(p)]))
        else:
            self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().clamp(min=self.eps)
            if self.learnable:
                p = self.p.float()
                return F.adaptive_avg_pool2d(x.pow(p.view(1, 1, 1, 1)), 1).pow(1.0 / p).flatten(1)
            return F.adaptive_avg_pool2d(x.pow(self.p), 1).pow(1.0 / self.p).flatten(1)

    def extra_repr(self) -> str:
        p = f"{self.p.item():.4f} (learnable)" if self.learnable else f"{self.p:.4f}"
        return f"p={p}, eps={self.eps}"


class EmbeddingNet(nn.Module):
    """timm backbone + pooling + neck; ``forward`` gives unit-length FP32 embeddings.

    Args:
        spec: the network and input description (see :class:`ModelSpec`).
        pretrained: load ImageNet weights from ``weights_file`` (a local timm checkpoint, via
            ``pretrained_cfg_overlay=dict(file=...)``). Never downloads.
        weights_file: local pretrained weights; implies ``pretrained=True``.

    Input ``x``: [B, in_chans, S, S] float32 (or under autocast), normalised by
    :func:`whalesub.data.image.to_model_input`. ``features(x)`` -> [B, embed_dim] float32, the neck
    output before normalisation (the ArcFace heads use it); ``forward(x)`` -> the same,
    L2-normalised. ``self.spec`` is the given spec with ``embed_dim`` resolved.
    """

    def __init__(self, spec: ModelSpec, pretrained: bool = False,
                 weights_file: str | os.PathLike | None = None):
        super().__init__()
        import timm

        kwargs: dict = {"in_chans": spec.in_chans}
        if weights_file is not None:
            weights_file = Path(weights_file)
            if not weights_file.is_file():
                raise ConfigError(f"pretrained weights file not found: {weights_file}")
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
        elif pretrained:
            raise ConfigError(
                f"pretrained=True needs a local weights file for {spec.backbone!r} "
                "(whalesub never downloads): "
                "download it once (e.g. timm.create_model(name, pretrained=True) on a machine with internet, "
                "then torch.save(model.state_dict(), 'backbone.pth')) and pass weights_file"
            )
        if spec.stages == 1:
            kwargs |= {"num_classes": 0, "global_pool": ""}
        else:
            kwargs |= {"features_only": True, "out_indices": (-2, -1)}
        src = f" with weights {weights_file}" if weights_file else ""
        try:
            with _StateDictLoads() as loads:
                self.backbone = timm.create_model(spec.backbone, pretrained=pretrained, **kwargs)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"cannot build timm backbone {spec.backbone!r} (stages={spec.stages}){src}: "
                              f"{exc}; check the name (timm.list_models), that the architecture supports "
                              "features_only for stages=2, and that the weights file fits it") from None
        if pretrained:
            check_pretrained_load(loads.results, spec, weights_file)
        if spec.stages == 1:
            dims = [int(self.backbone.num_features)]
        else:
            dims = [int(c) for c in self.backbone.feature_info.channels()]
        fmt = getattr(self.backbone, "output_fmt", "NCHW")
        self._nhwc = getattr(fmt, "value", fmt) == "NHWC"  # Swin, MambaOut... give [B, H, W, C] maps
        self.pooled_dims = dims
        pooled = sum(dims)
        # The attribute names backbone / pool / neck are part of the checkpoint format, and export's
        # FP16 conversion finds the FP32 tail by the ONNX node scope "/pool/".
        if spec.pool == "gem":
            self.pool = GeM(spec.gem_p, spec.gem_eps, spec.gem_learnable)
        else:
            self.pool = _AvgPool()
        if spec.neck == "bn":
            if spec.embed_dim not in (None, pooled):
                raise ConfigError(f"embed_dim={spec.embed_dim} but neck='bn' keeps the pooled size {pooled} "
                                  f"of {spec.backbone} (stages={spec.stages}); "
                                  "use neck='linear_bn' to project, "
                                  "or set embed_dim to null")
            self.neck = nn.Sequential(nn.BatchNorm1d(pooled))
        else:
            self.neck = nn.Sequential(nn.Linear(pooled, spec.embed_dim, bias=False),
                                      nn.BatchNorm1d(spec.embed_dim))
        self.spec = spec if spec.embed_dim is not None else spec.replace(embed_dim=pooled)
        self.embed_dim = self.spec.embed_dim

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + pooling: [B, C, S, S] -> [B, sum(pooled_dims)] float32."""
        maps = [self.backbone.forward_features(x)] if self.spec.stages == 1 else self.backbone(x)
        pooled = []
        for fmap in maps:
            if fmap.ndim != 4:
                raise ConfigError(f"backbone {self.spec.backbone!r} gives {fmap.ndim}-D features; "
                                  "EmbeddingNet needs a spatial feature map ([B, C, H, W] or [B, H, W, C])")
            pooled.append(self.pool(fmap.permute(0, 3, 1, 2) if self._nhwc else fmap))
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Neck output before normalisation: [B, embed_dim] float32 (neck runs in FP32)."""
        pooled = self.pooled(x)
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.neck(pooled.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings: [B, embed_dim] float32."""
        f = self.features(x)
        with torch.autocast(device_type=f.device.type, enabled=False):
            return F.normalize(f.float(), dim=1, eps=1e-12)


class _StateDictLoads:
    """Record the ``(missing_keys, unexpected_keys)`` of every ``Module.load_state_dict`` call made
    while timm builds a pretrained backbone: the keys torch itself compared, not timm's log text."""

    def __enter__(self) -> _StateDictLoads:
        self.results: list[tuple[list[str], list[str]]] = []
        self._real = real = nn.Module.load_state_dict
        results = self.results

        def recording(module, state_dict, strict=True, assign=False):
            out = real(module, state_dict, strict=strict, assign=assign)
            results.append((list(out.missing_keys), list(out.unexpected_keys)))
            return out

        nn.Module.load_state_dict = recording
        return self

    def __exit__(self, *exc) -> None:
        nn.Module.load_state_dict = self._real


def check_pretrained_load(results: list[tuple[list[str], list[str]]], spec: ModelSpec,
                          weights_file) -> None:
    """Raise ConfigError unless timm's load of ``weights_file`` filled every backbone tensor.

    ``results``: one ``(missing_keys, unexpected_keys)`` per ``load_state_dict`` call (shape
    mismatches already raised inside torch); the classifier's own keys (timm's pretrained config
    names it) may be missing. timm loads with ``strict=False`` when it drops the
    classifier (``num_classes=0``) or builds a features-only model, so a wrong file would otherwise
    leave random weights. Missing keys are always an error; unexpected keys are an error for
    ``stages=1`` (the classifier is removed before loading, so any extra tensor means another
    architecture) and tolerated for ``stages=2`` (the feature wrapper drops the head layers).
    """
    fix = "pass the file saved from this architecture (torch.save(timm_model.state_dict(), path))"
    if not results:
        raise ConfigError(f"timm built {spec.backbone!r} without loading {weights_file}: no weights were "
                          f"loaded; {fix}")
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.backbone)
    heads = (cfg.classifier if cfg is not None else None) or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    # timm deletes the classifier's tensors from the file before loading a model built without one
    missing = [k for miss, _ in results for k in miss if not any(k.startswith(h + ".") for h in heads)]
    unexpected = [k for _, extra in results for k in extra] if spec.stages == 1 else []
    problems = []
    if missing:
        problems.append(f"{len(missing)} backbone tensor(s) missing from the file: {first_few(missing, 8)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) of the file have no place in the backbone: "
                        f"{first_few(unexpected, 8)}")
    if problems:
        raise ConfigError(f"pretrained weights {weights_file} do not fit {spec.backbone!r} "
                          f"(stages={spec.stages}); {fix}", problems=problems)


class _AvgPool(nn.Module):
    """Global average pooling in FP32: [B, C, H, W] -> [B, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.adaptive_avg_pool2d(x.float(), 1).flatten(1)


def build_embedding_net(spec: ModelSpec, pretrained: bool = False,
                        weights_file: str | os.PathLike | None = None) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` (same arguments)."""
    return EmbeddingNet(spec, pretrained=pretrained, weights_file=weights_file)


def save_embedding_net(model: EmbeddingNet, path: str | os.PathLike, **extra) -> Path:
    """Write ``{"model": state_dict, "spec": dict, "weights_digest": str, **extra}`` atomically,
    plus ``model_spec.json`` in the same folder. Returns the checkpoint path."""
    path = Path(path)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": sd, "spec": model.spec.to_dict(), "weights_digest": weights_digest(sd), **extra}
    with atomic_open(path, "wb") as fh:  # a file object: a full disk raises an OSError naming the file
        torch.save(payload, fh)
    model.spec.save(path.parent / SPEC_FILENAME)
    return path


def load_embedding_net(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                       key: str = "model") -> tuple[EmbeddingNet, ModelSpec]:
    """Load one of our checkpoints strictly (format: module docstring) -> (model in eval mode, spec)."""
    return embedding_net_from(read_checkpoint(path, map_location), path, map_location, key)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw dict of a checkpoint file (torch or ``.safetensors``); ConfigError when unreadable."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; pass the checkpoint file inside it (e.g. {path}/best.pt)")
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device=str(map_location))
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip/header/unsupported-global errors all mean "not our checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        why = type(exc).__name__ + (f": {first}" if first else "")
        kind = "safetensors file" if path.suffix == ".safetensors" else "torch file of plain data and tensors"
        raise ConfigError(f"cannot read checkpoint {path} ({why}): it is empty, truncated or not a {kind} "
                          "(see whalesub.models.network docstring); copy it again from the training "
                          "run") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def embedding_net_from(obj: dict, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                       key: str = "model") -> tuple[EmbeddingNet, ModelSpec]:
    """(model in eval mode, spec) from ``obj`` = :func:`read_checkpoint` of ``path``, loaded strictly."""
    path = Path(path)
    beside = path.parent / SPEC_FILENAME
    if key in obj and isinstance(obj[key], dict):
        state, spec_data = obj[key], obj.get("spec")
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, spec_data = obj, None
    else:
        raise ConfigError(f"checkpoint {path} has no {key!r} state dict; top-level keys: {sorted(obj)[:20]}")
    if spec_data is not None:
        spec = ModelSpec.from_dict(spec_data, source=f"{path} ['spec']")
        if beside.is_file():
            other = ModelSpec.load(beside)
            if other.to_dict() != spec.to_dict():
                diff = [k for k in spec.to_dict() if spec.to_dict()[k] != other.to_dict()[k]]
                raise ConfigError(f"{beside} disagrees with the spec inside {path} on {', '.join(diff)}; "
                                  "remove or fix the stale JSON")
    elif beside.is_file():
        spec = ModelSpec.load(beside)
    else:
        raise ConfigError(f"checkpoint {path} carries no 'spec' and there is no {SPEC_FILENAME} beside it")
    model = EmbeddingNet(spec)
    load_state_strict(model, state, source=str(path))
    return model.to(map_location).eval(), model.spec


def load_state_strict(model: nn.Module, state: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with a readable ConfigError listing every mismatch."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {first_few(missing, 8)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {first_few(unexpected, 8)}")
    problems += shapes[:8]
    if problems:
        raise ConfigError(f"checkpoint {source} does not match the network of its spec "
                          f"({getattr(model, 'spec', None) and model.spec.backbone}); nothing was loaded",
                          problems=problems)
    model.load_state_dict(state, strict=True)
