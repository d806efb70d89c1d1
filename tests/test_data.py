"""The data contract: train.csv, test listings, truth files and box tables."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest

from whalesub.core.errors import DataError
from whalesub.data.contract import (
    NEW_INDIVIDUAL,
    SPECIES_FIXES,
    read_boxes,
    read_test_listing,
    read_train_csv,
    read_truth,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def touch_images(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"\xff\xd8\xff")
    return folder


# --- train.csv ---------------------------------------------------------------------------------


def test_train_reads_ids_as_strings_strips_whitespace_and_bom(tmp_path):
    csv_path = write(tmp_path / "train.csv",
                     "\ufeffimage , species,individual_id,extra\n"
                     " a.jpg ,humpback_whale, 007 ,x\n"
                     "\n"
                     "b.jpg,beluga,1e5,y\n")
    frame = read_train_csv(csv_path)
    assert list(frame.columns) == ["image", "species", "individual_id", "extra"]
    assert frame["image"].tolist() == ["a.jpg", "b.jpg"]
    assert frame["individual_id"].tolist() == ["007", "1e5"]  # not 7, not 100000.0


def test_species_fixes_applied_and_logged_with_counts(tmp_path, caplog):
    rows = ["image,species,individual_id"]
    wrong = list(SPECIES_FIXES)
    for i, sp in enumerate(wrong + wrong[:1] + ["beluga"]):
        rows.append(f"{i}.jpg,{sp},id{i}")
    csv_path = write(tmp_path / "train.csv", "\n".join(rows) + "\n")
    with caplog.at_level(logging.INFO, logger="whalesub.data.contract"):
        frame = read_train_csv(csv_path)
    assert frame["species"].tolist() == [
        "bottlenose_dolphin", "killer_whale", "short_finned_pilot_whale", "short_finned_pilot_whale",
        "bottlenose_dolphin", "beluga"]
    assert "'bottlenose_dolpin' -> 'bottlenose_dolphin' in 2 rows" in caplog.text
    assert "'globis' -> 'short_finned_pilot_whale' in 1 rows" in caplog.text
    raw = read_train_csv(csv_path, fix_species=False)
    assert raw["species"].tolist()[:4] == wrong


def test_missing_column_suggests_the_closest_name(tmp_path):
    csv_path = write(tmp_path / "train.csv", "image,specie,individul_id\na.jpg,x,1\n")
    with pytest.raises(DataError) as err:
        read_train_csv(csv_path)
    msg = str(err.value)
    assert str(csv_path) in msg
    assert "missing column 'species'; did you mean 'specie'?" in msg
    assert "missing column 'individual_id'; did you mean 'individul_id'?" in msg
    assert len(err.value.problems) == 2


def test_column_names_differing_only_in_case_are_accepted(tmp_path):
    csv_path = write(tmp_path / "train.csv", "Image,Species,Individual_ID\na.jpg,x,1\n")
    assert read_train_csv(csv_path)["individual_id"].tolist() == ["1"]


def test_duplicate_image_names_the_lines(tmp_path):
    csv_path = write(tmp_path / "train.csv", "image,species,individual_id\na.jpg,x,1\nb.jpg,x,2\na.jpg,x,3\n")
    with pytest.raises(DataError) as err:
        read_train_csv(csv_path)
    assert err.value.problems == [
        "1 duplicate image value (each must appear once): 'a.jpg' on lines 2, 4"]


def test_missing_image_file_counted_and_named(tmp_path):
    names = [f"{i}.jpg" for i in range(8)]
    folder = touch_images(tmp_path / "img", names[:1])
    csv_path = write(tmp_path / "train.csv",
                     "image,species,individual_id\n" + "".join(f"{n},x,{i}\n" for i, n in enumerate(names)))
    with pytest.raises(DataError) as err:
        read_train_csv(csv_path, image_dir=folder)
    (problem,) = err.value.problems
    assert problem.startswith(f"7 images listed in train not found in {folder}: '1.jpg', '2.jpg'")
    assert "and 2 more" in problem
    assert len(read_train_csv(csv_path)) == 8  # no folder given: no file check


def test_all_problems_reported_at_once_with_file_lines(tmp_path):
    folder = touch_images(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    csv_path = write(tmp_path / "train.csv",
                     "image,species,individual_id\n"   # line 1
                     "a.jpg,x,1\n"                      # line 2
                     "b.jpg,x,\n"                       # line 3: empty id
                     "\n"                               # line 4: blank, ignored
                     "c.jpg,x,NaN\n"                    # line 5: NaN id
                     f"d.jpg,x,{NEW_INDIVIDUAL}\n"      # line 6: not a train label
                     "a.jpg,x,2\n"                      # line 7: duplicate of line 2
                     "ghost.jpg,x,3\n")                 # line 8: no file
    with pytest.raises(DataError) as err:
        read_train_csv(csv_path, image_dir=folder)
    problems = err.value.problems
    assert len(problems) == 4
    assert "'a.jpg' on lines 2, 7" in problems[0]
    assert problems[1].startswith("2 empty or NaN individual_id values on lines 3, 5")
    assert problems[2].startswith(f"1 row(s) use '{NEW_INDIVIDUAL}' as a train label on line 6")
    assert "'ghost.jpg'" in problems[3] and problems[3].startswith("1 image ")
    assert "4 problem(s)" in str(err.value)


def test_latin1_file_is_read_with_a_warning(tmp_path, caplog):
    csv_path = write(tmp_path / "train.csv", "image,species,individual_id\nbaleine_é.jpg,x,1\n", "latin-1")
    with caplog.at_level(logging.WARNING, logger="whalesub.data.contract"):
        frame = read_train_csv(csv_path)
    assert frame["image"].tolist() == ["baleine_é.jpg"]
    assert "not valid UTF-8" in caplog.text


@pytest.mark.parametrize("case", ["absent", "folder", "empty"])
def test_unreadable_train_file_is_a_data_error(tmp_path, case):
    path = tmp_path / "train.csv"
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_text("")
    with pytest.raises(DataError, match="train"):
        read_train_csv(path)


def test_a_whole_train_csv_reads_every_row(photo_set):
    frame = read_train_csv(photo_set / "train.csv", image_dir=photo_set / "train_images")
    with open(photo_set / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert frame["image"].tolist() == [r["image"] for r in rows]
    assert frame["individual_id"].tolist() == [r["individual_id"] for r in rows]
    assert frame["individual_id"].nunique() == len({r["individual_id"] for r in rows})


# --- test listings -------------------------------------------------------------------------------


def test_listing_from_folder_is_sorted_and_keeps_images_only(tmp_path):
    folder = touch_images(tmp_path / "test", ["b.JPG", "a.jpeg", "c.png", ".hidden.jpg"])
    (folder / "notes.txt").write_text("x")
    (folder / "sub.jpg").mkdir()
    assert read_test_listing(folder) == ["a.jpeg", "b.JPG", "c.png"]


def test_listing_from_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        read_test_listing(tmp_path / "empty")


def test_listing_from_csv_keeps_file_order_and_checks(tmp_path):
    csv_path = write(tmp_path / "s.csv", "image,predictions\nz.jpg,new_individual\na.jpg,new_individual\n")
    assert read_test_listing(csv_path) == ["z.jpg", "a.jpg"]
    folder = touch_images(tmp_path / "img", ["z.jpg"])
    with pytest.raises(DataError, match=r"1 image listed in test listing not found .*'a.jpg'"):
        read_test_listing(csv_path, image_dir=folder)
    dup = write(tmp_path / "d.csv", "image\nz.jpg\nz.jpg\n")
    with pytest.raises(DataError, match="'z.jpg' on lines 2, 3"):
        read_test_listing(dup)


def test_sample_submission_lists_the_test_folder(photo_set):
    names = read_test_listing(photo_set / "sample_submission.csv", image_dir=photo_set / "test_images")
    assert sorted(names) == read_test_listing(photo_set / "test_images")
    with open(photo_set / "sample_submission.csv", newline="") as fh:
        assert names == [r["image"] for r in csv.DictReader(fh)]


# --- truth ---------------------------------------------------------------------------------------


def test_truth_drops_extra_columns_and_checks(tmp_path, photo_set):
    truth = read_truth(photo_set / "test_truth_full.csv")
    assert list(truth.columns) == ["image", "individual_id"]
    assert truth.equals(read_truth(photo_set / "test_truth.csv"))
    bad = write(tmp_path / "t.csv", "image,individual_id\na.jpg,\nb.jpg,x\nb.jpg,y\n")
    with pytest.raises(DataError) as err:
        read_truth(bad)
    assert len(err.value.problems) == 2


# --- boxes ---------------------------------------------------------------------------------------


def test_boxes_parse_numbers_and_optional_columns(tmp_path):
    path = write(tmp_path / "b.csv", "image,x1,y1,x2,y2,conf,box_type\n"
                                      "a.jpg,10,20,110.5,220,0.9,body\n"
                                      "a.jpg,5,5,50,50,1,fin\n")
    boxes = read_boxes(path)
    assert list(boxes.columns) == ["image", "x1", "y1", "x2", "y2", "conf", "box_type"]
    np.testing.assert_allclose(boxes[["x1", "y1", "x2", "y2"]].to_numpy(),
                               [[10, 20, 110.5, 220], [5, 5, 50, 50]])
    assert boxes["x1"].dtype == np.float64
    minimal = read_boxes(write(tmp_path / "m.csv", "image,x1,y1,x2,y2\na.jpg,0,0,1,1\n"))
    assert list(minimal.columns) == ["image", "x1", "y1", "x2", "y2"]


def test_boxes_report_every_problem_with_lines(tmp_path):
    path = write(tmp_path / "b.csv", "image,x1,y1,x2,y2,conf\n"
                                      "a.jpg,10,20,5,220,0.5\n"   # line 2: x2 <= x1
                                      "b.jpg,0,abc,1,1,0.5\n"     # line 3: not a number
                                      "c.jpg,0,0,1,1,1.5\n"       # line 4: conf > 1
                                      "d.jpg,0,9,1,9,0.5\n"       # line 5: y2 <= y1
                                      "d.jpg,0,0,1,1,inf\n")      # line 6: duplicate + inf conf
    with pytest.raises(DataError) as err:
        read_boxes(path)
    text = "\n".join(err.value.problems)
    assert "column 'y1': 1 value(s) not a finite number on line 3 (e.g. 'abc')" in text
    assert "column 'conf': 1 value(s) not a finite number on line 6" in text
    assert "x2 <= x1 (empty or flipped) on line 2" in text
    assert "y2 <= y1 (empty or flipped) on line 5" in text
    assert "conf value(s) outside [0, 1] on line 4" in text
    assert "'d.jpg' on lines 5, 6" in text
    assert len(err.value.problems) == 6


def test_trailing_commas_do_not_shift_columns_and_ragged_rows_name_the_line(tmp_path, caplog):
    trailing = write(tmp_path / "t.csv", "image,species,individual_id\na.jpg,x,1,\nb.jpg,y,2,\n")
    with caplog.at_level(logging.WARNING, logger="whalesub.data.contract"):
        frame = read_train_csv(trailing)
    assert frame["image"].tolist() == ["a.jpg", "b.jpg"] and frame["individual_id"].tolist() == ["1", "2"]
    assert "trailing commas" in caplog.text
    ragged = write(tmp_path / "r.csv", "image,species,individual_id\na.jpg,x,1\nb.jpg,y,2,zz\n")
    with pytest.raises(DataError, match=r"not a well-formed CSV: .*line 3"):
        read_train_csv(ragged)
