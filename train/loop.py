"""The training step, the epoch and validation: a plain PyTorch loop.

- :class:`TrainModel`: EmbeddingNet + sub-center ArcFace head(s) (modules of the model, saved in
  checkpoints). :func:`build_optimizer`: AdamW, backbone at ``lr``, neck and heads at
  ``lr * head_lr_mult``, no weight decay on 1-D parameters. :class:`WarmupCosine`: per-step linear
  warmup then cosine to ``min_lr_ratio``.
- :func:`epoch_batches`: the seeded data order of one epoch for one rank (a function of seed and
  epoch only, so a resumed run skips exactly the batches it already did).
- :func:`train_epoch`: autocast (bf16/fp16), GradScaler (fp16), gradient accumulation and
  clipping, a NaN/inf guard, mid-epoch checkpoints through a callback.
- :func:`embed_set` and :func:`score`: the validation embeds with THE inference preprocessing and
  ranks with whalesub.ranking.rank / whalesub.ranking.threshold / whalesub.ranking.metric (nothing
  re-implemented).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from whalesub.core.errors import WhalesubError
from whalesub.ranking import metric, rank
from whalesub.ranking import threshold as thr
from whalesub.ranking.vectors import average_views

log = logging.getLogger("train")


class TrainingDiverged(WhalesubError):
    """The loss became NaN or infinite."""


class TrainModel(nn.Module):
    """net: EmbeddingNet; head: ArcMarginHead over individuals; species_head: optional ArcMarginHead."""

    def __init__(self, net: nn.Module, head: nn.Module, species_head: nn.Module | None = None):
        super().__init__()
        self.net, self.head, self.species_head = net, head, species_head

    def forward(self, x: torch.Tensor, y: torch.Tensor, ys: torch.Tensor):
        """x [B,3,S,S], y [B] int64, ys [B] int64 -> (id logits [B,C] f32, species logits [B,S] | None)."""
        f = self.net.features(x)
        sp = self.species_head(f, ys) if self.species_head is not None else None
        return self.head(f, y), sp

    def head_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("net.")}


def build_optimizer(model: TrainModel, cfg) -> torch.optim.Optimizer:
    """AdamW with four groups: backbone / rest (neck, GeM, heads) x decay / no decay (1-D params)."""
    groups: dict[tuple[bool, bool], list] = {(b, d): [] for b in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(name.startswith("net.backbone."), p.ndim > 1)].append(p)
    out = []
    for (backbone, decay), params in groups.items():
        if params:
            out.append({"params": params, "lr": cfg.lr * (1.0 if backbone else cfg.head_lr_mult),
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "name": ("backbone" if backbone else "head") + ("" if decay else "_no_decay")})
    return torch.optim.AdamW(out)


class WarmupCosine:
    """LR multiplier per optimizer step: linear warmup to 1, then cosine down to ``min_ratio``."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = max(1, total_steps), max(0, warmup_steps), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  max_batches: int = 0) -> list[list[int]]:
    """This rank's batches of row indices for ``epoch``: a seeded permutation padded to a multiple of
    ``world`` (as DistributedSampler), strided by rank, cut into full batches (the last partial batch
    is dropped unless it is the only one)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    perm += perm[: (-len(perm)) % world]
    mine = perm[rank::world]
    n_full = max(1, len(mine) // batch_size)
    batches = [mine[i * batch_size:(i + 1) * batch_size] for i in range(n_full)]
    return batches[:max_batches] if max_batches else batches


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: python/numpy seeds from torch's per-worker seed (base seed + id)."""
    import random

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def autocast_dtype(amp: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def check_finite_weights(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_epoch(ddp_model: nn.Module, model: TrainModel, criterion: nn.Module, loader, n_batches: int,
                start_batch: int, opt, sched, scaler, cfg, device: torch.device, state: dict,
                on_step: Callable[[int], None], distributed: bool) -> None:
    """Run the remaining batches of one epoch; updates ``state`` (global_step, loss_sum, loss_count).

    ``on_step(batches_done)`` is called after each optimizer step (mid-epoch checkpoints).
    """
    import contextlib

    from tqdm.auto import tqdm

    ddp_model.train()
    dtype = autocast_dtype(cfg.amp)
    accum = cfg.grad_accum
    bar = tqdm(total=n_batches, initial=start_batch, desc=f"epoch {state['epoch'] + 1}", unit="batch",
               disable=None if state.get("is_main", True) else True, leave=False)
    for b, (x, y, ys, _) in enumerate(loader, start=start_batch):
        x, y, ys = x.to(device, non_blocking=True), y.to(device), ys.to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync = (b + 1) % accum == 0 or b + 1 == n_batches
        ctx = ddp_model.no_sync() if distributed and not sync else contextlib.nullcontext()
        with ctx:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits, sp_logits = ddp_model(x, y, ys)
                loss, _parts = criterion(logits, y, sp_logits, ys)
            if cfg.debug_nan_at_step >= 0 and state["global_step"] + 1 >= cfg.debug_nan_at_step:
                loss = loss * float("nan")
            loss_value = float(loss.item())  # the step's one host sync, before backward is queued
            diverged = not math.isfinite(loss_value)
            if distributed:  # every rank stops together
                bad = torch.tensor([float(diverged)], device=loss.device)  # on the loss device (nccl)
                torch.distributed.all_reduce(bad)
                diverged = bad.item() > 0
            if diverged:
                raise TrainingDiverged(
                    f"loss is {loss_value} at epoch {state['epoch'] + 1}, batch {b + 1}/{n_batches} "
                    f"(optimizer step {state['global_step'] + 1}); the run stopped. {state['last_good']} "
                    "To fix: lower lr, set clip_grad (e.g. 1.0), or use amp=bf16 instead of fp16.")
            scaler.scale(loss / accum).backward()
        state["loss_sum"] += loss_value
        state["loss_count"] += 1
        if sync:
            if cfg.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            state["global_step"] += 1
            if state["global_step"] % max(1, cfg.log_every_steps) == 0:
                log.info("epoch %d step %d batch %d/%d loss %.4f lr %.3g", state["epoch"] + 1,
                         state["global_step"], b + 1, n_batches, state["loss_sum"] / state["loss_count"],
                         opt.param_groups[0]["lr"])
            on_step(b + 1)
        if cfg.debug_sleep_per_step:
            time.sleep(cfg.debug_sleep_per_step)
        bar.update(1)
        bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_count']:.3f}")
    bar.close()


@torch.no_grad()
def embed_set(net: nn.Module, dataset, cfg, device: torch.device, rank: int = 0,
              world: int = 1) -> np.ndarray:
    """Embeddings of every item of an EvalSet: [N, V, D] float32 (V views), gathered from all ranks."""
    from torch.utils.data import DataLoader, Subset

    net.eval()
    mine = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, mine), batch_size=cfg.val_batch_size, shuffle=False,
                        num_workers=cfg.num_workers, worker_init_fn=seed_worker)
    dtype = autocast_dtype(cfg.amp)
    out, idx = [], []
    for views, i in loader:
        b, v = views.shape[:2]
        x = views.flatten(0, 1).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            e = net(x).float()
        out.append(e.view(b, v, -1).cpu().numpy())
        idx.append(i.numpy())
    vecs = np.concatenate(out) if out else np.zeros((0, 1, net.embed_dim), np.float32)
    idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (idx, vecs))
        idx = np.concatenate([p[0] for p in parts])
        vecs = np.concatenate([p[1] for p in parts])
    full = np.empty((len(dataset),) + vecs.shape[1:], np.float32)
    full[idx] = vecs
    return full


def score(gallery_views: np.ndarray, gallery_labels, query_views: np.ndarray, truths, grid, k: int,
          threshold: float | None = None) -> dict:
    """MAP@5 of queries against a gallery with whalesub's ranking, over a threshold grid.

    gallery_views [N, V, D] (every view is a neighbour), gallery_labels [N] str, query_views [Q, V, D],
    truths [Q] str (``new_individual`` for new animals). Returns the best grid threshold and the
    breakdown (whalesub.ranking.metric.score_breakdown) at ``threshold`` if given, else at the best one.
    """

    v = gallery_views.shape[1]
    gallery = np.ascontiguousarray(gallery_views.reshape(-1, gallery_views.shape[-1]))
    codes, classes = rank.encode_labels(np.repeat(np.asarray(gallery_labels, dtype=str), v))
    cand_l, cand_s = rank.rank_queries(gallery, codes, average_views(query_views), k=k)
    search = thr.grid_search(cand_l, cand_s, thr.truth_codes(truths, classes), np.asarray(grid))
    t = search.best_threshold if threshold is None else threshold
    preds = rank.decode_labels(rank.insert_new_individual(cand_l, cand_s, t), classes)
    out = {"grid_best_map5": search.best_map5, "grid_best_threshold": search.best_threshold,
           "threshold": t, **metric.score_breakdown(preds, list(truths))}
    out["all_new_baseline"] = float(np.mean(np.asarray(truths) == "new_individual"))
    return out
