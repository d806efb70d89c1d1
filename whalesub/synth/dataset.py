"""Write a synthetic Happywhale-format data set: images first, tables last, every file atomically."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.atomic import atomic_open, atomic_write_text
from whalesub.core.errors import ConfigError, WhalesubError, first_few
from whalesub.synth.plan import Photo, Plan, make_plan
from whalesub.synth.scene import Shot, render_sighting
from whalesub.synth.species import EXTRA_TYPOS, SPECIES, Individual

log = logging.getLogger(__name__)

NEW_INDIVIDUAL = "new_individual"
PRESETS = {"small": (256, 170), "medium": (768, 512), "large": (3200, 2133)}
TABLES = ("train.csv", "test_truth.csv", "test_truth_full.csv", "sample_submission.csv", "boxes.csv")
SMALL_FRAC, LARGE_FRAC = (0.5, 0.85), (0.08, 0.2)  # body length / frame width
FORMAT_VERSION = 1
MARKER = ".whalesub-synth"  # marks a folder that synth wrote, so --overwrite may clear it


def parse_image_size(text: str | Sequence[int], option: str = "--image-size") -> tuple[int, int]:
    """``"W,H"``, ``"WxH"`` or a preset name (small 256x170, medium 768x512, large 3200x2133)."""
    if not isinstance(text, str):
        try:
            w, h = (int(v) for v in text)
        except (TypeError, ValueError):
            raise ConfigError(f"{option} {text!r} is not a size: give (WIDTH, HEIGHT) in pixels") from None
        return w, h
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    parts = key.replace("x", ",").split(",")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not a size: give WIDTH,HEIGHT in pixels (e.g. 256,170) or one of "
            f"{', '.join(PRESETS)}"
        ) from None
    return w, h


# Command-line spelling of make_dataset's arguments, for error messages.
OPTIONS = {
    "image_size": "--image-size",
    "large_size": "--large-size",
    "n_individuals": "--individuals",
    "n_species": "--species",
    "n_test": "--test-images",
    "n_large": "--n-large",
}


def _check(args: dict) -> None:
    problems = []
    for name in ("image_size", "large_size"):
        w, h = args[name]
        if not (32 <= w <= 12000 and 32 <= h <= 12000):
            problems.append(f"{name} {w}x{h} ({OPTIONS[name]}): each side must be 32-12000 px")
        elif max(w, h) > 4 * min(w, h):
            problems.append(f"{name} {w}x{h} ({OPTIONS[name]}): aspect ratio must be at most 4:1")
    checks = [
        ("n_individuals", args["n_individuals"] >= 2, "at least 2"),
        ("n_species", 1 <= args["n_species"] <= len(SPECIES), f"1-{len(SPECIES)}"),
        ("max_images", args["max_images"] >= 2, "at least 2"),
        ("singleton_share", 0.0 <= args["singleton_share"] <= 1.0, "in [0, 1]"),
        ("new_share", 0.0 <= args["new_share"] < 1.0, "in [0, 1)"),
        ("n_test", args["n_test"] is None or args["n_test"] >= 0, "0 or more"),
        ("n_large", args["n_large"] >= 0, "0 or more"),
        ("nuisance", 0.0 <= args["nuisance"] <= 3.0, "in [0, 3]"),
        ("mirror_share", 0.0 <= args["mirror_share"] <= 1.0, "in [0, 1]"),
        ("typo_share", 0.0 <= args["typo_share"] <= 1.0, "in [0, 1]"),
        ("workers", args["workers"] >= 1, "at least 1"),
        ("marks", args["marks"] in ("colour", "scar"), "'colour' or 'scar'"),
    ]
    problems += [
        f"{k}={args[k]!r} ({OPTIONS.get(k, '--' + k.replace('_', '-'))}): must be {rule}"
        for k, ok, rule in checks
        if not ok
    ]
    if problems:
        raise ConfigError("invalid synth settings; fix these and re-run:", problems=problems)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; then remove only what a previous run wrote,
    tables first so an interrupted run never leaves tables that look complete.

    ``overwrite`` deletes images and tables only in a folder that synth made (it holds the
    :data:`MARKER` file, written before the first image) or that holds none of synth's files, so a
    real data set is never deleted by a mistyped ``--out``.
    """
    if out.exists() and not out.is_dir():
        raise WhalesubError(f"--out {out} is a file; give a folder path")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if entries and not overwrite:
        raise WhalesubError(
            f"output folder {out} is not empty ({first_few(entries)}); pass --overwrite to replace a "
            "previous synthetic set there, or choose a new folder"
        )
    ours = [n for n in (*TABLES, "stats.json") if (out / n).exists()]
    ours += [f"{sub}/*.jpg" for sub in ("train_images", "test_images") if any((out / sub).glob("*.jpg"))]
    if ours and not (out / MARKER).is_file():
        raise WhalesubError(
            f"output folder {out} holds {first_few(ours)} but was not written by whalesub synth (no {MARKER} "
            "file); refusing to delete what may be real data: choose a new folder"
        )
    for name in (*TABLES, "stats.json"):
        (out / name).unlink(missing_ok=True)
    for sub in ("train_images", "test_images"):
        for p in (out / sub).glob("*.jpg") if (out / sub).is_dir() else ():
            p.unlink()
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    (out / "test_images").mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / MARKER, "This folder is written by `whalesub synth`; --overwrite may replace it.\n"
    )


def _render_one(task: tuple[Photo, Individual, Shot, str]) -> list[tuple]:
    """Render and write one JPEG; returns its box rows (image, x1, y1, x2, y2, conf, box_type)."""
    photo, ind, shot, path = task
    rng = np.random.default_rng(list(photo.stream))
    img, boxes = render_sighting(rng, ind, shot)
    quality = int(rng.integers(72, 96))
    with atomic_open(path, "wb") as fh:
        img.save(fh, format="JPEG", quality=quality)
    return [(photo.image, *box, 1.0, kind) for kind, box in boxes.items()]


def _species_label(rng: np.random.Generator, name: str, typo_share: float) -> str:
    sp = next(s for s in SPECIES if s.name == name)
    if sp.typo is None or rng.random() >= typo_share:
        return name
    return str(rng.choice(EXTRA_TYPOS.get(name, (sp.typo,))))


def _tables(plan: Plan, typo_share: float, seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng([seed, 3])
    inds = plan.individuals
    train = [p for p in plan.photos if p.split == "train"]
    test = [p for p in plan.photos if p.split == "test"]
    train_df = pd.DataFrame(
        {
            "image": [p.image for p in train],
            "species": [_species_label(rng, inds[p.individual].species.name, typo_share) for p in train],
            "individual_id": [inds[p.individual].individual_id for p in train],
        }
    )
    is_new = np.array([p.individual >= plan.n_known for p in test], dtype=np.int64)
    true_ids = [inds[p.individual].individual_id for p in test]
    full = pd.DataFrame(
        {
            "image": [p.image for p in test],
            "individual_id": [NEW_INDIVIDUAL if n else t for n, t in zip(is_new, true_ids, strict=True)],
            "is_new": is_new,
            "true_individual_id": true_ids,
            "species": [inds[p.individual].species.name for p in test],
        }
    )
    tables = {
        "train.csv": train_df.sort_values("image"),
        "test_truth.csv": full[["image", "individual_id"]].sort_values("image"),
        "test_truth_full.csv": full.sort_values("image"),
        "sample_submission.csv": pd.DataFrame(
            {"image": full["image"], "predictions": NEW_INDIVIDUAL}
        ).sort_values("image"),
    }
    return tables


def make_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_individuals: int = 120,
    n_species: int = 4,
    image_size: str | tuple[int, int] = "small",
    *,
    n_test: int | None = None,
    new_share: float = 0.2,
    singleton_share: float = 0.55,
    max_images: int = 20,
    n_large: int = 0,
    large_size: str | tuple[int, int] = "large",
    animal_frac: tuple[float, float] | None = None,
    nuisance: float = 1.0,
    marks: str = "colour",
    mirror_share: float = 0.0,
    typo_share: float = 0.0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a Happywhale-format synthetic set to ``out_dir`` and return its statistics.

    Layout: ``train_images/``, ``test_images/`` (JPEG, anonymous hex names), ``train.csv``
    (image, species, individual_id), ``test_truth.csv`` (image, individual_id; ``new_individual``
    for animals absent from train), ``test_truth_full.csv`` (adds is_new, true_individual_id,
    species), ``sample_submission.csv`` (all ``new_individual``), ``boxes.csv`` (image, x1, y1,
    x2, y2, conf, box_type in {body, fin}; pixels, x2/y2 exclusive; train and test images) and
    ``stats.json`` (written last).

    ``image_size`` is (W, H) or a preset (small 256x170, medium 768x512, large 3200x2133); frames of
    1000 px and wider show a small animal (body length 8-20 % of the width, like the competition's
    photos), smaller frames a large one (50-85 %), unless ``animal_frac`` says otherwise.
    ``n_large`` photos, chosen at random across both splits, are rendered at ``large_size`` instead.
    ``nuisance`` scales all pose/light/background variation (0 canonical, 1 default).
    ``marks="colour"`` draws marks in five hues contrasting with the body; ``"scar"`` only in
    white/pale or black/dark, like real scars, so identity lies in the marks' layout alone.
    ``mirror_share`` of photos are mirrored: the animal seen from its other side, with its marks and
    fin notches mirrored (treated as visible from both sides, like notches through a fin); default
    0 so that flank marks identify without flip invariance. ``typo_share`` of the train rows of
    species with a known misspelling (bottlenose_dolphin, killer_whale, short_finned_pilot_whale)
    carry it (``bottlenose_dolpin``, ``kiler_whale``, ``globis``/``pilot_whale``).
    Same arguments, same bytes in every file; ``workers`` > 1 renders in parallel processes with
    identical results.
    """
    args = dict(locals())
    args["image_size"] = parse_image_size(image_size)
    args["large_size"] = parse_image_size(large_size, "--large-size")
    _check(args)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    plan = make_plan(
        seed, n_individuals, n_species, singleton_share, max_images, n_test, new_share, n_large, marks
    )

    def shot_for(size: tuple[int, int]) -> Shot:
        frac = animal_frac or (LARGE_FRAC if size[0] >= 1000 else SMALL_FRAC)
        return Shot(size[0], size[1], tuple(frac), nuisance, mirror_share)

    shots = {False: shot_for(args["image_size"]), True: shot_for(args["large_size"])}
    tasks = [
        (p, plan.individuals[p.individual], shots[p.large], str(out / f"{p.split}_images" / p.image))
        for p in plan.photos
    ]
    from tqdm.auto import tqdm

    bar = dict(total=len(tasks), desc="synth images", unit="img", disable=not progress or len(tasks) < 50)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(tqdm(pool.map(_render_one, tasks, chunksize=8), **bar))
    else:
        rows = [_render_one(t) for t in tqdm(tasks, **bar)]

    tables = _tables(plan, typo_share, seed)
    box_cols = ["image", "x1", "y1", "x2", "y2", "conf", "box_type"]
    tables["boxes.csv"] = pd.DataFrame([r for rs in rows for r in rs], columns=box_cols).sort_values(
        ["image", "box_type"]
    )
    for name in TABLES:
        atomic_write_text(out / name, tables[name].to_csv(index=False))
    stats = _stats(plan, tables, args)
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    log.info("synth: %d train + %d test images in %s", stats["train_images"], stats["test_images"], out)
    return stats


def _stats(plan: Plan, tables: dict[str, pd.DataFrame], args: dict) -> dict:
    train, full = tables["train.csv"], tables["test_truth_full.csv"]
    per_ind = train["individual_id"].value_counts()
    n_test = len(full)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}
    for k in ("out_dir", "overwrite", "progress", "workers"):
        settings.pop(k)
    boxes = tables["boxes.csv"]
    return {
        "dataset": "whalesub-synth",
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "train_images": len(train),
        "train_individuals": int(per_ind.size),
        "singleton_individuals": int((per_ind == 1).sum()),
        "singleton_share": round(float((per_ind == 1).mean()), 4),
        "max_images_per_individual": int(per_ind.max()),
        "test_images": n_test,
        "test_known_images": int((full["is_new"] == 0).sum()),
        "test_new_images": int(full["is_new"].sum()),
        "test_new_individuals": int(full.loc[full["is_new"] == 1, "true_individual_id"].nunique()),
        "test_new_frac": round(float(full["is_new"].mean()) if n_test else 0.0, 4),
        "large_images": sum(p.large for p in plan.photos),
        "species_train_images": dict(sorted(Counter(train["species"]).items())),
        "boxes": {str(k): int(v) for k, v in sorted(Counter(boxes["box_type"]).items())},
    }
