"""whalesub: identify individual animals in photographs (Kaggle Happywhale format).

The packages, lowest first. The order is :data:`LAYERS` below, and it is the import rule: a module
imports only from its own package and from packages earlier in the list (``tests/test_structure.py``
derives every module's layer from its package and enforces this; a new module needs no table edit).
``train/`` (training, run from a checkout) sits above all of them; ``whalesub`` never imports it.

1. ``core``: errors and atomic file writes; nothing of whalesub below it.
2. ``data``: the data contract (train.csv, test listings, truth, sample submission), image decoding
   and crops, box tables and public box files.
3. ``synth``: the synthetic Happywhale-format set (the demo and the tests' data).
4. ``ranking``: pure arrays (vectors, FAISS index, ranking, class centres, thresholds, MAP@5) and the
   files whose rules they define (embedding files, submission files).
5. ``models``: the model spec, the network, ONNX export and FP16, weight sources, ONNX Runtime
   sessions and the inference backends.
6. ``embedding``: image loaders, ``embed`` (TTA, several models), shards.
7. ``workflows``: the file-level commands: submit and tune, out-of-fold tuning, blends, pseudo-labels,
   ``predict``.
8. ``report``: the HTML error report of a submission.
9. ``catalogue``: a persistent catalogue of known animals: add photos, identify, record decisions.
10. ``kaggle``: datasets, wheels, the offline kernel, upload and submit.
11. ``cli``: the typer app (``whalesub``), one thin command per workflow.

This file itself (the version and this order) is below everything and imports nothing.
"""

__version__ = "0.1.0"

LAYERS = ("core", "data", "synth", "ranking", "models", "embedding", "workflows", "report", "catalogue",
          "kaggle", "cli")
