"""Tests of the synthetic data generator (whalesub.synth) and the ``whalesub synth`` command."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from whalesub.core.errors import WhalesubError
from whalesub.synth import make_dataset, parse_image_size

LARGE = (3200, 2133)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    """A default-shaped set (small frames) with two large frames mixed in."""
    out = tmp_path_factory.mktemp("synth") / "set"
    stats = make_dataset(out, seed=3, n_individuals=60, n_large=2, progress=False)
    return out, stats


def _read(out: Path):
    train = pd.read_csv(out / "train.csv", dtype=str)
    full = pd.read_csv(out / "test_truth_full.csv", dtype={"image": str, "individual_id": str})
    boxes = pd.read_csv(out / "boxes.csv")
    return train, full, boxes


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(n_individuals=10, n_large=1, large_size=(640, 400), progress=False)
    make_dataset(tmp_path / "a", seed=7, **kw)
    make_dataset(tmp_path / "b", seed=7, **kw)
    make_dataset(tmp_path / "c", seed=8, **kw)
    a, b, c = (_digests(tmp_path / k) for k in "abc")
    assert len(a) > 30 and a == b
    images_a = {k: v for k, v in a.items() if k.endswith(".jpg")}
    images_c = {k: v for k, v in c.items() if k.endswith(".jpg")}
    assert not set(images_a.values()) & set(images_c.values())
    assert a["train.csv"] != c["train.csv"]


def test_parallel_workers_give_the_same_bytes(tmp_path):
    kw = dict(seed=1, n_individuals=6, progress=False)
    make_dataset(tmp_path / "one", workers=1, **kw)
    make_dataset(tmp_path / "two", workers=2, **kw)
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")


def test_counts_long_tail_and_new_share(synth):
    out, stats = synth
    train, full, _ = _read(out)
    per_ind = train["individual_id"].value_counts()
    # Requested: 60 animals, 55 % with one photo, the busiest with max_images=20, 20 % new in test.
    assert per_ind.size == 60 and stats["train_individuals"] == 60
    assert (per_ind == 1).sum() == round(0.55 * 60)
    assert per_ind.max() == 20
    assert len(train) == stats["train_images"] == per_ind.sum()
    n_test = len(full)
    assert n_test == round(0.35 * len(train)) == stats["test_images"]
    assert full["is_new"].sum() == round(0.2 * n_test)
    new = full["is_new"] == 1
    assert not set(full.loc[new, "true_individual_id"]) & set(train["individual_id"])
    assert set(full.loc[~new, "true_individual_id"]) <= set(train["individual_id"])
    assert (full.loc[new, "individual_id"] == "new_individual").all()
    assert (full.loc[~new, "individual_id"] == full.loc[~new, "true_individual_id"]).all()
    # Singletons come back in test too (the hard case of the real competition).
    singles = set(per_ind.index[per_ind == 1])
    assert full["true_individual_id"].isin(singles).any()


def test_files_and_tables_follow_the_contract(synth):
    from whalesub.data.contract import read_boxes, read_test_listing, read_train_csv, read_truth

    out, _ = synth
    train = read_train_csv(out / "train.csv", out / "train_images")
    truth = read_truth(out / "test_truth.csv")
    listing = read_test_listing(out / "sample_submission.csv", out / "test_images")
    boxes = read_boxes(out / "boxes.csv")
    assert sorted(listing) == sorted(truth["image"])
    assert set(pd.read_csv(out / "sample_submission.csv")["predictions"]) == {"new_individual"}
    assert sorted(p.name for p in (out / "train_images").iterdir()) == sorted(train["image"])
    assert sorted(p.name for p in (out / "test_images").iterdir()) == sorted(truth["image"])
    names = list(train["image"]) + list(truth["image"])
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[0-9a-f]{14}\.jpg", n) for n in names)  # anonymous: no label in the name
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in train["individual_id"])
    assert set(boxes["box_type"]) == {"body", "fin"}
    assert set(boxes.loc[boxes["box_type"] == "body", "image"]) == set(names)
    assert set(train["species"]) <= {"bottlenose_dolphin", "humpback_whale", "beluga", "killer_whale"}
    assert json.loads((out / "stats.json").read_text())["dataset"] == "whalesub-synth"


def test_boxes_lie_inside_frames_and_around_the_animal(synth):
    out, stats = synth
    train, full, boxes = _read(out)
    split = {**dict.fromkeys(train["image"], "train"), **dict.fromkeys(full["image"], "test")}
    body = boxes[boxes["box_type"] == "body"].set_index("image")
    fin = boxes[boxes["box_type"] == "fin"].set_index("image")
    inside, beside, large = [], [], 0
    for name, b in body.iterrows():
        img = np.asarray(Image.open(out / f"{split[name]}_images" / name).convert("RGB"), np.float32)
        h, w = img.shape[:2]
        x1, y1, x2, y2 = int(b.x1), int(b.y1), int(b.x2), int(b.y2)
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        if name in fin.index:  # the fin is part of the animal
            f = fin.loc[name]
            assert x1 <= f.x1 < f.x2 <= x2 and y1 <= f.y1 < f.y2 <= y2
        if (w, h) == LARGE:
            large += 1
            assert (x2 - x1) * (y2 - y1) < 0.1 * w * h  # a small animal in a big frame
        # Edge energy (|d/dx| + |d/dy| over RGB) inside the box against a box of the same size beside
        # the animal, not overlapping it, where one fits: the animal's outline and marks are sharp,
        # the sea is smooth apart from foam.
        grad = np.abs(np.diff(img, axis=1)).sum(-1)[:-1] + np.abs(np.diff(img, axis=0)).sum(-1)[:, :-1]
        bw, bh = x2 - x1, y2 - y1
        spots = [
            (x1, 0) if y1 >= bh else None,
            (x1, h - bh) if h - y2 >= bh else None,
            (0, y1) if x1 >= bw else None,
            (w - bw, y1) if w - x2 >= bw else None,
        ]
        spots = [sp for sp in spots if sp is not None]
        if spots:
            cx, cy = spots[0]
            inside.append(grad[y1 : y2 - 1, x1 : x2 - 1].mean())
            beside.append(grad[cy : cy + bh - 1, cx : cx + bw - 1].mean())
    assert large == stats["large_images"] == 2
    inside, beside = np.asarray(inside), np.asarray(beside)
    assert len(inside) > 0.5 * len(body)
    assert np.mean(inside > beside) > 0.95 and np.median(inside / beside) > 2.0


def test_large_frames_decode_at_requested_size(tmp_path):
    stats = make_dataset(
        tmp_path / "big",
        seed=2,
        n_individuals=2,
        n_test=1,
        new_share=0.0,
        large_size="2400,1600",
        n_large=2,
        progress=False,
    )
    sizes = [Image.open(p).size for p in sorted((tmp_path / "big").rglob("*.jpg"))]
    assert sizes.count((2400, 1600)) == 2 == stats["large_images"]
    assert sizes.count((256, 170)) == len(sizes) - 2


def _crop_pixels(out: Path, split: str, names, body: pd.DataFrame, size=(16, 8)) -> np.ndarray:
    rows = []
    for name in names:
        b = body.loc[name]
        img = Image.open(out / f"{split}_images" / name).convert("RGB").crop((b.x1, b.y1, b.x2, b.y2))
        v = np.asarray(img.resize(size, Image.BILINEAR), np.float32).ravel()
        v -= v.mean()
        rows.append(v / (np.linalg.norm(v) + 1e-6))
    return np.stack(rows)


def test_identity_is_recoverable_from_small_raw_pixels(synth):
    """Nearest neighbour on 16x8 raw pixels of the body crops identifies known animals far above chance,
    and a kNN with a `new_individual` threshold beats the all-new baseline clearly; yet two photos of
    one animal are not near-copies (the task is not trivial)."""
    from whalesub.ranking.metric import map_at_5

    out, _ = synth
    train, full, boxes = _read(out)
    body = boxes[boxes["box_type"] == "body"].set_index("image")
    gallery = _crop_pixels(out, "train", train["image"], body)
    queries = _crop_pixels(out, "test", full["image"], body)
    sims = queries @ gallery.T
    labels = train["individual_id"].to_numpy()
    known = (full["is_new"] == 0).to_numpy()
    top1 = labels[sims.argmax(axis=1)] == full["true_individual_id"].to_numpy()
    busiest = train["individual_id"].value_counts().index[0]
    chance = (full.loc[known, "true_individual_id"] == busiest).mean()  # always guess the busiest animal
    assert top1[known].mean() > max(0.35, 3 * chance)

    def predict(threshold: float) -> list[list[str]]:
        preds = []
        for row in sims:
            ranked: list[str] = []
            for j in np.argsort(-row, kind="stable"):
                if labels[j] not in ranked:
                    if row[j] < threshold and "new_individual" not in ranked:
                        ranked.append("new_individual")
                    ranked.append(labels[j])
                if len(ranked) >= 5:
                    break
            preds.append(ranked[:5])
        return preds

    truths = full["individual_id"].tolist()
    best = max(map_at_5(predict(t), truths) for t in np.linspace(0.0, 1.0, 21))
    all_new = map_at_5([["new_individual"]] * len(truths), truths)
    assert abs(all_new - full["is_new"].mean()) < 1e-9
    assert best > all_new + 0.25

    same = [
        gallery[i] @ gallery[j]
        for _, idx in train.groupby("individual_id").indices.items()
        for i, j in zip(idx[:-1], idx[1:], strict=True)
    ]
    assert np.median(same) < 0.97


def test_species_typos_on_request_are_fixed_by_the_reader(tmp_path):
    from whalesub.data.contract import read_train_csv

    make_dataset(tmp_path / "t", seed=0, n_individuals=30, n_species=8, typo_share=1.0, progress=False)
    raw = pd.read_csv(tmp_path / "t" / "train.csv")
    typos = {"bottlenose_dolpin", "kiler_whale", "globis", "pilot_whale"}
    assert set(raw["species"]) & typos
    assert not set(raw["species"]) & {"bottlenose_dolphin", "killer_whale", "short_finned_pilot_whale"}
    fixed = read_train_csv(tmp_path / "t" / "train.csv")
    assert not set(fixed["species"]) & typos


def test_interrupted_run_leaves_no_tables(tmp_path, monkeypatch):
    import whalesub.synth.dataset as ds

    out = tmp_path / "set"
    make_dataset(out, seed=0, n_individuals=5, progress=False)
    calls = {"n": 0}
    real = ds.render_sighting

    def crash_later(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ds, "render_sighting", crash_later)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(out, seed=1, n_individuals=5, overwrite=True, progress=False)
    left = {p.name for p in out.iterdir()}
    assert left == {
        "train_images",
        "test_images",
        ".whalesub-synth",
    }  # old tables gone, new ones never written
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temp files
    # The interrupted folder is still recognised as synth's own, so --overwrite can finish the job.
    monkeypatch.setattr(ds, "render_sighting", real)
    stats = make_dataset(out, seed=1, n_individuals=5, overwrite=True, progress=False)
    assert len(list((out / "train_images").iterdir())) == stats["train_images"]


def test_overwrite_refuses_a_folder_synth_did_not_write(tmp_path):
    real = tmp_path / "real"
    (real / "train_images").mkdir(parents=True)
    (real / "train_images" / "a.jpg").write_bytes(b"not ours")
    (real / "train.csv").write_text("image,species,individual_id\na.jpg,beluga,x\n")
    with pytest.raises(WhalesubError, match="not written by whalesub synth"):
        make_dataset(real, n_individuals=3, overwrite=True, progress=False)
    assert (real / "train_images" / "a.jpg").read_bytes() == b"not ours" and (real / "train.csv").exists()


def test_bad_settings_are_listed_together(tmp_path):
    with pytest.raises(WhalesubError) as err:
        make_dataset(tmp_path / "x", image_size=(16, 5000), new_share=1.5, n_species=0, marks="rainbow")
    text = str(err.value)
    assert "image_size 16x5000" in text and "new_share" in text and "n_species" in text and "marks" in text
    assert not (tmp_path / "x").exists()
    assert parse_image_size("640x480") == (640, 480) == parse_image_size(" 640,480")
    assert parse_image_size("large") == LARGE


def test_cli_refuses_non_empty_folder_and_bad_size(tmp_path):
    from whalesub.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["synth", "--out", str(out), "--individuals", "4"])
    assert res.exit_code == 2 and "not empty" in res.output and "--overwrite" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "n"), "--image-size", "big"])
    assert res.exit_code == 2 and "--image-size 'big'" in res.output
    assert not (tmp_path / "n").exists()
    res = runner.invoke(app, ["synth", "--out", str(out), "--individuals", "4", "--overwrite", "--seed", "5"])
    assert res.exit_code == 0, res.output
    assert (out / "keep.txt").read_text() == "mine"  # --overwrite replaces only what synth writes
    assert json.loads((out / "stats.json").read_text())["settings"]["seed"] == 5


def test_mirror_share_turns_the_animal_around(tmp_path):
    """Humpbacks carry their fin behind mid-body (at 64 % of the length from the head): unmirrored the
    head is on the left, so the fin sits in the right part of the body box; mirrored, in the left."""

    def fin_positions(mirror: float) -> np.ndarray:
        out = tmp_path / f"m{mirror}"
        make_dataset(
            out, seed=4, n_individuals=12, n_species=2, n_test=0, mirror_share=mirror, progress=False
        )
        train, _, boxes = _read(out)
        humpbacks = set(train.loc[train["species"] == "humpback_whale", "image"])
        b = boxes[boxes["image"].isin(humpbacks)].pivot(index="image", columns="box_type")
        return ((b["x1"]["fin"] + b["x2"]["fin"]) / 2 - b["x1"]["body"]) / (b["x2"]["body"] - b["x1"]["body"])

    plain, mirrored = fin_positions(0.0), fin_positions(1.0)
    assert len(plain) >= 5 and len(mirrored) >= 5
    assert (plain > 0.5).all() and (mirrored < 0.5).all()
