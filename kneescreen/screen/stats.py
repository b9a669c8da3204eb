"""Per-run, per-subgroup screening statistics in the long `schema.STATS` format.

For each subgroup (all, site, manufacturer, sex, age band, view): object counts by status,
predicted-class prevalence among screened images; where reference labels exist, the 3x3
confusion matrix, per-class TP/TN/FP/FN with sensitivity, specificity, PPV, NPV, F1, accuracy and
balanced accuracy, and the same for the binary low-BMD flag; proportions with Wilson 95% intervals.

Every statistic is a function of counts, so rows are aggregated batch by batch into
`PredictionCounts` (per subgroup: how many rows share each (status, predicted class, reference
label, low-BMD flag) cell) and the table is computed from those counts. Driver memory grows with
the number of distinct subgroup values, never with the number of rows: a run's predictions are
streamed from Parquet, never read back whole.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kneescreen.labels import CLASSES

# balanced_accuracy_of takes the confusion matrix itself: the same function, hence the same float,
# as balanced_accuracy() over the rows.
from kneescreen.metrics import balanced_accuracy_of, wilson
from kneescreen.screen.schema import STATS, STATUSES

SUBGROUPS = ("site", "manufacturer", "sex", "age_band", "view")
# The columns the statistics and the run manifest need: all a streaming pass reads.
STATS_COLUMNS = ("status", "error_code", "predicted_class", "reference_label", "low_bmd_flag", "bytes_read", *SUBGROUPS)
_CELL = ("status", "predicted_class", "reference_label", "low_bmd_flag")
_TYPES = {"low_bmd_flag": pa.bool_(), "bytes_read": pa.int64()}


def _prepared(batch) -> pa.Table:
    """The stats columns of a batch with fixed types; absent columns are null, a null low-BMD flag
    is False and a missing subgroup value is ``unknown`` (as in every report)."""
    n = batch.num_rows
    cols = {}
    for name in STATS_COLUMNS:
        typ = _TYPES.get(name, pa.string())
        arr = batch.column(name).cast(typ) if name in batch.schema.names else pa.nulls(n, typ)
        if name == "low_bmd_flag":
            arr = pc.fill_null(arr, False)
        elif name in SUBGROUPS:
            arr = pc.fill_null(arr, "unknown")
        cols[name] = arr
    return pa.table(cols)


class PredictionCounts:
    """Sufficient statistics of prediction rows for `schema.STATS` and the run manifest.

    Add Arrow record batches or tables (any number, any order); the result equals one pass over
    all rows at once.
    """

    def __init__(self):
        # (subgroup_type, subgroup) -> Counter[(status, predicted_class, reference_label, low_bmd)]
        self.cells: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.error_codes: Counter = Counter()
        self.rows = 0
        self.bytes_read = 0  # storage bytes fetched, summed over the rows (null counts 0)

    @classmethod
    def of(cls, predictions) -> PredictionCounts:
        """Counts of a pandas DataFrame, an Arrow table/batch, or an iterable of those."""
        import pandas as pd

        counts = cls()
        if isinstance(predictions, pd.DataFrame):
            predictions = [pa.Table.from_pandas(predictions, preserve_index=False)]
        elif isinstance(predictions, (pa.Table, pa.RecordBatch)):
            predictions = [predictions]
        for batch in predictions:
            counts.add(batch)
        return counts

    def add(self, batch) -> None:
        """Fold one Arrow record batch or table of prediction rows into the counts."""
        if not batch.num_rows:
            return
        t = _prepared(batch)
        self.rows += t.num_rows
        self.bytes_read += pc.sum(t.column("bytes_read")).as_py() or 0
        codes = pc.value_counts(t.column("error_code").drop_null())
        self.error_codes.update({v["values"]: v["counts"] for v in codes.to_pylist()})
        for gtype in ("all", *SUBGROUPS):
            keys = list(_CELL) + ([] if gtype == "all" else [gtype])
            grouped = t.select(keys).group_by(keys, use_threads=False).aggregate([([], "count_all")])
            for row in grouped.to_pylist():
                group = "all" if gtype == "all" else row[gtype]
                self.cells[(gtype, group)][tuple(row[k] for k in _CELL)] += row["count_all"]

    def status_counts(self) -> dict[str, int]:
        """Rows per status over the whole run."""
        out = Counter()
        for (status, *_), k in self.cells.get(("all", "all"), Counter()).items():
            out[status] += k
        return {s: int(out[s]) for s in STATUSES}

    def table(self, run_id: str, version: str) -> pa.Table:
        """The `schema.STATS` table: "all" first, then each subgroup type by sorted value."""
        rows = _rows_for(self.cells.get(("all", "all"), Counter()), run_id, version, "all", "all")
        for gtype in SUBGROUPS:
            for value in sorted(g for t, g in self.cells if t == gtype):
                rows += _rows_for(self.cells[(gtype, value)], run_id, version, gtype, value)
        return pa.Table.from_pylist(rows, schema=STATS)


def _binary(tp: int, tn: int, fp: int, fn: int) -> dict:
    """`metrics.binary_counts` from the four counts instead of the per-row arrays."""
    out: dict = {"tp": tp, "tn": tn, "fp": fp, "fn": fn}
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp), ("ppv", tp, tp + fp),
                       ("npv", tn, tn + fn), ("accuracy", tp + tn, tp + tn + fp + fn)):
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = wilson(k, n)
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return out


def _reference_counts(cells: Counter) -> tuple[np.ndarray, dict]:
    """3x3 confusion (true x predicted) and low-BMD 2x2 counts of the ok rows with a reference label.

    Raises:
        ValueError: a reference label or predicted class outside `labels.CLASSES`.
    """
    cm = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    low = Counter()
    for (status, pred, ref, flag), k in cells.items():
        if status == "ok" and ref is not None:
            y = CLASSES.index(ref)
            cm[y, CLASSES.index(pred)] += k
            low[(y >= 1, bool(flag))] += k
    return cm, {"tp": low[(True, True)], "tn": low[(False, False)], "fp": low[(False, True)],
                "fn": low[(True, False)]}


def _rows_for(cells: Counter, run_id: str, version: str, gtype: str, group: str) -> list[dict]:
    out = []

    def add(target, metric, value=None, lo=None, hi=None, num=None, den=None):
        out.append({"run_id": run_id, "model_version": version, "subgroup_type": gtype, "subgroup": group,
                    "target": target, "metric": metric, "value": None if value is None else float(value),
                    "ci_lo": lo, "ci_hi": hi, "numerator": num, "denominator": den})

    n = sum(cells.values())
    add("objects", "count", n, num=n, den=n)
    for s in STATUSES:
        k = sum(v for c, v in cells.items() if c[0] == s)
        add(f"status:{s}", "count", k, num=k, den=n)
    ok = {c: v for c, v in cells.items() if c[0] == "ok"}
    n_ok = sum(ok.values())
    for cls in CLASSES:
        k = sum(v for c, v in ok.items() if c[1] == cls)
        p, lo, hi = wilson(k, n_ok)
        add(cls, "prevalence", p, lo, hi, k, n_ok)
    k = sum(v for c, v in ok.items() if c[3])
    p, lo, hi = wilson(k, n_ok)
    add("low_bmd", "prevalence", p, lo, hi, k, n_ok)
    cm, low = _reference_counts(ok)
    n_ref = int(cm.sum())
    if n_ref:
        _reference_rows(add, cm, low, n_ref)
    return out


def _reference_rows(add, cm: np.ndarray, low: dict, n_ref: int) -> None:
    """Confusion, accuracy and per-target binary rows for the reference-labelled ok rows."""
    for i, t in enumerate(CLASSES):
        for j, pcls in enumerate(CLASSES):
            add(f"confusion:{t}->{pcls}", "count", int(cm[i, j]), num=int(cm[i, j]), den=n_ref)
    acc = int(np.trace(cm))
    p, lo, hi = wilson(acc, n_ref)
    add("overall", "accuracy", p, lo, hi, acc, n_ref)
    add("overall", "balanced_accuracy", balanced_accuracy_of(cm), num=None, den=n_ref)
    targets = []
    for i, c in enumerate(CLASSES):  # one class against the rest, from the 3x3 counts
        tp, fn, fp = int(cm[i, i]), int(cm[i].sum() - cm[i, i]), int(cm[:, i].sum() - cm[i, i])
        targets.append((c, _binary(tp, n_ref - tp - fn - fp, fp, fn)))
    targets.append(("low_bmd", _binary(low["tp"], low["tn"], low["fp"], low["fn"])))
    for name, bc in targets:
        for m in ("tp", "tn", "fp", "fn"):
            add(name, m, bc[m], num=bc[m], den=n_ref)
        for m, num, den in (("sensitivity", bc["tp"], bc["tp"] + bc["fn"]),
                            ("specificity", bc["tn"], bc["tn"] + bc["fp"]),
                            ("ppv", bc["tp"], bc["tp"] + bc["fp"]), ("npv", bc["tn"], bc["tn"] + bc["fn"]),
                            ("accuracy", bc["tp"] + bc["tn"], n_ref)):
            add(name, m, bc[m], bc[f"{m}_lo"], bc[f"{m}_hi"], num, den)
        add(name, "f1", bc["f1"], den=n_ref)


def compute_stats(predictions, run_id: str, version: str) -> pa.Table:
    """Stats table for one run's prediction rows.

    Args:
        predictions: a `PredictionCounts` (what the pipeline streams), or rows: a pandas
            DataFrame, an Arrow table, or an iterable of Arrow record batches.
        run_id: the run the rows belong to.
        version: the model version that produced them.

    Returns:
        A table in `schema.STATS`.
    """
    counts = predictions if isinstance(predictions, PredictionCounts) else PredictionCounts.of(predictions)
    return counts.table(run_id, version)


def patient_stats(batches, run_id: str, version: str) -> pa.Table:
    """Patient-level rows (``subgroup_type = patient``, ``subgroup = all``) from `schema.PATIENTS`
    batches: one patient counts once, with the deciding film's class and low-BMD flag against the
    patient's reference (`screen.patients`); same metrics and Wilson intervals as the image rows."""
    cells: Counter = Counter()
    for batch in batches:
        cols = [batch.column(c).to_pylist() for c in ("predicted_class", "reference_label", "low_bmd_flag")]
        for pred, ref, flag in zip(*cols):
            cells[("ok", pred, ref, bool(flag))] += 1
    return pa.Table.from_pylist(_rows_for(cells, run_id, version, "patient", "all"), schema=STATS)
