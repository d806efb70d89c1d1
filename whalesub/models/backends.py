"""Inference backends for ``whalesub embed``: ONNX Runtime (exported folders) and PyTorch.

Both take a batch ``x`` float32 [B, 3, S, S] (``whalesub.data.image.to_model_input`` output) and return
float32 [B, D] L2-normalised rows. Both carry the model's ``fingerprint`` (ModelSpec + weights
digest), which is the same whether a model runs from its checkpoint (torch) or its export (onnx).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whalesub.core.errors import ConfigError, DataError, WhalesubError
from whalesub.models.export import INPUT_NAME, MANIFEST, model_fingerprint, sha256_file
from whalesub.models.runtime import (
    CUDA_MISMATCH_HELP,
    cuda_driver_present,
    ort_session,
    prepare_cuda_libraries,
)
from whalesub.models.sources import load_source
from whalesub.models.spec import ModelSpec

log = logging.getLogger(__name__)
REEXPORT = "re-run `whalesub export` to write the folder again"


@dataclass
class Model:
    """One ``--model``: its spec, fingerprint and a callable running a batch."""

    path: Path
    spec: Any
    fingerprint: str
    backend: str
    precision: str
    device: str
    run: Any = field(repr=False)
    info: dict = field(default_factory=dict)

    def __call__(self, x, flip: bool = False) -> np.ndarray:
        """x: [B, C, S, S] float32 (numpy array or CPU torch tensor, pinned for GPUs) -> [B, D] float32.

        ``flip``: also the horizontally mirrored batch, in the same model call -> [2B, D] float32
        (rows 0..B-1 original, B..2B-1 mirrored); torch mirrors on the device after one copy.
        """
        return self.run(x, flip)

    def describe(self) -> dict:
        return {"path": str(self.path), "fingerprint": self.fingerprint, "backend": self.backend,
                "precision": self.precision, "device": self.device, "spec": self.spec.to_dict()}


def open_model(path: str | Path, backend: str = "onnx", device: str = "auto", fp16: bool = False,
               threads: int | None = None) -> Model:
    """Open ``path`` for inference: an export folder (onnx) or a run folder / checkpoint (torch).

    ``threads``: ONNX Runtime's intra-op threads (default: its own, one per physical core); a Ray
    task sets it to the CPUs it was given. The torch backend ignores it: ``torch.set_num_threads`` is
    process-wide, so torch keeps its own setting (set it yourself, or ``OMP_NUM_THREADS``).

    An export folder's ``export.json`` and ``model_spec.json`` are checked first
    (:func:`read_export_manifest`): a malformed manifest or a spec that does not give the manifest's
    fingerprint is a DataError naming the file."""
    if backend not in ("onnx", "torch"):
        raise ConfigError(f"--backend {backend!r} is not known: use onnx or torch")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not known: use auto, cpu or cuda")
    if backend == "onnx":
        return _open_onnx(Path(path), device, fp16, threads)
    return _open_torch(Path(path), device, fp16)


def read_export_manifest(folder: Path) -> dict:
    """The ``export.json`` of an export folder, checked; or a WhalesubError saying how to make one.

    Checked: the keys and types ``whalesub export`` writes (``fingerprint``, ``weights_digest``,
    ``files`` with a ``file`` and a ``spec`` per precision), and that every listed ``model_spec.json``
    still gives the manifest's fingerprint with its ``weights_digest`` (a spec edited or copied from
    another export would preprocess differently under the old fingerprint).
    """

    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        hint = ("it looks like a checkpoint or run folder: use --backend torch, or export it first with "
                f"`whalesub export {folder} --out DIR`") if folder.exists() else "the path does not exist"
        raise WhalesubError(f"--model {folder}: not an export folder (no {MANIFEST}); {hint}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{manifest_path} is not valid JSON ({exc}); {REEXPORT}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path} must hold a JSON object, got {type(manifest).__name__}; {REEXPORT}")
    _check_manifest(manifest, manifest_path)
    for entry in manifest["files"].values():
        _check_spec_fingerprint(folder, manifest, folder / entry["spec"])
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    """DataError naming ``path`` and the key when ``manifest`` lacks a key or has a wrong type."""

    def bad(key: str, want: str, value: Any = None, missing: bool = False) -> DataError:
        got = "it is missing" if missing else f"got {type(value).__name__} {_short(value)}"
        return DataError(f"{path}: key {key!r} must be {want}, {got}; {REEXPORT}")

    for key, want in (("fingerprint", "a non-empty string"), ("weights_digest", "a non-empty string")):
        if key not in manifest:
            raise bad(key, want, missing=True)
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise bad(key, want, manifest[key])
    files = manifest.get("files")
    want = "an object of precisions (fp32, fp16) -> {file, spec, sha256}"
    if "files" not in manifest:
        raise bad("files", want, missing=True)
    if not isinstance(files, dict) or not files:
        raise bad("files", want, files)
    for precision, entry in files.items():
        where = f"files.{precision}"
        if not isinstance(entry, dict):
            raise bad(where, "an object with 'file', 'spec' and 'sha256'", entry)
        for key in ("file", "spec"):
            name = entry.get(key)
            if key not in entry:
                raise bad(f"{where}.{key}", "a file name in the export folder", missing=True)
            if not isinstance(name, str) or not name or name == ".." or Path(name).name != name:
                raise bad(f"{where}.{key}", "a file name in the export folder", name)
        # `whalesub export` always writes it; checked (against the file) only when present
        if "sha256" in entry and not (isinstance(entry["sha256"], str) and entry["sha256"]):
            raise bad(f"{where}.sha256", "a hex sha256 string", entry["sha256"])


def _short(value: Any, n: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_spec_fingerprint(folder: Path, manifest: dict, spec_path: Path) -> ModelSpec:
    """Load ``spec_path``; DataError unless it gives ``manifest``'s fingerprint (export.py's formula)."""
    if not spec_path.is_file():
        raise WhalesubError(f"--model {folder}: {spec_path.name} is missing; {REEXPORT}")
    spec = ModelSpec.load(spec_path)
    if spec.fingerprint(manifest["weights_digest"]) != manifest["fingerprint"]:
        raise DataError(
            f"{spec_path} does not match the fingerprint {manifest['fingerprint']} in {folder / MANIFEST} "
            "(the spec was edited or copied from another export, and would change preprocessing); "
            f"restore this export's original {spec_path.name} or {REEXPORT}")
    return spec


def _open_onnx(folder: Path, device: str, fp16: bool, threads: int | None = None) -> Model:
    import onnxruntime as ort

    manifest = read_export_manifest(folder)
    key = "fp16" if fp16 else "fp32"
    entry = manifest["files"].get(key)
    if entry is None:
        raise WhalesubError(f"--model {folder} has no {key.upper()} graph (export.json lists "
                            f"{sorted(manifest['files'])}); re-export with "
                            "`whalesub export ... --fp16`")
    onnx_path, spec_path = folder / entry["file"], folder / entry["spec"]
    if not onnx_path.is_file():
        raise WhalesubError(f"--model {folder}: {onnx_path.name} is missing; {REEXPORT}")
    if "sha256" in entry and sha256_file(onnx_path) != entry["sha256"]:
        raise WhalesubError(f"--model {folder}: {onnx_path.name} does not match the sha256 in export.json "
                            "(truncated copy or a file from another export); "
                            "copy the folder again or re-export")
    spec = _check_spec_fingerprint(folder, manifest, spec_path)  # checked again: it is this one we run
    available = ort.get_available_providers()
    driver = cuda_driver_present()
    if device == "cuda" and not ("CUDAExecutionProvider" in available and driver):
        why = ("not built into this onnxruntime" if "CUDAExecutionProvider" not in available
               else "no NVIDIA driver: libcuda cannot be loaded")
        raise WhalesubError(f"--device cuda: {CUDA_MISMATCH_HELP.format(why=why)}")
    if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available and driver):
        prepare_cuda_libraries()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        sess = ort_session(onnx_path, providers, threads)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: a damaged graph, a provider failing
        text = str(exc).strip()
        why = text.splitlines()[-1][:300] if text else type(exc).__name__
        fix = ("try --device cpu, or see the CUDA/cuDNN versions in docs/install.md" if len(providers) > 1
               else "copy the folder again or re-run `whalesub export`")
        raise WhalesubError(f"--model {folder}: ONNX Runtime cannot open {onnx_path.name} with "
                            f"{'/'.join(providers)} ({why}); {fix}") from None
    active = sess.get_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in active:
        why = f"available {available} but the session fell back to {active}"
        raise WhalesubError(f"--device cuda: {CUDA_MISMATCH_HELP.format(why=why)}")
    if device == "auto" and "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in active:
        log.warning("CUDAExecutionProvider available but inactive (CUDA/cuDNN mismatch?): running on the CPU")
    on_gpu = "CUDAExecutionProvider" in active
    if fp16 and not on_gpu:
        log.warning("--fp16 on the CPU provider: ONNX Runtime computes in FP32 there (no speed-up)")

    def run(x, flip: bool) -> np.ndarray:
        x = x if isinstance(x, np.ndarray) else x.numpy()  # a (pinned) CPU tensor: shares memory
        x = np.concatenate([x, x[..., ::-1]]) if flip else np.ascontiguousarray(x)
        out = sess.run(None, {INPUT_NAME: x.astype(np.float32, copy=False)})[0]
        return out.astype(np.float32, copy=False)

    return Model(folder, spec, manifest["fingerprint"], "onnx", key, "cuda" if on_gpu else "cpu", run,
                 {"providers": active})


def _open_torch(path: Path, device: str, fp16: bool) -> Model:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise WhalesubError("--device cuda with --backend torch, but torch sees no CUDA GPU "
                            "(torch.cuda.is_available() is False); use --device cpu or auto")
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    if fp16 and dev.type != "cuda":
        raise WhalesubError("--fp16 with --backend torch needs a CUDA GPU (CPU autocast FP16 is slow "
                            "and inexact); drop --fp16 or run on a GPU")
    src = load_source(path)  # eval mode, on the CPU
    fingerprint = model_fingerprint(src.net, src.spec)  # before the move: no device-to-host copies
    net = src.net.to(dev)

    @torch.inference_mode()
    def run(x, flip: bool) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        t = t.to(dev, non_blocking=True)  # the loader pins batches when a model runs on a GPU
        t = torch.cat([t, t.flip(-1)]) if flip else t
        with torch.autocast(dev.type, dtype=torch.float16, enabled=fp16):
            out = net(t)
        return out.float().cpu().numpy()

    return Model(path, src.spec, fingerprint, "torch", "fp16" if fp16 else "fp32", dev.type, run)
