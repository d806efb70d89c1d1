"""`whalesub score` and `whalesub validate` through the real typer app."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.data.contract import NEW_INDIVIDUAL

NEW = NEW_INDIVIDUAL
runner = CliRunner()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    sub = write(tmp_path / "submission.csv", f"image,predictions\na.jpg,x {NEW}\nb.jpg,{NEW} y\n")
    truth = write(tmp_path / "truth.csv", f"image,individual_id\na.jpg,{NEW}\nb.jpg,y\n")
    sample = write(tmp_path / "sample.csv", f"image,predictions\na.jpg,{NEW}\nb.jpg,{NEW}\n")
    train = write(tmp_path / "train.csv", "image,species,individual_id\nt1.jpg,beluga,x\nt2.jpg,beluga,y\n")
    return sub, truth, sample, train


def test_score_json_is_one_object_with_the_documented_keys(files):
    sub, truth, _, _ = files
    result = runner.invoke(app, ["score", str(sub), "--truth", str(truth), "--json"])
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert obj["n"] == 2 and obj["n_new"] == 1 and obj["n_known"] == 1
    assert obj["map5"] == pytest.approx(0.5)  # both rows hit at rank 2
    assert obj["map5_known"] == pytest.approx(0.5) and obj["map5_new"] == pytest.approx(0.5)
    assert obj["new_precision_at1"] == 0.0 and obj["new_recall_at1"] == 0.0


def test_score_table_by_default(files):
    sub, truth, _, _ = files
    result = runner.invoke(app, ["score", str(sub), "--truth", str(truth)])
    assert result.exit_code == 0, result.output
    assert "MAP@5" in result.stdout and "0.5000" in result.stdout and "MAP@5 new" in result.stdout


def test_score_truth_with_unknown_images_exits_2_naming_them(files, tmp_path):
    sub, _, _, _ = files
    truth = write(tmp_path / "other_truth.csv", "image,individual_id\na.jpg,x\nzz.jpg,y\n")
    result = runner.invoke(app, ["score", str(sub), "--truth", str(truth)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot score")
    assert "'zz.jpg'" in result.stderr and "'b.jpg'" in result.stderr and str(truth) in result.stderr
    assert "Traceback" not in result.output


def test_score_truth_missing_column_exits_2(files, tmp_path):
    sub, _, _, _ = files
    truth = write(tmp_path / "t.csv", "image,individual\na.jpg,x\nb.jpg,y\n")
    result = runner.invoke(app, ["score", str(sub), "--truth", str(truth)])
    assert result.exit_code == 2
    assert "missing column 'individual_id'; did you mean 'individual'?" in result.stderr


def test_validate_ok_prints_counts(files):
    sub, _, sample, train = files
    result = runner.invoke(app, ["validate", str(sub), "--sample", str(sample), "--train-csv", str(train)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK:") and "2 rows" in result.stdout and "(50.0%)" in result.stdout


def test_validate_lists_every_problem_and_exits_2(files, tmp_path):
    _, _, sample, train = files
    sub = write(tmp_path / "bad.csv", "image,predictions\na.jpg,x x\na.jpg,ghost\n")
    result = runner.invoke(app, ["validate", str(sub), "--sample", str(sample), "--train-csv", str(train)])
    assert result.exit_code == 2
    err = result.stderr
    assert "'a.jpg' on lines 2, 3" in err          # duplicate image
    assert "have no row: 'b.jpg'" in err           # missing test image
    assert "repeat a label on line 2 (x)" in err   # repeated label
    assert "line 3 (ghost)" in err                 # unknown label
    assert result.stdout == ""


def test_validate_train_csv_problems_are_reported(files, tmp_path):
    sub, _, sample, _ = files
    train = write(tmp_path / "train.csv", "image,species,individual_id\nt1.jpg,beluga,x\nt1.jpg,beluga,y\n")
    result = runner.invoke(app, ["validate", str(sub), "--sample", str(sample), "--train-csv", str(train)])
    assert result.exit_code == 2 and "'t1.jpg' on lines 2, 3" in result.stderr


def test_help_documents_both_commands():
    for cmd, option in (("score", "--truth"), ("validate", "--sample")):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and option in result.output


def test_sample_submission_through_the_cli(photo_set):
    sample = photo_set / "sample_submission.csv"
    ok = runner.invoke(app, ["validate", str(sample), "--sample", str(sample),
                             "--train-csv", str(photo_set / "train.csv")])
    assert ok.exit_code == 0, ok.output
    truth = photo_set / "test_truth.csv"
    result = runner.invoke(app, ["score", str(sample), "--truth", str(truth), "--json"])
    assert result.exit_code == 0, result.output
    with open(photo_set / "test_truth.csv", newline="") as fh:
        labels = [r["individual_id"] for r in csv.DictReader(fh)]
    share_new = sum(label == NEW for label in labels) / len(labels)
    obj = json.loads(result.stdout)
    assert obj["map5"] == pytest.approx(share_new) and obj["n"] == len(labels)
    assert obj["map5_new"] == 1.0 and obj["map5_known"] == 0.0


def test_validate_against_an_image_folder_names_rows_without_a_file(files, tmp_path):
    sub, _, _, _ = files
    folder = tmp_path / "test_images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "c.jpg").write_bytes(b"\xff\xd8\xff")
    result = runner.invoke(app, ["validate", str(sub), "--sample", str(folder)])
    assert result.exit_code == 2
    assert "have no row: 'c.jpg'" in result.stderr
    assert "not in the test listing, on line 3 (b.jpg)" in result.stderr
