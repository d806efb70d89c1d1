"""Training for whalesub: folds, heads and losses, data pipelines, the loop (``python -m train``).

Imports ``whalesub``; ``whalesub`` never imports ``train``.
"""
