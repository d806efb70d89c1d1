"""Who is photographed how often: the catalogue, its long tail, and the train/test split.

Train: ``singleton_share`` of the catalogue has exactly one photo; the others have 2 or more from
a heavy-tailed (Pareto) law capped at ``max_images``, and the most photographed animal has exactly
``max_images`` (the real set's long tail: 59 % singletons, one animal with 400 photos).
Test: ``n_test`` photos, of which ``round(new_share * n_test)`` show animals absent from train
(1-2 photos each); the rest show catalogue animals drawn with probability proportional to the
square root of their train count, so singletons also come back.

Names are anonymous: images are the first 14 hex digits of a SHA-256 of (seed, split, index),
individual ids the first 12 of (seed, index); neither reveals the label.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from whalesub.synth.species import SPECIES, Individual, draw_individual


@dataclass(frozen=True)
class Photo:
    """One image to render: file name, split, the animal's index in ``Plan.individuals``, and the
    seed path of its own random stream."""

    image: str
    split: str  # "train" | "test"
    individual: int
    stream: tuple[int, ...]
    large: bool = False


@dataclass(frozen=True)
class Plan:
    individuals: tuple[Individual, ...]  # the catalogue first, then the test-only animals
    n_known: int
    photos: tuple[Photo, ...]


def _digest(*parts: object, n: int) -> str:
    return hashlib.sha256(":".join(map(str, ("whalesub-synth", *parts))).encode()).hexdigest()[:n]


def train_counts(rng: np.random.Generator, n: int, singleton_share: float, max_images: int) -> np.ndarray:
    """Photos per catalogue animal (int64 [n]), shuffled; see the module docstring for the law."""
    n_single = int(round(singleton_share * n))
    n_multi = n - n_single
    multi = np.minimum(max_images, 2 + np.floor(rng.pareto(1.4, size=n_multi) * 2.5)).astype(np.int64)
    if n_multi:
        multi[int(np.argmax(multi))] = max_images
    counts = np.concatenate([np.ones(n_single, np.int64), multi])
    return counts[rng.permutation(n)]


def make_plan(
    seed: int,
    n_individuals: int,
    n_species: int,
    singleton_share: float,
    max_images: int,
    n_test: int | None,
    new_share: float,
    n_large: int,
    marks: str = "colour",
) -> Plan:
    """Draw the catalogue, the photos per animal and the split; deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 0])
    species = SPECIES[:n_species]
    weights = np.array([s.weight for s in species])
    counts = train_counts(rng, n_individuals, singleton_share, max_images)
    n_train = int(counts.sum())
    n_test = int(round(0.35 * n_train)) if n_test is None else n_test
    n_new_photos = int(round(new_share * n_test))

    new_counts: list[int] = []
    while sum(new_counts) < n_new_photos:
        new_counts.append(min(int(rng.choice([1, 1, 1, 2])), n_new_photos - sum(new_counts)))
    n_total = n_individuals + len(new_counts)
    kinds = rng.choice(len(species), size=n_total, p=weights / weights.sum())
    individuals = tuple(
        draw_individual(
            np.random.default_rng([seed, 1, i]), _digest(seed, "id", i, n=12), species[int(kinds[i])], marks
        )
        for i in range(n_total)
    )

    owners: list[tuple[str, int]] = [
        ("train", i) for i in range(n_individuals) for _ in range(int(counts[i]))
    ]
    p = np.sqrt(counts) / np.sqrt(counts).sum()
    known = rng.choice(n_individuals, size=n_test - n_new_photos, p=p) if n_test > n_new_photos else []
    owners += [("test", int(i)) for i in known]
    owners += [("test", n_individuals + j) for j, c in enumerate(new_counts) for _ in range(c)]
    large = set(rng.choice(len(owners), size=min(n_large, len(owners)), replace=False).tolist())
    photos = tuple(
        Photo(_digest(seed, split, k, n=14) + ".jpg", split, ind, (seed, 2, k), k in large)
        for k, (split, ind) in enumerate(owners)
    )
    assert len({ph.image for ph in photos}) == len(photos), "image name collision"
    return Plan(individuals=individuals, n_known=n_individuals, photos=photos)
