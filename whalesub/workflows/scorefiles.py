"""Files of the scoring step: per-species threshold files, class-centre files, candidate tables.

Threshold file (JSON, written by ``whalesub tune --per-species FILE``, read by ``submit --thresholds``)::

    {"format": "whalesub.thresholds", "format_version": 1, "global": 0.52, "k0": 20.0,
     "scoring": {"kind": "blend", "knn_ratio": 0.5, "centre_k": null, "k": 100, "centres_from": "gallery"},
     "species": {"beluga": {"threshold": 0.61, "raw_threshold": 0.64, "n": 310, ...}, ...}}

A hand-written file may give a species as a bare number (``"beluga": 0.61``); ``global`` is
required: it is used for species absent from the file and for rows without candidates.

Scoring stamp: a threshold only means something on the scores it was tuned on. ``tune`` records
:func:`scoring_stamp` (``kind`` "knn" at ``knn_ratio`` 1, else "blend"; ``centre_k`` and ``k``)
under ``"scoring"`` in tune.json and threshold files; a blend also records ``centres_from``
("gallery" or "head": where every individual's centre comes from, :mod:`whalesub.ranking.centres`).
:func:`check_scoring` refuses a file tuned on another scoring than the one requested. ``kind``,
``knn_ratio`` and, for a blend, ``centres_from`` must agree: both rankings are exact, so ``k`` and
``centre_k`` are recorded but do not change the scores. A file without a stamp (older files,
hand-written ones) counts as plain kNN; a blend stamp without ``centres_from`` (written before the
option existed, when blends used the heads' centres) counts as "head".

Candidate table (CSV, ``submit --candidates-out``): one row per (query image, candidate):
``image, rank (1 = best), individual_id, score`` (float32 score written so that it reads back
bit-exact), the best ``--candidates-n`` individuals of every query, ``new_individual`` excluded.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import describe_lines, read_table
from whalesub.ranking.centres import CENTRE_SOURCES, check_centre_source, gallery_centres, model_slices
from whalesub.ranking.rank import PAD
from whalesub.ranking.store import Embeddings, combined_fingerprint, load_embeddings, unit_float32

log = logging.getLogger(__name__)

THRESHOLDS_FORMAT = "whalesub.thresholds"
CANDIDATE_COLUMNS = ("image", "rank", "individual_id", "score")


RATIO_TOL = 1e-9  # knn_ratio values closer than this are the same scoring


def scoring_stamp(knn_ratio: float = 1.0, centre_k: int | None = None, k: int = 100,
                  centres_from: str = "gallery") -> dict:
    """The scoring a threshold was tuned on / is applied to: ``{"kind", "knn_ratio", "centre_k", "k"}``
    and, for a blend, ``"centres_from"``.

    ``kind`` is "knn" at ``knn_ratio`` 1 (``centre_k`` then None), else "blend" (``centre_k``
    defaults to ``k``, as in :func:`whalesub.ranking.centres.rank_with_centres`).
    """
    r = float(knn_ratio)
    blend = r < 1.0
    stamp = {"kind": "blend" if blend else "knn", "knn_ratio": r,
             "centre_k": (int(k if centre_k is None else centre_k)) if blend else None, "k": int(k)}
    if blend:
        stamp["centres_from"] = check_centre_source(centres_from)
    return stamp


def centres_from_of(stamp: dict) -> str | None:
    """A checked stamp's centre source: None for kNN, "head" for a blend stamp without the key."""
    return None if stamp["kind"] != "blend" else stamp.get("centres_from", "head")


def _check_stamp(stamp, source: str) -> dict:
    """A stamp read from ``source``; None (no stamp) is plain kNN; a malformed one is a DataError."""
    if stamp is None:
        return scoring_stamp(1.0)
    ratio = stamp.get("knn_ratio") if isinstance(stamp, dict) else None
    if (not isinstance(stamp, dict) or stamp.get("kind") not in ("knn", "blend") or isinstance(ratio, bool)
            or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0
            or (stamp["kind"] == "knn") != (ratio == 1.0)
            or stamp.get("centres_from", "head") not in CENTRE_SOURCES):
        raise DataError(f"{source}: 'scoring' must be {{\"kind\": \"knn\" | \"blend\", \"knn_ratio\": r in "
                        f"[0, 1] (1 exactly for knn), \"centres_from\": \"gallery\" | \"head\" (blend), "
                        f"...}}, got {stamp!r}; re-tune with `whalesub tune`")
    return stamp


def describe_scoring(stamp: dict) -> str:
    """``"kNN scores (knn_ratio 1)"`` / ``"blended scores (knn_ratio 0.5, centres from gallery)"``."""
    if stamp["kind"] == "knn":
        return f"kNN scores (knn_ratio {float(stamp['knn_ratio']):g})"
    return (f"blended scores (knn_ratio {float(stamp['knn_ratio']):g}, centres from "
            f"{stamp.get('centres_from', 'head')})")


def check_scoring(stamp: dict | None, wanted: dict, source) -> None:
    """ConfigError unless ``stamp`` (read from ``source``; None = plain kNN) is the scoring ``wanted``.

    Compares ``kind``, ``knn_ratio`` and a blend's ``centres_from`` (see the module docstring); one
    line naming the file and both.
    """
    have = _check_stamp(stamp, str(source))
    gap = abs(float(have["knn_ratio"]) - float(wanted["knn_ratio"]))
    same = have["kind"] == wanted["kind"] and gap <= RATIO_TOL
    if same and centres_from_of(have) != centres_from_of(wanted):
        raise ConfigError(f"{source} was tuned on {describe_scoring(have)} but {describe_scoring(wanted)} "
                          f"were requested: re-tune with `whalesub tune ... --centres-from "
                          f"{centres_from_of(wanted)}` or request --centres-from {centres_from_of(have)}")
    if have["kind"] != wanted["kind"] or gap > RATIO_TOL:
        raise ConfigError(f"{source} was tuned on {describe_scoring(have)} but "
                          f"{describe_scoring(wanted)} were requested: re-tune with `whalesub tune ... "
                          f"--knn-ratio {float(wanted['knn_ratio']):g}` or request --knn-ratio "
                          f"{float(have['knn_ratio']):g}")


def check_threshold_scoring(threshold_knn_ratio: float | None, wanted: dict) -> None:
    """A bare ``--threshold`` number carries no stamp: it counts as tuned on plain kNN unless the user
    states the ``--knn-ratio`` it was tuned at (``threshold_knn_ratio``); ConfigError unless that is
    the scoring ``wanted``. So ``--threshold`` with ``--knn-ratio`` < 1 needs
    ``--threshold-knn-ratio`` equal to it (the explicit acknowledgement)."""
    have = scoring_stamp(1.0 if threshold_knn_ratio is None else threshold_knn_ratio)
    if have["kind"] != wanted["kind"] or abs(have["knn_ratio"] - float(wanted["knn_ratio"])) > RATIO_TOL:
        said = "taken as tuned" if threshold_knn_ratio is None else "stated (--threshold-knn-ratio) as tuned"
        raise ConfigError(f"--threshold is {said} on {describe_scoring(have)} but {describe_scoring(wanted)} "
                          f"were requested: tune it with `whalesub tune ... --knn-ratio "
                          f"{float(wanted['knn_ratio']):g}` and pass --threshold-knn-ratio "
                          f"{float(wanted['knn_ratio']):g}, or use --new-share")


def json_ready(obj):
    """``obj`` with every NaN/inf float replaced by None (JSON null), so ``json.dumps`` writes valid JSON."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


def dumps_json(obj, **kwargs) -> str:
    """``json.dumps`` of :func:`json_ready` ``(obj)``, refusing NaN (never invalid JSON)."""
    return json.dumps(json_ready(obj), allow_nan=False, **kwargs)


def write_thresholds(path, per_species: dict, scoring: dict | None = None) -> Path:
    """Write :func:`whalesub.ranking.threshold.tune_per_species`'s result as a threshold file, atomically.

    ``scoring``: the :func:`scoring_stamp` the thresholds were tuned on (default: plain kNN).
    """
    doc = {"format": THRESHOLDS_FORMAT, "format_version": 1, **per_species,
           "scoring": scoring if scoring is not None else scoring_stamp(1.0)}
    atomic_write_text(path, dumps_json(doc, indent=2, sort_keys=True) + "\n")
    return Path(path)


def _threshold_value(value, key: str, path) -> float:
    if isinstance(value, dict):
        value = value.get("threshold")
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1.0 <= value <= 1.0:
        raise DataError(f"threshold file {str(path)!r}: {key} must be a number in [-1, 1] (or an object "
                        f"with one under 'threshold'), got {value!r}")
    return float(value)


def read_thresholds(path, scoring: dict | None = None) -> tuple[float, dict[str, float]]:
    """(global threshold, {species: threshold}) from a threshold file; DataError naming the key.

    ``scoring``: the :func:`scoring_stamp` requested; a file tuned on another is a ConfigError
    (:func:`check_scoring`; a file without a stamp counts as plain kNN).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"threshold file {str(path)!r} not found: write one with "
                        "`whalesub tune ... --per-species FILE`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise DataError(f"threshold file {str(path)!r} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or "global" not in doc:
        raise DataError(f"threshold file {str(path)!r} needs a 'global' threshold (used for species "
                        "not in the file), e.g. {\"global\": 0.5, \"species\": {\"beluga\": 0.6}}")
    species = doc.get("species", {})
    if not isinstance(species, dict):
        raise DataError(f"threshold file {str(path)!r}: 'species' must be an object species -> threshold")
    if scoring is not None:
        check_scoring(doc.get("scoring"), scoring, f"threshold file {str(path)!r}")
    return (_threshold_value(doc["global"], "'global'", path),
            {str(k): _threshold_value(v, f"species {k!r}", path) for k, v in species.items()})


def n_models_of(emb: Embeddings) -> int:
    """How many models' vectors an embedding file concatenates (``meta["models"]`` of embed; else 1)."""
    models = emb.meta.get("models")
    return len(models) if isinstance(models, list) and models else 1


def blend_centres(data: dict, centres_from: str, paths=None) -> np.ndarray:
    """The centre of every individual of :func:`whalesub.workflows.submit.load_ranking_inputs`'s
    ``data``, all from one source: [n_ind, D] f32.

    "gallery": :func:`whalesub.ranking.centres.gallery_centres` per model block of the queries'
    models (:func:`whalesub.ranking.centres.model_slices`); ``paths`` must then be empty. "head":
    :func:`load_centres` of ``paths`` (refused unless every individual has a centre in each file).
    """
    if check_centre_source(centres_from) == "gallery":
        if paths:
            raise ConfigError("--centres-from gallery builds every centre from the gallery: drop --centres, "
                              "or pass --centres-from head to use those class_centres.npz")
        dims = model_slices(data["gallery"], n_models_of(data["queries_file"]))
        log.info("class centres: the mean of each individual's gallery vectors (%d model block(s))",
                 len(dims))
        return gallery_centres(data["gallery"], data["gallery_labels"], data["classes"].size, dims)
    if not paths:
        raise ConfigError("--centres-from head needs the heads' class centres: pass --centres "
                          "class_centres.npz (one per model, from `whalesub export`), or use --centres-from "
                          "gallery")
    return load_centres(paths, data["classes"], data["queries_file"])


def load_centres(paths, classes: np.ndarray, queries: Embeddings) -> np.ndarray:
    """Class-centre files -> centres [n_ind, D] f32, rows = ``classes`` (``--centres-from head``).

    Several files (one per model, in the order of ``embed --model``) are concatenated and
    renormalised like the embeddings (each block unit, then / sqrt(files)). Every individual must
    have a centre in every file, else ConfigError counting those without and naming some (a
    per-individual substitute would put them on another scale: use ``--centres-from gallery``).
    The dimensions and the combined fingerprint must match the queries'.
    """
    files = [load_embeddings(p) for p in paths]
    where = ", ".join(repr(str(p)) for p in paths)
    dim = sum(f.dim for f in files)
    if dim != queries.dim:
        raise DataError(f"class centres {where} have D={dim} in all but the queries "
                        f"{str(queries.path)!r} have D={queries.dim}; give one centres file per --model "
                        "of embed, in the same order")
    if all(f.fingerprint is not None for f in files) and queries.fingerprint is not None:
        if (fp := combined_fingerprint(files)) != queries.fingerprint:
            raise DataError(f"class centres {where} (fingerprint {fp!r}) do not come from the models of the "
                            f"queries {str(queries.path)!r} ({queries.fingerprint!r}); pass the "
                            "class_centres.npz of each exported model, in the order of embed's --model")
    else:
        log.warning("no fingerprint on the centres or queries: cannot check that they share the models")
    blocks = []
    for f in files:
        if np.unique(f.ids).size != len(f):
            raise DataError(f"class centres {str(f.path)!r} repeat individual ids; one centre per individual")
        vec = unit_float32(f)
        pos = np.searchsorted(classes, f.ids).clip(0, classes.size - 1)
        known = classes[pos] == f.ids
        if (~known).any():
            log.info("%s: %d centres of individuals absent from the gallery are not used", f.path,
                     int((~known).sum()))
        present = np.zeros(classes.size, dtype=bool)
        present[pos[known]] = True
        if (~present).any():
            lacking = classes[~present].tolist()
            raise ConfigError(f"--centres-from head: {len(lacking)} of {classes.size} gallery individuals "
                              f"have no class centre in {str(f.path)!r} (e.g. {first_few(lacking)}), so the "
                              "blend would score them on another scale; use --centres-from gallery (every "
                              "centre from the gallery vectors) or a head trained on every individual")
        block = np.zeros((classes.size, f.dim), dtype=np.float32)
        block[pos[known]] = vec[known]
        blocks.append(block)
    return (np.concatenate(blocks, axis=1) / np.float32(np.sqrt(len(files)))).astype(np.float32)


def write_candidates(path, images, labels: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Path:
    """Write the tidy table ``image, rank, individual_id, score`` of [Q, m] candidates (PAD skipped)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CANDIDATE_COLUMNS)
    for image, lab, sc in zip(images, labels, scores, strict=True):
        keep = lab != PAD
        writer.writerows((image, r + 1, classes[c], str(s))
                         for r, (c, s) in enumerate(zip(lab[keep], sc[keep], strict=True)))
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def read_candidates(path) -> pd.DataFrame:
    """Read and check a candidate table: columns image, individual_id (str), score (float64)."""
    frame, lines = read_table(path, CANDIDATE_COLUMNS, "candidate table")
    problems = []
    score = pd.to_numeric(frame["score"], errors="coerce").to_numpy(np.float64)
    if (bad := ~np.isfinite(score)).any():
        problems.append(f"'score' is not a finite number on {describe_lines(lines[bad])}")
    empty = (frame["image"] == "") | (frame["individual_id"] == "")
    if empty.any():
        problems.append(f"empty image or individual_id on {describe_lines(lines[empty.to_numpy()])}")
    dup = frame.duplicated(["image", "individual_id"]).to_numpy()
    if dup.any():
        problems.append(f"an (image, individual_id) pair repeats on {describe_lines(lines[dup])}")
    if problems:
        raise DataError(f"candidate table {str(path)!r} is not a table of `submit --candidates-out`:",
                        problems)
    if frame.empty:
        raise DataError(f"candidate table {str(path)!r} has no rows")
    return pd.DataFrame({"image": frame["image"], "individual_id": frame["individual_id"], "score": score})


def check_output_path(path, option: str) -> None:
    """ConfigError when an output path is a folder (checked before the long work)."""
    if path is not None and Path(path).is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name such as {Path(path) / 'out.csv'}")
