"""Sharding ``whalesub embed`` over machines or GPUs, and merging the shard files.

``--shard i/n`` embeds the i-th of n contiguous blocks of the listing (0-based, sizes differing
by at most one): every shard sees the same listing and computes the same split. Each shard file
records the listing digest, its block and the run's fingerprint; ``merge_embeddings`` checks that
the files come from one listing, one model set and one TTA setting, that the blocks cover the
listing exactly once, and writes them back in listing order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.ranking.store import load_embeddings, save_embeddings

log = logging.getLogger(__name__)

_MUST_AGREE = ("fingerprint", "tta", "tta_reduce", "views_per_image", "box_type")


def parse_shard(shard: str | None, n: int) -> tuple[int, int, int, int]:
    """``"i/n"`` (0-based i) -> (i, count, start, stop) of the listing's contiguous block i."""
    if shard is None:
        return 0, 1, 0, n
    try:
        i, count = (int(p) for p in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: write it as i/n, e.g. 0/4 "
                          "(shards are numbered from 0)") from None
    if not (count >= 1 and 0 <= i < count):
        raise ConfigError(f"--shard {shard!r}: need 0 <= i < n (shards are numbered from 0 to n-1)")
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return i, count, int(bounds[i]), int(bounds[i + 1])


def merge_embeddings(paths: list[Path], out: Path) -> Path:
    """Merge shard files of one ``whalesub embed --shard i/n`` run into ``out`` (listing order)."""

    if not paths:
        raise ConfigError("merge-embeddings needs the shard files to merge")
    files = [load_embeddings(p) for p in paths]
    problems = []
    for f in files:
        if "shard" not in f.meta:
            problems.append(f"{f.path} has no shard information (meta['shard']): "
                            "it was not made with --shard")
    if problems:
        raise DataError("cannot merge:", problems)
    first = files[0]
    for f in files[1:]:
        for key in _MUST_AGREE + ("n_images",):
            if f.meta.get(key) != first.meta.get(key):
                problems.append(f"{f.path}: meta[{key!r}] = {f.meta.get(key)!r} differs from {first.path}'s "
                                f"{first.meta.get(key)!r}")
        for key in ("count", "listing"):
            if f.meta["shard"].get(key) != first.meta["shard"].get(key):
                problems.append(f"{f.path}: shard {key} differs from {first.path}'s "
                                "(different --shard n or listing)")
    if problems:
        raise DataError("the shard files come from different runs; re-embed the odd ones with the same "
                        "models, listing and options:", problems)
    count = first.meta["shard"]["count"]
    by_index: dict[int, list] = {}
    for f in files:
        by_index.setdefault(f.meta["shard"]["index"], []).append(f)
    dup = [str(f.path) for fs in by_index.values() if len(fs) > 1 for f in fs]
    missing = sorted(set(range(count)) - set(by_index))
    if dup:
        problems.append(f"the same shard appears more than once: {first_few(dup)}")
    if missing:
        problems.append(f"shard(s) {missing} of {count} missing: embed them with --shard i/{count}")
    if problems:
        raise DataError("cannot merge:", problems)
    ordered = [by_index[i][0] for i in range(count)]
    views = int(first.meta.get("views_per_image", 1))
    for f in ordered:
        s = f.meta["shard"]
        if len(f) != (s["stop"] - s["start"]) * views:
            raise DataError(f"{f.path}: holds {len(f)} rows but shard {s['index']} covers images "
                            f"{s['start']}..{s['stop']} x {views} views; re-embed it")
    meta = {k: v for k, v in first.meta.items() if k not in ("shard", "created", "format", "format_version")}
    meta["merged_from"] = [str(f.path) for f in ordered]
    ids = np.concatenate([f.ids for f in ordered])
    vectors = np.concatenate([f.vectors for f in ordered])
    save_embeddings(out, ids, vectors, meta)
    log.info("merged %d shards -> %s (%d rows)", count, out, len(ids))
    return out
