"""Per-run, per-subgroup screening statistics in the long `schema.STATS` format.

For each subgroup (all, site, manufacturer, sex, age band, view): object counts by status,
predicted-class prevalence among screened images; where reference labels exist, the 3x3
confusion matrix, per-class TP/TN/FP/FN with sensitivity, specificity, PPV, NPV, F1, accuracy and
balanced accuracy, and the same for the binary low-BMD flag; proportions with Wilson 95% intervals.
"""

from __future__ import annotations

import pyarrow as pa

from kneescreen.labels import CLASSES
from kneescreen.metrics import (
    balanced_accuracy,
    binary_counts,
    confusion_matrix,
    wilson,
)
from kneescreen.screen.schema import STATS, STATUSES

SUBGROUPS = ("site", "manufacturer", "sex", "age_band", "view")


def _rows_for(df, run_id: str, version: str, gtype: str, group: str) -> list[dict]:
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


def compute_stats(predictions, run_id: str, version: str) -> pa.Table:
    """Stats table for one run's prediction rows (a pandas DataFrame)."""
    rows = _rows_for(predictions, run_id, version, "all", "all")
    for gtype in SUBGROUPS:
        col = predictions[gtype].fillna("unknown").astype(str)
        for value in sorted(col.unique()):
            rows += _rows_for(predictions[col == value], run_id, version, gtype, value)
    return pa.Table.from_pylist(rows, schema=STATS)
