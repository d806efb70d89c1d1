"""ONNX Runtime sessions and the CUDA checks around them (used by export and embed).

ONNX Runtime falls back to its CPU provider without an error when the CUDA libraries do not match
the onnxruntime-gpu build, so whether CUDA is used is read from a session's active providers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CUDA_MISMATCH_HELP = (
    "ONNX Runtime's CUDAExecutionProvider is not active ({why}). Usually the installed onnxruntime-gpu "
    "and the CUDA/cuDNN libraries do not match: onnxruntime-gpu >= 1.27 needs the CUDA 13 runtime and "
    "cuDNN 9 (the system CUDA 13 toolkit, or `pip install 'nvidia-cuda-runtime>=13' nvidia-cudnn-cu13`, "
    "which PyTorch's cu13x wheels bring), while CUDA 12 systems need `pip install 'onnxruntime-gpu<1.27'`. "
    "(what counts is the session's active providers, not onnxruntime.get_available_providers()). "
    "Or run on the CPU with --device cpu, or on the GPU with --backend torch"
)


def prepare_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries ONNX Runtime's CUDA provider needs before a session is made.

    Importing torch first loads its CUDA runtime and cuDNN (ONNX Runtime's documented way to share
    PyTorch's CUDA wheels); ``onnxruntime.preload_dlls`` (>= 1.21) also finds the nvidia-* pip wheels.
    """
    import contextlib

    with contextlib.suppress(Exception):
        import torch  # noqa: F401
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()


def ort_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
    """An ONNX Runtime session on ``path`` with the given providers (in priority order);
    ``threads``: intra-op threads (None: ONNX Runtime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def cuda_driver_present() -> bool:
    """False when the NVIDIA driver library cannot be loaded (then no CUDA provider can work).

    Checked first so that CPU machines with onnxruntime-gpu do not log a provider-load error.
    """
    import ctypes
    import sys

    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return sys.platform == "darwin"  # no NVIDIA driver on macOS; let ONNX Runtime decide elsewhere
    return True


def cuda_provider_active(onnx_path: Path) -> bool:
    """True when ONNX Runtime really runs ``onnx_path`` on the CUDA provider (not a CPU fallback)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not cuda_driver_present():
        return False
    prepare_cuda_libraries()
    try:
        sess = ort_session(onnx_path, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    except Exception:  # noqa: BLE001 - a broken CUDA install is "not active"
        return False
    return "CUDAExecutionProvider" in sess.get_providers()
