"""Layer 7, ``workflows``: the file-level commands: load, check, run, write.

- :mod:`~whalesub.workflows.submit`: ``submit`` and ``tune`` on embedding files.
- :mod:`~whalesub.workflows.scorefiles`: the files around scoring (threshold tables, centres,
  candidate tables).
- :mod:`~whalesub.workflows.oof`: pooled out-of-fold tuning over a run's folds.
- :mod:`~whalesub.workflows.blend`: blends of candidate tables.
- :mod:`~whalesub.workflows.pseudo`: pseudo-labels from a submission's candidates.
- :mod:`~whalesub.workflows.predict`: runs -> exports -> embeddings -> threshold -> submission.

Imports: every package below (``core`` .. ``embedding``); never ``report``, ``kaggle`` or the CLI.
"""
