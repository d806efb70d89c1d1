"""Species and individuals of the synthetic set: what each animal looks like, independent of any photo.

A species fixes the silhouette (body depth, dorsal fin shape, beak) and the base colour. An
individual fixes its identity: a handful of coarse, high-contrast marks (spots, scars, pigment
patches) at individual-specific positions, sizes and colours, notches cut into the trailing edge
of its dorsal fin, and small variations of fin height and sweep. Marks are chosen to survive a
downscale to 64 px: each is at least ~12 % of the body depth across.

Units: body-local coordinates, body length = 1, x from head (0) to tail (1), y downwards with the
body's mid line at 0; colours are RGB 0-255.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Species:
    """Silhouette and colour of one species (competition spelling in ``name``)."""

    name: str
    colour: RGB
    depth: float  # body depth / body length
    fin_height: float  # dorsal fin height / body length (0: no fin, e.g. beluga)
    fin_base: float  # fin base width / body length
    fin_sweep: float  # tip offset backwards, in fin base widths (0 upright, ~1 falcate)
    fin_pos: float  # x of the fin base centre
    beak: float  # rostrum length / body length (dolphins)
    weight: float  # relative frequency among individuals
    typo: str | None = None  # a misspelling seen in the competition's train.csv
    saddle: bool = False  # killer-whale eye patch and saddle


# Ordered by frequency; the first K are used for ``n_species=K``. Spellings and typos follow the
# competition's train.csv (``kiler_whale``, ``bottlenose_dolpin``, ``globis``).
SPECIES: tuple[Species, ...] = (
    Species(
        "bottlenose_dolphin", (118, 126, 136), 0.20, 0.15, 0.16, 0.75, 0.52, 0.06, 5.0, "bottlenose_dolpin"
    ),
    Species("humpback_whale", (46, 49, 56), 0.22, 0.06, 0.12, 0.35, 0.64, 0.0, 4.0),
    Species("beluga", (222, 222, 214), 0.25, 0.0, 0.0, 0.0, 0.5, 0.0, 2.5),
    Species("killer_whale", (24, 24, 28), 0.22, 0.28, 0.14, 0.08, 0.46, 0.0, 2.0, "kiler_whale", True),
    Species("blue_whale", (92, 112, 138), 0.14, 0.035, 0.08, 0.5, 0.74, 0.0, 2.0),
    Species("short_finned_pilot_whale", (34, 34, 40), 0.22, 0.11, 0.22, 0.55, 0.4, 0.0, 1.5, "globis"),
    Species("spinner_dolphin", (104, 110, 122), 0.17, 0.14, 0.12, 0.2, 0.5, 0.09, 1.5),
    Species("fin_whale", (78, 84, 94), 0.15, 0.07, 0.10, 0.8, 0.7, 0.0, 1.5),
)

# Another spelling of the pilot whale seen in the competition, used for every second typo row.
EXTRA_TYPOS = {"short_finned_pilot_whale": ("globis", "pilot_whale")}

LIGHT_MARKS: tuple[RGB, ...] = (
    (246, 246, 240),
    (236, 214, 120),
    (242, 160, 96),
    (190, 228, 240),
    (236, 160, 186),
)
DARK_MARKS: tuple[RGB, ...] = ((12, 12, 18), (92, 46, 22), (24, 48, 110), (120, 24, 30), (16, 84, 60))
# ``marks="scar"``: white/pale and black/dark only, like real scars and pigment; identity then lies
# in where the marks are, not in their colours.
SCAR_LIGHT: tuple[RGB, ...] = ((246, 246, 240), (196, 196, 190))
SCAR_DARK: tuple[RGB, ...] = ((12, 12, 18), (66, 66, 70))


@dataclass(frozen=True)
class Mark:
    """One body mark: ``kind`` in {spot, scar, patch}; position (x, v) with v in [-1, 1] of the
    local half depth; ``size`` in body depths; ``angle`` in radians; ``shape`` extra radii."""

    kind: str
    x: float
    v: float
    size: float
    angle: float
    colour: RGB
    shape: tuple[float, ...] = ()


@dataclass(frozen=True)
class Individual:
    """One animal: its id, species and the traits that identify it."""

    individual_id: str
    species: Species
    colour: RGB
    fin_height: float
    fin_sweep: float
    marks: tuple[Mark, ...]
    notches: tuple[tuple[float, float], ...] = field(default=())  # (t along trailing edge, depth)


def luminance(rgb: RGB) -> float:
    """Rec. 601 luma of an RGB colour, 0-255."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def draw_individual(
    rng: np.random.Generator, individual_id: str, species: Species, marks: str = "colour"
) -> Individual:
    """Draw the identity traits of one animal of ``species``.

    Marks avoid each other (centres at least ~0.1 body lengths apart) so that every mark stays
    visible; their colours contrast with the body: light on dark species, dark on light ones,
    either on mid-grey ones.
    """
    light, dark = (LIGHT_MARKS, DARK_MARKS) if marks == "colour" else (SCAR_LIGHT, SCAR_DARK)
    lum = luminance(species.colour)
    if lum < 100:
        palette = light
    elif lum > 170:
        palette = dark
    else:
        palette = light + dark
    n_marks = int(rng.integers(4, 7))
    marks: list[Mark] = []
    xs: list[float] = []
    for _ in range(n_marks):
        for _attempt in range(20):
            x = float(rng.uniform(0.1, 0.86))
            if all(abs(x - other) > 0.09 for other in xs):
                break
        xs.append(x)
        kind = str(rng.choice(["spot", "spot", "scar", "patch"]))
        size = float(rng.uniform(0.3, 0.55)) if kind != "scar" else float(rng.uniform(0.5, 0.8))
        shape = tuple(float(r) for r in rng.uniform(0.6, 1.2, size=7)) if kind == "patch" else ()
        marks.append(
            Mark(
                kind=kind,
                x=x,
                v=float(rng.uniform(-0.65, 0.6)),
                size=size,
                angle=float(rng.uniform(0, np.pi)),
                colour=palette[int(rng.integers(len(palette)))],
                shape=shape,
            )
        )
    notches: tuple[tuple[float, float], ...] = ()
    if species.fin_height > 0:
        n_notches = int(rng.integers(0, 4))
        ts = np.sort(rng.uniform(0.15, 0.85, size=n_notches))
        notches = tuple((float(t), float(rng.uniform(0.18, 0.4))) for t in ts)
    shade = rng.uniform(0.88, 1.12)
    colour = tuple(int(np.clip(c * shade, 0, 255)) for c in species.colour)
    return Individual(
        individual_id=individual_id,
        species=species,
        colour=colour,  # type: ignore[arg-type]
        fin_height=species.fin_height * float(rng.uniform(0.85, 1.15)),
        fin_sweep=species.fin_sweep + float(rng.uniform(-0.15, 0.15)),
        marks=tuple(marks),
        notches=notches,
    )
