"""`kneescreen evaluate`: every member, the image ensemble, covariates-only and the fused model
on held-out images, with intervals; JSON + Parquet, and the table the CLI prints (`format_table`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kneescreen._private.cluster import ensure_ray
from kneescreen.config import dump_yaml, opt
from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES, age_bands, to_floats
from kneescreen.metrics import binary_counts, classification_report, paired_bootstrap, partial_spearman
from kneescreen.model.bundle import Bundle, load_bundle
from kneescreen.train.data import TrainingData, bundle_logits, load_split_data
from kneescreen.train.referral_eval import referral_figures

_logger = logging.getLogger(__name__)


def with_logits(bundle: Bundle, data: TrainingData) -> dict:
    """The rows' metadata plus ``member_logits``: every member's logits, computed in Ray Data tasks
    from the decoded blocks (the images never reach the driver)."""
    return {**data.meta, "member_logits": bundle_logits(data, bundle.manifest, bundle.states())}


def predictor_outputs(bundle: Bundle, data: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (probs, pred): members, the image ensemble, covariates-only, the fused model (kept in
    every bundle with age/sex, deployed or not) and ``deployed`` (what screening writes).

    Args:
        data: ``label``, ``age``, ``sex`` and either ``member_logits`` (`with_logits`) or
            ``images`` (input key -> uint8 arrays, scored here).
    """
    if "member_logits" in data:
        pred = bundle.predict_logits(data["member_logits"], data["age"], data["sex"])
    else:
        pred = bundle.predict(data["images"], data["age"], data["sex"])
    rule = bundle.manifest.fusion.method
    out = {}
    for spec, p in zip(bundle.manifest.members, pred.member_probs):
        out[f"member:{spec.name}"] = (p, p.argmax(1))
    out[f"image_ensemble:{rule}"] = (pred.image_probs, bundle.image_ensemble(pred.member_probs)[1])
    if bundle.covariate_model is not None:
        cp, imputed = bundle.covariate_probs(data["age"], data["sex"])
        out["covariates_only"] = (cp, cp.argmax(1))
        if bundle.stacker is not None:
            fused = np.where(imputed[:, None], pred.image_probs, bundle.stacker.predict_proba(cp, pred.image_probs))
            out[f"fused:{rule}"] = (fused, fused.argmax(1))
    out["deployed"] = (pred.probs, pred.pred)
    return out


def image_value(outputs: dict, y: np.ndarray, ages: list, sexes: list, t_scores: list, n_boot: int = 2000) -> dict:
    """What the radiograph adds over age and sex, stated with intervals.

    Args:
        outputs: predictor name -> (probs, pred), or -> {"probs": [arrays]} pooled over folds.

    Returns:
        ``paired``: for the image ensemble, the fused model and the deployed predictor, the
        paired-bootstrap difference against covariates_only in balanced accuracy, AUCs and Brier;
        ``t_score_partial_spearman``: the pre-stated test, Spearman partial correlation between
        the image ensemble's low-BMD score and the T-score given age and sex (permutation p).
    """
    probs = {n: np.concatenate(v["probs"]) if isinstance(v, dict) else v[0] for n, v in outputs.items()}
    out: dict = {"paired": {}}
    if "covariates_only" in probs:
        for name in [n for n in probs if n.startswith(("image_ensemble", "fused", "deployed"))]:
            out["paired"][name] = paired_bootstrap(y, probs[name], probs["covariates_only"], n_boot=n_boot)
    image = next((probs[n] for n in probs if n.startswith("image_ensemble")), None)
    age, t = to_floats(ages), to_floats(t_scores)
    sex = np.asarray(sexes, dtype=object).reshape(-1)
    female = np.where(np.equal(sex, None), np.nan, np.char.startswith(np.char.upper(sex.astype(str)), "F"))
    if image is not None and np.isfinite(t).sum() >= 8:
        out["t_score_partial_spearman"] = partial_spearman(image[:, 1] + image[:, 2], t, np.column_stack([age, female]))
    return out


def _by_age_band(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, ages: list) -> dict:
    """Is the image model reading bone or age? Its balanced accuracy within age bands."""
    bands, of_row = {}, age_bands(ages)
    for band in sorted({b for b in of_row if b}):
        m = of_row == band
        if m.sum() >= 5:
            bands[band] = {"n": int(m.sum()), "balanced_accuracy": classification_report(
                y[m], probs[m], CLASSES, pred=pred[m], n_boot=200)["balanced_accuracy"]}
    return bands


def evaluate_arrays(bundle: Bundle, data, n_boot: int = 1000) -> dict:
    """Every predictor of ``bundle`` on labelled rows, with intervals (JSON-ready dict).

    Args:
        data: `TrainingData` (scored in Ray Data tasks) or a dict as `predictor_outputs` takes.
    """
    if isinstance(data, TrainingData):
        data = with_logits(bundle, data)
    y = np.asarray(data["label"], int)
    report = {"bundle_version": bundle.version, "n": int(len(y)), "predictors": {}}
    outputs = predictor_outputs(bundle, data)
    for name, (probs, pred) in outputs.items():
        r = classification_report(y, probs, CLASSES, pred=pred, n_boot=n_boot)
        r["low_bmd_threshold"] = bundle.manifest.low_bmd_threshold(name)
        r["low_bmd"] = binary_counts(y >= 1, (probs[:, 1] + probs[:, 2]) >= r["low_bmd_threshold"])
        report["predictors"][name] = r
    probs, pred = outputs[f"image_ensemble:{bundle.manifest.fusion.method}"]
    report["image_ensemble_by_age_band"] = _by_age_band(y, probs, pred, data["age"])
    report["deployed"] = bundle.manifest.selection["deployed"] if bundle.manifest.selection else bundle.manifest.predictor
    t_scores = data.get("t_score")
    report["image_value"] = image_value(outputs, y, data["age"], data["sex"],
                                        [None] * len(y) if t_scores is None else t_scores)
    report.update(referral_figures(bundle, data))  # triage zones and the T-score estimate
    return report


def evaluate_bundle(bundle_uri: str, data, store: Store | None = None, n_boot: int = 1000) -> dict:
    return evaluate_arrays(load_bundle(bundle_uri, store=store), data, n_boot=n_boot)


def format_table(report: dict, compact: bool = False) -> str:
    """The evaluation table people read in a terminal.

    Args:
        compact: only the image ensemble, covariates-only and deployed rows, and what the
            deployed predictor adds (the demo's summary).
    """

    def ci(r, k):
        v, lo, hi = r.get(k), r.get(f"{k}_lo"), r.get(f"{k}_hi")
        if v is None:
            return "n/a"
        return f"{v:.2f} [{lo:.2f}-{hi:.2f}]" if lo is not None and hi is not None else f"{v:.2f}"

    head = f"{'predictor':38s} {'bal.acc [95% CI]':>18s} {'macro-F1 [95% CI]':>18s} {'OP AUC [95% CI]':>18s} " \
           f"{'lowBMD sens':>18s} {'lowBMD spec':>18s} {'Brier':>6s}"
    lines = [f"n = {report['n']} held-out images, bundle {report['bundle_version']}", head, "-" * len(head)]
    for name, r in report["predictors"].items():
        if compact and not name.startswith(("image_ensemble", "covariates_only", "deployed")):
            continue
        op = r["per_class"]["osteoporosis"]
        lines.append(f"{name:38s} {ci(r, 'balanced_accuracy'):>18s} {ci(r, 'macro_f1'):>18s} {ci(op, 'auc'):>18s} "
                     f"{ci(r['low_bmd'], 'sensitivity'):>18s} {ci(r['low_bmd'], 'specificity'):>18s} {r['brier']:6.3f}")
    value = report.get("image_value") or {}
    if compact:
        value = {**value, "paired": {k: v for k, v in value.get("paired", {}).items() if k == "deployed"}}
    lines += format_image_value(value)
    return "\n".join(lines)


def format_image_value(value: dict) -> list[str]:
    """Lines stating what the image adds over age + sex (paired bootstrap, T-score test)."""
    lines = []
    for name, diffs in value.get("paired", {}).items():
        parts = []
        for metric, label in (("balanced_accuracy", "bal.acc"), ("auc_low_bmd", "lowBMD AUC"), ("brier", "Brier")):
            d = diffs[metric]
            if d["diff"] is not None:
                parts.append(f"{label} {d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]")
        if parts:
            lines.append(f"{name} minus covariates_only (paired bootstrap 95% CI): " + ", ".join(parts))
    t = value.get("t_score_partial_spearman")
    if t and t["rho"] is not None:
        lines.append(f"image score vs T-score given age and sex: Spearman partial rho {t['rho']:+.2f}, "
                     f"permutation p = {t['p_value']:.3f} (n = {t['n']})")
    return lines


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


@dataclass(frozen=True)
class EvaluateConfig:
    """``kneescreen evaluate`` settings."""

    bundle: str = opt(help="bundle folder or s3:// prefix")
    split_dir: str = opt(help="folder or prefix holding split.csv (from `split` or `train`)")
    split: str = opt("test", "which split to evaluate on", choices=("train", "val", "test"))
    out: str | None = opt(None, "where to write <split>.json/.parquet (default: <bundle>/evaluation)")
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")


def run_evaluate(cfg: EvaluateConfig, store: Store | None = None) -> dict:
    """Evaluate a bundle on one split of a ``split.csv``; write JSON + Parquet.

    Returns:
        The report (`evaluate_arrays`); `format_table` renders it for a terminal.
    """
    store = store or Store.resolve(cfg.endpoint_url)
    ensure_ray()
    bundle = load_bundle(cfg.bundle, store=store)
    data, _ = load_split_data(cfg.split_dir, bundle.manifest.input_keys, store, splits=(cfg.split,))
    report = evaluate_arrays(bundle, data)
    out_dir = cfg.out or join(cfg.bundle, "evaluation")
    store.write_bytes(join(out_dir, f"{cfg.split}.json"), json.dumps(report, indent=2, default=float).encode())
    store.write_parquet(pa.Table.from_pylist(report_rows(report)), join(out_dir, f"{cfg.split}.parquet"))
    store.write_bytes(join(out_dir, f"{cfg.split}_config.yaml"), dump_yaml(cfg).encode())
    return report
