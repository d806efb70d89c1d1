"""``whalesub embed --ray``: the chunks spread over a local 2-node Ray cluster give exactly the file a
single process writes; a worker SIGKILLed mid-run and a driver SIGKILLed mid-run both end, after
the same command again, with identical output; a node that cannot see the image folder is named.

One cluster (``ray.cluster_utils.Cluster``: a head and a second node, one CPU each, small object
stores, no dashboard) is shared by the module; tiny exported model (test_efficientnet, 64 px,
pretrained=False) and small generated PNGs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from test_export import export_tiny, make_checkpoint

from whalesub.core.errors import ConfigError, WhalesubError
from whalesub.embedding.embed import EmbedOptions, run_embed
from whalesub.ranking.store import load_embeddings

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]'): "
                          "the --ray tests need it")

from whalesub.embedding.distributed import (  # noqa: E402 - after the skip
    EmbedWorker,
    RayRunner,
    _resources,
    check_node,
    parse_address,
)

STORE = 80 * 1024 * 1024  # bytes of object store per node (Ray's minimum is 75 MiB)
N_IMAGES = 40


@pytest.fixture(scope="module")
def cluster():
    """A head node and one more node (1 CPU each) on this machine; this process is connected."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=True,
                head_node_args={"num_cpus": 1, "object_store_memory": STORE, "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=STORE)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_models")
    return export_tiny(make_checkpoint(root / "run" / "best.pt", "test_efficientnet", 64, seed=0), root / "a")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """N_IMAGES small RGB PNGs (gradients and a random block each)."""
    root = tmp_path_factory.mktemp("ray_pics")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:72, 0:96]
    for i in range(N_IMAGES):
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 7) % 256, (xx * yy + i) % 256], -1)
        img = img.astype(np.uint8)
        y0, x0 = rng.integers(0, 40, 2)
        img[y0:y0 + 20, x0:x0 + 30] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(root / f"img{i:03d}.png")
    return root


def _opts(**kw) -> EmbedOptions:
    base = dict(backend="onnx", device="cpu", batch_size=4, workers=0, chunk=4, tta="flip")
    base.update(kw)
    return EmbedOptions(**base)


@pytest.fixture(scope="module")
def reference(model, pictures, tmp_path_factory):
    """The single-process embedding (no Ray) every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("ray_ref") / "ref.npz"
    return load_embeddings(run_embed([model], out, _opts(), images=pictures))


def _assert_same(path: Path, ref) -> None:
    got = load_embeddings(path)
    assert got.ids.tolist() == ref.ids.tolist() and len(ref) == N_IMAGES
    assert np.array_equal(got.vectors, ref.vectors)  # bit-identical: the same batches on the same graph
    drop = {"created"}
    assert {k: v for k, v in got.meta.items() if k not in drop} == {
        k: v for k, v in ref.meta.items() if k not in drop}
    assert not Path(str(path) + ".parts").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "from whalesub.cli import app; app()", *map(str, args)]


def _task_pids() -> list[int]:
    """Ray worker processes now embedding (an EmbedWorker's title is ray::EmbedWorker.embed then),
    read from /proc (Linux, as SIGKILL)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if cmd.startswith("ray::EmbedWorker.embed"):
            found.append(int(d.name))
    return found


@pytest.mark.slow
def test_equal_to_single_process_on_two_nodes(cluster, model, pictures, reference, tmp_path):
    runner = RayRunner(cluster.address)
    out = run_embed([model], tmp_path / "ray.npz", _opts(), images=pictures, runner=runner)
    _assert_same(out, reference)
    written = sorted(c for r in runner.results for c in r["written"])
    assert written == list(range(N_IMAGES // 4))  # every chunk computed once, by one worker
    assert sum(r["chunks"] for r in runner.results) == len(written)
    assert len({r["node_id"] for r in runner.results}) == 2  # a worker per node (either may take all)
    # a rerun has nothing to do and must not start a worker
    again = RayRunner(cluster.address)
    assert again(SimpleNamespace(), [], [model], None) is None and again.results == []
    _assert_cpus_free_again()  # called outside a `with` block: its workers ended with the call


def _assert_cpus_free_again(timeout: float = 60) -> None:
    """Every CPU of the cluster is free again (no EmbedWorker holds one)."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total, "Ray workers still hold CPUs"


@pytest.mark.slow
def test_workers_live_for_the_with_block_and_keep_their_models(cluster, model, pictures, reference,
                                                               tmp_path):
    """Inside one ``with RayRunner(...)`` (a whole CLI command) the second embedding runs on the same
    worker processes and opens no model; after the block the workers are gone."""
    with RayRunner(cluster.address) as runner:
        run_embed([model], tmp_path / "a.npz", _opts(), images=pictures, runner=runner)
        first = runner.results
        _assert_same(run_embed([model], tmp_path / "b.npz", _opts(), images=pictures, runner=runner),
                     reference)
        second = runner.results
    pids = {r["pid"] for r in first}
    assert len(first) == len(pids) == 2  # one call per worker, one worker per node
    assert sum(r["opened"] for r in first) == len(pids)  # each worker opened the model once
    assert {r["pid"] for r in second} <= pids and all(r["opened"] == 0 for r in second)
    _assert_cpus_free_again()


@pytest.mark.slow
def test_worker_sigkilled_mid_task_is_retried(cluster, model, pictures, reference, tmp_path):
    out = tmp_path / "k.npz"
    runner = RayRunner(cluster.address)
    result: dict = {}

    def work():
        try:
            result["out"] = run_embed([model], out, _opts(), images=pictures, runner=runner)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            result["error"] = exc

    t = threading.Thread(target=work)
    t.start()
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and t.is_alive():
        pids = _task_pids()
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    t.join(300)
    assert killed is not None, "no Ray task was seen running: the worker could not be killed"
    assert "error" not in result, result.get("error")
    _assert_same(out, reference)
    # the same command again finds the file complete and changes nothing
    _assert_same(run_embed([model], out, _opts(), images=pictures, runner=RayRunner(cluster.address)),
                 reference)


@pytest.mark.slow
def test_a_chunk_held_by_a_killed_worker_goes_round_again(cluster, model, pictures, reference, tmp_path,
                                                          monkeypatch, caplog):
    """Deterministic: a worker takes a chunk from the queue and its process is SIGKILLed before the
    chunk is written. Ray restarts it and runs its call again; the lost chunk goes into a second
    round; the output is the single-process one, every chunk written once."""
    import logging

    from whalesub.embedding import distributed

    marker = tmp_path / "died"

    class DiesHoldingAChunk(distributed.EmbedWorker):  # pickled by value to the workers
        def embed(self, job, names, boxes, chunks):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL)  # the first call of all only
            except FileExistsError:
                return super().embed(job, names, boxes, chunks)
            os.close(fd)
            chunks.get_nowait()  # taken from the queue, never written
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(distributed, "EmbedWorker", DiesHoldingAChunk)
    runner = RayRunner(cluster.address)
    with caplog.at_level(logging.WARNING, logger="whalesub.embedding.distributed"):
        out = run_embed([model], tmp_path / "lost.npz", _opts(), images=pictures, runner=runner)
    assert marker.exists()
    assert "1 chunk(s) held by a worker process that died go round again" in caplog.text
    _assert_same(out, reference)
    written = sorted(c for r in runner.results for c in r["written"])
    assert written == list(range(N_IMAGES // 4))  # the lost chunk once, in the second round


@pytest.mark.slow
def test_a_worker_that_never_answers_is_ended_once_every_chunk_is_done(cluster, model, pictures, reference,
                                                                       tmp_path, monkeypatch, caplog):
    """A worker whose call never returns (as one Ray restarted after a node loss and cannot place)
    does not keep the command waiting: once every chunk is on disk it is ended after the grace."""
    import logging

    from whalesub.embedding import distributed

    marker = tmp_path / "stuck"

    class NeverAnswers(distributed.EmbedWorker):  # pickled by value to the workers
        def embed(self, job, names, boxes, chunks):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # the first call of all only
            except FileExistsError:
                return super().embed(job, names, boxes, chunks)
            time.sleep(120)  # answers in the end: without the grace the test ends, but fails below
            return super().embed(job, names, boxes, chunks)

    monkeypatch.setattr(distributed, "EmbedWorker", NeverAnswers)
    runner = RayRunner(cluster.address)
    runner.straggler_grace_s = 1.0
    with caplog.at_level(logging.WARNING, logger="whalesub.embedding.distributed"):
        out = run_embed([model], tmp_path / "s.npz", _opts(), images=pictures, runner=runner)
    assert marker.exists() and "did not answer within 1 s" in caplog.text
    _assert_same(out, reference)
    assert len(runner.results) == 1  # only the worker that answered
    _assert_cpus_free_again()


@pytest.mark.slow
def test_driver_sigkilled_then_same_command_resumes(cluster, model, pictures, reference, tmp_path):
    out = tmp_path / "d.npz"
    args = ["embed", "--model", model, "--images", pictures, "--out", out, "--device", "cpu",
            "--batch-size", "4", "--chunk", "4", "--workers", "0", "--ray", cluster.address]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and not list(parts.glob("chunk_*.npz")):
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"embed ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and 1 <= len(list(parts.glob("chunk_*.npz"))) < N_IMAGES // 4
    rerun = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr
    _assert_same(out, reference)


@pytest.mark.slow
def test_node_without_the_image_folder_is_named(cluster, model, pictures, tmp_path):
    """A third node runs in its own mount namespace where the image folder is an empty tmpfs: the
    error names that node and the folder, and says the storage is not shared."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs `unshare -m` (a private mount namespace) to hide the images from one node")
    hidden = tmp_path / "hidden_images"
    shutil.copytree(pictures, hidden)
    script = (f"mount -t tmpfs none {hidden} && exec ray start --address={cluster.address} --num-cpus=1 "
              f"--object-store-memory={STORE} --resources='{{\"blind\": 1}}' --block")
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                n["Alive"] and "blind" in n["Resources"] for n in ray.nodes()):
            assert node.poll() is None, "the extra `ray start` node ended"
            time.sleep(0.5)
        blind = next(n for n in ray.nodes() if n["Alive"] and "blind" in n["Resources"])
        with pytest.raises(WhalesubError) as exc:
            run_embed([model], tmp_path / "x.npz", _opts(), images=hidden,
                      runner=RayRunner(cluster.address, resources={"blind": 1}))
        msg = str(exc.value)
        assert "\n" not in msg
        assert blind["NodeID"][:12] in msg and str(hidden) in msg and "not shared" in msg
        assert not (tmp_path / "x.npz").exists()
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(60)


def embed_task(job: dict) -> dict:
    """Some chunks embedded by a fresh :class:`EmbedWorker`, without Ray (``job`` also holds ``names``,
    ``boxes`` and ``chunks``)."""
    rest = {k: v for k, v in job.items() if k not in ("names", "boxes", "chunks")}
    return EmbedWorker().embed(rest, job["names"], job["boxes"], job["chunks"])


def test_worker_version_and_fingerprint_must_match_the_driver(model, pictures, tmp_path):
    parts = tmp_path / "x.npz.parts"
    parts.mkdir()
    names = sorted(p.name for p in pictures.iterdir())
    job = {"version": "0.0.1", "image_dir": str(pictures), "names": names,
           "model_paths": [str(model)], "parts": str(parts)}
    with pytest.raises(ConfigError, match=r"runs whalesub .* the driver 0\.0\.1"):
        check_node(job)
    import whalesub

    fp = json.loads((model / "export.json").read_text())["fingerprint"]
    job.update(version=whalesub.__version__, out=str(tmp_path / "x.npz"), options=vars(_opts()).copy(),
               device="cpu", backend="onnx", gpu=False, threads=1, workers=0, boxes=[None] * len(names),
               chunks=[0], fingerprints=["0" * len(fp)])
    check_node(job)  # same version, everything readable
    r = embed_task(job)
    assert r["kind"] == "ConfigError" and fp[:12] in r["error"] and "driver's 000000000000" in r["error"]
    assert not list(parts.glob("chunk_*"))
    missing = dict(job, model_paths=[str(tmp_path / "nowhere")])
    assert "cannot read the model" in embed_task(missing)["error"]


def test_a_worker_keeps_its_models_between_runs_while_their_fingerprints_hold(model, pictures, tmp_path):
    """:class:`EmbedWorker` without Ray: a second run with the same models opens none; a run whose
    driver expects another fingerprint is refused even though a model of that path is open."""
    import whalesub

    names = sorted(p.name for p in pictures.iterdir())
    fp = json.loads((model / "export.json").read_text())["fingerprint"]
    worker = EmbedWorker()

    def job(run: str, out: Path, **kw) -> dict:
        Path(str(out) + ".parts").mkdir(exist_ok=True)
        return {"run": run, "version": whalesub.__version__, "image_dir": str(pictures),
                "model_paths": [str(model)], "fingerprints": [fp], "out": str(out),
                "parts": str(out) + ".parts", "options": vars(_opts()).copy(), "device": "cpu",
                "backend": "onnx", "gpu": False, "threads": 1, "workers": 0, **kw}

    a = worker.embed(job("r1", tmp_path / "a.npz"), names, None, [0, 1])
    assert (a["opened"], a["chunks"]) == (1, 2)
    kept = worker.plan.models[0]
    b = worker.embed(job("r2", tmp_path / "b.npz"), names, None, [2])
    assert (b["opened"], b["chunks"]) == (0, 1) and worker.plan.models[0] is kept
    with np.load(tmp_path / "b.npz.parts" / "chunk_000002.npz") as z:  # the rows of chunk 2, in order
        assert z["positions"].tolist() == [8, 9, 10, 11]
    c = worker.embed(job("r3", tmp_path / "c.npz", fingerprints=["0" * len(fp)]), names, None, [0])
    assert c["kind"] == "ConfigError" and "driver's 000000000000" in c["error"]
    assert not list((tmp_path / "c.npz.parts").glob("chunk_*"))


def test_no_gpu_where_one_was_asked():
    fake = SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 4.0}},
                                          {"Alive": True, "Resources": {"CPU": 2.0}}])
    with pytest.raises(ConfigError, match=r"--device cuda: the Ray cluster has no GPU \(2 node\(s\), 6 CPU"):
        _resources(fake, "connect", 0, "cuda")
    assert _resources(fake, "connect", 0, "auto") == (False, 2, 3)  # 2 CPUs a task: 2 + 1 slots
    assert _resources(fake, "local", 2, "auto") == (False, 3, 2)
    gpus = SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
                                          {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}}])
    assert _resources(gpus, "connect", 0, "cuda") == (True, 4, 2)  # dead nodes do not count
    assert _resources(gpus, "connect", 0, "cpu") == (False, 8, 1)


def test_cpus_per_worker_and_custom_resources():
    """``--ray-cpus C``: C CPUs a worker, so a node holds as many workers as its CPUs allow; custom
    resources (``RayRunner(resources=...)``) count only the nodes offering them."""
    fake = SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 4.0, "embed": 2.0}},
                                          {"Alive": True, "Resources": {"CPU": 2.0}}])
    assert _resources(fake, "connect", 0, "auto", 1) == (False, 1, 6)
    assert _resources(fake, "connect", 0, "auto", 3) == (False, 3, 1)  # only the 4-CPU node fits one
    assert _resources(fake, "local", 2, "auto", 1) == (False, 1, 2)
    with pytest.raises(ConfigError, match=r"--ray-cpus 8: no node .* has 8 CPUs \(the largest has 4\)"):
        _resources(fake, "connect", 0, "auto", 8)
    assert _resources(fake, "connect", 0, "auto", None, {"embed": 1}) == (False, 4, 1)
    assert _resources(fake, "connect", 0, "auto", 1, {"embed": 1}) == (False, 1, 2)  # 2 "embed" units
    with pytest.raises(ConfigError, match=r"no node of the Ray cluster offers the resources \{'blind': 1\}"):
        _resources(fake, "connect", 0, "auto", None, {"blind": 1})
    gpus = SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}])
    assert _resources(gpus, "connect", 0, "auto", 2) == (True, 2, 2)
    assert _resources(gpus, "connect", 0, "auto", 6) == (True, 6, 1)  # 8 CPUs feed one 6-CPU worker


def test_addresses():
    assert parse_address("local:3") == ("local", 3) and parse_address("local") == ("local", 1)
    assert parse_address("auto") == ("connect", "auto")
    assert parse_address("ray://head:10001") == ("connect", "ray://head:10001")
    for bad in ("local:0", "local:x", ""):
        with pytest.raises(ConfigError, match="--ray"):
            parse_address(bad)


def test_cli_bad_address_is_one_line(model, pictures, tmp_path):
    res = subprocess.run(_cli("embed", "--model", model, "--images", pictures, "--out", tmp_path / "x.npz",
                              "--ray", "local:zero"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "local:N" in res.stderr
    for args, says in ((["--ray-cpus", "1"], "--ray-cpus sets the CPUs of each Ray worker: it needs --ray"),
                       (["--ray", "local:1", "--ray-cpus", "0"], "--ray-cpus must be >= 1, got 0")):
        res = subprocess.run(_cli("embed", "--model", model, "--images", pictures, "--out",
                                  tmp_path / "x.npz", *args), capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and says in res.stderr
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.npz.parts").exists()


@pytest.mark.slow
def test_predict_on_ray_equals_predict_in_one_process(cluster, model, synth_set, tmp_path):
    """``predict --ray``: the gallery and test embeddings, and so the submission, are those of a
    predict run without Ray."""
    from whalesub.workflows.predict import predict

    kw = dict(sample=synth_set / "sample_submission.csv", threshold=0.5,
              options=EmbedOptions(device="cpu", batch_size=4, workers=0, chunk=8))
    args = (synth_set / "train.csv", synth_set / "train_images", synth_set / "test_images")
    plain = predict([model], *args, tmp_path / "plain", **kw)
    with RayRunner(cluster.address) as runner:  # as the CLI runs it
        on_ray = predict([model], *args, tmp_path / "ray", runner=runner, **kw)
    assert runner.results and all(r["opened"] == 0 for r in runner.results)  # the test set: models kept
    for key in ("gallery", "queries"):
        a, b = load_embeddings(Path(plain[key])), load_embeddings(Path(on_ray[key]))
        assert a.ids.tolist() == b.ids.tolist() and len(a) > 0
        assert np.array_equal(a.vectors, b.vectors)
    sub = "submission.csv"
    assert (tmp_path / "plain" / sub).read_bytes() == (tmp_path / "ray" / sub).read_bytes()


def test_missing_ray_is_a_clear_error(monkeypatch, model, pictures, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r'--ray needs Ray, which is not installed: .*\.\[cluster\]'):
        run_embed([model], tmp_path / "x.npz", _opts(), images=pictures, runner=RayRunner("local:1"))
    assert not (tmp_path / "x.npz.parts").exists()  # refused before any file was written
