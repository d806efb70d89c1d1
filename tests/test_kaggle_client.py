"""Upload, push and submit through the real kaggle client (2.2.5) against a fake server on 127.0.0.1.

The client runs as a subprocess with ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` (every call goes to
``http://localhost/api/v1/...``) and ``HTTP_PROXY`` pointing at :class:`fake_kaggle.FakeKaggle`;
HOME and KAGGLE_CONFIG_DIR are temporary folders, so no real configuration is read or written.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from fake_kaggle import FakeKaggle
from typer.testing import CliRunner

from whalesub.core.errors import ConfigError, DataError
from whalesub.kaggle import KIND_MODELS, KIND_WHEELS
from whalesub.kaggle.client import KaggleClientError, find_credentials, upload_dataset, wait_kernel
from whalesub.kaggle.metadata import dataset_metadata, kernel_metadata
from whalesub.kaggle.package import write_manifest
from whalesub.kaggle.upload import submit_file, upload_build

pytestmark = pytest.mark.skipif(importlib.util.find_spec("kaggle") is None,
                                reason="the kaggle client is not installed (pip install '.[kaggle]')")
CREDENTIAL_VARS = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR",
                   "XDG_CONFIG_HOME")


def make_build(root: Path) -> Path:
    """A small valid build (no real model needed to upload): models with a sub-folder, wheels, kernel."""
    kernel_py = Path(__file__).resolve().parents[1] / "whalesub" / "kaggle" / "kernel_script.py"
    (root / "models" / "fold0").mkdir(parents=True)
    (root / "models" / "fold0" / "model.onnx").write_bytes(b"\x08\x01" * 500)
    (root / "wheels").mkdir()
    (root / "wheels" / "whalesub-0.1.0-py3-none-any.whl").write_bytes(b"PK" * 100)
    refs = []
    for sub, kind in (("models", KIND_MODELS), ("wheels", KIND_WHEELS)):
        write_manifest(root / sub, kind, "0.1.0")  # the version of the fake wheel beside it
        meta = dataset_metadata("someone", f"whalesub {sub}")
        (root / sub / "dataset-metadata.json").write_text(json.dumps(meta))
        refs.append(meta["id"])
    (root / "kernel").mkdir()
    shutil.copy2(kernel_py, root / "kernel" / "whalesub_kernel.py")
    meta = kernel_metadata("someone", "whalesub inference", "whalesub_kernel.py", refs,
                           "happy-whale-and-dolphin")
    (root / "kernel" / "kernel-metadata.json").write_text(json.dumps(meta))
    return root


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    """The fake server, and an environment where the client talks only to it, as user 'someone'."""
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    for var in (*CREDENTIAL_VARS, "NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    with FakeKaggle(lifetime_s=300) as server:
        for var in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{server.port}")
        yield server


def test_new_datasets_are_created_zipped_then_the_kernel_is_pushed_and_followed(fake, tmp_path):
    build = make_build(tmp_path / "build")
    fake.kernel_status = ["RUNNING"]
    r = upload_build(build, "first", output=tmp_path / "out", interval_s=0.01)
    assert r["actions"] == {"models": "created", "wheels": "created"} and r["status"] == "COMPLETE"
    methods = fake.methods()
    assert methods.count("CreateDataset") == 2 and "CreateDatasetVersion" not in methods
    assert methods.index("SaveKernel") > max(i for i, m in enumerate(methods) if m == "CreateDataset")
    assert methods.count("GetKernelSessionStatus") == 2  # RUNNING, then COMPLETE
    uploaded = [b["name"] for m, b in fake.calls if m == "StartBlobUpload"]
    assert "fold0.zip" in uploaded  # the sub-folder travelled (as one zip), not silently skipped
    created = [b for m, b in fake.calls if m == "CreateDataset"]
    assert sorted(b["slug"] for b in created) == ["whalesub-models", "whalesub-wheels"]
    (kernel,) = [b for m, b in fake.calls if m == "SaveKernel"]
    assert kernel["slug"] == "someone/whalesub-inference"
    assert kernel["enableInternet"] is False and kernel["enableGpu"] is True
    assert sorted(kernel["datasetDataSources"]) == ["someone/whalesub-models", "someone/whalesub-wheels"]
    assert kernel["competitionDataSources"] == ["happy-whale-and-dolphin"]


def test_an_existing_slug_gets_a_new_version_and_is_polled_until_ready(fake, tmp_path):
    build = make_build(tmp_path / "build")
    fake.datasets.add("someone/whalesub-models")
    fake.dataset_status = ["ready", "blobs_received"]  # exists; then the new version is not ready once
    assert upload_dataset(build / "models", "someone/whalesub-models", "v2", 60, 0.01) == "versioned"
    methods = fake.methods()
    assert "CreateDataset" not in methods and methods.count("CreateDatasetVersion") == 1
    assert methods.count("GetDatasetStatus") == 3  # exists?, pending, ready
    (version,) = [b for m, b in fake.calls if m == "CreateDatasetVersion"]
    assert "v2" in json.dumps(version)  # the version notes travelled


def test_a_server_error_printed_with_exit_0_fails_and_nothing_follows(fake, tmp_path):
    build = make_build(tmp_path / "build")
    fake.datasets.update({"someone/whalesub-models", "someone/whalesub-wheels"})
    fake.errors["CreateDatasetVersion"] = "The dataset is locked by another upload"
    with pytest.raises(KaggleClientError) as err:
        upload_build(build, "v2", interval_s=0.01)
    assert "(exit 0)" in str(err.value) and "locked by another upload" in str(err.value)
    assert "SaveKernel" not in fake.methods()


def test_kernel_push_error_and_failed_run_are_reported(fake, tmp_path):
    from whalesub.kaggle.client import push_kernel

    build = make_build(tmp_path / "build")
    fake.errors["SaveKernel"] = "Notebook not found"
    with pytest.raises(KaggleClientError, match=r"exit 0\).*Kernel push error: Notebook not found"):
        push_kernel(build / "kernel")
    fake.kernel_status = ["ERROR"]
    with pytest.raises(KaggleClientError, match="'ERROR'.*kaggle kernels logs someone/whalesub-inference"):
        wait_kernel("someone/whalesub-inference", 60, 0.01)


def test_no_credentials_one_clear_message_and_no_call(fake, tmp_path, monkeypatch):
    from whalesub.cli import app

    build = make_build(tmp_path / "build")
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="no Kaggle credentials found.*KAGGLE_API_TOKEN"):
        upload_build(build, "v1")
    result = CliRunner().invoke(app, ["kaggle", "upload", str(build)])
    assert result.exit_code == 2 and "no Kaggle credentials found" in result.output
    assert "Traceback" not in result.output
    assert fake.calls == []
    # a dry run still checks the build, says where credentials are (none), uploads nothing
    dry = upload_build(build, "v1", dry_run=True)
    assert dry["dry_run"] and dry["credentials"].startswith("none") and fake.calls == []


def test_credentials_are_found_where_the_client_looks(tmp_path):
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    with pytest.raises(ConfigError):
        find_credentials({"HOME": str(home)})
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "kaggle.json").write_text('{"username": "a", "key": "b"}')
    assert find_credentials({"HOME": str(home), "KAGGLE_CONFIG_DIR": str(tmp_path / "cfg")}).endswith(
        "cfg/kaggle.json")
    (home / ".kaggle" / "access_token").write_text("tok")
    assert find_credentials({"HOME": str(home)}).endswith(".kaggle/access_token")
    assert find_credentials({"HOME": str(home), "KAGGLE_API_TOKEN": "t"}) == "KAGGLE_API_TOKEN"


def test_csv_submission_is_validated_first(fake, tmp_path):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "predictions": ["new_individual"] * 2}).to_csv(sample,
                                                                                              index=False)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"image": ["a.jpg"], "predictions": ["x y"]}).to_csv(bad, index=False)  # b.jpg missing
    with pytest.raises(DataError, match="b.jpg"):
        submit_file(bad, "happy-whale-and-dolphin", "m", sample)
    assert fake.calls == []
    good = tmp_path / "good.csv"
    pd.DataFrame({"image": ["b.jpg", "a.jpg"], "predictions": ["x new_individual", "y"]}).to_csv(good,
                                                                                                index=False)
    s = submit_file(good, "happy-whale-and-dolphin", "first try", sample)
    assert "Successfully submitted to happy-whale-and-dolphin" in s["submitted"]
    (sub,) = [b for m, b in fake.calls if m == "CreateSubmission"]
    assert sub["competitionName"] == "happy-whale-and-dolphin" and sub["submissionDescription"] == "first try"
