"""Export the embedding network to ONNX (FP32, optionally mixed FP16) with parity checks.

Output folder (``whalesub export RUN_OR_CHECKPOINT --out DIR``)::

    DIR/model.onnx          FP32 graph (TorchScript exporter, opset >= 17, dynamic batch)
    DIR/model_fp16.onnx     --fp16: backbone FP16, GeM + neck + L2 normalisation FP32
    DIR/model_spec.json     the ModelSpec of both graphs (``ModelSpec.load(DIR)`` reads it)
    DIR/export.json         manifest: fingerprint, weights digest, input/output contract,
                            parity figures, file checksums, source checkpoint
    DIR/class_centres.npz   when the checkpoint has an ArcFace head: an embedding file
                            (whalesub.ranking.store) with ``ids`` [C] individual_id, ``embeddings`` [C, D]
                            float32 unit rows (per individual: its normalised sub-centres averaged,
                            then renormalised), ``meta`` with the model's fingerprint

Graph contract: input ``image`` float32 [batch, 3, S, S] (RGB, resized to the spec's square side
S, scaled to 0-1 and normalised with the spec's mean/std: exactly ``whalesub.data.image.to_model_input``);
output ``embedding`` float32 [batch, D], L2-normalised rows. ``batch`` is dynamic.

Parity: before anything is written to DIR, ONNX Runtime's output is compared with PyTorch's on
random tensors and real images (``--parity-images``, else the first 8 of the training run's
``image_dir`` when it still exists); a per-row cosine below 0.9999 (FP32) raises
WhalesubError and leaves DIR untouched. The FP16 graph is checked structurally on any machine
(FP16 backbone weights, FP32 tail, FP32 input/output) and numerically (cosine >= 0.999) only
where ONNX Runtime's CUDA provider is active: the CPU provider computes FP16 ops in FP32.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from whalesub.core.atomic import as_write_error, atomic_write_text, make_temp, writing
from whalesub.core.errors import WhalesubError
from whalesub.data.contract import list_image_folder
from whalesub.data.image import load_for_model
from whalesub.models.fp16 import check_fp16_structure, convert_backbone_to_fp16, pool_prefix
from whalesub.models.runtime import cuda_provider_active, ort_session
from whalesub.models.sources import class_centres, load_source
from whalesub.models.spec import SPEC_FILENAME, weights_digest
from whalesub.ranking.store import save_embeddings
from whalesub.ranking.vectors import unit_rows

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
FP32_COSINE_MIN = 0.9999
FP16_COSINE_MIN = 0.999
FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}
MANIFEST = "export.json"
CENTRES = "class_centres.npz"


class FP16ExportError(WhalesubError):
    """The FP32 graph could not be converted to the mixed-precision layout (exit 2, nothing written)."""


def model_fingerprint(net, spec) -> str:
    """The fingerprint of ``spec`` and ``net``'s weights (as training and ``whalesub embed`` compute it)."""

    return spec.fingerprint(weights_digest(net.state_dict()))


def export_onnx(net, spec, path: Path, opset: int = 17, batch: int = 2) -> None:
    """Write ``net`` (EmbeddingNet, eval, CPU, FP32) to ``path`` as ONNX with a dynamic batch axis."""
    import torch

    if opset < 17:
        raise WhalesubError(f"--opset {opset} is too old: use 17 or newer "
                            "(LayerNormalization, stable Reduce ops)")
    x = torch.randn(batch, spec.in_chans, spec.image_size, spec.image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # we choose the legacy exporter
        # The TorchScript exporter, chosen explicitly: torch >= 2.9 defaults to dynamo, whose
        # graphs for timm CNNs are less predictable; node names keep module scopes (/backbone/...),
        # which the FP16 conversion relies on.
        torch.onnx.export(
            net, (x,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine of two [N, D] arrays (float64 arithmetic; 0 for an all-zero row)."""
    return (unit_rows(a, np.float64) * unit_rows(b, np.float64)).sum(1)


def parity_inputs(spec, images: Sequence[Path] = (), n_random: int = 4, seed: int = 0) -> np.ndarray:
    """[N, C, S, S] float32: ``n_random`` standard-normal tensors plus the given real images."""
    rng = np.random.default_rng(seed)
    s = spec.image_size
    arrays = [rng.standard_normal((n_random, spec.in_chans, s, s)).astype(np.float32)]
    if images:
        arrays.append(np.stack([load_for_model(p, spec) for p in images]).astype(np.float32))
    return np.concatenate(arrays)


def check_parity(net, onnx_path: Path, x: np.ndarray, min_cosine: float, providers, label: str) -> dict:
    """Compare ONNX Runtime with PyTorch on ``x``; raise WhalesubError when a row's cosine < min."""
    import torch

    with torch.no_grad():  # batches of 8: big inputs (1024 px) stay within CPU memory
        ref = np.concatenate([net(torch.from_numpy(x[i:i + 8])).float().numpy() for i in range(0, len(x), 8)])
    sess = ort_session(onnx_path, providers)
    got = np.concatenate([sess.run(None, {INPUT_NAME: x[i:i + 8]})[0] for i in range(0, len(x), 8)])
    if got.dtype != np.float32 or got.shape != ref.shape:
        raise WhalesubError(f"{label}: ONNX output is {got.dtype} {got.shape}, expected float32 {ref.shape}")
    cos = row_cosines(ref, got)
    worst = float(cos.min()) if np.isfinite(cos).all() else float("nan")
    result = {"rows": int(len(x)), "min_cosine": worst, "max_abs_diff": float(np.abs(ref - got).max()),
              "providers": list(sess.get_providers()), "threshold": min_cosine}
    if not worst >= min_cosine:
        raise WhalesubError(
            f"{label}: ONNX Runtime and PyTorch disagree (worst per-row cosine {worst:.6f} < {min_cosine} "
            f"on {len(x)} inputs, max |diff| {result['max_abs_diff']:.3g}); nothing was written. "
            "Check for ops the exporter does not support or train-mode layers, and report the model"
        )
    log.info("%s parity: worst cosine %.7f over %d inputs (%s)", label, worst, len(x), result["providers"][0])
    return result


def export_model(source: str | Path, out_dir: str | Path, *, fp16: bool = False, opset: int = 17,
                 parity_images: Sequence[Path] = ()) -> dict:
    """Export the checkpoint or run folder ``source`` to ``out_dir``; return the manifest dict.

    Everything is written to a temporary folder first and moved into ``out_dir`` only after
    every parity check passed, so a failed export leaves ``out_dir`` as it was.
    """

    src = load_source(source)
    net, spec = src.net, src.spec
    digest = weights_digest(net.state_dict())
    fingerprint = spec.fingerprint(digest)
    out_dir = Path(out_dir)
    if not parity_images:  # the run's own training images, when they are still where training read them
        image_dir = _training_image_dir(src)
        if image_dir is not None:
            parity_images = pick_parity_images(image_dir)
            log.info("parity inputs include %d images of %s", len(parity_images), image_dir)
    x = parity_inputs(spec, parity_images)
    what = f"the export folder {out_dir}"
    with writing(out_dir, what):  # a full disk is one error naming the folder
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp(out_dir, folder=True)  # hidden; a killed export's leftovers go next time
    try:
        fp32 = tmp / FILES["fp32"]
        export_onnx(net, spec, fp32, opset)
        files = {"fp32": {"file": FILES["fp32"], "parity": check_parity(
            net, fp32, x, FP32_COSINE_MIN, ("CPUExecutionProvider",), f"FP32 export of {source}")}}
        if fp16:
            files["fp16"] = export_fp16(net, fp32, tmp / FILES["fp16"], x, str(source))
        spec.save(tmp / SPEC_FILENAME)
        for key, entry in files.items():
            entry["spec"] = SPEC_FILENAME
            entry["sha256"] = sha256_file(tmp / entry["file"])
            entry["precision"] = key
        manifest = {
            "format": "whalesub.models.export", "format_version": 1, "fingerprint": fingerprint,
            "weights_digest": digest, "source": str(src.path.resolve()), "opset": opset, "files": files,
            "input": {"name": INPUT_NAME, "dtype": "float32",
                      "shape": ["batch", spec.in_chans, spec.image_size, spec.image_size],
                      "layout": "NCHW RGB, resized + normalised by whalesub.data.image.to_model_input"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", int(spec.embed_dim)],
                       "l2_normalised": True},
        }
        centres = class_centres(src)
        if centres is not None:
            ids, mat, info = centres
            save_embeddings(tmp / CENTRES, ids, mat,
                            {"fingerprint": fingerprint, "kind": "class_centres", **info})
            manifest["class_centres"] = {"file": CENTRES, "n_classes": int(len(ids)), **info}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _move_into(tmp, out_dir)
    except Exception as exc:
        error = as_write_error(exc, out_dir, what)  # ONNX writers raise the OS's bare message
        if error is None:
            raise
        raise error from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s (fingerprint %s)", source, out_dir, fingerprint[:12])
    return manifest


def export_fp16(net, fp32: Path, path16: Path, x: np.ndarray, label: str) -> dict:
    """Write the mixed-precision graph of ``fp32`` to ``path16``, check it; return its manifest entry."""
    import onnx

    prefix = pool_prefix()  # EmbeddingNet.pool: where the FP32 tail of the graph starts
    try:
        model16 = convert_backbone_to_fp16(onnx.load(str(fp32)), prefix)
        structure = check_fp16_structure(model16, prefix)
    except Exception as exc:  # onnx's checker/inference errors are no ValueError; any failure is ours
        raise FP16ExportError(f"FP16 conversion of {label} failed ({type(exc).__name__}: {exc}); nothing "
                              "was written. Export without --fp16, and report the model") from None
    onnx.save(model16, str(path16))
    # CPU: the provider upcasts to FP32, so this only catches conversion mistakes.
    entry = {"file": path16.name, "structure": structure, "cpu_check": check_parity(
        net, path16, x, FP16_COSINE_MIN, ("CPUExecutionProvider",), f"FP16 export of {label} (CPU)")}
    if cuda_provider_active(path16):
        entry["parity"] = check_parity(net, path16, x, FP16_COSINE_MIN, ("CUDAExecutionProvider",),
                                       f"FP16 export of {label} (CUDA)")
    else:
        entry["parity"] = "not run: no active CUDA provider (ONNX Runtime's CPU provider computes in FP32)"
        log.warning("FP16 export of %s checked structurally only: %s", label, entry["parity"])
    return entry


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _move_into(tmp: Path, out_dir: Path) -> None:
    """Move every file of ``tmp`` into ``out_dir`` (each rename atomic); the manifest goes last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [out_dir / f for f in (FILES["fp16"], CENTRES) if not (tmp / f).exists()]
    for path in stale:  # a previous export's FP16 file or centres must not outlive this export
        path.unlink(missing_ok=True)
    # The manifest leaves first and comes back last: a folder caught half-updated by a kill has no
    # export.json, so `embed` refuses it ("not an export folder") instead of mixing two exports.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST) + [MANIFEST]
    for name in names:
        shutil.move(str(tmp / name), str(out_dir / name))


def _training_image_dir(src) -> Path | None:
    """The checkpoint config's ``image_dir`` (relative: to the cwd or a folder above the checkpoint)."""
    image_dir = (src.checkpoint.get("config") or {}).get("image_dir")
    if not isinstance(image_dir, str) or not image_dir:
        return None
    for base in (Path.cwd(), *src.path.resolve().parents):
        if (base / image_dir).is_dir():
            return base / image_dir
    return None


def pick_parity_images(folder: Path | None, n: int = 8) -> list[Path]:
    """The first ``n`` images (sorted names) of ``folder``, or [] when it is None."""
    if folder is None:
        return []

    if not Path(folder).is_dir():
        raise WhalesubError(f"--parity-images {folder} is not a folder of images")
    found = [Path(folder) / name for name in list_image_folder(Path(folder))[:n]]  # no hidden ._x.jpg
    if not found:
        raise WhalesubError(f"--parity-images {folder} holds no images")
    return found
