"""`kneescreen evaluate` without Ray: every predictor of the tiny bundle on small labelled arrays,
the printed table and the Parquet rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from kneescreen.labels import CLASSES
from kneescreen.model.bundle import load_bundle
from kneescreen.train.evaluate import evaluate_arrays, format_table, predictor_outputs, report_rows

PREDICTORS = {"member:test_cnn-gray", "image_ensemble:soft", "covariates_only", "fused:soft", "deployed"}
N = 40


def _data(n=N, seed=0, labels=None) -> dict:
    rng = np.random.default_rng(seed)
    label = list(rng.permutation(np.arange(n) % 3)) if labels is None else list(labels)
    # Six patients in their sixties (an age band big enough to report), the rest spread out.
    ages = [62.0, 63.5, 65.0, 66.0, 68.0, 69.9] + [float(a) for a in rng.uniform(40, 95, n - 6)]
    ages[7] = None  # missing age -> that row falls back to the image ensemble
    sexes = ["F" if i % 3 else "M" for i in range(n)]
    sexes[9] = None
    return {"label": label, "age": ages, "sex": sexes,
            "images": {64: rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)}}


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def report(bundle, data):
    return evaluate_arrays(bundle, data, n_boot=100)


def test_every_predictor_is_reported(report, bundle):
    assert set(report["predictors"]) == PREDICTORS
    assert report["n"] == N
    assert report["bundle_version"] == bundle.version and bundle.version != "unsaved"


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_metrics_are_consistent(report, data, name):
    r = report["predictors"][name]
    y = np.asarray(data["label"])
    assert r["n"] == N
    cm = np.asarray(r["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == N
    assert list(cm.sum(1)) == [int((y == i).sum()) for i in range(3)]
    assert r["accuracy"] == pytest.approx(np.trace(cm) / N)
    recalls = [cm[i, i] / cm[i].sum() for i in range(3)]
    assert r["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert r["balanced_accuracy_lo"] <= r["balanced_accuracy"] <= r["balanced_accuracy_hi"]
    assert r["macro_f1_lo"] <= r["macro_f1"] <= r["macro_f1_hi"]
    assert r["accuracy_lo"] <= r["accuracy"] <= r["accuracy_hi"]
    assert 0 <= r["brier"] <= 2 and 0 <= r["ece"] <= 1
    assert set(r["per_class"]) == set(CLASSES)
    assert sum(c["support"] for c in r["per_class"].values()) == N
    for cls, c in r["per_class"].items():
        assert c["tp"] + c["tn"] + c["fp"] + c["fn"] == N, cls
        assert c["auc_lo"] <= c["auc"] <= c["auc_hi"], cls


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_low_bmd_uses_the_bundle_threshold(report, bundle, data, name):
    r = report["predictors"][name]
    assert r["low_bmd_threshold"] == pytest.approx(bundle.manifest.thresholds.low_bmd.threshold)
    y = np.asarray(data["label"])
    lb = r["low_bmd"]
    assert lb["tp"] + lb["fn"] == int((y >= 1).sum())
    assert lb["tn"] + lb["fp"] == int((y == 0).sum())


def test_low_bmd_counts_match_the_probabilities(bundle, data, report):
    probs, _ = predictor_outputs(bundle, data)["fused:soft"]
    flag = probs[:, 1] + probs[:, 2] >= 0.6
    y = np.asarray(data["label"]) >= 1
    lb = report["predictors"]["fused:soft"]["low_bmd"]
    assert (lb["tp"], lb["fp"], lb["fn"], lb["tn"]) == (int((flag & y).sum()), int((flag & ~y).sum()),
                                                        int((~flag & y).sum()), int((~flag & ~y).sum()))


def test_predictor_outputs_are_probabilities(bundle, data):
    outs = predictor_outputs(bundle, data)
    assert set(outs) == PREDICTORS
    for name, (probs, pred) in outs.items():
        assert probs.shape == (N, 3), name
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6, err_msg=name)
        assert pred.shape == (N,) and set(pred.tolist()) <= {0, 1, 2}, name


def test_fused_falls_back_to_the_image_ensemble_without_covariates(bundle, data):
    outs = predictor_outputs(bundle, data)
    fused, image = outs["fused:soft"][0], outs["image_ensemble:soft"][0]
    missing = np.array([a is None or s is None for a, s in zip(data["age"], data["sex"])])
    assert missing.sum() == 2
    np.testing.assert_allclose(fused[missing], image[missing])
    assert not np.allclose(fused[~missing], image[~missing])
    # One member, soft fusion: the ensemble is that member.
    np.testing.assert_allclose(outs["member:test_cnn-gray"][0], image, atol=1e-6)


def test_age_band_check_reports_big_bands_only(report):
    bands = report["image_ensemble_by_age_band"]
    assert "60-69" in bands and bands["60-69"]["n"] >= 6
    assert all(b["n"] >= 5 for b in bands.values())
    assert all(0 <= b["balanced_accuracy"] <= 1 for b in bands.values())


def test_report_is_json_ready(report):
    back = json.loads(json.dumps(report, default=float))
    assert set(back["predictors"]) == PREDICTORS


def test_format_table_names_every_predictor(report):
    text = format_table(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"n = {N} held-out images") and report["bundle_version"] in lines[0]
    assert "bal.acc [95% CI]" in lines[1] and "lowBMD sens" in lines[1]
    body = [line for line in lines[3:] if "minus covariates_only" not in line and "T-score" not in line]
    assert len(body) == len(PREDICTORS)
    for name in PREDICTORS:
        row = next(line for line in body if line.startswith(name))
        bal = report["predictors"][name]["balanced_accuracy"]
        assert f"{bal:.2f} [" in row, row


def test_report_rows_one_per_predictor_and_class(report):
    rows = report_rows(report)
    assert len(rows) == len(PREDICTORS) * len(CLASSES)
    assert {(r["predictor"], r["class"]) for r in rows} == {(p, c) for p in PREDICTORS for c in CLASSES}
    for r in rows:
        src = report["predictors"][r["predictor"]]
        assert r["tp"] == src["per_class"][r["class"]]["tp"]
        assert r["balanced_accuracy"] == src["balanced_accuracy"] and r["n"] == N
    table = pa.Table.from_pylist(rows)  # what `run_evaluate` writes to Parquet
    assert table.num_rows == len(rows)


def test_absent_class_still_gives_a_table(bundle):
    """A held-out split without osteoporosis: no AUC for it, but the table and rows still come out."""
    data = _data(n=30, seed=1, labels=[i % 2 for i in range(30)])
    report = evaluate_arrays(bundle, data, n_boot=50)
    assert set(report["predictors"]) == PREDICTORS
    op = report["predictors"]["fused:soft"]["per_class"]["osteoporosis"]
    assert op["support"] == 0 and op["auc"] is None
    text = format_table(report)
    assert all(name in text for name in PREDICTORS)
    assert "n/a" in text
    rows = report_rows(report)
    assert len(rows) == len(PREDICTORS) * 3
    pa.Table.from_pylist(rows)


def test_deployed_is_what_screening_writes_and_its_value_is_stated(bundle, data):
    """The tiny bundle deploys the fused model: 'deployed' equals it, and the report states
    what it (and the image alone) add over age and sex, with paired intervals."""
    outs = predictor_outputs(bundle, data)
    np.testing.assert_allclose(outs["deployed"][0], outs["fused:soft"][0])
    report = evaluate_arrays(bundle, data, n_boot=100)
    paired = report["image_value"]["paired"]
    assert set(paired) == {"image_ensemble:soft", "fused:soft", "deployed"}
    for name, diffs in paired.items():
        d = diffs["balanced_accuracy"]
        assert d["lo"] <= d["diff"] <= d["hi"], name
        assert d["diff"] == pytest.approx(report["predictors"][name]["balanced_accuracy"]
                                          - report["predictors"]["covariates_only"]["balanced_accuracy"])
    assert "minus covariates_only (paired bootstrap 95% CI)" in format_table(report)


def test_triage_zones_and_t_score_are_reported_on_held_out_rows(bundle):
    d = _data(n=60, seed=3)
    d["t_score"] = [-1.0 + 0.02 * i if i % 4 else None for i in range(60)]
    r = evaluate_arrays(bundle, d, n_boot=50)
    tri = r["triage"]
    assert tri["n"] == 60 and sum(tri[z]["n"] for z in ("rule_out", "refer", "rule_in")) == 60
    assert tri["triaged"] == pytest.approx((tri["rule_out"]["n"] + tri["rule_in"]["n"]) / 60)
    for z in ("rule_out", "rule_in"):
        if tri[z]["n"]:
            assert tri[z]["lo"] <= tri[z]["value"] <= tri[z]["hi"]
    assert tri["stated"]["rule_in"]["threshold"] == bundle.manifest.triage.rule_in.threshold
    t = r["t_score"]
    assert t["n"] == 45 and t["mae"] > 0 and 0 <= t["coverage"] <= 1 and t["coverage_lo"] <= t["coverage"]
    assert t["nominal_coverage"] == bundle.manifest.t_score.coverage and len(t["estimate"]) == 45
    json.dumps(r, default=float)
