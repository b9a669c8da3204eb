"""The patients table: the aggregation rule on hand-built predictions (bilateral films, a follow-up,
films without a patient id, rescreened objects), the Ray Data path against the in-memory one, and
an incremental rescan that adds one film to one patient."""

from __future__ import annotations

import datetime as _dt
import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pydicom
import pytest

from kneescreen.fileio.store import Store, join
from kneescreen.screen.ledger import committed_runs
from kneescreen.errors import KneescreenError
from kneescreen.screen import patients
from kneescreen.screen.patients import choose_engine, patients_of, prediction_files, write_patients
from kneescreen.screen.pipeline import run_screen
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.schema import PATIENTS, PREDICTIONS

T0 = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)


def _row(key, patient, study, date, risk, run="r1", status="ok", laterality="L", ref=None, minutes=0, zone="refer"):
    return {"run_id": run, "model_version": "v1", "key": key, "etag": "e", "status": status,
            "patient_pseudo_id": patient, "study_pseudo_id": study, "laterality": laterality,
            "study_date": None if date is None else _dt.date.fromisoformat(date),
            "risk_score": risk if status == "ok" else None, "predicted_class": "osteopenia" if status == "ok" else None,
            "low_bmd_flag": (risk >= 0.5) if status == "ok" else None, "triage_zone": zone if status == "ok" else None,
            "t_score_est": -1.5, "t_score_lo": -2.5, "t_score_hi": -0.5, "predictor": "covariates",
            "reference_label": ref, "screened_at": T0 + _dt.timedelta(minutes=minutes)}


def _table(rows) -> pa.Table:
    full = [{f.name: r.get(f.name) for f in PREDICTIONS} for r in rows]
    return pa.Table.from_pylist(full, schema=PREDICTIONS)


ROWS = [
    # Patient A: a bilateral study (left 0.3, right 0.7) after an older study with a 0.9 film.
    _row("a/old.dcm", "pA", "sA1", "2020-05-01", 0.9, ref="osteoporosis"),
    _row("a/left.dcm", "pA", "sA2", "2024-03-01", 0.3, ref="normal"),
    _row("a/right.dcm", "pA", "sA2", "2024-03-01", 0.7, laterality="R", ref="osteopenia", zone="rule_in"),
    # Patient B: one object screened twice (a later run's ok row wins), then an error row after it.
    _row("b/1.dcm", "pB", "sB1", "2023-01-01", 0.2, run="r1"),
    _row("b/1.dcm", "pB", "sB1", "2023-01-01", 0.8, run="r2", minutes=10),
    _row("b/1.dcm", "pB", "sB1", "2023-01-01", 0.0, run="r3", status="error", minutes=20),
    # Two PNG films without a patient id (no sidecar): two one-film patients.
    _row("png/1.png", None, None, None, 0.4),
    _row("png/2.png", None, None, None, 0.6),
    # Patient C: only an error row: not in the table.
    _row("c/1.dcm", "pC", "sC1", "2022-01-01", 0.5, status="error"),
]


def _by_key(t: pa.Table) -> dict:
    return {r["deciding_key"]: r for r in t.to_pylist()}


def test_latest_studys_highest_risk_film_decides():
    t = patients_of(_table(ROWS), "snap", "v9")
    assert t.schema == PATIENTS and t.num_rows == 4
    rows = _by_key(t)
    a = rows["a/right.dcm"]
    assert a["patient_pseudo_id"] == "pA" and not a["patient_id_missing"]
    assert a["n_images"] == 3 and a["n_studies"] == 2 and a["risk_score"] == 0.7 and a["triage_zone"] == "rule_in"
    assert a["first_study_date"] == _dt.date(2020, 5, 1) and a["last_study_date"] == _dt.date(2024, 3, 1)
    assert a["deciding_laterality"] == "R" and a["deciding_study_pseudo_id"] == "sA2"
    # The patient's reference: the most severe class among the deciding study's films.
    assert a["reference_label"] == "osteopenia"
    b = rows["b/1.dcm"]
    assert b["n_images"] == 1 and b["risk_score"] == 0.8 and b["deciding_run_id"] == "r2"
    assert (b["run_id"], b["model_version"]) == ("snap", "v9")
    for key in ("png/1.png", "png/2.png"):
        assert rows[key]["patient_pseudo_id"] is None and rows[key]["patient_id_missing"]
        assert rows[key]["n_images"] == 1 and rows[key]["n_studies"] == 1
    assert all(r["patient_pseudo_id"] != "pC" for r in rows.values())


def test_undated_studies_count_as_older():
    t = patients_of(_table([_row("x/1", "pX", "s1", None, 0.9), _row("x/2", "pX", "s2", "2019-01-01", 0.1)]), "s", "v")
    assert t.column("deciding_key").to_pylist() == ["x/2"] and t.column("n_studies").to_pylist() == [2]


def _two_runs(tmp_path) -> list[str]:
    store = Store.resolve()
    older, newer = _table(ROWS[:4] + ROWS[6:]), _table(ROWS[4:6])
    store.write_parquet(older, str(tmp_path / "predictions" / "run_id=r1" / "part-0.parquet"))
    store.write_parquet(newer, str(tmp_path / "predictions" / "run_id=r2" / "part-0.parquet"))
    return [str(tmp_path / "predictions" / f"run_id={r}") for r in ("r1", "r2")]


def _matches_the_rule(tmp_path, engine: str) -> None:
    dest = write_patients(Store.resolve(), str(tmp_path), _two_runs(tmp_path), "snap", "v9", engine=engine)
    got = pads.dataset(dest, format="parquet", partitioning=None).to_table()
    assert got.schema == PATIENTS
    want = patients_of(_table(ROWS), "snap", "v9")
    assert sorted(got.to_pylist(), key=lambda r: r["deciding_key"]) == sorted(want.to_pylist(),
                                                                                key=lambda r: r["deciding_key"])


def test_ray_groupby_matches_the_in_memory_rule(ray_local, tmp_path):
    _matches_the_rule(tmp_path, "ray")


def test_in_process_grouping_matches_the_in_memory_rule(tmp_path):
    _matches_the_rule(tmp_path, "local")


def test_auto_groups_small_states_in_process_and_large_ones_on_ray(tmp_path, monkeypatch):
    store = Store.resolve()
    files = prediction_files(store, _two_runs(tmp_path))  # 9 rows in 2 files
    assert choose_engine(store, files) == "local"
    monkeypatch.setattr(patients, "LOCAL_MAX_ROWS", 8)
    assert choose_engine(store, files) == "ray"
    monkeypatch.setattr(patients, "LOCAL_MAX_ROWS", 9)
    monkeypatch.setattr(patients, "LOCAL_MAX_FILES", 1)
    assert choose_engine(store, files) == "ray"
    assert choose_engine(store, files, "local") == "local"
    with pytest.raises(KneescreenError, match="patients engine must be one of"):
        choose_engine(store, files, "spark")


def _snapshot(output: str, run_id: str) -> dict:
    run = next(r for r in committed_runs(Store.resolve(), output) if r["run_id"] == run_id)
    t = pads.dataset(run["patients"], format="parquet", partitioning=None).to_table()
    return {r["patient_pseudo_id"] or r["deciding_key"]: {k: v for k, v in r.items() if k not in ("run_id", "model_version")}
            for r in t.to_pylist()}


def test_incremental_rescan_that_adds_a_film_changes_that_patient_only(ray_local, small_archive, labels, tiny_bundle,
                                                                      tmp_path):
    root, _ = small_archive
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    cfg = ScreenConfig(input=str(images), output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=8)
    first = run_screen(cfg)
    before = _snapshot(cfg.output, first["run_id"])
    assert first["counts"]["patients"] == len(before) > 0
    # A follow-up film for one DICOM patient: same PatientID, a new study, a later date.
    # (a good knee film from labels.csv: the planted bad objects are skipped or errors, never ok)
    src = images / sorted(k for k, r in labels.items() if r["format"] == "dicom")[0]
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.StudyDate = "20991231"
    ds.save_as(images / "followup.dcm")
    second = run_screen(cfg)
    assert second["counts"]["screened"] == second["counts"]["ok"] == 1
    after = _snapshot(cfg.output, second["run_id"])
    assert set(after) == set(before)
    changed = {p for p in before if before[p] != after[p]}
    assert len(changed) == 1
    row = after[changed.pop()]
    assert row["deciding_key"] == "followup.dcm" and row["last_study_date"] == _dt.date(2099, 12, 31)
    assert row["n_studies"] == before[row["patient_pseudo_id"]]["n_studies"] + 1
    assert row["n_images"] == before[row["patient_pseudo_id"]]["n_images"] + 1
