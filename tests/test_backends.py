"""Opening an export folder: a malformed export.json, or a model_spec.json that does not give the
manifest's fingerprint, is one DataError naming the file and key (exit 2 from the CLI), never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import _first_principles_fingerprint, export_tiny, make_checkpoint
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import DataError
from whalesub.models.backends import open_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    ckpt = make_checkpoint(root / "run" / "best.pt")
    other = make_checkpoint(root / "other" / "best.pt", seed=1, size=48)
    return ckpt, export_tiny(ckpt, root / "out"), export_tiny(other, root / "out_other")


@pytest.fixture
def copy(tiny, tmp_path):
    """A fresh copy of the tiny export folder (the module's export stays untouched)."""
    dest = tmp_path / "export"
    shutil.copytree(tiny[1], dest)
    return dest


def _embed(model: Path, tmp_path: Path):
    """``whalesub embed`` of one real photo with ``model``, through the CLI."""
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.jpg")
    return CliRunner().invoke(app, ["embed", "--model", str(model), "--device", "cpu", "--workers", "0",
                                    "--images", str(images), "--out", str(tmp_path / "e.npz")])


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "export.json").read_text())


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _no_spec(m: dict) -> dict:
    return {**m, "files": {"fp32": _without(m["files"]["fp32"], "spec")}}


def _fp32(m: dict, **changes) -> str:
    return json.dumps({**m, "files": {"fp32": {**m["files"]["fp32"], **changes}}})


# name -> (how to break the manifest text, the key the message must name)
MALFORMED = {
    "no_fingerprint": (lambda m: json.dumps(_without(m, "fingerprint")), "'fingerprint'"),
    "fingerprint_number": (lambda m: json.dumps({**m, "fingerprint": 12}), "'fingerprint'"),
    "no_weights_digest": (lambda m: json.dumps(_without(m, "weights_digest")), "'weights_digest'"),
    "files_list": (lambda m: json.dumps({**m, "files": []}), "'files'"),
    "files_empty": (lambda m: json.dumps({**m, "files": {}}), "'files'"),
    "no_files": (lambda m: json.dumps(_without(m, "files")), "'files'"),
    "entry_string": (lambda m: json.dumps({**m, "files": {"fp32": "model.onnx"}}), "'files.fp32'"),
    "entry_no_spec": (lambda m: json.dumps(_no_spec(m)), "'files.fp32.spec'"),
    "file_outside": (lambda m: _fp32(m, file="../x.onnx"), "'files.fp32.file'"),
    "sha256_number": (lambda m: _fp32(m, sha256=1), "'files.fp32.sha256'"),
    "invalid_json": (lambda m: json.dumps(m)[:-20], "not valid JSON"),
}


def _break(folder: Path, case: str) -> str:
    make, needle = MALFORMED[case]
    (folder / "export.json").write_text(make(_manifest(folder)))
    return needle


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_a_data_error_naming_file_and_key(copy, case):
    needle = _break(copy, case)
    with pytest.raises(DataError) as info:
        open_model(copy, "onnx", "cpu")
    msg = str(info.value)
    assert str(copy / "export.json") in msg and needle in msg and "whalesub export" in msg, msg


@pytest.mark.parametrize("case", ["no_fingerprint", "files_list", "entry_no_spec", "invalid_json"])
def test_malformed_manifest_through_the_cli_is_one_line_and_exit_2(copy, tmp_path, case):
    needle = _break(copy, case)
    res = _embed(copy, tmp_path)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "export.json" in lines[0] and needle in lines[0], res.output
    assert not (tmp_path / "e.npz").exists()


def test_untouched_copy_embeds_through_the_cli(copy, tmp_path):
    res = _embed(copy, tmp_path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e.npz").is_file()


def test_untouched_export_opens_with_the_recomputed_fingerprint(tiny):
    ckpt, out, _ = tiny
    m = _manifest(out)
    spec_json = json.loads((out / "model_spec.json").read_text())
    payload = json.dumps({"spec": spec_json, "weights": m["weights_digest"]}, sort_keys=True,
                         separators=(",", ":"))
    recomputed = hashlib.sha256(payload.encode()).hexdigest()[:16]
    model = open_model(out, "onnx", "cpu")
    assert model.fingerprint == recomputed == m["fingerprint"]
    # and the weights digest in the manifest is the checkpoint's own (hashlib from the raw tensors)
    assert _first_principles_fingerprint(ckpt, out / "model_spec.json") == recomputed


def _set_mean(folder: Path, mean: list[float]) -> None:
    spec = json.loads((folder / "model_spec.json").read_text())
    spec["mean"] = mean
    (folder / "model_spec.json").write_text(json.dumps(spec, indent=2))


def test_edited_spec_is_refused_naming_model_spec(copy, tmp_path):
    _set_mean(copy, [0.5, 0.5, 0.5])
    with pytest.raises(DataError) as info:
        open_model(copy, "onnx", "cpu")
    msg = str(info.value)
    assert str(copy / "model_spec.json") in msg and _manifest(copy)["fingerprint"] in msg, msg
    assert "restore" in msg and "whalesub export" in msg, msg
    res = _embed(copy, tmp_path)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "model_spec.json" in res.output, res.output


def test_spec_copied_from_another_export_is_refused(tiny, copy):
    shutil.copy(tiny[2] / "model_spec.json", copy / "model_spec.json")
    with pytest.raises(DataError, match="model_spec.json does not match the fingerprint"):
        open_model(copy, "onnx", "cpu")


def test_a_whitespace_only_spec_change_still_opens(copy, tiny):
    """The check compares the spec's values, not its bytes: re-indenting the file is no edit."""
    spec = json.loads((copy / "model_spec.json").read_text())
    (copy / "model_spec.json").write_text(json.dumps(spec, separators=(",", ":")))
    assert open_model(copy, "onnx", "cpu").fingerprint == _manifest(tiny[1])["fingerprint"]


def test_packaging_reads_the_checked_manifest(copy):
    from whalesub.kaggle.package import models_fingerprint

    models_fingerprint([copy])  # untouched: fine
    _set_mean(copy, [0.25, 0.5, 0.75])
    with pytest.raises(DataError, match="model_spec.json"):
        models_fingerprint([copy])


def test_torch_backend_leaves_the_process_thread_count_alone(tiny):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    open_model(tiny[0], "torch", "cpu", threads=wanted)
    assert torch.get_num_threads() == before


def test_a_damaged_graph_without_a_digest_is_one_error_naming_it(copy, tmp_path):
    """An export.json without sha256 (allowed) cannot catch a damaged model.onnx: ONNX Runtime's
    own error comes back as one WhalesubError naming the file and the fix, not a traceback."""
    from whalesub.core.errors import WhalesubError

    m = _manifest(copy)
    m["files"]["fp32"].pop("sha256")
    (copy / "export.json").write_text(json.dumps(m))
    (copy / m["files"]["fp32"]["file"]).write_bytes(b"not an onnx graph")
    with pytest.raises(WhalesubError) as err:
        open_model(copy, "onnx", "cpu")
    msg = str(err.value)
    assert m["files"]["fp32"]["file"] in msg and "ONNX Runtime cannot open" in msg
    assert "whalesub export" in msg
    res = _embed(copy, tmp_path)
    assert res.exit_code == 2 and "Traceback" not in res.output and "cannot open" in res.output, res.output
