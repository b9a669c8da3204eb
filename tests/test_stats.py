"""Screening statistics on small hand-built prediction frames, checked against hand counts."""

from __future__ import annotations

import datetime as _dt

import pandas as pd
import pyarrow as pa
import pytest

from kneescreen.labels import CLASSES
from kneescreen.metrics import wilson
from kneescreen.screen.schema import PREDICTIONS, STATS
from kneescreen.screen.stats import SUBGROUPS, compute_stats

NOW = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
PROBS = {"normal": (0.7, 0.2, 0.1), "osteopenia": (0.2, 0.6, 0.2), "osteoporosis": (0.1, 0.2, 0.7)}

# key, status, site, sex, predicted class, low-BMD flag, reference label
ROWS = [
    ("r1", "ok", "A", "F", "normal", False, "normal"),
    ("r2", "ok", "A", "F", "osteopenia", True, "osteopenia"),
    ("r3", "ok", "A", "M", "osteoporosis", True, "osteoporosis"),
    ("r4", "ok", "B", "F", "osteopenia", True, "normal"),
    ("r5", "ok", "B", "M", "normal", False, "osteoporosis"),
    ("r6", "ok", "B", "F", "osteoporosis", True, "osteopenia"),
    ("r7", "ok", "B", None, "normal", False, None),  # no reference label
    ("r8", "error", "A", "F", None, None, "normal"),  # reference but never screened
    ("r9", "error", "B", "M", None, None, None),
    ("r10", "skipped", None, None, None, None, None),
]


def _frame(rows) -> pd.DataFrame:
    """Rows in `schema.PREDICTIONS`, read back the way the pipeline reads them (Arrow -> pandas)."""
    out = []
    for key, status, site, sex, pred, flag, ref in rows:
        p = PROBS.get(pred, (None, None, None))
        out.append({
            "run_id": "r", "model_version": "v", "key": key, "etag": "e", "size": 1, "status": status,
            "error_code": None if status == "ok" else ("truncated" if status == "error" else "not_knee"),
            "site": site, "sex": sex, "manufacturer": "ACME" if site == "A" else None, "age": 66.0,
            "age_band": "60-69", "view": "AP", "p_normal": p[0], "p_osteopenia": p[1], "p_osteoporosis": p[2],
            "predicted_class": pred, "risk_score": None if p[1] is None else p[1] + p[2], "low_bmd_flag": flag,
            "osteoporosis_flag": None if pred is None else pred == "osteoporosis",
            "predictor": None if pred is None else "fused", "covariates_imputed": None if pred is None else False,
            "reference_label": ref, "screened_at": NOW,
        })
    return pa.Table.from_pylist(out, schema=PREDICTIONS).to_pandas()


@pytest.fixture(scope="module")
def stats() -> pd.DataFrame:
    table = compute_stats(_frame(ROWS), "run-7", "model-3")
    assert isinstance(table, pa.Table)
    return table.to_pandas()


def _one(df, gtype, group, target, metric) -> pd.Series:
    m = df[(df["subgroup_type"] == gtype) & (df["subgroup"] == group) & (df["target"] == target)
           & (df["metric"] == metric)]
    assert len(m) == 1, (gtype, group, target, metric, len(m))
    return m.iloc[0]


def _value(df, gtype, group, target, metric):
    return _one(df, gtype, group, target, metric)["value"]


def test_schema_is_stats():
    table = compute_stats(_frame(ROWS), "run-7", "model-3")
    assert table.schema == STATS
    df = table.to_pandas()
    assert (df["run_id"] == "run-7").all() and (df["model_version"] == "model-3").all()


def test_counts_by_status(stats):
    assert _value(stats, "all", "all", "objects", "count") == 10
    assert _value(stats, "all", "all", "status:ok", "count") == 7
    assert _value(stats, "all", "all", "status:error", "count") == 2
    assert _value(stats, "all", "all", "status:skipped", "count") == 1
    row = _one(stats, "all", "all", "status:error", "count")
    assert (row["numerator"], row["denominator"]) == (2, 10)


@pytest.mark.parametrize("target,k", [("normal", 3), ("osteopenia", 2), ("osteoporosis", 2), ("low_bmd", 4)])
def test_prevalence_among_screened_with_wilson_interval(stats, target, k):
    row = _one(stats, "all", "all", target, "prevalence")
    p, lo, hi = wilson(k, 7)
    assert (row["numerator"], row["denominator"]) == (k, 7)  # errors and skips are not in the denominator
    assert row["value"] == pytest.approx(p)
    assert row["ci_lo"] == pytest.approx(lo) and row["ci_hi"] == pytest.approx(hi)
    assert row["ci_lo"] < row["value"] < row["ci_hi"]


def test_class_prevalences_sum_to_one(stats):
    assert sum(_value(stats, "all", "all", c, "prevalence") for c in CLASSES) == pytest.approx(1.0)


def test_confusion_counts(stats):
    # Reference rows among screened images: r1..r6 (r7 has no label, r8 was never screened).
    expected = {("normal", "normal"): 1, ("normal", "osteopenia"): 1, ("osteopenia", "osteopenia"): 1,
                ("osteopenia", "osteoporosis"): 1, ("osteoporosis", "osteoporosis"): 1,
                ("osteoporosis", "normal"): 1}
    for t in CLASSES:
        for p in CLASSES:
            row = _one(stats, "all", "all", f"confusion:{t}->{p}", "count")
            assert row["value"] == expected.get((t, p), 0), (t, p)
            assert row["denominator"] == 6


def test_overall_accuracy_and_balanced_accuracy(stats):
    acc = _one(stats, "all", "all", "overall", "accuracy")
    assert (acc["numerator"], acc["denominator"]) == (3, 6)
    assert acc["value"] == pytest.approx(0.5)
    assert (acc["ci_lo"], acc["ci_hi"]) == pytest.approx(wilson(3, 6)[1:])
    assert _value(stats, "all", "all", "overall", "balanced_accuracy") == pytest.approx(0.5)


def test_low_bmd_sensitivity_and_specificity(stats):
    # truth (reference >= osteopenia): r2 r3 r5 r6; flagged: r2 r3 r4 r6
    # tp = r2 r3 r6, tn = r1, fp = r4, fn = r5
    for metric, v in (("tp", 3), ("tn", 1), ("fp", 1), ("fn", 1)):
        assert _value(stats, "all", "all", "low_bmd", metric) == v, metric
    sens = _one(stats, "all", "all", "low_bmd", "sensitivity")
    assert (sens["numerator"], sens["denominator"]) == (3, 4)
    assert sens["value"] == pytest.approx(0.75)
    assert (sens["ci_lo"], sens["ci_hi"]) == pytest.approx(wilson(3, 4)[1:])
    spec = _one(stats, "all", "all", "low_bmd", "specificity")
    assert (spec["numerator"], spec["denominator"]) == (1, 2)
    assert spec["value"] == pytest.approx(0.5)
    assert _value(stats, "all", "all", "low_bmd", "ppv") == pytest.approx(0.75)
    assert _value(stats, "all", "all", "low_bmd", "npv") == pytest.approx(0.5)
    assert _value(stats, "all", "all", "low_bmd", "f1") == pytest.approx(0.75)


def test_per_class_counts(stats):
    # osteoporosis: truth r3 r5, predicted r3 r6 -> tp r3, fn r5, fp r6, tn r1 r2 r4
    for metric, v in (("tp", 1), ("fn", 1), ("fp", 1), ("tn", 3)):
        assert _value(stats, "all", "all", "osteoporosis", metric) == v, metric
    assert _value(stats, "all", "all", "osteoporosis", "sensitivity") == pytest.approx(0.5)
    assert _value(stats, "all", "all", "osteoporosis", "specificity") == pytest.approx(0.75)


def test_site_subgroups(stats):
    assert set(stats.loc[stats["subgroup_type"] == "site", "subgroup"]) == {"A", "B", "unknown"}
    assert _value(stats, "site", "A", "objects", "count") == 4
    assert _value(stats, "site", "A", "status:ok", "count") == 3
    assert _value(stats, "site", "B", "objects", "count") == 5
    assert _value(stats, "site", "B", "status:error", "count") == 1
    # site A: r1 r2 r3 all right; site B: r4 r5 r6 all wrong
    assert _value(stats, "site", "A", "overall", "accuracy") == pytest.approx(1.0)
    assert _value(stats, "site", "B", "overall", "accuracy") == pytest.approx(0.0)
    row = _one(stats, "site", "B", "low_bmd", "prevalence")
    assert (row["numerator"], row["denominator"]) == (2, 4)  # r4 r6 of r4 r5 r6 r7


def test_site_without_screened_images_has_null_prevalence(stats):
    assert _value(stats, "site", "unknown", "objects", "count") == 1
    assert _value(stats, "site", "unknown", "status:skipped", "count") == 1
    row = _one(stats, "site", "unknown", "normal", "prevalence")
    assert pd.isna(row["value"]) and pd.isna(row["ci_lo"]) and row["denominator"] == 0
    # No reference rows there: no confusion rows either.
    sub = stats[(stats["subgroup_type"] == "site") & (stats["subgroup"] == "unknown")]
    assert not sub["target"].str.startswith("confusion:").any()


def test_sex_subgroups(stats):
    assert set(stats.loc[stats["subgroup_type"] == "sex", "subgroup"]) == {"F", "M", "unknown"}
    assert _value(stats, "sex", "F", "objects", "count") == 5
    assert _value(stats, "sex", "M", "objects", "count") == 3
    assert _value(stats, "sex", "unknown", "objects", "count") == 2
    # F: r1 r2 r4 r6 screened; flagged r2 r4 r6
    row = _one(stats, "sex", "F", "low_bmd", "prevalence")
    assert (row["numerator"], row["denominator"]) == (3, 4)
    assert (row["ci_lo"], row["ci_hi"]) == pytest.approx(wilson(3, 4)[1:])


def test_subgroup_counts_add_up(stats):
    for gtype in SUBGROUPS:
        counts = stats[(stats["subgroup_type"] == gtype) & (stats["target"] == "objects")]
        assert counts["value"].sum() == 10, gtype


def test_all_error_frame_still_reports_counts():
    rows = [(f"e{i}", "error", "A", "F", None, None, "normal") for i in range(3)]
    table = compute_stats(_frame(rows), "run-x", "v")
    assert table.schema == STATS
    df = table.to_pandas()
    assert _value(df, "all", "all", "objects", "count") == 3
    assert _value(df, "all", "all", "status:error", "count") == 3
    assert _value(df, "all", "all", "status:ok", "count") == 0
    for target in (*CLASSES, "low_bmd"):
        row = _one(df, "all", "all", target, "prevalence")
        assert pd.isna(row["value"]) and row["denominator"] == 0, target
    assert not df["target"].str.startswith("confusion:").any()
    assert not (df["metric"] == "sensitivity").any()


def test_empty_run_gives_count_rows():
    """An incremental rescan with nothing new still writes a stats table (zero counts)."""
    empty = pd.DataFrame({f.name: [] for f in PREDICTIONS})
    table = compute_stats(empty, "run-0", "v")
    assert table.schema == STATS
    df = table.to_pandas()
    assert _value(df, "all", "all", "objects", "count") == 0
    assert pd.isna(_value(df, "all", "all", "low_bmd", "prevalence"))
    assert set(df["subgroup_type"]) == {"all"}
