"""The report's "Referral worklist" section: patients per triage zone, the expected yield of the
DXA referrals, the scans avoided, the achieved NPV / PPV where reference labels exist, the
T-score estimate's accuracy, a prevalence-shift warning, and the highest-risk patients by
pseudonymous id only.

Inputs: the latest committed run's patients snapshot (`screen.patients`), the current image rows
and the bundle manifest (its triage zones state the out-of-fold prevalence they hold at).

Referrals are the ``refer`` zone: ``rule_out`` and ``rule_in`` patients are triaged without DXA
(Hsieh et al. 2021). The expected osteoporosis yield per 100 referrals is the mean deciding-film
P(osteoporosis) of the referred patients x 100, with a normal-approximation interval of the sum
of Bernoulli(p) outcomes (its variance is sum p(1 - p)); with reference labels the observed yield
and its Wilson interval are shown beside it.

Prevalence rule (`kneescreen.triage.PREVALENCE_RULE`): the screened low-BMD prevalence is the
observed one among patients with reference labels, else the mean low-BMD risk of the current
images (calibrated probabilities); each zone's NPV / PPV is restated at it and the report warns
when the restated value falls below the zone's target.
"""

from __future__ import annotations

import dataclasses
import html
import io
import logging
import math

import numpy as np
import pandas as pd

from kneescreen.labels import CLASSES
from kneescreen.metrics import Z95, wilson
from kneescreen.model.tscore import regression_summary
from kneescreen.triage import PREVALENCE_RULE, value_at_prevalence, zone_summary

TOP_PATIENTS = 20
_logger = logging.getLogger(__name__)


def load_worklist_inputs(store, runs: list[dict]) -> tuple[pd.DataFrame | None, dict | None]:
    """(the latest committed patients snapshot, the bundle's triage as a dict); None where absent
    (runs written before the patients table; a bundle no longer readable)."""
    import pyarrow.dataset as pads

    from kneescreen.model.bundle import read_manifest

    latest = next((r for r in reversed(runs) if r.get("patients")), None)
    if latest is None:
        return None, None
    fs, path = store.filesystem(latest["patients"])
    patients = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table().to_pandas()
    try:
        triage = read_manifest(latest["bundle"], store).triage
    except Exception as exc:  # noqa: BLE001 - the section still shows what the Parquet output holds
        _logger.warning("report: bundle %s unreadable (%s); no prevalence check", latest.get("bundle"), exc)
        triage = None
    return patients, dataclasses.asdict(triage) if triage else None


def _pct(v, lo=None, hi=None, scale: float = 100.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    s = f"{v * scale:.1f}"
    return s + (f" [{lo * scale:.1f}-{hi * scale:.1f}]" if lo is not None and hi is not None else "")


def worklist_figures(patients: pd.DataFrame, triage: dict | None = None) -> dict:
    """The section's numbers as data (tests and docs read these).

    Args:
        patients: the snapshot (`schema.PATIENTS` columns).
        triage: the bundle manifest's ``triage`` as a dict (None: the bundle has none).
    """
    n = len(patients)
    zones = patients["triage_zone"].fillna("refer") if n else pd.Series(dtype=object)
    out: dict = {"patients": n, "zones": {}}
    for z in ("rule_out", "refer", "rule_in"):
        k = int((zones == z).sum())
        out["zones"][z] = {"n": k, "fraction": wilson(k, n)}
    refer = patients[zones == "refer"]
    p = refer["p_osteoporosis"].dropna().to_numpy(float)
    if len(p):
        half = Z95 * math.sqrt(float((p * (1 - p)).sum())) / len(p)
        out["expected_yield"] = (float(p.mean()), max(0.0, p.mean() - half), min(1.0, p.mean() + half))
    ref = refer[refer["reference_label"].isin(CLASSES)]
    if len(ref):
        out["observed_yield"] = wilson(int((ref["reference_label"] == CLASSES[-1]).sum()), len(ref))
    out["avoided"] = wilson(n - len(refer), n)
    labelled = patients[patients["reference_label"].isin(CLASSES)]
    if len(labelled):
        out["achieved"] = zone_summary(zones[labelled.index].to_numpy(object), (labelled["reference_label"] != "normal").to_numpy())
        out["screened_prevalence"] = ("reference labels", float((labelled["reference_label"] != "normal").mean()))
    elif n:
        out["screened_prevalence"] = ("mean low-BMD risk", float(patients["risk_score"].mean()))
    out["warnings"] = _prevalence_warnings(triage, out.get("screened_prevalence"))
    return out


def _prevalence_warnings(triage: dict | None, screened) -> list[str]:
    if not triage or not screened:
        return []
    warnings = []
    for name, metric in (("rule_out", "NPV"), ("rule_in", "PPV")):
        zone = triage[name]
        restated = value_at_prevalence(zone, screened[1])
        if restated is not None and restated < zone["target"]:
            warnings.append(f"{name}: screened low-BMD prevalence {screened[1]:.2f} ({screened[0]}) against "
                            f"{triage['prevalence']:.2f} in training restates its {metric} to {restated:.3f}, below "
                            f"the target {zone['target']}; treat this zone as refer until the bundle is recalibrated")
    return warnings


def _rows(cells: list[list[str]]) -> str:
    return "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells)


def _top_table(patients: pd.DataFrame) -> str:
    top = patients.sort_values("risk_score", ascending=False).head(TOP_PATIENTS)
    rows = []
    for _, r in top.iterrows():
        pid = html.escape(str(r["patient_pseudo_id"])) if isinstance(r["patient_pseudo_id"], str) else "(no patient id)"
        t = "n/a" if pd.isna(r["t_score_est"]) else f"{r['t_score_est']:.1f} [{r['t_score_lo']:.1f}, {r['t_score_hi']:.1f}]"
        rows.append([f"<code>{pid}</code>", f"{r['risk_score']:.2f}", html.escape(str(r["triage_zone"] or "")), t,
                     str(int(r["n_images"])), html.escape(str(r["last_study_date"] or ""))])
    return ("<table><tr><th>patient (pseudonymous id)</th><th>low-BMD risk</th><th>zone</th><th>T-score est. "
            "[interval]</th><th>films</th><th>last study</th></tr>" + _rows(rows) + "</table>")


def worklist_html(patients: pd.DataFrame, images: pd.DataFrame, triage: dict | None) -> str:
    """The "Referral worklist" section (HTML)."""
    f = worklist_figures(patients, triage)
    parts = ["<h2>Referral worklist</h2>"]
    if triage:
        parts.append(f"<p class='note'>Zones from the bundle: rule-out risk &lt; {triage['rule_out'].get('threshold')}, "
                     f"rule-in risk &ge; {triage['rule_in'].get('threshold')} (out-of-fold prevalence "
                     f"{triage['prevalence']:.2f}); an empty zone's threshold is None. {html.escape(PREVALENCE_RULE)}.</p>")
    cells = [[z, str(v["n"]), _pct(*v["fraction"])] for z, v in f["zones"].items()]
    parts.append("<table><tr><th>zone</th><th>patients</th><th>% of patients (95% CI)</th></tr>" + _rows(cells) + "</table>")
    lines = [f"DXA scans avoided against referring everyone: {_pct(*f['avoided'])} per 100 patients"]
    if len(images) and "triage_zone" in images:
        films = images.loc[images["status"] == "ok", "triage_zone"].dropna()
        if len(films):
            lines.append(f"films triaged (rule-out or rule-in): {_pct(*wilson(int((films != 'refer').sum()), len(films)))}% "
                         f"of {len(films)} screened films")
    if "expected_yield" in f:
        lines.append(f"expected osteoporosis yield: {_pct(*f['expected_yield'])} per 100 referrals (model)")
    if "observed_yield" in f:
        lines.append(f"observed osteoporosis yield: {_pct(*f['observed_yield'])} per 100 referrals (reference labels)")
    if "achieved" in f:
        a = f["achieved"]
        lines.append(f"achieved with reference labels: rule-out NPV {_pct(a['rule_out']['value'], a['rule_out']['lo'], a['rule_out']['hi'])}%, "
                     f"rule-in PPV {_pct(a['rule_in']['value'], a['rule_in']['lo'], a['rule_in']['hi'])}% (Clopper-Pearson 95%)")
    lines += [f"<span class='warn'>{html.escape(w)}</span>" for w in f["warnings"]]
    ok = images[(images["status"] == "ok") & images["reference_t_score"].notna()] if len(images) else images
    if "t_score_est" in ok and ok["t_score_est"].notna().any():
        ok = ok[ok["t_score_est"].notna()]
        s = regression_summary(ok["reference_t_score"], ok["t_score_est"], ok["t_score_lo"], ok["t_score_hi"])
        r = "n/a" if s["pearson_r"] is None else f"{s['pearson_r']:.2f}"
        lines.append(f"T-score estimate on {s['n']} films with a reference: MAE {s['mae']:.2f}, Pearson r {r}, "
                     f"interval coverage {_pct(s['coverage'], s['coverage_lo'], s['coverage_hi'])}%")
    parts.append("<ul>" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>")
    parts.append(f"<h3>Highest-risk patients (top {TOP_PATIENTS})</h3>" + _top_table(patients))
    return "".join(parts)


def worklist_section(store, runs: list[dict], current: pd.DataFrame) -> str:
    """The section's HTML from the latest committed patients snapshot ("" before any run wrote one)."""
    patients, triage = load_worklist_inputs(store, runs)
    return "" if patients is None else worklist_html(patients, current, triage)


def fig_t_score(images: pd.DataFrame) -> bytes | None:
    """Estimated vs reference T-score with the intervals (None without both)."""
    ok = images[(images["status"] == "ok") & images["reference_t_score"].notna()] if len(images) else images
    if "t_score_est" not in ok or not ok["t_score_est"].notna().any():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = ok[ok["t_score_est"].notna()]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.errorbar(ok["reference_t_score"], ok["t_score_est"], yerr=[ok["t_score_est"] - ok["t_score_lo"],
                ok["t_score_hi"] - ok["t_score_est"]], fmt="o", ms=3, alpha=0.5, elinewidth=0.5)
    lim = [float(np.nanmin(ok[["reference_t_score", "t_score_lo"]].to_numpy())),
           float(np.nanmax(ok[["reference_t_score", "t_score_hi"]].to_numpy()))]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("reference T-score")
    ax.set_ylabel("estimated T-score (interval)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
