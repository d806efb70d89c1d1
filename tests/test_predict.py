"""`whalesub predict` and pooled out-of-fold tuning (`whalesub tune --run`) on a tiny 2-fold run that
the suite trains itself on synthetic data."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from oracles import assert_scores_match, map5_by_hand
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.metric import map_at_5
from whalesub.ranking.submission import score_submission
from whalesub.workflows.submit import submit_files

runner = CliRunner()
GRID = "0.0:1.0:0.05"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Synthetic data and a 2-fold run (both folds, 2 epochs, a tiny network): data, run."""
    import torch

    from train.fit import main
    from whalesub.synth import make_dataset

    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    make_dataset(data, seed=11, n_individuals=16, singleton_share=0.3, progress=False)
    args = {"train_csv": data / "train.csv", "image_dir": data / "train_images",
            "backbone": "test_efficientnet", "image_size": 32, "embed_dim": 16, "batch_size": 16, "epochs": 2,
            "num_workers": 0, "device": "cpu", "deterministic": "true", "n_folds": 2, "fold": "all",
            "out_dir": root, "run_name": "run", "arc_k": 1, "val_batch_size": 32, "tta_flip": "true"}
    level = logging.getLogger().level
    try:
        assert main([f"--{k}={v}" for k, v in args.items()]) == 0
    finally:  # training switches these on for the whole process
        torch.use_deterministic_algorithms(False)
        logging.getLogger().setLevel(level)
    return {"data": data, "run": root / "run", "root": root}


def _common(data: Path) -> list[str]:
    return ["--train-csv", str(data / "train.csv")]


def _predict_args(data: Path, out: Path, *models: Path) -> list[str]:
    return ["predict", *(a for m in models for a in ("--model", str(m))), *_common(data),
            "--train-images", str(data / "train_images"), "--test-images", str(data / "test_images"),
            "--sample", str(data / "sample_submission.csv"), "--truth", str(data / "test_truth.csv"),
            "--out", str(out), "--grid", GRID, "--workers", "0"]


@pytest.fixture(scope="module")
def predicted(trained) -> Path:
    out = trained["root"] / "pred"
    res = runner.invoke(app, _predict_args(trained["data"], out, trained["run"]))
    assert res.exit_code == 0, res.output
    assert "MAP@5" in res.stdout
    return out


# --- pooled out-of-fold tuning ------------------------------------------------------------------------
def _brute_force_fold_aps(fold: Path, label_of: dict, thresholds: np.ndarray) -> np.ndarray:
    """AP@5 [T, Q] of one fold by brute force: every cosine, best per individual, new_individual
    inserted at each threshold, AP of the written top 5 (independent of whalesub.ranking.rank/threshold)."""
    g, q = np.load(fold / "oof_gallery.npz"), np.load(fold / "oof_embeddings.npz")
    q_ids, q_vec = q["ids"], q["embeddings"].astype(np.float64)
    names = list(dict.fromkeys(q_ids.tolist()))
    q_mean = np.stack([q_vec[q_ids == n].sum(axis=0) for n in names])  # views averaged
    q_mean /= np.linalg.norm(q_mean, axis=1, keepdims=True)
    g_vec = g["embeddings"].astype(np.float64)
    g_vec /= np.linalg.norm(g_vec, axis=1, keepdims=True)
    g_lab = np.array([label_of[i] for i in g["ids"].tolist()])
    truth = pd.read_csv(fold / "oof_labels.csv", dtype=str).set_index("image")["individual_id"]
    cos = q_mean @ g_vec.T
    aps = np.zeros((thresholds.size, len(names)))
    for j, name in enumerate(names):
        best = {ind: cos[j, g_lab == ind].max() for ind in np.unique(g_lab)}
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:5]
        for t, th in enumerate(thresholds):
            labels = [ind for ind, s in ranked if np.float32(s) >= np.float32(th)] + [NEW_INDIVIDUAL]
            labels += [ind for ind, s in ranked if np.float32(s) < np.float32(th)]
            aps[t, j] = map_at_5([labels[:5]], [truth[name]])
    return aps


def test_pooled_tune_equals_brute_force_per_fold_then_concatenated(trained):
    data, run = trained["data"], trained["run"]
    res = runner.invoke(app, ["tune", "--run", str(run), *_common(data), "--grid", GRID, "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    thresholds = np.array([row["threshold"] for row in got["table"]])
    label_of = pd.read_csv(data / "train.csv", dtype=str).set_index("image")["individual_id"].to_dict()
    folds = sorted(p for p in run.glob("fold*") if p.is_dir())
    assert len(folds) == 2 and len(got["folds"]) == 2
    aps = np.concatenate([_brute_force_fold_aps(f, label_of, thresholds) for f in folds], axis=1)
    assert got["n"] == aps.shape[1] == sum(len(pd.read_csv(f / "oof_labels.csv")) for f in folds)
    np.testing.assert_allclose([row["map5"] for row in got["table"]], aps.mean(axis=1), atol=1e-9)
    best = int(np.argmax(aps.mean(axis=1)))
    assert got["best"]["threshold"] == pytest.approx(thresholds[best])
    # the reported share: pooled rows whose best individual scores below the threshold
    top1 = np.concatenate([_top1_scores(f) for f in folds])
    assert got["best"]["new_share"] == pytest.approx((top1 < np.float32(thresholds[best])).mean())


def _top1_scores(fold: Path) -> np.ndarray:
    """Best cosine of each OOF query (views averaged) over its fold's gallery."""
    g, q = np.load(fold / "oof_gallery.npz"), np.load(fold / "oof_embeddings.npz")
    names = list(dict.fromkeys(q["ids"].tolist()))
    qm = np.stack([q["embeddings"][q["ids"] == n].sum(axis=0) for n in names]).astype(np.float64)
    qm /= np.linalg.norm(qm, axis=1, keepdims=True)
    gv = g["embeddings"].astype(np.float64)
    gv /= np.linalg.norm(gv, axis=1, keepdims=True)
    return (qm @ gv.T).max(axis=1).astype(np.float32)


def test_tune_run_rejects_mixed_inputs_and_missing_folds(trained, tmp_path):
    data, run = trained["data"], trained["run"]
    res = runner.invoke(app, ["tune", "--run", str(run), "--gallery", "g.npz", *_common(data)])
    assert res.exit_code == 2 and "drop --gallery" in res.output
    res = runner.invoke(app, ["tune", "--run", str(tmp_path), *_common(data)])
    assert res.exit_code == 2 and "no fold*/ folder" in res.output
    res = runner.invoke(app, ["tune", "--gallery", "g.npz", *_common(data)])
    assert res.exit_code == 2 and "missing: --queries, --truth" in res.output


# --- predict ------------------------------------------------------------------------------------------
def test_predict_equals_the_manual_chain_byte_for_byte(trained, predicted, tmp_path):
    data, run = trained["data"], trained["run"]
    models = []
    for fold in sorted(p for p in run.glob("fold*") if p.is_dir()):
        models += ["--model", str(tmp_path / fold.name)]
        res = runner.invoke(app, ["export", str(fold), "--out", str(tmp_path / fold.name)])
        assert res.exit_code == 0, res.output
    embed = ["embed", *models, "--workers", "0"]
    res = runner.invoke(app, [*embed, "--list", str(data / "train.csv"), "--images",
                              str(data / "train_images"), "--flip-views",
                              "--out", str(tmp_path / "gallery.npz")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*embed, "--list", str(data / "sample_submission.csv"), "--images",
                              str(data / "test_images"), "--out", str(tmp_path / "test.npz")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["tune", "--run", str(run), *_common(data), "--grid", GRID, "--json"])
    share = json.loads(res.stdout)["best"]["new_share"]
    res = runner.invoke(app, ["submit", "--gallery", str(tmp_path / "gallery.npz"), "--queries",
                              str(tmp_path / "test.npz"), *_common(data), "--new-share", repr(share),
                              "--sample", str(data / "sample_submission.csv"),
                              "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.csv").read_bytes() == (predicted / "submission.csv").read_bytes()
    summary = json.loads((predicted / "predict.json").read_text())
    assert summary["new_share"] == share and summary["threshold_source"].startswith("pooled out-of-fold")
    # the score predict reports, against MAP@5 worked out by hand from the two CSV files
    assert_scores_match(summary["score"], map5_by_hand(predicted / "submission.csv", data / "test_truth.csv"))
    # export folders as --model: their out-of-fold files are found through export.json's source
    again = tmp_path / "from_exports"
    res = runner.invoke(app, _predict_args(data, again, tmp_path / "fold0", tmp_path / "fold1"))
    assert res.exit_code == 0, res.output
    assert (again / "submission.csv").read_bytes() == (predicted / "submission.csv").read_bytes()


def test_default_share_vs_best_single_fold_raw_threshold(trained, predicted, tmp_path):
    """The pooled OOF share applied to the ensemble against each fold's own best raw cosine applied to
    the same ensemble embeddings (the old recipe); scored on the synthetic test truth."""
    data = trained["data"]
    tuned = json.loads((predicted / "tune.json").read_text())
    ours = json.loads((predicted / "score.json").read_text())["map5"]
    raw = []
    for fold in tuned["folds"]:
        out = tmp_path / f"{Path(fold['fold']).name}.csv"
        submit_files(predicted / "embeddings/gallery.npz", predicted / "embeddings/test.npz",
                     data / "train.csv", fold["best"]["threshold"], out,
                     sample=data / "sample_submission.csv", progress=False)
        raw.append(score_submission(out, data / "test_truth.csv")["map5"])
    print(f"test MAP@5: pooled OOF share {ours:.4f}; single-fold raw thresholds "
          f"{[round(r, 4) for r in raw]} ({[f['best']['threshold'] for f in tuned['folds']]})")
    assert ours >= max(raw) - 1e-12


def test_rerun_reuses_everything_and_a_changed_model_recomputes(trained, predicted, tmp_path, caplog):
    import torch

    data = trained["data"]
    run, out = tmp_path / "run", tmp_path / "pred"
    shutil.copytree(trained["run"], run)
    shutil.copytree(predicted, out)  # the first run's outputs, times preserved
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".npz", ".onnx", ".json")
                   and p.name not in ("predict.json", "tune.json", "score.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    with caplog.at_level(logging.INFO):
        res = runner.invoke(app, _predict_args(data, out, run))
    assert res.exit_code == 0, res.output
    assert caplog.text.count("reusing export") == 2 and caplog.text.count("reusing embeddings") == 2
    assert "exporting " not in caplog.text and "computing embeddings" not in caplog.text
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert (out / "submission.csv").read_bytes() == (predicted / "submission.csv").read_bytes()

    ckpt = run / "fold1" / "best.pt"  # a retrained fold: other weights, same spec
    state = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name] = state["model"][name] + 0.05
    torch.save(state, ckpt)
    caplog.clear()
    with caplog.at_level(logging.INFO):  # its OOF files are the old model's: a fixed share, not theirs
        res = runner.invoke(app, [*_predict_args(data, out, run), "--new-share", "0.2"])
    assert res.exit_code == 0, res.output
    assert caplog.text.count("reusing export") == 1 and "is stale" in caplog.text
    assert "reusing embeddings" not in caplog.text and caplog.text.count("computing embeddings") == 2
    for fold, changed in (("fold0", False), ("fold1", True)):
        p = out / "models" / f"run_{fold}" / "export.json"
        assert (p.stat().st_mtime_ns != before[p]) == changed
    meta = np.load(out / "embeddings/test.npz")["meta"]
    assert json.loads(str(meta))["fingerprint"] != json.loads(
        str(np.load(predicted / "embeddings/test.npz")["meta"]))["fingerprint"]
    res = runner.invoke(app, _predict_args(data, out, run))  # the pooled share would use those OOF files
    old = json.loads(str(np.load(run / "fold1" / "oof_embeddings.npz")["meta"]))["fingerprint"]
    new = json.loads((out / "models" / "run_fold1" / "export.json").read_text())["fingerprint"]
    assert res.exit_code == 2 and f"fold {run / 'fold1'}:" in res.output
    assert old in res.output and new in res.output and old != new


def test_predict_errors_name_the_problem(tmp_path):
    data = tmp_path / "data"  # every problem below is found before any data is read
    res = runner.invoke(app, _predict_args(data, tmp_path / "o", tmp_path / "nothing"))
    assert res.exit_code == 2 and "nothing" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, [*_predict_args(data, tmp_path / "o", tmp_path), "--threshold", "0.5",
                              "--new-share", "0.2"])
    assert res.exit_code == 2 and "at most one of --threshold, --new-share and --thresholds" in res.output
    export = tmp_path / "export"  # an export folder whose checkpoint (and out-of-fold files) are elsewhere
    export.mkdir()
    manifest = {"fingerprint": "f", "source": str(tmp_path / "x/best.pt")}
    (export / "export.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, _predict_args(data, tmp_path / "o", export))
    assert res.exit_code == 2 and "none of the models has out-of-fold files" in res.output
    assert not (tmp_path / "o" / "embeddings").exists()  # said before any embedding
    (export / "export.json").write_text("{not json")
    res = runner.invoke(app, _predict_args(data, tmp_path / "o", export))
    assert res.exit_code == 2 and "export.json cannot be read" in res.output


def test_centre_blend_report_and_per_species_flow_through_predict(trained, predicted, tmp_path):
    """--knn-ratio blends with gallery-mean centres (the default --centres-from, as `submit` does);
    --centres-from head uses each export's class_centres.npz (as `submit --centres` would) or is
    refused when a head lacks an individual; --report writes a self-contained page, --thresholds
    replaces the pooled share; exports and embeddings are reused from the first predict (copied), so
    only the ranking runs again."""
    out = tmp_path / "pred"
    shutil.copytree(predicted, out)
    models = sorted((out / "models").iterdir())
    data = trained["data"]
    res = runner.invoke(app, [*_predict_args(data, out, trained["run"]), "--knn-ratio", "0.5", "--report",
                              "--new-share", "0.2"])
    assert res.exit_code == 0, res.output
    manual = tmp_path / "manual.csv"
    emb = out / "embeddings"
    submit_files(emb / "gallery.npz", emb / "test.npz", data / "train.csv", None,
                 manual, sample=data / "sample_submission.csv", new_share=0.2, knn_ratio=0.5)
    assert (out / "submission.csv").read_bytes() == manual.read_bytes()
    assert json.loads((out / "decision.json").read_text())["scoring"]["centres_from"] == "gallery"
    from whalesub.ranking.store import load_embeddings

    gallery_ids = set(pd.read_csv(out / "gallery_labels.csv")["individual_id"].astype(str))
    heads_cover = all(gallery_ids <= set(load_embeddings(m / "class_centres.npz").ids.tolist())
                      for m in models)
    head = tmp_path / "head"
    shutil.copytree(predicted, head)
    res = runner.invoke(app, [*_predict_args(data, head, trained["run"]), "--knn-ratio", "0.5",
                              "--centres-from", "head", "--new-share", "0.2"])
    if heads_cover:
        assert res.exit_code == 0, res.output
        submit_files(emb / "gallery.npz", emb / "test.npz", data / "train.csv", None, manual,
                     sample=data / "sample_submission.csv", new_share=0.2, knn_ratio=0.5, centres_from="head",
                     centres=[m / "class_centres.npz" for m in models])
        assert (head / "submission.csv").read_bytes() == manual.read_bytes()
    else:  # a fold's head never saw the individuals only in its validation part
        assert res.exit_code == 2 and "--centres-from gallery" in res.output
        assert "have no class centre" in res.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<img" in page and 'src="http' not in page and "MAP@5" in page
    species = tmp_path / "species.json"
    fold0 = trained["run"] / "fold0"
    r = runner.invoke(app, ["tune", "--gallery", str(fold0 / "oof_gallery.npz"), "--queries",
                            str(fold0 / "oof_embeddings.npz"), "--truth", str(fold0 / "oof_labels.csv"),
                            *_common(data), "--per-species", str(species), "--json"])
    assert r.exit_code == 0, r.output
    res = runner.invoke(app, [*_predict_args(data, out, trained["run"]), "--thresholds", str(species)])
    assert res.exit_code == 0, res.output
    submit_files(emb / "gallery.npz", emb / "test.npz", data / "train.csv", None,
                 manual, sample=data / "sample_submission.csv", thresholds=species)
    assert (out / "submission.csv").read_bytes() == manual.read_bytes()
    assert json.loads((out / "predict.json").read_text())["threshold_source"].startswith("--thresholds")


def test_oof_blend_tunes_on_each_folds_own_head_centres(trained, predicted, tmp_path):
    """tune --run --knn-ratio --centres-from head: a fold is blended with its checkpoint head's
    centres, the same as tuning its OOF files with the exported class_centres.npz; out-of-fold files
    of other weights (fingerprint) are refused (no silent fallback). The default source: gallery means."""
    from whalesub.ranking.store import load_embeddings, save_embeddings
    from whalesub.workflows.oof import tune_folds
    from whalesub.workflows.submit import tune_files

    data, fold0 = trained["data"], trained["run"] / "fold0"
    got = tune_folds([fold0], data / "train.csv", GRID, knn_ratio=0.5, centres_from="head")
    n_ind = pd.read_csv(data / "train.csv").set_index("image").loc[
        np.unique(load_embeddings(fold0 / "oof_gallery.npz").ids), "individual_id"].nunique()
    assert got["folds"][0]["centres"] == {"centres_from": "head", "n": n_ind}
    assert got["scoring"] == {"kind": "blend", "knn_ratio": 0.5, "centre_k": 100, "k": 100,
                              "centres_from": "head"}
    want = tune_files(fold0 / "oof_gallery.npz", fold0 / "oof_embeddings.npz", data / "train.csv",
                      fold0 / "oof_labels.csv", GRID, progress=False, knn_ratio=0.5, centres_from="head",
                      centres=[predicted / "models" / "run_fold0" / "class_centres.npz"])
    assert [r["map5"] for r in got["table"]] == pytest.approx([r["map5"] for r in want["table"]], abs=1e-12)
    stale = tmp_path / "fold0"
    stale.mkdir()
    shutil.copy(fold0 / "oof_labels.csv", stale)
    shutil.copy(fold0 / "best.pt", stale)
    for name in ("oof_gallery.npz", "oof_embeddings.npz"):
        e = load_embeddings(fold0 / name)
        save_embeddings(stale / name, e.ids, e.vectors, {**e.meta, "fingerprint": "other-weights"})
    from whalesub.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--centres-from gallery"):
        tune_folds([stale], data / "train.csv", GRID, knn_ratio=0.5, centres_from="head")
    assert tune_folds([stale], data / "train.csv", GRID, knn_ratio=0.5)["folds"][0]["centres"] == {
        "centres_from": "gallery", "n": n_ind}


# --- the out-of-fold share of new animals beside the share applied ----------------------------------------
def _oof_new_share_by_hand(run: Path) -> tuple[int, float]:
    """Queries and share of truly new animals over every fold's oof_labels.csv, counted from
    true_individual_id against that fold's own gallery images (not from the stored relabelling)."""
    folds = pd.read_csv(run / "folds.csv", dtype=str)
    label_of = dict(zip(folds["image"], folds["individual_id"], strict=True))
    n = n_new = 0
    for fold in sorted(p for p in run.glob("fold*") if p.is_dir()):
        labels = pd.read_csv(fold / "oof_labels.csv", dtype=str)
        gallery_ids = {label_of[i] for i in np.load(fold / "oof_gallery.npz")["ids"].tolist()}
        n += len(labels)
        n_new += int((~labels["true_individual_id"].isin(gallery_ids)).sum())
    return n, n_new / n


def test_predict_reports_the_oof_share_of_new_animals(trained, predicted, tmp_path):
    out = tmp_path / "pred"
    shutil.copytree(predicted, out)  # reuses exports and embeddings
    res = runner.invoke(app, _predict_args(trained["data"], out, trained["run"]))
    assert res.exit_code == 0, res.output
    n, share = _oof_new_share_by_hand(trained["run"])
    assert 0 < share < 1  # singletons make some validation animals new
    summary = json.loads((out / "predict.json").read_text())
    assert summary["oof_queries"] == n and summary["oof_new_share"] == pytest.approx(share, abs=1e-12)
    assert summary["warnings"] == []
    applied = 100 * summary["submit"]["new_first"] / summary["submit"]["rows"]
    assert f"new animals: {100 * share:.1f}% of {n} out-of-fold queries; new_individual first applied to " \
           f"{applied:.1f}% of test rows" in res.stdout


def test_oof_without_new_animals_refuses_the_pooled_share_and_warns_with_new_share(trained, predicted,
                                                                                     tmp_path):
    """Folds whose validation parts hold no new animal teach "never new_individual": the default (the
    pooled share) is refused before any work; with --new-share it runs and says so."""
    run, out = tmp_path / "run", tmp_path / "pred"
    shutil.copytree(trained["run"], run)
    for labels_path in run.glob("fold*/oof_labels.csv"):  # every new validation animal made "known"
        labels = pd.read_csv(labels_path, dtype=str)
        labels["individual_id"] = labels["true_individual_id"]
        labels.to_csv(labels_path, index=False)
    res = runner.invoke(app, _predict_args(trained["data"], out, run))
    assert res.exit_code == 2 and "hold no new animal" in res.output and "--new-share" in res.output
    assert "Traceback" not in res.output and not (out / "models").exists()  # refused before any export
    shutil.copytree(predicted, out, dirs_exist_ok=True)  # reuses exports and embeddings
    res = runner.invoke(app, [*_predict_args(trained["data"], out, run), "--new-share", "0.25"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "predict.json").read_text())
    assert summary["oof_new_share"] == 0.0 and len(summary["warnings"]) == 1
    assert "warning: the out-of-fold queries of 2 fold(s) hold no new animal" in res.stdout
    assert "new animals: 0.0% of" in res.stdout
    assert summary["submit"]["new_first"] == round(0.25 * summary["submit"]["rows"])
