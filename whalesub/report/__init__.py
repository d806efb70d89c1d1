"""Layer 8, ``report``: the HTML error report of a submission.

- :mod:`~whalesub.report.build`: what the report analyses (MAP@5 by species, threshold curve,
  galleries of errors) and ``write_report``.
- :mod:`~whalesub.report.render`: the HTML itself: plots, thumbnails, tables.

Imports: every package below (``core`` .. ``workflows``).
"""
