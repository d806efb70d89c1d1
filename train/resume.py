"""What a rerun of a training run may reuse: its ``folds.csv`` and its fold checkpoints.

Rules (README "Resuming a run"):

- **Folds are made once per run.** The first run of a ``run_name`` splits ``train.csv`` and writes
  ``<run>/folds.csv`` (a ``folds.csv`` already there, e.g. one you wrote yourself, is used as is).
  Every later run of the same ``run_name`` reuses it. An image added to or removed from the train
  table since, a changed label, or changed fold keys (``n_folds``, ``fold_method``, ...) is an
  error naming the difference: moving images between folds would put trained-on images into
  validation. Start a new run (another ``run_name``) to split a changed table. A refused rerun
  writes nothing.
- **A fold resumes with the schedule it started with.** ``last.pt`` records the config; a rerun
  that changes any key outside :data:`RUNTIME_KEYS` (``epochs``, ``lr``, augmentations, ...) is
  refused with the keys, their old and new values and how to proceed. A finished fold asked for
  more epochs says so: its cosine schedule has already decayed, so more epochs means a new run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import yaml

from whalesub.core.errors import ConfigError, DataError

from . import checkpoint as ckpt
from .config import TrainConfig, config_to_dict
from .folds import FULL_DATA_FOLD, load_folds, make_folds, save_folds

log = logging.getLogger("train")

FOLDS_FILE = "folds.csv"
# keys that only say where files are, how fast or how verbosely to run, or what to score after
# training: a resumed fold may change them (everything else fixes the weights or the metrics)
RUNTIME_KEYS = frozenset({
    "train_csv", "image_dir", "test_csv", "test_image_dir", "check_images", "synth_if_missing",
    "synth_seed", "synth_individuals", "synth_options", "pretrained", "pretrained_file", "fold",
    "device", "num_workers", "save_every_steps", "log_every_steps", "out_dir", "run_name",
    "debug_nan_at_step", "debug_sleep_per_step", "eval_only", "threshold", "val_batch_size", "deterministic",
    "pseudo_image_dir", "pseudo_truth_csv",
})
# keys that decide the split: fixed by the run's folds.csv
FOLD_KEYS = ("n_folds", "fold_method", "group_column", "holdout_individuals", "target_new_share", "seed")


def fold_dir_name(k: int) -> str:
    return f"fold{k}" if k >= 0 else "full"


def new_run_hint(cfg: TrainConfig) -> str:
    return (f"start a new run with another --run_name (e.g. --run_name={cfg.run_name}_2), or restore the "
            "original values")


def run_folds(cfg: TrainConfig, df: pd.DataFrame, run_dir: Path) -> tuple[pd.DataFrame, bool]:
    """(train table with its ``fold`` column, whether folds.csv must be written) for this run.

    Reuses ``run_dir/folds.csv`` when present (checked against ``df`` and the fold keys of
    ``run_dir/config.yaml``); otherwise splits ``df`` (refusing when fold checkpoints exist).
    """
    path = run_dir / FOLDS_FILE
    if not path.is_file():
        orphans = sorted(str(p.parent.name) for p in run_dir.glob(f"*/{ckpt.LAST}"))
        if orphans:
            raise DataError(f"{path} is missing but {run_dir} already holds trained folds "
                            f"({', '.join(orphans)}); new folds would put trained-on images into validation: "
                            f"restore {FOLDS_FILE}, or " + new_run_hint(cfg))
        method = "full" if cfg.fold == FULL_DATA_FOLD else cfg.fold_method
        extra = ({"holdout_individuals": cfg.holdout_individuals, "target_new_share": cfg.target_new_share}
                 if method == "stratified" else {})
        return make_folds(df, cfg.n_folds, cfg.seed, method, cfg.group_column, **extra), True
    check_fold_keys(cfg, run_dir)
    try:
        out = load_folds(path, df)
    except DataError as exc:
        raise DataError(f"run {run_dir} keeps the folds it started with, but the train table "
                        f"{cfg.train_csv} changed since {FOLDS_FILE} was written; to train on the changed "
                        f"table, {new_run_hint(cfg)} of the table:", exc.problems or [str(exc)]) from None
    have = sorted(int(f) for f in out["fold"].unique() if f != FULL_DATA_FOLD)
    if cfg.fold != FULL_DATA_FOLD and have != list(range(cfg.n_folds)):
        raise ConfigError(f"{path} holds folds {have or 'none (full-data training only)'}, but n_folds="
                          f"{cfg.n_folds} and fold={cfg.fold!r}; {new_run_hint(cfg)}")
    log.info("reusing the folds of %s (%d images)", path, len(out))
    return out, False


def check_fold_keys(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse changed fold keys against the run's config.yaml (written with its folds.csv)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    if FULL_DATA_FOLD in (saved.get("fold"), cfg.fold):  # full-data training: no split keys apply
        return
    now = config_to_dict(cfg)
    changed = [f"{k} ({saved[k]!r} -> {now[k]!r})" for k in FOLD_KEYS if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(f"run {run_dir} was split into folds with other values of {', '.join(changed)}; "
                          f"its {FOLDS_FILE} stays as it is: {new_run_hint(cfg)}")


def save_run_folds(df: pd.DataFrame, run_dir: Path) -> None:
    save_folds(df, run_dir / FOLDS_FILE)


def schedule_conflicts(saved: dict, cfg: TrainConfig) -> list[str]:
    """``key (old -> new)`` for every non-runtime key that differs from a checkpoint's config.

    A key missing from an older checkpoint counts as its current default."""
    now, defaults = config_to_dict(cfg), config_to_dict(TrainConfig())
    out = []
    for key, value in now.items():
        old = saved.get(key, defaults[key])
        if key not in RUNTIME_KEYS and old != value:
            out.append(f"{key} ({old!r} -> {value!r})")
    return out


def check_resume(state: dict, cfg: TrainConfig, path: Path) -> None:
    """Raise ConfigError when the fold checkpoint ``path`` (its ``state``) cannot resume under ``cfg``."""
    saved = state.get("config", {})
    done, planned = state.get("epoch", 0), saved.get("epochs")
    if state.get("finished") and cfg.epochs > done and planned != cfg.epochs:
        raise ConfigError(
            f"{path.parent.name} already finished after {done} epoch(s) (epochs={planned}"
            f"{', early stopping' if planned and done < planned else ''}); its learning rate has "
            f"decayed to the end of that schedule, so epochs={cfg.epochs} cannot extend it: start a new run "
            f"with --run_name={cfg.run_name}_{cfg.epochs}ep --epochs={cfg.epochs} (or keep epochs="
            f"{planned} to re-score this fold)")
    changed = schedule_conflicts(saved, cfg)
    if changed:
        raise ConfigError(
            f"{path} was trained with other values of {', '.join(changed)}; a fold resumes with the schedule "
            f"it started with. Rerun with the recorded values ({path.parent / 'config.yaml'}) to resume, "
            f"delete {path.parent} to restart this fold, or {new_run_hint(cfg)}")


def check_run_resumable(cfg: TrainConfig, run_dir: Path, folds: list[int]) -> None:
    """Every requested fold with a ``last.pt`` can resume under ``cfg`` (checked before any write)."""
    for k in folds:
        path = run_dir / fold_dir_name(k) / ckpt.LAST
        if path.is_file():
            check_resume(ckpt.load_checkpoint(path, mmap=True), cfg, path)
