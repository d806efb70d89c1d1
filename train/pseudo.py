"""Second training round: pseudo-labelled test images join the training part of every fold.

``whalesub pseudo-label`` writes ``image,species,individual_id,score,margin`` for confident test
predictions; ``--pseudo_csv`` (images under ``--pseudo_image_dir``, default ``test_image_dir``) adds
them here. The rules, each there so that CV keeps telling the truth:

- pseudo rows are never validation rows (they are added after the split, to the training part);
- within a fold, only rows whose individual is in that fold's own training part are added: a
  label naming an animal that only the validation part holds would turn that animal from "new"
  into "known" and leak the validation answer;
- the validation gallery and the test gallery stay the train.csv images (what a submission's
  gallery holds); pseudo images only feed the loss;
- ``pseudo.json`` in the fold folder records how many rows were added and dropped, and, with
  ``pseudo_truth_csv`` (synthetic data), the precision of the added labels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import read_train_csv, read_truth

from .dataset import check_images_exist

log = logging.getLogger("train")
PSEUDO = "pseudo"  # boolean column marking pseudo rows in a fold's training frame


def pseudo_dir(cfg) -> Path:
    folder = cfg.pseudo_image_dir or cfg.test_image_dir
    if not folder:
        raise ConfigError("pseudo_csv needs the folder of its images: set --pseudo_image_dir "
                          "(or test_image_dir)")
    return Path(folder)


def read_pseudo(cfg, train: pd.DataFrame) -> pd.DataFrame | None:
    """The checked pseudo-label table (``image`` = path under the pseudo folder), or None."""
    if not cfg.pseudo_csv:
        return None
    table = read_train_csv(cfg.pseudo_csv)
    folder = pseudo_dir(cfg)
    if cfg.check_images:
        check_images_exist(table["image"], folder, cfg.pseudo_csv)
    clash = sorted(set(table["image"]) & set(train["image"]))
    if clash:
        raise DataError(f"{len(clash)} images of pseudo_csv {cfg.pseudo_csv} are train images too "
                        f"({first_few(clash)}); pseudo-label test images only")
    table = table[["image", "species", "individual_id"]].copy()
    table["image"] = [str(folder / name) for name in table["image"]]
    return table


def add_pseudo_rows(train_part: pd.DataFrame, pseudo: pd.DataFrame | None, fold_dir: Path, cfg,
                    main: bool) -> pd.DataFrame:
    """``train_part`` plus the pseudo rows of individuals it holds, with a boolean ``pseudo`` column."""
    train_part = train_part.assign(**{PSEUDO: False})
    if pseudo is None:
        return train_part
    known = pseudo["individual_id"].isin(set(train_part["individual_id"]))
    added = pseudo[known].assign(**{PSEUDO: True})
    for col in train_part.columns:
        if col not in added.columns:
            added[col] = -1 if col == "fold" else ""
    record = {"pseudo_csv": str(cfg.pseudo_csv), "rows": int(len(pseudo)), "added": int(known.sum()),
              "dropped_unknown_individual": int((~known).sum())}
    if cfg.pseudo_truth_csv:
        truth = read_truth(cfg.pseudo_truth_csv)
        truth_of = dict(zip(truth["image"], truth["individual_id"], strict=True))
        names = [Path(p).name for p in added["image"]]
        if missing := [n for n in names if n not in truth_of]:
            raise DataError(f"pseudo_truth_csv {cfg.pseudo_truth_csv} has no row for {first_few(missing)}")
        right = sum(truth_of[n] == lab for n, lab in zip(names, added["individual_id"], strict=True))
        record.update(correct=int(right), precision=right / len(names) if names else None)
    if main:
        atomic_write_text(fold_dir / "pseudo.json", json.dumps(record, indent=2) + "\n")
    log.info("pseudo-labels: %d of %d rows added to this fold's training part (%d name individuals it "
             "does not hold)%s", record["added"], record["rows"], record["dropped_unknown_individual"],
             f"; precision {record['precision']:.3f}" if record.get("precision") is not None else "")
    return pd.concat([train_part, added[train_part.columns]], ignore_index=True)


def real_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The train.csv rows of a training frame (the gallery a submission has)."""
    if PSEUDO not in frame.columns:
        return frame
    return frame[~frame[PSEUDO].to_numpy(bool)].reset_index(drop=True)
