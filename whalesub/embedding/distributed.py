"""``whalesub embed --ray ADDRESS`` (and ``predict --ray``): the chunks of one embedding run spread
over a Ray cluster.

The driver (the process running the command) decides the run exactly as a single process would
(:func:`whalesub.embedding.embed.plan_embed`: fingerprint, resume key, chunk layout) and cuts the
missing chunks into a shared queue (a Ray queue actor). It starts one Ray actor per worker slot
(:class:`EmbedWorker`); each takes the next chunk from the queue whenever its decoders need work,
so fast nodes take more and one decoding pipeline stays full for the whole run (no refill between
chunks). A worker opens the models once, rebuilding the same plan on its node from the same
arguments and checking that it sees what the driver sees (the whalesub version, the image folder,
the models and their fingerprints, the output's parts folder, a GPU where one was requested); it
embeds the chunks it takes that are not on disk yet and writes each finished chunk atomically into
``<out>.parts/`` on the shared storage. The driver then merges the chunks into the same file a
single process writes.

- Chunks on disk are never redone: a worker restarted by Ray after its process or node was lost
  (its unfinished call is run again; the chunks it held go back to the queue in a next round), and
  a rerun of the whole command after the driver died, only compute what is missing. Batches never
  cross a chunk, so every row is computed by the same batch as in a single-process run.
- ``ADDRESS``: ``local:N`` starts a private Ray on this machine with N workers (the CPUs shared out
  among them, or ``--ray-cpus`` each); ``auto`` joins the cluster this machine belongs to
  (``ray start``); anything else is passed to ``ray.init(address=...)`` (``HOST:6379``,
  ``ray://HOST:10001``).
- Resources: one GPU per worker where the cluster has GPUs (and ``--device`` is not ``cpu``), with
  the CPUs of a GPU's share for decoding; otherwise a whole node's CPUs per worker (``local:N``: the
  machine's CPUs / N; ``--ray-cpus C``: C each, so a node runs several), with ONNX Runtime limited
  to those CPUs.
- Progress: chunks done over all workers (the driver watches the parts folder).

Ray is imported inside functions only (``pip install -e ".[cluster]"``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import whalesub
from whalesub.core.errors import ConfigError, DataError, WhalesubError
from whalesub.embedding.embed import EmbedOptions, chunk_done, embed_chunks, plan_embed
from whalesub.models.backends import open_model

log = logging.getLogger(__name__)

#: How often Ray restarts a worker whose process or node died and reruns its call (its finished
#: chunks are kept).
MAX_RETRIES = 3
LOCAL_OBJECT_STORE = 128 * 1024 * 1024  # bytes; the workers receive only the listing and the boxes

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
    except Exception:  # noqa: BLE001 - outside Ray or without a network: the host name alone
        return host
    node = _node_id()
    return f"{host} ({ip}" + (f", Ray node {node[:12]})" if node else ")")


def _not_shared(what: str, path: Path, why: str) -> DataError:
    return DataError(f"node {node_name()} cannot read {what} {path} ({why}): the storage is not shared "
                     "with this node; put the images, the models and --out on a filesystem every node "
                     "mounts at the same path")


def check_node(job: dict, row: int | None = None) -> None:
    """On a worker: the node sees what the driver sees (and can read image ``row``), else one clear
    error naming node and path."""
    have = whalesub.__version__
    if job["version"] != have:
        raise ConfigError(f"node {node_name()} runs whalesub {have}, the driver {job['version']}: "
                          "install the same whalesub on every node")
    image_dir = Path(job["image_dir"])
    if not image_dir.is_dir():
        raise _not_shared("the image folder", image_dir, "no such folder")
    if row is not None and not os.access(first := image_dir / job["names"][row], os.R_OK):
        raise _not_shared("the image", first, "missing or unreadable")
    for p in map(Path, job["model_paths"]):
        if not os.access(p, os.R_OK):
            raise _not_shared("the model", p, "missing or unreadable")
    parts = Path(job["parts"])
    if not (parts.is_dir() and os.access(parts, os.W_OK)):
        raise _not_shared("the output folder", parts, "missing or not writable")


def _error_value(exc: WhalesubError) -> dict:
    node, msg = node_name(), str(exc)
    msg = msg if msg.startswith("node ") else f"node {node}: {msg}"
    return {"error": msg, "kind": type(exc).__name__, "node": node}


class EmbedWorker:
    """One Ray worker (a Ray actor, one per worker slot, alive as long as the runner: a whole
    ``embed`` or ``predict`` command).

    It opens the models once and keeps them while they are the models asked for (on a GPU worker
    that saves the CUDA session and its warm-up, seconds each time; ``predict`` embeds the gallery
    and the test set with the same models), and embeds the chunks the driver hands
    it: a list, or the run's shared queue, from which it takes one chunk whenever its decoders need
    the next batch, so a fast node takes more chunks than a slow one. Errors the user must fix come
    back as values (``{"error": ...}``): Ray must not retry them. A worker process that dies is
    restarted by Ray and its unfinished call is run again; the chunks it had finished are on disk
    and skipped.
    """

    def __init__(self) -> None:
        self.models: dict[tuple, object] = {}  # (path, fingerprint, backend, device, fp16, threads) -> model
        self.run: str | None = None
        self.plan = None

    def embed(self, job: dict, names: list[str], boxes, chunks) -> dict:
        """Embed the chunks not on disk yet of ``chunks`` (a list of chunk indices, or a queue with
        ``get_nowait``, drained); ``job``: the run, as the driver decided it."""
        try:
            return self._embed(job, names, boxes, chunks)
        except WhalesubError as exc:
            return _error_value(exc)

    def _embed(self, job, names, boxes, chunks) -> dict:
        job = {**job, "names": names, "boxes": boxes if boxes is not None else [None] * len(names)}
        check_node(job)
        opened = 0
        if self.plan is None or self.run != job.get("run"):
            before = self.models
            self.plan, self.models = _open_plan(job, before)
            opened = len(self.models.keys() - before.keys())
            self.run = job.get("run")
        done: list[int] = []

        def take():  # lazily, as the decoding pipeline asks for the next chunk's first batch
            for c in _drain(chunks):
                if chunk_done(self.plan.parts, c):
                    continue
                check_node(job, self.plan.parts.rows(c)[0])  # a lost mount shows up at the next chunk, named
                done.append(c)
                yield c

        started = time.perf_counter()
        embed_chunks(self.plan, take(), job["workers"])
        return {"node": node_name(), "node_id": _node_id(), "pid": os.getpid(), "chunks": len(done),
                "written": done, "opened": opened, "seconds": time.perf_counter() - started,
                "models": [m.describe() for m in self.plan.models], "first": min(done, default=None)}


def _drain(chunks):
    """The chunk indices of a list, or taken one at a time from a Ray queue until it is empty."""
    if not hasattr(chunks, "get_nowait"):
        yield from chunks
        return
    from ray.util.queue import Empty

    while True:
        try:
            yield int(chunks.get_nowait())
        except Empty:
            return


def run_rounds(todo: list[int], run_round, on_disk, folder: Path, max_stalls: int = MAX_RETRIES,
               settle_s: float = 60.0) -> list[dict]:
    """Embed the chunks ``todo`` in rounds until every one is on disk; return the workers' results.

    ``run_round(left)`` puts the chunks ``left`` in the queue, runs one call per worker until the
    queue is empty and returns the calls' results (each with ``written``: the chunks it wrote);
    ``on_disk(c)``: chunk ``c`` is in the parts folder as this machine sees it. A chunk missing
    after a round was either held by a worker process that died (no result reports it: it goes
    into the next round) or written by a node whose ``folder`` is not this machine's (a result
    reports it but it does not appear within ``settle_s`` seconds, the time a network filesystem
    may take to show a new file: a clear error naming the node). After ``max_stalls`` rounds in a
    row without a chunk finished the workers keep dying on the same chunks: an error naming them.
    """
    results: list[dict] = []
    left, stalls = list(todo), 0
    while left:
        got = run_round(left)
        results.extend(got)
        writer = {c: r["node"] for r in got for c in r.get("written", ())}
        missing = [c for c in left if not on_disk(c)]
        deadline = time.monotonic() + settle_s
        while (unseen := [c for c in missing if c in writer]) and time.monotonic() < deadline:
            time.sleep(min(1.0, settle_s))  # a network filesystem may show another node's file late
            missing = [c for c in left if not on_disk(c)]
        if unseen:
            raise DataError(f"node {writer[unseen[0]]} wrote chunk(s) {unseen[:5]} into {folder} but this "
                            f"machine does not see them after {settle_s:.0f} s: the output's folder is not "
                            "shared with that node; put --out on a filesystem every node mounts at the same "
                            "path, then run the command again (the chunks this machine sees are kept)")
        stalls = stalls + 1 if len(missing) == len(left) else 0
        if stalls > max_stalls:
            raise WhalesubError(f"the Ray workers died {stalls} rounds in a row while embedding chunk(s) "
                                f"{missing[:5]} of {folder} (no chunk finished): look for the cause in the "
                                "workers' logs (out of memory? an image that crashes the decoder?); run the "
                                "command again to retry (the chunks finished so far are kept)")
        if missing:
            log.warning("Ray: %d chunk(s) held by a worker process that died go round again", len(missing))
        left = missing
    return results


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray
        return None


def _open_plan(job: dict, opened: dict) -> tuple:
    """(the run's plan on this node, the models it opened): the models on this node's device (those
    in ``opened`` under the same key are reused), their fingerprints checked against the driver's."""
    device = job["device"]
    if job["gpu"]:
        import ray

        if not ray.get_gpu_ids():
            raise ConfigError(f"node {node_name()}: Ray gave this worker no GPU although one was requested")
        device = "cuda"
    if job["threads"] and job["backend"] == "torch":
        import torch

        torch.set_num_threads(job["threads"])
    options = EmbedOptions(**job["options"])
    models, ordered = {}, []
    for path, want in zip(job["model_paths"], job["fingerprints"], strict=True):
        key = (path, want, options.backend, device, options.fp16, job["threads"])
        model = opened.get(key) or open_model(Path(path), options.backend, device, options.fp16,
                                              threads=job["threads"])
        if model.fingerprint != want:
            raise ConfigError(f"node {node_name()}: the model {path} has fingerprint "
                              f"{model.fingerprint[:12]}, the driver's {want[:12]}: every node must see "
                              "the same export (copy it again)")
        models[key] = model
        ordered.append(model)
    plan = plan_embed([Path(p) for p in job["model_paths"]], job["names"], Path(job["image_dir"]),
                      Path(job["out"]), options, job["boxes"], device=device, threads=job["threads"],
                      with_key=False, models=ordered)
    return plan, models


def _resources(ray, mode: str, n: int, device: str, cpus_per_worker: int | None = None,
               extra: dict | None = None) -> tuple[bool, int, int]:
    """(a GPU per worker, CPUs per worker, worker slots) for the connected cluster.

    ``cpus_per_worker``: ``--ray-cpus`` (default: a GPU's share of its node's CPUs with GPUs; the
    machine's CPUs / N with ``local:N``; else the smallest node's CPUs). ``extra``: custom resources
    every worker needs; only nodes offering them count.
    """
    nodes = [nd["Resources"] for nd in ray.nodes() if nd.get("Alive")]
    extra = extra or {}

    def fits(r: dict) -> int:  # how many workers this node's custom resources allow
        return min((int(r.get(k, 0) // v) for k, v in extra.items()), default=1 << 30)

    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    if device == "cuda" and gpus == 0:
        cpus = sum(int(r.get("CPU", 0)) for r in nodes)
        raise ConfigError(f"--device cuda: the Ray cluster has no GPU ({len(nodes)} node(s), {cpus} CPUs); "
                          "start the GPU machines' `ray start` where CUDA works, or use --device cpu")
    nodes = [r for r in nodes if fits(r) > 0]
    if not nodes:
        raise ConfigError(f"no node of the Ray cluster offers the resources {extra} every worker needs")
    if gpus and device != "cpu":
        with_gpu = [r for r in nodes if r.get("GPU")]
        per = cpus_per_worker or max(1, min(int(r.get("CPU", 0)) // int(r["GPU"]) for r in with_gpu))
        slots = sum(min(int(r["GPU"]), int(r.get("CPU", 0)) // per, fits(r)) for r in with_gpu)
        return True, per, min(n, slots) if mode == "local" else slots
    cpus = [(int(r.get("CPU", 0)), fits(r)) for r in nodes if r.get("CPU")]
    if not cpus:
        raise ConfigError("the Ray cluster has no CPUs to run workers on "
                          "(every node started with --num-cpus 0?)")
    if mode == "local":
        return False, cpus_per_worker or max(1, sum(c for c, _ in cpus) // n), n
    per = cpus_per_worker or min(c for c, _ in cpus)
    slots = sum(min(c // per, f) for c, f in cpus)
    if slots == 0:
        raise ConfigError(f"--ray-cpus {per}: no node of the Ray cluster has {per} CPUs "
                          f"(the largest has {max(c for c, _ in cpus)})")
    return False, per, slots


def _queue_options(ray) -> dict:
    """The shared queue's actor: no CPU (it never waits for the workers' CPUs), on the driver's node
    where Ray can (losing a worker's node then does not lose the queue), and restarted, empty, if
    its process dies anyway: the workers then find it empty and the driver puts the chunks still
    missing into the next round."""
    opts = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                     soft=True)
    except Exception as exc:  # noqa: BLE001 - e.g. a Ray client without a node id: any node will do
        log.debug("Ray: the queue is not pinned to the driver's node (%s)", exc)
    return opts


class RayRunner:
    """The ``runner`` of :func:`whalesub.embedding.embed.embed_images` for ``--ray ADDRESS``."""

    driver_device = "cpu"  # the driver opens the models only for their fingerprints and the resume key
    #: Seconds a worker's call may stay unanswered once every chunk is on disk before the worker is
    #: ended: a worker Ray restarted after its node was lost may never be placed again (no capacity
    #: left), and its call would otherwise keep the command waiting for nothing.
    straggler_grace_s = 60.0

    def __init__(self, address: str, resources: dict | None = None, cpus_per_worker: int | None = None):
        """``resources``: extra Ray resources every worker needs (custom node labels, e.g.
        ``{"embed": 1}`` for the nodes started with ``ray start --resources '{"embed": 4}'``).
        ``cpus_per_worker``: ``--ray-cpus`` (see :func:`_resources`)."""
        self.mode, self.arg = parse_address(address)
        self.address = address
        if cpus_per_worker is not None and cpus_per_worker < 1:
            raise ConfigError(f"--ray-cpus must be >= 1, got {cpus_per_worker}")
        self.resources = dict(resources or {})
        self.cpus_per_worker = cpus_per_worker
        self.results: list[dict] = []  # what each worker's call reported (node, chunks, seconds)
        self._workers: list = []  # the Ray actors (EmbedWorker); kept between the calls made inside a
        self._entered = False     # `with` block (predict's two embeddings), else ended after each call
        self._shape: tuple | None = None
        self._queue = None  # the chunks still to take (a Ray queue actor), kept with the workers
        import_ray()  # before any long work: a clear error when Ray is missing

    def _connect(self, ray) -> bool:
        """Initialise Ray unless this process already is; True when this call started it."""
        if ray.is_initialized():
            return False
        if self.mode == "local":
            per = self.cpus_per_worker or max(1, (os.cpu_count() or 1) // self.arg)
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
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        if self._workers or self._queue is not None:
            self._release(import_ray())
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
            if not self._entered:  # outside a `with` block nothing would end the workers: end them now
                self._release(ray)
            if started_here:
                ray.shutdown()

    def _run(self, ray, plan, todo, model_paths, boxes):
        from ray.util.queue import Queue
        from tqdm import tqdm

        options = plan.options
        gpu, cpus, slots = _resources(ray, self.mode, self.arg if self.mode == "local" else 0,
                                      options.device, self.cpus_per_worker, self.resources)
        decoders = options.workers if options.workers is not None else max(1, min(8, cpus - 1))
        job = {"run": uuid.uuid4().hex, "version": whalesub.__version__,
               "model_paths": [str(Path(p).absolute()) for p in model_paths],
               "fingerprints": [m.fingerprint for m in plan.models],
               "image_dir": str(plan.image_dir.absolute()),
               "out": str(plan.out.absolute()), "parts": str(plan.parts.folder.absolute()),
               "options": asdict(options), "device": options.device, "backend": options.backend,
               "gpu": gpu, "threads": None if gpu else cpus, "workers": decoders}
        workers = self._pool(ray, (gpu, cpus), min(slots, len(todo)))
        log.info("Ray: %d chunks over %d worker(s) (%s each, %d decoding processes each)",
                 len(todo), len(workers), "1 GPU" if gpu else f"{cpus} CPU(s)", decoders)
        job_ref, names_ref, boxes_ref = ray.put(job), ray.put(plan.names), ray.put(boxes)
        if self._queue is None:  # kept, like the workers, for the `with` block
            self._queue = Queue(actor_options=_queue_options(ray))
        queue = self._queue
        bar = tqdm(total=plan.parts.count, initial=plan.parts.count - len(todo), unit="chunk",
                   desc="embed (Ray)", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)

        def run_round(left: list[int]) -> list[dict]:  # every worker drains the queue
            queue.put_nowait_batch(left)
            calls = {w.embed.remote(job_ref, names_ref, boxes_ref, queue): w for w in workers}
            got, all_done_at = [], None
            while calls:
                ready, _ = ray.wait(list(calls), num_returns=1, timeout=0.5)
                for ref in ready:
                    calls.pop(ref)
                    got.append(self._result(ray, ref))
                on_disk = plan.parts.count - sum(not plan.parts.path(c).is_file() for c in todo)
                bar.update(on_disk - bar.n)
                if calls and on_disk == plan.parts.count:  # nothing left to do: wait a grace, not forever
                    all_done_at = all_done_at or time.monotonic()
                    if time.monotonic() - all_done_at > self.straggler_grace_s:
                        self._end_stragglers(ray, list(calls.values()))
                        calls.clear()
            return got

        try:
            with bar:
                results = run_rounds(todo, run_round, lambda c: chunk_done(plan.parts, c), plan.parts.folder)
        except BaseException:  # failed or interrupted: free the workers' CPUs and GPUs now (and the queue,
            self._release(ray)  # which may still hold chunks)
            raise
        self.results = results
        for r in results:
            log.info("node %s: %d chunks in %.1f s", r["node"], r["chunks"], r["seconds"])
        # as the workers ran them (device, precision), under the paths the user gave (as one process records)
        ran = min(results, key=lambda r: (r["first"] is None, r["first"] or 0))["models"]
        return [{**d, "path": str(m.path)} for d, m in zip(ran, plan.models, strict=True)]

    def _pool(self, ray, shape: tuple, n: int) -> list:
        """``n`` workers of ``shape`` (GPU?, CPUs): those of earlier calls of this runner, and more."""
        if self._workers and self._shape != shape:
            self._release(ray)
        self._shape = shape
        gpu, cpus = shape
        actor = ray.remote(EmbedWorker).options(num_cpus=cpus, num_gpus=1 if gpu else 0,
                                                resources=self.resources or None,
                                                max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
        while len(self._workers) < n:
            self._workers.append(actor.remote())
        return self._workers[:n]

    def _end_stragglers(self, ray, stuck: list) -> None:
        """End workers whose calls did not return although every chunk is on disk (see
        :attr:`straggler_grace_s`); later calls of this runner start fresh ones in their place."""
        log.warning("Ray: every chunk is on disk but %d worker(s) did not answer within %.0f s (a worker "
                    "restarted after its node was lost, waiting for a place?): ending them", len(stuck),
                    self.straggler_grace_s)
        for w in stuck:
            ray.kill(w, no_restart=True)
        self._workers = [w for w in self._workers if all(w is not s for s in stuck)]

    def _release(self, ray) -> None:
        """End the workers (their calls in flight end with them) and the queue."""
        for w in self._workers:
            ray.kill(w, no_restart=True)
        self._workers = []
        if self._queue is not None:
            self._queue.shutdown(force=True)
            self._queue = None

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
            raise WhalesubError(f"a Ray worker failed ({last}); a worker whose process dies is restarted up "
                                f"to {MAX_RETRIES} times, and the chunks finished so far are kept: run the "
                                "command again to continue") from None
        if "error" in r:
            cls = {"DataError": DataError, "ConfigError": ConfigError}.get(r["kind"], WhalesubError)
            raise cls(r["error"])
        return r
