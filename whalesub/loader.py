"""Parallel image decoding for ``whalesub embed``: a torch DataLoader over fixed batches.

Worker processes call ``whalesub.image.load_for_model`` (one decode per distinct preprocessing
spec) while the main process runs inference on the previous batch. Each batch is padded to the
fixed batch size by repeating its last image, so every model call sees the same shape (ONNX
Runtime / TensorRT plan caches, cuDNN autotuning); the caller drops the padded rows.
"""

from __future__ import annotations

import numpy as np

from whalesub.errors import DataError


class ImageSet:
    """Map-style dataset: index -> (index, [array [C, S_k, S_k] float32 per spec] or error text)."""

    def __init__(self, paths: list[str], boxes: list, specs: list):
        self.paths, self.boxes, self.specs = paths, boxes, specs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from whalesub.image import load_for_model

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


def make_loader(paths: list[str], boxes: list, specs: list, batches: list[list[int]], batch_size: int,
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
