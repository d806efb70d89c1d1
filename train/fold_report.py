"""The error report of a fold (config key ``report: true``), from its out-of-fold files.

Gallery = ``oof_gallery.npz`` (the fold's training part), queries = ``oof_embeddings.npz`` (its
validation part), truth = ``oof_labels.csv`` (``new_individual`` for animals absent from the
training part, with their species), threshold = the best of ``threshold_grid``, exactly what the
fold's validation MAP@5 reports. Written to ``<fold>/report.html`` by
:func:`whalesub.report.build.write_report`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from whalesub.report.build import write_report

log = logging.getLogger("train")


def write_fold_report(cfg, fold_dir: Path) -> Path:
    """Write ``fold_dir/report.html`` from the fold's OOF files; returns its path."""
    out = fold_dir / "report.html"
    r = write_report(out, fold_dir / "oof_gallery.npz", fold_dir / "oof_embeddings.npz", cfg.train_csv,
                     truth=fold_dir / "oof_labels.csv", images_dir=cfg.image_dir, grid=cfg.threshold_grid,
                     k=cfg.knn_k, progress=False)
    log.info("report: %s (MAP@5 %.4f at threshold %.2f, %d worst queries shown)", out, r["scores"]["map5"],
             r["threshold"]["value"], r["shown"])
    return out
