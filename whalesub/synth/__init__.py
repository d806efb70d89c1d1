"""Synthetic Happywhale-format data: marked animals photographed under varying conditions.

``make_dataset(out_dir, seed=0, ...)`` writes train/test JPEGs, ``train.csv``, truth files, a
sample submission and a box table (see :func:`whalesub.synth.dataset.make_dataset`). The pieces:
``species`` (what animals look like), ``sprite`` (drawing one animal), ``scene`` (photographing
it), ``plan`` (who is photographed how often, the split), ``dataset`` (writing the files).

Layer 3: imports ``core`` and ``data`` only.
"""

from whalesub.synth.dataset import PRESETS, make_dataset, parse_image_size
from whalesub.synth.species import SPECIES

__all__ = ["PRESETS", "SPECIES", "make_dataset", "parse_image_size"]
