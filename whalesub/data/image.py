"""Image decoding and THE preprocessing: training validation and ``whalesub embed`` both call it.

Pipeline (version ``preprocess='v1'`` of :class:`~whalesub.models.spec.ModelSpec`):

1. :func:`load_image` decodes a file to RGB uint8 [H, W, 3]:
   - JPEGs are decoded in the DCT domain at 1/2, 1/4 or 1/8 scale (Pillow ``draft``, libjpeg's
     scaled IDCT) when the frame, or the box region of it, stays at least ``target`` pixels on
     both sides at that scale; a 3600x2400 photo for a 512 px input is decoded at 900x600.
   - EXIF orientation is applied (as ``ImageOps.exif_transpose`` and ``cv2.imread`` do): the
     result is upright.
   - Boxes are ``(x1, y1, x2, y2)`` in pixels of the upright, full-resolution image (what a
     detector sees when it loads the photo with ``cv2.imread`` or Pillow + exif_transpose).
     They are widened by ``margin``, clipped to the image, mapped into the (possibly downscaled,
     not yet rotated) decoded frame, cropped with outward rounding, then rotated upright.
   - Modes: L/1 -> grey copied to RGB; P -> RGB, or RGBA when it has transparency; LA, PA, RGBA,
     RGBa -> composited on black (transparent pixels become black, not their hidden colour);
     I;16 / I (16-bit grey PNG) -> scaled by 255/65535 and rounded; CMYK, YCbCr, LAB, F -> Pillow's
     conversion to RGB.
2. :func:`to_model_input` resizes to ``image_size`` x ``image_size`` with cv2 (plain resize to the
   square, aspect ratio not kept, as the Happywhale winners did; INTER_AREA when shrinking both
   sides under ``interpolation='area'``, INTER_LINEAR otherwise) and normalises with the spec's
   mean/std -> float32 [C, S, S].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from whalesub.core.errors import DataError

Box = Sequence[float]
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_image(path: str | os.PathLike, *, target: int | tuple[int, int] | None = None,
               box: Box | None = None, margin: float = 0.0) -> np.ndarray:
    """Decode an image (or a box crop of it) to upright RGB uint8 [H, W, 3].

    Args:
        path: image file (any format Pillow reads).
        target: the size the caller will resize to: an int (square side) or (width, height). JPEGs
            are then decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps the returned
            frame or crop at least this large on both sides (when the original is). ``None``:
            full resolution.
        box: (x1, y1, x2, y2) in upright full-resolution pixels; ``None`` = the whole image.
        margin: widen the box on each side by this fraction of its width (x) / height (y).

    Raises:
        DataError naming the path: missing, unreadable or corrupt file; a box that is not
        x1 < x2, y1 < y2 finite numbers or lies outside the image.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            return _decode(im, path, target, box, margin)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image not found: {path}; check the image folder and the image column") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"cannot decode image {path}: {exc}; its header declares more pixels than Pillow "
                        "allows (a decompression bomb or a damaged header): re-export the photo at a normal "
                        "size, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, never a traceback
        why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"cannot decode image {path}: {why}; the file is empty, corrupt, truncated or "
                        "not an image; re-download it or drop it from the list") from None


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image as it stands upright (EXIF orientation applied), without decoding."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_ORIENTATION_TAG, 1)
            except Exception:  # a damaged EXIF block: the stored frame is what decoders show
                orientation = 1
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read the image size ({exc}); replace or remove the file") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_model_input(img: np.ndarray, spec) -> np.ndarray:
    """Resize RGB uint8 [H, W, 3] to the spec's square input and normalise -> float32 [C, S, S].

    ``C`` is ``spec.in_chans`` (1: ITU-R 601 grey from RGB). Values are ``(x / 255 - mean) / std``.
    """
    import cv2

    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"to_model_input needs RGB uint8 [H, W, 3], got {img.dtype} {img.shape}")
    size = spec.image_size
    h, w = img.shape[:2]
    if (w, h) != (size, size):
        img = cv2.resize(img, (size, size), interpolation=_cv2_interpolation(spec.interpolation, w, h, size))
    if spec.in_chans == 1:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    # x * a + b with a = 1 / (255 std), b = -mean / std, on a channel-first copy: ~8x faster than
    # normalising [H, W, C] floats and transposing them afterwards.
    a = (1.0 / (np.asarray(spec.std, dtype=np.float32) * 255.0))[:, None, None]
    b = (-np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32))[:, None, None]
    x = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)
    x *= a
    x += b
    return x


def load_for_model(path: str | os.PathLike, spec, box: Box | None = None) -> np.ndarray:
    """:func:`load_image` at the spec's size and box margin, then :func:`to_model_input`.

    Returns float32 [C, S, S]. This is the one preprocessing function for validation and inference.
    """
    img = load_image(path, target=spec.image_size, box=box, margin=spec.box_margin)
    return to_model_input(img, spec)


def draft_scale(region_w: float, region_h: float, target: tuple[int, int]) -> int:
    """Largest JPEG DCT scale denominator s in (1, 2, 4, 8) with region/s >= target on both sides."""
    k = min(region_w / target[0], region_h / target[1])
    for s in (8, 4, 2):
        if k >= s:
            return s
    return 1


def _decode(im: Image.Image, path: Path, target, box: Box | None, margin: float) -> np.ndarray:
    raw_w, raw_h = im.size
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block must not make a decodable photo unreadable
        orientation = 1
    if orientation not in _TRANSPOSE:
        orientation = 1
    swapped = orientation in (5, 6, 7, 8)
    up_w, up_h = (raw_h, raw_w) if swapped else (raw_w, raw_h)
    if box is not None:
        box = _clip_box(box, margin, up_w, up_h, path)
        region_w, region_h = box[2] - box[0], box[3] - box[1]
    else:
        region_w, region_h = up_w, up_h
    scale = 1.0
    if target is not None:  # draft is a no-op (None) for formats other than JPEG and MPO
        tw, th = (target, target) if isinstance(target, int) else (int(target[0]), int(target[1]))
        s = draft_scale(region_w, region_h, (tw, th))
        if s > 1:
            # Pillow picks the largest s' in (8, 4, 2, 1) with s' <= min(W // w, H // h); asking for
            # (W // s, H // s) makes that exactly s (W // (W // s) lies in [s, 2s)).
            result = im.draft("RGB", (raw_w // s, raw_h // s))
            if result is not None:
                scale = raw_w / result[1][2]
    if box is not None:
        rx1, ry1, rx2, ry2 = _upright_box_to_raw(box, orientation, raw_w, raw_h)
        dec_w, dec_h = im.size
        crop = (max(0, math.floor(rx1 / scale)), max(0, math.floor(ry1 / scale)),
                min(dec_w, math.ceil(rx2 / scale)), min(dec_h, math.ceil(ry2 / scale)))
        im = im.crop(crop)
    else:
        im.load()
    if orientation != 1:
        im = im.transpose(_TRANSPOSE[orientation])
    return _to_rgb_array(im)


#: The smallest crop, in pixels a side, after clipping to the image: a narrower box is refused.
MIN_CROP_PX = 1


def croppable(xyxy: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """[N] bool: which boxes ``xyxy`` [N, 4] (pixels) :func:`load_image` can crop from upright images
    of ``w`` x ``h`` [N] (inf: size unknown) at margin 0, the narrowest crop it makes (a box it
    accepts at margin 0 it accepts at every margin). The rule of :func:`_clip_box`, for whole tables."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = xyxy.T
    ok = np.isfinite(xyxy).all(1) & (x2 > x1) & (y2 > y1)
    with np.errstate(invalid="ignore"):
        side_x = np.minimum(w, x2) - np.maximum(0.0, x1)
        side_y = np.minimum(h, y2) - np.maximum(0.0, y1)
    return ok & (side_x >= MIN_CROP_PX) & (side_y >= MIN_CROP_PX)


def _clip_box(box: Box, margin: float, w: int, h: int, path: Path) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DataError(f"{path}: box must be 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise DataError(f"{path}: bad box {(x1, y1, x2, y2)}; need finite x1 < x2 and y1 < y2 in pixels")
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    x1, y1, x2, y2 = max(0.0, x1 - mx), max(0.0, y1 - my), min(float(w), x2 + mx), min(float(h), y2 + my)
    if x2 - x1 < MIN_CROP_PX or y2 - y1 < MIN_CROP_PX:
        raise DataError(f"{path}: box {tuple(box)} lies outside the {w}x{h} image (after EXIF rotation); "
                        "boxes are in pixels of the upright full-resolution image")
    return x1, y1, x2, y2


def _upright_box_to_raw(box, orientation: int, raw_w: int, raw_h: int) -> tuple[float, ...]:
    """Map a box from upright (EXIF-corrected) coordinates to the stored frame's coordinates."""
    W, H = raw_w, raw_h

    def to_raw(u: float, v: float) -> tuple[float, float]:
        return {
            1: (u, v), 2: (W - u, v), 3: (W - u, H - v), 4: (u, H - v),
            5: (v, u), 6: (v, H - u), 7: (W - v, H - u), 8: (W - v, u),
        }[orientation]

    (ax, ay), (bx, by) = to_raw(box[0], box[1]), to_raw(box[2], box[3])
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8 [H, W, 3] (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in ("L", "1"):
        return np.repeat(np.asarray(im.convert("L"), dtype=np.uint8)[:, :, None], 3, axis=2)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255
        return rgb.astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im).astype(np.float32)
        grey = np.clip(np.rint(grey * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _cv2_interpolation(name: str, w: int, h: int, size: int) -> int:
    import cv2

    if name == "area":
        return cv2.INTER_AREA if (size <= w and size <= h) else cv2.INTER_LINEAR
    return {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}[name]
