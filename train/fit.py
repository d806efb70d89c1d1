"""One training run: data checks, folds, per-fold training with resume, validation, test scoring.

``python -m train --config FILE.yaml [--key=value ...]`` (see :mod:`train.config`). Each fold
writes ``<out_dir>/<run_name>/fold<k>/`` (``full/`` for fold -1): config.yaml, command.txt,
train.log, metrics.csv, last.pt, best.pt, model_spec.json, oof_embeddings.npz (+ oof_gallery.npz,
oof_labels.csv), test_metrics.json (with test_csv), tb/ (TensorBoard). ``folds.csv``, and the
config.yaml and command.txt that made it, sit at the run level. Re-running the same command resumes
from ``last.pt`` with the run's folds and schedule (:mod:`train.resume`). Under ``torchrun`` every
rank trains (DDP), rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, WhalesubError
from whalesub.data.contract import read_boxes, read_train_csv, read_truth
from whalesub.synth import make_dataset

from .config import TrainConfig, config_to_yaml, load_config
from .dataset import check_images_exist
from .fold_report import write_fold_report
from .pseudo import read_pseudo
from .resume import check_run_resumable, fold_dir_name, run_folds, save_run_folds
from .session import FoldSession

log = logging.getLogger("train")
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def setup_runtime(cfg: TrainConfig) -> Dist:
    """Device, torchrun process group (gloo on CPU, nccl on GPU), seeds and determinism flags."""
    import torch

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but torch sees no CUDA GPU; use device=cpu or auto")
    device = torch.device(f"cuda:{local}" if want.startswith("cuda") and world > 1 else want)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.backends.cudnn.benchmark = True
    return Dist(rank, world, local, device)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(main: bool) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_train_console", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        h._train_console = True
        root.addHandler(h)
    root.setLevel(logging.INFO if main else logging.WARNING)


def prepare_data(cfg: TrainConfig, dist: Dist):
    """(train frame, box table or None, test truth or None); every problem up front."""

    if cfg.synth_if_missing and not Path(cfg.train_csv).is_file():
        if dist.main:
            log.info("generating synthetic data in %s (synth_if_missing)", Path(cfg.train_csv).parent)
            make_dataset(Path(cfg.train_csv).parent, seed=cfg.synth_seed, n_individuals=cfg.synth_individuals,
                         progress=False, **cfg.synth_options)
        dist.barrier()
    if not Path(cfg.train_csv).is_file():
        raise ConfigError(f"train_csv {cfg.train_csv} does not exist; set --train_csv (and --image_dir)")
    df = read_train_csv(cfg.train_csv)
    if cfg.check_images:
        check_images_exist(df["image"], cfg.image_dir, cfg.train_csv)
    truth = None
    if cfg.test_csv:
        truth = read_truth(cfg.test_csv)
        check_images_exist(truth["image"], cfg.test_image_dir or cfg.image_dir, cfg.test_csv)
    boxes = read_boxes(cfg.boxes_csv) if cfg.boxes_csv else None
    read_pseudo(cfg, df)  # every problem of the pseudo-label table up front
    return df, boxes, truth


def run(cfg: TrainConfig, argv: list[str]) -> int:
    """Train the configured fold(s); returns the exit status."""

    dist = setup_runtime(cfg)
    setup_logging(dist.main)
    seed_everything(cfg.seed)
    command = "python -m train " + shlex.join(argv)
    df, boxes, truth = prepare_data(cfg, dist)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    df, new_run = run_folds(cfg, df, run_dir)  # a rerun reuses folds.csv (train/resume.py)
    folds = list(range(cfg.n_folds)) if cfg.fold == "all" else [int(cfg.fold)]
    check_run_resumable(cfg, run_dir, folds)  # refused before anything is written
    if dist.main:  # the run level keeps the folds and the config they were made with
        run_dir.mkdir(parents=True, exist_ok=True)
        if new_run:
            save_run_folds(df, run_dir)
        if not (run_dir / "config.yaml").is_file():
            atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
            atomic_write_text(run_dir / "command.txt", command + "\n")
    dist.barrier()
    try:
        for k in folds:
            fold_dir = run_dir / fold_dir_name(k)
            with fold_logging(fold_dir, dist.main):
                if dist.main:
                    atomic_write_text(fold_dir / "config.yaml", config_to_yaml(cfg))
                    atomic_write_text(fold_dir / "command.txt", command + "\n")
                train_fold(cfg, k, df, boxes, truth, fold_dir, command, dist)
    finally:
        if dist.world > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()
    return 0


@contextlib.contextmanager
def fold_logging(fold_dir: Path, main: bool):
    """Also log to ``fold_dir/train.log`` (rank 0), including a final error message."""
    if not main:
        yield
        return
    fold_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(fold_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    except WhalesubError as exc:  # the console gets it once from main()
        handler.emit(logging.LogRecord("train", logging.ERROR, __file__, 0, f"error: {exc}", None, None))
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def train_fold(cfg, k, df, boxes, truth, fold_dir: Path, command: str, dist: Dist) -> None:

    session = FoldSession(cfg, k, df, boxes, fold_dir, command, dist)
    if not cfg.eval_only:
        session.fit()
    if cfg.report and dist.main and (fold_dir / "oof_embeddings.npz").is_file():
        write_fold_report(cfg, fold_dir)
    if truth is not None:
        session.evaluate_test(df, truth)


def usage() -> str:
    """The command line and every config key with its default."""
    import dataclasses

    lines = ["usage: python -m train --config FILE.yaml [--key=value ...]", "", __doc__.strip(), "",
             "keys (default):"]
    lines += [f"  --{f.name}={getattr(TrainConfig(), f.name)!r}" for f in dataclasses.fields(TrainConfig)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry: config errors, data errors and a diverged loss exit 2 with one message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    try:
        cfg = load_config(argv)
        return run(cfg, argv)
    except WhalesubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. out_dir is a file, disk full: the OS message names the path
        print(f"error: {exc}", file=sys.stderr)
        return 2

