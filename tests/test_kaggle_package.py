"""whalesub kaggle build: the files it writes, and every Kaggle metadata rule checked on them."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

import whalesub
from whalesub.core.errors import ConfigError
from whalesub.kaggle.metadata import check_build, check_dataset_metadata, check_kernel_metadata, slugify


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture()
def kernel_meta(kaggle_build):
    return _json(kaggle_build["build"] / "kernel" / "kernel-metadata.json")


@pytest.fixture()
def models_meta(kaggle_build):
    return _json(kaggle_build["build"] / "models" / "dataset-metadata.json")


def test_slugify_hand_worked():
    assert slugify("whalesub models") == "whalesub-models"
    assert slugify("  Happy Whale: B5 x 5 folds!! ") == "happy-whale-b5-x-5-folds"
    assert slugify("a__b--c") == "a-b-c"


def test_build_layout_and_what_the_files_say(kaggle_build):
    build, export = kaggle_build["build"], kaggle_build["export"]
    assert sorted(p.name for p in build.iterdir()) == ["boxes", "kernel", "models", "wheels"]
    # every export file travels, byte for byte, under fold0/
    for f in export.iterdir():
        assert (build / "models" / "fold0" / f.name).read_bytes() == f.read_bytes()
    assert {"model.onnx", "model_fp16.onnx", "model_spec.json", "export.json", "class_centres.npz"} <= {
        p.name for p in (build / "models" / "fold0").iterdir()}
    # the build's version: its whalesub wheel's, read from the wheel's own METADATA (built from this
    # checkout, so the checkout's version from git: one per commit)
    (whl,) = [p for p in (build / "wheels").iterdir() if p.suffix == ".whl"]
    with zipfile.ZipFile(whl) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        (line,) = [x for x in zf.read(meta).decode().splitlines() if x.startswith("Version: ")]
    version = line.removeprefix("Version: ")
    assert version == whalesub.__version__ and version != "0.1.0"
    # manifests: sha256 of every other file, computed here independently; the wheel's version
    for sub in ("models", "wheels", "boxes"):
        manifest = _json(build / sub / "manifest.json")
        files = {p.relative_to(build / sub).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in (build / sub).rglob("*") if p.is_file()
                 and p.name not in ("manifest.json", "dataset-metadata.json")}
        assert manifest["files"] == files and files
        assert manifest["whalesub_version"] == version
        assert manifest["kind"] == f"whalesub-{sub}"
    models = _json(build / "models" / "manifest.json")
    assert models["threshold"] == kaggle_build["threshold"]
    assert models["box_type"] == "body" and models["boxes_file"] == "boxes.csv"
    assert models["fingerprint"] == _json(export / "export.json")["fingerprint"]  # one model: its own
    # wheels: a flat folder with whalesub's wheel, which ships the kernel modules
    wheels = _json(build / "wheels" / "manifest.json")
    assert wheels["install"] == [f"whalesub=={version}"]
    assert not [p for p in (build / "wheels").iterdir() if p.is_dir()]
    names = zipfile.ZipFile(whl).namelist()
    assert "whalesub/kaggle/kernel.py" in names and "whalesub/kaggle/kernel_script.py" in names
    assert not [n for n in names if n.startswith(("train/", "tests/"))]
    # the kernel file is the packaged script
    kernel_py = Path(__file__).resolve().parents[1] / "whalesub" / "kaggle" / "kernel_script.py"
    assert (build / "kernel" / "whalesub_kernel.py").read_text() == kernel_py.read_text()


def test_a_training_run_is_exported_by_the_build(kaggle_build):
    fold = kaggle_build["build_gallery"] / "models" / "fold0"
    names = {p.name for p in fold.iterdir()}
    assert {"model.onnx", "model_fp16.onnx", "model_spec.json", "export.json"} <= names
    # the same weights: the same fingerprint as the separately exported folder (and its gallery)
    exported = _json(kaggle_build["export"] / "export.json")["fingerprint"]
    assert _json(fold / "export.json")["fingerprint"] == exported
    assert (kaggle_build["build_gallery"] / "models" / "gallery.npz").is_file()


def test_written_metadata_obeys_every_rule(kaggle_build, kernel_meta):
    build = kaggle_build["build"]
    ids = []
    for sub in ("models", "wheels", "boxes"):
        meta = _json(build / sub / "dataset-metadata.json")
        assert check_dataset_metadata(meta, sub) == []
        assert 6 <= len(meta["title"]) <= 50 and meta["id"] == f"someone/{slugify(meta['title'])}"
        assert meta["licenses"] == [{"name": "CC0-1.0"}]
        ids.append(meta["id"])
    assert check_kernel_metadata(kernel_meta, "kernel", build / "kernel") == []
    raw = (build / "kernel" / "kernel-metadata.json").read_text()
    assert '"enable_internet": false' in raw  # written explicitly (the client's default is true)
    assert kernel_meta["enable_gpu"] is True and kernel_meta["machine_shape"] == "NvidiaTeslaT4"
    assert sorted(kernel_meta["dataset_sources"]) == sorted(ids)
    assert kernel_meta["competition_sources"] == ["happy-whale-and-dolphin"]
    assert kernel_meta["id"].split("/")[1] == slugify(kernel_meta["title"])
    assert check_build(build)["kernel"] == kernel_meta["id"]


@pytest.mark.parametrize("change, needle", [
    ({"title": "short"}, "6-50 characters"),  # 5 characters
    ({"title": "x" * 51}, "6-50 characters"),
    ({"id": "someone-whalesub-models"}, "'owner/slug'"),
    ({"id": "someone/model"}, "6-50 characters of a-z"),
    ({"id": "some one/whalesub-models"}, "not a Kaggle user name"),
    ({"id": "someone/whalesub-weights"}, "differs from the slug of the title"),
    ({"licenses": []}, "exactly one"),
    ({"licenses": [{"name": "CC0-1.0"}, {"name": "MIT"}]}, "exactly one"),
    ({"licenses": {"name": "CC0-1.0"}}, "exactly one"),
    ({"licenses": [{"name": "WTFPL"}]}, "is not one of"),
    ({"title": None}, "missing key 'title'"),
    ({"licenses": None}, "missing key 'licenses'"),
])
def test_dataset_rule_broken(models_meta, change, needle):
    meta = copy.deepcopy(models_meta)
    for k, v in change.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    problems = check_dataset_metadata(meta, "models/dataset-metadata.json")
    assert any(needle in p for p in problems), problems
    assert all(p.startswith("models/dataset-metadata.json") for p in problems)


def test_dataset_title_limits_are_inclusive(models_meta):
    for n in (6, 50):
        title = "w" * n
        meta = dict(models_meta, title=title, id=f"someone/{title}")
        assert check_dataset_metadata(meta, "m") == []


@pytest.mark.parametrize("change, needle", [
    *[({k: None}, f"missing key {k!r}") for k in ("id", "title", "code_file", "language", "kernel_type")],
    ({"title": "wsub"}, "5-50 characters"),
    ({"title": "whalesub inference two"}, "differs from the slug of the title"),
    ({"language": "r"}, "must be 'python'"),
    ({"kernel_type": "app"}, "'script' or 'notebook'"),
    ({"code_file": "missing.py"}, "is not in"),
    ({"enable_internet": None}, "written explicitly as false"),
    ({"enable_internet": True}, "it must be false"),
    ({"enable_internet": "true"}, "it must be false"),
    ({"enable_gpu": False}, "enable_gpu"),
    ({"enable_gpu": None}, "enable_gpu"),
    ({"is_private": "yes"}, "must be a boolean"),
    ({"machine_shape": None}, "machine_shape"),
    ({"machine_shape": "NvidiaTeslaP100"}, "machine_shape"),
    ({"dataset_sources": ["whalesub-models"]}, "'owner/slug'"),
    ({"competition_sources": ["kaggle/happy-whale-and-dolphin"]}, "bare slug"),
    ({"competition_sources": ["https://www.kaggle.com/c/happy-whale-and-dolphin"]}, "bare slug"),
])
def test_kernel_rule_broken(kaggle_build, kernel_meta, change, needle):
    meta = copy.deepcopy(kernel_meta)
    for k, v in change.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    problems = check_kernel_metadata(meta, "kernel-metadata.json", kaggle_build["build"] / "kernel")
    assert any(needle in p for p in problems), problems


def test_kernel_booleans_as_strings_are_accepted(kaggle_build, kernel_meta):
    meta = dict(kernel_meta, enable_internet="false", enable_gpu="true", is_private="true")
    assert check_kernel_metadata(meta, "k", kaggle_build["build"] / "kernel") == []


def test_check_build_names_a_changed_file_and_foreign_sources(kaggle_build, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(kaggle_build["build"], build)
    onnx = build / "models" / "fold0" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])  # a truncated copy
    meta = _json(build / "kernel" / "kernel-metadata.json")
    meta["dataset_sources"].append("someone/other-dataset")
    (build / "kernel" / "kernel-metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        check_build(build)
    assert "model.onnx does not match its sha256" in str(err.value)
    assert "dataset_sources" in str(err.value)


def test_build_refuses_bad_input_and_writes_nothing(kaggle_build, tmp_path):
    from whalesub.kaggle.package import BuildOptions, build_package

    export = kaggle_build["export"]
    wheel = next((kaggle_build["build"] / "wheels").glob("*.whl"))
    cases = [
        (BuildOptions(owner="some one", threshold=0.3, packages=[], whalesub_wheel=wheel), "user name"),
        (BuildOptions(owner="someone", threshold=1.5, packages=[], whalesub_wheel=wheel), "outside [-1, 1]"),
        (BuildOptions(owner="someone", packages=[], whalesub_wheel=wheel), "exactly one of --threshold"),
        (BuildOptions(owner="someone", threshold=0.3, packages=["torch"], whalesub_wheel=wheel), "framework"),
        (BuildOptions(owner="someone", threshold=0.3, packages=[], whalesub_wheel=wheel, box_type="body"),
         "needs --boxes"),
        (BuildOptions(owner="someone", threshold=0.3, packages=[], whalesub_wheel=wheel, prefix="w" * 45),
         "6-50 characters"),
    ]
    for opts, needle in cases:
        out = tmp_path / "out"
        with pytest.raises(ConfigError) as err:
            build_package([export], out, opts)
        assert needle in str(err.value)
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_build_checks_a_packaged_gallery_fingerprint(kaggle_build, tmp_path):
    import numpy as np

    from whalesub.kaggle.package import BuildOptions, build_package
    from whalesub.ranking.store import save_embeddings

    wheel = next((kaggle_build["build"] / "wheels").glob("*.whl"))
    gallery = tmp_path / "gallery.npz"
    save_embeddings(gallery, np.array(["a.jpg"]), np.full((1, 32), 32 ** -0.5, np.float32),
                    {"fingerprint": "0123456789abcdef"})
    opts = BuildOptions(owner="someone", threshold=0.3, packages=[], whalesub_wheel=wheel, gallery=gallery)
    with pytest.raises(ConfigError, match="fingerprint 0123456789abcdef"):
        build_package([kaggle_build["export"]], tmp_path / "out", opts)


def test_cli_build_then_dry_run_upload(kaggle_build, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from whalesub.cli import app

    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wheel = next((kaggle_build["build"] / "wheels").glob("*.whl"))
    out = tmp_path / "b"
    args = ["kaggle", "build", str(kaggle_build["export"]), "--owner", "someone", "--threshold", "0.25",
            "--out", str(out), "--no-extra-wheels", "--whalesub-wheel", str(wheel), "--prefix", "hw b5"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "someone/hw-b5-models" in result.output and "whalesub==" in result.output
    assert json.loads((out / "models" / "manifest.json").read_text())["threshold"] == 0.25
    dry = runner.invoke(app, ["kaggle", "upload", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)
    assert plan["kernel"] == "someone/hw-b5-inference" and plan["credentials"].startswith("none")
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def _wheel_opts(kaggle_build, **kw):
    from whalesub.kaggle.package import BuildOptions

    wheel = next((kaggle_build["build"] / "wheels").glob("*.whl"))
    base = {"owner": "someone", "threshold": 0.3, "packages": [], "whalesub_wheel": wheel}
    return BuildOptions(**{**base, **kw})


def test_overwrite_replaces_a_previous_build_and_nothing_else(kaggle_build, tmp_path):
    from whalesub.kaggle.package import build_package

    out = tmp_path / "out"
    build_package([kaggle_build["export"]], out, _wheel_opts(kaggle_build))
    first = json.loads((out / "models" / "manifest.json").read_text())
    build_package([kaggle_build["export"]], out, _wheel_opts(kaggle_build, threshold=0.4), overwrite=True)
    again = json.loads((out / "models" / "manifest.json").read_text())
    assert again["threshold"] == 0.4 != first["threshold"]
    # the same inputs give the same manifests (no time stamp): a dataset that did not change reads so
    same = tmp_path / "same"
    build_package([kaggle_build["export"]], same, _wheel_opts(kaggle_build, threshold=0.4))
    for sub in ("models", "wheels"):
        assert (same / sub / "manifest.json").read_bytes() == (out / sub / "manifest.json").read_bytes()
    shutil.rmtree(same)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no old copy or temporary folder left
    # a folder that is not (only) a build is never deleted, even with --overwrite
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        build_package([kaggle_build["export"]], out, _wheel_opts(kaggle_build), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "models" / "manifest.json").is_file()
    other = tmp_path / "export_copy"
    shutil.copytree(kaggle_build["export"], other)
    with pytest.raises(ConfigError, match="holds class_centres.npz, export.json"):
        build_package([kaggle_build["export"]], other, _wheel_opts(kaggle_build), overwrite=True)
    (tmp_path / "half" / "models").mkdir(parents=True)  # looks like a build but has no kernel
    with pytest.raises(ConfigError, match="has no kernel/kernel-metadata.json"):
        build_package([kaggle_build["export"]], tmp_path / "half", _wheel_opts(kaggle_build), overwrite=True)
    assert (other / "export.json").is_file()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        build_package([kaggle_build["export"]], a_file, _wheel_opts(kaggle_build))


def test_fp16_build_of_an_fp32_only_export_is_refused_at_build_time(kaggle_build, tmp_path):
    from whalesub.kaggle.package import build_package
    from whalesub.models.export import export_model

    fp32 = tmp_path / "fp32_only"
    export_model(kaggle_build["root"] / "run", fp32, fp16=False)
    with pytest.raises(ConfigError, match="no FP16 graph") as err:
        build_package([fp32], tmp_path / "out", _wheel_opts(kaggle_build, fp16=True))
    assert str(fp32) in str(err.value) and not (tmp_path / "out").exists()


def test_wheels_from_takes_the_highest_version_the_spec_allows(tmp_path):
    """PEP 440 order, not file-name order (1.9.0 sorts after 1.26.0 by name)."""
    from whalesub.kaggle.wheels import pick_wheel

    names = ["onnxruntime_gpu-1.9.0-cp311-cp311-manylinux_2_28_x86_64.whl",
             "onnxruntime_gpu-1.26.0-cp311-cp311-manylinux_2_28_x86_64.whl",
             "onnxruntime_gpu-1.27.0-cp311-cp311-manylinux_2_28_x86_64.whl",
             "faiss_gpu_cu12-1.14.1-cp311-cp311-manylinux_2_28_x86_64.whl"]
    wheels = [tmp_path / n for n in sorted(names)]
    assert pick_wheel("onnxruntime-gpu<1.27", wheels, tmp_path).name == names[1]
    assert pick_wheel("onnxruntime-gpu", wheels, tmp_path).name == names[2]
    assert pick_wheel("onnxruntime_gpu==1.9.0", wheels, tmp_path).name == names[0]
    with pytest.raises(ConfigError, match="1.9.0, 1.26.0, 1.27.0"):
        pick_wheel("onnxruntime-gpu>=2", wheels, tmp_path)
    with pytest.raises(ConfigError, match="no wheel of 'numpy'"):
        pick_wheel("numpy", wheels, tmp_path)
    twin = [*wheels, tmp_path / "onnxruntime_gpu-1.27.0-cp312-cp312-manylinux_2_28_x86_64.whl"]
    with pytest.raises(ConfigError, match="2 wheels of onnxruntime-gpu 1.27.0"):
        pick_wheel("onnxruntime-gpu", twin, tmp_path)


def test_a_packaged_gallery_must_have_the_queries_precision(kaggle_build, tmp_path):
    """The reference gallery was embedded at FP32: an --fp16 build would rank FP16 queries against it."""
    from whalesub.kaggle.package import build_package

    opts = _wheel_opts(kaggle_build, box_type="body", boxes=kaggle_build["data"] / "boxes.csv", batch_size=8,
                       gallery=kaggle_build["reference"] / "gallery.npz")
    with pytest.raises(ConfigError, match="embedded at fp32 but the queries are embedded at fp16"):
        build_package([kaggle_build["export"]], tmp_path / "fp16", replace(opts, fp16=True))
    assert not (tmp_path / "fp16").exists()
    build_package([kaggle_build["export"]], tmp_path / "fp32", opts)  # the same gallery at FP32 is fine


def test_the_kernel_script_comes_from_the_packaged_wheel(kaggle_build, tmp_path):
    """The kernel runs the wheel's whalesub.kaggle.kernel: its script must be that wheel's too, not
    the file of the whalesub running the build (another commit with --whalesub-wheel)."""
    from whalesub.kaggle.package import build_package

    wheel = next((kaggle_build["build"] / "wheels").glob("*.whl"))
    other = tmp_path / "wheel" / wheel.name
    other.parent.mkdir()
    marker = b"\n# from the other commit's wheel\n"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data + marker if item.filename == "whalesub/kaggle/kernel_script.py" else data)
    build_package([kaggle_build["export"]], tmp_path / "out", _wheel_opts(kaggle_build, whalesub_wheel=other))
    assert (tmp_path / "out" / "kernel" / "whalesub_kernel.py").read_bytes().endswith(marker)
    bare = tmp_path / "bare" / wheel.name
    bare.parent.mkdir()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bare, "w") as dst:
        for item in src.infolist():
            if item.filename != "whalesub/kaggle/kernel_script.py":
                dst.writestr(item, src.read(item))
    with pytest.raises(ConfigError, match="has no whalesub/kaggle/kernel_script.py"):
        build_package([kaggle_build["export"]], tmp_path / "o2",
                      _wheel_opts(kaggle_build, whalesub_wheel=bare))
