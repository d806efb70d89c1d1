"""Submission writing, reading, validation and scoring."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from whalesub.core.errors import DataError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.submission import (
    read_submission,
    score_submission,
    validate_submission,
    write_submission,
)

NEW = NEW_INDIVIDUAL


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_write_then_read_round_trip_exact_bytes(tmp_path):
    out = tmp_path / "sub" / "submission.csv"
    write_submission(out, ["b.jpg", "a.jpg"], [["x", NEW, "y"], "z"])
    assert out.read_text() == f"image,predictions\nb.jpg,x {NEW} y\na.jpg,z\n"
    assert read_submission(out) == {"b.jpg": ["x", NEW, "y"], "a.jpg": ["z"]}
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]  # no temp files left


@pytest.mark.parametrize("images, predictions, expected", [
    (["a.jpg"], [["x", "y", "x"]], "repeat a label on row 1 (x)"),
    (["a.jpg"], [list("abcdef")], "more than 5 labels on row 1 (6 labels)"),
    (["a.jpg"], [[]], "empty predictions on row 1"),
    (["a.jpg"], [["x y"]], "empty or contain whitespace in row 1"),
    (["a.jpg", "a.jpg"], [["x"], ["y"]], "'a.jpg' on rows 1, 2"),
    (["a.jpg"], [["x"], ["y"]], "1 images but 2 prediction rows"),
])
def test_write_refuses_bad_rows_and_leaves_no_file(tmp_path, images, predictions, expected):
    out = tmp_path / "submission.csv"
    with pytest.raises(DataError, match="submission") as err:
        write_submission(out, images, predictions)
    assert expected in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_failure_keeps_the_previous_file(tmp_path):
    out = write(tmp_path / "submission.csv", "image,predictions\nold.jpg,x\n")
    with pytest.raises(DataError):
        write_submission(out, ["a.jpg"], [["x", "x"]])
    assert out.read_text() == "image,predictions\nold.jpg,x\n"


def test_write_checks_against_sample_and_train_ids(tmp_path):
    out = tmp_path / "submission.csv"
    with pytest.raises(DataError) as err:
        write_submission(out, ["a.jpg"], [["x", "ghost"]], sample_images=["a.jpg", "b.jpg"], train_ids={"x"})
    text = str(err.value)
    assert "1 test image(s) have no row: 'b.jpg'" in text
    assert "neither a train individual_id" in text and "row 1 (ghost)" in text
    assert not out.exists()
    write_submission(out, ["a.jpg", "b.jpg"], [["x", NEW], [NEW]], sample_images=["b.jpg", "a.jpg"],
                     train_ids={"x"})
    assert out.exists()


def test_validate_reports_every_problem_with_lines(tmp_path):
    sub = write(tmp_path / "s.csv",
                "image,predictions\n"          # line 1
                f"a.jpg,x {NEW}\n"             # line 2: fine
                "b.jpg,\n"                     # line 3: empty
                "c.jpg,x y x\n"                # line 4: repeat
                "c.jpg,x\n"                    # line 5: duplicate image
                "e.jpg,x ghost\n"              # line 6: not a test image; unknown label
                "f.jpg,x y z w v u\n")         # line 7: six labels
    sample = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "f.jpg"]
    with pytest.raises(DataError) as err:
        validate_submission(sub, sample, train_ids={"x", "y", "z", "w", "v", "u"})
    problems = err.value.problems
    text = "\n".join(problems)
    assert "'c.jpg' on lines 4, 5" in text
    assert "1 test image(s) have no row: 'd.jpg'" in text
    assert "1 row(s) name images not in the test listing, on line 6 (e.jpg)" in text
    assert "1 row(s) with empty predictions on line 3" in text
    assert "1 row(s) repeat a label on line 4 (x)" in text
    assert "more than 5 labels on line 7 (6 labels)" in text
    assert "line 6 (ghost)" in text
    assert len(problems) == 7
    assert str(sub) in str(err.value)


def test_validate_checks_the_header(tmp_path):
    sub = write(tmp_path / "s.csv", "Image,Predictions,score\na.jpg,x\n")
    with pytest.raises(DataError) as err:
        validate_submission(sub, ["a.jpg"])
    text = str(err.value)
    assert "header is 'Image,Predictions,score'" in text and "unexpected column(s) 'score'" in text
    missing = write(tmp_path / "m.csv", "image,prediction\na.jpg,x\n")
    with pytest.raises(DataError, match="did you mean 'prediction'"):
        validate_submission(missing, ["a.jpg"])


def test_validate_accepts_a_good_frame_and_summarises(tmp_path):
    frame = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "predictions": [f"{NEW} x y z w", "x"]})
    summary = validate_submission(frame, ["b.jpg", "a.jpg"], train_ids=["x", "y", "z", "w"])
    assert summary == {"n_rows": 2, "n_labels": 5, "n_full": 1, "n_new_at1": 1, "new_share_at1": 0.5}


def test_read_refuses_duplicate_images(tmp_path):
    sub = write(tmp_path / "s.csv", "image,predictions\na.jpg,x\na.jpg,y\n")
    with pytest.raises(DataError, match="'a.jpg' on lines 2, 3"):
        read_submission(sub)


def test_score_hand_worked_file(tmp_path):
    sub = write(tmp_path / "s.csv", f"image,predictions\na.jpg,x {NEW}\nb.jpg,{NEW} y\nc.jpg,q r s t y\n")
    truth = write(tmp_path / "t.csv", f"image,individual_id\nc.jpg,y\nb.jpg,y\na.jpg,{NEW}\n")
    result = score_submission(sub, truth)
    assert result["map5"] == pytest.approx((0.2 + 0.5 + 0.5) / 3)
    assert result["map5_new"] == pytest.approx(0.5) and result["map5_known"] == pytest.approx(0.35)


def test_score_truth_with_unknown_images_names_them(tmp_path):
    sub = write(tmp_path / "s.csv", "image,predictions\na.jpg,x\nb.jpg,x\n")
    truth = write(tmp_path / "t.csv", "image,individual_id\na.jpg,x\nzz.jpg,x\n")
    with pytest.raises(DataError) as err:
        score_submission(sub, truth)
    text = str(err.value)
    assert f"1 image(s) of truth file {truth} are not in the submission: 'zz.jpg'" in text
    assert f"1 image(s) of the submission are not in truth file {truth}: 'b.jpg'" in text


def test_sample_submission_scores_the_share_of_new_animals(photo_set):
    with open(photo_set / "test_truth.csv", newline="") as fh:
        labels = [r["individual_id"] for r in csv.DictReader(fh)]
    expected = sum(label == NEW for label in labels) / len(labels)  # all-new baseline: 1 per new row
    result = score_submission(photo_set / "sample_submission.csv", photo_set / "test_truth.csv")
    assert result["map5"] == pytest.approx(expected)
    stats = json.loads((photo_set / "stats.json").read_text())
    assert round(result["map5"], 3) == round(stats["test_new_frac"], 3)  # the figure the set reports
    assert result["n"] == len(labels)
    summary = validate_submission(photo_set / "sample_submission.csv",
                                  list(pd.read_csv(photo_set / "sample_submission.csv")["image"]))
    assert summary["n_new_at1"] == summary["n_rows"] == len(labels)


def test_validate_flags_tabs_and_double_spaces_between_labels(tmp_path):
    sub = write(tmp_path / "s.csv", 'image,predictions\na.jpg,"x\ty"\nb.jpg,x  y\nc.jpg,x y\n')
    with pytest.raises(DataError) as err:
        validate_submission(sub, ["a.jpg", "b.jpg", "c.jpg"])
    (problem,) = err.value.problems
    assert problem.startswith("2 row(s) separate labels by something other than single spaces, on line 2, 3")
