"""``whalesub embed``: images -> one L2-normalised vector (or view) per image, in an embedding file.

Pipeline: worker processes decode and preprocess images with ``whalesub.data.image.load_for_model``
(THE function training validation uses: DCT-domain JPEG downscale, EXIF, any mode to RGB, box
crops) while the main process runs the model(s) on fixed-size batches (the last batch is padded
by repeating its last image and the padding is dropped), so decoding overlaps inference.

- Flip TTA (``tta="flip"``): per model, the normalised sum of the original and horizontally
  flipped views (both in one model call of 2 x batch size; torch mirrors on the device).
  ``flip_views=True`` instead stores both views as separate rows (ids repeated, ``[orig, hflip]``
  per image) for a flipped gallery.
- Several models (folds): per-model unit vectors (after TTA) are concatenated and renormalised,
  which makes the inner product the mean of the per-model cosines. Each model decodes at its own
  spec (models sharing the same preprocessing share one decode), so folds of different input
  sizes can be combined and every model sees exactly its training-validation input.
- Resumable: every ``chunk`` images the vectors go atomically to ``<out>.parts/``; re-running the
  same command continues there. Chunks are multiples of the batch size and batches never cross
  a chunk, so a resumed run computes exactly the batches an uninterrupted one does and the final
  arrays are identical. The final file is written atomically and the parts folder removed.
- ``meta["fingerprint"]``: the model's fingerprint (ModelSpec, which includes every preprocessing
  field, + weights digest; the same value training writes into its OOF files), or a hash of the
  ordered fingerprints of several models; gallery and queries must share it. TTA mode and views
  are recorded separately (``tta``, ``tta_reduce``, ``views_per_image``) and are not part of it:
  a flipped gallery (``--flip-views``) with flip-TTA queries is a valid, common pairing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from whalesub.core.atomic import atomic_open, atomic_write_text
from whalesub.core.errors import ConfigError, WhalesubError
from whalesub.core.locks import output_lock
from whalesub.embedding.loader import apply_box_conf, list_images, make_loader, select_boxes
from whalesub.embedding.shards import parse_shard
from whalesub.models.backends import open_model
from whalesub.ranking.store import combined_fingerprint, save_embeddings
from whalesub.ranking.vectors import average_views, unit_rows

log = logging.getLogger(__name__)

PARTS_MANIFEST = "run.json"


@dataclass(frozen=True)
class EmbedOptions:
    """Settings of one ``whalesub embed`` run (the CLI options of the same names).

    Everything except ``workers`` and ``chunk`` can change the output, so it is part of the
    resume key: a re-run with other values refuses the existing parts folder.
    """

    tta: str = "flip"  # "flip" | "none"
    flip_views: bool = False
    backend: str = "onnx"
    device: str = "auto"
    fp16: bool = False
    batch_size: int = 32
    workers: int | None = None  # decoding processes; None: one per CPU core but one, at most 8
    chunk: int = 1024  # images per resumable chunk (rounded up to a multiple of batch_size)
    box_type: str | None = None
    box_conf: float | None = None  # None: the models' ModelSpec.box_conf (training's box_conf)
    shard: str | None = None  # "i/n"

    def check(self) -> None:
        if self.tta not in ("flip", "none"):
            raise ConfigError(f"--tta {self.tta!r} is not known: use flip or none")
        if self.flip_views and self.tta != "none":
            raise ConfigError("--flip-views stores both views separately; it replaces --tta flip: "
                              "pass --tta none")
        for name in ("batch_size", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.box_conf is not None and not 0 <= self.box_conf <= 1:
            raise ConfigError(f"--box-conf must be within [0, 1], got {self.box_conf}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")

    @property
    def views(self) -> tuple[str, ...]:
        return ("orig", "hflip") if self.tta == "flip" or self.flip_views else ("orig",)


def digest_names(names) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def digest_image_files(folder: Path, names) -> str:
    """A digest of each image file's size and modification time (ns), in ``names`` order.

    Part of every reuse key (``predict``'s embedding files, ``embed``'s resumable chunks): a photo
    replaced in place under the same name changes it, so its vector is computed again. Reading
    every byte would cost as much as decoding; size + mtime is what ``make`` and ``rsync`` trust.
    A missing file counts as (-1, -1) (the loader reports it by name).
    """
    h = hashlib.sha256()
    for name in names:
        try:
            st = os.stat(Path(folder) / name)
            h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\t-1\t-1\n".encode())
    return h.hexdigest()


def preprocess_key(spec) -> str:
    """JSON of the spec fields that decide an input tensor (models sharing it share one decode)."""
    d = spec.to_dict()
    keep = ("image_size", "in_chans", "mean", "std", "interpolation", "preprocess", "box_margin")
    return json.dumps({k: d.get(k) for k in keep}, sort_keys=True)


def embed_batch(models, inputs: list, key_of: list[int], options: EmbedOptions) -> np.ndarray:
    """One batch: inputs[k] [B, C, S_k, S_k] f32 (numpy or torch) per preprocessing key
    -> rows [B * views, D_total] f32.

    Rows are ordered image-major (image 0 orig, image 0 hflip, image 1 orig, ...) with flip_views.
    """
    per_model = []
    for model, k in zip(models, key_of, strict=True):
        x = inputs[k]
        e = unit_rows(model(x, flip=len(options.views) == 2))
        if len(options.views) == 2:
            e, f = e[: len(e) // 2], e[len(e) // 2:]
            if options.flip_views:
                e = np.stack([e, f], axis=1).reshape(-1, e.shape[1])  # [B*2, D]
            else:
                e = average_views(np.stack([e, f], axis=1))
        per_model.append(e)
    return unit_rows(np.concatenate(per_model, axis=1)) if len(per_model) > 1 else per_model[0]


@dataclass
class _Parts:
    folder: Path
    chunk: int  # images per chunk
    n: int

    def path(self, c: int) -> Path:
        return self.folder / f"chunk_{c:06d}.npz"

    def rows(self, c: int) -> range:
        return range(c * self.chunk, min(self.n, (c + 1) * self.chunk))

    @property
    def count(self) -> int:
        return -(-self.n // self.chunk)


def _open_parts(parts: _Parts, run_key: dict) -> set[int]:
    """Check the parts folder against ``run_key`` (creating it when new); return the done chunks."""
    manifest = parts.folder / PARTS_MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if old != run_key:
            diff = sorted(k for k in set(old) | set(run_key) if old.get(k) != run_key.get(k))
            raise WhalesubError(
                f"{parts.folder} holds chunks of an interrupted run with different settings "
                f"({', '.join(diff)}); "
                f"re-run the original command to finish it, or delete {parts.folder} to start over"
            )
    else:
        parts.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps(run_key, sort_keys=True, indent=1))
    done = set()
    for c in range(parts.count):
        if chunk_done(parts, c):
            done.add(c)
        elif parts.path(c).is_file():
            log.warning("chunk %s is unreadable or stale: recomputing it", parts.path(c).name)
    return done


def resolve_box_conf(models, options: EmbedOptions) -> float:
    """The box confidence cut: ``--box-conf``, else the one the models were trained with."""
    if options.box_conf is not None:
        return options.box_conf
    cuts = sorted({float(getattr(m.spec, "box_conf", 0.0)) for m in models})
    if len(cuts) > 1:
        raise ConfigError(f"the models were trained with different box_conf values {cuts}: "
                          "choose one with --box-conf")
    return cuts[0]


@dataclass
class EmbedPlan:
    """One embedding run, fully decided: the opened models, the resume key and the chunk layout.

    ``whalesub embed`` builds it once; with ``--ray`` the driver and every Ray task build the same
    plan from the same arguments (:mod:`whalesub.embedding.distributed`), so every process agrees
    on chunk boundaries, batches and the fingerprint.
    """

    names: list[str]
    image_dir: Path
    out: Path
    options: EmbedOptions
    models: list
    key_of: list[int]
    specs: list
    boxes: list
    fingerprint: str
    run_key: dict
    parts: _Parts

    @property
    def views(self) -> tuple[str, ...]:  # the rows stored per image
        return self.options.views if self.options.flip_views else ("orig",)


def plan_embed(model_paths: list[Path], names: list[str], image_dir: Path, out: Path, options: EmbedOptions,
               boxes: list | None = None, device: str | None = None, threads: int | None = None,
               with_key: bool = True, models: list | None = None) -> EmbedPlan:
    """Open the models and decide the run (``device``/``threads`` override the options' device and
    the inference threads for this process); touches no file. ``with_key=False`` (a Ray worker,
    which does not check the parts folder) skips the resume key and its stat of every image.
    ``models``: the models of ``model_paths``, already opened (a Ray worker keeps them between runs)."""
    options.check()
    if models is None:
        models = [open_model(p, options.backend, device or options.device, options.fp16, threads=threads)
                  for p in model_paths]
    elif len(models) != len(model_paths):
        raise ValueError(f"{len(models)} opened models for {len(model_paths)} model paths")
    keys = list(dict.fromkeys(preprocess_key(m.spec) for m in models))
    key_of = [keys.index(preprocess_key(m.spec)) for m in models]
    specs = [next(m.spec for m in models if preprocess_key(m.spec) == k) for k in keys]
    fingerprint = combined_fingerprint(models)
    chunk = -(-options.chunk // options.batch_size) * options.batch_size
    boxes = boxes if boxes is not None else [None] * len(names)
    if any(b is not None and len(b) == 5 for b in boxes):  # (x1, y1, x2, y2, conf) from select_boxes
        boxes = apply_box_conf(boxes, resolve_box_conf(models, options))
    run_key = {}
    if with_key:
        run_key = {"fingerprint": fingerprint, "images": digest_names(names), "n": len(names),
                   "image_files": digest_image_files(image_dir, names),
                   "boxes": hashlib.sha256(repr(boxes).encode()).hexdigest(), "chunk": chunk,
                   "options": {k: v for k, v in asdict(options).items() if k not in ("workers", "chunk")},
                   "models": [{k: m.describe()[k] for k in ("fingerprint", "backend", "precision", "device")}
                              for m in models]}
    parts = _Parts(out.with_name(out.name + ".parts"), chunk, len(names))
    return EmbedPlan(list(names), Path(image_dir), Path(out), options, models, key_of, specs, boxes,
                     fingerprint, run_key, parts)


def chunk_done(parts: _Parts, c: int) -> bool:
    """Chunk ``c`` is on disk, readable and covers exactly its rows."""
    p = parts.path(c)
    if not p.is_file():
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return z["positions"].tolist() == list(parts.rows(c))
    except Exception:  # noqa: BLE001 - an unreadable chunk is recomputed
        return False


class _ChunkBatches:
    """The batches of the chunks ``todo`` (rows in order, never crossing a chunk), drawn lazily: a
    ``todo`` that is a generator (a Ray worker taking chunks from a shared queue) keeps one decoding
    pipeline full across chunks, which are only taken when the loader needs their first batch."""

    def __init__(self, parts: _Parts, todo: Iterable[int], batch_size: int):
        self.parts, self.todo, self.batch_size = parts, todo, batch_size

    def __iter__(self):
        for c in self.todo:
            rows = list(self.parts.rows(c))
            for i in range(0, len(rows), self.batch_size):
                yield rows[i:i + self.batch_size]


def embed_chunks(plan: EmbedPlan, todo: Iterable[int], workers: int, on_images=None) -> None:
    """Embed chunks ``todo`` of ``plan`` with ``workers`` decoding processes; each finished chunk goes
    atomically to the parts folder. ``todo`` may be lazy (it is drawn as the decoders need work).
    ``on_images(n)`` is called after every batch."""
    options, parts = plan.options, plan.parts
    batches = _ChunkBatches(parts, todo, options.batch_size)
    paths = [str(plan.image_dir / n) for n in plan.names]
    loader = make_loader(paths, plan.boxes, plan.specs, batches, options.batch_size, workers,
                         pin_memory=any(m.device == "cuda" for m in plan.models))
    views = plan.views
    pending: dict[int, list[np.ndarray]] = {}
    for positions, inputs in loader:
        rows = embed_batch(plan.models, inputs, plan.key_of, options)
        rows = rows[: len(positions) * len(views)]  # drop the padding
        c = positions[0] // parts.chunk
        pending.setdefault(c, []).append(rows)
        if on_images is not None:
            on_images(len(positions))
        if positions[-1] == parts.rows(c)[-1]:
            with atomic_open(parts.path(c), "wb") as fh:
                np.savez(fh, positions=np.array(parts.rows(c)), vectors=np.concatenate(pending.pop(c)))


def finish_embed(plan: EmbedPlan, shard_info: dict | None = None,
                 models_meta: list[dict] | None = None) -> Path:
    """Every chunk on disk -> the embedding file (atomically); the parts folder is removed.

    ``models_meta``: the models as the processes that ran them describe them (default: this
    process's ``plan.models``)."""
    parts, options, views = plan.parts, plan.options, plan.views
    vectors = []
    for c in range(parts.count):
        with np.load(parts.path(c), allow_pickle=False) as z:
            vectors.append(z["vectors"])
    ids = np.repeat(np.asarray(plan.names, dtype=str), len(views))
    described = models_meta if models_meta is not None else [m.describe() for m in plan.models]
    meta = {"fingerprint": plan.fingerprint, "models": described,
            "model": described[0]["spec"], "tta": list(options.views),
            "tta_reduce": "mean" if options.tta == "flip" else None, "views_per_image": len(views),
            "views": list(views), "backend": options.backend, "box_type": options.box_type,
            "n_images": len(plan.names)}
    if shard_info:
        meta["shard"] = shard_info
    save_embeddings(plan.out, ids, np.concatenate(vectors), meta)
    shutil.rmtree(parts.folder, ignore_errors=True)
    log.info("wrote %s: %d rows x %d (fingerprint %s)", plan.out, len(ids), vectors[0].shape[1],
             plan.fingerprint)
    return plan.out


def embed_images(model_paths: list[Path], names: list[str], image_dir: Path, out: Path,
                 options: EmbedOptions, boxes: list | None = None, shard_info: dict | None = None,
                 runner=None) -> Path:
    """Embed ``names`` (files in ``image_dir``) with every model; write ``out`` (.npz) atomically.

    One writer per output: a second process embedding into the same ``out`` (and its parts folder)
    stops at once with a :class:`~whalesub.core.locks.BusyError` naming this one.

    ``runner``: embeds the missing chunks elsewhere instead of in this process: called as
    ``runner(plan, todo, model_paths, boxes)``, it must leave every chunk of ``todo`` on disk and
    may return the models' descriptions (see :func:`finish_embed`); ``whalesub embed --ray`` passes
    :class:`whalesub.embedding.distributed.RayRunner` (its tasks write chunks while this process
    holds the lock).
    """
    options.check()
    with output_lock(out, f"embedding file {out} (and its parts folder)"):
        return _embed_images(model_paths, names, image_dir, out, options, boxes, shard_info, runner)


def _embed_images(model_paths, names, image_dir, out, options, boxes, shard_info, runner) -> Path:
    from tqdm import tqdm

    plan = plan_embed(model_paths, names, image_dir, out, options, boxes,
                      device=getattr(runner, "driver_device", None))
    parts = plan.parts
    done = _open_parts(parts, plan.run_key)
    if done:
        log.info("resuming from %s: %d of %d chunks already done (%d images)", parts.folder, len(done),
                 parts.count, sum(len(parts.rows(c)) for c in done))
    todo = [c for c in range(parts.count) if c not in done]
    n_todo = sum(len(parts.rows(c)) for c in todo)
    started = time.perf_counter()
    models_meta = None
    if runner is not None:
        models_meta = runner(plan, todo, model_paths, boxes)
    else:
        cores = os.cpu_count() or 2
        workers = options.workers if options.workers is not None else max(1, min(8, cores - 1))
        bar = tqdm(total=len(names), initial=len(names) - n_todo, unit="img",
                   desc="embed", dynamic_ncols=True, smoothing=0.1,
                   mininterval=0.2 if sys.stderr.isatty() else 30.0)  # keep notebook/kernel logs short
        with bar:
            embed_chunks(plan, todo, workers, bar.update)
    took = time.perf_counter() - started
    finish_embed(plan, shard_info, models_meta)
    log.info("%d images embedded in %.1f s (%.1f img/s)", n_todo, took, n_todo / max(took, 1e-9))
    return out


def run_embed(model_paths: list[Path], out: Path, options: EmbedOptions, images: Path | None = None,
              listing: Path | None = None, boxes: Path | None = None, runner=None) -> Path:
    """The ``whalesub embed`` command: list and check the images, pick boxes and the shard, embed."""

    options.check()
    if not model_paths:
        raise ConfigError("pass at least one --model (an export folder, "
                          "or a checkpoint with --backend torch)")
    if out.suffix != ".npz":
        raise ConfigError(f"--out {out}: embedding files end in .npz")
    if options.box_type is not None and boxes is None:
        raise ConfigError("--box-type needs --boxes CSV")
    names, folder = list_images(images, listing)
    index, count, start, stop = parse_shard(options.shard, len(names))
    shard_info = None
    if options.shard is not None:
        shard_info = {"index": index, "count": count, "start": start, "stop": stop,
                      "listing": digest_names(names)}
        log.info("shard %d/%d: images %d..%d of %d", index, count, start, stop, len(names))
    picked = select_boxes(boxes, options.box_type, names) if boxes is not None else None
    if start == stop:
        raise ConfigError(f"--shard {options.shard}: this shard is empty ({len(names)} images in all)")
    names = names[start:stop]
    picked = picked[start:stop] if picked is not None else None
    return embed_images(model_paths, names, folder, out, options, picked, shard_info, runner)
