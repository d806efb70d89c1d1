"""The CLI wrapper: OS-level failures (a folder as --out, an unwritable path) are one readable line."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import WhalesubError
from whalesub.ranking.store import save_embeddings


def test_writing_onto_a_folder_is_a_whalesub_error(tmp_path):
    with pytest.raises(WhalesubError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")] == []


def test_submit_with_a_folder_as_out_exits_2_without_traceback(tmp_path):
    (tmp_path / "train.csv").write_text("image,species,individual_id\ng0.jpg,beluga,a\ng1.jpg,beluga,b\n")
    v = np.eye(2, dtype=np.float32)
    save_embeddings(tmp_path / "g.npz", ["g0.jpg", "g1.jpg"], v, {"fingerprint": "fp"})
    save_embeddings(tmp_path / "q.npz", ["q0.jpg", "q1.jpg"], v, {"fingerprint": "fp"})
    out = tmp_path / "outdir"
    out.mkdir()
    r = CliRunner().invoke(app, ["submit", "--gallery", str(tmp_path / "g.npz"), "--queries",
                                 str(tmp_path / "q.npz"), "--train-csv", str(tmp_path / "train.csv"),
                                 "--threshold", "0.5", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "is a folder" in r.output and "Traceback" not in r.output
    assert list(out.iterdir()) == []


def test_os_errors_become_one_line_and_exit_2(tmp_path, monkeypatch):
    import whalesub.workflows.submit

    def boom(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.csv"))

    monkeypatch.setattr(whalesub.workflows.submit, "submit_files", boom)
    r = CliRunner().invoke(app, ["submit", "--gallery", "g", "--queries", "q", "--train-csv", "t",
                                 "--threshold", "0.5", "--out", "o.csv"])
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and "Permission denied" in r.output and "x.csv" in r.output
    assert not isinstance(r.exception, PermissionError)


def test_submit_refuses_a_folder_as_out_before_searching(tmp_path, monkeypatch):
    import whalesub.workflows.submit

    def no_search(*a, **kw):  # the check must come before the (long) search
        raise AssertionError("searched before checking --out")

    monkeypatch.setattr(whalesub.workflows.submit, "rank_queries", no_search)
    (tmp_path / "outdir").mkdir()
    with pytest.raises(WhalesubError, match="is a folder"):
        whalesub.workflows.submit.submit_files(tmp_path / "g.npz", tmp_path / "q.npz", tmp_path / "t.csv",
                                               0.5,
                                       tmp_path / "outdir")
