"""One fold's training session: build, resume, run epochs, validate, checkpoint, score the test set."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from whalesub.core.atomic import atomic_open, atomic_write_text
from whalesub.core.errors import ConfigError
from whalesub.models.network import EmbeddingNet
from whalesub.models.spec import ModelSpec, weights_digest
from whalesub.ranking.store import save_embeddings

from . import checkpoint as ckpt
from .config import config_to_dict
from .dataset import BoxTable, EvalSet, TrainSet, sample_seed
from .folds import split_fold
from .heads import ArcMarginHead, MultiHeadLoss, class_counts, dynamic_margins
from .loop import (
    TrainingDiverged,
    TrainModel,
    WarmupCosine,
    build_optimizer,
    check_finite_weights,
    embed_set,
    epoch_batches,
    score,
    seed_worker,
    train_epoch,
)
from .pseudo import add_pseudo_rows, read_pseudo, real_rows
from .resume import check_resume

log = logging.getLogger("train")


METRIC_COLUMNS = ["epoch", "global_step", "lr_backbone", "lr_head", "train_loss", "val_map5",
                  "val_threshold", "val_map5_known", "val_map5_new", "val_top1_known", "val_new_share",
                  "all_new_baseline", "improved"]


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.csv from the history rows (no wall-clock values: resumed == uninterrupted)."""
    def fmt(v):
        return "" if v is None else (repr(float(v)) if isinstance(v, float) else str(v))

    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(METRIC_COLUMNS) + "\n")
        for row in history:
            fh.write(",".join(fmt(row.get(c)) for c in METRIC_COLUMNS) + "\n")


def tb_writer(fold_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
        return None
    return SummaryWriter(str(fold_dir / "tb"), purge_step=purge_step)


class FoldSession:
    def __init__(self, cfg, k: int, df, boxes, fold_dir: Path, command: str, dist):
        import torch

        self.cfg, self.k, self.fold_dir, self.command, self.dist = cfg, k, fold_dir, command, dist
        self.device = dist.device
        self.train_df, self.valid_df = split_fold(df, k)
        self.train_df = add_pseudo_rows(self.train_df, read_pseudo(cfg, df, k), fold_dir, cfg, dist.main)
        self.has_val = len(self.valid_df) > 0
        self.boxes = BoxTable(boxes, cfg.box_mix, cfg.box_conf)
        self.boxes.eval_type(cfg.eval_box_type)  # a box rule validation cannot follow fails now, not later
        self.classes = sorted(self.train_df["individual_id"].unique())
        self.species_classes = sorted(self.train_df["species"].unique())
        y = self.train_df["individual_id"].map({c: i for i, c in enumerate(self.classes)}).to_numpy()
        ys = self.train_df["species"].map({c: i for i, c in enumerate(self.species_classes)}).to_numpy()
        torch.manual_seed(cfg.seed)
        spec = ModelSpec(backbone=cfg.backbone, image_size=cfg.image_size, embed_dim=cfg.embed_dim,
                         stages=cfg.stages, neck=cfg.neck, gem_p=cfg.gem_p, gem_learnable=cfg.gem_learnable,
                         box_margin=cfg.box_margin, box_conf=cfg.box_conf)
        net = EmbeddingNet(spec, pretrained=cfg.pretrained, weights_file=cfg.pretrained_file)
        self.spec = net.spec
        counts = class_counts(y, len(self.classes))
        margins = dynamic_margins(counts, cfg.margin_a, cfg.margin_b, cfg.margin_c)
        head = ArcMarginHead(net.embed_dim, len(self.classes), k=cfg.arc_k, s=cfg.arc_s, m=margins)
        sp_head = None
        if cfg.species_weight > 0 and len(self.species_classes) > 1:
            sp_m = dynamic_margins(class_counts(ys, len(self.species_classes)), cfg.margin_a, cfg.margin_b,
                                   cfg.margin_c)
            sp_head = ArcMarginHead(net.embed_dim, len(self.species_classes), k=1, s=cfg.arc_s, m=sp_m)
        self.model = TrainModel(net, head, sp_head).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = MultiHeadLoss(species_weight=cfg.species_weight, label_smoothing=cfg.label_smoothing)
        self.opt = build_optimizer(self.model, cfg)
        self.n_batches = len(epoch_batches(len(self.train_df), cfg.batch_size, cfg.seed, 0, dist.rank,
                                           dist.world, cfg.max_steps_per_epoch))
        steps = math.ceil(self.n_batches / cfg.grad_accum)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupCosine(steps * cfg.epochs, round(cfg.warmup_epochs * steps), cfg.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.train_set = TrainSet(self.train_df, cfg.image_dir, y, ys, self.spec, cfg, self.boxes)
        self.state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "loss_count": 0,
                      "history": [], "finished": False, "is_main": dist.main,
                      "early_stopping": {"best": None, "best_epoch": None, "bad_epochs": 0},
                      "last_good": "No checkpoint had been written yet."}
        self.last, self.best = fold_dir / ckpt.LAST, fold_dir / ckpt.BEST
        if self.last.is_file():
            self.resume()
        self.ddp = self.model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            if cfg.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    # --- checkpoints ------------------------------------------------------------------------------
    def resume(self) -> None:
        st = ckpt.load_checkpoint(self.last)
        if st["classes"] != self.classes:
            raise ConfigError(f"{self.last} was trained on other individuals than this fold's training part; "
                              "use another run_name or delete the fold folder to start again")
        check_resume(st, self.cfg, self.last)  # changed schedule: refused (train/resume.py)
        full = {f"net.{k}": v for k, v in st["model"].items()} | st["heads"]
        self.model.load_state_dict(full, strict=True)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        for key in ("epoch", "batch_in_epoch", "global_step", "loss_sum", "loss_count", "history",
                    "finished", "early_stopping"):
            self.state[key] = st[key]
        ckpt.restore_rng(st["rng"])
        self.state["last_good"] = f"The last good checkpoint is {self.last} (step {st['global_step']})."
        log.info("resumed from %s: %d epoch(s) done, batch %d of epoch %d, step %d", self.last,
                 st["epoch"], st["batch_in_epoch"], st["epoch"] + 1, st["global_step"])

    def checkpoint(self) -> dict:
        if not check_finite_weights(self.model):
            raise TrainingDiverged(f"weights became NaN/inf at step {self.state['global_step']}; not saving. "
                                   f"{self.state['last_good']} Lower lr or set clip_grad.")
        net_sd = {k: v.detach().cpu() for k, v in self.model.net.state_dict().items()}

        return {"model": net_sd, "spec": self.spec.to_dict(), "weights_digest": weights_digest(net_sd),
                "heads": {k: v.detach().cpu() for k, v in self.model.head_state().items()},
                "classes": self.classes, "species_classes": self.species_classes,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": ckpt.capture_rng(),
                "config": config_to_dict(self.cfg), "command": self.command, "fold": self.k,
                **{k: self.state[k] for k in ("epoch", "batch_in_epoch", "global_step", "loss_sum",
                                               "loss_count", "history", "finished", "early_stopping")}}

    def save_last(self, also_best: bool = False) -> None:
        state = self.checkpoint()  # every rank checks finiteness; rank 0 writes
        if self.dist.main:
            if also_best:  # best first: a crash between the two leaves last.pt older, never best.pt
                ckpt.save_checkpoint(self.best, state, self.spec)
                ckpt.copy_checkpoint(self.best, self.last)  # same bytes, serialised once
            else:
                ckpt.save_checkpoint(self.last, state, self.spec)
            self.state["last_good"] = (f"The last good checkpoint is {self.last} (epoch "
                                       f"{self.state['epoch']}, batch {self.state['batch_in_epoch']}, "
                                       f"step {self.state['global_step']}).")
        self.dist.barrier()

    # --- training ---------------------------------------------------------------------------------
    def fit(self) -> None:
        import torch
        from torch.utils.data import DataLoader

        cfg, st, main = self.cfg, self.state, self.dist.main
        if st["finished"]:
            log.info("fold %s already finished (%d epochs); nothing to train", self.k, st["epoch"])
            if main:  # a kill between the final last.pt and metrics.csv must not leave it stale
                write_metrics(self.fold_dir / "metrics.csv", st["history"])
            return
        log.info("fold %s: %d train images (%d individuals), %d validation images, %d batches/epoch, "
                 "device %s, world %d", self.k, len(self.train_df), len(self.classes), len(self.valid_df),
                 self.n_batches, self.device, self.dist.world)
        tb = tb_writer(self.fold_dir, st["global_step"]) if main else None
        if self.has_val and cfg.val_before_train and not st["history"] and st["batch_in_epoch"] == 0:
            res = self.validate()
            st["history"].append(self.metrics_row(0, res, improved=False))
            log.info("epoch 0 (untrained): val MAP@5 %.4f (threshold %.2f); all-new baseline %.4f",
                     res["map5"], res["threshold"], res["all_new_baseline"])
            if main:
                write_metrics(self.fold_dir / "metrics.csv", st["history"])
        for epoch in range(st["epoch"], cfg.epochs):
            t0 = time.time()
            st["epoch"] = epoch
            start = st["batch_in_epoch"]
            if start == 0:
                st["loss_sum"], st["loss_count"] = 0.0, 0
            self.train_set.set_epoch(epoch)
            batches = epoch_batches(len(self.train_df), cfg.batch_size, cfg.seed, epoch, self.dist.rank,
                                    self.dist.world, cfg.max_steps_per_epoch)
            loader = DataLoader(self.train_set, batch_sampler=batches[start:], num_workers=cfg.num_workers,
                                worker_init_fn=seed_worker, pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, start)))

            on_step = functools.partial(self.maybe_save_mid_epoch, n_batches=len(batches))
            train_epoch(self.ddp, self.model, self.criterion, loader, len(batches), start, self.opt,
                        self.sched, self.scaler, cfg, self.device, st, on_step, self.dist.world > 1)
            st["epoch"], st["batch_in_epoch"] = epoch + 1, 0
            improved, res, t_train = False, None, time.time() - t0
            if self.has_val and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                res = self.validate()
                es = st["early_stopping"]
                improved = es["best"] is None or res["map5"] > es["best"] + 1e-12
                if improved:
                    es.update(best=res["map5"], best_epoch=epoch + 1, bad_epochs=0)
                else:
                    es["bad_epochs"] += 1
            row = self.metrics_row(epoch + 1, res, improved)
            st["history"].append(row)
            stop = bool(self.has_val and cfg.patience and st["early_stopping"]["bad_epochs"] >= cfg.patience)
            st["finished"] = stop or epoch + 1 == cfg.epochs
            if improved and main:
                self.save_oof(res)
            self.save_last(also_best=improved or (not self.has_val and st["finished"]))
            if main:
                write_metrics(self.fold_dir / "metrics.csv", st["history"])
                if tb is not None:
                    for key, v in row.items():
                        if isinstance(v, float) and key != "epoch":
                            tb.add_scalar(key, v, st["global_step"])
                    tb.flush()
            val = "no validation" if res is None else (
                f"val MAP@5 {res['map5']:.4f} (known {res['map5_known'] or 0:.4f}, new "
                f"{res['map5_new'] or 0:.4f}, threshold {res['threshold']:.2f})")
            log.info("epoch %d/%d: train loss %.4f, %s%s, %.1fs (training %.1fs)", epoch + 1, cfg.epochs,
                     row["train_loss"], val, " *best*" if improved else "", time.time() - t0, t_train)
            if stop:
                log.info("early stopping: no improvement in %d validations (best %.4f at epoch %d)",
                         cfg.patience, st["early_stopping"]["best"], st["early_stopping"]["best_epoch"])
                break
        validated = [r for r in st["history"] if r.get("val_map5") is not None]
        if self.has_val and validated:
            first = validated[0]["val_map5"] if validated[0]["epoch"] == 0 else None
            log.info("fold %s done: val MAP@5 untrained %s -> best %.4f (epoch %d); all-new baseline %.4f",
                     self.k, f"{first:.4f}" if first is not None else "n/a", st["early_stopping"]["best"],
                     st["early_stopping"]["best_epoch"], validated[-1]["all_new_baseline"])
        if tb is not None:
            tb.close()

    def maybe_save_mid_epoch(self, done: int, n_batches: int) -> None:
        """After an optimizer step: write last.pt every ``save_every_steps`` steps (not at epoch end)."""
        st, every = self.state, self.cfg.save_every_steps
        if every and st["global_step"] % every == 0 and done < n_batches:
            st["batch_in_epoch"] = done
            self.save_last()
            log.info("mid-epoch checkpoint: epoch %d batch %d step %d", st["epoch"] + 1, done,
                     st["global_step"])

    def metrics_row(self, epoch: int, res: dict | None, improved: bool) -> dict:
        st, groups = self.state, self.opt.param_groups
        lr_head = next((g["lr"] for g in groups if g["name"].startswith("head")), None)
        lr_bb = next((g["lr"] for g in groups if g["name"].startswith("backbone")), None)
        row = {"epoch": epoch, "global_step": st["global_step"], "lr_backbone": lr_bb, "lr_head": lr_head,
               "train_loss": st["loss_sum"] / st["loss_count"] if epoch and st["loss_count"] else None,
               "improved": int(improved)}
        if res is not None:
            row.update(val_map5=res["map5"], val_threshold=res["threshold"], val_map5_known=res["map5_known"],
                       val_map5_new=res["map5_new"], val_top1_known=res["top1_known"],
                       val_new_share=res["pred_new_share_at1"], all_new_baseline=res["all_new_baseline"])
        return row

    # --- evaluation -------------------------------------------------------------------------------
    def eval_boxes(self, images) -> list:
        return [self.boxes.best(i, self.cfg.eval_box_type) for i in images]

    def embed(self, images: list[str], image_dir) -> np.ndarray:
        ds = EvalSet(images, image_dir, self.spec, self.eval_boxes(images), self.cfg.tta_flip)
        return embed_set(self.model.net, ds, self.cfg, self.device, self.dist.rank, self.dist.world)

    def validate(self) -> dict:
        """Gallery = this fold's training part, queries = its validation part; whalesub ranking."""
        import torch

        self._gallery = self.embed(real_rows(self.train_df)["image"].tolist(), self.cfg.image_dir)
        self._queries = self.embed(self.valid_df["image"].tolist(), self.cfg.image_dir)
        res = [None]
        if self.dist.main:
            res[0] = score(self._gallery, real_rows(self.train_df)["individual_id"], self._queries,
                           self.valid_df["individual_id"], self.cfg.threshold_grid, self.cfg.knn_k)
        if self.dist.world > 1:
            torch.distributed.broadcast_object_list(res, src=0)
        return res[0]

    def save_oof(self, res: dict) -> None:
        """OOF query and gallery embeddings (whalesub.ranking.store) + labels, for `whalesub tune`."""

        v = self._queries.shape[1]
        meta = {"fingerprint": self.spec.fingerprint(weights_digest(self.model.net.state_dict())),
                "model": self.spec.to_dict(), "tta": ["orig", "hflip"][:v], "views_per_image": v,
                "fold": self.k, "epoch": self.state["epoch"], "val_map5": res["map5"]}
        d = self._queries.shape[-1]
        save_embeddings(self.fold_dir / "oof_embeddings.npz", np.repeat(self.valid_df["image"].to_numpy(), v),
                        self._queries.reshape(-1, d), meta)
        gallery_images = real_rows(self.train_df)["image"].to_numpy()
        save_embeddings(self.fold_dir / "oof_gallery.npz", np.repeat(gallery_images, v),
                        self._gallery.reshape(-1, d), meta)
        with atomic_open(self.fold_dir / "oof_labels.csv", "w", encoding="utf-8", newline="") as fh:
            self.valid_df[["image", "individual_id", "true_individual_id", "species"]].to_csv(fh, index=False)

    def evaluate_test(self, df, truth) -> None:
        """Score the labelled test set: gallery = every train.csv image, threshold from validation."""
        path = self.best if self.best.is_file() else self.last
        st = ckpt.load_checkpoint(path)
        self.model.net.load_state_dict(st["model"], strict=True)
        cfg, hist = self.cfg, st["history"]
        best_rows = [r for r in hist if r.get("improved")]
        thr = best_rows[-1]["val_threshold"] if best_rows else cfg.threshold
        gallery = self.embed(df["image"].tolist(), cfg.image_dir)
        queries = self.embed(truth["image"].tolist(), cfg.test_image_dir or cfg.image_dir)
        if not self.dist.main:
            return
        res = score(gallery, df["individual_id"], queries, truth["individual_id"], cfg.threshold_grid,
                    cfg.knn_k, threshold=thr)
        res.update(checkpoint=str(path), threshold_source="validation" if best_rows else
                   ("config" if cfg.threshold is not None else "grid best on test (optimistic)"))
        text = json.dumps(res, indent=2, default=float) + "\n"
        atomic_write_text(self.fold_dir / "test_metrics.json", text)
        log.info("test (%d images, %s): MAP@5 %.4f at threshold %.2f (%s); grid best %.4f at %.2f; "
                 "all-new baseline %.4f", res["n"], path.name, res["map5"], res["threshold"],
                 res["threshold_source"], res["grid_best_map5"], res["grid_best_threshold"],
                 res["all_new_baseline"])
