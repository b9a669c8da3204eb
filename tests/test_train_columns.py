"""Training's columnar code gives exactly what the per-row code it replaced gave.

The split read as Arrow columns (`train.split_table`), the vectorised helpers (`labels.to_floats`,
`labels.age_bands`, `covariates.sex_codes` / `covariate_features`) and the bootstrap that shares
resamples and counts instead of sorting (`metrics.ResampledAuc`) are checked against the row
versions (kept here as references) on small inputs with ties, missing values and odd text: the
deployed choice and every reported number must not move.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kneescreen import metrics
from kneescreen.data.split.run import load_split
from kneescreen.labels import CLASSES, age_band, age_bands, to_float, to_floats
from kneescreen.model import ensemble, selection
from kneescreen.model.covariates import _sex_code, covariate_features, sex_codes
from kneescreen.train.run import training_fingerprint
from kneescreen.train.split_table import decode_inputs, load_split_table, rows_to_columns, split_columns, split_fingerprint

SPLIT_CSV = (
    "\ufeffkey,uri,label,patient,t_score,age,sex,pixel_hash,group,split,fold\n"
    "b/2.png,/x/b/2.png,osteopenia,P2,-1.7,61.5,F,hh,2,train,1\n"
    "a/1.png,/x/a/1.png,normal,P1,,,,,1,val,0\n"
    '"c,3.png","/x/c,3.png",osteoporosis,P3,-2.9,80,M,aa,3,test,2\n'
    "a/0.png,/x/a/0.png,normal,P1,0.4,nan,female,hh,1,train,0\n"
    "d/4.png,/x/d/4.png,osteopenia,P4,abc,49.99,x,,4,train,1\n"
)


# ---- the row versions this change replaced (references) ------------------------------------------
def _items_before(rows):
    """What `load_training_data` built per row before: Ray Data input items."""
    return [{"row": i, "uri": r["uri"], "key": r["key"], "label": CLASSES.index(r["label"]),
             "row_age": np.nan if r.get("age") is None else float(r["age"]), "row_sex": r.get("sex") or "",
             "row_t": np.nan if r.get("t_score") is None else float(r["t_score"]),
             "split": r["split"], "fold": int(r["fold"])}
            for i, r in enumerate(sorted(rows, key=lambda r: r["key"]))]


def _covariate_features_before(ages, sexes, age_mean=65.0, age_sd=12.0):
    rows, imputed = [], []
    for age, sex in zip(ages, sexes):
        a = None if age is None or (isinstance(age, float) and np.isnan(age)) else float(age)
        s = _sex_code(sex)
        rows.append([0.0 if a is None else (a - age_mean) / age_sd, 1.0 if s == "F" else 0.0 if s == "M" else 0.5,
                     float(a is None), float(s is None)])
        imputed.append(a is None or s is None)
    return np.asarray(rows, float), np.asarray(imputed, bool)


def _bootstrap_before(fn, n, seed, *arrays):
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
        v = fn(*(a[idx] for a in arrays))
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            vals.append(v)
    if len(vals) < n * 0.5:
        return None, None
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def _report_before(y, probs, classes, pred=None, n_boot=1000, seed=0):
    """`classification_report`'s intervals as they were computed: one bootstrap per statistic."""
    y, probs = np.asarray(y, int), np.asarray(probs, float)
    pred = probs.argmax(1) if pred is None else np.asarray(pred, int)
    k = len(classes)
    out = {"balanced_accuracy": _bootstrap_before(
        lambda a, b: metrics.balanced_accuracy_of(metrics.confusion_matrix(a, b, k)), n_boot, seed, y, pred),
        "macro_f1": _bootstrap_before(lambda a, b: metrics.macro_f1(a, b, k), n_boot, seed, y, pred)}
    for i, name in enumerate(classes):
        out[name] = _bootstrap_before(metrics.roc_auc, n_boot, seed, y == i, probs[:, i])
    return out


def _paired_before(y_true, probs_a, probs_b, n_boot=2000, seed=0):
    """`paired_bootstrap` as it was: every metric recomputed from the resampled rows."""
    y, a, b = np.asarray(y_true, int), np.asarray(probs_a, float), np.asarray(probs_b, float)
    point_a, point_b = metrics._paired_metrics(y, a), metrics._paired_metrics(y, b)
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in point_a}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        ma, mb = metrics._paired_metrics(y[idx], a[idx]), metrics._paired_metrics(y[idx], b[idx])
        for m in draws:
            if ma[m] is not None and mb[m] is not None and not (math.isnan(ma[m]) or math.isnan(mb[m])):
                draws[m].append(ma[m] - mb[m])
    out = {}
    for m, d in draws.items():
        ok = point_a[m] is not None and point_b[m] is not None and len(d) >= n_boot * 0.5
        better = np.asarray(d) < 0 if m == "brier" else np.asarray(d) > 0
        out[m] = {"a": point_a[m], "b": point_b[m], "diff": point_a[m] - point_b[m] if ok else None,
                  "lo": float(np.percentile(d, 2.5)) if ok else None, "hi": float(np.percentile(d, 97.5)) if ok else None,
                  "p_a_better": float(better.mean()) if ok else None}
    return out


def _report_with_row_bootstrap(y, probs, classes, pred=None, n_boot=1000, seed=0):
    """`classification_report` with its intervals from the per-statistic row bootstrap."""
    r = metrics.classification_report(y, probs, classes, pred=pred, n_boot=1, seed=seed)
    before = _report_before(y, probs, classes, pred=pred, n_boot=n_boot, seed=seed)
    r["balanced_accuracy_lo"], r["balanced_accuracy_hi"] = before["balanced_accuracy"]
    r["macro_f1_lo"], r["macro_f1_hi"] = before["macro_f1"]
    for c in classes:
        r["per_class"][c]["auc_lo"], r["per_class"][c]["auc_hi"] = before[c]
    return r


def _data(n, seed, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p = rng.dirichlet([1, 1, 1], n) + np.eye(3)[y] * 0.3
    p /= p.sum(1, keepdims=True)
    if ties:  # rounded scores: many tied values, as calibrated small-data probabilities have
        p = np.round(p, 1) + 1e-3
        p /= p.sum(1, keepdims=True)
    return y, p


# ---- the split as columns --------------------------------------------------------------------------
@pytest.fixture()
def split_dir(tmp_path):
    (tmp_path / "split.csv").write_text(SPLIT_CSV, encoding="utf-8")
    return str(tmp_path)


def test_split_columns_parse_as_load_split_rows(split_dir):
    rows = load_split(split_dir)
    cols = split_columns(load_split_table(split_dir))
    for name in rows[0]:
        got = list(cols[name])
        want = [r[name] for r in rows]
        if name in ("age", "t_score"):
            assert [None if np.isnan(v) else v for v in got] == want, name
        else:
            assert got == want, name
    assert cols["key"][2] == "c,3.png" and cols["sex"][1] is None and np.isnan(cols["age"][3])


def test_split_fingerprint_equals_the_row_fingerprint(split_dir):
    first = split_fingerprint(load_split_table(split_dir))
    assert first == training_fingerprint(load_split(split_dir))
    with open(f"{split_dir}/split.csv", "w", encoding="utf-8") as fh:  # one label changed: another print
        fh.write(SPLIT_CSV.replace("osteopenia,P4", "normal,P4"))
    assert split_fingerprint(load_split_table(split_dir)) == training_fingerprint(load_split(split_dir)) != first


def test_decode_inputs_equal_the_row_items(split_dir):
    rows = load_split(split_dir)
    want = _items_before(rows)
    for got in (decode_inputs(split_columns(load_split_table(split_dir))).to_pylist(),
                decode_inputs(rows_to_columns(rows)).to_pylist()):
        assert [list(g) for g in got] == [list(w) for w in want]  # same columns, same order
        for g, w in zip(got, want):
            for k, v in w.items():
                assert (np.isnan(v) and np.isnan(g[k])) if isinstance(v, float) and np.isnan(v) else g[k] == v, k


def test_only_asked_splits_are_read_and_unknown_labels_are_refused(split_dir):
    assert sorted(load_split_table(split_dir, splits=("test", "val"))["key"].to_pylist()) == ["a/1.png", "c,3.png"]
    with open(f"{split_dir}/split.csv", "a", encoding="utf-8") as fh:
        fh.write("e/5.png,/x/e/5.png,osteopaenia,P5,,,,,5,train,0\n")
    with pytest.raises(ValueError, match="osteopaenia"):
        decode_inputs(split_columns(load_split_table(split_dir)))


# ---- vectorised helpers ----------------------------------------------------------------------------
ODD = [None, 1.0, "2.5", " 3 ", "x", "", float("nan"), "inf", 4, np.float64(70.2), "NaN"]


def test_to_floats_is_to_float_per_value():
    got = to_floats(ODD)
    want = [to_float(v) for v in ODD]
    assert [None if np.isnan(g) else g for g in got] == want
    assert to_floats(np.array([1.5, np.nan])).tolist()[0] == 1.5 and to_floats([]).shape == (0,)


def test_age_bands_is_age_band_per_value():
    ages = [None, 0, 49.99, 50, 59.9, 60, 79, 80, 199, 200, -1, float("nan")]
    assert list(age_bands(ages)) == [age_band(a) for a in ages]
    assert list(age_bands(np.array([45.0, np.nan, 85.0]))) == ["0-49", None, "80+"]


def test_sex_codes_and_covariate_features_equal_the_row_versions():
    sexes = [None, "F", "female", " W ", "m", "Man", "x", float("nan"), "None", "", "M", "woman"]
    assert list(sex_codes(sexes)) == [_sex_code(s) for s in sexes]
    rng = np.random.default_rng(0)
    ages = [None if i % 5 == 0 else float("nan") if i % 7 == 0 else float(rng.uniform(30, 95)) for i in range(60)]
    sx = [sexes[i % len(sexes)] for i in range(60)]
    x_new, imp_new = covariate_features(ages, sx, 66.3, 11.1)
    x_old, imp_old = _covariate_features_before(ages, sx, 66.3, 11.1)
    assert np.array_equal(x_new, x_old) and np.array_equal(imp_new, imp_old)
    # NumPy columns (training metadata) give the same as lists with None.
    x_col, _ = covariate_features(to_floats(ages), np.array(sx, dtype=object), 66.3, 11.1)
    assert np.array_equal(x_col, x_old)


# ---- metrics: same intervals, same selection ----------------------------------------------------------
@pytest.mark.parametrize("n,ties", [(9, False), (60, True), (400, False), (400, True)])
def test_resampled_auc_equals_roc_auc_of_each_resample(n, ties):
    y, p = _data(n, n, ties)
    auc = metrics.ResampledAuc(y == 2, p[:, 2])
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = rng.integers(0, n, n)
        assert auc(idx) == metrics.roc_auc(y[idx] == 2, p[idx, 2])  # exactly, not approximately
    assert auc(np.zeros(3, int)) is None  # one class only: no AUC


@pytest.mark.parametrize("n,ties", [(12, False), (300, True), (300, False)])
def test_report_and_paired_intervals_equal_the_per_statistic_bootstrap(n, ties):
    y, p = _data(n, 7, ties)
    _, q = _data(n, 8, ties)
    pred = np.where(np.arange(n) % 4 == 0, (p.argmax(1) + 1) % 3, p.argmax(1))
    r = metrics.classification_report(y, p, CLASSES, pred=pred, n_boot=200)
    want = _report_before(y, p, CLASSES, pred=pred, n_boot=200)
    assert (r["balanced_accuracy_lo"], r["balanced_accuracy_hi"]) == want["balanced_accuracy"]
    assert (r["macro_f1_lo"], r["macro_f1_hi"]) == want["macro_f1"]
    for c in CLASSES:
        assert (r["per_class"][c]["auc_lo"], r["per_class"][c]["auc_hi"]) == want[c]
    assert metrics.paired_bootstrap(y, p, q, n_boot=300) == _paired_before(y, p, q, n_boot=300)
    assert r == _report_with_row_bootstrap(y, p, CLASSES, pred=pred, n_boot=200)


def test_the_deployed_choice_and_every_selection_number_are_unchanged(monkeypatch):
    """fit_ensemble on out-of-fold logits, with the new metrics and covariate code and with the row
    versions patched in: the same manifest, byte for byte."""
    rng = np.random.default_rng(3)
    n = 240
    y = rng.integers(0, 3, n)
    logits = [rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]]  # one member: one fusion rule, 3 candidates
    folds = np.arange(n) % 5
    ages = np.where(np.arange(n) % 11 == 0, np.nan, 60 + 8 * y + rng.normal(0, 8, n))
    sexes = np.array([None if i % 13 == 0 else "F" if i % 3 else "M" for i in range(n)], dtype=object)
    t = np.where(np.arange(n) % 6 == 0, np.nan, -0.5 - 1.2 * y + rng.normal(0, 0.5, n))

    def manifest():
        age_mean, age_sd = float(np.nanmean(ages)), float(np.nanstd(ages))
        x, imputed = ensemble.covariate_features(ages, sexes, age_mean, age_sd)
        from kneescreen.model.covariates import LogisticModel

        model = LogisticModel().fit(x[~imputed], y[~imputed], 3, steps=200)
        cov = ensemble.CovariateFit(model, age_mean, age_sd, model.predict_proba(x), imputed)
        members = [ensemble.member_manifest("test_cnn", "gray", 32, None, view="img") for _ in logits]
        m = ensemble.fit_ensemble(members, logits, y, folds, cov, t_scores=t, ages=ages, sexes=sexes)
        return json.dumps(m.to_dict() if hasattr(m, "to_dict") else repr(m), sort_keys=True, default=float)

    new = manifest()
    monkeypatch.setattr(selection, "classification_report", _report_with_row_bootstrap)
    monkeypatch.setattr(selection, "paired_bootstrap", _paired_before)
    monkeypatch.setattr(ensemble, "covariate_features",
                        lambda a, s, m, sd: _covariate_features_before(list(a), list(s), m, sd))
    assert manifest() == new
    assert json.loads(new)  # a real manifest, not an empty string



def test_evaluation_reads_metadata_columns_as_it_read_lists():
    """`image_value` and the age-band table from NumPy metadata columns (NaN / None for missing)
    equal what they give from per-row lists with None, as the driver held them before."""
    from kneescreen.train.evaluate import _by_age_band, image_value

    n = 120
    y, p = _data(n, 5)
    _, q = _data(n, 6)
    ages = [None if i % 9 == 0 else 45.0 + (i * 7) % 45 for i in range(n)]
    sexes = [None if i % 10 == 0 else ("F", "M", "female")[i % 3] for i in range(n)]
    t = [None if i % 4 == 0 else -2.5 + 0.02 * i for i in range(n)]
    outputs = {"covariates_only": (q, q.argmax(1)), "image_ensemble:soft": (p, p.argmax(1))}
    as_lists = image_value(outputs, y, ages, sexes, t, n_boot=50)
    as_columns = image_value(outputs, y, to_floats(ages), np.array(sexes, dtype=object), to_floats(t), n_boot=50)
    assert as_lists == as_columns and as_lists["t_score_partial_spearman"]["n"] == 75
    assert _by_age_band(y, p, p.argmax(1), ages) == _by_age_band(y, p, p.argmax(1), to_floats(ages)) != {}


@pytest.mark.parametrize("k", [2, 3, 4, 7, 8, 9])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_gives_the_numbers_of_the_reduction_formula(k, dtype):
    from kneescreen.model.fusion import softmax

    rng = np.random.default_rng(k)
    for scale in (0.1, 3.0, 40.0):
        z = (rng.normal(size=(500, k)) * scale).astype(dtype)
        zz = z - z.max(1, keepdims=True)
        e = np.exp(zz)
        want = e / e.sum(1, keepdims=True)
        before = z.copy()
        got = softmax(z)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert np.array_equal(z, before)  # the input is left alone


def test_product_stacker_fit_is_unchanged():
    """The stacker with its log-probabilities computed once equals the per-step version."""
    from kneescreen.model.covariates import ProductStacker
    from kneescreen.model.fusion import softmax

    def fit_before(p_cov, p_img, y, l2=0.1):
        onehot, best = np.eye(3)[y], (np.inf, 0.0, np.zeros(3))
        for beta in np.linspace(0.0, 2.0, 41):
            bias = np.zeros(3)
            for _ in range(300):
                p = softmax(ProductStacker._logits(p_cov, p_img, beta, bias))
                bias -= 0.5 * ((p - onehot).mean(0) + l2 * bias)
            p = softmax(ProductStacker._logits(p_cov, p_img, beta, bias))
            nll = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean() + 0.5 * l2 * (bias**2).sum())
            if nll < best[0] - 1e-9:
                best = (nll, float(beta), bias.copy())
        return best[1], best[2]

    y, p_img = _data(150, 11)
    _, p_cov = _data(150, 12)
    p_img[0] = [1.0, 0.0, 0.0]  # a zero probability: clipped the same way
    got = ProductStacker().fit(p_cov, p_img, y)
    beta, bias = fit_before(p_cov, p_img, y)
    assert got.beta == beta and np.array_equal(got.bias, bias) and beta > 0


@pytest.mark.slow
@pytest.mark.ray
def test_evaluate_reads_only_the_test_split_and_reproduces_the_training_report(ray_local, train_archive, tmp_path):
    """`kneescreen evaluate` (the split read as Arrow in a Ray task, filtered to ``--split test``)
    gives the held-out report `run_train` wrote, number for number."""
    from kneescreen.train.config import TrainConfig
    from kneescreen.train.evaluate import EvaluateConfig, run_evaluate
    from kneescreen.train.run import run_train

    out = str(tmp_path / "bundle")
    trained = run_train(TrainConfig(data=str(train_archive), out=out, members=("test_cnn:gray:frozen",),
                                    weights="none", image_size=32, oof_folds=3, storage_path=str(tmp_path / "runs"),
                                    name="columns"))
    report = run_evaluate(EvaluateConfig(bundle=out, split_dir=f"{out}/split", split="test"))
    assert report["n"] == trained["test"]["n"] > 0
    assert json.dumps(report, sort_keys=True, default=float) == json.dumps(trained["test"], sort_keys=True, default=float)
