"""Layer 9, ``catalogue``: a living catalogue of known animals that grows without re-embedding.

- :mod:`~whalesub.catalogue.store`: the folder (SQLite in WAL mode, the FAISS index file, photos, lock).
- :mod:`~whalesub.catalogue.index_file`: the IndexFlatIP file appended in place.
- :mod:`~whalesub.catalogue.add`: adding photos with known vectors (the one insert path).
- :mod:`~whalesub.catalogue.photos`: hashing, embedding with the pinned model, ``add``, ``rebuild``.
- :mod:`~whalesub.catalogue.decisions`: confirm, new, merge, split, undo, history, export, stats.
- :mod:`~whalesub.catalogue.calibrate`: isotonic calibration on out-of-fold pairs; reliability.
- :mod:`~whalesub.catalogue.identify` and :mod:`~whalesub.catalogue.review`: candidates, groups of new
  animals, the CSV and the HTML review page.
- :mod:`~whalesub.catalogue.commands`: the ``whalesub catalogue`` typer sub-app.

Imports: every package below (``core`` .. ``report``); never ``kaggle`` or the CLI.
"""
