"""The competition data contract: ``train.csv``, test listings, box tables and truth files.

Every reader here checks its input and reports *all* problems at once in one
:class:`~whalesub.core.errors.DataError` (missing or misspelt columns with the closest expected
name, duplicate images, empty ids, files missing on disk...), naming the file and the CSV
line a person sees in an editor (the header is line 1, the first data row line 2).

Robustness a Kaggler expects: UTF-8 with or without a byte-order mark (UTF-16/32 with a mark and
other encodings are read with a warning, the latter as Latin-1), CRLF or LF line ends, surrounding
whitespace stripped from names and values, blank lines ignored, extra columns ignored, ids always
read as strings (``"007"`` stays ``"007"``), and the usual spellings of a missing value (``""``,
``NaN``, ``None``, ``NULL``...) treated as missing. A file separated by ``;``, tabs or ``|`` or a
binary file (a spreadsheet) is an error that says so; duplicate rows are errors, never dropped.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.errors import DataError, first_few

log = logging.getLogger(__name__)

NEW_INDIVIDUAL = "new_individual"
#: The four known typos in Happywhale's ``train.csv`` species column (30 raw strings -> 26 species).
SPECIES_FIXES: dict[str, str] = {
    "bottlenose_dolpin": "bottlenose_dolphin",
    "kiler_whale": "killer_whale",
    "globis": "short_finned_pilot_whale",
    "pilot_whale": "short_finned_pilot_whale",
}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
#: Spellings of a missing value (compared after stripping whitespace, case-insensitively).
MISSING_VALUES = frozenset({"", "nan", "-nan", "none", "null", "na", "n/a", "#n/a", "<na>"})
TRAIN_COLUMNS = ("image", "species", "individual_id")
TRUTH_COLUMNS = ("image", "individual_id")
BOX_COLUMNS = ("image", "x1", "y1", "x2", "y2")


def read_table(path: str | os.PathLike, required: Iterable[str],
               what: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a CSV as strings and check that the ``required`` columns exist.

    Returns ``(frame, lines)``: every column as stripped ``str`` (missing cells are ``""``),
    blank lines dropped, and ``lines[i]`` (int64) the file line of row ``i`` (header = line 1).
    Column names are stripped; a name that differs from a required one only in case is renamed.
    A missing required column raises :class:`DataError` listing every missing column with the
    closest existing name.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} file not found: {path}. Check the path.")
    if path.is_dir():
        raise DataError(f"{what} path {path} is a folder; expected a CSV file.")
    encoding = _sniff_encoding(path, what)
    try:
        frame = _read_csv_strings(path, encoding=encoding)
    except UnicodeDecodeError as exc:
        log.warning("%s is not valid UTF-8 (%s); reading it as Latin-1. Re-save it as UTF-8.", path, exc)
        encoding = "latin-1"
        frame = _read_csv_strings(path, encoding=encoding)
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} file {path} is empty; expected a header line with "
                        f"{', '.join(required)}.") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{what} file {path} is not a well-formed CSV: {str(exc).strip()} "
                        "(quote values that contain commas; the header counts as line 1)") from None

    frame.columns = [str(c).strip() for c in frame.columns]
    required = list(required)
    by_lower = {c.lower(): c for c in frame.columns}
    renames = {by_lower[r.lower()]: r for r in required if r not in frame.columns and r.lower() in by_lower}
    if renames:
        log.info("%s: renamed columns %s", path, renames)
        frame = frame.rename(columns=renames)
    missing = [c for c in required if c not in frame.columns]
    if missing and len(frame.columns) == 1:
        _check_delimiter(str(frame.columns[0]), path, what)
    if missing:
        problems = []
        for col in missing:
            others = [c for c in frame.columns if c not in required]
            close = difflib.get_close_matches(col, others, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}? Rename it to {col!r}" if close else ""
            problems.append(f"missing column {col!r}{hint}")
        raise DataError(
            f"{what} file {path} does not have the expected columns {', '.join(required)} "
            f"(found: {', '.join(map(repr, frame.columns)) or 'none'}).",
            problems,
        )

    lines = _record_lines(path, encoding, len(frame))
    frame = frame.fillna("")
    for col in frame.columns:
        frame[col] = frame[col].astype(str).str.strip()
    blank = (frame == "").all(axis=1).to_numpy()
    frame, lines = frame.loc[~blank].reset_index(drop=True), lines[~blank]
    return frame, lines


_DELIMITERS = {";": "semicolons (';')", "\t": "tabs", "|": "pipes ('|')"}


def _sniff_encoding(path: Path, what: str) -> str:
    """The encoding to read ``path`` with: UTF-16/32 when it starts with their byte-order mark (read
    with a warning), else UTF-8 (BOM optional). A file holding NUL bytes otherwise is binary: DataError."""
    with open(path, "rb") as fh:
        head = fh.read(65536)
    for bom, name in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                      (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if head.startswith(bom):
            log.warning("%s is %s text (byte-order mark); reading it as such. Re-save it as UTF-8.",
                        path, name.upper())
            return name
    if b"\x00" in head:
        raise DataError(f"{what} file {path} is not a text CSV file (it holds binary data: a spreadsheet, an "
                        "image or a compressed file?); export it as comma-separated UTF-8 text (.csv)")
    return "utf-8-sig"


def _check_delimiter(header: str, path: Path, what: str) -> None:
    """Raise DataError when a one-column header is really split by another delimiter."""
    for sep, name in _DELIMITERS.items():
        if sep in header:
            cols = [c.strip() for c in header.split(sep)]
            raise DataError(f"{what} file {path} is separated by {name}, not commas (its header reads as "
                            f"{len(cols)} columns {', '.join(map(repr, cols[:6]))}); save it as a "
                            "comma-separated CSV (e.g. pandas: df.to_csv(path, index=False))")


def _read_csv_strings(path: Path, encoding: str) -> pd.DataFrame:
    # skip_blank_lines=False keeps row i on file line i + 2, so messages can name real lines;
    # index_col=False stops pandas from turning the first column into the index when every data
    # row ends with a trailing comma (which would silently shift all columns by one).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False,
                            encoding=encoding, skipinitialspace=True, index_col=False)
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        log.warning("%s: some rows have more fields than the header (trailing commas?); extra fields ignored",
                    path)
    return frame


def _record_lines(path: Path, encoding: str, n: int) -> np.ndarray:
    """File line (header = 1) on which each of the ``n`` data records starts.

    Record i sits on line i + 2 unless a quoted cell spans several lines (numpy-printed boxes do);
    then the csv module's line count says where each record starts.
    """
    lines = np.arange(n, dtype=np.int64) + 2
    with open(path, "rb") as fh:
        if b'"' not in fh.read():
            return lines
    with open(path, newline="", encoding=encoding) as fh:
        reader, starts, previous = csv.reader(fh), [], 0
        for _ in reader:
            starts.append(previous + 1)
            previous = reader.line_num
    return np.asarray(starts[1:], dtype=np.int64) if len(starts) == n + 1 else lines


def is_missing(values: pd.Series) -> np.ndarray:
    """Boolean mask of cells that spell a missing value (``""``, ``NaN``, ``None``, ``NULL``...)."""
    return values.str.lower().isin(MISSING_VALUES).to_numpy()


def describe_lines(lines: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(str(int(x)) for x in lines[:n])
    more = len(lines) - n
    return f"line{'s' if len(lines) > 1 else ''} {shown}" + (f" and {more} more" if more > 0 else "")


def find_duplicate_images(images: pd.Series, lines: np.ndarray, column: str = "image",
                          unit: str = "lines") -> list[str]:
    """One problem line summarising repeated values of ``images`` with their file lines (or [])."""
    seen: dict[str, list[int]] = defaultdict(list)
    for name, line in zip(images.tolist(), lines.tolist(), strict=True):
        seen[name].append(line)
    dups = {k: v for k, v in seen.items() if len(v) > 1 and k != ""}
    if not dups:
        return []
    shown = "; ".join(f"{k!r} on {unit} {', '.join(map(str, v))}" for k, v in list(dups.items())[:5])
    more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
    return [f"{len(dups)} duplicate {column} value{'s' if len(dups) > 1 else ''} (each must appear once): "
            f"{shown}{more}"]


def find_missing_files(images: Iterable[str], image_dir: str | os.PathLike) -> list[str]:
    """Names in ``images`` with no file in ``image_dir`` (order kept). One directory scan, not N stats."""
    image_dir = Path(image_dir)
    with os.scandir(image_dir) as it:
        present = {e.name for e in it}
    return [n for n in images if n and (n not in present if "/" not in n else not (image_dir / n).is_file())]


def _check_image_dir(images: Iterable[str], image_dir, path: Path, what: str) -> list[str]:
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        return [f"image folder {image_dir} does not exist or is not a folder; pass the folder holding the "
                f"images that {path.name} lists"]
    missing = find_missing_files(images, image_dir)
    if not missing:
        return []
    return [f"{len(missing)} image{'s' if len(missing) > 1 else ''} listed in {what} not found in "
            f"{image_dir}: {first_few(missing)}"]


def _check_empty(frame: pd.DataFrame, lines: np.ndarray, column: str, fix: str) -> list[str]:
    mask = is_missing(frame[column])
    if not mask.any():
        return []
    return [f"{int(mask.sum())} empty or NaN {column} value{'s' if mask.sum() > 1 else ''} on "
            f"{describe_lines(lines[mask])}; {fix}"]


def read_train_csv(path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                   fix_species: bool = True) -> pd.DataFrame:
    """Read and check a Happywhale ``train.csv``.

    Returns a frame with columns ``image, species, individual_id`` (all ``str``; extra columns
    are kept after them). With ``fix_species`` the four known species typos are corrected and
    the fixes logged with counts. With ``image_dir`` every listed image must exist there.
    Raises :class:`DataError` listing every problem: missing/misspelt columns, duplicate
    images, empty or NaN ids or image names, ``new_individual`` used as a label, missing files.
    """
    path = Path(path)
    frame, lines = read_table(path, TRAIN_COLUMNS, "train")
    problems = []
    problems += _check_empty(frame, lines, "image", "every row needs an image file name")
    problems += find_duplicate_images(frame["image"], lines)
    problems += _check_empty(frame, lines, "individual_id", "label these images or drop their rows")
    is_new = (frame["individual_id"] == NEW_INDIVIDUAL).to_numpy()
    if is_new.any():
        problems.append(f"{int(is_new.sum())} row(s) use {NEW_INDIVIDUAL!r} as a train label on "
                        f"{describe_lines(lines[is_new])}; it is a prediction, not an animal: give "
                        "each animal its own id or drop these rows")
    if image_dir is not None:
        problems += _check_image_dir(frame["image"][~is_missing(frame["image"])], image_dir, path, "train")
    if len(frame) == 0:
        problems.append("no rows: the file has a header but lists no images")
    if problems:
        raise DataError(f"train file {path} has {len(problems)} problem(s):", problems)

    empty_species = is_missing(frame["species"])
    if empty_species.any():
        log.warning("%s: %d rows have no species (%s)", path, int(empty_species.sum()),
                    describe_lines(lines[empty_species]))
    if fix_species:
        counts = frame["species"].value_counts()
        for wrong, right in SPECIES_FIXES.items():
            if wrong in counts.index:
                log.info("%s: species %r -> %r in %d rows", path, wrong, right, int(counts[wrong]))
        frame["species"] = frame["species"].replace(SPECIES_FIXES)
    log.info("%s: %d images of %d individuals, %d species", path, len(frame),
             frame["individual_id"].nunique(), frame["species"].nunique())
    rest = [c for c in frame.columns if c not in TRAIN_COLUMNS]
    return frame[list(TRAIN_COLUMNS) + rest]


def individual_species(train: pd.DataFrame) -> pd.Series:
    """THE species of each individual, for everything that needs one (per-species thresholds, the
    report's species tables, pseudo-labels): its most frequent non-empty species in ``train``
    (a frame of :func:`read_train_csv`), ties broken alphabetically; ``""`` when every row of it has
    none. Returns a str Series indexed by ``individual_id`` (sorted).

    train.csv can give one animal several species (Happywhale has a few such ids); taking its last
    row or its first would make the answer depend on row order.
    """
    species = train["species"].astype(str)
    named = ~is_missing(species)
    frame = pd.DataFrame({"individual_id": train["individual_id"].astype(str),
                          "species": species.where(named, ""), "named": named})
    counts = frame.groupby(["individual_id", "species", "named"]).size().reset_index(name="n")
    counts = counts.sort_values(["individual_id", "named", "n", "species"],
                                ascending=[True, False, False, True])
    several = counts[counts["named"]]["individual_id"].duplicated()
    if several.any():
        log.warning("%d individuals carry several species in train.csv; each takes its most frequent one "
                    "(ties: alphabetical)", counts[counts["named"]].loc[several, "individual_id"].nunique())
    first = counts.drop_duplicates("individual_id").set_index("individual_id")["species"]
    return first.astype(str)


def read_test_listing(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[str]:
    """The test image names: a folder of images (sorted) or a CSV with an ``image`` column (file order).

    A folder lists files whose suffix is one of :data:`IMAGE_SUFFIXES` (any case), hidden files
    skipped. A CSV (for example ``sample_submission.csv``) must have unique, non-empty names;
    with ``image_dir`` each must exist there.
    """
    path = Path(path)
    if path.is_dir():
        names = list_image_folder(path)
        if not names:
            raise DataError(f"test folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "pass the folder of test images or a CSV with an 'image' column.")
        return names
    frame, lines = read_table(path, ("image",), "test listing")
    problems = _check_empty(frame, lines, "image", "every row needs an image file name")
    problems += find_duplicate_images(frame["image"], lines)
    if image_dir is not None:
        named = frame["image"][~is_missing(frame["image"])]
        problems += _check_image_dir(named, image_dir, path, "test listing")
    if len(frame) == 0:
        problems.append("no rows: the listing names no images")
    if problems:
        raise DataError(f"test listing {path} has {len(problems)} problem(s):", problems)
    return frame["image"].tolist()


def list_image_folder(folder: Path) -> list[str]:
    """Sorted names of the image files in ``folder`` (suffix in :data:`IMAGE_SUFFIXES`, any case).

    Hidden files (``.DS_Store``, macOS ``._x.jpg``) and sub-folders are skipped; other files with
    another suffix are skipped with a warning naming them, so nothing is dropped unseen.
    """
    names, hidden, other = [], [], []
    for p in folder.iterdir():
        if p.name.startswith("."):
            hidden.append(p.name)
        elif p.is_file():
            (names if p.suffix.lower() in IMAGE_SUFFIXES else other).append(p.name)
    if other:
        log.warning("%s: skipped %d file(s) that are not images (suffix not in %s): %s", folder, len(other),
                    " ".join(sorted(IMAGE_SUFFIXES)), first_few(sorted(other)))
    if hidden:
        log.info("%s: skipped %d hidden file(s): %s", folder, len(hidden), first_few(sorted(hidden)))
    return sorted(names)


def read_truth(path: str | os.PathLike) -> pd.DataFrame:
    """Read a truth file ``image,individual_id`` (extra columns dropped; ids as ``str``).

    New animals carry the label ``new_individual``. Raises :class:`DataError` listing missing
    columns, empty values and duplicate images.
    """
    path = Path(path)
    frame, lines = read_table(path, TRUTH_COLUMNS, "truth")
    problems = _check_empty(frame, lines, "image", "every row needs an image file name")
    problems += find_duplicate_images(frame["image"], lines)
    problems += _check_empty(frame, lines, "individual_id",
                             f"use {NEW_INDIVIDUAL!r} for animals absent from train")
    if len(frame) == 0:
        problems.append("no rows: nothing to score")
    if problems:
        raise DataError(f"truth file {path} has {len(problems)} problem(s):", problems)
    return frame[list(TRUTH_COLUMNS)].reset_index(drop=True)


def read_boxes(path: str | os.PathLike) -> pd.DataFrame:
    """Read a box table ``image,x1,y1,x2,y2[,conf][,box_type]`` (pixels of the upright,
    EXIF-corrected, full-resolution image, as ``cv2.imread`` sees it; x2/y2 exclusive).

    Coordinates become float64, ``conf`` float64 in [0, 1], ``box_type`` str (e.g. ``"body"``,
    ``"fin"``). Each (image, box_type) pair may appear once. Raises :class:`DataError` listing
    every non-numeric or non-finite value, box with ``x2 <= x1`` or ``y2 <= y1``, ``conf``
    outside [0, 1] and duplicate, each with its line.
    """
    path = Path(path)
    frame, lines = read_table(path, BOX_COLUMNS, "box")
    problems = _check_empty(frame, lines, "image", "every row needs an image file name")
    numeric = list(BOX_COLUMNS[1:]) + (["conf"] if "conf" in frame.columns else [])
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            examples = ", ".join(f"{frame[col].iloc[i]!r}" for i in np.flatnonzero(bad)[:3])
            problems.append(f"column {col!r}: {int(bad.sum())} value(s) not a finite number on "
                            f"{describe_lines(lines[bad])} (e.g. {examples})")
        frame[col] = values.astype(np.float64)
    with np.errstate(invalid="ignore"):
        for lo, hi in (("x1", "x2"), ("y1", "y2")):
            bad = (frame[hi] <= frame[lo]).to_numpy()
            if bad.any():
                problems.append(f"{int(bad.sum())} box(es) with {hi} <= {lo} (empty or flipped) on "
                                f"{describe_lines(lines[bad])}; corners are (x1, y1) top-left, "
                                "(x2, y2) bottom-right")
        if "conf" in frame.columns:
            conf = frame["conf"].to_numpy()
            bad = np.isfinite(conf) & ((conf < 0) | (conf > 1))  # non-finite ones are reported above
            if bad.any():
                problems.append(f"{int(bad.sum())} conf value(s) outside [0, 1] on "
                                f"{describe_lines(lines[bad])}")
    has_type = "box_type" in frame.columns
    key = frame["image"] + (" [" + frame["box_type"] + "]" if has_type else "")
    problems += find_duplicate_images(key, lines, column="image [box_type]" if has_type else "image")
    if problems:
        raise DataError(f"box file {path} has {len(problems)} problem(s):", problems)
    keep = list(BOX_COLUMNS) + [c for c in ("conf", "box_type") if c in frame.columns]
    return frame[keep].reset_index(drop=True)


def choose_box_type(kinds: Iterable[str], box_type: str | None, source,
                    option: str = "--box-type") -> str | None:
    """The one rule for which box crops an image (``whalesub embed`` and training's validation).

    ``kinds``: the box types of the box table (``read_boxes``' ``box_type`` values; a table without
    that column has one type). A named ``box_type`` must be one of them. Without a name, a table of
    one type uses it, and a table of several types is an error that lists them (the first box of
    whatever type comes first in the file would crop bodies for some images and fins for others).
    Returns the type to crop, or None when there are no boxes. ``source`` and ``option`` name the
    file and the setting in the message.
    """
    kinds = sorted({str(k) for k in kinds})
    if box_type is not None:
        if box_type not in kinds:
            raise DataError(f"{option} {box_type!r} not in box file {source} (it has {kinds})")
        return box_type
    if len(kinds) > 1:
        raise DataError(f"box file {source} has several box types {kinds}: choose one with {option}")
    return kinds[0] if kinds else None
