"""Layer 4, ``ranking``: from embeddings to five labels, as pure numpy functions with oracle tests.

- :mod:`~whalesub.ranking.vectors`: row normalisation, view averaging, class centres (float64 sums).
- :mod:`~whalesub.ranking.index`: FAISS exact inner product (GPU when present).
- :mod:`~whalesub.ranking.rank`: neighbours -> per-individual scores -> ``new_individual`` -> top 5.
- :mod:`~whalesub.ranking.centres`: class-centre cosines and their blend with kNN.
- :mod:`~whalesub.ranking.threshold`: thresholds: grid search, target new-share, per species.
- :mod:`~whalesub.ranking.metric`: MAP@5.
- :mod:`~whalesub.ranking.store`: embedding files (ids + vectors + fingerprint).
- :mod:`~whalesub.ranking.submission`: writing, validating and scoring submission CSVs.

These sit above ``data`` because they use its labels and species rules (``new_individual``, the
truth reader); the files live here because their rules are ranking rules (vectors unit length,
five distinct labels).

Imports: ``core``, ``data`` (and ``synth`` never).
"""
