"""Embedding files: round trip, atomic writing, and one readable error per broken file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from whalesub.core.errors import DataError, WriteError
from whalesub.ranking.store import (
    Embeddings,
    average_views,
    check_compatible,
    load_embeddings,
    save_embeddings,
    unit_float32,
)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_keeps_ids_vectors_and_meta(tmp_path, dtype):
    rng = np.random.default_rng(0)
    ids = ["a.jpg", "a.jpg", "b.jpg"]  # two views of a.jpg
    vecs = _unit(rng, 3, 8).astype(dtype)
    out = save_embeddings(tmp_path / "g.npz", ids, vecs, {"fingerprint": "fp1", "tta": ["orig", "hflip"]})
    assert out == tmp_path / "g.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"]
    emb = load_embeddings(out)
    assert emb.ids.tolist() == ids and emb.vectors.dtype == dtype
    np.testing.assert_array_equal(emb.vectors, vecs)
    assert emb.fingerprint == "fp1" and emb.meta["tta"] == ["orig", "hflip"]
    assert emb.meta["format"] == "whalesub.embeddings" and "created" in emb.meta and len(emb) == 3
    # readable by plain numpy without pickle: the format users can bring themselves
    with np.load(out, allow_pickle=False) as npz:
        assert json.loads(str(npz["meta"]))["fingerprint"] == "fp1"


def test_save_without_npz_suffix_writes_exactly_that_name(tmp_path):
    save_embeddings(tmp_path / "gallery.emb", ["x"], np.ones((1, 2), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.emb"]
    assert load_embeddings(tmp_path / "gallery.emb").ids.tolist() == ["x"]


def test_user_file_without_meta_loads_with_empty_meta(tmp_path):
    np.savez(tmp_path / "u.npz", ids=np.array(["p", "q"]), embeddings=np.eye(2, dtype=np.float32))
    emb = load_embeddings(tmp_path / "u.npz")
    assert emb.meta == {} and emb.fingerprint is None and emb.dim == 2


def test_nan_row_is_named_with_row_and_id(tmp_path):
    vecs = np.ones((4, 3), np.float32)
    vecs[2, 1] = np.nan
    np.savez(tmp_path / "bad.npz", ids=np.array(list("abcd")), embeddings=vecs)
    with pytest.raises(DataError, match=r"bad\.npz.*\n.*1 rows .*NaN or inf: row 2 \(c\)"):
        load_embeddings(tmp_path / "bad.npz")


def test_saving_nan_refuses_and_leaves_no_file(tmp_path):
    with pytest.raises(DataError, match="NaN"):
        save_embeddings(tmp_path / "g.npz", ["a"], np.array([[np.nan, 1]], np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"embeddings": np.ones((2, 3), np.float32)}, "lacks the array.*'ids'"),
        ({"ids": np.array(["a", "b"]), "embeddings": np.ones((3, 3), np.float32)}, "2 entries but.*3 rows"),
        ({"ids": np.array(["a", "b"]), "embeddings": np.ones((2, 3), np.float64)}, "float32 or float16"),
        ({"ids": np.array(["a", "b"]), "embeddings": np.ones(2, np.float32)}, "must be 2-D"),
        ({"ids": np.array(["a", "b"], dtype=object), "embeddings": np.ones((2, 3), np.float32)}, "pickle"),
        ({"ids": np.array(["a", ""]), "embeddings": np.ones((2, 3), np.float32)}, "empty names"),
    ],
)
def test_broken_files_raise_one_readable_error(tmp_path, arrays, message):
    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_embeddings(tmp_path / "e.npz")
    assert "e.npz" in str(info.value)


def test_not_an_npz_and_missing_file(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(DataError, match="not a .npz"):
        load_embeddings(tmp_path / "x.npz")
    with pytest.raises(DataError, match="not found"):
        load_embeddings(tmp_path / "missing.npz")


def test_compatibility_checks_dimension_and_fingerprint():
    a = Embeddings(np.array(["a"]), np.ones((1, 4), np.float32), {"fingerprint": "x"})
    with pytest.raises(DataError, match="D=4.*D=3"):
        check_compatible(a, Embeddings(np.array(["q"]), np.ones((1, 3), np.float32), {"fingerprint": "x"}))
    with pytest.raises(DataError, match="fingerprint mismatch.*'x'.*'y'"):
        check_compatible(a, Embeddings(np.array(["q"]), np.ones((1, 4), np.float32), {"fingerprint": "y"}))
    check_compatible(a, Embeddings(np.array(["q"]), np.ones((1, 4), np.float32), {}))  # unknown: warn only


def test_different_box_crops_warn(caplog):
    g = Embeddings(np.array(["a"]), np.ones((1, 4), np.float32), {"fingerprint": "x", "box_type": "body"})
    with caplog.at_level("WARNING", logger="whalesub.ranking.store"):
        check_compatible(g, Embeddings(np.array(["q"]), np.ones((1, 4), np.float32),
                                       {"fingerprint": "x", "box_type": "body"}))
    assert "box type" not in caplog.text
    with caplog.at_level("WARNING", logger="whalesub.ranking.store"):
        check_compatible(g, Embeddings(np.array(["q"]), np.ones((1, 4), np.float32),
                                       {"fingerprint": "x", "box_type": None}))
    assert "box type 'body'" in caplog.text and "None" in caplog.text


def test_unit_float32_normalises_and_rejects_zero_rows():
    emb = Embeddings(np.array(["a", "b"]), np.array([[3, 4], [0, 2]], np.float16))
    np.testing.assert_allclose(unit_float32(emb), [[0.6, 0.8], [0, 1]], rtol=1e-3)
    with pytest.raises(DataError, match="all-zero.*'b'"):
        unit_float32(Embeddings(np.array(["a", "b"]), np.array([[1, 0], [0, 0]], np.float32)))


def test_average_views_is_the_renormalised_mean_per_image():
    rng = np.random.default_rng(1)
    v = _unit(rng, 5, 6)
    emb = Embeddings(np.array(["b", "a", "b", "c", "a"]), v, {"fingerprint": "f"})
    out = average_views(emb)
    assert out.ids.tolist() == ["b", "a", "c"]  # order of first appearance
    for name, rows in {"b": [0, 2], "a": [1, 4], "c": [3]}.items():
        m = v[rows].mean(axis=0)
        got = out.vectors[out.ids.tolist().index(name)]
        np.testing.assert_allclose(got, m / np.linalg.norm(m), atol=1e-6)
    assert out.meta == {"fingerprint": "f"}


def test_a_crash_while_writing_leaves_neither_file_nor_temp(tmp_path, monkeypatch):
    def crash(fh, **arrays):
        fh.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(WriteError, match="cannot write .*g.npz: disk full"):  # one error naming the file
        save_embeddings(tmp_path / "g.npz", ["a"], np.ones((1, 2), np.float32))
    assert list(tmp_path.iterdir()) == []
