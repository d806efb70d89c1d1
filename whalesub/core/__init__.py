"""Layer 1, ``core``: what every other package needs and nothing else.

- :mod:`~whalesub.core.errors`: the exception types whose message the CLI prints (exit 2, no traceback).
- :mod:`~whalesub.core.atomic`: atomic file writes (temporary file + rename, fsync), so a crash
  never leaves a half-written file that looks complete.
- :mod:`~whalesub.core.locks`: one writer per output (a lock file beside it naming its holder), so
  two commands on the same output never mix their files.

Imports: the standard library only (and ``whalesub`` itself for the version).
"""
