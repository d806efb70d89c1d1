"""``decision.json``: one serialisable description of what a submission was made with.

``whalesub predict`` writes ``OUT/decision.json``; :func:`whalesub.workflows.predict.predict_from_decision`
applies one to a test folder (``predict``'s own last step, ``whalesub report --decision`` and the
offline Kaggle kernel all go through it), so a tuned decision cannot change on its way to Kaggle::

    {"format": "whalesub.decision", "version": 1,
     "models": [{"name": "run_fold0", "fingerprint": "...", "export": "models/run_fold0"}, ...],
     "fingerprint": "...",                    # the models' combined fingerprint (that of the embeddings)
     "embed": {"backend": "onnx", "fp16": false, "box_type": null, "box_conf": null, "boxes_sha256": null},
     "gallery": {"file": "embeddings/gallery.npz", "labels": "gallery_labels.csv", "tta": "none",
                 "flip_views": true, "images": "<sha256 of the sorted image names>", "n": 1234},
     "queries": {"tta": "flip", "flip_views": false},
     "k": 100,
     "scoring": {"kind": "knn"}
             or {"kind": "blend", "knn_ratio": 0.5, "centre_k": null, "centres_from": "gallery",
                 "centres": []}
             or {"kind": "blend", "knn_ratio": 0.5, "centre_k": null, "centres_from": "head",
                 "centres": ["models/run_fold0/class_centres.npz", ...]},
     "new_individual": {"rule": "cosine", "threshold": 0.41, "tuned_on": STAMP or null}
                    or {"rule": "share", "new_share": 0.17, "oof_share": {...} or null, "tuned_on": ...}
                    or {"rule": "per_species", "default": 0.5, "species": {"beluga": 0.6, ...},
                        "tuned_on": ...}}

Paths are relative to the folder of the decision file (``..`` allowed). ``tuned_on`` is the
scoring the threshold was tuned on, the stamp ``tune`` writes into tune.json and per-species
threshold files: ``{"kind": "knn" | "blend", "knn_ratio": r, "centre_k": c, "k": k, "centres_from": s}``;
a file without a stamp was tuned on plain kNN. ``null``: given by hand (``--threshold`` / ``--new-share``).

``centres_from`` (a blend's centre source, :mod:`whalesub.ranking.centres`): "gallery" (every
individual's centre is the mean of its gallery vectors; ``centres`` empty) or "head" (the
``centres`` files, one per model, holding every individual). A blend ``scoring`` or ``tuned_on``
without the key was written before it existed, when blends used the heads' centres: it reads as
"head" (and is refused when a head lacks an individual, as the per-individual fill is gone).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "whalesub.decision"
VERSION = 1
FILE = "decision.json"
RULES = ("cosine", "share", "per_species")
KINDS = ("knn", "blend")
SOURCES = ("gallery", "head")


def scoring_of(knn_ratio: float = 1.0, centre_k: int | None = None, centres: list[str] | None = None,
               centres_from: str = "gallery") -> dict:
    """The ``scoring`` entry: plain kNN at r = 1, else the blend with its centre source (and files)."""
    if float(knn_ratio) >= 1.0:
        return {"kind": "knn"}
    return {"kind": "blend", "knn_ratio": float(knn_ratio), "centre_k": centre_k,
            "centres_from": centres_from, "centres": list(centres or []) if centres_from == "head" else []}


def centres_from_of(scoring: dict) -> str | None:
    """A ``scoring`` entry's (or stamp's) centre source: None for kNN; a blend without the key: "head"."""
    return scoring.get("centres_from", "head") if scoring.get("kind") == "blend" else None


def stamp_of(scoring: dict, k: int | None) -> dict:
    """The stamp shape of ``tune`` (``{"kind", "knn_ratio", "centre_k", "k"}``) of a ``scoring`` entry."""
    blend = scoring.get("kind") == "blend"
    stamp = {"kind": "blend" if blend else "knn", "knn_ratio": float(scoring["knn_ratio"]) if blend else 1.0,
             "centre_k": scoring.get("centre_k") if blend else None, "k": None if k is None else int(k)}
    if blend:
        stamp["centres_from"] = centres_from_of(scoring)
    return stamp


def read_stamp(doc: dict | None) -> dict:
    """The scoring stamp of a tune.json / threshold file (``doc["scoring"]``); absent: plain kNN."""
    stamp = (doc or {}).get("scoring")
    if not isinstance(stamp, dict):
        return {"kind": "knn", "knn_ratio": 1.0, "centre_k": None, "k": None}
    kind = stamp.get("kind", "knn")
    ratio = stamp.get("knn_ratio")
    ratio = 1.0 if ratio is None else float(ratio)
    if kind == "knn" or ratio >= 1.0:
        return {"kind": "knn", "knn_ratio": 1.0, "centre_k": None, "k": stamp.get("k")}
    return {"kind": "blend", "knn_ratio": ratio, "centre_k": stamp.get("centre_k"), "k": stamp.get("k"),
            "centres_from": stamp.get("centres_from", "head")}


def same_scoring(stamp: dict | None, scoring: dict, k: int) -> bool:
    """Whether a threshold tuned on ``stamp`` was tuned on this scoring (``k`` compared when stamped)."""
    if stamp is None:
        return True
    want = stamp_of(scoring, k)
    return (stamp["kind"] == want["kind"] and math.isclose(stamp["knn_ratio"], want["knn_ratio"])
            and stamp.get("centre_k") == want["centre_k"] and stamp.get("k") in (None, want["k"])
            and centres_from_of(stamp) == centres_from_of(want))


def describe_scoring(scoring: dict) -> str:
    if scoring.get("kind") != "blend":
        return "kNN"
    ck = scoring.get("centre_k")
    return (f"blend (knn_ratio {scoring['knn_ratio']:g}, centres from {centres_from_of(scoring)}"
            + (f", centre_k {ck})" if ck is not None else ")"))


def write_decision(path, decision: dict) -> Path:
    """Check ``decision`` and write it atomically (sorted keys, one value a line)."""
    check_decision(decision, path)
    atomic_write_text(path, json.dumps(decision, indent=1, sort_keys=True) + "\n")
    return Path(path)


def read_decision(path) -> dict:
    """A checked decision file; DataError naming the file and the key when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"decision file {str(path)!r} not found: `whalesub predict --out DIR` writes "
                        f"DIR/{FILE}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"decision file {str(path)!r} cannot be read as JSON ({exc})") from None
    check_decision(doc, path)
    return doc


def _fail(path, key: str, what: str):
    raise DataError(f"decision file {str(path)!r}: {key} {what}; write it again with `whalesub predict`")


def _need(doc: dict, key: str, types, path, where: str = "", optional: bool = False):
    name = f"{where}.{key}" if where else key
    if not isinstance(doc, dict):
        _fail(path, where or "the file", "must be a JSON object")
    if key not in doc:
        if optional:
            return None
        _fail(path, f"'{name}'", "is missing")
    value = doc[key]
    if optional and value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        _fail(path, f"'{name}'", f"must be {getattr(types, '__name__', types)}, got {value!r}")
    if not isinstance(value, types):
        _fail(path, f"'{name}'", f"has the wrong type ({type(value).__name__}: {value!r})")
    return value


def _number(doc: dict, key: str, path, where: str, lo: float | None = None, hi: float | None = None) -> float:
    value = float(_need(doc, key, (int, float), path, where))
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(path, f"'{where}.{key}'", f"must be a finite number in [{lo}, {hi}], got {value!r}")
    return value


def _one_of(doc: dict, key: str, choices, path, where: str, default: str | None = None) -> str:
    """``doc[where][key]``: a str among ``choices`` (``default`` when absent, null or empty)."""
    value = _need(doc, key, str, path, where, optional=default is not None)
    if default is not None:
        value = value or default
    if value not in choices:
        _fail(path, f"'{where}.{key}'", f"must be one of {choices}, got {value!r}")
    return value


def check_decision(doc, path) -> None:
    """DataError naming ``path`` and the first bad key; nothing returned."""
    if not isinstance(doc, dict):
        _fail(path, "the file", "must hold a JSON object")
    if doc.get("format") != FORMAT:
        _fail(path, "'format'", f"must be {FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("version") != VERSION:
        _fail(path, "'version'", f"must be {VERSION} (this whalesub reads version {VERSION}), "
              f"got {doc.get('version')!r}")
    models = _need(doc, "models", list, path)
    if not models:
        _fail(path, "'models'", "is empty")
    for i, m in enumerate(models):
        for key in ("name", "fingerprint", "export"):
            _need(m, key, str, path, f"models[{i}]")
    _need(doc, "fingerprint", str, path)
    embed = _need(doc, "embed", dict, path)
    _need(embed, "fp16", bool, path, "embed")
    _need(embed, "backend", str, path, "embed")
    _need(embed, "box_type", str, path, "embed", optional=True)
    if _need(embed, "box_conf", (int, float), path, "embed", optional=True) is not None:
        _number(embed, "box_conf", path, "embed", 0.0, 1.0)
    _need(embed, "boxes_sha256", str, path, "embed", optional=True)
    if embed.get("box_type") and not embed.get("boxes_sha256"):
        _fail(path, "'embed.boxes_sha256'", "is needed with a box_type (the box file's digest)")
    gallery = _need(doc, "gallery", dict, path)
    for key in ("file", "labels", "images"):
        _need(gallery, key, str, path, "gallery")
    _need(gallery, "n", int, path, "gallery")
    for where in ("gallery", "queries"):
        part = _need(doc, where, dict, path)
        if _need(part, "tta", str, path, where) not in ("flip", "none"):
            _fail(path, f"'{where}.tta'", f"must be 'flip' or 'none', got {part['tta']!r}")
        _need(part, "flip_views", bool, path, where)
    if _need(doc, "k", int, path) < 1:
        _fail(path, "'k'", f"must be at least 1, got {doc['k']}")
    scoring = _need(doc, "scoring", dict, path)
    kind = _one_of(scoring, "kind", KINDS, path, "scoring")
    if kind == "blend":
        _number(scoring, "knn_ratio", path, "scoring", 0.0, 1.0)
        ck = _need(scoring, "centre_k", int, path, "scoring", optional=True)
        if ck is not None and ck < 1:
            _fail(path, "'scoring.centre_k'", f"must be at least 1, got {ck}")
        source = _one_of(scoring, "centres_from", SOURCES, path, "scoring", default="head")
        centres = _need(scoring, "centres", list, path, "scoring")
        if source == "gallery" and centres:
            _fail(path, "'scoring.centres'", "must be empty with centres_from 'gallery' (no head centres)")
        if source == "head" and (len(centres) != len(models) or not all(isinstance(c, str) for c in centres)):
            _fail(path, "'scoring.centres'", f"must name one class_centres.npz per model ({len(models)})")
    rule = _need(doc, "new_individual", dict, path)
    name = _one_of(rule, "rule", RULES, path, "new_individual")
    if name == "cosine":
        _number(rule, "threshold", path, "new_individual", -1.0, 1.0)
    elif name == "share":
        _number(rule, "new_share", path, "new_individual", 0.0, 1.0)
        _need(rule, "oof_share", dict, path, "new_individual", optional=True)
    else:
        _number(rule, "default", path, "new_individual", -1.0, 1.0)
        species = _need(rule, "species", dict, path, "new_individual")
        for s in species:
            _number(species, s, path, "new_individual.species", -1.0, 1.0)
    stamp = _need(rule, "tuned_on", dict, path, "new_individual", optional=True)
    if stamp is not None:
        _one_of(stamp, "kind", KINDS, path, "new_individual.tuned_on")
        _number(stamp, "knn_ratio", path, "new_individual.tuned_on", 0.0, 1.0)
        _one_of(stamp, "centres_from", SOURCES, path, "new_individual.tuned_on", default="head")


def resolve(decision_path, rel: str) -> Path:
    """A path of the decision, relative to the decision file's folder."""
    return (Path(decision_path).parent / rel).resolve()


def describe_rule(decision: dict) -> str:
    """One line: how new_individual is placed and on which scoring it was tuned."""
    rule = decision["new_individual"]
    if rule["rule"] == "cosine":
        text = f"cosine threshold {rule['threshold']:.4f}"
    elif rule["rule"] == "share":
        text = f"new_individual first in a share {rule['new_share']:.4f} of the test rows"
        if rule.get("oof_share"):
            text += " (pooled out-of-fold share)"
    else:
        text = f"per-species thresholds ({len(rule['species'])} species, default {rule['default']:.4f})"
    stamp = rule.get("tuned_on")
    if stamp is not None:
        text += f", tuned on {describe_scoring(stamp)}" + (f" k={stamp['k']}" if stamp.get("k") else "")
    return text + f"; ranking: {describe_scoring(decision['scoring'])}, k={decision['k']}"
