"""Photograph one sighting: pose the sprite, put it on a sea background, apply light and optics.

Nuisance variation (all scaled by ``nuisance``; 0 gives canonical views, 1 the default):
rotation (+-15 deg), shear (+-0.12), vertical squash (foreshortening, +-12 %), optional mirror,
scale and position (partly cut off by the frame edge in some shots), waterline (the lower body
submerged), sea/sky gradients with wave noise and foam, brightness/contrast/colour cast, sensor
noise, Gaussian blur, and the JPEG quality chosen by the caller.

Boxes are exact: the bounding box of the visible animal (``body``) and of its dorsal fin (``fin``)
in frame pixels, ``(x1, y1, x2, y2)`` with x2/y2 exclusive (PIL crop convention), clipped to the
frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from whalesub.synth.species import Individual
from whalesub.synth.sprite import FIN, draw_sprite, sprite_bounds

Box = tuple[int, int, int, int]
SEA = ((22, 62, 98), (28, 88, 100), (66, 88, 84), (96, 108, 118), (40, 74, 120))
SKY = ((168, 198, 228), (200, 206, 212), (226, 212, 190))


@dataclass(frozen=True)
class Shot:
    """Parameters of one photograph; ``animal_frac`` is body length / frame width."""

    width: int
    height: int
    animal_frac: tuple[float, float]
    nuisance: float = 1.0
    mirror_share: float = 0.0


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean unit-ish noise [h, w] float32, smooth over ``cells`` (x, y) grid cells."""
    small = rng.standard_normal((cells[1] + 1, cells[0] + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC))


def _cells(size: int, cell: float) -> int:
    return max(1, int(np.ceil(size / max(cell, 1.0))))


def draw_background(rng: np.random.Generator, w: int, h: int, length: float) -> tuple[np.ndarray, int]:
    """Sea (and sometimes sky) background, float32 [h, w, 3] 0-255, and the horizon row (0: none).

    Waves and foam scale with the animal's body length ``length`` (px), as they would in a photo
    framed on the animal, so a large frame shows many small waves rather than a few huge ones.
    """
    sea = np.asarray(SEA[int(rng.integers(len(SEA)))], np.float32) * rng.uniform(0.8, 1.2)
    rows = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = sea * (1.15 - 0.3 * rows) * np.ones((1, w, 1), np.float32)
    waves = _smooth_noise(
        rng, w, h, (_cells(w, length * rng.uniform(0.2, 0.5)), _cells(h, length * rng.uniform(0.04, 0.08)))
    )
    img += (10.0 * waves)[:, :, None]
    foam = _smooth_noise(
        rng, w, h, (_cells(w, length * rng.uniform(0.08, 0.2)), _cells(h, length * rng.uniform(0.025, 0.06)))
    )
    thr = rng.uniform(1.3, 2.2)
    img += (np.clip(foam - thr, 0.0, 0.6) / 0.6 * 150.0)[:, :, None]
    horizon = 0
    if rng.random() < 0.3:
        horizon = int(h * rng.uniform(0.05, 0.25))
        sky = np.asarray(SKY[int(rng.integers(len(SKY)))], np.float32)
        img[:horizon] = sky * (0.9 + 0.1 * rows[:horizon] / max(rows[horizon, 0, 0], 1e-6))
    return img, horizon


def _pose(rng: np.random.Generator, shot: Shot, ind: Individual) -> tuple[np.ndarray, float]:
    """Linear part A (2x2, body lengths -> frame px) and body length in px."""
    nu = shot.nuisance
    theta = np.deg2rad(rng.uniform(-15, 15) * nu)
    shear = rng.uniform(-0.12, 0.12) * nu
    squash = 1.0 + rng.uniform(-0.12, 0.12) * nu
    mirror = -1.0 if rng.random() < shot.mirror_share else 1.0
    c, s = np.cos(theta), np.sin(theta)
    lin = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([mirror, squash])
    length = shot.width * rng.uniform(*shot.animal_frac)
    # Shrink the animal if its posed sprite would not fit in 95 % of the frame.
    x0, y0, x1, y1 = sprite_bounds(ind)
    corners = lin @ np.array([[x0, x1, x1, x0], [y0, y0, y1, y1]])
    extent = corners.max(axis=1) - corners.min(axis=1)
    length = min(length, 0.95 * shot.width / extent[0], 0.95 * shot.height / extent[1])
    return lin, length


def _submerge(rng: np.random.Generator, sprite: np.ndarray, label: np.ndarray, nu: float) -> None:
    """Sink the lowest rows below a waterline: faint under water, and no longer part of the box."""
    if rng.random() >= 0.4 * nu:
        return
    rows = np.nonzero((label > 0).any(axis=1))[0]
    if rows.size == 0:
        return
    cut = int(rows[-1] - rng.uniform(0.0, 0.3) * 0.5 * rows.size)
    sprite[cut:, :, 3] = (sprite[cut:, :, 3] * 0.3).astype(np.uint8)
    label[cut:] = 0


def render_sighting(
    rng: np.random.Generator, ind: Individual, shot: Shot
) -> tuple[Image.Image, dict[str, Box]]:
    """Photograph ``ind`` once: (RGB frame of shot.width x shot.height, {"body": box, "fin": box?})."""
    w, h = shot.width, shot.height
    lin, length = _pose(rng, shot, ind)
    supersample = 2.0 if length < 400 else 1.0
    sprite_img, label = draw_sprite(ind, length * supersample)
    sprite = np.array(sprite_img)
    label = label.copy()
    _submerge(rng, sprite, label, shot.nuisance)

    # Sprite px -> frame px: A / supersample / length-scale, then a translation chosen below.
    a = lin / supersample
    sh, sw = label.shape
    corners = a @ np.array([[0, sw, sw, 0], [0, 0, sh, sh]], dtype=np.float64)
    lo, hi = corners.min(axis=1), corners.max(axis=1)
    pw, ph = int(np.ceil(hi[0] - lo[0])), int(np.ceil(hi[1] - lo[1]))
    inv = np.linalg.inv(a)
    data = (inv[0, 0], inv[0, 1], inv[0, :] @ lo, inv[1, 0], inv[1, 1], inv[1, :] @ lo)
    patch = np.asarray(Image.fromarray(sprite, "RGBA").transform((pw, ph), Image.AFFINE, data, Image.BICUBIC))
    plabel = np.asarray(Image.fromarray(label, "L").transform((pw, ph), Image.AFFINE, data, Image.NEAREST))

    bg, horizon = draw_background(rng, w, h, length)
    cut = rng.uniform(0.0, 0.15) if rng.random() < 0.15 * shot.nuisance else 0.0
    x_lo, x_hi = -cut * pw, w - pw + cut * pw
    y_lo, y_hi = max(horizon - 0.3 * ph, -cut * ph), h - ph + cut * ph
    ox = int(round(rng.uniform(min(x_lo, x_hi), max(x_lo, x_hi))))
    oy = int(round(rng.uniform(min(y_lo, y_hi), max(y_lo, y_hi))))

    # Composite the clipped patch.
    fx0, fy0, fx1, fy1 = max(ox, 0), max(oy, 0), min(ox + pw, w), min(oy + ph, h)
    px0, py0 = fx0 - ox, fy0 - oy
    sub = patch[py0 : py0 + fy1 - fy0, px0 : px0 + fx1 - fx0].astype(np.float32)
    alpha = sub[:, :, 3:4] / 255.0
    bg[fy0:fy1, fx0:fx1] = bg[fy0:fy1, fx0:fx1] * (1.0 - alpha) + sub[:, :, :3] * alpha
    lab = plabel[py0 : py0 + fy1 - fy0, px0 : px0 + fx1 - fx0]

    boxes: dict[str, Box] = {}
    for name, mask in (("body", lab > 0), ("fin", lab == FIN)):
        if mask.sum() < 4:
            continue
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        boxes[name] = (int(fx0 + xs[0]), int(fy0 + ys[0]), int(fx0 + xs[-1] + 1), int(fy0 + ys[-1] + 1))

    img = _apply_light(rng, bg, shot.nuisance)
    out = Image.fromarray(img, "RGB")
    radius = rng.uniform(0.0, 0.8) * shot.nuisance * max(1.0, length / 200.0)
    if radius > 0.25:
        out = out.filter(ImageFilter.GaussianBlur(float(radius)))
    return out, boxes


def _apply_light(rng: np.random.Generator, img: np.ndarray, nu: float) -> np.ndarray:
    """Brightness, contrast, colour cast and sensor noise; float32 [h, w, 3] (modified) -> uint8."""
    gain = 1.0 + rng.uniform(-0.25, 0.25) * nu
    contrast = 1.0 + rng.uniform(-0.2, 0.2) * nu
    cast = 1.0 + rng.uniform(-0.08, 0.08, size=3).astype(np.float32) * nu
    mean = img[::4, ::4].mean(axis=(0, 1))
    img -= mean
    img *= contrast
    img += mean
    img *= gain * cast
    sigma = rng.uniform(0.0, 4.0) * nu
    if sigma > 0.5:  # luminance noise, one draw per pixel
        img += rng.standard_normal(img.shape[:2], dtype=np.float32)[:, :, None] * np.float32(sigma)
    img += 0.5
    return np.clip(img, 0, 255, out=img).astype(np.uint8)
