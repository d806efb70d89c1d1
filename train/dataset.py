"""Training and evaluation datasets: albumentations 2.0.8 pipelines, box crops, image checks.

- Training: ``whalesub.image.load_image`` (decode, EXIF, RGB, box crop) -> albumentations
  (random resized crop, flip, affine, colour, grey, blur/noise, coarse dropout) -> THE inference
  preprocessing ``whalesub.image.to_model_input`` (resize + normalise with the spec's mean/std).
- Evaluation (validation gallery/queries, test): exactly ``whalesub.image.load_for_model``, no
  randomness, optionally with a horizontally flipped second view.

Randomness is a pure function of (seed, epoch, sample index): every sample seeds its own
generators, so augmentations do not depend on data-loader workers or on where a run resumed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub import image
from whalesub.data import choose_box_type, find_missing_files
from whalesub.errors import DataError
from whalesub.image import load_for_model, to_model_input

log = logging.getLogger(__name__)


def check_images_exist(images, image_dir: str | os.PathLike, what: str) -> None:
    """Raise DataError listing EVERY image of ``images`` missing in ``image_dir`` (checked up front)."""

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} ({what}) does not exist; set image_dir to the folder "
                        "holding the images")
    missing = find_missing_files([str(i) for i in images], image_dir)
    if missing:
        raise DataError(
            f"{len(missing)} image file(s) listed in {what} are missing from {image_dir}; restore them or "
            "drop their rows before training:",
            problems=missing,
        )


def sample_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (seed, epoch, index, ...) by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def build_train_transform(cfg):
    """The training augmentation (albumentations 2.x names) to a ``cfg.image_size`` square uint8 image."""
    import albumentations as A
    import cv2

    s = cfg.image_size
    holes = max(1, cfg.aug_dropout_holes)
    hole = (min(0.05, cfg.aug_dropout_size), cfg.aug_dropout_size)
    return A.Compose([
        # squash to the square input first, exactly as inference does (to_model_input does not keep
        # the aspect ratio), so crop scale/ratio are relative to what the network sees at test time
        A.Resize(height=s, width=s, interpolation=cv2.INTER_AREA),
        A.RandomResizedCrop(size=(s, s), scale=tuple(cfg.aug_rrc_scale), ratio=tuple(cfg.aug_rrc_ratio),
                            interpolation=cv2.INTER_AREA, p=1.0),
        A.HorizontalFlip(p=cfg.aug_hflip),
        A.Affine(rotate=(-cfg.aug_rotate, cfg.aug_rotate), shear=(-cfg.aug_shear, cfg.aug_shear),
                 translate_percent=(-cfg.aug_translate, cfg.aug_translate), scale=(0.9, 1.1),
                 border_mode=cv2.BORDER_REFLECT_101, p=cfg.aug_affine),
        A.ColorJitter(brightness=cfg.aug_brightness, contrast=cfg.aug_contrast,
                      saturation=cfg.aug_saturation, hue=cfg.aug_hue, p=cfg.aug_color),
        A.ToGray(num_output_channels=3, p=cfg.aug_gray),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))], p=cfg.aug_blur),
        A.GaussNoise(std_range=(0.02, 0.08), p=cfg.aug_noise),
        A.CoarseDropout(num_holes_range=(1, holes), hole_height_range=hole, hole_width_range=hole,
                        fill=0, p=cfg.aug_dropout),
    ])


def seed_transform(transform, seed: int) -> None:
    """Seed a Compose and each child with its own seed (Compose.set_random_seed would give every
    child the same seed, so their coin flips would be identical)."""
    transform.set_random_seed(seed)
    for i, t in enumerate(transform.transforms):
        t.set_random_seed(sample_seed(seed, i + 1))


class BoxTable:
    """Per image its candidate boxes (x1, y1, x2, y2, box_type, weight) after the confidence cut.

    ``mix`` maps box types to sampling weights (types absent from it are never sampled; an empty
    mix samples every type equally). An image without a usable box is used whole.
    """

    def __init__(self, boxes: pd.DataFrame | None, mix: dict[str, float], conf: float):
        self.by_image: dict[str, list[tuple]] = {}
        self.all_by_image: dict[str, list[tuple]] = {}  # evaluation: every type (embed --box-type)
        self.kinds: list[str] = []  # every box type of the table, before the confidence cut
        if boxes is None:
            return
        self.kinds = sorted(boxes["box_type"].unique()) if "box_type" in boxes.columns else ["box"]
        if "conf" in boxes.columns:
            boxes = boxes[boxes["conf"] >= conf]
        for r in boxes.itertuples(index=False):
            kind = getattr(r, "box_type", "box")
            w = mix.get(kind, 0.0) if mix else 1.0
            self.all_by_image.setdefault(r.image, []).append((r.x1, r.y1, r.x2, r.y2, kind, w))
            if w > 0:
                self.by_image.setdefault(r.image, []).append((r.x1, r.y1, r.x2, r.y2, kind, w))

    def sample(self, image: str, rng: np.random.Generator) -> tuple | None:
        options = self.by_image.get(os.path.basename(image))  # pseudo rows carry a folder
        if not options:
            return None
        w = np.array([o[5] for o in options], dtype=np.float64)
        o = options[int(rng.choice(len(options), p=w / w.sum()))]
        return o[:4]

    def eval_type(self, box_type: str | None) -> str | None:
        """The box type evaluation crops: :func:`whalesub.data.choose_box_type`, the rule of
        ``whalesub embed --box-type`` (one type in the table: that one; several: name one)."""
        return choose_box_type(self.kinds, box_type, "boxes_csv", "eval_box_type")

    def best(self, image: str, box_type: str | None) -> tuple | None:
        """The deterministic evaluation box of ``image`` (:meth:`eval_type`), or None (whole frame).

        It ignores the training mix: evaluation crops what ``whalesub embed --box-type`` crops.
        """
        kind = self.eval_type(box_type)  # pseudo rows carry a folder: boxes are keyed by file name
        return next((o[:4] for o in self.all_by_image.get(os.path.basename(image), []) if o[4] == kind), None)


def decode(path: Path, box, spec) -> np.ndarray:
    """uint8 [H, W, 3] RGB through whalesub.image.load_image (box crop mapped to the decoded scale).

    JPEGs are decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps both sides of the frame
    or crop >= 1.5x the input side (full resolution when the original is smaller); the training
    transform (:func:`build_train_transform`) makes the S x S input from it."""

    return image.load_image(path, target=int(1.5 * spec.image_size), box=box, margin=spec.box_margin)


class TrainSet:
    """(input [3, S, S] float32, individual code int64, species code int64, row index) per row."""

    def __init__(self, df: pd.DataFrame, image_dir, labels: np.ndarray, species: np.ndarray, spec, cfg,
                 boxes: BoxTable):
        self.images = df["image"].astype(str).tolist()
        self.image_dir, self.labels, self.species = Path(image_dir), labels, species
        self.spec, self.cfg, self.boxes = spec, cfg, boxes
        self.transform = build_train_transform(cfg)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import torch


        seed = sample_seed(self.cfg.seed, self.epoch, i)
        rng = np.random.default_rng(seed)
        name = self.images[i]
        img = decode(self.image_dir / name, self.boxes.sample(name, rng), self.spec)
        seed_transform(self.transform, seed)
        img = self.transform(image=img)["image"]
        x = to_model_input(np.ascontiguousarray(img), self.spec)
        return torch.from_numpy(x), int(self.labels[i]), int(self.species[i]), i


class EvalSet:
    """(views [V, 3, S, S] float32, row index): the inference preprocessing, plus an h-flip if asked."""

    def __init__(self, images: list[str], image_dir, spec, boxes: list, flip: bool):
        self.images, self.image_dir, self.spec = images, Path(image_dir), spec
        self.boxes, self.flip = boxes, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import torch


        x = load_for_model(self.image_dir / self.images[i], self.spec, box=self.boxes[i])
        views = np.stack([x, x[:, :, ::-1]]) if self.flip else x[None]
        return torch.from_numpy(np.ascontiguousarray(views)), i
