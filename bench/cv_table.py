"""Render bench/results/cv_dev.json as the markdown table in docs/results.md.

Usage: .venv/bin/python bench/cv_table.py bench/results/cv_dev.json
"""

from __future__ import annotations

import json
import sys


def ci(r: dict, k: str) -> str:
    v, lo, hi = r.get(k), r.get(f"{k}_lo"), r.get(f"{k}_hi")
    if v is None:
        return "n/a"
    return f"{v:.2f} ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else f"{v:.2f}"


def main(path: str) -> int:
    res = json.load(open(path))
    print(f"n = {res['n']} images, {res['folds']} folds, class counts {res['class_counts']}\n")
    print("| predictor | balanced accuracy | macro-F1 | accuracy | osteoporosis-vs-rest AUC | low-BMD sensitivity | low-BMD specificity | Brier |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in res["predictors"].items():
        op = r["per_class"]["osteoporosis"]
        low = r.get("low_bmd")
        print(f"| {name} | {ci(r, 'balanced_accuracy')} | {ci(r, 'macro_f1')} | {ci(r, 'accuracy')} | {ci(op, 'auc')} | "
              f"{ci(low, 'sensitivity') if low else 'n/a'} | {ci(low, 'specificity') if low else 'n/a'} | {r['brier']:.3f} |")
    for name, r in res["predictors"].items():
        if r.get("by_age_band"):
            print(f"\n{name} accuracy by age band: " + ", ".join(
                f"{b}: {v['accuracy']:.2f} (n={v['n']})" for b, v in r["by_age_band"].items()))
    if res.get("deployed_per_fold"):
        print("\ndeployed predictor per outer fold: " + ", ".join(res["deployed_per_fold"]))
    value = res.get("image_value") or {}
    for name, diffs in value.get("paired", {}).items():
        parts = [f"{label} {d['diff']:+.2f} ({d['lo']:+.2f} to {d['hi']:+.2f})"
                 for metric, label in (("balanced_accuracy", "balanced accuracy"), ("auc_osteoporosis", "osteoporosis AUC"),
                                       ("auc_low_bmd", "low-BMD AUC"), ("brier", "Brier"))
                 for d in [diffs[metric]] if d["diff"] is not None]
        print(f"\n{name} minus covariates_only (paired bootstrap, 95% CI): " + "; ".join(parts))
    t = value.get("t_score_partial_spearman")
    if t and t.get("rho") is not None:
        print(f"\nimage score vs T-score given age and sex: Spearman partial rho {t['rho']:+.2f}, "
              f"permutation p = {t['p_value']:.3f}, n = {t['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
