"""Layer 2, ``data``: the competition's files and images, read and checked once.

- :mod:`~whalesub.data.contract`: train.csv, test listings, truth files, sample submissions,
  species fixes, tables with clear errors naming file, row and column; the box rule.
- :mod:`~whalesub.data.image`: decoding (DCT-domain downscale, EXIF orientation, any mode to RGB),
  crops, resize, normalisation.
- :mod:`~whalesub.data.boxes`: box tables and public box files (``whalesub boxes convert``).

Imports: ``core``.
"""
