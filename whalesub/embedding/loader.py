"""The inputs of ``whalesub embed``: the image listing, box crops, and parallel decoding.

:func:`list_images` and :func:`select_boxes` check the listing and the box file up front (every
problem at once). :func:`make_loader` is a torch DataLoader over fixed batches.

Its worker processes call ``whalesub.data.image.load_for_model`` (one decode per distinct preprocessing
spec) while the main process runs inference on the previous batch. Each batch is padded to the
fixed batch size by repeating its last image, so every model call sees the same shape (ONNX
Runtime / TensorRT plan caches, cuDNN autotuning); the caller drops the padded rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import choose_box_type, find_missing_files, read_boxes, read_test_listing
from whalesub.data.image import load_for_model

log = logging.getLogger(__name__)


def list_images(images: Path | None, listing: Path | None) -> tuple[list[str], Path]:
    """Image names in listing order and their folder; every missing file is reported at once."""

    if images is None and listing is None:
        raise ConfigError("say which images to embed: --images DIR (all images in it) "
                          "or --list CSV [--images DIR]")
    if listing is not None:
        names = read_test_listing(listing)
        folder = images if images is not None else listing.parent
    else:
        names = read_test_listing(images)
        folder = images
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; "
                        "pass the folder holding the images with --images")
    missing = find_missing_files(names, folder)
    if missing:
        shown = "\n".join(f"  - {m}" for m in missing[:200]) + (f"\n  ... and {len(missing) - 200} more"
                                                                  if len(missing) > 200 else "")
        raise DataError(f"{len(missing)} of {len(names)} listed images are missing from {folder}; fix the "
                        f"listing or the folder:\n{shown}")
    return names, folder


def select_boxes(path: Path, box_type: str | None, names: list[str]) -> list[tuple | None]:
    """Per name, its box (x1, y1, x2, y2, conf) in original-image pixels, or None (full frame).

    ``conf`` is 1.0 when the file has no ``conf`` column; :func:`apply_box_conf` drops the boxes
    below a model's ``box_conf`` once the models are known.
    """

    boxes = read_boxes(path)
    if "box_type" in boxes.columns:
        boxes = boxes[boxes["box_type"] == choose_box_type(boxes["box_type"], box_type, path)]
    elif box_type is not None:
        raise DataError(f"--box-type {box_type!r} given but box file {path} has no 'box_type' column")
    confs = boxes["conf"] if "conf" in boxes.columns else [1.0] * len(boxes)
    table = {r.image: (r.x1, r.y1, r.x2, r.y2, float(c))
             for r, c in zip(boxes.itertuples(index=False), confs, strict=True)}
    picked = [table.get(n) for n in names]
    hits = sum(b is not None for b in picked)
    if hits == 0:
        raise DataError(f"box file {path} has no box for any of the {len(names)} listed images (e.g. "
                        f"{first_few(names, 3)}; it names {first_few(list(table), 3)}): "
                        "wrong box file for this image set?")
    if hits < len(names):
        log.warning("%d of %d images have no box in %s: they are embedded uncropped", len(names) - hits,
                    len(names), path)
    return picked


def apply_box_conf(boxes: list[tuple | None], min_conf: float) -> list[tuple | None]:
    """(x1, y1, x2, y2, conf) boxes -> (x1, y1, x2, y2), None where conf < ``min_conf``.

    The same rule as training (``box_conf``): a low-confidence box means the whole frame.
    """
    out = [None if b is None or b[4] < min_conf else tuple(b[:4]) for b in boxes]
    dropped = sum(b is not None for b in boxes) - sum(b is not None for b in out)
    if dropped:
        log.info("%d boxes below confidence %.3g ignored: those images are embedded whole", dropped, min_conf)
    return out


class ImageSet:
    """Map-style dataset: index -> (index, [array [C, S_k, S_k] float32 per spec] or error text)."""

    def __init__(self, paths: list[str], boxes: list, specs: list):
        self.paths, self.boxes, self.specs = paths, boxes, specs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):

        try:
            return i, [load_for_model(self.paths[i], spec, box=self.boxes[i]) for spec in self.specs]
        except Exception as exc:  # noqa: BLE001 - reported with the file name in the main process
            return i, f"{type(exc).__name__}: {exc}"


class _Collate:
    def __init__(self, batch_size: int, paths: list[str]):
        self.batch_size, self.paths = batch_size, paths

    def __call__(self, items):
        errors = [(self.paths[i], r) for i, r in items if isinstance(r, str)]
        if errors:
            return None, errors
        positions = [i for i, _ in items]
        pad = self.batch_size - len(items)
        import torch

        arrays = [torch.from_numpy(np.stack([r[k] for _, r in items] + [items[-1][1][k]] * pad)
                                   .astype(np.float32, copy=False)) for k in range(len(items[0][1]))]
        return positions, arrays


def make_loader(paths: list[str], boxes: list, specs: list, batches: Iterable[list[int]], batch_size: int,
                workers: int, pin_memory: bool = False):
    """Yield (positions [b], inputs [tensor [batch_size, C, S, S] float32 per spec]) for each batch.

    ``pin_memory``: page-locked batches (pinned in the loader's thread) for fast, asynchronous
    host-to-GPU copies.

    Raises DataError naming every image of a batch that failed to decode.
    """
    import torch

    loader = torch.utils.data.DataLoader(
        ImageSet(paths, boxes, specs), batch_sampler=batches, num_workers=workers,
        collate_fn=_Collate(batch_size, paths), prefetch_factor=4 if workers else None,
        persistent_workers=False, pin_memory=pin_memory,
    )
    for positions, arrays in loader:
        if positions is None:
            shown = "\n".join(f"  - {p}: {e}" for p, e in arrays)
            raise DataError(f"cannot decode {len(arrays)} image(s); fix or remove them from the listing "
                            f"(chunks done so far are kept for resuming):\n{shown}")
        yield positions, arrays
