"""Second round with pseudo-labels: rows join training only, never validation or the gallery."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from whalesub.core.errors import WhalesubError
from whalesub.ranking.store import load_embeddings


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from whalesub.synth import make_dataset

    out = tmp_path_factory.mktemp("pseudo_synth") / "data"
    make_dataset(out, seed=5, n_individuals=12, singleton_share=0.3, progress=False)
    return out


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    import torch

    level = logging.getLogger().level
    yield
    torch.use_deterministic_algorithms(False)
    logging.getLogger().setLevel(level)


def pseudo_table(synth, path, n_unknown_to_fold0: int = 0):
    """Test images of known animals labelled with their true id (precision 1), plus wrong ones."""
    truth = pd.read_csv(synth / "test_truth.csv", dtype=str)
    train = pd.read_csv(synth / "train.csv", dtype=str)
    species = train.groupby("individual_id")["species"].first()
    known = truth[truth["individual_id"] != "new_individual"].head(8).copy()
    new = truth[truth["individual_id"] == "new_individual"].head(2).copy()
    new["individual_id"] = known["individual_id"].iloc[0]  # two wrong labels: precision 8/10
    rows = pd.concat([known, new])
    rows["species"] = species.reindex(rows["individual_id"]).to_numpy()
    rows[["image", "species", "individual_id"]].to_csv(path, index=False)
    return rows


def args(synth, out, **extra):
    a = {"train_csv": synth / "train.csv", "image_dir": synth / "train_images",
         "backbone": "test_efficientnet", "image_size": 32, "embed_dim": 16, "batch_size": 8, "epochs": 1,
         "num_workers": 0, "device": "cpu",
         "n_folds": 3, "fold": 0, "out_dir": out, "run_name": "r", "val_batch_size": 16,
         "test_image_dir": synth / "test_images"}
    a.update(extra)
    return [f"--{k}={v}" for k, v in a.items()]


def test_pseudo_rows_train_but_never_validate(synth, tmp_path):
    from train.fit import main
    from train.folds import split_fold

    rows = pseudo_table(synth, tmp_path / "pseudo.csv")
    assert main(args(synth, tmp_path, pseudo_csv=tmp_path / "pseudo.csv",
                     pseudo_truth_csv=synth / "test_truth.csv")) == 0
    fold = tmp_path / "r" / "fold0"
    record = json.loads((fold / "pseudo.json").read_text())
    folds = pd.read_csv(tmp_path / "r" / "folds.csv", dtype=str)
    folds["fold"] = folds["fold"].astype(int)
    train_part, valid_part = split_fold(folds, 0)
    held = set(train_part["individual_id"])
    want_added = int(rows["individual_id"].isin(held).sum())
    assert record["added"] == want_added and record["dropped_unknown_individual"] == len(rows) - want_added
    truth = pd.read_csv(synth / "test_truth.csv", dtype=str).set_index("image")["individual_id"]
    added = rows[rows["individual_id"].isin(held)]
    right = int((truth.reindex(added["image"]).to_numpy() == added["individual_id"].to_numpy()).sum())
    assert record["correct"] == right and record["precision"] == pytest.approx(right / want_added)
    # validation queries and gallery are train.csv images only; folds.csv is untouched by pseudo rows.
    # Pseudo rows travel as paths under the pseudo folder (train/pseudo.py), train rows as bare names:
    # compare file names, so a leaked row is caught in either spelling
    test_images = set(rows["image"])
    assert test_images.isdisjoint(pd.read_csv(synth / "train.csv", dtype=str)["image"])  # names are unique
    oof_q = load_embeddings(fold / "oof_embeddings.npz")
    oof_g = load_embeddings(fold / "oof_gallery.npz")
    for where, ids in (("validation queries", oof_q.ids), ("validation gallery", oof_g.ids),
                       ("folds.csv", folds["image"])):
        leaked = sorted(test_images & {Path(i).name for i in ids})
        assert not leaked, f"pseudo-labelled test images in the {where}: {leaked}"
    assert sorted(set(oof_g.ids.tolist())) == sorted(train_part["image"])
    assert len(folds) == len(pd.read_csv(synth / "train.csv"))
    assert set(valid_part["image"]) == set(pd.read_csv(fold / "oof_labels.csv")["image"])


def test_the_training_part_grows_by_the_added_rows(synth, tmp_path):
    from train.config import TrainConfig
    from train.pseudo import add_pseudo_rows, read_pseudo

    rows = pseudo_table(synth, tmp_path / "pseudo.csv")
    cfg = TrainConfig(train_csv=str(synth / "train.csv"), image_dir=str(synth / "train_images"),
                      pseudo_csv=str(tmp_path / "pseudo.csv"), test_image_dir=str(synth / "test_images"))
    train = pd.read_csv(synth / "train.csv", dtype=str)
    part = train[train["individual_id"] != rows["individual_id"].iloc[0]].assign(fold=0)
    got = add_pseudo_rows(part, read_pseudo(cfg, train), tmp_path, cfg, main=True)
    keep = rows["individual_id"] != rows["individual_id"].iloc[0]
    assert len(got) == len(part) + int(keep.sum())
    extra = got[got["pseudo"]]
    assert all(p.startswith(str(synth / "test_images")) for p in extra["image"])
    assert (extra["fold"] == -1).all() and np.array_equal(extra["individual_id"], rows["individual_id"][keep])


def test_pseudo_table_problems_stop_training_up_front(synth, tmp_path):
    from train.fit import main

    train = pd.read_csv(synth / "train.csv", dtype=str)
    train.head(2).to_csv(tmp_path / "clash.csv", index=False)  # train images as pseudo rows
    from train.config import TrainConfig
    from train.pseudo import read_pseudo

    with pytest.raises(WhalesubError, match="train images too"):
        cfg = TrainConfig(pseudo_csv=str(tmp_path / "clash.csv"), test_image_dir=str(synth / "train_images"))
        read_pseudo(cfg, train)
    rc = main(args(synth, tmp_path, pseudo_csv=tmp_path / "clash.csv", test_image_dir=synth / "train_images"))
    assert rc == 2 and not (tmp_path / "r" / "fold0" / "last.pt").exists()


# --- per-fold pseudo tables (whalesub pseudo-label --folds) ---------------------------------------------
def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_per_fold_table_keeps_a_validation_duplicate_out_of_its_fold(synth, tmp_path, caplog):
    """A test image that nearly duplicates a fold-0 validation photo: the old table (ranked against every
    train image) gives fold 0 that photo's label; the per-fold table does not, while folds 1, 2 and
    full-data training (where the photo is a training image) still get it."""
    from train.config import TrainConfig
    from train.folds import make_folds, save_folds, split_fold
    from train.pseudo import add_pseudo_rows, read_pseudo
    from whalesub.ranking.store import save_embeddings
    from whalesub.workflows.pseudo import pseudo_label_files

    train = pd.read_csv(synth / "train.csv", dtype=str)
    folds = make_folds(train, n_folds=3, seed=1)
    save_folds(folds, tmp_path / "folds.csv")
    part0, valid0 = split_fold(folds, 0)
    photo = valid0[valid0["individual_id"] != "new_individual"].iloc[0]  # its animal is known in fold 0
    animal = photo["true_individual_id"]
    rng = np.random.default_rng(0)
    ids = sorted(train["individual_id"].unique())
    centre = dict(zip(ids, _unit(rng.standard_normal((len(ids), 64))), strict=True))
    vecs = np.stack([centre[i] + 0.1 * rng.standard_normal(64) / 8 for i in train["individual_id"]])
    odd = _unit(rng.standard_normal(64))
    vecs[train.index[train["image"] == photo["image"]][0]] = odd  # a photo unlike the animal's others
    dup = pd.read_csv(synth / "test_truth.csv", dtype=str)["image"].iloc[0]  # an existing test file
    save_embeddings(tmp_path / "g.npz", train["image"].tolist(), _unit(vecs), {"fingerprint": "m"})
    save_embeddings(tmp_path / "q.npz", [dup], _unit(odd + 0.01 * rng.standard_normal(64) / 8)[None],
                    {"fingerprint": "m"})
    inputs = (tmp_path / "g.npz", tmp_path / "q.npz", synth / "train.csv")
    pseudo_label_files(*inputs, tmp_path / "old.csv", min_score=0.8, min_margin=0.05)
    pseudo_label_files(*inputs, tmp_path / "new.csv", min_score=0.8, min_margin=0.05,
                       folds=tmp_path / "folds.csv")

    def leaked(csv, k, fold_dir):
        cfg = TrainConfig(train_csv=str(synth / "train.csv"), pseudo_csv=str(csv), n_folds=3,
                          test_image_dir=str(synth / "test_images"))
        part = split_fold(folds, k)[0] if k >= 0 else folds
        got = add_pseudo_rows(part, read_pseudo(cfg, train, k), fold_dir, cfg, main=True)
        rows = got[got["pseudo"]]
        return bool(((rows["image"].map(lambda p: p.rsplit("/", 1)[-1]) == dup)
                     & (rows["individual_id"] == animal)).any())

    with caplog.at_level(logging.WARNING, logger="train"):
        assert leaked(tmp_path / "old.csv", 0, tmp_path)  # the old table leaks into fold 0
    assert "no 'fold' column" in caplog.text and "fold 0's metrics may be optimistic" in caplog.text
    assert not json.loads((tmp_path / "pseudo.json").read_text())["per_fold"]
    assert not leaked(tmp_path / "new.csv", 0, tmp_path)
    assert json.loads((tmp_path / "pseudo.json").read_text())["per_fold"]
    for k in (1, 2, -1):  # where the photo is a training image the label is fair
        assert leaked(tmp_path / "new.csv", k, tmp_path), k


def test_per_fold_table_problems_are_named(synth, tmp_path):
    from train.config import TrainConfig
    from train.pseudo import read_pseudo

    train = pd.read_csv(synth / "train.csv", dtype=str)
    truth = pd.read_csv(synth / "test_truth.csv", dtype=str)
    known = truth[truth["individual_id"] != "new_individual"].head(2)
    rows = pd.DataFrame({"image": [known["image"].iloc[0]] * 3 + [known["image"].iloc[1]],
                         "species": "x", "individual_id": known["individual_id"].iloc[0],
                         "fold": [0, 1, -1, 0]})
    rows.to_csv(tmp_path / "ok.csv", index=False)
    images = str(synth / "test_images")
    cfg = TrainConfig(pseudo_csv=str(tmp_path / "ok.csv"), n_folds=3, test_image_dir=images)
    assert len(read_pseudo(cfg, train)) == 4  # one image, once per fold: fine
    assert read_pseudo(cfg, train, 0)["image"].map(lambda p: p.rsplit("/", 1)[-1]).tolist() == \
        [known["image"].iloc[0], known["image"].iloc[1]]
    assert len(read_pseudo(cfg, train, 2)) == 0
    rows.assign(fold=[0, 0, 7, 0]).to_csv(tmp_path / "bad.csv", index=False)
    cfg = TrainConfig(pseudo_csv=str(tmp_path / "bad.csv"), n_folds=3, test_image_dir=images)
    with pytest.raises(WhalesubError) as err:
        read_pseudo(cfg, train)
    assert "outside -1..2" in str(err.value) and "duplicate image per fold" in str(err.value)
