"""Rerunning a training run: it keeps its folds.csv (a changed train table is refused, nothing
written), it keeps its schedule (changed keys refused, runtime keys allowed, a finished fold asked
for more epochs says so), and ``val_every`` validates every N epochs plus the last."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from train.config import make_config
from train.folds import make_folds, save_folds
from whalesub.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("restore_torch_state")


def args(data: Path, out: Path, run: str = "r", **extra) -> list[str]:
    a = {"train_csv": data / "train.csv", "image_dir": data / "train_images", "backbone": "test_efficientnet",
         "image_size": 32, "embed_dim": 16, "batch_size": 8, "epochs": 1, "num_workers": 0, "device": "cpu",
         "n_folds": 3, "fold": 0, "out_dir": out, "run_name": run, "val_before_train": "false",
         "max_steps_per_epoch": 1, "val_batch_size": 32}
    a.update(extra)
    return [f"--{k}={v}" for k, v in a.items()]


def run_train(argv: list[str]) -> int:
    from train.fit import main

    return main(argv)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run folder except logs (a refused rerun appends its error to train.log)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "train.log" and "tb" not in p.parts}


def test_rerun_reuses_the_runs_own_folds_csv(synth, tmp_path):
    """A folds.csv already in the run folder decides the split, not a fresh make_folds."""
    df = pd.read_csv(synth / "train.csv", dtype=str)
    mine = make_folds(df, 3, seed=7)
    fresh = make_folds(df, 3, seed=42)
    assert set(mine["image"][mine["fold"] == 0]) != set(fresh["image"][fresh["fold"] == 0])
    (tmp_path / "r").mkdir()
    save_folds(mine, tmp_path / "r" / "folds.csv")
    assert run_train(args(synth, tmp_path)) == 0
    valid = pd.read_csv(tmp_path / "r" / "fold0" / "oof_labels.csv", dtype=str)["image"]
    assert set(valid) == set(mine["image"][mine["fold"] == 0])
    kept = pd.read_csv(tmp_path / "r" / "folds.csv", dtype={"image": str})
    assert kept["fold"].tolist() == mine["fold"].tolist()


def test_changed_train_table_is_refused_and_nothing_is_overwritten(synth, tmp_path, capsys):
    assert run_train(args(synth, tmp_path)) == 0
    before = snapshot(tmp_path / "r")
    df = pd.read_csv(synth / "train.csv", dtype=str)
    dropped = df["image"].iloc[3]
    df.drop(index=3).to_csv(tmp_path / "dropped.csv", index=False)
    assert run_train(args(synth, tmp_path, train_csv=tmp_path / "dropped.csv", epochs=2)) == 2
    err = capsys.readouterr().err
    assert dropped in err and "--run_name" in err and "1 image(s) not in the train table" in err
    assert snapshot(tmp_path / "r") == before

    added = tmp_path / "images"
    shutil.copytree(synth / "train_images", added)
    shutil.copy(added / df["image"][0], added / "zz_new.jpg")
    extra = pd.DataFrame({"image": ["zz_new.jpg"], "species": [df["species"][0]],
                          "individual_id": [df["individual_id"][0]]})
    pd.concat([df, extra]).to_csv(tmp_path / "added.csv", index=False)
    assert run_train(args(synth, tmp_path, train_csv=tmp_path / "added.csv", image_dir=added)) == 2
    err = capsys.readouterr().err
    assert "zz_new.jpg" in err and "1 train image(s) not in it" in err
    assert snapshot(tmp_path / "r") == before

    assert run_train(args(synth, tmp_path, n_folds=4)) == 2  # fold keys are fixed by folds.csv too
    assert "n_folds (3 -> 4)" in capsys.readouterr().err
    assert snapshot(tmp_path / "r") == before
    (tmp_path / "r" / "folds.csv").unlink()  # lost folds with trained folds present: refused too
    assert run_train(args(synth, tmp_path)) == 2
    assert "fold0" in capsys.readouterr().err and not (tmp_path / "r" / "folds.csv").exists()


def test_finished_fold_asked_for_more_epochs_or_another_schedule_is_refused(synth, tmp_path, capsys):
    assert run_train(args(synth, tmp_path)) == 0
    before = snapshot(tmp_path / "r")
    assert run_train(args(synth, tmp_path, epochs=3)) == 2
    err = capsys.readouterr().err
    assert "already finished after 1 epoch" in err and "epochs=3" in err and "--run_name" in err
    assert run_train(args(synth, tmp_path, lr=0.01, aug_hflip=0.5)) == 2
    err = capsys.readouterr().err
    assert "lr (0.001 -> 0.01)" in err and "aug_hflip (0.0 -> 0.5)" in err and "epochs" not in err
    assert snapshot(tmp_path / "r") == before
    # runtime keys may change: the fold is simply already done
    assert run_train(args(synth, tmp_path, num_workers=1, log_every_steps=3)) == 0
    assert snapshot(tmp_path / "r")["fold0/last.pt"] == before["fold0/last.pt"]


def test_unfinished_fold_with_changed_keys_names_each_key():
    from train.resume import check_resume

    old = make_config({"epochs": 10, "lr": 1e-3})
    state = {"finished": False, "epoch": 4, "config": {**vars(old)}}
    check_resume(state, make_config({"epochs": 10, "lr": 1e-3, "num_workers": 7, "device": "cpu"}),
                 Path("run/fold0/last.pt"))
    with pytest.raises(ConfigError) as err:
        check_resume(state, make_config({"epochs": 20, "lr": 1e-3, "warmup_epochs": 2.0}),
                     Path("run/fold0/last.pt"))
    msg = str(err.value)
    assert "epochs (10 -> 20)" in msg and "warmup_epochs (1.0 -> 2.0)" in msg and "lr (" not in msg
    assert "already finished" not in msg and "run/fold0/config.yaml" in msg
    # a key an older checkpoint did not know counts as its default
    del state["config"]["val_every"]
    check_resume(state, old, Path("run/fold0/last.pt"))
    with pytest.raises(ConfigError, match=r"val_every \(1 -> 2\)"):
        check_resume(state, make_config({"epochs": 10, "lr": 1e-3, "val_every": 2}), Path("x/last.pt"))


def test_val_every_validates_every_n_epochs_and_the_last(synth, tmp_path):
    assert run_train(args(synth, tmp_path, epochs=3, val_every=2)) == 0
    metrics = pd.read_csv(tmp_path / "r" / "fold0" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert metrics["val_map5"].notna().tolist() == [False, True, True]


def test_patience_counts_validations_not_epochs(synth, tmp_path, monkeypatch):
    import torch

    import train.session

    scores = iter([0.5, 0.4, 0.9])  # validations after epochs 3, 6, (7)

    def fake_score(*a, **kw):
        m = next(scores)
        return {"map5": m, "threshold": 0.5, "map5_known": m, "map5_new": m, "top1_known": m,
                "pred_new_share_at1": 0.0, "all_new_baseline": 0.1}

    monkeypatch.setattr(train.session, "score", fake_score)
    assert run_train(args(synth, tmp_path, epochs=7, val_every=3, patience=1)) == 0
    metrics = pd.read_csv(tmp_path / "r" / "fold0" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3, 4, 5, 6]  # epochs 4-5 without validation do not count
    assert metrics["val_map5"].notna().tolist() == [False, False, True, False, False, True]
    assert metrics["improved"].tolist() == [0, 0, 1, 0, 0, 0]
    last = torch.load(tmp_path / "r" / "fold0" / "last.pt", weights_only=True)
    assert last["finished"] and last["early_stopping"] == {"best": 0.5, "best_epoch": 3, "bad_epochs": 1}


def test_val_every_must_be_positive():
    with pytest.raises(ConfigError, match="val_every"):
        make_config({"val_every": 0})


def test_target_new_share_is_a_fold_key(tmp_path):
    """A rerun that changes target_new_share would re-split the run: refused like n_folds."""
    from train.config import config_to_yaml
    from train.resume import FOLD_KEYS, check_fold_keys

    assert "target_new_share" in FOLD_KEYS
    (tmp_path / "config.yaml").write_text(config_to_yaml(make_config({"target_new_share": 0.2})))
    check_fold_keys(make_config({"target_new_share": 0.2}), tmp_path)  # same split: fine
    with pytest.raises(ConfigError, match=r"target_new_share \(0.2 -> None\)"):
        check_fold_keys(make_config({}), tmp_path)
    with pytest.raises(ConfigError, match=r"target_new_share \(0.2 -> 0.3\)"):
        check_fold_keys(make_config({"target_new_share": 0.3}), tmp_path)
