"""The link audit: what happened to every listed object and every registry row, as JSON
(``OUT/link_audit.json``, schema in docs/schema.md) and as the table ``kneescreen link`` prints.

Every listed object is counted once: linked, skipped (screening's policy) or unlinked (by reason),
and ``accounted`` says the three add up to ``listed``. Gaps are |exam date - film date| in days.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from kneescreen.link.config import LinkConfig

AUDIT_FORMAT = "kneescreen-link/1"
PSEUDONYMS = ("patient_pseudo_id = HMAC-SHA256(KNEESCREEN_PSEUDONYM_KEY, id with leading/trailing whitespace "
              "trimmed); nothing else is normalised (case, leading zeros and punctuation are kept)")


def _quantile(hist: np.ndarray, q: float) -> int | None:
    """The smallest gap with at least ``q`` of the linked films at or below it (None: none linked)."""
    n = int(hist.sum())
    if n == 0:
        return None
    return int(np.searchsorted(np.cumsum(hist), q * n))


def merge_stats(results: list[dict], window: int) -> dict:
    """Partition counts added up (partitions hold disjoint patients, so sums are exact)."""
    total = {"linked": 0, "conflicting_patients": 0, "conflicting_films": 0, "registry_patients": 0, "bytes_read": 0,
             "unlinked": Counter(), "skipped": Counter(), "classes": Counter(), "sites": Counter(),
             "gap_hist": np.zeros(window + 1, dtype=np.int64)}
    for r in results:
        for k, v in r.items():
            total[k] = total[k] + v
    return total


def build_audit(cfg: LinkConfig, listed: dict, registry: dict, results: list[dict], partitions: int,
                t_cols: tuple[str, ...], timing: dict) -> dict:
    """The audit dict written to ``link_audit.json``."""
    s = merge_stats(results, cfg.window_days)
    skipped, unlinked = dict(sorted(s["skipped"].items())), dict(sorted(s["unlinked"].items()))
    return {
        "format": AUDIT_FORMAT,
        "archive": cfg.archive,  # keys in labels/ and unlinked/ are relative to this
        "registry": cfg.registry,
        "window_days": cfg.window_days,
        "registry_ids": cfg.registry_ids,
        "pseudonyms": PSEUDONYMS,
        "rule": "nearest exam of the same patient within +-window_days (tie: the earlier; same day: the lower "
                "T-score); class = WHO class of the exam's lowest site T-score",
        "counts": {"listed": listed["objects"], "linked": s["linked"], "skipped": skipped, "unlinked": unlinked,
                   "accounted": listed["objects"] == s["linked"] + sum(skipped.values()) + sum(unlinked.values()),
                   # S3 keys ending in "/" below the archive: not objects, so not listed or accounted
                   "skipped_directory_markers": listed.get("markers", 0)},
        "classes": dict(sorted(s["classes"].items())),
        "deciding_sites": dict(sorted(s["sites"].items())),
        "gap_days": {"median": _quantile(s["gap_hist"], 0.5), "p90": _quantile(s["gap_hist"], 0.9)},
        "conflicting_patients": s["conflicting_patients"],
        "conflicting_films": s["conflicting_films"],
        "registry_rows": {**registry, "patients": s["registry_patients"], "t_score_columns": list(t_cols)},
        "bytes": {"listed": listed["bytes"], "read": s["bytes_read"]},
        "partitions": partitions,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }


def _by(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def format_audit(audit: dict, out: str) -> str:
    """The table ``kneescreen link`` prints (the CLI prints; the library returns it)."""
    c, r, g = audit["counts"], audit["registry_rows"], audit["gap_days"]
    b = audit["bytes"]
    share = f" ({100 * b['read'] / b['listed']:.2f}% of {b['listed']:,})" if b["listed"] else ""
    lines = [
        f"link {audit['archive']} x {audit['registry']} (window +-{audit['window_days']} days) -> {out}",
        f"  objects listed          {c['listed']:>9,}"
        + (f"   ({c['skipped_directory_markers']:,} directory marker(s) skipped: keys ending in /)"
           if c.get("skipped_directory_markers") else ""),
        f"  skipped                 {sum(c['skipped'].values()):>9,}   {_by(c['skipped'])}",
        f"  linked                  {c['linked']:>9,}   {_by(audit['classes'])}",
        f"  unlinked                {sum(c['unlinked'].values()):>9,}   {_by(c['unlinked'])}",
        f"  gap days                median {g['median']}, p90 {g['p90']}",
        f"  deciding sites          {_by(audit['deciding_sites'])}",
        f"  conflicting patients    {audit['conflicting_patients']:>9,}   (exams in the window disagree on the class)",
        f"  registry rows           {r['rows']:>9,}   good {r['good']:,}, {r['patients']:,} patients; "
        f"bad: {_by(r['bad'])}",
        f"  header bytes read       {b['read']:>9,}{share}",
    ]
    if not c["accounted"]:
        lines.append("  WARNING: linked + skipped + unlinked != listed (see the log)")
    return "\n".join(lines)
