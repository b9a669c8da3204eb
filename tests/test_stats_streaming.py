"""Streaming stats: counts folded batch by batch give exactly the table a whole-frame pass gives.

The oracle below is the whole-frame pandas implementation `compute_stats` had before the pipeline
stopped reading a run's predictions back onto the driver, kept verbatim: the streaming counts must
reproduce it row for row and float for float.
"""

from __future__ import annotations

import datetime as _dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.block import BlockAccessor

from kneescreen.data.decode import DecodeSpec, load_side_table
from kneescreen.fileio.store import Store
from kneescreen.labels import CLASSES
from kneescreen.metrics import (
    balanced_accuracy,
    binary_counts,
    confusion_matrix,
    wilson,
)
from kneescreen.model.bundle import load_bundle
from kneescreen.screen.schema import PREDICTIONS, STATS, STATUSES
from kneescreen.screen.stages import (
    EnsemblePredictor,
    decode_stage,
    to_prediction_table,
)
from kneescreen.screen.stats import (
    STATS_COLUMNS,
    SUBGROUPS,
    PredictionCounts,
    compute_stats,
)

NOW = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)


# --- the oracle: the pre-streaming implementation, verbatim ------------------------------------

def _oracle_rows_for(df, run_id: str, version: str, gtype: str, group: str) -> list[dict]:
    out = []

    def add(target, metric, value=None, lo=None, hi=None, num=None, den=None):
        out.append({"run_id": run_id, "model_version": version, "subgroup_type": gtype, "subgroup": group,
                    "target": target, "metric": metric, "value": None if value is None else float(value),
                    "ci_lo": lo, "ci_hi": hi, "numerator": num, "denominator": den})

    n = len(df)
    add("objects", "count", n, num=n, den=n)
    for s in STATUSES:
        k = int((df["status"] == s).sum())
        add(f"status:{s}", "count", k, num=k, den=n)
    ok = df[df["status"] == "ok"]
    for cls in CLASSES:
        k = int((ok["predicted_class"] == cls).sum())
        p, lo, hi = wilson(k, len(ok))
        add(cls, "prevalence", p, lo, hi, k, len(ok))
    k = int(ok["low_bmd_flag"].fillna(False).astype(bool).sum())
    p, lo, hi = wilson(k, len(ok))
    add("low_bmd", "prevalence", p, lo, hi, k, len(ok))
    ref = ok[ok["reference_label"].notna()]
    if len(ref):
        y = ref["reference_label"].map(CLASSES.index).to_numpy()
        pred = ref["predicted_class"].map(CLASSES.index).to_numpy()
        cm = confusion_matrix(y, pred, len(CLASSES))
        for i, t in enumerate(CLASSES):
            for j, pcls in enumerate(CLASSES):
                add(f"confusion:{t}->{pcls}", "count", int(cm[i, j]), num=int(cm[i, j]), den=len(ref))
        acc = int((y == pred).sum())
        p, lo, hi = wilson(acc, len(ref))
        add("overall", "accuracy", p, lo, hi, acc, len(ref))
        add("overall", "balanced_accuracy", balanced_accuracy(y, pred, len(CLASSES)), num=None, den=len(ref))
        targets = [(c, y == i, pred == i) for i, c in enumerate(CLASSES)]
        targets.append(("low_bmd", y >= 1, ref["low_bmd_flag"].astype(bool).to_numpy()))
        for name, truth, flag in targets:
            bc = binary_counts(truth, flag)
            for m in ("tp", "tn", "fp", "fn"):
                add(name, m, bc[m], num=bc[m], den=len(ref))
            for m, num, den in (("sensitivity", bc["tp"], bc["tp"] + bc["fn"]),
                                ("specificity", bc["tn"], bc["tn"] + bc["fp"]),
                                ("ppv", bc["tp"], bc["tp"] + bc["fp"]), ("npv", bc["tn"], bc["tn"] + bc["fn"]),
                                ("accuracy", bc["tp"] + bc["tn"], len(ref))):
                add(name, m, bc[m], bc[f"{m}_lo"], bc[f"{m}_hi"], num, den)
            add(name, "f1", bc["f1"], den=len(ref))
    return out


def oracle_stats(predictions, run_id: str, version: str) -> pa.Table:
    rows = _oracle_rows_for(predictions, run_id, version, "all", "all")
    for gtype in SUBGROUPS:
        col = predictions[gtype].fillna("unknown").astype(str)
        for value in sorted(col.unique()):
            rows += _oracle_rows_for(predictions[col == value], run_id, version, gtype, value)
    return pa.Table.from_pylist(rows, schema=STATS)


def assert_same_stats(got: pa.Table, want: pa.Table) -> None:
    """Row for row, value for value (NaN equal to NaN, floats compared exactly)."""
    assert got.schema == want.schema == STATS
    a, b = got.to_pylist(), want.to_pylist()
    assert len(a) == len(b) and len(a) > 0
    for ra, rb in zip(a, b):
        for k in ra:
            same = ra[k] == rb[k] or (isinstance(ra[k], float) and isinstance(rb[k], float)
                                      and math.isnan(ra[k]) and math.isnan(rb[k]))
            assert same, (k, ra, rb)


# --- hand-built tables, several batches ----------------------------------------------------------

def _random_predictions(n: int, seed: int) -> pa.Table:
    """Rows covering every branch: each status, missing subgroup values, ok rows with and without
    reference labels, null low-BMD flags, several error codes."""
    rng = np.random.default_rng(seed)
    pick = lambda values: values[rng.integers(len(values))]
    rows = []
    for i in range(n):
        status = pick(["ok", "ok", "ok", "error", "skipped"])
        ok = status == "ok"
        rows.append({
            "run_id": "r", "model_version": "v", "key": f"k{i}", "etag": "e", "size": 1, "status": status,
            "error_code": None if ok else (pick(["read_failed", "truncated", "not_dicom"]) if status == "error"
                                           else "not_knee"),
            "site": pick(["A", "B", "C", None]), "manufacturer": pick(["ACME", "Other", None]),
            "sex": pick(["F", "M", None]), "age_band": pick(["50-59", "60-69", "70-79", None]),
            "view": pick(["AP", "LAT", None]),
            "predicted_class": pick(CLASSES) if ok else None,
            "low_bmd_flag": pick([True, False, None]) if ok else None,
            "reference_label": pick([*CLASSES, None]), "screened_at": NOW,
        })
    return pa.Table.from_pylist(rows, schema=PREDICTIONS)


@pytest.mark.parametrize("n, seed, batch", [(0, 0, 5), (1, 1, 1), (97, 2, 7), (400, 3, 64), (400, 4, 400)])
def test_batched_counts_equal_the_whole_frame_oracle(n, seed, batch):
    table = _random_predictions(n, seed)
    batches = table.to_batches(max_chunksize=batch)
    assert n <= batch or len(batches) > 1
    got = compute_stats(PredictionCounts.of(batches), "run-1", "v")
    if n == 0:
        assert got.to_pylist() == oracle_stats(table.to_pandas(), "run-1", "v").to_pylist()
        return
    assert_same_stats(got, oracle_stats(table.to_pandas(), "run-1", "v"))


def test_batch_order_does_not_matter():
    table = _random_predictions(300, 5)
    forward = PredictionCounts.of(table.to_batches(max_chunksize=11))
    backward = PredictionCounts.of(reversed(table.to_batches(max_chunksize=13)))
    assert_same_stats(forward.table("r", "v"), backward.table("r", "v"))
    assert forward.rows == backward.rows == 300
    assert forward.error_codes == backward.error_codes


def test_counts_feed_the_manifest():
    table = _random_predictions(250, 6)
    counts = PredictionCounts.of(table.to_batches(max_chunksize=9))
    df = table.to_pandas()
    assert counts.status_counts() == {s: int((df["status"] == s).sum()) for s in STATUSES}
    assert dict(counts.error_codes) == {k: int(v) for k, v in df["error_code"].value_counts().items()}
    # A pandas frame still works (the reference path and callers that hold rows).
    assert_same_stats(compute_stats(df, "r", "v"), oracle_stats(df, "r", "v"))


# --- a real screening output, streamed from Parquet ----------------------------------------------

def _numpy(table: pa.Table) -> dict:
    return BlockAccessor.for_block(table).to_batch_format("numpy")


@pytest.fixture(scope="module")
def real_predictions(small_archive, tiny_bundle) -> pa.Table:
    """The small archive through the real stages (decode -> ensemble -> postprocess), no Ray."""
    root, _ = small_archive
    bundle = load_bundle(tiny_bundle)
    store = Store()
    objs = list(store.list_objects(str(root / "images")))
    listing = pa.Table.from_pylist([{"key": o.key, "etag": o.etag, "size": o.size} for o in objs])
    spec = DecodeSpec(store=store, sizes=tuple(bundle.sizes), root=str(root / "images"), pseudo_key=b"k" * 16,
                      reference=load_side_table(store, str(root / "labels.csv")))
    predictor = EnsemblePredictor({"manifest": bundle.manifest, "states": bundle.states()})
    decoded = decode_stage(_numpy(listing), spec)
    return to_prediction_table(_numpy(predictor(_numpy(decoded))), run_id="run-1", model_version=bundle.version,
                               screened_at=NOW)


def test_streamed_parquet_equals_the_oracle_on_a_real_screening_output(real_predictions, tmp_path):
    df = real_predictions.to_pandas()
    assert (df["status"] == "ok").sum() >= 20 and (df["status"] != "ok").any() and df["reference_label"].notna().any()
    # Several files with small row groups, read in batches of 5: many partial folds.
    out = tmp_path / "predictions"
    out.mkdir()
    for i, start in enumerate(range(0, real_predictions.num_rows, 12)):
        pq.write_table(real_predictions.slice(start, 12), out / f"part-{i}.parquet", row_group_size=4)
    store = Store()
    assert store.count_parquet_rows(str(out)) == real_predictions.num_rows
    batches = list(store.iter_parquet_batches(str(out), list(STATS_COLUMNS), schema=PREDICTIONS, batch_size=5))
    assert len(batches) > 5 and max(b.num_rows for b in batches) <= 5
    counts = PredictionCounts.of(iter(batches))
    assert counts.rows == real_predictions.num_rows
    assert_same_stats(compute_stats(counts, "run-1", "v"), oracle_stats(df, "run-1", "v"))
