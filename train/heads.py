"""Margin heads for metric learning: ArcFace, sub-center ArcFace, per-class dynamic margins.

The class-centre matrix is a module of the training model (not hidden in the loss), so it is
saved in checkpoints, gets its own learning rate (the head is usually trained at ~10x the
backbone's) and can be read back as class centres for scoring.

Conventions (all angles and margins are in RADIANS; pytorch-metric-learning's ``ArcFaceLoss``
takes degrees):

- ``weight`` has shape ``[n_classes * k, in_features]``; rows ``c*k .. c*k+k-1`` are the k
  sub-centres of class ``c`` (the layout of the Google-Landmark / Happywhale sub-center code).
- cosine of a class = max over its k sub-centres of cos(embedding, sub-centre).
- training logit of the target class = s * cos(theta + m_y) while theta <= pi - m_y, else
  s * (cos(theta) - m_y * sin(m_y)) (insightface's ``th``/``mm`` fallback, which keeps the
  logit monotonically decreasing in theta; identical to pytorch-metric-learning's branch);
  other classes keep s * cos(theta).
- Everything is computed in float32 (float64 when the inputs or the weight are float64), with
  autocast disabled inside, so bf16/fp16 training cannot overflow or lose the margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whalesub.ranking.vectors import sub_centre_means

from .config import HAPPYWHALE_MARGIN  # the one source of the default margin constants


def dynamic_margins(
    class_counts: Sequence[int] | np.ndarray | torch.Tensor,
    a: float = HAPPYWHALE_MARGIN["a"],
    b: float = HAPPYWHALE_MARGIN["b"],
    c: float = HAPPYWHALE_MARGIN["c"],
) -> torch.Tensor:
    """Per-class ArcFace margins ``m_c = a * n_c ** b + c`` (radians) from class counts.

    class_counts: [n_classes] integer counts of training images per class (all >= 1).
    Returns a float64 tensor [n_classes]. Rare classes get larger margins when ``b < 0``.
    """
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).reshape(-1)
    if counts.numel() == 0:
        raise ValueError("dynamic_margins: class_counts is empty")
    bad = torch.nonzero(~(counts >= 1)).reshape(-1)
    if bad.numel():
        raise ValueError(
            f"dynamic_margins: every class needs >= 1 training image; classes {bad[:5].tolist()} "
            f"have counts {counts[bad[:5]].tolist()} (build the label index from the training part only)"
        )
    return a * counts.pow(b) + c


def class_counts(labels: Sequence[int] | np.ndarray | torch.Tensor, n_classes: int) -> np.ndarray:
    """Images per class: labels [N] int codes in [0, n_classes) -> counts [n_classes] int64."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"class_counts: labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}"
        )
    return np.bincount(labels, minlength=n_classes)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class ArcMarginHead(nn.Module):
    """(Sub-center) ArcFace head: embeddings [B, in_features] -> logits [B, n_classes].

    Args:
        in_features: embedding size D (the neck output, before or after L2 normalisation;
            the head normalises anyway).
        n_classes: number of classes C (>= 1).
        k: sub-centres per class (1 = plain ArcFace; 2-3 for noisy, multi-modal classes).
        s: logit scale.
        m: additive angular margin in radians: a float, or a per-class sequence/tensor [C]
            (see :func:`dynamic_margins`).
        easy_margin: apply the margin only where cos(theta) > 0 and keep cos(theta) elsewhere,
            instead of the default ``th``/``mm`` fallback for theta > pi - m.
        eps: cosines are clamped to [-1+eps, 1-eps] before sqrt, so gradients stay finite.
    """

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        k: int = 1,
        s: float = 30.0,
        m: float | Sequence[float] | np.ndarray | torch.Tensor = 0.5,
        easy_margin: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        if in_features < 1 or n_classes < 1 or k < 1:
            raise ValueError(
                f"ArcMarginHead: need in_features, n_classes, k >= 1, got {in_features}, {n_classes}, {k}"
            )
        if not s > 0:
            raise ValueError(f"ArcMarginHead: scale s must be > 0, got {s}")
        self.in_features, self.n_classes, self.k = int(in_features), int(n_classes), int(k)
        self.s, self.easy_margin, self.eps = float(s), bool(easy_margin), float(eps)
        self.weight = nn.Parameter(torch.empty(self.n_classes * self.k, self.in_features))
        self.reset_parameters()
        margins = self._check_margins(m)
        # float64 so tiny margins survive; persistent so a resumed run scores with the same margins.
        self.register_buffer("margins", margins)

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(D), 1/sqrt(D)) init, as in the Google-Landmark / Happywhale heads."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        m = self.margins
        span = f"{m.min().item():.4f}..{m.max().item():.4f}" if m.numel() > 1 else f"{m.item():.4f}"
        return (
            f"in_features={self.in_features}, n_classes={self.n_classes}, k={self.k}, s={self.s}, "
            f"m={span}, easy_margin={self.easy_margin}"
        )

    def _check_margins(self, m: float | Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(m, torch.Tensor):
            m = m.detach().cpu().numpy()
        margins = torch.as_tensor(np.asarray(m, dtype=np.float64), dtype=torch.float64)
        if margins.ndim == 0:
            margins = margins.expand(self.n_classes).clone()
        if margins.shape != (self.n_classes,):
            raise ValueError(
                f"ArcMarginHead: m must be a float or [{self.n_classes}] margins, got {tuple(margins.shape)}"
            )
        if not bool(((margins >= 0) & (margins < math.pi / 2)).all()):
            raise ValueError("ArcMarginHead: margins must lie in [0, pi/2) radians (did you pass degrees?)")
        return margins

    def set_margins(self, m: float | Sequence[float] | np.ndarray | torch.Tensor) -> None:
        """Replace the margins (float or [C], radians) in place, e.g. after recounting classes."""
        self.margins.copy_(self._check_margins(m).to(self.margins.device))

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Class cosines [B, C] (max over sub-centres), float32 (float64 for float64 inputs)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dtype = _compute_dtype(embeddings, self.weight)
            x = F.normalize(embeddings.to(dtype), dim=1)
            w = F.normalize(self.weight.to(dtype), dim=1)
            cos = x @ w.t()
            if self.k > 1:
                cos = cos.view(-1, self.n_classes, self.k).amax(dim=2)
            return cos

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """embeddings [B, D] (any float dtype) and labels [B] int64 in [0, C) -> logits [B, C].

        With labels: s * cosine with the angular margin on each row's target class (training).
        Without labels: s * cosine, no margin (validation / inference; the argmax is the same
        as that of :meth:`cosine`). Logits are float32 (float64 for float64 inputs).
        """
        cos = self.cosine(embeddings)
        if labels is None:
            return cos * self.s
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            labels = labels.reshape(-1, 1).long()
            target = cos.gather(1, labels)  # [B, 1]
            m = self.margins.to(cos.dtype)[labels]  # [B, 1]
            cos_m, sin_m = torch.cos(m), torch.sin(m)
            c = target.clamp(-1.0 + self.eps, 1.0 - self.eps)
            sin = torch.sqrt(1.0 - c * c)
            phi = c * cos_m - sin * sin_m  # cos(theta + m)
            if self.easy_margin:
                phi = torch.where(c > 0, phi, c)
            else:
                th = torch.cos(math.pi - m)  # theta <= pi - m  <=>  cos(theta) >= cos(pi - m)
                mm = torch.sin(math.pi - m) * m  # = sin(m) * m
                phi = torch.where(c >= th, phi, c - mm)
            return (cos * self.s).scatter_(1, labels, phi * self.s)

    @torch.no_grad()
    def sub_centres(self) -> torch.Tensor:
        """Raw L2-normalised sub-centres [C, k, D] float32 (detached)."""
        w = F.normalize(self.weight.detach().float(), dim=1)
        return w.view(self.n_classes, self.k, self.in_features)

    @torch.no_grad()
    def class_centres(self) -> torch.Tensor:
        """One unit vector per class [C, D] float32: the normalised mean of its normalised
        sub-centres (equal to the centre itself when k = 1). Used for class-centre scoring;
        for max-over-sub-centres scoring use :meth:`sub_centres` instead."""
        w = self.weight.detach().float().cpu().numpy()
        return torch.from_numpy(sub_centre_means(w, self.n_classes)).to(self.weight.device)

    @torch.no_grad()
    def init_from_embeddings(
        self, embeddings: torch.Tensor, labels: torch.Tensor, noise: float = 0.01
    ) -> int:
        """Set each class's sub-centres to its mean normalised embedding (+ small noise for k > 1).

        embeddings [N, D], labels [N] int64. Classes without embeddings keep their current
        weights. Returns the number of classes initialised. Speeds up fine-tuning a pretrained
        embedder on new classes.
        """
        x = F.normalize(embeddings.detach().float(), dim=1).to(self.weight.device)
        labels = labels.reshape(-1).long().to(self.weight.device)
        sums = torch.zeros(self.n_classes, self.in_features, device=x.device).index_add_(0, labels, x)
        seen = torch.bincount(labels, minlength=self.n_classes) > 0
        means = F.normalize(sums, dim=1).repeat_interleave(self.k, dim=0)
        if self.k > 1:  # distinct sub-centres, else they stay identical forever
            means = F.normalize(means + noise * torch.randn_like(means), dim=1)
        rows = seen.repeat_interleave(self.k)
        self.weight[rows] = means[rows].to(self.weight.dtype)
        return int(seen.sum())


class MultiHeadLoss(nn.Module):
    """id_weight * CE(individual logits) + species_weight * CE(species logits), label smoothing.

    The 1st-place Happywhale loss is ``id_weight=r, species_weight=1-r`` (their loss_id_ratio r).

    forward(id_logits [B, C], id_labels [B], species_logits [B, S] | None, species_labels [B] | None)
    -> (loss scalar float32, parts dict of detached scalars: 'loss_id', 'loss_species').
    Species rows labelled ``ignore_index`` (default -100, e.g. unknown species) are skipped.
    """

    def __init__(
        self,
        species_weight: float = 0.0,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        id_weight: float = 1.0,
    ):
        super().__init__()
        if id_weight <= 0 or species_weight < 0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"MultiHeadLoss: need id_weight > 0, species_weight >= 0, 0 <= label_smoothing < 1, got "
                f"{id_weight}, {species_weight}, {label_smoothing}"
            )
        self.species_weight, self.label_smoothing = float(species_weight), float(label_smoothing)
        self.ignore_index, self.id_weight = int(ignore_index), float(id_weight)

    def forward(
        self,
        id_logits: torch.Tensor,
        id_labels: torch.Tensor,
        species_logits: torch.Tensor | None = None,
        species_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=id_logits.device.type, enabled=False):
            loss_id = F.cross_entropy(
                id_logits.float() if id_logits.dtype != torch.float64 else id_logits,
                id_labels.long(),
                label_smoothing=self.label_smoothing,
            )
            loss, parts = self.id_weight * loss_id, {"loss_id": loss_id.detach()}
            if species_logits is not None and self.species_weight > 0:
                if species_labels is None:
                    raise ValueError("MultiHeadLoss: species_logits given without species_labels")
                logits = species_logits if species_logits.dtype == torch.float64 else species_logits.float()
                loss_sp = F.cross_entropy(
                    logits,
                    species_labels.long(),
                    label_smoothing=self.label_smoothing,
                    ignore_index=self.ignore_index,
                )
                loss = loss + self.species_weight * loss_sp
                parts["loss_species"] = loss_sp.detach()
            return loss, parts
