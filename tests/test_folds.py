"""Oracles for train/folds.py: brute-force relabelling, fold coverage, determinism, groups."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest

from train.folds import fold_summary, load_folds, make_folds, save_folds, split_fold
from whalesub.core.errors import ConfigError, DataError

NEW = "new_individual"


def _long_tailed(n_individuals: int = 400, seed: int = 0) -> pd.DataFrame:
    """Happywhale-like: ~59% of individuals have one photo, a few have dozens."""
    rng = np.random.default_rng(seed)
    counts = np.where(rng.random(n_individuals) < 0.59, 1, np.minimum(1 + rng.zipf(1.9, n_individuals), 50))
    ids = np.repeat([f"id{i:04d}" for i in range(n_individuals)], counts)
    images = [f"{h:012x}.jpg" for h in rng.choice(16**12, size=len(ids), replace=False)]
    species = rng.choice(["beluga", "humpback_whale", "blue_whale"], size=len(ids))
    df = pd.DataFrame({"image": images, "species": species, "individual_id": ids})
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)


@pytest.fixture(scope="module")
def tail() -> pd.DataFrame:
    return _long_tailed()


def _folds_quietly(df, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's "least populated class" warning must not fire
        return make_folds(df, **kw)


def test_every_image_in_exactly_one_fold_and_folds_level(tail):
    out = _folds_quietly(tail, n_folds=5, seed=42)
    assert out["image"].tolist() == tail["image"].tolist()  # same rows, same order
    assert out["fold"].dtype == np.int64 and set(out["fold"]) == {0, 1, 2, 3, 4}
    valid_images = [img for k in range(5) for img in split_fold(out, k)[1]["image"]]
    assert sorted(valid_images) == sorted(tail["image"])  # each image validated exactly once
    sizes = out["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 2


def test_deterministic_per_seed_and_independent_of_row_order(tail):
    a = _folds_quietly(tail, seed=7)
    b = _folds_quietly(tail, seed=7)
    assert a["fold"].tolist() == b["fold"].tolist()
    shuffled = _folds_quietly(tail.sample(frac=1.0, random_state=3), seed=7)
    assert shuffled.set_index("image")["fold"].sort_index().equals(a.set_index("image")["fold"].sort_index())
    other = _folds_quietly(tail, seed=8)
    assert (other["fold"] != a["fold"]).mean() > 0.3


def test_relabelling_is_exactly_absent_from_train_part_brute_force(tail):
    out = _folds_quietly(tail, n_folds=4, seed=1, holdout_individuals=0.2)
    for k in range(4):
        train, valid = split_fold(out, k)
        train_ids = {row.individual_id for row in out.itertuples() if row.fold != k}
        valid_rows = [row for row in out.itertuples() if row.fold == k]
        assert valid["image"].tolist() == [r.image for r in valid_rows]
        assert valid["true_individual_id"].tolist() == [r.individual_id for r in valid_rows]
        want = [r.individual_id if r.individual_id in train_ids else NEW for r in valid_rows]
        assert valid["individual_id"].tolist() == want
        assert (train["individual_id"] != NEW).all() and "true_individual_id" not in train


def test_new_in_validation_is_exactly_the_singletons_and_share_is_realistic(tail):
    out = _folds_quietly(tail, n_folds=5, seed=42)
    counts = tail["individual_id"].value_counts()
    singleton_images = set(tail["image"][tail["individual_id"].map(counts) == 1])
    new_images = set()
    for k in range(5):
        _, valid = split_fold(out, k)
        new_images |= set(valid["image"][valid["individual_id"] == NEW])
    assert new_images == singleton_images  # every singleton new; every other animal known
    summary = fold_summary(out)
    share = len(singleton_images) / len(tail)
    assert 0.12 < share < 0.3  # Happywhale: 18% of images are singletons
    assert summary["new_share"].between(share - 0.05, share + 0.05).all(), summary
    assert (
        summary["n_valid"].sum() == len(tail) and (summary["n_train"] + summary["n_valid"] == len(tail)).all()
    )


def test_small_classes_spread_and_holdout_individuals_kept_whole(tail):
    counts = tail["individual_id"].value_counts()
    out = _folds_quietly(tail, n_folds=5, seed=3)
    per_class = out.groupby("individual_id")["fold"].nunique()
    small = counts[(counts > 1) & (counts < 5)].index
    assert (per_class[small] == counts[small]).all()  # one image per fold: known in validation
    big = counts[counts >= 5].index
    assert (per_class[big] == 5).all()  # StratifiedKFold: every fold sees the class

    held = _folds_quietly(tail, n_folds=5, seed=3, holdout_individuals=0.25)
    per_class = held.groupby("individual_id")["fold"].nunique()
    whole = per_class[(per_class == 1) & (counts[per_class.index] > 1)].index
    n_multi = int((counts > 1).sum())
    assert abs(len(whole) - round(0.25 * n_multi)) <= 2  # ~25% of multi-photo animals held whole
    assert fold_summary(held)["new_share"].mean() > fold_summary(out)["new_share"].mean() + 0.05


def test_group_option_never_splits_a_group(tail):
    df = tail.copy()
    rng = np.random.default_rng(0)
    df["encounter"] = [f"{i}-{rng.integers(3)}" for i in df["individual_id"]]
    out = _folds_quietly(df, n_folds=5, seed=0, method="group", group_col="encounter")
    assert (out.groupby("encounter")["fold"].nunique() == 1).all()
    assert set(out["fold"]) == set(range(5))
    by_id = _folds_quietly(df, n_folds=3, method="group", group_col="individual_id")
    for k in range(3):  # grouping by animal: every validation animal is new
        assert (split_fold(by_id, k)[1]["individual_id"] == NEW).all()


def test_full_data_option(tail):
    out = make_folds(tail, method="full")
    assert (out["fold"] == -1).all()
    train, valid = split_fold(out, -1)
    assert len(train) == len(tail) and len(valid) == 0 and "true_individual_id" in valid
    assert fold_summary(out).empty
    mixed = _folds_quietly(tail, n_folds=5)
    mixed.loc[:9, "fold"] = -1  # rows pinned to training
    train, valid = split_fold(mixed, 0)
    assert set(mixed["image"][:10]) <= set(train["image"]) and not set(mixed["image"][:10]) & set(
        valid["image"]
    )


def test_logs_new_share_per_fold(tail, caplog):
    with caplog.at_level(logging.INFO, logger="train.folds"):
        _folds_quietly(tail, n_folds=3)
    lines = [r.getMessage() for r in caplog.records if "new in valid" in r.getMessage()]
    assert len(lines) == 3 and lines[0].startswith("fold 0:")


def test_bad_input_names_the_problem(tail):
    with pytest.raises(DataError, match="individual_id"):
        make_folds(tail.drop(columns="individual_id"))
    bad = tail.copy()
    bad.loc[3, "individual_id"] = None
    bad.loc[5, "image"] = bad.loc[6, "image"]
    with pytest.raises(DataError) as err:
        make_folds(bad)
    assert "index 3 (CSV line" in str(err.value) and "duplicate" in str(err.value)
    with pytest.raises(DataError, match="reserved label 'new_individual'"):
        make_folds(tail.assign(individual_id=tail["individual_id"].where(tail.index != 4, NEW)))
    with pytest.raises(ConfigError, match="stratified, group, full"):
        make_folds(tail, method="kfold")
    with pytest.raises(ConfigError, match=">= 2"):
        make_folds(tail, n_folds=1)
    with pytest.raises(ConfigError, match="stratified' only"):
        make_folds(tail, method="full", holdout_individuals=0.2)
    with pytest.raises(ConfigError, match="group_col"):
        make_folds(tail, method="group")
    with pytest.raises(DataError, match="'sighting'"):
        make_folds(tail, method="group", group_col="sighting")
    with pytest.raises(ConfigError, match=r"valid folds: \[0, 1, 2\]"):
        split_fold(_folds_quietly(tail, n_folds=3), 5)
    with pytest.raises(DataError, match="'fold'"):
        split_fold(tail, 0)
    with pytest.raises(DataError, match="true_individual_id"):
        split_fold(split_fold(_folds_quietly(tail, n_folds=3), 0)[1], 0)


def test_save_load_roundtrip_and_stale_file(tail, tmp_path):
    out = _folds_quietly(tail, n_folds=4, seed=2)
    path = tmp_path / "run" / "folds.csv"
    save_folds(out, path)
    assert [p.name for p in path.parent.iterdir()] == ["folds.csv"]  # no temp file left behind
    back = load_folds(path)
    pd.testing.assert_frame_equal(back, out)
    shuffled = tail.sample(frac=1.0, random_state=5).reset_index(drop=True)
    aligned = load_folds(path, shuffled)
    assert aligned["image"].tolist() == shuffled["image"].tolist()
    assert aligned.set_index("image")["fold"].sort_index().equals(out.set_index("image")["fold"].sort_index())
    changed = tail.copy()
    changed.loc[0, "individual_id"] = "someone_else"
    with pytest.raises(DataError, match="label"):
        load_folds(path, changed)
    with pytest.raises(DataError, match="not in it"):
        load_folds(path, pd.concat([tail, tail.head(1).assign(image="extra.jpg")], ignore_index=True))
    with pytest.raises(DataError, match="not found"):
        load_folds(tmp_path / "nope.csv")


def test_real_nyala_folds(nyala):
    df = pd.read_csv(nyala / "train.csv", dtype=str)
    plain = fold_summary(_folds_quietly(df, n_folds=5, seed=42))
    assert (plain["new_share"] == 0).all()  # nyala has no singletons: nothing new without holdout
    held = fold_summary(_folds_quietly(df, n_folds=5, seed=42, holdout_individuals=0.2))
    assert held["new_share"].between(0.05, 0.45).all(), held  # its test set is 19.9% new


# --- target_new_share: the OOF share of new animals as a setting ----------------------------------------


def _pooled_new_share_brute_force(out: pd.DataFrame) -> tuple[float, list[float]]:
    """Share of validation images whose animal is absent from that fold's training part, by plain Python
    (pooled over folds, and per fold), without split_fold."""
    n_new, n, per_fold = 0, 0, []
    for k in sorted(set(out["fold"])):
        train_ids = {r.individual_id for r in out.itertuples() if r.fold != k}
        valid = [r.individual_id for r in out.itertuples() if r.fold == k]
        new = sum(i not in train_ids for i in valid)
        n_new, n = n_new + new, n + len(valid)
        per_fold.append(new / len(valid))
    return n_new / n, per_fold


@pytest.mark.parametrize("n_folds", [2, 5])
def test_target_new_share_is_met_for_several_targets(n_folds):
    df = _long_tailed(n_individuals=1200, seed=4)
    counts = df["individual_id"].value_counts()
    floor = counts[counts == 1].sum() / len(df)  # singletons are new wherever they are validated
    for target in (0.25, 0.3, 0.4, 0.6):
        assert target > floor
        out = _folds_quietly(df, n_folds=n_folds, seed=11, target_new_share=target)
        pooled, per_fold = _pooled_new_share_brute_force(out)
        # tolerance: the greedy hold-out stops within a couple of images of target * N
        assert abs(pooled - target) <= 3 / len(df) + 1e-12, (target, pooled)
        assert all(abs(s - target) <= 0.03 for s in per_fold), (target, per_fold)
        # disjoint folds covering every image: each image validated exactly once
        valid_images = [img for k in range(n_folds) for img in split_fold(out, k)[1]["image"]]
        assert sorted(valid_images) == sorted(df["image"])
        sizes = out["fold"].value_counts()
        assert sizes.max() - sizes.min() <= max(3, int(0.02 * len(df)))
        # the held-out animals are whole: one fold each, and that fold's validation has them as new
        per_class = out.groupby("individual_id")["fold"].nunique()
        assert (per_class[counts[counts == 1].index] == 1).all()
        assert fold_summary(out)["n_valid_new"].sum() == round(pooled * len(df))


def test_target_new_share_is_seed_deterministic_and_row_order_free(tail):
    a = _folds_quietly(tail, n_folds=4, seed=5, target_new_share=0.35)
    b = _folds_quietly(tail.sample(frac=1.0, random_state=9), n_folds=4, seed=5, target_new_share=0.35)
    assert a.set_index("image")["fold"].sort_index().equals(b.set_index("image")["fold"].sort_index())
    c = _folds_quietly(tail, n_folds=4, seed=6, target_new_share=0.35)
    assert (c["fold"] != a["fold"]).mean() > 0.3
    assert abs(_pooled_new_share_brute_force(c)[0] - 0.35) <= 3 / len(tail)


def test_target_below_the_singleton_share_warns_and_gives_that_floor(tail, caplog):
    counts = tail["individual_id"].value_counts()
    floor = counts[counts == 1].sum() / len(tail)
    with caplog.at_level(logging.WARNING, logger="train.folds"):
        out = _folds_quietly(tail, n_folds=5, seed=2, target_new_share=floor / 2)
    assert "below the share of images whose animal has a single photo" in caplog.text
    assert _pooled_new_share_brute_force(out)[0] == pytest.approx(floor, abs=1e-12)
    plain = _folds_quietly(tail, n_folds=5, seed=2)
    assert _pooled_new_share_brute_force(plain)[0] == pytest.approx(floor, abs=1e-12)


def test_target_new_share_refuses_bad_values_and_holdout_together(tail):
    with pytest.raises(ConfigError, match="not both"):
        make_folds(tail, target_new_share=0.2, holdout_individuals=0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        make_folds(tail, target_new_share=1.0)
    with pytest.raises(ConfigError, match="stratified"):
        make_folds(tail.assign(g=tail["individual_id"]), method="group", group_col="g", target_new_share=0.2)
