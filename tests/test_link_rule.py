"""`kneescreen link`'s rule and registry cleaning on hand-built tables (no Ray, no files)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from kneescreen.data.decode import skip_reason
from kneescreen.errors import KneescreenError
from kneescreen.fileio.privacy import patient_pseudo_id
from kneescreen.fileio.reader import RadiographMeta
from kneescreen.link.headers import FILM_SCHEMA, film_row
from kneescreen.link.join import link_tables
from kneescreen.link.registry import (EXAM_SCHEMA, RegistrySpec, clean_registry_batch, clean_row, parse_date,
                                      registry_columns)

KEY = b"k" * 32
FILM_DAY = dt.date(2022, 6, 15)


def _films(*rows) -> pa.Table:
    base = {"etag": "e", "status": "ok", "reason": None, "study_date": FILM_DAY, "age": 70.0, "sex": "F", "bytes_read": 100}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=FILM_SCHEMA)


def _exams(*rows) -> pa.Table:
    """(patient, days from the film, t_score[, site])"""
    out = []
    for r in rows:
        pid, gap, t = r[:3]
        out.append({"patient_pseudo_id": pid, "exam_date": FILM_DAY + dt.timedelta(days=gap), "t_score": t,
                    "site": r[3] if len(r) > 3 else "total_hip", "label": None, "bad": None})
    table = pa.Table.from_pylist(out, schema=EXAM_SCHEMA)
    from kneescreen.labels import t_score_to_class

    return table.set_column(4, "label", pa.array([t_score_to_class(t) for t in table.column("t_score").to_pylist()]))


def _link(films, exams, window=365):
    linked, unlinked, stats = link_tables(films, exams, window)
    return ({r["key"]: r for r in linked.to_pylist()}, {r["key"]: r for r in unlinked.to_pylist()}, stats)


@pytest.mark.parametrize("gap,linked", [(365, True), (-365, True), (366, False), (-366, False), (0, True)])
def test_window_edges(gap, linked):
    """Exactly ``window`` days away is in; one day more is out (no_exam_in_window)."""
    got, missed, stats = _link(_films({"key": "a.dcm", "patient_pseudo_id": "p1"}), _exams(("p1", gap, -2.0)))
    assert ("a.dcm" in got) is linked
    if linked:
        assert got["a.dcm"]["gap_days"] == gap and got["a.dcm"]["exam_date"] == FILM_DAY + dt.timedelta(days=gap)
        assert got["a.dcm"]["label"] == "osteopenia" and stats["gap_hist"][abs(gap)] == 1
    else:
        assert missed["a.dcm"]["reason"] == "no_exam_in_window" and missed["a.dcm"]["status"] == "unlinked"


def test_nearest_wins_and_a_tie_goes_to_the_earlier_exam():
    films = _films({"key": "tie.dcm", "patient_pseudo_id": "p1"}, {"key": "near.dcm", "patient_pseudo_id": "p2"})
    exams = _exams(("p1", -30, -3.0), ("p1", 30, 0.5), ("p2", -200, -3.0), ("p2", 100, 0.5), ("p2", 400, -2.0))
    got, _, stats = _link(films, exams)
    assert got["tie.dcm"]["gap_days"] == -30 and got["tie.dcm"]["label"] == "osteoporosis"
    assert got["near.dcm"]["gap_days"] == 100 and got["near.dcm"]["label"] == "normal"
    # Both patients have in-window exams of two classes: both conflict (the 400-day exam is outside).
    assert stats["conflicting_patients"] == 2 and stats["conflicting_films"] == 2


def test_same_day_exams_take_the_lower_t_score_and_agreeing_exams_do_not_conflict():
    films = _films({"key": "a.dcm", "patient_pseudo_id": "p1"}, {"key": "b.dcm", "patient_pseudo_id": "p2"})
    exams = _exams(("p1", 10, -1.5), ("p1", 10, -2.7), ("p2", -5, -1.2), ("p2", 50, -2.0))
    got, _, stats = _link(films, exams)
    assert got["a.dcm"]["t_score"] == -2.7 and got["b.dcm"]["gap_days"] == -5
    assert stats["conflicting_patients"] == 1  # p1's two exams disagree; p2's are both osteopenia


def test_lowest_site_decides_and_empty_sites_are_fine():
    spec = RegistrySpec("patient_id", "exam_date", ("t_score_lumbar_spine", "t_score_total_hip", "t_score_femoral_neck"), KEY)
    row = clean_row("MRN1", "2022-01-02", {"t_score_lumbar_spine": "-0.4", "t_score_total_hip": "",
                                          "t_score_femoral_neck": "-2.6"}, spec)
    assert (row["t_score"], row["site"], row["label"], row["bad"]) == (-2.6, "femoral_neck", "osteoporosis", None)
    one = clean_row("MRN1", "20220102", {"t_score": "-1.0"}, RegistrySpec("patient_id", "exam_date", ("t_score",), KEY))
    assert one["site"] == "t_score" and one["label"] == "normal" and one["exam_date"] == dt.date(2022, 1, 2)


def test_every_kind_of_bad_registry_row_is_counted_not_fatal():
    cols = ("t_score_lumbar_spine", "t_score_total_hip")
    batch = pa.table({
        "patient_id": ["", "  ", "A", "A", "A", "A", "A", "A", "A", "A"],
        "exam_date": ["2022-01-01", "2022-01-01", "yesterday", "2021-02-30", "01/02/2021", "2022-01-01",
                      "2022-01-01", "2022-01-01", "2022-01-01", "20220101"],
        "t_score_lumbar_spine": ["-1", "-1", "-1", "-1", "-1", "-7.5", "n/a", "", "5.0", "-7"],
        "t_score_total_hip": ["", "", "", "", "", "-1", "-1", "", "", "-1"],
    })
    out = clean_registry_batch(batch, RegistrySpec("patient_id", "exam_date", cols, KEY))
    assert out.column("bad").to_pylist() == ["empty_id", "empty_id", "bad_date", "bad_date", "bad_date",
                                             "t_score_out_of_range", "t_score_not_a_number", "no_t_score", None, None]
    assert "patient_id" not in out.column_names  # the raw id does not leave the task
    assert out.column("t_score").to_pylist()[-2:] == [5.0, -7.0]  # the bounds are plausible values


def test_missing_columns_error_names_what_is_missing_and_what_was_found():
    with pytest.raises(KneescreenError) as exc:
        registry_columns(["mrn", "date", "bmd_total_hip"], "patient_id", "exam_date", "reg.csv")
    msg = str(exc.value)
    assert "id column 'patient_id'" in msg and "date column 'exam_date'" in msg and "T-score column" in msg
    assert "found columns: mrn, date, bmd_total_hip" in msg and "--id-column" in msg
    assert registry_columns(["patient_id", "exam_date", "t_score_total_hip", "t_score"], "patient_id", "exam_date",
                            "r") == ("t_score_total_hip", "t_score")


@pytest.mark.parametrize("text,expected", [
    ("2022-03-04", dt.date(2022, 3, 4)), ("20220304", dt.date(2022, 3, 4)), ("2022.03.04", dt.date(2022, 3, 4)),
    ("2022-03-04T10:00:00", dt.date(2022, 3, 4)), (20220304, dt.date(2022, 3, 4)), (dt.date(2022, 3, 4), dt.date(2022, 3, 4)),
    ("2022-02-30", None), ("04/03/2022", None), ("", None), (None, None), ("2022034", None)])
def test_both_date_formats_parse(text, expected):
    assert parse_date(text) == expected


def test_registry_ids_and_dicom_ids_meet_in_one_pseudonym():
    """Trimmed whitespace only: the registry's ' MRN7 ' is the DICOM's 'MRN7'; case is not folded."""
    spec = RegistrySpec("patient_id", "exam_date", ("t_score",), KEY)
    reg = clean_row(" MRN7 ", "2022-01-01", {"t_score": "-1"}, spec)["patient_pseudo_id"]
    status, _, pid, date = film_row(RadiographMeta(format="dicom", modality="DX", body_part="KNEE", patient_id="MRN7",
                                                   study_date="20220101"), "skip", KEY)
    assert status == "ok" and pid == reg == patient_pseudo_id("MRN7", KEY) and date == dt.date(2022, 1, 1)
    assert clean_row("mrn7", "2022-01-01", {"t_score": "-1"}, spec)["patient_pseudo_id"] != reg
    pre = clean_row(reg, "2022-01-01", {"t_score": "-1"}, RegistrySpec("patient_id", "exam_date", ("t_score",), KEY,
                                                                      "pseudonymised"))
    assert pre["patient_pseudo_id"] == reg


def test_film_rows_follow_screening_skip_policy_and_date_fallback():
    chest = RadiographMeta(format="dicom", modality="DX", body_part="CHEST", patient_id="X", study_date="20220101")
    assert film_row(chest, "skip", KEY)[:2] == ("skipped", "not_knee") == ("skipped", skip_reason(chest)[0])
    assert film_row(chest, "keep", KEY)[0] == "ok"
    ct = RadiographMeta(format="dicom", modality="CT", body_part="KNEE", patient_id="X", study_date="20220101")
    assert film_row(ct, "skip", KEY)[:2] == ("skipped", "not_radiograph")
    no_id = RadiographMeta(format="dicom", modality="CR", body_part="KNEE", patient_id=" ", study_date="20220101")
    assert film_row(no_id, "skip", KEY)[:2] == ("unlinked", "no_patient_id")
    no_date = RadiographMeta(format="dicom", modality="CR", patient_id="X")
    assert film_row(no_date, "skip", KEY)[:2] == ("unlinked", "no_date")
    series = RadiographMeta(format="dicom", modality="CR", patient_id="X", other_date="20210505")
    assert film_row(series, "skip", KEY)[3] == dt.date(2021, 5, 5)


def test_unlinked_and_skipped_rows_keep_their_reasons():
    films = _films({"key": "c.dcm", "patient_pseudo_id": None, "status": "skipped", "reason": "not_knee", "study_date": None},
                   {"key": "d.png", "patient_pseudo_id": None, "status": "unlinked", "reason": "not_dicom", "study_date": None},
                   {"key": "e.dcm", "patient_pseudo_id": "nobody"}, {"key": "f.dcm", "patient_pseudo_id": "p1"})
    got, missed, stats = _link(films, _exams(("p1", 3, -1.0)))
    assert set(got) == {"f.dcm"} and got["f.dcm"]["label"] == "normal"
    assert {k: (r["status"], r["reason"]) for k, r in missed.items()} == {
        "c.dcm": ("skipped", "not_knee"), "d.png": ("unlinked", "not_dicom"), "e.dcm": ("unlinked", "patient_not_in_registry")}
    assert stats["skipped"] == {"not_knee": 1} and stats["unlinked"] == {"not_dicom": 1, "patient_not_in_registry": 1}
    assert stats["registry_patients"] == 1 and stats["bytes_read"] == 400


def test_a_partition_with_one_side_empty():
    """Hash partitions can hold only exams (registry-only patients) or only films."""
    _, _, stats = _link(_films({"key": "a.dcm", "patient_pseudo_id": "p9"}).slice(0, 0), _exams(("p1", 0, -1.0)))
    assert stats["linked"] == 0 and stats["registry_patients"] == 1
    got, missed, _ = _link(_films({"key": "a.dcm", "patient_pseudo_id": "p9"}), _exams(("p1", 0, -1.0)).slice(0, 0))
    assert not got and missed["a.dcm"]["reason"] == "patient_not_in_registry"


def test_link_job_entry_point_takes_the_command_flags(tmp_path, capsys):
    """jobs/link.py (for `ray job submit`) resolves the same settings as `kneescreen link`."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "link.py"
    spec = importlib.util.spec_from_file_location("link_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = tmp_path / "link.yaml"
    cfg.write_text("archive: s3://a/knees\nregistry: s3://r/dxa.parquet\nout: s3://o/link\n")
    assert job.main(["--config", str(cfg), "--window-days", "180", "--dry-run"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["archive"], got["window_days"], got["registry_ids"]) == ("s3://a/knees", 180, "raw")
    assert job.main(["--config", str(cfg), "--window-days", "-1", "--dry-run"]) == 2
    assert "--window-days must be 0 or more" in capsys.readouterr().err
