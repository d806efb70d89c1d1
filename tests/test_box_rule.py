"""One box rule for `whalesub embed` and training's validation (whalesub.data.contract.choose_box_type)."""

from __future__ import annotations

import pandas as pd
import pytest

from train.dataset import BoxTable
from whalesub.core.errors import DataError
from whalesub.data.contract import choose_box_type
from whalesub.embedding.loader import select_boxes


def _table(tmp_path, kinds):
    rows = [{"image": f"i{n}.jpg", "x1": n, "y1": 0, "x2": 10 + n, "y2": 10, "conf": 0.9, "box_type": k}
            for n, k in enumerate(kinds)]
    rows += [{"image": "i0.jpg", "x1": 5, "y1": 5, "x2": 9, "y2": 9, "conf": 0.9, "box_type": kinds[-1]}
             ] if kinds[0] != kinds[-1] else []
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "boxes.csv", index=False)
    return frame


def test_the_rule_by_hand():
    assert choose_box_type([], None, "b.csv") is None
    assert choose_box_type(["body", "body"], None, "b.csv") == "body"
    assert choose_box_type(["fin", "body"], "fin", "b.csv") == "fin"
    with pytest.raises(DataError, match=r"several box types \['body', 'fin'\]: choose one with --box"):
        choose_box_type(["fin", "body"], None, "b.csv")
    with pytest.raises(DataError, match=r"eval_box_type 'tail' not in box file b.csv \(it has \['body'\]\)"):
        choose_box_type(["body"], "tail", "b.csv", "eval_box_type")


@pytest.mark.parametrize("kinds, named", [(["body", "body"], None), (["body", "fin"], "fin"),
                                          (["body", "fin"], "body")])
def test_embed_and_validation_crop_the_same_box(tmp_path, kinds, named):
    frame = _table(tmp_path, kinds)
    names = ["i0.jpg", "i1.jpg", "zz.jpg"]
    embed = [None if b is None else tuple(b[:4]) for b in select_boxes(tmp_path / "boxes.csv", named, names)]
    table = BoxTable(frame, {"body": 1.0}, conf=0.5)
    assert [table.best(n, named) for n in names] == embed
    assert embed[2] is None and embed[0] is not None  # the oracle: the row of the chosen type in the file
    want = frame[(frame.image == "i0.jpg") & (frame.box_type == (named or kinds[0]))].iloc[0]
    assert embed[0] == (want.x1, want.y1, want.x2, want.y2)


def test_several_types_without_a_name_is_refused_by_both(tmp_path):
    frame = _table(tmp_path, ["body", "fin"])
    with pytest.raises(DataError, match="several box types"):
        select_boxes(tmp_path / "boxes.csv", None, ["i0.jpg"])
    with pytest.raises(DataError, match="several box types .*eval_box_type"):
        BoxTable(frame, {"body": 1.0, "fin": 1.0}, conf=0.5).best("i0.jpg", None)
