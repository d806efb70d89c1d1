"""Layer 5, ``models``: the embedding network and everything that runs it.

- :mod:`~whalesub.models.spec`: ``ModelSpec`` (backbone, input size, mean/std, embedding size,
  fingerprint), the JSON beside every weight file.
- :mod:`~whalesub.models.network`: ``EmbeddingNet`` (timm backbone + GeM + neck + L2 norm) and
  strict checkpoint loading.
- :mod:`~whalesub.models.export`: torch -> ONNX FP32/FP16 with parity checks;
  :mod:`~whalesub.models.fp16` the FP16 conversion that keeps GeM and the tail in FP32.
- :mod:`~whalesub.models.sources`: weight sources (checkpoints, export folders).
- :mod:`~whalesub.models.runtime`: ONNX Runtime sessions and the CUDA checks around them.
- :mod:`~whalesub.models.backends`: the inference backends (ONNX Runtime, torch).

Imports: ``core``, ``data``, ``ranking`` (embedding files for parity and centres). torch, timm and
onnx are imported inside the functions that need them.
"""
