"""``whalesub embed --ray ADDRESS`` (and ``predict --ray``): the chunks of one embedding run spread
over a Ray cluster.

The driver (the process running the command) decides the run exactly as a single process would
(:func:`whalesub.embedding.embed.plan_embed`: fingerprint, resume key, chunk layout), cuts the
missing chunks into contiguous ranges and submits one Ray task per range. Every task rebuilds the
same plan on its node from the same arguments, checks that it sees what the driver sees (the
whalesub version, the image folder, the models and their fingerprints, the output's parts folder,
a GPU where one was requested), embeds the chunks of its range that are not on disk yet and
writes each finished chunk atomically into ``<out>.parts/`` on the shared storage. The driver
then merges the chunks into the same file a single process writes.

- Chunks on disk are never redone: a task retried by Ray after its worker or node was lost, and a
  rerun of the whole command after the driver died, only compute what is missing. Batches never
  cross a chunk, so every row is computed by the same batch as in a single-process run.
- ``ADDRESS``: ``local:N`` starts a private Ray on this machine with N workers (the CPUs shared out
  among them); ``auto`` joins the cluster this machine belongs to (``ray start``); anything else is
  passed to ``ray.init(address=...)`` (``HOST:6379``, ``ray://HOST:10001``).
- Resources: one GPU per task where the cluster has GPUs (and ``--device`` is not ``cpu``), with the
  CPUs of a GPU share for decoding; otherwise a whole node's CPUs per task (``local:N``: the
  machine's CPUs / N), with ONNX Runtime limited to those CPUs.
- Progress: chunks done over all workers (the driver watches the parts folder).

Ray is imported inside functions only (``pip install -e ".[cluster]"``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import whalesub
from whalesub.core.errors import ConfigError, DataError, WhalesubError
from whalesub.embedding.embed import EmbedOptions, chunk_done, embed_chunks, plan_embed

log = logging.getLogger(__name__)

#: Ray task ranges per worker slot: a slow or lost node holds back at most half of a slot's share.
TASKS_PER_SLOT = 2
#: How often Ray re-runs a task whose worker process or node died (its finished chunks are kept).
MAX_RETRIES = 3
LOCAL_OBJECT_STORE = 128 * 1024 * 1024  # bytes; the tasks exchange only the listing and the boxes

INSTALL_HINT = 'install the cluster extra: pip install -e ".[cluster]" (or pip install "ray[default]")'


def import_ray():
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def parse_address(address: str) -> tuple[str, int | str]:
    """``local:N`` -> ("local", N); ``auto`` or a cluster address -> ("connect", address)."""
    address = (address or "").strip()
    if not address:
        raise ConfigError("--ray needs a value: local:N (a Ray on this machine with N workers), auto "
                          "(the cluster this machine joined with `ray start`) or HOST:PORT / ray://HOST:PORT")
    if address.startswith("local"):
        try:
            n = int(address.partition(":")[2] or "1")
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--ray {address!r}: write local:N with N >= 1 workers, e.g. local:2")
        return "local", n
    return "connect", address


def node_name() -> str:
    """This node, as errors name it: host name and IP address."""
    host = socket.gethostname()
    try:
        import ray

        ip = ray.util.get_node_ip_address()
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray or without a network: the host name alone
        return host
    return f"{host} ({ip}" + (f", Ray node {node[:12]})" if node else ")")


def _not_shared(what: str, path: Path, why: str) -> DataError:
    return DataError(f"node {node_name()} cannot read {what} {path} ({why}): the storage is not shared "
                     "with this node; put the images, the models and --out on a filesystem every node "
                     "mounts at the same path")


def check_node(job: dict) -> None:
    """On a worker: the node sees what the driver sees, else one clear error naming node and path."""
    have = whalesub.__version__
    if job["version"] != have:
        raise ConfigError(f"node {node_name()} runs whalesub {have}, the driver {job['version']}: "
                          "install the same whalesub on every node")
    image_dir = Path(job["image_dir"])
    if not image_dir.is_dir():
        raise _not_shared("the image folder", image_dir, "no such folder")
    first = image_dir / job["names"][job["first_row"]]
    if not os.access(first, os.R_OK):
        raise _not_shared("the image", first, "missing or unreadable")
    for p in map(Path, job["model_paths"]):
        if not os.access(p, os.R_OK):
            raise _not_shared("the model", p, "missing or unreadable")
    parts = Path(job["parts"])
    if not (parts.is_dir() and os.access(parts, os.W_OK)):
        raise _not_shared("the output folder", parts, "missing or not writable")


def embed_task(job: dict) -> dict:
    """One Ray task: embed the chunks ``job["chunks"]`` not yet on disk; errors come back as values
    (they are the user's to fix, so Ray must not retry them)."""
    try:
        return _embed_task(job)
    except WhalesubError as exc:
        node, msg = node_name(), str(exc)
        msg = msg if msg.startswith("node ") else f"node {node}: {msg}"
        return {"error": msg, "kind": type(exc).__name__, "node": node}


def _embed_task(job: dict) -> dict:
    import ray

    check_node(job)
    device = job["device"]
    if job["gpu"]:
        if not ray.get_gpu_ids():
            raise ConfigError(f"node {node_name()}: Ray gave this task no GPU although one was requested")
        device = "cuda"
    if job["threads"] and job["backend"] == "torch":
        import torch

        torch.set_num_threads(job["threads"])
    options = EmbedOptions(**job["options"])
    plan = plan_embed([Path(p) for p in job["model_paths"]], job["names"], Path(job["image_dir"]),
                      Path(job["out"]), options, job["boxes"], device=device, threads=job["threads"],
                      with_key=False)
    mine = [m.fingerprint for m in plan.models]
    for path, have, want in zip(job["model_paths"], mine, job["fingerprints"], strict=True):
        if have != want:
            raise ConfigError(f"node {node_name()}: the model {path} has fingerprint {have[:12]}, the "
                              f"driver's {want[:12]}: every node must see the same export (copy it again)")
    todo = [c for c in job["chunks"] if not chunk_done(plan.parts, c)]
    started = time.perf_counter()
    embed_chunks(plan, todo, job["workers"])
    return {"node": node_name(), "node_id": ray.get_runtime_context().get_node_id(), "chunks": len(todo),
            "seconds": time.perf_counter() - started,
            "models": [m.describe() for m in plan.models], "first": job["chunks"][0]}


def _resources(ray, mode: str, n: int, device: str) -> tuple[bool, int, int]:
    """(use a GPU per task, CPUs per task, concurrent task slots) for the connected cluster."""
    nodes = [nd["Resources"] for nd in ray.nodes() if nd.get("Alive")]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    if device == "cuda" and gpus == 0:
        cpus = sum(int(r.get("CPU", 0)) for r in nodes)
        raise ConfigError(f"--device cuda: the Ray cluster has no GPU ({len(nodes)} node(s), {cpus} CPUs); "
                          "start the GPU machines' `ray start` where CUDA works, or use --device cpu")
    if gpus and device != "cpu":
        per = [int(r.get("CPU", 0)) // int(r["GPU"]) for r in nodes if r.get("GPU")]
        return True, max(1, min(per)), gpus if mode == "connect" else min(n, gpus)
    cpus = [int(r.get("CPU", 0)) for r in nodes if r.get("CPU")]
    if not cpus:
        raise ConfigError("the Ray cluster has no CPUs to run tasks on "
                          "(every node started with --num-cpus 0?)")
    if mode == "local":
        per = max(1, sum(cpus) // n)
        return False, per, n
    per = min(cpus)
    return False, per, sum(c // per for c in cpus)


class RayRunner:
    """The ``runner`` of :func:`whalesub.embedding.embed.embed_images` for ``--ray ADDRESS``."""

    driver_device = "cpu"  # the driver opens the models only for their fingerprints and the resume key

    def __init__(self, address: str, tasks_per_slot: int = TASKS_PER_SLOT, resources: dict | None = None):
        """``resources``: extra Ray resources every task needs (custom node labels, e.g.
        ``{"embed": 1}`` for the nodes started with ``ray start --resources '{"embed": 4}'``)."""
        self.mode, self.arg = parse_address(address)
        self.address = address
        self.tasks_per_slot = tasks_per_slot
        self.resources = dict(resources or {})
        self.results: list[dict] = []  # what the tasks of the last call reported (node, chunks, seconds)
        import_ray()  # before any long work: a clear error when Ray is missing

    def _connect(self, ray) -> bool:
        """Initialise Ray unless this process already is; True when this call started it."""
        if ray.is_initialized():
            return False
        if self.mode == "local":
            cpus = os.cpu_count() or 1
            per = max(1, cpus // self.arg)
            ray.init(num_cpus=per * self.arg, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=True, configure_logging=False)
            return True
        try:
            ray.init(address=self.arg, log_to_driver=True, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--ray {self.address}: cannot connect to a Ray cluster ({first}); start one "
                              "with `ray start --head` (see the 'Several machines' docs page) or use "
                              "--ray local:N") from None
        return True

    def __enter__(self) -> RayRunner:
        self._started = self._connect(import_ray())
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "_started", False):
            import_ray().shutdown()
            self._started = False

    def __call__(self, plan, todo: list[int], model_paths: list[Path], boxes) -> list[dict] | None:
        if not todo:
            return None
        ray = import_ray()
        started_here = self._connect(ray)
        try:
            return self._run(ray, plan, todo, model_paths, boxes)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, plan, todo, model_paths, boxes):
        from tqdm import tqdm

        options = plan.options
        gpu, cpus, slots = _resources(ray, self.mode, self.arg if self.mode == "local" else 0,
                                      options.device)
        workers = options.workers if options.workers is not None else max(1, min(8, cpus - 1))
        n_tasks = min(len(todo), slots * self.tasks_per_slot)
        ranges = [list(map(int, r)) for r in np.array_split(todo, n_tasks)]
        names_ref = ray.put(plan.names)
        boxes_ref = ray.put(boxes)
        base = {"version": whalesub.__version__,
                "model_paths": [str(Path(p).absolute()) for p in model_paths],
                "fingerprints": [m.fingerprint for m in plan.models],
                "image_dir": str(plan.image_dir.absolute()),
                "out": str(plan.out.absolute()), "parts": str(plan.parts.folder.absolute()),
                "options": asdict(options), "device": options.device, "backend": options.backend,
                "gpu": gpu, "threads": None if gpu else cpus, "workers": workers}
        remote = ray.remote(_task_entry).options(num_cpus=cpus, num_gpus=1 if gpu else 0,
                                                 resources=self.resources or None,
                                                 max_retries=MAX_RETRIES, name="whalesub-embed")
        log.info("Ray: %d chunks in %d tasks over %d slot(s) (%s per task, %d decoding workers each)",
                 len(todo), len(ranges), slots, "1 GPU" if gpu else f"{cpus} CPU(s)", workers)
        refs = {remote.remote({**base, "chunks": r, "first_row": plan.parts.rows(r[0])[0]}, names_ref,
                              boxes_ref): r for r in ranges}
        results, pending = [], list(refs)
        bar = tqdm(total=plan.parts.count, initial=plan.parts.count - len(todo), unit="chunk",
                   desc="embed (Ray)", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        try:
            with bar:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                    for ref in ready:
                        results.append(self._result(ray, ref))
                    bar.update(plan.parts.count - sum(not plan.parts.path(c).is_file() for c in todo) - bar.n)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if missing := [c for c in todo if not chunk_done(plan.parts, c)]:
            raise WhalesubError(f"the Ray tasks ended but chunk(s) {missing[:5]} of {plan.parts.folder} are "
                                "missing (the parts folder is not shared?); run the command again")
        self.results = results
        for r in results:
            log.info("node %s: %d chunks in %.1f s", r["node"], r["chunks"], r["seconds"])
        # as the workers ran them (device, precision), under the paths the user gave (as one process records)
        ran = min(results, key=lambda r: r["first"])["models"]
        return [{**d, "path": str(m.path)} for d, m in zip(ran, plan.models, strict=True)]

    def _result(self, ray, ref) -> dict:
        from ray.exceptions import RayError

        try:
            r = ray.get(ref)
        except RayError as exc:
            text = str(exc).strip().splitlines()
            last = next((t for t in reversed(text) if t.strip()), type(exc).__name__).strip()
            if "No module named 'whalesub" in last:
                raise ConfigError(f"a Ray worker cannot import whalesub ({last}): install the same whalesub "
                                  "on every node") from None
            raise WhalesubError(f"a Ray task failed ({last}); a task whose worker dies is retried up to "
                                f"{MAX_RETRIES} times, and the chunks finished so far are kept: run the "
                                "command again to continue") from None
        if "error" in r:
            cls = {"DataError": DataError, "ConfigError": ConfigError}.get(r["kind"], WhalesubError)
            raise cls(r["error"])
        return r


def _task_entry(job: dict, names: list[str], boxes) -> dict:
    """The Ray task (module level, so workers import it from their own whalesub)."""
    n = len(names)
    return embed_task({**job, "names": names, "boxes": boxes if boxes is not None else [None] * n})
