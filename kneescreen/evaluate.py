"""`kneescreen evaluate`: every member, the image ensemble, covariates-only and the fused model
on held-out images, with intervals; JSON + Parquet + a printed table."""

from __future__ import annotations

import json
import logging

import numpy as np

from kneescreen.labels import CLASSES
from kneescreen.metrics import binary_counts, classification_report

_logger = logging.getLogger(__name__)
AGE_BANDS = ((0, 50), (50, 60), (60, 70), (70, 80), (80, 200))


def age_band(age) -> str | None:
    if age is None or (isinstance(age, float) and np.isnan(age)):
        return None
    for lo, hi in AGE_BANDS:
        if lo <= age < hi:
            return f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+"
    return None


def low_bmd_threshold(manifest: dict, predictor: str) -> float:
    """The validation-chosen low-BMD threshold of one predictor (the deployed one's as fallback)."""
    return manifest.get("predictor_thresholds", {}).get(predictor, manifest["thresholds"]["low_bmd"]["threshold"])


def predictor_outputs(bundle, data: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (probs, pred) for members, image ensemble, covariates-only and fused."""
    from kneescreen.covariates import covariate_features

    pred = bundle.predict(data["images"], data["age"], data["sex"])
    out = {}
    for spec, p in zip(bundle.manifest["members"], pred.member_probs):
        out[f"member:{spec['architecture']}-{spec['input_mode']}"] = (p, p.argmax(1))
    out[f"image_ensemble:{bundle.manifest['fusion']['method']}"] = (pred.image_probs, _image_pred(bundle, pred))
    if bundle.covariate_model is not None:
        cov = bundle.manifest["covariates"]
        x, _ = covariate_features(data["age"], data["sex"], cov["age_mean"], cov["age_sd"])
        cp = bundle.covariate_model.predict_proba(x)
        out["covariates_only"] = (cp, cp.argmax(1))
        out["fused"] = (pred.probs, pred.pred)
    return out


def _image_pred(bundle, pred) -> np.ndarray:
    from kneescreen.fusion import fuse

    f = bundle.manifest["fusion"]
    return fuse(f["method"], pred.member_probs, f.get("weights"))[1]


def evaluate_arrays(bundle, data: dict, n_boot: int = 1000) -> dict:
    y = np.asarray(data["label"], int)
    report = {"bundle_version": bundle.version, "n": int(len(y)), "predictors": {}}
    for name, (probs, pred) in predictor_outputs(bundle, data).items():
        r = classification_report(y, probs, CLASSES, pred=pred, n_boot=n_boot)
        r["low_bmd_threshold"] = low_bmd_threshold(bundle.manifest, name)
        r["low_bmd"] = binary_counts(y >= 1, (probs[:, 1] + probs[:, 2]) >= r["low_bmd_threshold"])
        report["predictors"][name] = r
    # Is the image model reading bone or age? Its accuracy within age bands.
    img_name = next(k for k in report["predictors"] if k.startswith("image_ensemble"))
    probs, pred = predictor_outputs(bundle, data)[img_name]
    bands = {}
    for band in sorted({b for b in map(age_band, data["age"]) if b}):
        m = np.array([age_band(a) == band for a in data["age"]])
        if m.sum() >= 5:
            bands[band] = {"n": int(m.sum()), "balanced_accuracy": classification_report(
                y[m], probs[m], CLASSES, pred=pred[m], n_boot=200)["balanced_accuracy"]}
    report["image_ensemble_by_age_band"] = bands
    return report


def evaluate_bundle(bundle_uri: str, data: dict, endpoint: str | None = None, n_boot: int = 1000) -> dict:
    from kneescreen.bundle import load_bundle

    return evaluate_arrays(load_bundle(bundle_uri, endpoint=endpoint), data, n_boot=n_boot)


def format_table(report: dict) -> str:
    """The evaluation table people read in a terminal."""

    def ci(r, k):
        v, lo, hi = r.get(k), r.get(f"{k}_lo"), r.get(f"{k}_hi")
        if v is None:
            return "n/a"
        return f"{v:.2f} [{lo:.2f}-{hi:.2f}]" if lo is not None and hi is not None else f"{v:.2f}"

    head = f"{'predictor':38s} {'bal.acc [95% CI]':>18s} {'macro-F1 [95% CI]':>18s} {'OP AUC [95% CI]':>18s} " \
           f"{'lowBMD sens':>18s} {'lowBMD spec':>18s} {'Brier':>6s}"
    lines = [f"n = {report['n']} held-out images, bundle {report['bundle_version']}", head, "-" * len(head)]
    for name, r in report["predictors"].items():
        op = r["per_class"]["osteoporosis"]
        lines.append(f"{name:38s} {ci(r, 'balanced_accuracy'):>18s} {ci(r, 'macro_f1'):>18s} {ci(op, 'auc'):>18s} "
                     f"{ci(r['low_bmd'], 'sensitivity'):>18s} {ci(r['low_bmd'], 'specificity'):>18s} {r['brier']:6.3f}")
    return "\n".join(lines)


def report_rows(report: dict) -> list[dict]:
    """Flat rows (one per predictor x class) for Parquet."""
    rows = []
    for name, r in report["predictors"].items():
        for cls, c in r["per_class"].items():
            rows.append({"predictor": name, "class": cls, **{k: c[k] for k in (
                "tp", "tn", "fp", "fn", "sensitivity", "sensitivity_lo", "sensitivity_hi", "specificity",
                "specificity_lo", "specificity_hi", "ppv", "npv", "f1", "auc", "auc_lo", "auc_hi", "support")},
                "balanced_accuracy": r["balanced_accuracy"], "macro_f1": r["macro_f1"], "accuracy": r["accuracy"],
                "brier": r["brier"], "ece": r["ece"], "n": r["n"]})
    return rows


def run_evaluate(bundle_uri: str, split_dir: str, out_dir: str | None = None, split: str = "test",
                 endpoint: str | None = None) -> dict:
    """Evaluate a bundle on one split of a ``split.csv``; print the table, write JSON + Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kneescreen import storage
    from kneescreen.bundle import load_bundle
    from kneescreen.datasets import load_split
    from kneescreen.train import ensure_ray, load_arrays, subset

    ensure_ray()
    bundle = load_bundle(bundle_uri, endpoint=endpoint)
    rows = [r for r in load_split(split_dir, endpoint) if r["split"] == split]
    arrays = load_arrays(rows, bundle.sizes)
    data = subset(arrays, np.ones(len(arrays["label"]), bool))
    report = evaluate_arrays(bundle, data)
    print(format_table(report))
    out_dir = out_dir or storage.join(bundle_uri, "evaluation")
    storage.write_bytes(storage.join(out_dir, f"{split}.json"), json.dumps(report, indent=2, default=float).encode(), endpoint)
    fs, path = storage.arrow_filesystem(storage.join(out_dir, f"{split}.parquet"), endpoint)
    if not storage.is_s3(out_dir):
        import pathlib

        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(report_rows(report)), path, filesystem=fs)
    return report
