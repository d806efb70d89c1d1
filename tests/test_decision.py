"""decision.json: one decision from `whalesub predict` through `report --decision` to the Kaggle kernel.

The proof tests train a tiny 2-fold run, predict with ``--knn-ratio 0.5`` (pooled out-of-fold share,
then per-species thresholds), check that the report analyses exactly the submitted ranking (its
MAP@5 at the chosen threshold equals the submission CSV scored here by hand), and that the offline
kernel of ``whalesub kaggle build --predict OUT`` writes predict's submission row for row.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_kaggle_kernel import LAYOUTS, _unshare_works, mount, run_kernel_script
from test_predict import _common, _predict_args, runner, trained  # noqa: F401  (trained: a fixture)

from whalesub.cli import app
from whalesub.core.errors import ConfigError, DataError
from whalesub.workflows.decision import (
    read_decision,
    read_stamp,
    same_scoring,
    scoring_of,
    stamp_of,
    write_decision,
)

NEW = "new_individual"


# --- the file itself: hand-made decisions -----------------------------------------------------------
def _decision() -> dict:
    return {"format": "whalesub.decision", "version": 1,
            "models": [{"name": "m0", "fingerprint": "f0", "export": "models/m0"},
                       {"name": "m1", "fingerprint": "f1", "export": "../elsewhere/m1"}],
            "fingerprint": "ff",
            "embed": {"backend": "onnx", "fp16": False, "box_type": None, "box_conf": None,
                      "boxes_sha256": None},
            "gallery": {"file": "embeddings/gallery.npz", "labels": "gallery_labels.csv", "tta": "none",
                        "flip_views": True, "images": "abc", "n": 3},
            "queries": {"tta": "flip", "flip_views": False}, "k": 50,
            "scoring": scoring_of(0.5, None, ["models/m0/class_centres.npz", "models/m1/class_centres.npz"],
                                  "head"),
            "new_individual": {"rule": "per_species", "default": 0.4, "species": {"beluga": 0.6},
                               "tuned_on": {"kind": "blend", "knn_ratio": 0.5, "centre_k": None, "k": 50,
                                            "centres_from": "head"}}}


def test_decision_round_trip(tmp_path):
    path = write_decision(tmp_path / "decision.json", _decision())
    assert read_decision(path) == _decision()
    assert read_decision(tmp_path) == _decision()  # the folder finds its decision.json


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(version=2), "'version' must be 1"),
    (lambda d: d.pop("k"), "'k' is missing"),
    (lambda d: d["scoring"]["centres"].pop(), "'scoring.centres' must name one class_centres.npz per model"),
    (lambda d: d["scoring"].update(knn_ratio=1.5), "'scoring.knn_ratio' must be a finite number"),
    (lambda d: d["scoring"].update(centres_from="mean"), "'scoring.centres_from' must be one of"),
    (lambda d: d["scoring"].update(centres_from="gallery"), "'scoring.centres' must be empty"),
    (lambda d: d["new_individual"]["tuned_on"].update(centres_from="x"),
     "'new_individual.tuned_on.centres_from'"),
    (lambda d: d["new_individual"].update(rule="magic"), "'new_individual.rule' must be one of"),
    (lambda d: d["new_individual"]["species"].update(beluga="high"), "'new_individual.species.beluga'"),
    (lambda d: d["embed"].update(box_type="body"), "'embed.boxes_sha256' is needed"),
    (lambda d: d["gallery"].update(flip_views="yes"), "'gallery.flip_views'"),
    (lambda d: d["models"][1].pop("fingerprint"), "'models[1].fingerprint' is missing"),
])
def test_bad_decision_names_the_key_and_the_file(tmp_path, change, needle):
    doc = _decision()
    change(doc)
    path = tmp_path / "decision.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="decision file") as err:
        read_decision(path)
    assert needle in str(err.value) and str(path) in str(err.value)
    with pytest.raises(DataError):  # and nothing is written
        write_decision(tmp_path / "new.json", doc)
    assert not (tmp_path / "new.json").exists()


def test_scoring_stamps():
    assert read_stamp({"best": {}}) == {"kind": "knn", "knn_ratio": 1.0, "centre_k": None, "k": None}
    blend = {"kind": "blend", "knn_ratio": 0.5, "centre_k": 20, "k": 100, "centres_from": "head"}
    assert read_stamp({"scoring": blend}) == blend
    old = {k: v for k, v in blend.items() if k != "centres_from"}  # before --centres-from: the heads'
    assert read_stamp({"scoring": old}) == blend
    assert read_stamp({"scoring": {"kind": "blend", "knn_ratio": 1.0, "k": 7}})["kind"] == "knn"
    scoring = scoring_of(0.5, 20, ["a.npz"], "head")
    assert stamp_of(scoring, 100) == blend and same_scoring(blend, scoring, 100)
    gallery = scoring_of(0.5, 20, ["a.npz"])  # the default source: no centre files kept
    assert gallery["centres_from"] == "gallery" and gallery["centres"] == []
    assert not same_scoring(blend, gallery, 100)
    assert not same_scoring(read_stamp({"scoring": old}), gallery, 100)
    assert same_scoring(stamp_of(gallery, 100), gallery, 100)
    assert not same_scoring(read_stamp(None), scoring, 100)  # tuned on kNN, ranked by the blend
    assert not same_scoring(blend, scoring_of(1.0), 100) and same_scoring(None, scoring, 100)
    assert not same_scoring({**blend, "k": 50}, scoring, 100)


# --- the proof on a tiny trained run -------------------------------------------------------------------
def _map5_by_hand(submission: Path, truth: Path) -> float:
    """MAP@5 of a submission CSV, written here independently of whalesub.ranking.metric."""
    sub = pd.read_csv(submission, dtype=str, keep_default_na=False).set_index("image")["predictions"]
    want = pd.read_csv(truth, dtype=str).set_index("image")["individual_id"]
    aps = []
    for image, answer in want.items():
        labels = sub[image].split()[:5]
        aps.append(1.0 / (labels.index(answer) + 1) if answer in labels else 0.0)
    return float(np.mean(aps))


@pytest.fixture(scope="module")
def blend(trained) -> Path:  # noqa: F811
    """predict with --knn-ratio 0.5 and the pooled out-of-fold share."""
    out = trained["root"] / "blend"
    res = runner.invoke(app, [*_predict_args(trained["data"], out, trained["run"]), "--knn-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """whalesub's wheel, built once from this checkout (the kernel installs it offline)."""
    from whalesub.kaggle.wheels import collect_wheels

    folder = tmp_path_factory.mktemp("wheel")
    collect_wheels([], folder)
    return next(folder.glob("whalesub-*.whl"))


@pytest.mark.slow  # trains a tiny 2-fold run (module fixture)
def test_predict_writes_what_it_submitted(trained, blend, tmp_path):  # noqa: F811
    d = read_decision(blend / "decision.json")
    assert d["scoring"]["kind"] == "blend" and d["scoring"]["knn_ratio"] == 0.5
    assert d["scoring"]["centres_from"] == "gallery" and d["scoring"]["centres"] == []  # the default
    rule = d["new_individual"]
    tuned = json.loads((blend / "tune.json").read_text())
    assert rule["rule"] == "share" and rule["new_share"] == tuned["best"]["new_share"]
    # the pooled share was tuned on the submitted scoring (tune.json's stamp: the same blend)
    assert rule["oof_share"]["folds"] == 2 and rule["tuned_on"]["kind"] == "blend"
    assert rule["tuned_on"]["knn_ratio"] == 0.5 and tuned["scoring"]["knn_ratio"] == 0.5
    assert (d["gallery"]["tta"], d["gallery"]["flip_views"], d["queries"]["tta"]) == ("none", True, "flip")
    train = pd.read_csv(trained["data"] / "train.csv")
    assert d["gallery"]["n"] == len(train)
    # the decision alone (a fresh folder) gives predict's submission byte for byte
    from whalesub.workflows.predict import predict_from_decision

    data = trained["data"]
    r = predict_from_decision(blend / "decision.json", data / "test_images", tmp_path / "applied",
                              sample=data / "sample_submission.csv", train_csv=data / "train.csv", workers=0,
                              truth=data / "test_truth.csv")
    assert (tmp_path / "applied" / "submission.csv").read_bytes() == (blend / "submission.csv").read_bytes()
    by_hand = _map5_by_hand(blend / "submission.csv", data / "test_truth.csv")
    assert r["score"]["map5"] == pytest.approx(by_hand, abs=1e-12)


def _check_report_is_the_submission(out: Path, data: Path, tmp_path: Path) -> dict:
    """The report of ``--decision``: its MAP@5 at the chosen threshold (curve), its table and its
    gallery rows are those of the submission CSV, scored here by hand."""
    from whalesub.report.build import write_report

    want = _map5_by_hand(out / "submission.csv", data / "test_truth.csv")
    rep = write_report(tmp_path / "report.html", None, out / "embeddings" / "test.npz", None,
                       truth=data / "test_truth.csv", decision=out / "decision.json", max_queries=1000,
                       progress=False)
    assert rep["scores"]["map5"] == pytest.approx(want, abs=1e-12)
    assert rep["threshold"]["map5"] == pytest.approx(want, abs=1e-12)
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False).set_index("image")
    assert rep["shown"] == len(sub)
    for row in rep["rows"]:
        assert [c["label"] for c in row["cells"]] == sub.loc[row["image"], "predictions"].split()
    # the CLI writes the same page from the decision alone
    res = runner.invoke(app, ["report", "--queries", str(out / "embeddings" / "test.npz"), "--decision",
                              str(out / "decision.json"), "--truth", str(data / "test_truth.csv"),
                              "--out", str(tmp_path / "cli.html")])
    assert res.exit_code == 0, res.output
    return rep


@pytest.mark.slow  # trains a tiny 2-fold run (module fixture)
def test_report_of_a_blend_submission_is_that_submission(trained, blend, tmp_path):  # noqa: F811
    rep = _check_report_is_the_submission(blend, trained["data"], tmp_path)
    d = read_decision(blend / "decision.json")
    assert rep["scoring"] == d["scoring"] and "decision" in rep["threshold"]["source"]
    new_first = pd.read_csv(blend / "submission.csv")["predictions"].str.startswith(NEW).mean()
    assert new_first == pytest.approx(d["new_individual"]["new_share"], abs=1 / 40)


def _kernel_submission(build: Path, data: Path, tmp_path: Path) -> pd.DataFrame:
    reason = _unshare_works()
    if reason:
        pytest.skip(f"offline rehearsal needs a network namespace: {reason}")
    root = mount(tmp_path / "input", LAYOUTS["nested"], data, build, skip=("boxes",))
    working = tmp_path / "working"
    proc = run_kernel_script(build / "kernel" / "whalesub_kernel.py", root, working, tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "predict from decision" in proc.stdout and "embed train images" not in proc.stdout
    return pd.read_csv(working / "submission.csv", dtype=str, keep_default_na=False)


def _build(out: Path, dest: Path, wheel: Path) -> Path:
    from whalesub.kaggle.package import BuildOptions, build_package

    build_package([], dest, BuildOptions(owner="someone", predict=out, packages=[], whalesub_wheel=wheel))
    return dest


@pytest.mark.slow  # trains a tiny 2-fold run (module fixture)
def test_offline_kernel_equals_predict_blend_and_pooled_share(trained, blend, wheel, tmp_path):  # noqa: F811
    build = _build(blend, tmp_path / "build", wheel)
    manifest = json.loads((build / "models" / "manifest.json").read_text())
    packed = read_decision(build / "models" / "decision.json")
    assert manifest["decision"] == "decision.json" and packed["scoring"]["centres_from"] == "gallery"
    assert packed["scoring"]["centres"] == []
    assert (build / "models" / "gallery.npz").read_bytes() == (blend / "embeddings/gallery.npz").read_bytes()
    got = _kernel_submission(build, trained["data"], tmp_path)
    want = pd.read_csv(blend / "submission.csv", dtype=str, keep_default_na=False)
    # the share's threshold places new_individual in these rows (this tiny run's pooled share may be 0)
    assert want["predictions"].str.contains(NEW).any()
    pd.testing.assert_frame_equal(got, want)


@pytest.mark.slow  # trains a tiny 2-fold run (module fixture)
def test_per_species_thresholds_report_and_kernel(trained, blend, wheel, tmp_path):  # noqa: F811
    data, fold0 = trained["data"], trained["run"] / "fold0"
    species = tmp_path / "species.json"
    res = runner.invoke(app, ["tune", "--gallery", str(fold0 / "oof_gallery.npz"), "--queries",
                              str(fold0 / "oof_embeddings.npz"), "--truth", str(fold0 / "oof_labels.csv"),
                              *_common(data), "--per-species", str(species), "--json", "--knn-ratio", "0.5"])
    assert res.exit_code == 0, res.output  # tuned on the scoring predict submits with (stamped)
    doc = json.loads(species.read_text())
    assert doc["scoring"]["knn_ratio"] == 0.5 and doc["scoring"]["centres_from"] == "gallery"
    # thresholds among the blend's top-1 scores (this tiny run's OOF ones put no row first), one per species
    from whalesub.workflows.submit import submit_files

    emb, cand = blend / "embeddings", tmp_path / "cand.csv"
    submit_files(emb / "gallery.npz", emb / "test.npz", data / "train.csv", None, tmp_path / "s.csv",
                 sample=data / "sample_submission.csv", new_share=0.5, knn_ratio=0.5, candidates_out=cand)
    top1 = pd.read_csv(cand).query("rank == 1")["score"].to_numpy()
    names = sorted(doc["species"])
    qs = np.quantile(top1, np.linspace(0.3, 0.7, max(len(names), 2)))
    doc["species"] = {s: round(float(q), 6) for s, q in zip(names, qs, strict=False)}
    doc["global"] = round(float(np.median(top1)), 6)
    species.write_text(json.dumps(doc))
    out = tmp_path / "pred"
    shutil.copytree(blend, out)
    res = runner.invoke(app, [*_predict_args(data, out, trained["run"]), "--knn-ratio", "0.5",
                              "--thresholds", str(species)])
    assert res.exit_code == 0, res.output
    rule = read_decision(out / "decision.json")["new_individual"]
    assert rule["rule"] == "per_species" and rule["default"] == doc["global"]
    assert rule["species"] == {s: pytest.approx(v) for s, v in doc["species"].items()}
    rep = _check_report_is_the_submission(out, data, tmp_path)
    assert "per-species" in rep["threshold"]["source"]
    got = _kernel_submission(_build(out, tmp_path / "build", wheel), data, tmp_path)
    want = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    assert 0 < want["predictions"].str.startswith(NEW).sum() < len(want)
    pd.testing.assert_frame_equal(got, want)


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.slow  # trains a tiny 2-fold run (module fixture)
def test_a_gallery_is_checked_against_train_csv_and_settings(trained, blend, tmp_path):  # noqa: F811
    from whalesub.ranking.store import load_embeddings
    from whalesub.workflows.predict import check_gallery_embeddings, predict_from_decision

    data = trained["data"]
    train = pd.read_csv(data / "train.csv")
    fewer = tmp_path / "train.csv"
    train.iloc[1:].to_csv(fewer, index=False)
    with pytest.raises(DataError, match="was not embedded from the images of"):
        predict_from_decision(blend, data / "test_images", tmp_path / "x", train_csv=fewer)
    assert not (tmp_path / "x" / "submission.csv").exists()
    # test embeddings as the gallery: the fingerprint matches, the views and the images do not
    d = read_decision(blend / "decision.json")
    test = load_embeddings(blend / "embeddings" / "test.npz")
    with pytest.raises(DataError) as err:
        check_gallery_embeddings(test, fingerprint=d["fingerprint"], flip_views=True, tta="none",
                                 box_type=None, listing=train["image"].tolist())
    assert "view(s) per image" in str(err.value) and "not those of train.csv" in str(err.value)
    # ... and a --threshold build refuses them as its packaged gallery
    from whalesub.kaggle.package import BuildOptions, build_package

    opts = BuildOptions(owner="someone", threshold=0.3, packages=[],
                        gallery=blend / "embeddings" / "test.npz")
    with pytest.raises(ConfigError, match="view"):
        build_package(sorted((blend / "models").iterdir()), tmp_path / "b", opts)
    assert not (tmp_path / "b").exists()
    # a decision whose gallery file was replaced by the test embeddings
    fake = tmp_path / "fake"
    shutil.copytree(blend, fake)
    shutil.copy2(fake / "embeddings" / "test.npz", fake / "embeddings" / "gallery.npz")
    with pytest.raises(DataError, match="gallery"):
        predict_from_decision(fake, data / "test_images", tmp_path / "y")


@pytest.mark.slow  # trains a tiny 2-fold run (module fixture)
def test_threshold_json_is_refused_where_it_would_mislead(blend, tmp_path):
    from whalesub.kaggle.package import BuildOptions, resolve_threshold

    def resolve(path: Path) -> float:
        return resolve_threshold(BuildOptions(owner="someone", threshold_json=path))

    with pytest.raises(ConfigError, match="pooled out-of-fold"):
        resolve(blend / "tune.json")
    with pytest.raises(ConfigError, match="--predict"):
        resolve(blend / "predict.json")
    stamped = tmp_path / "tune.json"
    blend_stamp = {"kind": "blend", "knn_ratio": 0.5, "centre_k": None, "k": 100}
    stamped.write_text(json.dumps({"best": {"threshold": 0.4}, "scoring": blend_stamp}))
    with pytest.raises(ConfigError, match="centre blend"):
        resolve(stamped)
    stamped.write_text(json.dumps({"best": {"threshold": 0.4}, "scoring": {"kind": "knn", "k": 100}}))
    assert resolve(stamped) == 0.4
    stamped.write_text(json.dumps({"best": {"threshold": 0.4}, "scoring": {"kind": "knn", "k": 50}}))
    with pytest.raises(ConfigError, match="pass --k 50"):
        resolve(stamped)
    assert resolve_threshold(BuildOptions(owner="someone", threshold_json=stamped, k=50)) == 0.4
    # --predict with models or a threshold: refused before anything is written
    from whalesub.kaggle.package import build_package

    with pytest.raises(ConfigError, match="as it is"):
        build_package([], tmp_path / "b", BuildOptions(owner="someone", predict=blend, threshold=0.3,
                                                       packages=[]))
    # settings the decision fixes are refused, not silently replaced by the decision's
    k = read_decision(blend / "decision.json")["k"]
    for extra, name in (({"k": k + 3}, "--k"), ({"box_conf": 0.123}, "--box-conf")):
        with pytest.raises(ConfigError, match=f"{name}: with --predict the embed settings come from"):
            build_package([], tmp_path / "b", BuildOptions(owner="someone", predict=blend, packages=[],
                                                           **extra))
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # trains a tiny 2-fold run (module fixture)
def test_decision_paths_survive_a_moved_folder(blend, tmp_path):
    """Paths are relative: a copied predict folder is a complete decision (exports inside it)."""
    moved = tmp_path / "moved"
    shutil.copytree(blend, moved)
    d = read_decision(moved / "decision.json")
    assert all(not Path(m["export"]).is_absolute() for m in d["models"])
    from whalesub.workflows.predict import check_gallery

    assert check_gallery(d, moved / "decision.json") == (moved / "embeddings" / "gallery.npz").resolve()
    broken = copy.deepcopy(d)
    broken["gallery"]["images"] = "0" * 64
    write_decision(moved / "decision.json", broken)
    with pytest.raises(DataError, match="other images"):
        check_gallery(broken, moved / "decision.json")
