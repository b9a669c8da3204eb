"""`kneescreen report`: a self-contained HTML report (plus PNG figures) from the Parquet output.

Reads only what `screen` wrote (committed runs), locally or from S3:
- prevalence of each risk class overall and by site, manufacturer, sex and age band (current
  state: the latest committed prediction per object);
- with reference labels: confusion-matrix heat map, metric table with 95% intervals, ROC curves
  (one-vs-rest and low-BMD) and a calibration curve of the low-BMD risk score;
- error and skip reasons; the per-patient referral worklist (`report_referral`: + the bundle's zones);
- trends across runs: low-BMD prevalence with intervals and throughput per run, by model version,
  with a drift flag when consecutive intervals do not overlap.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from kneescreen.config import opt
from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES
from kneescreen.metrics import binary_counts, confusion_matrix, paired_bootstrap, partial_spearman, roc_auc, wilson
from kneescreen.report_referral import fig_t_score, worklist_section
from kneescreen.screen.ledger import committed_runs

_logger = logging.getLogger(__name__)
COLOURS = {"normal": "#4c9f70", "osteopenia": "#f2b134", "osteoporosis": "#d1495b"}


@dataclass(frozen=True)
class ReportConfig:
    """``kneescreen report`` settings."""

    output: str = opt(help="the screening output root (folder or s3:// prefix)")
    out: str = opt(help="local folder for report.html and the figures")
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")


def load_output(store: Store, output: str):
    """(runs, predictions of committed runs, stats of committed runs) as pandas frames."""
    runs = committed_runs(store, output)
    if not runs:
        raise KneescreenError(f"{output}: no committed screening runs (runs/*.json); run `kneescreen screen` first")
    ids = {r["run_id"] for r in runs}
    frames = {}
    for table in ("predictions", "stats"):
        fs, path = store.filesystem(join(output, table))
        try:
            df = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()
        except (FileNotFoundError, OSError):
            df = pd.DataFrame()
        for col in ("run_id", "model_version"):
            if col in df:
                df[col] = df[col].astype(str)
        frames[table] = df[df["run_id"].isin(ids)] if len(df) else df
    return runs, frames["predictions"], frames["stats"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _latest_per_object(pred, runs):
    order = {r["run_id"]: r["finished_at"] for r in runs}
    pred = pred.assign(_finished=pred["run_id"].map(order))
    return pred.sort_values("_finished").drop_duplicates("key", keep="last").drop(columns="_finished")


def fig_prevalence(current):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = current[current["status"] == "ok"]
    groups = [("all", None), ("site", "site"), ("manufacturer", "manufacturer"), ("sex", "sex"), ("age band", "age_band")]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = grid.ravel()
    axes[-1].axis("off")
    for ax, (title, col) in zip(axes, groups):
        keys = ["all"] if col is None else sorted(ok[col].fillna("unknown").astype(str).unique())
        bottom = np.zeros(len(keys))
        for cls in CLASSES:
            vals = []
            for k in keys:
                sub = ok if col is None else ok[ok[col].fillna("unknown").astype(str) == k]
                vals.append((sub["predicted_class"] == cls).mean() if len(sub) else 0)
            ax.bar(range(len(keys)), vals, bottom=bottom, color=COLOURS[cls], label=cls, width=0.7)
            bottom += np.asarray(vals)
        ns = [len(ok) if col is None else int((ok[col].fillna("unknown").astype(str) == k).sum()) for k in keys]
        ax.set_xticks(range(len(keys)), [f"{k}\nn={n}" for k, n in zip(keys, ns)], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"by {title}" if col else "overall", fontsize=10)
        ax.set_ylim(0, 1)
    for ax in (axes[0], axes[3]):
        ax.set_ylabel("share of screened images")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", fontsize=10, title="predicted class (latest per image)")
    fig.tight_layout()
    return _png(fig)


def fig_confusion(labelled):
    import matplotlib.pyplot as plt

    y = labelled["reference_label"].map(CLASSES.index).to_numpy()
    p = labelled["predicted_class"].map(CLASSES.index).to_numpy()
    cm = confusion_matrix(y, p, len(CLASSES))
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{cm[i, j]}\n{rows[i, j]:.0%}", ha="center", va="center",
                    color="white" if rows[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(3), CLASSES, rotation=20)
    ax.set_yticks(range(3), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("Confusion matrix (row-normalised)", fontsize=10)
    return _png(fig), cm


def _roc_points(truth, score):
    order = np.argsort(-score)
    t = truth[order].astype(bool)
    tpr = np.concatenate([[0], np.cumsum(t) / max(t.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~t) / max((~t).sum(), 1)])
    return fpr, tpr


def fig_roc_calibration(labelled):
    import matplotlib.pyplot as plt

    y = labelled["reference_label"].map(CLASSES.index).to_numpy()
    probs = labelled[["p_normal", "p_osteopenia", "p_osteoporosis"]].to_numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 4))
    curves = [(f"{c} vs rest", y == i, probs[:, i], COLOURS[c]) for i, c in enumerate(CLASSES)]
    curves.append(("low BMD", y >= 1, labelled["risk_score"].to_numpy(), "#333333"))
    for name, truth, score, colour in curves:
        if truth.all() or not truth.any():
            continue
        fpr, tpr = _roc_points(truth, score)
        ax1.plot(fpr, tpr, color=colour, label=f"{name} (AUC {roc_auc(truth, score):.2f})")
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set_xlabel("1 - specificity")
    ax1.set_ylabel("sensitivity")
    ax1.set_title("ROC", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    risk, truth = labelled["risk_score"].to_numpy(), (y >= 1)
    edges = np.linspace(0, 1, 11)
    xs, ys, los, his, ns = [], [], [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (risk >= lo) & (risk < hi if hi < 1 else risk <= hi)
        if m.sum():
            p, l, h = wilson(int(truth[m].sum()), int(m.sum()))
            xs.append(risk[m].mean())
            ys.append(p)
            los.append(max(0.0, p - l))  # Wilson bounds can sit a rounding error past p
            his.append(max(0.0, h - p))
            ns.append(int(m.sum()))
    ax2.errorbar(xs, ys, yerr=[los, his], fmt="o-", color="#333333", capsize=3)
    for x, yv, n in zip(xs, ys, ns):
        ax2.annotate(f"n={n}", (x, yv), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax2.plot([0, 1], [0, 1], ":", color="grey")
    ax2.set_xlabel("predicted low-BMD risk")
    ax2.set_ylabel("observed low-BMD rate (Wilson 95% CI)")
    ax2.set_title("Calibration of the low-BMD risk score", fontsize=10)
    return _png(fig)


def fig_errors(current):
    import matplotlib.pyplot as plt

    bad = current[current["status"] != "ok"]
    counts = bad.groupby(["status", "error_code"]).size().sort_values()
    fig, ax = plt.subplots(figsize=(6, max(1.8, 0.35 * len(counts) + 0.8)))
    labels = [f"{s}: {c}" for s, c in counts.index]
    ax.barh(range(len(counts)), counts.to_numpy(),
            color=["#d1495b" if s == "error" else "#8d99ae" for s, _ in counts.index])
    ax.set_yticks(range(len(counts)), labels, fontsize=8)
    ax.set_xlabel("objects")
    ax.set_title(f"Errors and skips ({len(bad)} of {len(current)} objects)", fontsize=10)
    return _png(fig)


def trend_rows(runs, stats) -> list[dict]:
    rows = []
    for r in runs:
        s = stats[(stats["run_id"] == r["run_id"]) & (stats["subgroup_type"] == "all") & (stats["target"] == "low_bmd")
                  & (stats["metric"] == "prevalence")] if len(stats) else stats
        v = s.iloc[0] if len(s) else None
        rows.append({"run_id": r["run_id"], "model_version": r["model_version"], "finished_at": r["finished_at"],
                     "screened": r["counts"]["screened"], "throughput": r.get("throughput_images_per_s"),
                     "low_bmd_prevalence": None if v is None or v["value"] != v["value"] else float(v["value"]),
                     "ci_lo": None if v is None else v["ci_lo"], "ci_hi": None if v is None else v["ci_hi"]})
    prev = None
    for row in rows:
        row["drift"] = False
        if row["low_bmd_prevalence"] is None:
            continue
        if prev is not None and (row["ci_lo"] > prev["ci_hi"] or row["ci_hi"] < prev["ci_lo"]):
            row["drift"] = True  # non-overlapping Wilson intervals between consecutive screened runs
        prev = row
    return rows


def fig_trend(rows):
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    versions = sorted({r["model_version"] for r in rows})
    marks = dict(zip(versions, "osD^v<>"))
    for i, r in enumerate(rows):
        if r["low_bmd_prevalence"] is not None:
            ax1.errorbar(i, r["low_bmd_prevalence"], yerr=[[max(0.0, r["low_bmd_prevalence"] - r["ci_lo"])],
                                                           [max(0.0, r["ci_hi"] - r["low_bmd_prevalence"])]],
                         fmt=marks[r["model_version"]], color="#d1495b" if r["drift"] else "#333333", capsize=3)
        if r["throughput"]:
            ax2.bar(i, r["throughput"], color="#4c9f70")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(rows)), [r["run_id"][:15] for r in rows], rotation=30, ha="right", fontsize=7)
    ax1.set_ylabel("low-BMD prevalence (95% CI)")
    ax1.set_title("Low-BMD prevalence per run (marker = model version; red = drift)", fontsize=9)
    ax2.set_ylabel("images / s")
    ax2.set_title("Screening throughput per run (runs with new images)", fontsize=9)
    return _png(fig)


def _metric_table(labelled) -> list[dict]:
    y = labelled["reference_label"].map(CLASSES.index).to_numpy()
    p = labelled["predicted_class"].map(CLASSES.index).to_numpy()
    rows = []
    targets = [(c, y == i, p == i) for i, c in enumerate(CLASSES)]
    targets.append(("low BMD (flag)", y >= 1, labelled["low_bmd_flag"].astype(bool).to_numpy()))
    for name, truth, flag in targets:
        bc = binary_counts(truth, flag)
        rows.append({"target": name, **bc})
    return rows


MIN_SITE_ROWS = 20  # labelled images a site needs before its own paired comparison is shown


def image_value_rows(labelled, n_boot: int = 1000) -> list[dict]:
    """What the radiograph adds: deployed and image-only minus covariates-only, overall and per site.

    Paired bootstrap on the labelled rows that have both the image's and the age/sex model's
    probabilities (a row without age or sex has no covariates-only prediction to compare with).
    """
    have = labelled[labelled["covariates_probs"].notna() & labelled["image_probs"].notna()]
    groups = [("all", have)] + [(f"site {s}", g) for s, g in have.groupby(have["site"].fillna("unknown"))
                                if len(g) >= MIN_SITE_ROWS and have["site"].nunique() > 1]
    rows = []
    for group, g in groups:
        if len(g) < 10:
            continue
        y = g["reference_label"].map(CLASSES.index).to_numpy()
        cov = np.stack(g["covariates_probs"].to_numpy())
        for name, probs in (("deployed", g[["p_normal", "p_osteopenia", "p_osteoporosis"]].to_numpy(float)),
                            ("image only", np.stack(g["image_probs"].to_numpy()))):
            diffs = paired_bootstrap(y, probs, cov, n_boot=n_boot)
            rows.append({"group": group, "predictor": name, "n": len(g), **diffs})
    return rows


def _image_value_html(labelled) -> str:
    rows = image_value_rows(labelled)
    if not rows:
        return ""
    cells = "".join(
        f"<tr><td>{html.escape(r['group'])}</td><td>{html.escape(r['predictor'])}</td><td>{r['n']}</td>"
        + "".join(f"<td>{_fmt_diff(r[m])}</td>"
                  for m in ("balanced_accuracy", "auc_osteoporosis", "auc_low_bmd", "brier")) + "</tr>"
        for r in rows)
    text = ("<h2>What the radiograph adds over age and sex</h2><p>Difference against the age + sex model on the "
            "same labelled images (paired bootstrap, 95% interval); an interval that includes 0 means this "
            "output cannot tell the two apart. Lower Brier is better.</p>"
            "<table><tr><th>images</th><th>predictor</th><th>n</th><th>balanced accuracy</th>"
            "<th>osteoporosis AUC</th><th>low-BMD AUC</th><th>Brier</th></tr>" + cells + "</table>")
    t = labelled[labelled["reference_t_score"].notna() & labelled["image_probs"].notna()]
    if len(t) >= 8:
        img = np.stack(t["image_probs"].to_numpy())
        sex = t["sex"].map({"F": 1.0, "M": 0.0}).to_numpy(float)
        test = partial_spearman(img[:, 1] + img[:, 2], t["reference_t_score"].to_numpy(float),
                                np.column_stack([t["age"].to_numpy(float), sex]))
        if test["rho"] is not None:
            text += (f"<p>Image low-BMD score against the T-score given age and sex: Spearman partial "
                     f"rho {test['rho']:+.2f}, permutation p = {test['p_value']:.3f} (n = {test['n']}).</p>")
    return text


def _fmt_diff(d: dict) -> str:
    if d["diff"] is None:
        return "n/a"
    return f"{d['diff']:+.2f} ({d['lo']:+.2f} to {d['hi']:+.2f})"


def _fmt(v, lo=None, hi=None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.2f} ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else f"{v:.2f}"


def _agreement_table(labelled) -> str:
    trs = "".join(
        f"<tr><td>{html.escape(r['target'])}</td><td>{r['tp']}</td><td>{r['fp']}</td><td>{r['fn']}</td><td>{r['tn']}</td>"
        f"<td>{_fmt(r['sensitivity'], r['sensitivity_lo'], r['sensitivity_hi'])}</td>"
        f"<td>{_fmt(r['specificity'], r['specificity_lo'], r['specificity_hi'])}</td>"
        f"<td>{_fmt(r['ppv'], r['ppv_lo'], r['ppv_hi'])}</td><td>{_fmt(r['npv'], r['npv_lo'], r['npv_hi'])}</td>"
        f"<td>{_fmt(r['f1'])}</td></tr>" for r in _metric_table(labelled))
    return ("<h2>Agreement with reference labels</h2><p>n = %d labelled images; 95%% Wilson intervals.</p>"
            "<table><tr><th>target</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th><th>sensitivity</th>"
            "<th>specificity</th><th>PPV</th><th>NPV</th><th>F1</th></tr>%s</table>" % (len(labelled), trs))


def _summary(current, runs, trend) -> str:
    latest = runs[-1]
    summary = (f"<p><b>{len(current)}</b> objects in the archive's current state across <b>{len(runs)}</b> committed "
               f"run(s); latest run <code>{html.escape(latest['run_id'])}</code> with model "
               f"<code>{html.escape(latest['model_version'])}</code>: {json.dumps(latest['counts'])}.</p>")
    drift = [r for r in trend if r["drift"]]
    if drift:
        summary += ("<p class='warn'>Drift: low-BMD prevalence moved beyond its 95% interval in run(s) "
                    + ", ".join(html.escape(r["run_id"]) for r in drift) + ".</p>")
    return summary


def _document(output: str, summary: str, sections: list[str], trend: list[dict]) -> str:
    runs_rows = "".join(
        f"<tr><td>{html.escape(r['run_id'])}</td><td>{html.escape(r['model_version'])}</td><td>{r['screened']}</td>"
        f"<td>{_fmt(r['low_bmd_prevalence'], r['ci_lo'], r['ci_hi'])}</td><td>{r['throughput'] or ''}</td>"
        f"<td>{'yes' if r['drift'] else ''}</td></tr>" for r in trend)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>kneescreen report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1150px;margin:24px auto;color:#222;padding:0 16px}}
h1{{font-size:22px}}h2{{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}}
img{{max-width:100%}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.warn{{color:#b00020;font-weight:600}}code{{background:#f3f3f3;padding:1px 4px}}
.note{{color:#555;font-size:13px}}</style></head><body>
<h1>kneescreen screening report</h1>
<p class="note">Output <code>{html.escape(output)}</code>, generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the committed Parquet output only.
A screening flag is a prompt for DXA referral, not a diagnosis.</p>
{summary}
{''.join(sections)}
<h2>Runs</h2><table><tr><th>run</th><th>model</th><th>screened</th><th>low-BMD prevalence (95% CI)</th><th>images/s</th><th>drift</th></tr>{runs_rows}</table>
</body></html>"""


def build_report(output: str, out_dir: str, store: Store | None = None) -> str:
    """Write report.html and the PNG figures into the local folder ``out_dir``; returns the HTML path."""
    store = store or Store.resolve()
    runs, pred, stats = load_output(store, output)
    os.makedirs(out_dir, exist_ok=True)
    current = _latest_per_object(pred, runs) if len(pred) else pred
    figures: list[tuple[str, str, bytes]] = []
    ok = current[current["status"] == "ok"] if len(current) else current
    if len(ok):
        figures.append(("prevalence", "Risk class prevalence", fig_prevalence(current)))
    labelled = ok[ok["reference_label"].notna()] if len(ok) else ok
    table_html = ""
    if len(labelled) >= 5:
        figures.append(("confusion", "Confusion matrix against reference labels", fig_confusion(labelled)[0]))
        figures.append(("roc_calibration", "ROC and calibration", fig_roc_calibration(labelled)))
        table_html = _agreement_table(labelled) + _image_value_html(labelled)
    if len(current) and (current["status"] != "ok").any():
        figures.append(("errors", "Errors and skips", fig_errors(current)))
    if (t_fig := fig_t_score(current) if len(current) else None):
        figures.append(("t_score", "Estimated vs reference T-score", t_fig))
    trend = trend_rows(runs, stats)
    figures.append(("trend", "Trends across runs", fig_trend(trend)))
    sections: list[str] = []
    for name, title, data in figures:
        with open(os.path.join(out_dir, f"{name}.png"), "wb") as fh:
            fh.write(data)
        if name == "errors" and table_html:
            sections.append(table_html)
            table_html = ""
        sections.append(f"<h2>{html.escape(title)}</h2><img alt='{name}' src='data:image/png;base64,"
                        f"{base64.b64encode(data).decode()}'>")
    if table_html:
        sections.insert(1, table_html)
    sections.insert(0, worklist_section(store, runs, current))
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_document(output, _summary(current, runs, trend), sections, trend))
    return path
