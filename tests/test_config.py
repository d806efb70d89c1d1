"""Training config: defaults < YAML < --key=value; unknown keys and wrong types are listed together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    make_config,
    parse_overrides,
    valid_keys,
)
from whalesub.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_yaml_then_command_line_override_in_that_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("lr: 1e-3\nepochs: 3\nbackbone: resnet34\nbox_mix: {body: 2, fin: 1}\n")
    argv = ["--config", str(path), "--epochs=7", "--batch-size", "16", "--tta_flip", "--fold", "all"]
    cfg = load_config(argv)
    assert cfg.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; the float field converts it
    assert cfg.epochs == 7 and cfg.batch_size == 16 and cfg.tta_flip is True and cfg.fold == "all"
    assert cfg.backbone == "resnet34" and cfg.box_mix == {"body": 2.0, "fin": 1.0}
    assert cfg.weight_decay == TrainConfig().weight_decay  # untouched default


def test_unknown_keys_and_wrong_types_are_all_listed_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        make_config({"lrr": 0.1, "epochs": "many", "amp": "fp8", "tta_flip": "maybe", "fold": 1})
    msg = str(err.value)
    assert "unknown key 'lrr'" in msg and "did you mean 'lr'" in msg
    assert "'epochs'" in msg and "expected an integer" in msg
    assert "'amp'" in msg and "'bf16'" in msg
    assert "'tta_flip'" in msg and "true or false" in msg
    assert len(err.value.problems) == 4
    for key in valid_keys():  # every valid key is listed
        assert key in msg


@pytest.mark.parametrize("values, needle", [
    ({"fold": 5, "n_folds": 5}, "outside -1..4"),
    ({"fold": "some"}, "'all'"),
    ({"stages": 3}, "1 or 2"),
    ({"batch_size": 0}, ">= 1"),
    ({"aug_rrc_scale": [0.5]}, "[low, high]"),
    ({"fold_method": "group"}, "group_column"),
    ({"lr": True}, "expected a number"),
    ({"epochs": 2.5}, "expected an integer"),
])
def test_bad_values(values, needle):
    with pytest.raises(ConfigError) as err:
        make_config(values)
    assert needle in str(err.value)


def test_plain_data_round_trip_through_yaml_and_weights_only_torch_load(tmp_path):
    import torch
    import yaml

    cfg = make_config({"fold": "all", "box_mix": {"body": 1.0}, "threshold": 0.5, "boxes_csv": None})
    data = config_to_dict(cfg)
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg
    torch.save({"config": data}, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert config_from_dict(back) == cfg


def test_parse_overrides_forms():
    path, over = parse_overrides(["--config=a.yaml", "--x=1", "--y", "[1, 2]", "--flag", "--s=abc"])
    assert path == "a.yaml" and over == {"x": 1, "y": [1, 2], "flag": True, "s": "abc"}
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["oops"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.yaml")])


def test_cli_unknown_key_and_wrong_type_exit_non_zero_listing_valid_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: two\n")
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(cfg), "--learning_rate=0.1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'learning_rate'" in proc.stderr and "'epochs'" in proc.stderr
    assert "Valid keys:" in proc.stderr and "head_lr_mult" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((REPO / "train" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.run_name
    assert cfg.pretrained is False or cfg.pretrained_file is not None  # never a download


def test_os_errors_in_a_run_are_one_message_and_exit_2(tmp_path, monkeypatch, capsys):
    import train.fit

    def boom(cfg, argv):
        raise NotADirectoryError(20, "Not a directory", str(tmp_path / "afile" / "debug"))

    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\n")
    monkeypatch.setattr(train.fit, "run", boom)
    assert train.fit.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Not a directory" in err and "afile" in err


def test_target_new_share_is_checked_and_excludes_holdout_individuals():
    assert load_config(["--target_new_share=0.165"]).target_new_share == pytest.approx(0.165)
    assert TrainConfig().target_new_share is None  # off by default: old recipes split as before
    with pytest.raises(ConfigError) as err:
        make_config({"target_new_share": 0.2, "holdout_individuals": 0.1})
    assert "not both" in str(err.value.problems)
    with pytest.raises(ConfigError) as err:
        make_config({"target_new_share": 1.5})
    assert "target_new_share" in str(err.value.problems) and "[0, 1)" in str(err.value.problems)
