"""Second training round: pseudo-labelled test images join the training part of every fold.

``whalesub pseudo-label`` writes ``image,species,individual_id,score,margin`` for confident test
predictions; ``--pseudo_csv`` (images under ``--pseudo_image_dir``, default ``test_image_dir``) adds
them here. The rules, each there so that CV keeps telling the truth:

- pseudo rows are never validation rows (they are added after the split, to the training part);
- within a fold, only rows whose individual is in that fold's own training part are added: a
  label naming an animal that only the validation part holds would turn that animal from "new"
  into "known" and leak the validation answer;
- a per-fold table (``whalesub pseudo-label --folds runs/NAME/folds.csv``: a ``fold`` column) gives
  fold k only its rows with fold k, ranked against a gallery without fold k's validation images, and
  full-data training (fold -1) the rows with fold -1; a table without that column was ranked
  against every train image, so a test image that nearly duplicates one of fold k's validation
  images can carry that image's label into fold k's training: it still works, with a warning that
  fold k's metrics may be optimistic;
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
from whalesub.data.contract import (
    NEW_INDIVIDUAL,
    TRAIN_COLUMNS,
    describe_lines,
    find_duplicate_images,
    is_missing,
    read_table,
    read_train_csv,
    read_truth,
)

from .dataset import check_images_exist

log = logging.getLogger("train")
PSEUDO = "pseudo"  # boolean column marking pseudo rows in a fold's training frame
FOLD = "fold"  # the per-fold table's column: which fold's training part may use the row


def pseudo_dir(cfg) -> Path:
    folder = cfg.pseudo_image_dir or cfg.test_image_dir
    if not folder:
        raise ConfigError("pseudo_csv needs the folder of its images: set --pseudo_image_dir "
                          "(or test_image_dir)")
    return Path(folder)


def _read_per_fold(path, frame: pd.DataFrame, lines, n_folds: int) -> pd.DataFrame:
    """Check a pseudo table with a ``fold`` column (an image may appear once per fold)."""
    problems = []
    fold = pd.to_numeric(frame[FOLD], errors="coerce")
    bad = (fold.isna() | (fold != fold.round()) | ~fold.between(-1, n_folds - 1)).to_numpy()
    if bad.any():
        problems.append(f"column 'fold': {int(bad.sum())} value(s) outside -1..{n_folds - 1} (n_folds="
                        f"{n_folds}) on {describe_lines(lines[bad])}; make it with the run's own folds.csv")
    for col in ("image", "individual_id"):
        if (empty := is_missing(frame[col])).any():
            problems.append(f"column {col!r}: empty on {describe_lines(lines[empty])}")
    if (new := (frame["individual_id"] == NEW_INDIVIDUAL).to_numpy()).any():
        problems.append(f"{NEW_INDIVIDUAL!r} used as a label on {describe_lines(lines[new])}")
    problems += find_duplicate_images(frame["image"] + " in fold " + frame[FOLD], lines,
                                      column="image per fold")
    if problems:
        raise DataError(f"pseudo_csv {path} has {len(problems)} problem(s):", problems)
    return frame.assign(**{FOLD: fold.astype(int)})


def read_pseudo(cfg, train: pd.DataFrame, fold: int | None = None) -> pd.DataFrame | None:
    """The checked pseudo-label table (``image`` = path under the pseudo folder), or None.

    ``fold``: the fold being trained (-1 = full data); a per-fold table (``fold`` column) gives only
    its rows, in a column ``pseudo_fold``. None: every row (the up-front check)."""
    if not cfg.pseudo_csv:
        return None
    frame, lines = read_table(cfg.pseudo_csv, TRAIN_COLUMNS, "pseudo")
    per_fold = FOLD in frame.columns
    if per_fold:
        table = _read_per_fold(cfg.pseudo_csv, frame, lines, cfg.n_folds)
    else:
        table = read_train_csv(cfg.pseudo_csv)
        if fold is not None and fold >= 0:
            log.warning("pseudo_csv %s has no 'fold' column: its labels were ranked against every train "
                        "image, including fold %d's validation images, so fold %d's metrics may be "
                        "optimistic; make it per fold with `whalesub pseudo-label --folds %s/%s/folds.csv`",
                        cfg.pseudo_csv, fold, fold, cfg.out_dir, cfg.run_name)
    folder = pseudo_dir(cfg)
    if cfg.check_images:
        check_images_exist(table["image"].unique(), folder, cfg.pseudo_csv)
    clash = sorted(set(table["image"]) & set(train["image"]))
    if clash:
        raise DataError(f"{len(clash)} images of pseudo_csv {cfg.pseudo_csv} are train images too "
                        f"({first_few(clash)}); pseudo-label test images only")
    if per_fold and fold is not None:
        table = table[table[FOLD] == fold]
    columns = ["image", "species", "individual_id"] + ([FOLD] if per_fold else [])
    table = table[columns].rename(columns={FOLD: "pseudo_fold"}).reset_index(drop=True)
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
    record = {"pseudo_csv": str(cfg.pseudo_csv), "per_fold": "pseudo_fold" in pseudo.columns,
              "rows": int(len(pseudo)), "added": int(known.sum()),
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
