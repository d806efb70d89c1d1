"""Kaggle: package models and wheels as datasets, build the offline kernel, upload, push, submit.

Modules: :mod:`~whalesub.kaggle.metadata` (``dataset-metadata.json`` / ``kernel-metadata.json``
and their rules), :mod:`~whalesub.kaggle.package` (the build folder), :mod:`~whalesub.kaggle.wheels`
(the offline wheel set), :mod:`~whalesub.kaggle.kernel` (what the kernel runs once whalesub is
installed), ``kernel_script.py`` (the kernel's own file: standard library only, finds the inputs and
installs the wheels), :mod:`~whalesub.kaggle.client` (the ``kaggle`` client run as a subprocess).

Every dataset of a build holds a ``manifest.json`` whose ``kind`` is one of :data:`KINDS`; the
kernel finds its inputs by searching ``/kaggle/input`` for these files, whatever the mount layout.

Layer 10: imports every package below (``core`` .. ``catalogue``); never the CLI.
"""

from __future__ import annotations

MANIFEST = "manifest.json"
KIND_MODELS, KIND_WHEELS, KIND_BOXES = "whalesub-models", "whalesub-wheels", "whalesub-boxes"
KINDS = (KIND_MODELS, KIND_WHEELS, KIND_BOXES)
DATASETS = {"models": KIND_MODELS, "wheels": KIND_WHEELS, "boxes": KIND_BOXES}  # build sub-folder -> kind
KERNEL_DIR = "kernel"
KERNEL_FILE = "whalesub_kernel.py"
DATASET_METADATA = "dataset-metadata.json"
KERNEL_METADATA = "kernel-metadata.json"
