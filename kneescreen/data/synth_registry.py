"""A synthetic DXA registry beside the synthetic archive, with known truth (`kneescreen synth --registry`).

Each archive patient (raw PatientID = the DICOM's MRN) gets one scenario, drawn from the seed:

    no_dxa         no registry row: the films are unlinked (patient_not_in_registry)
    outside        one exam more than the window away (one patient exactly window + 1 days)
    single         one exam within the window (one patient exactly window days away)
    changing       the nearest exam in the window gives the truth; a later one, also in the
                   window, has another class (a conflicting patient)
    changing_out   as changing, but the other exam is outside the window (no conflict)
    tie            exams d days before and d days after the film: the earlier gives the truth

The exam that gives the truth has the patient's T-score (labels.csv) at one site, the lowest;
other sites are higher or empty (missing sites). Dates alternate between ISO and DICOM formats,
some ids carry stray whitespace (trimmed by the link), and bad rows are planted on linked patients
at the film's own date, so accepting any would change the truth: an empty id, unparseable dates,
a T-score that is not a number, one outside [-7, 5], all sites empty. Registry-only patients
(DXA without radiographs) pad the registry, as in any programme.

``registry_truth.csv``: one row per archive object: ``expect`` (linked, a skip or unlinked reason)
and for linked films the exam date, T-score, site, class and gap in days.
"""

from __future__ import annotations

import datetime as _dt
import json

import numpy as np

from kneescreen.data.synth import SynthConfig, Subject, _key, draw_subjects, write_archive
from kneescreen.fileio.store import Store, join
from kneescreen.labels import t_score_to_class

SITES = ("lumbar_spine", "total_hip", "femoral_neck")
SCENARIOS = ("no_dxa", "outside", "single", "changing", "changing_out", "tie")
_WEIGHTS = (0.12, 0.10, 0.38, 0.22, 0.12, 0.06)
_OTHER_CLASS_T = {"normal": -1.8, "osteopenia": -3.1, "osteoporosis": -1.6}  # a T-score of another class
BAD_ROWS = ("empty_id", "bad_date", "bad_date", "t_score_not_a_number", "t_score_out_of_range", "no_t_score")


def _date(text: str) -> _dt.date:
    return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _exam_row(rng, mrn: str, date: _dt.date, t: float, sex: str) -> dict:
    """One registry row: ``t`` at one site (the lowest), other sites higher or empty."""
    decide = int(rng.integers(len(SITES)))
    row = {"patient_id": f" {mrn} " if rng.random() < 0.2 else mrn,
           "exam_date": date.isoformat() if rng.random() < 0.5 else date.strftime("%Y%m%d"), "sex": sex}
    for i, site in enumerate(SITES):
        if i == decide:
            row[f"t_score_{site}"] = f"{t:.3f}"
        else:  # missing sites: about one in four empty
            row[f"t_score_{site}"] = "" if rng.random() < 0.25 else f"{min(t + rng.uniform(0.1, 1.5), 4.9):.2f}"
    row["bmd_total_hip"] = f"{0.9 + 0.1 * t:.3f}"
    return {**row, "_site": SITES[decide]}


def _patient_rows(rng, scenario: str, sub: Subject, window: int, edge: str | None) -> tuple[list[dict], dict | None, bool]:
    """(registry rows, the truth exam {date, t, site} or None, conflicting) for one patient."""
    film = _date(sub.study_date)
    t = float(np.clip(sub.t_score, -6.9, 4.9))
    other = _OTHER_CLASS_T[t_score_to_class(t)]
    if scenario == "no_dxa":
        return [], None, False
    if scenario == "outside":
        gap = window + 1 if edge == "outside" else int(rng.integers(window + 2, window + 400))
        return [_exam_row(rng, sub.mrn, film + _dt.timedelta(days=gap * (1 if rng.random() < 0.5 else -1)), t, sub.sex)], None, False
    if scenario == "tie":
        d = int(rng.integers(1, window // 2))
        first = _exam_row(rng, sub.mrn, film - _dt.timedelta(days=d), t, sub.sex)
        return [first, _exam_row(rng, sub.mrn, film + _dt.timedelta(days=d), other, sub.sex)], {**first, "gap": -d}, True
    gap = window if edge == "inside" else int(rng.integers(-window // 2, window // 2))
    truth = _exam_row(rng, sub.mrn, film + _dt.timedelta(days=gap), t, sub.sex)
    rows = [truth]
    if scenario in ("changing", "changing_out"):
        far = (int(rng.integers(abs(gap) + 30, window + 1)) if scenario == "changing" and abs(gap) + 30 <= window
               else int(rng.integers(window + 1, window + 300)))
        later = film + _dt.timedelta(days=far if gap <= 0 else -far) if scenario == "changing" else film + _dt.timedelta(days=far)
        rows.append(_exam_row(rng, sub.mrn, later, other, sub.sex))
        return rows, {**truth, "gap": gap}, scenario == "changing" and far <= window
    return rows, {**truth, "gap": gap}, False


def _bad_row(kind: str, mrn: str, film: _dt.date) -> dict:
    """A bad row at the film's own date: were it accepted, it would win the link."""
    row = {"patient_id": mrn, "exam_date": film.isoformat(), "sex": "", "bmd_total_hip": "",
           **{f"t_score_{s}": "" for s in SITES}}
    if kind == "empty_id":
        return {**row, "patient_id": "  ", "t_score_total_hip": "-1.0"}
    if kind == "bad_date":
        return {**row, "exam_date": film.strftime("%d/%m/%Y") if film.day > 12 else "2021-02-30", "t_score_total_hip": "-3.5"}
    if kind == "t_score_not_a_number":
        return {**row, "t_score_total_hip": "n/a"}
    if kind == "t_score_out_of_range":
        return {**row, "t_score_lumbar_spine": "-12.5"}
    return row  # no_t_score: every site empty


def planted_truth(cfg: SynthConfig, subjects: list[Subject], truth: dict[str, dict]) -> dict[str, dict]:
    """What the link must say of each planted bad object (`synth.planted_bad_files`)."""
    none = {"expect": "patient_not_in_registry"}  # the planted objects' own patients have no DXA
    # `write_archive` keeps its first two files for the planted ones: the first of them by key that is DICOM.
    firsts = sorted((_key(s), s) for s in subjects[:2] if s.fmt == "dicom")
    source_key, source = firsts[0] if firsts else (None, draw_subjects(SynthConfig(n=1, seed=cfg.seed + 7, size=cfg.size))[0])
    # Half a DICOM: native pixel data announces a length the object no longer has (the header
    # is refused); encapsulated (compressed) data has no length up front, so the header reads.
    native = source.syntax == "1.2.840.10008.1.2.1"
    truncated = {"expect": "unreadable_header"} if native else (truth.get(source_key) if source_key else none)
    return {"bad/truncated.dcm": truncated, "bad/random-bytes.dcm": {"expect": "not_dicom"},
            "bad/notes.txt": {"expect": "not_dicom"}, "bad/empty.dcm": {"expect": "not_dicom"},
            "bad/chest.dcm": {"expect": "not_knee"}, "bad/corrupt-j2k.dcm": none, "bad/noise.dcm": none}


def build_registry(cfg: SynthConfig, window: int = 365) -> tuple[list[dict], dict[str, dict], dict]:
    """(registry rows, truth by archive key, summary) for the archive ``cfg`` describes."""
    rng = np.random.default_rng(cfg.seed + 101)
    subjects = draw_subjects(cfg)
    patients: dict[str, list[Subject]] = {}
    for s in subjects:
        patients.setdefault(s.mrn, []).append(s)
    rows, truth, conflicting, scen_count, bad = [], {}, 0, dict.fromkeys(SCENARIOS, 0), {}
    edges = {"inside": False, "outside": False}
    for i, (mrn, subs) in enumerate(patients.items()):
        scenario = SCENARIOS[int(rng.choice(len(SCENARIOS), p=_WEIGHTS))]
        edge = next((e for e, done in edges.items() if not done and scenario == ("single" if e == "inside" else "outside")), None)
        if edge:
            edges[edge] = True
        scen_count[scenario] += 1
        prow, exam, conflict = _patient_rows(rng, scenario, subs[0], window, edge)
        rows += prow
        dicom = [s for s in subs if s.fmt == "dicom"]
        conflicting += bool(conflict and dicom)
        for s in subs:
            if s.fmt != "dicom":
                truth[_key(s)] = {"expect": "not_dicom"}
            elif exam is None:
                truth[_key(s)] = {"expect": "patient_not_in_registry" if scenario == "no_dxa" else "no_exam_in_window"}
            else:
                t = float(exam[f"t_score_{exam['_site']}"])
                truth[_key(s)] = {"expect": "linked", "exam_date": str(_date(exam["exam_date"].replace("-", ""))),
                                  "t_score": t, "site": exam["_site"], "label": t_score_to_class(t), "gap_days": exam["gap"]}
        if exam is not None and (sum(bad.values()) < len(BAD_ROWS) or i % 7 == 3):  # every kind, then 1 in 7
            kind = BAD_ROWS[sum(bad.values()) % len(BAD_ROWS)]
            rows.append(_bad_row(kind, mrn, _date(subs[0].study_date)))
            bad[kind] = bad.get(kind, 0) + 1
    for j in range(max(2, len(patients) // 4)):  # DXA patients without radiographs
        rows.append(_exam_row(rng, f"REG{cfg.seed:03d}{j:06d}", _dt.date(2020, 1, 1) + _dt.timedelta(days=j), -1.5, "F"))
    if cfg.plant_bad:
        truth.update(planted_truth(cfg, subjects, truth))
    order = rng.permutation(len(rows))
    rows = [{k: v for k, v in rows[o].items() if k != "_site"} for o in order]
    summary = {"rows": len(rows), "bad_rows": dict(sorted(bad.items())), "scenarios": scen_count,
               "conflicting_patients": conflicting, "window_days": window,
               "linked": sum(t["expect"] == "linked" for t in truth.values())}
    return rows, truth, summary


def write_registry(out_dir: str, cfg: SynthConfig, store: Store, window: int = 365, fmt: str = "csv") -> dict:
    """``registry.csv`` (or ``.parquet``), ``registry_truth.csv`` and ``registry_summary.json`` under ``out_dir``."""
    rows, truth, summary = build_registry(cfg, window)
    fields = ["patient_id", "exam_date", *(f"t_score_{s}" for s in SITES), "bmd_total_hip", "sex"]
    uri = join(out_dir, f"registry.{fmt}")
    if fmt == "parquet":
        import pyarrow as pa

        store.write_parquet(pa.Table.from_pylist(rows), uri)
    else:
        store.write_csv(uri, rows, fields)
    tfields = ["key", "expect", "exam_date", "t_score", "site", "label", "gap_days"]
    store.write_csv(join(out_dir, "registry_truth.csv"), [{"key": k, **v} for k, v in sorted(truth.items())], tfields)
    store.write_bytes(join(out_dir, "registry_summary.json"), json.dumps(summary, indent=2).encode())
    return {**summary, "registry": uri, "truth": join(out_dir, "registry_truth.csv")}


def write_archive_with_registry(out_dir: str, cfg: SynthConfig, store: Store | None = None, window: int = 365,
                                fmt: str = "csv") -> dict:
    """`synth.write_archive`, then the registry beside it; the summary gains ``registry``."""
    store = store or Store.resolve()
    summary = write_archive(out_dir, cfg, store)
    return {**summary, "registry": write_registry(out_dir, cfg, store, window, fmt)}
