"""Layer 6, ``embedding``: image folders -> embedding files.

- :mod:`~whalesub.embedding.loader`: listing and decoding images in worker processes.
- :mod:`~whalesub.embedding.embed`: ``whalesub embed``: batches through a backend, TTA, several
  models combined, chunked and resumable.
- :mod:`~whalesub.embedding.shards`: ``--shard i/n`` and merging shard files.
- :mod:`~whalesub.embedding.distributed`: ``--ray ADDRESS``: the chunks of one run as Ray tasks on a
  cluster (Ray imported inside functions; the ``cluster`` extra).

Imports: ``core``, ``data``, ``ranking``, ``models``.
"""
