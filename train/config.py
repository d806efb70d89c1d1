"""Training configuration: one dataclass of defaults, a YAML per experiment, ``--key=value`` overrides.

Resolution order: dataclass defaults < ``--config FILE.yaml`` < command-line ``--key=value`` (or
``--key value``; ``-`` and ``_`` are interchangeable in keys). Unknown keys and wrong types raise
:class:`~whalesub.core.errors.ConfigError` listing every problem, the closest valid key and all valid
keys. The resolved config is plain data (``dict`` of str/int/float/bool/None/list/dict), so it is
saved as ``config.yaml`` in the run folder and inside checkpoints loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from whalesub.core.errors import ConfigError

# 1st place Happywhale (knshnb) individual-id margins: m_c = 0.27126 * n_c ** -0.364399 + 0.05
# (margin_coef_id, margin_power_id, margin_cons_id in that solution's config); train.heads uses it too.
HAPPYWHALE_MARGIN = {"a": 0.27126, "b": -0.364399, "c": 0.05}


@dataclass
class TrainConfig:
    """Every knob of a training run; units in the comments. Angles/margins in radians."""

    # --- data ---------------------------------------------------------------------------------
    train_csv: str = "data/train.csv"  # image,species,individual_id
    image_dir: str = "data/train_images"
    boxes_csv: str | None = None  # image,x1,y1,x2,y2[,conf][,box_type] in original pixels
    box_mix: dict[str, float] = field(default_factory=dict)  # box_type -> sampling weight; {} = any box
    box_conf: float = 0.0  # boxes below this confidence are ignored (whole image is the fallback)
    eval_box_type: str | None = None  # None: the only box type (data.choose_box_type)
    synth_if_missing: bool = False  # generate whalesub.synth data at train_csv's folder if absent
    synth_seed: int = 0
    synth_individuals: int = 60
    synth_options: dict[str, int | float] = field(default_factory=dict)  # more make_dataset keywords
    test_csv: str | None = None  # labelled test set (image,individual_id) scored after training
    test_image_dir: str | None = None
    check_images: bool = True  # verify every listed image exists before training starts
    pseudo_csv: str | None = None  # second round: `whalesub pseudo-label` rows added to every fold's training
    pseudo_image_dir: str | None = None  # folder of the pseudo_csv images (default: test_image_dir)
    pseudo_truth_csv: str | None = None  # their truth (synthetic data): precision -> pseudo.json
    # --- model (whalesub.models.spec.ModelSpec) -------------------------------------------------------
    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_file: str | None = None  # local timm weights (no downloads)
    image_size: int = 128  # square input side, px
    embed_dim: int = 128
    stages: int = 1  # 1 = last stage, 2 = last two stages concatenated
    neck: Literal["bn", "linear_bn"] = "linear_bn"
    gem_p: float = 3.0
    gem_learnable: bool = False
    box_margin: float = 0.0  # widen box crops by this fraction of the box side (ModelSpec.box_margin)
    # --- heads (train.heads) --------------------------------------------------------------------
    arc_s: float = 30.0
    arc_k: int = 2  # sub-centres per class
    margin_a: float = HAPPYWHALE_MARGIN["a"]  # dynamic margin m_c = a * n_c ** b + c (radians)
    margin_b: float = HAPPYWHALE_MARGIN["b"]
    margin_c: float = HAPPYWHALE_MARGIN["c"]
    species_weight: float = 0.0  # weight of the species head in the loss; 0 = no species head
    label_smoothing: float = 0.0
    # --- optimisation ---------------------------------------------------------------------------
    epochs: int = 10
    batch_size: int = 32  # per process
    grad_accum: int = 1
    lr: float = 1e-3  # backbone learning rate (AdamW)
    head_lr_mult: float = 10.0  # neck + margin heads train at lr * head_lr_mult
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine ends at lr * min_lr_ratio
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    sync_bn: bool = False  # SyncBatchNorm under DDP
    patience: int = 0  # early stopping on validation MAP@5, in validations (see val_every); 0 = off
    max_steps_per_epoch: int = 0  # cap batches per epoch (debugging); 0 = all
    # --- folds (train.folds) --------------------------------------------------------------------
    n_folds: int = 5
    fold: int | str = 0  # 0..n_folds-1, "all", or -1 = full data without validation
    fold_method: Literal["stratified", "group"] = "stratified"
    group_column: str | None = None
    holdout_individuals: float = 0.0  # share of multi-image animals kept whole in one fold (new in valid)
    # share of OOF validation images whose animal is absent from the training part (Happywhale test:
    # ~16-20% new; the 1st place used 0.165); None = singletons (+ holdout_individuals) only
    target_new_share: float | None = None
    # --- validation -----------------------------------------------------------------------------
    val_before_train: bool = True  # epoch-0 validation of the untrained network
    val_every: int = 1  # validate every N epochs and always after the last; patience counts validations
    val_batch_size: int = 64
    tta_flip: bool = False  # add horizontally flipped views to gallery and queries
    knn_k: int = 50
    threshold_grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(-4, 21)])
    threshold: float | None = None  # fixed threshold for test scoring when there is no validation
    report: bool = False  # write report.html (whalesub.report.build) of each fold from its OOF files
    eval_only: bool = False  # skip training; score best.pt (else last.pt) on test_csv
    # --- reproducibility / runtime --------------------------------------------------------------
    seed: int = 42
    deterministic: bool = False  # torch.use_deterministic_algorithms + cudnn flags
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    num_workers: int = 2
    save_every_steps: int = 0  # mid-epoch checkpoint every N optimizer steps; 0 = end of epoch only
    log_every_steps: int = 20
    out_dir: str = "runs"
    run_name: str = "run"
    debug_nan_at_step: int = -1  # inject a NaN loss at this optimizer step (tests); -1 = off
    debug_sleep_per_step: float = 0.0  # seconds; slows a run so tests can kill it mid-epoch
    # --- augmentation (albumentations 2.0.8) -----------------------------------------------------
    aug_rrc_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])  # RandomResizedCrop area
    aug_rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 1.333])
    aug_hflip: float = 0.0  # probability; flank patterns are chiral, so off by default
    aug_affine: float = 0.5  # probability of Affine
    aug_rotate: float = 10.0  # degrees, +-
    aug_shear: float = 5.0  # degrees, +-
    aug_translate: float = 0.05  # fraction of the side, +-
    aug_color: float = 0.5  # probability of ColorJitter
    aug_brightness: float = 0.2
    aug_contrast: float = 0.2
    aug_saturation: float = 0.2
    aug_hue: float = 0.02
    aug_gray: float = 0.1
    aug_blur: float = 0.1
    aug_noise: float = 0.1
    aug_dropout: float = 0.2  # CoarseDropout probability
    aug_dropout_holes: int = 4
    aug_dropout_size: float = 0.1  # hole side as a fraction of the image side


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)


def valid_keys() -> list[str]:
    return list(FIELDS)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ValueError. Numeric strings become numbers."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"expected one of {list(typing.get_args(tp))}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {_type_name(item)}")
        return [_coerce(v, item) for v in value]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping {_type_name(kt)} -> {_type_name(vt)}")
        return {_coerce(k, kt): _coerce(v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ValueError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("expected a string")
    raise ValueError(f"unsupported type {tp}")  # pragma: no cover - only our own annotations


def coerce_values(values: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """(clean values keyed by field name, problems) for a mapping read from ``source``."""
    problems, clean = [], {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            problems.append(f"unknown key {key!r} in {source}{_suggest(name)}")
            continue
        try:
            clean[name] = _coerce(value, HINTS[name])
        except ValueError as exc:
            problems.append(f"key {key!r} in {source}: {exc}, got {value!r} ({type(value).__name__})")
    return clean, problems


def make_config(values: dict[str, Any], source: str = "config",
                problems: list[str] | None = None) -> TrainConfig:
    """Build a checked :class:`TrainConfig` from a mapping; list ALL bad keys/values at once
    (plus ``problems`` already found elsewhere, e.g. in the YAML file)."""
    clean, found = coerce_values(values, source)
    problems = list(problems or []) + found
    cfg = None
    if not problems:
        cfg = TrainConfig(**clean)
        problems += _check_values(cfg, source)
    if problems:
        raise ConfigError(
            f"bad training configuration ({source}); fix these keys. Valid keys: {', '.join(FIELDS)}",
            problems=problems,
        )
    return cfg


def _check_values(cfg: TrainConfig, source: str) -> list[str]:
    problems = []
    if isinstance(cfg.fold, str) and cfg.fold != "all":
        problems.append(f"key 'fold' in {source}: expected an integer, -1 or 'all', got {cfg.fold!r}")
    elif isinstance(cfg.fold, int) and not -1 <= cfg.fold < cfg.n_folds:
        problems.append(f"key 'fold' in {source}: {cfg.fold} is outside -1..{cfg.n_folds - 1}")
    for key in ("epochs", "batch_size", "grad_accum", "image_size", "embed_dim", "arc_k", "val_batch_size",
                "val_every"):
        if getattr(cfg, key) < 1:
            problems.append(f"key {key!r} in {source}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.stages not in (1, 2):
        problems.append(f"key 'stages' in {source}: must be 1 or 2, got {cfg.stages}")
    if cfg.n_folds < 2:
        problems.append(f"key 'n_folds' in {source}: must be >= 2, got {cfg.n_folds}")
    for key in ("aug_rrc_scale", "aug_rrc_ratio"):
        if len(getattr(cfg, key)) != 2:
            problems.append(f"key {key!r} in {source}: expected [low, high], got {getattr(cfg, key)}")
    if cfg.target_new_share is not None:
        if not 0.0 <= cfg.target_new_share < 1.0:
            problems.append(f"key 'target_new_share' in {source}: must be in [0, 1) (e.g. 0.165), got "
                            f"{cfg.target_new_share}")
        if cfg.holdout_individuals > 0:
            problems.append(f"key 'target_new_share' in {source}: give it or 'holdout_individuals', not both "
                            "(set holdout_individuals: 0)")
        if cfg.fold_method != "stratified":
            problems.append(f"key 'target_new_share' in {source}: applies to fold_method 'stratified' only")
    if cfg.fold_method == "group" and not cfg.group_column:
        problems.append(f"key 'group_column' in {source}: required when fold_method is 'group'")
    if not cfg.threshold_grid:
        problems.append(f"key 'threshold_grid' in {source}: must not be empty")
    return problems


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``argv`` into (config file, {key: raw value}); values are parsed as YAML scalars."""
    import yaml

    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE and --key=value overrides")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, raw = arg[2:], argv[i + 1]
            i += 1
        else:
            key, raw = arg[2:], "true"  # a bare flag sets a boolean
        i += 1
        if key == "config":
            config_path = raw
            continue
        try:
            overrides[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            overrides[key] = raw
    return config_path, overrides


def yaml_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a config could run with a value its author did not mean). Raises yaml.YAMLError."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"key {key!r} appears twice (first on line {seen[key] + 1}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(argv: list[str]) -> TrainConfig:
    """Resolve defaults < YAML file < command-line overrides into a checked config."""
    import yaml

    config_path, overrides = parse_overrides(argv)
    values: dict[str, Any] = {}
    problems: list[str] = []
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            loaded = yaml_load_unique(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc}); re-save it as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must be a mapping of key: value, got {type(loaded).__name__}"
            )
        clean, problems = coerce_values(loaded, str(path))
        values.update(clean)
    clean, more = coerce_values(overrides, "command line")
    values.update(clean)
    source = f"{config_path} + command line" if config_path else "command line"
    return make_config(values, source=source, problems=problems + more)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data (str/int/float/bool/None/list/dict) for YAML and ``torch.load(weights_only=True)``."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by :func:`config_to_dict` (e.g. from a checkpoint)."""
    return make_config(values, source="saved config")
