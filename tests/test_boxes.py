"""`whalesub boxes convert`: the public Happywhale box files -> boxes.csv (hand-written sample rows)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import DataError
from whalesub.data.boxes import convert_boxes, parse_numbers
from whalesub.data.contract import read_boxes

# YOLOv5 full-body detections as the charm files hold them (columns in their order, padded numpy text)
CHARM = """bbox,conf,height,image,image_id,predictions,width
[[ 213  813 3054 1301]],[0.839355],2400,a.jpg,a,x,3600
"[[   5   10  100  200]
 [  20   30  400  500]]",[0.30 0.91],600,b.jpg,b,x,800
,,600,c.jpg,c,x,800
[[ -12  40  850  590]],[0.5],600,d.jpg,d,x,800
[[1.5e2 2.0e1 3.0e2 4.0e2]],[1],600,e.jpg,e,x,800
"""

# Detic crops: space-separated box, no conf, empty cells for no detection
DETIC = """image,species,individual_id,box
p.jpg,beluga,id1,329 874 2934 1271
q.jpg,beluga,id2,
r.jpg,humpback_whale,id3,0 0 10 10
"""

# the YOLOv5 cropped set: Python literal lists, images named by their path
LITERAL = """bbox,conf,image_id,image_path,label_path
"[[10, 20, 30, 40], [1, 2, 3, 4]]","[0.2, 0.7]",0,/kaggle/input/x/train_images/m.jpg,l
,,1,/kaggle/input/x/train_images/n.jpg,l
"[[0.5, 1.5, 90.25, 80]]",[0.9],2,train_images/o.jpg,l
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def as_dict(path):
    df = read_boxes(path)
    return {r.image: (r.x1, r.y1, r.x2, r.y2, r.conf, r.box_type) for r in df.itertuples()}


def test_parse_numbers_reads_every_format():
    assert parse_numbers("[[ 213  813 3054 1301]]") == [213, 813, 3054, 1301]
    assert parse_numbers("329 874 2934 1271") == [329, 874, 2934, 1271]
    assert parse_numbers("[[10, 20.5, 30, 40], [-1, .5, 3e2, 4E-1]]") == [10, 20.5, 30, 40, -1, 0.5, 300, 0.4]


def test_yolo_numpy_text_with_conf_several_boxes_empty_and_clipping(tmp_path):
    src = write(tmp_path, "fullbody_train_charm.csv", CHARM)
    out = tmp_path / "boxes.csv"
    s = convert_boxes(src, out, "body")
    got = as_dict(out)
    assert got["a.jpg"] == (213, 813, 3054, 1301, pytest.approx(0.839355), "body")
    assert got["b.jpg"] == (20, 30, 400, 500, pytest.approx(0.91), "body")  # the more confident box
    assert "c.jpg" not in got  # empty cell: no box, reported
    assert got["d.jpg"][:4] == (0, 40, 800, 590)  # clipped to the 800x600 image given by width/height
    assert got["e.jpg"][:4] == (150, 20, 300, 400)
    assert (s["empty"], s["several"], s["clipped"], s["boxes"]) == (1, 1, 1, 4)
    assert s["empty_lines"] == [5] and s["clipped_lines"] == [6]  # header = line 1, b spans lines 3-4


def test_detic_space_separated_without_conf(tmp_path):
    out = tmp_path / "boxes.csv"
    s = convert_boxes(write(tmp_path, "train2.csv", DETIC), out, "detic")
    got = as_dict(out)
    assert got == {"p.jpg": (329, 874, 2934, 1271, 1.0, "detic"), "r.jpg": (0, 0, 10, 10, 1.0, "detic")}
    assert s["empty"] == 1 and not s["sizes_checked"]


def test_literal_lists_join_on_the_image_path_base_name(tmp_path):
    out = tmp_path / "boxes.csv"
    convert_boxes(write(tmp_path, "train_bbox.csv", LITERAL), out, "fin")
    got = as_dict(out)
    assert set(got) == {"m.jpg", "o.jpg"}
    assert got["m.jpg"][:5] == (1, 2, 3, 4, pytest.approx(0.7))
    assert got["o.jpg"][:4] == (0.5, 1.5, 90.25, 80)


def test_inclusive_corners_become_exclusive(tmp_path):
    out = tmp_path / "boxes.csv"
    convert_boxes(write(tmp_path, "t.csv", "image,box\nz.jpg,0 0 9 19\n"), out, "body", inclusive=True)
    assert as_dict(out)["z.jpg"][:4] == (0, 0, 10, 20)


def test_sizes_from_the_image_files_after_exif_rotation(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300x100, shown upright as 100x300
    Image.new("RGB", (300, 100)).save(images / "rot.jpg", exif=exif.tobytes())
    src = write(tmp_path, "t.csv", "image,box\nrot.jpg,10 10 200 250\n")
    out = tmp_path / "boxes.csv"
    s = convert_boxes(src, out, "body", images=images)
    assert as_dict(out)["rot.jpg"][:4] == (10, 10, 100, 250)  # x2 clipped to the upright width 100
    assert s["clipped"] == 1 and s["sizes_checked"]


@pytest.mark.parametrize("text,needle", [
    ("image,box\na.jpg,1 2 3\n", "4 numbers per box"),
    ("image,bbox,conf\na.jpg,[[1 2 3 4] [5 6 7 8]],[0.5]\n", "conf value"),
    ("image,box\na.jpg,5 5 5 9\nb.jpg,1 1 9 9\n", "without --strict they are left out"),
    ("image,box\na.jpg,5 5 5.5 9\nb.jpg,1 1 9 9\n", "empty or under 1 px on a side"),
    ("image,box\na.jpg,1 2 3 4\na.jpg,1 2 3 5\n", "appear on several rows"),
    ("image,bbox,conf\na.jpg,[[1 2 3 4]],[1.7]\n", "outside [0, 1]"),
    ("image,box,width,height\na.jpg,900 10 1000 20,800,600\n", "after clipping"),
    ("file,coords\na.jpg,1 2 3 4\n", "none of the columns"),
])
def test_problems_name_the_line_and_write_nothing(tmp_path, text, needle):
    out = tmp_path / "boxes.csv"
    with pytest.raises(DataError, match="nothing was written|none of the columns") as err:
        convert_boxes(write(tmp_path, "bad.csv", text), out, "body", strict=True)  # strict: empty boxes too
    assert needle in str(err.value)
    if "none of the columns" not in needle:
        assert "line 2" in str(err.value) or "lines 2" in str(err.value) or "'a.jpg'" in str(err.value)
    assert not out.exists()


def test_missing_images_are_reported(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="not found in"):
        convert_boxes(write(tmp_path, "t.csv", "image,box\nghost.jpg,1 2 3 4\n"), tmp_path / "o.csv", "body",
                      images=tmp_path / "imgs")


def test_append_adds_a_second_box_type_and_refuses_a_repeat(tmp_path):
    out = tmp_path / "boxes.csv"
    convert_boxes(write(tmp_path, "a.csv", DETIC), out, "body")
    convert_boxes(write(tmp_path, "b.csv", "image,box\np.jpg,1 1 5 5\n"), out, "fin", append=True)
    df = read_boxes(out)
    assert sorted(zip(df["image"], df["box_type"], strict=True)) == [
        ("p.jpg", "body"), ("p.jpg", "fin"), ("r.jpg", "body")]
    before = out.read_bytes()
    with pytest.raises(DataError, match="already has boxes of type 'fin'"):
        convert_boxes(write(tmp_path, "c.csv", "image,box\nr.jpg,1 1 5 5\n"), out, "fin", append=True)
    assert out.read_bytes() == before


def test_the_output_crops_what_the_source_box_says(tmp_path):
    """End to end: the converted box is the region whalesub.data.image crops (uniform colour inside)."""
    from whalesub.data.image import load_image

    img = np.zeros((60, 80, 3), np.uint8)
    img[10:30, 20:50] = (200, 40, 90)
    Image.fromarray(img).save(tmp_path / "w.png")
    out = tmp_path / "boxes.csv"
    convert_boxes(write(tmp_path, "t.csv", "image,bbox,conf\nw.png,[[20 10 50 30]],[0.9]\n"), out, "body",
                  images=tmp_path)
    row = read_boxes(out).iloc[0]
    crop = load_image(tmp_path / "w.png", box=(row.x1, row.y1, row.x2, row.y2))
    assert crop.shape[:2] == (20, 30) and (crop == (200, 40, 90)).all()


def test_cli_prints_the_counts_and_exits_2_on_problems(tmp_path):
    src = write(tmp_path, "fullbody.csv", CHARM)
    out = tmp_path / "boxes.csv"
    r = CliRunner().invoke(app, ["boxes", "convert", str(src), "--out", str(out), "--box-type", "body"])
    assert r.exit_code == 0, r.output
    assert "4 body boxes from 5 rows; 1 without a box, 1 with several" in r.output
    assert len(pd.read_csv(out)) == 4
    bad = write(tmp_path, "bad.csv", "image,box\na.jpg,1 2 x\n")
    r = CliRunner().invoke(app, ["boxes", "convert", str(bad), "--out", str(tmp_path / "o.csv"),
                                 "--box-type", "body"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output
    assert not (tmp_path / "o.csv").exists()


# --- the converter keeps exactly the boxes whalesub's cropper accepts ------------------------------------
@pytest.mark.parametrize("box", ["79.5 10 85 30", "10 10 10.5 30", "10 29.2 40 30", "-5 10 0.5 30",
                                 "10 10 11 30", "79 0 90 60", "10 10 40 30"])
def test_a_box_is_kept_exactly_when_load_image_can_crop_it(tmp_path, box):
    """Oracle: load_image itself on the 80x60 image; a box it refuses is left out (and reported)."""
    from whalesub.data.image import load_image

    Image.new("RGB", (80, 60)).save(tmp_path / "w.png")
    Image.new("RGB", (80, 60)).save(tmp_path / "v.png")
    src = write(tmp_path, "t.csv", f"image,box,width,height\nw.png,{box},80,60\nv.png,0 0 8 8,80,60\n")
    out = tmp_path / "boxes.csv"
    s = convert_boxes(src, out, "body")
    try:
        load_image(tmp_path / "w.png", box=parse_numbers(box))
        crops = True
    except DataError:
        crops = False
    got = as_dict(out)
    assert ("w.png" in got) == crops
    assert s["degenerate_lines"] == ([] if crops else [2])
    for name, row in got.items():  # every written box crops
        assert load_image(tmp_path / name, box=row[:4]).size > 0


@pytest.mark.parametrize("sizes", [",800,600", ""])
def test_normalised_coordinates_are_refused_with_the_fix(tmp_path, sizes):
    head = "image,box" + (",width,height" if sizes else "")
    src = write(tmp_path, "t.csv", f"{head}\na.jpg,0.1 0.2 0.5 0.6{sizes}\nb.jpg,0 0 1 1{sizes}\n")
    out = tmp_path / "boxes.csv"
    with pytest.raises(DataError, match=r"normalised \(0-1\) coordinates.*multiply x1 and x2 by the image"):
        convert_boxes(src, out, "body")
    assert not out.exists()
    r = CliRunner().invoke(app, ["boxes", "convert", str(src), "--out", str(out), "--box-type", "body"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "line 2" in r.output
    assert not out.exists()


def test_a_file_of_only_degenerate_boxes_is_refused_even_without_strict(tmp_path):
    src = write(tmp_path, "xywh.csv", "image,box\na.jpg,100 100 50 50\nb.jpg,300 40 20 30\nc.jpg,\n")
    out = tmp_path / "boxes.csv"
    with pytest.raises(DataError, match="all 2 box.*lines 2, 3.*x y width height") as err:
        convert_boxes(src, out, "body")
    assert "nothing was written" in str(err.value) and not out.exists()
    # one good box among them: the rest is left out and reported, as before
    src = write(tmp_path, "mixed.csv", "image,box\na.jpg,100 100 50 50\nb.jpg,10 10 50 50\n")
    assert convert_boxes(src, out, "body")["degenerate_lines"] == [2] and set(as_dict(out)) == {"b.jpg"}


@pytest.mark.parametrize("cell, token", [("x1=10 y1=20 x2=300 y2=400", "x1=10"), ("1 2 3 4 px", "px"),
                                         ("[[1 2 nan 4]]", "nan"), ("1-2 3 4 5", "1-2"),
                                         ("1 2 3 1e999", "1e999")])
def test_anything_but_numbers_in_a_cell_is_an_error_naming_line_and_column(tmp_path, cell, token):
    src = write(tmp_path, "t.csv", f'image,bbox\nok.jpg,1 2 30 40\na.jpg,"{cell}"\n')
    out = tmp_path / "boxes.csv"
    with pytest.raises(DataError, match="something other than numbers") as err:
        convert_boxes(src, out, "body")
    assert f"line 3: {token!r} in bbox" in str(err.value) and not out.exists()
    with pytest.raises(ValueError, match=token):
        parse_numbers(cell)


@pytest.mark.parametrize("conf", ["[nan]", "", "nan", "[0.5 nan]"])
def test_a_box_without_a_real_conf_is_an_error(tmp_path, conf):
    """A missing conf is not 1.0 (that would pass every --box-conf threshold)."""
    box = "[[1 2 30 40] [5 6 70 80]]" if " " in conf else "[[1 2 30 40]]"
    src = write(tmp_path, "t.csv", f'image,bbox,conf\nok.jpg,[[1 2 30 40]],[0.4]\na.jpg,{box},"{conf}"\n')
    out = tmp_path / "boxes.csv"
    with pytest.raises(DataError, match="line 3") as err:
        convert_boxes(src, out, "body")
    assert "conf" in str(err.value) and not out.exists()


def test_a_conf_cell_without_a_box_is_no_box(tmp_path):
    src = write(tmp_path, "t.csv", "image,bbox,conf\nok.jpg,[[1 2 30 40]],[0.4]\nno.jpg,[],[nan]\n")
    s = convert_boxes(src, tmp_path / "boxes.csv", "body")
    assert s["empty_lines"] == [3] and set(as_dict(tmp_path / "boxes.csv")) == {"ok.jpg"}


@pytest.mark.parametrize("text, line", [("image,box\nok.jpg,\nz.jpg,1 2 3 4\n,5 6 7 8\n", 4),
                                        ("image_path,box\nd/ok.jpg,1 2 3 4\nd/,5 6 7 8\n", 3),
                                        ("image,box\nnan,5 6 7 8\nok.jpg,1 2 3 4\n", 2)])
def test_an_empty_image_name_is_reported_on_its_source_line(tmp_path, text, line):
    src = write(tmp_path, "t.csv", text)
    out = tmp_path / "boxes.csv"
    want = f"1 row.s. with an empty image name .column '[a-z_]+'. on line {line};"
    with pytest.raises(DataError, match=want) as err:
        convert_boxes(src, out, "body")
    assert str(src) in str(err.value) and ".tmp" not in str(err.value) and not out.exists()


@pytest.mark.parametrize("box", [(1000.0001, 0.0, 1001.0004, 10.0), (1234567.5, 0.0, 1234568.75, 10.0),
                                 (0.123456789, 0.5, 2.987654321, 3.25)])
def test_coordinates_are_written_exactly(tmp_path, box):
    src = write(tmp_path, "t.csv", f"image,box,conf\na.jpg,{' '.join(map(repr, box))},0.123456789\n")
    out = tmp_path / "boxes.csv"
    convert_boxes(src, out, "body")
    assert as_dict(out)["a.jpg"] == (*box, 0.123456789, "body")  # exact, not 6 significant digits


def test_append_compares_the_box_type_as_written(tmp_path):
    out = tmp_path / "boxes.csv"
    convert_boxes(write(tmp_path, "a.csv", "image,box\np.jpg,1 1 5 5\n"), out, " fin ")
    assert set(read_boxes(out)["box_type"]) == {"fin"}
    before = out.read_bytes()
    with pytest.raises(DataError, match=f"{out} already has boxes of type 'fin'"):
        convert_boxes(write(tmp_path, "b.csv", "image,box\np.jpg,2 2 6 6\n"), out, "fin ", append=True)
    assert out.read_bytes() == before
