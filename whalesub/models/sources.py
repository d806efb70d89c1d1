"""What ``whalesub export`` and ``embed --backend torch`` read: a checkpoint or a training run folder.

A run folder resolves to its best checkpoint (``best.pt``, else ``last.pt``; see :data:`CANDIDATES`),
also inside its only ``fold*/`` subfolder (train writes ``runs/NAME/fold0/best.pt``).
The embedding network is loaded strictly by :func:`whalesub.models.network.load_embedding_net`; the ArcFace
head, when present, gives the class-centre matrix (:func:`class_centres`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whalesub.core.errors import ConfigError, WhalesubError
from whalesub.ranking.vectors import sub_centre_means

log = logging.getLogger(__name__)

CANDIDATES = ("best.pt", "checkpoint_best.pt", "model_best.pt", "last.pt", "checkpoint_last.pt", "model.pt")


@dataclass
class Source:
    """A loaded embedding network (eval, CPU, FP32), its spec and the raw checkpoint dict."""

    path: Path
    net: Any
    spec: Any
    checkpoint: dict = field(default_factory=dict, repr=False)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best checkpoint of a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        manifest = path / "export.json"
        if manifest.is_file():  # an export folder: its source checkpoint, if still there
            import json

            source = Path(json.loads(manifest.read_text(encoding="utf-8")).get("source", ""))
            if source.exists() and source.resolve() != path.resolve():
                return resolve_checkpoint(source)
            raise WhalesubError(f"{path} is an ONNX export folder whose checkpoint {source} is gone; "
                                "use --backend onnx, or pass the checkpoint for --backend torch")
        for name in CANDIDATES:
            for found in (path / name, path / "checkpoints" / name):
                if found.is_file():
                    return found
        folds = sorted(p for p in path.glob("fold*")
                       if p.is_dir() and any((p / n).is_file() for n in CANDIDATES))
        if len(folds) == 1:  # a training run folder with one fold: runs/NAME/fold0/best.pt
            return resolve_checkpoint(folds[0])
        if folds:
            raise WhalesubError(f"{path} holds several folds ({', '.join(p.name for p in folds)}): export "
                                f"each one, e.g. `whalesub export {folds[0]} --out models/{folds[0].name}`")
        raise WhalesubError(f"{path}: no checkpoint found (looked for {', '.join(CANDIDATES)}, "
                            "checkpoints/<name> and fold*/<name>); pass the checkpoint file itself")
    raise WhalesubError(f"{path} does not exist: pass a training run folder or a checkpoint file")


def load_source(path: str | Path) -> Source:
    """Load the embedding network of a run folder or checkpoint file, strictly, on the CPU."""
    from whalesub.models.network import embedding_net_from, read_checkpoint

    ckpt = resolve_checkpoint(path)
    raw = read_checkpoint(ckpt, map_location="cpu")  # read once: the network and the heads/config
    net, spec = embedding_net_from(raw, ckpt, map_location="cpu")
    return Source(ckpt, net.float().eval(), spec, raw if ckpt.suffix != ".safetensors" else {})


def _head_weight(ckpt: dict):
    """The individual-id ArcFace weight [C * k, D] of a training checkpoint, or None.

    train/checkpoint.py stores ``heads`` = TrainModel.head_state(): ``head.weight`` (individuals),
    ``species_head.weight`` (species, not used here), with the row labels in ``classes``.
    """
    heads = ckpt.get("heads")
    if not isinstance(heads, dict):
        return None
    w = heads.get("head.weight")
    return w if w is not None and getattr(w, "ndim", 0) == 2 else None


def class_centres(src: Source) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(ids [C] str individual_id, centres [C, D] float32 unit rows, info) or None without a head."""
    weight = _head_weight(src.checkpoint)
    labels = src.checkpoint.get("classes")
    if weight is None or labels is None:
        log.info("%s: no ArcFace head with class labels in the checkpoint: no class_centres.npz", src.path)
        return None
    labels = [str(x) for x in labels]
    w = weight.detach().float().cpu().numpy()
    if w.shape[1] != src.spec.embed_dim:
        raise WhalesubError(f"{src.path}: head weight has D={w.shape[1]} but the embedding has "
                            f"D={src.spec.embed_dim}; the checkpoint is inconsistent")
    try:
        centres = sub_centre_means(w, len(labels))
    except ValueError as exc:
        raise ConfigError(f"{src.path}: {exc}") from None
    k = w.shape[0] // len(labels)
    return np.asarray(labels, dtype=str), centres, {"sub_centres": k, "reduce": "normalised mean of "
                                                   "normalised sub-centres, renormalised"}
