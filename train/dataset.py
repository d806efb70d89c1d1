"""Training and evaluation datasets: albumentations 2.0.8 pipelines, box crops, image checks.

- Training: ``whalesub.data.image.load_image`` (decode, EXIF, RGB, box crop; JPEGs DCT-downscaled only
  as far as the smallest random crop keeps >= the input side, see :func:`decode_target`) -> a
  random resized crop taken from that decoded frame and resized ONCE to the input side
  (:func:`random_resized_crop`; crop scale/ratio are relative to the square the network sees, as
  inference squashes the frame) -> albumentations at the input side (flip, affine, colour, grey,
  blur/noise, coarse dropout) -> ``whalesub.data.image.to_model_input`` (normalise with the spec's
  mean/std). Crops are never upsampled unless the photo itself is smaller than the input.
- Evaluation (validation gallery/queries, test): exactly ``whalesub.data.image.load_for_model``, no
  randomness, optionally with a horizontally flipped second view.

Randomness is a pure function of (seed, epoch, sample index): every sample seeds its own
generators, so augmentations do not depend on data-loader workers or on where a run resumed.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.errors import DataError
from whalesub.data import image
from whalesub.data.contract import choose_box_type, find_missing_files
from whalesub.data.image import load_for_model, to_model_input

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


def decode_target(cfg) -> tuple[int, int]:
    """(width, height) in px the decoded frame must keep so the smallest random crop
    (``aug_rrc_scale``/``aug_rrc_ratio`` in input-square units) is still >= ``image_size``."""
    (a_lo, _), (r_lo, r_hi) = cfg.aug_rrc_scale, cfg.aug_rrc_ratio
    w_min = min(1.0, math.sqrt(a_lo * r_lo))  # crop side as a fraction of the frame side
    h_min = min(1.0, math.sqrt(a_lo / r_hi))
    return math.ceil(cfg.image_size / w_min), math.ceil(cfg.image_size / h_min)


def sample_crop(rng: np.random.Generator, scale, ratio) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) as fractions of the frame: area ``w * h`` in ``scale``, aspect ``w / h`` in
    ``ratio`` (log-uniform), measured on the squashed square; torchvision's rule (10 tries, then
    the whole frame clipped to the ratio range)."""
    for _ in range(10):
        area = rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(area * r), math.sqrt(area / r)
        if w <= 1.0 and h <= 1.0:
            return rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h), w, h
    r = min(max(1.0, ratio[0]), ratio[1])
    w, h = (1.0, 1.0 / r) if r >= 1.0 else (r, 1.0)
    return (1.0 - w) / 2, (1.0 - h) / 2, w, h


def random_resized_crop(img: np.ndarray, rng: np.random.Generator, size: int, scale, ratio) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: a :func:`sample_crop` region of the frame at its
    decoded resolution, resized once (INTER_AREA when shrinking both sides, else INTER_LINEAR)."""
    import cv2

    x0, y0, w, h = sample_crop(rng, scale, ratio)
    height, width = img.shape[:2]
    x1, y1 = min(int(round(x0 * width)), width - 1), min(int(round(y0 * height)), height - 1)
    x2, y2 = max(x1 + 1, int(round((x0 + w) * width))), max(y1 + 1, int(round((y0 + h) * height)))
    crop = img[y1:y2, x1:x2]
    shrink = crop.shape[0] >= size and crop.shape[1] >= size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def build_train_transform(cfg):
    """The training augmentation (albumentations 2.x names) on the ``cfg.image_size`` square crop."""
    import albumentations as A
    import cv2

    holes = max(1, cfg.aug_dropout_holes)
    hole = (min(0.05, cfg.aug_dropout_size), cfg.aug_dropout_size)
    return A.Compose([
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
        """The box type evaluation crops: :func:`whalesub.data.contract.choose_box_type`, the rule of
        ``whalesub embed --box-type`` (one type in the table: that one; several: name one)."""
        return choose_box_type(self.kinds, box_type, "boxes_csv", "eval_box_type")

    def best(self, image: str, box_type: str | None) -> tuple | None:
        """The deterministic evaluation box of ``image`` (:meth:`eval_type`), or None (whole frame).

        It ignores the training mix: evaluation crops what ``whalesub embed --box-type`` crops.
        """
        kind = self.eval_type(box_type)  # pseudo rows carry a folder: boxes are keyed by file name
        return next((o[:4] for o in self.all_by_image.get(os.path.basename(image), []) if o[4] == kind), None)


def decode(path: Path, box, spec, target: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] RGB through whalesub.data.image (box crop mapped to the decoded scale); JPEGs are
    DCT-downscaled as far as the frame (or box) stays >= ``target`` (width, height) px."""

    return image.load_image(path, target=target, box=box, margin=spec.box_margin)


def augment(img: np.ndarray, transform, rng: np.random.Generator, seed: int, cfg) -> np.ndarray:
    """Decoded uint8 [H, W, 3] -> augmented uint8 [S, S, 3]: crop + one resize, then ``transform``."""
    img = random_resized_crop(img, rng, cfg.image_size, cfg.aug_rrc_scale, cfg.aug_rrc_ratio)
    seed_transform(transform, seed)
    return transform(image=img)["image"]


class TrainSet:
    """(input [3, S, S] float32, individual code int64, species code int64, row index) per row."""

    def __init__(self, df: pd.DataFrame, image_dir, labels: np.ndarray, species: np.ndarray, spec, cfg,
                 boxes: BoxTable):
        self.images = df["image"].astype(str).tolist()
        self.image_dir, self.labels, self.species = Path(image_dir), labels, species
        self.spec, self.cfg, self.boxes = spec, cfg, boxes
        self.transform = build_train_transform(cfg)
        self.target = decode_target(cfg)
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
        img = decode(self.image_dir / name, self.boxes.sample(name, rng), self.spec, self.target)
        img = augment(img, self.transform, rng, seed, self.cfg)
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
