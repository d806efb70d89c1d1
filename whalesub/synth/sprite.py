"""Draw one individual, unposed, as an RGBA sprite plus a part label map (body, fin).

The sprite is drawn in body-local coordinates (body length = 1, head at x=0, y downwards) scaled to
``scale`` pixels per body length. The label map holds 0 (background, including fin notches),
1 (body) and 2 (dorsal fin); it gives the exact boxes after posing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from whalesub.synth.species import Individual, luminance

BODY, FIN = 1, 2
X_MIN, X_MAX = -0.12, 1.14  # sprite extent in body lengths (beak in front, fluke behind)


def profile(x: np.ndarray, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """Top and bottom edge (y, body lengths) of the body at positions ``x`` in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    front = np.sqrt(np.clip(1.0 - ((0.3 - x) / 0.3) ** 2, 0.0, 1.0))
    back = np.clip(1.0 - np.clip((x - 0.3) / 0.7, 0.0, 1.0) ** 1.6, 0.0, 1.0) ** 0.8
    t = np.maximum(np.where(x < 0.3, front, back), 0.12 * (x > 0.5))
    return -0.55 * depth * t, 0.45 * depth * t


def sprite_bounds(ind: Individual) -> tuple[float, float, float, float]:
    """(x_min, y_min, x_max, y_max) of the sprite in body lengths."""
    depth = ind.species.depth
    return X_MIN, -0.55 * depth - ind.fin_height - 0.03, X_MAX, 0.45 * depth + 0.03


def _bezier(p0, p1, p2, n: int = 16) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def _ellipse(cx, cy, rx, ry, angle, radii=(), n: int = 24) -> np.ndarray:
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    r = np.interp(a, np.linspace(0, 2 * np.pi, len(radii) + 1), [*radii, radii[0]]) if radii else 1.0
    x, y = rx * r * np.cos(a), ry * r * np.sin(a)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def body_outline(ind: Individual) -> np.ndarray:
    """Closed body polygon (N x 2, body lengths), fluke included."""
    depth = ind.species.depth
    xs = np.linspace(0.0, 0.96, 48)
    top, bot = profile(xs, depth)
    tail = [
        (0.95, -0.06 * depth),
        (1.06, -0.16 * depth),
        (1.12, -0.03 * depth),
        (1.12, 0.05 * depth),
        (1.06, 0.12 * depth),
        (0.95, 0.05 * depth),
    ]
    return np.concatenate([np.stack([xs, top], 1), np.asarray(tail), np.stack([xs[::-1], bot[::-1]], 1)])


def fin_outline(ind: Individual) -> tuple[np.ndarray, np.ndarray]:
    """(fin polygon, trailing edge polyline), body lengths; the base dips into the body."""
    sp = ind.species
    half = sp.fin_base / 2
    x0, x1 = sp.fin_pos - half, sp.fin_pos + half
    y0 = float(profile(np.array([x0]), sp.depth)[0][0]) + 0.02
    y1 = float(profile(np.array([x1]), sp.depth)[0][0]) + 0.02
    y_top = float(profile(np.array([sp.fin_pos]), sp.depth)[0][0])
    tip = (sp.fin_pos + ind.fin_sweep * sp.fin_base, y_top - ind.fin_height)
    lead = _bezier((x0, y0), (x0 + 0.15 * sp.fin_base, tip[1] + 0.3 * ind.fin_height), tip)
    bend = 0.45 * sp.fin_base * max(ind.fin_sweep, 0.0)
    trail = _bezier(tip, (0.5 * (tip[0] + x1) - bend, 0.5 * (tip[1] + y1)), (x1, y1))
    return np.concatenate([lead, trail[1:]]), trail


def _notch(trail: np.ndarray, centroid: np.ndarray, t: float, depth: float, fin_w: float) -> np.ndarray:
    """Triangle cut into the fin at fraction ``t`` along its trailing edge, ``depth`` in fin base
    widths ``fin_w`` (body lengths)."""
    seg = np.cumsum(np.r_[0.0, np.linalg.norm(np.diff(trail, axis=0), axis=1)])
    at = lambda s: np.array([np.interp(s, seg, trail[:, 0]), np.interp(s, seg, trail[:, 1])])  # noqa: E731
    s, w = t * seg[-1], min(0.08 * seg[-1], 0.3 * fin_w)
    a, b, p = at(s - w), at(s + w), at(s)
    normal = np.array([-(b - a)[1], (b - a)[0]])
    normal /= np.linalg.norm(normal) + 1e-12
    if np.dot(centroid - p, normal) < 0:
        normal = -normal
    outward = -normal * 0.05 * fin_w  # start just outside the edge so the cut is clean
    return np.stack([a + outward, b + outward, p + normal * depth * fin_w])


def draw_sprite(ind: Individual, scale: float) -> tuple[Image.Image, np.ndarray]:
    """Render ``ind`` at ``scale`` px per body length.

    Returns (RGBA sprite, label map uint8 [h, w] with 0/1/2); alpha is 255 where label > 0.
    """
    sp = ind.species
    x_min, y_min, x_max, y_max = sprite_bounds(ind)
    size = (int(np.ceil((x_max - x_min) * scale)), int(np.ceil((y_max - y_min) * scale)))

    def px(points: np.ndarray) -> list[tuple[float, float]]:
        pts = (np.asarray(points, dtype=np.float64) - (x_min, y_min)) * scale
        return [tuple(p) for p in pts]

    label = Image.new("L", size, 0)
    ld = ImageDraw.Draw(label)
    ld.polygon(px(body_outline(ind)), fill=BODY)
    d = sp.depth
    if sp.beak > 0:
        ld.polygon(
            px([(0.05, -0.02 * d), (-sp.beak, 0.1 * d), (-sp.beak, 0.2 * d), (0.06, 0.3 * d)]), fill=BODY
        )
    if ind.fin_height > 0:
        fin, trail = fin_outline(ind)
        ld.polygon(px(fin), fill=FIN)
        centroid = fin.mean(axis=0)
        for t, depth in ind.notches:
            ld.polygon(px(_notch(trail, centroid, t, depth, sp.fin_base)), fill=0)

    rgb = Image.new("RGB", size, ind.colour)
    cd = ImageDraw.Draw(rgb)
    if sp.saddle:  # killer whale: white eye patch and belly, grey saddle behind the fin
        white = (236, 236, 232)
        cd.polygon(px(_ellipse(0.2, -0.04 * d, 0.07, 0.1 * d, -0.15)), fill=white)
        cd.polygon(
            px([(0.05, 0.3 * d), (0.3, 0.2 * d), (0.6, 0.3 * d), (0.7, 0.5 * d), (0.05, 0.5 * d)]), fill=white
        )
        cd.polygon(px(_ellipse(sp.fin_pos + 0.1, -0.5 * d, 0.08, 0.12 * d, 0.0)), fill=(120, 120, 124))
    for m in ind.marks:
        top, bot = profile(np.array([m.x]), d)
        cy = 0.5 * (top[0] + bot[0]) + m.v * 0.5 * (bot[0] - top[0])
        r = 0.5 * m.size * d
        if m.kind == "scar":
            poly = _ellipse(m.x, cy, r, 0.12 * d, m.angle, n=12)
        elif m.kind == "patch":
            poly = _ellipse(m.x, cy, r, 0.8 * r, m.angle, radii=m.shape)
        else:
            poly = _ellipse(m.x, cy, r, 0.75 * r, m.angle)
        cd.polygon(px(poly), fill=m.colour)

    lab = np.asarray(label)
    arr = np.asarray(rgb).astype(np.float32)
    # Countershading: darker back, lighter belly, stronger on dark species.
    rows = np.linspace(-1.0, 1.0, size[1], dtype=np.float32)[:, None, None]
    amp = 0.18 if luminance(ind.colour) < 150 else 0.08
    arr = np.clip(arr * (1.0 + amp * rows), 0, 255)
    alpha = np.where(lab > 0, 255, 0).astype(np.uint8)
    rgba = np.dstack([arr.astype(np.uint8), alpha])
    return Image.fromarray(rgba, "RGBA"), lab
