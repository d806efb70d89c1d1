"""Convert the public Happywhale box files into whalesub's ``boxes.csv``.

Readers for the box files top teams cropped with (see the README's "Public box files"):

- YOLOv5 detections (``fullbody_*.csv``, ``*_charm.csv``, ``*_backfin.csv``): ``bbox`` holds numpy
  text ``[[ 213  813 3054 1301]]`` (padded spaces, possibly several boxes), ``conf`` ``[0.839]``,
  ``width``/``height`` the image size;
- Detic crops (``train2.csv`` / ``test2.csv``): ``box`` holds ``329 874 2934 1271``, no conf (1.0);
- the YOLOv5 cropped set (``train_bbox.csv``): ``bbox`` is a Python literal list of
  ``[x1, y1, x2, y2]`` lists, ``conf`` a literal list, images named by ``image_path``.

Every cell is parsed the same way: numbers separated by whitespace, commas and brackets, exactly
four per box; anything else in the cell (a word, ``nan``, ``x1=10``) is an error naming its line.
Rows are joined on the image name, never on position; every row needs one. An empty cell (``""``,
``[]``, NaN) means "no box" and is reported; the image is then embedded whole. A box needs a conf
when the file has a conf column (an empty or NaN conf next to a box is an error); without a conf
column every box has conf 1.0. With several boxes the most confident one is kept (the first among
equals). Boxes are checked against the image size (the file's ``width``/``height`` columns, else
the upright size of the image files under ``images``): a box reaching past the frame is clipped and
reported. A degenerate box (one that :func:`whalesub.data.image.load_image` cannot crop: under
1 px on a side, as given or after clipping; the 1st-place team's ``backfin_test_charm.csv`` has one
with y1 = y2 among 27,454 good ones) is reported with its count and lines and left out, so that
image is embedded whole, like one without a box; with ``strict`` it is an error instead. A file in
which every box is degenerate (xywh boxes, normalised coordinates) or every box lies within [0, 1]
(normalised coordinates) is refused. A cell that does not hold a multiple of four numbers is always
an error naming its line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.atomic import atomic_path
from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import describe_lines, is_missing, read_boxes, read_table
from whalesub.data.image import croppable, upright_size

log = logging.getLogger(__name__)

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
SEPARATORS = re.compile(r"[\s\[\](),]+")  # numpy text, space-separated and Python literal lists
EMPTY_CELLS = {"", "[]", "[[]]", "nan", "none", "null", "[nan]"}
IMAGE_COLUMNS = ("image", "image_path", "image_id")
BOX_SOURCE_COLUMNS = ("bbox", "box", "boxes", "bboxes")
CONF_COLUMNS = ("conf", "confidence", "score", "scores")


def parse_numbers(cell: str) -> list[float]:
    """Every number in ``cell`` (numpy text, space-separated or Python literal), in order.

    Numbers are separated by whitespace, commas, brackets and parentheses. Raises ``ValueError``
    (its message the offending text) when anything else is in the cell (``nan``, ``x1=10``, ``1e999``).
    """
    numbers = []
    for token in SEPARATORS.split(cell):
        if not token:
            continue
        if not NUMBER.fullmatch(token) or not np.isfinite(value := float(token)):
            raise ValueError(token)
        numbers.append(value)
    return numbers


def is_empty(cell: str) -> bool:
    return cell.strip().lower().replace(" ", "") in EMPTY_CELLS


def pick_column(frame: pd.DataFrame, given: str | None, candidates, what: str, path: Path,
                required: bool = True) -> str | None:
    """The column named ``given``, else the first of ``candidates`` present (None if optional)."""
    if given is not None:
        if given not in frame.columns:
            raise ConfigError(f"{path}: no column {given!r} for the {what}; columns are "
                              f"{', '.join(frame.columns)}")
        return given
    for c in candidates:
        if c in frame.columns:
            return c
    if required:
        raise DataError(f"{path}: none of the columns {', '.join(candidates)} holds the {what}; columns are "
                        f"{', '.join(frame.columns)}. Name it with --{what.split()[0]}-col")
    return None


def image_names(frame: pd.DataFrame, column: str) -> pd.Series:
    """Image file names: the base name of a path column (``image_path``), else the cell as is."""
    names = frame[column].astype(str)
    return names.map(lambda s: s.replace("\\", "/").rsplit("/", 1)[-1]) if column == "image_path" else names


def image_sizes(frame: pd.DataFrame, names: pd.Series, images: Path | None, lines: np.ndarray,
                problems: list[str]) -> np.ndarray | None:
    """[N, 2] float64 (width, height) per row, NaN where unknown; None when no size source exists."""
    if {"width", "height"} <= set(frame.columns):
        wh = np.stack([pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64)
                       for c in ("width", "height")], axis=1)
        bad = ~(np.isfinite(wh).all(1) & (wh > 0).all(1))
        if bad.any():
            problems.append(f"{int(bad.sum())} row(s) with a missing or non-positive width/height on "
                            f"{describe_lines(lines[bad])}")
        return wh
    if images is None:
        log.warning("box coordinates are not checked against image sizes: the file has no width/height "
                    "columns; give --images DIR to check them")
        return None
    wh = np.full((len(names), 2), np.nan)
    missing = []
    for i, name in enumerate(names.tolist()):
        path = images / name
        if not path.is_file():
            missing.append(f"{name} (line {lines[i]})")
            continue
        wh[i] = upright_size(path)
    if missing:
        problems.append(f"{len(missing)} image(s) not found in {images}: {first_few(missing)}")
    return wh


def convert_boxes(src: str | os.PathLike, out: str | os.PathLike, box_type: str, *,
                  images: str | os.PathLike | None = None, image_col: str | None = None,
                  box_col: str | None = None, conf_col: str | None = None, inclusive: bool = False,
                  append: bool = False, strict: bool = False) -> dict:
    """Read the public box file ``src`` and write ``out`` (``image,x1,y1,x2,y2,conf,box_type``).

    ``inclusive``: the source's x2/y2 are the last pixel inside the box (some teams' convention);
    1 is added so that they become exclusive as whalesub expects. ``append``: add the rows to an
    existing ``out`` (which must not already hold ``box_type``). ``strict``: a degenerate box is an
    error instead of being left out (reported). Returns counts and the reported lines; raises
    :class:`DataError` listing every problem with its line, writing nothing.
    """
    src, out = Path(src), Path(out)
    if not box_type or not box_type.strip():
        raise ConfigError("--box-type must name the box kind, e.g. body or fin")
    box_type = box_type.strip()  # as written to (and compared in) the output
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out {out} is the input file; write the converted table to another file")
    frame, lines = read_table(src, [], "box source")
    if frame.empty:
        raise DataError(f"box source {src} has a header but no rows")
    icol = pick_column(frame, image_col, IMAGE_COLUMNS, "image name", src)
    names = image_names(frame, icol)
    bcol = pick_column(frame, box_col, BOX_SOURCE_COLUMNS, "box coordinates", src)
    ccol = pick_column(frame, conf_col, CONF_COLUMNS, "conf", src, required=False)
    problems: list[str] = []
    rows, empty, several = [], [], 0
    not_numbers, bad_counts, bad_conf_cells, no_conf = [], [], [], []
    for i, cell in enumerate(frame[bcol].tolist()):
        if is_empty(cell):
            empty.append(int(lines[i]))
            continue
        try:
            nums = parse_numbers(cell)
        except ValueError as exc:
            not_numbers.append(f"line {lines[i]}: {str(exc)[:20]!r} in {bcol} {cell.strip()[:40]!r}")
            continue
        if not nums or len(nums) % 4:
            bad_counts.append(f"line {lines[i]}: {cell.strip()[:40]!r}")
            continue
        boxes = np.asarray(nums).reshape(-1, 4)
        conf = np.ones(len(boxes))
        if ccol is not None:
            ccell = frame[ccol].iat[i]
            if is_empty(ccell):
                no_conf.append(f"line {lines[i]}: {ccell.strip()[:20]!r}")
                continue
            try:
                c = parse_numbers(ccell)
            except ValueError as exc:
                not_numbers.append(f"line {lines[i]}: {str(exc)[:20]!r} in {ccol} {ccell.strip()[:40]!r}")
                continue
            if len(c) != len(boxes):
                bad_conf_cells.append(f"line {lines[i]}: {len(boxes)} box(es) but {len(c)} conf value(s) "
                                      f"{ccell.strip()[:40]!r}")
                continue
            conf = np.asarray(c)
        several += len(boxes) > 1
        best = int(np.argmax(conf))  # first among equals
        rows.append((i, *boxes[best], float(conf[best])))
    if not_numbers:
        problems.append(f"{len(not_numbers)} cell(s) hold something other than numbers, brackets, commas and "
                        f"spaces: {first_few(not_numbers)}; write each box as four numbers x1 y1 x2 y2")
    if bad_counts:
        problems.append(f"{len(bad_counts)} {bcol} cell(s) do not hold 4 numbers per box (x1 y1 x2 y2): "
                        f"{first_few(bad_counts)}")
    if bad_conf_cells:
        problems.append(f"{len(bad_conf_cells)} {ccol} cell(s) do not match their box count (one conf value "
                        f"per box): {first_few(bad_conf_cells)}")
    if no_conf:
        problems.append(f"{len(no_conf)} box(es) without a conf value in column {ccol!r}: "
                        f"{first_few(no_conf)}; give every box its confidence, or leave the conf column out "
                        "of the file for conf 1.0")
    missing_name = is_missing(names)
    if missing_name.any():
        problems.append(f"{int(missing_name.sum())} row(s) with an empty image name (column {icol!r}) on "
                        f"{describe_lines(lines[missing_name])}; every row needs its image file name")
    dup = names[names.duplicated(keep=False) & ~missing_name]
    if len(dup):
        problems.append(f"{dup.nunique()} image(s) appear on several rows ({first_few(sorted(set(dup)))}); "
                        "keep one row per image (several boxes belong in one cell)")
    idx = np.array([r[0] for r in rows], dtype=np.int64)
    xyxy = np.array([r[1:5] for r in rows], dtype=np.float64).reshape(-1, 4)
    conf = np.array([r[5] for r in rows], dtype=np.float64)
    if inclusive:
        xyxy[:, 2:] += 1
    bad_conf = ~((conf >= 0) & (conf <= 1))
    if bad_conf.any():
        problems.append(f"{int(bad_conf.sum())} conf value(s) outside [0, 1] on "
                        f"{describe_lines(lines[idx[bad_conf]])}")
    normalised = len(idx) > 0 and bool(((xyxy >= 0) & (xyxy <= 1)).all())
    if normalised:
        problems.append(f"every box lies within [0, 1] (e.g. {tuple(xyxy[0].tolist())} on line "
                        f"{lines[idx[0]]}): the file looks like normalised (0-1) coordinates, but boxes must "
                        "be in pixels of the upright image; multiply x1 and x2 by the image width and y1 and "
                        "y2 by its height, then convert again")
    sizes = image_sizes(frame, names, Path(images) if images is not None else None, lines, problems)
    clipped = []
    wh = np.full((len(idx), 2), np.inf)  # unknown size: only the box itself is checked
    if sizes is not None and len(idx):
        known = np.isfinite(sizes[idx]).all(1)
        wh[known] = sizes[idx][known]
        lo, hi = np.zeros_like(xyxy), np.concatenate([wh, wh], axis=1)
        outside = known & ((xyxy < lo) | (xyxy > hi)).any(1)
        clipped = lines[idx[outside]].tolist()
        xyxy[known] = np.clip(xyxy[known], lo[known], hi[known])
    # degenerate: a box whalesub's cropper refuses (the very rule load_image applies to the written box)
    flat = ~croppable(xyxy, wh[:, 0], wh[:, 1])
    degenerate = lines[idx[flat]].tolist()
    if flat.any() and flat.all() and not normalised:
        problems.append(f"all {int(flat.sum())} box(es) are empty or under 1 px on a side (after clipping to "
                        f"the image) on {describe_lines(lines[idx[flat]])}, so none could crop its image; "
                        "the boxes are probably not x1 y1 x2 y2 pixels: convert x y width height boxes to "
                        "x1=x, y1=y, x2=x+width, y2=y+height, and normalised (0-1) ones to pixels")
    elif flat.any() and strict:
        problems.append(f"{int(flat.sum())} box(es) are empty or under 1 px on a side (after clipping to the "
                        f"image) on {describe_lines(lines[idx[flat]])}; without --strict they are left out "
                        "and those images embedded whole")
    if problems:
        raise DataError(f"cannot convert {src}: {len(problems)} problem(s); nothing was written:", problems)
    if flat.any():
        log.warning("%s: %d degenerate box(es) (empty or under 1 px on a side, after clipping to the image) "
                    "left out, those images are embedded whole: %s (--strict refuses the file instead)", src,
                    int(flat.sum()), describe_lines(lines[idx[flat]]))
        idx, xyxy, conf = idx[~flat], xyxy[~flat], conf[~flat]
    table = pd.DataFrame({"image": names.to_numpy()[idx], "x1": xyxy[:, 0], "y1": xyxy[:, 1],
                          "x2": xyxy[:, 2], "y2": xyxy[:, 3], "conf": conf, "box_type": box_type})
    if append and out.exists():
        old = read_boxes(out)
        if "box_type" not in old.columns:
            old["box_type"] = "default"
        if (old["box_type"] == box_type).any():
            raise DataError(f"{out} already has boxes of type {box_type!r}; choose another --box-type or "
                            "write to a new file")
        if "conf" not in old.columns:
            old["conf"] = 1.0
        table = pd.concat([old[list(table.columns)], table], ignore_index=True)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)  # shortest round-trip floats: the file holds exactly the checked boxes
        read_boxes(tmp)  # the written table obeys the contract, or nothing replaces ``out``
    summary = {"out": str(out), "rows": int(len(frame)), "boxes": int(len(idx)), "empty": len(empty),
               "empty_lines": empty[:20], "several": int(several), "clipped": len(clipped),
               "clipped_lines": [int(x) for x in clipped[:20]], "degenerate": len(degenerate),
               "degenerate_lines": [int(x) for x in degenerate[:20]], "box_type": box_type,
               "sizes_checked": sizes is not None}
    log.info("%s -> %s: %d boxes of type %r from %d rows; %d without a box and %d degenerate (embedded "
             "whole), %d with several boxes (most confident kept), %d clipped to the image", src, out,
             summary["boxes"], box_type, summary["rows"], summary["empty"], summary["degenerate"], several,
             summary["clipped"])
    return summary
