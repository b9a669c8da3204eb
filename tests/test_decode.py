"""The shared decode batch function on a real synthetic archive: the training path (``uri``
column, no root), side tables, and `usable_decoded_rows` (what training leaves out, and says so)."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kneescreen.data.decode import META_COLUMNS, DecodeSpec, decode_batch, load_side_table, usable_decoded_rows
from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join


def _uri_batch(root, keys) -> dict:
    """Training-style rows: a key for the side tables and the object's full URI."""
    keys = list(keys)
    return {"key": np.array(keys, object), "uri": np.array([join(str(root / "images"), k) for k in keys], object),
            "label": np.arange(len(keys))}


# -- decode_batch ---------------------------------------------------------------------------------


def test_uri_column_without_root_reads_every_row(small_archive, labels, planted):
    root, _ = small_archive
    keys = sorted(labels)[:4] + sorted(planted)
    batch = _uri_batch(root, keys)
    out = decode_batch(batch, DecodeSpec(store=Store(), sizes=(32, 64), root=None, pseudo_key=b"k" * 16))
    # Every input row comes out, in order, with its input columns untouched.
    assert list(out["key"]) == keys
    assert list(out["uri"]) == list(batch["uri"])
    assert list(out["label"]) == list(range(len(keys)))
    for col in META_COLUMNS:
        assert len(out[col]) == len(keys), col
    assert out["img_32"].shape == (len(keys), 32, 32) and out["img_32"].dtype == np.uint8
    assert out["img_64"].shape == (len(keys), 64, 64) and out["img_64"].dtype == np.uint8
    status = dict(zip(keys, out["status"]))
    codes = dict(zip(keys, out["error_code"]))
    for k in sorted(labels)[:4]:
        assert status[k] == "ok" and codes[k] is None, (k, codes[k])
    for k, expected in planted.items():
        assert codes[k] == expected, k
        assert status[k] == ("skipped" if expected == "not_knee" else "error"), k
    ok = np.array([s == "ok" for s in out["status"]])
    assert (out["img_64"][ok].reshape(ok.sum(), -1).max(1) > 0).all()
    assert (out["img_64"][~ok] == 0).all()


def test_root_none_ignores_the_key_for_reading(small_archive, labels):
    """With root=None the ``uri`` is what is read: a key that names no file still decodes."""
    root, _ = small_archive
    key = sorted(labels)[0]
    batch = {"key": np.array(["renamed/elsewhere.dcm"], object),
             "uri": np.array([join(str(root / "images"), key)], object)}
    out = decode_batch(batch, DecodeSpec(store=Store(), sizes=(64,)))
    assert list(out["status"]) == ["ok"]


def test_missing_uri_is_vanished(tmp_path):
    # Listed, then gone before the read (issue #20): permanent for that etag, not retried forever.
    batch = {"key": np.array(["gone.dcm"], object), "uri": np.array([str(tmp_path / "gone.dcm")], object)}
    out = decode_batch(batch, DecodeSpec(store=Store(), sizes=(64,)))
    assert list(out["status"]) == ["error"]
    assert list(out["error_code"]) == ["vanished"]
    assert (out["img_64"] == 0).all()


def test_empty_batch_gives_empty_columns():
    out = decode_batch({"key": np.array([], object), "uri": np.array([], object)},
                       DecodeSpec(store=Store(), sizes=(64,)))
    assert out["img_64"].shape == (0, 64, 64)
    assert all(len(out[c]) == 0 for c in META_COLUMNS)


def test_dicom_headers_fill_metadata_and_pseudonyms(small_archive, labels):
    root, _ = small_archive
    keys = sorted(k for k, r in labels.items() if r["format"] == "dicom")[:3]
    out = decode_batch(_uri_batch(root, keys), DecodeSpec(store=Store(), sizes=(64,), pseudo_key=b"k" * 16))
    for i, k in enumerate(keys):
        assert out["format"][i] == "dicom"
        assert out["sex"][i] == labels[k]["sex"]
        assert out["age"][i] == pytest.approx(int(float(labels[k]["age"])), abs=1)
        assert out["view"][i] == labels[k]["view"] and out["laterality"][i] == labels[k]["laterality"]
        assert out["patient_pseudo_id"][i].startswith("p_") and out["study_pseudo_id"][i].startswith("s_")
        assert out["reference_label"][i] is None  # no reference table given


def test_side_tables_by_sop_instance_uid(small_archive, labels):
    """A DICOM whose sidecar rows are keyed only by SOP Instance UID still gets them."""
    root, _ = small_archive
    key = sorted(k for k, r in labels.items() if r["format"] == "dicom")[0]
    sop = labels[key]["sop_instance_uid"]
    ref = {sop: {"sop_instance_uid": sop, "label": " Osteoporosis ", "t_score": "-3.1"}}
    meta = {sop: {"sop_instance_uid": sop, "site": "north-wing"}}
    batch = {"key": np.array(["some/other/name.dcm"], object),
             "uri": np.array([join(str(root / "images"), key)], object)}
    out = decode_batch(batch, DecodeSpec(store=Store(), sizes=(64,), reference=ref, metadata=meta))
    assert out["site"][0] == "north-wing"
    assert out["reference_label"][0] == "osteoporosis"
    assert out["reference_t_score"][0] == pytest.approx(-3.1)


@pytest.mark.parametrize("ref,label,t", [
    ({"label": "OSTEOPENIA"}, "osteopenia", None),
    ({"t_score": "-2.5"}, "osteoporosis", -2.5),  # label from the WHO threshold
    ({"t_score": "-0.2"}, "normal", -0.2),
    ({"label": "fracture", "t_score": "-1.5"}, None, -1.5),  # unusable label: no reference, no crash
    ({"label": "", "t_score": ""}, None, None),
])
def test_reference_label_from_side_table(small_archive, labels, ref, label, t):
    root, _ = small_archive
    key = sorted(k for k, r in labels.items() if r["format"] == "png")[0]
    out = decode_batch(_uri_batch(root, [key]), DecodeSpec(store=Store(), sizes=(64,), reference={key: ref}))
    assert out["status"][0] == "ok"
    assert out["reference_label"][0] == label
    assert (out["reference_t_score"][0] is None) if t is None else (out["reference_t_score"][0] == pytest.approx(t))


@pytest.mark.parametrize("sex,expected", [("F", "F"), ("female", "F"), ("m", "M"), ("unknown", None), ("", None)])
def test_sidecar_sex_spellings_for_raster_images(small_archive, labels, sex, expected):
    root, _ = small_archive
    key = sorted(k for k, r in labels.items() if r["format"] != "dicom")[0]
    meta = {key: {"key": key, "sex": sex, "age": "71.5"}}
    out = decode_batch(_uri_batch(root, [key]), DecodeSpec(store=Store(), sizes=(64,), metadata=meta))
    assert out["sex"][0] == expected
    assert out["age"][0] == pytest.approx(71.5) and out["age_band"][0] == "70-79"


def test_raster_without_sidecar_has_no_covariates(small_archive, labels):
    root, _ = small_archive
    key = sorted(k for k, r in labels.items() if r["format"] != "dicom")[0]
    out = decode_batch(_uri_batch(root, [key]), DecodeSpec(store=Store(), sizes=(64,)))
    assert out["status"][0] == "ok"
    assert out["age"][0] is None and out["sex"][0] is None and out["age_band"][0] is None
    assert out["patient_pseudo_id"][0] is None


def test_max_pixels_guard(small_archive, labels):
    root, _ = small_archive
    key = sorted(k for k, r in labels.items() if r["format"] == "dicom")[0]
    out = decode_batch(_uri_batch(root, [key]), DecodeSpec(store=Store(), sizes=(64,), max_pixels=100))
    assert (out["status"][0], out["error_code"][0]) == ("error", "too_large")


# -- usable_decoded_rows --------------------------------------------------------------------------


def test_usable_decoded_rows_keeps_ok_and_logs_codes(caplog):
    rows = [{"key": "a", "status": "ok", "error_code": None},
            {"key": "b", "status": "error", "error_code": "truncated"},
            {"key": "c", "status": "error", "error_code": "truncated"},
            {"key": "d", "status": "skipped", "error_code": "not_knee"},
            {"key": "e", "status": "ok", "error_code": None},
            {"key": "f", "status": "error", "error_code": None}]
    with caplog.at_level(logging.WARNING, logger="kneescreen.data.decode"):
        kept = usable_decoded_rows(rows, what="fold 3")
    assert [r["key"] for r in kept] == ["a", "e"]
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1
    assert "fold 3" in msgs[0] and "left out 4" in msgs[0]
    assert "truncated=2" in msgs[0] and "not_knee=1" in msgs[0] and "error=1" in msgs[0]


def test_usable_decoded_rows_silent_when_nothing_dropped(caplog):
    rows = [{"key": "a", "status": "ok", "error_code": None}]
    with caplog.at_level(logging.WARNING, logger="kneescreen.data.decode"):
        assert usable_decoded_rows(rows) == rows
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_usable_decoded_rows_on_decoded_archive(small_archive, labels, planted, caplog):
    root, _ = small_archive
    keys = sorted(labels)[:3] + sorted(planted)
    out = decode_batch(_uri_batch(root, keys), DecodeSpec(store=Store(), sizes=(32,)))
    rows = [{"key": k, "status": s, "error_code": c} for k, s, c in zip(out["key"], out["status"], out["error_code"])]
    with caplog.at_level(logging.WARNING, logger="kneescreen.data.decode"):
        kept = usable_decoded_rows(rows)
    assert [r["key"] for r in kept] == sorted(labels)[:3]
    msg = caplog.records[-1].getMessage()
    assert f"left out {len(planted)}" in msg
    for code in set(planted.values()):
        assert f"{code}={list(planted.values()).count(code)}" in msg


# -- load_side_table ------------------------------------------------------------------------------


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("column", ["key", "path", "relative_path", "sop_instance_uid"])
def test_side_table_keyed_by_each_id_column(tmp_path, column):
    uri = _write_csv(tmp_path / "t.csv", [{column: "a/1.dcm", "site": "x"}, {column: "b/2.png", "site": "y"}])
    table = load_side_table(Store(), uri)
    assert set(table) == {"a/1.dcm", "b/2.png"}
    assert table["b/2.png"]["site"] == "y"


def test_side_table_key_and_sop_both_index_the_row(tmp_path):
    uri = _write_csv(tmp_path / "t.csv", [{"key": "a/1.dcm", "sop_instance_uid": "1.2.3", "label": "normal"},
                                          {"key": "b/2.png", "sop_instance_uid": "", "label": "osteopenia"}])
    table = load_side_table(Store(), uri)
    assert set(table) == {"a/1.dcm", "1.2.3", "b/2.png"}
    assert table["1.2.3"] is table["a/1.dcm"]


def test_side_table_from_parquet(tmp_path):
    uri = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"path": ["a.dcm", "b.dcm"], "age": [61.0, 72.0]}), uri)
    table = load_side_table(Store(), uri)
    assert table["b.dcm"]["age"] == 72.0


def test_labels_csv_of_the_archive(small_archive, labels):
    root, _ = small_archive
    table = load_side_table(Store(), str(root / "labels.csv"))
    for key, row in labels.items():
        assert table[key]["label"] == row["label"]
        if row["sop_instance_uid"]:
            assert table[row["sop_instance_uid"]]["key"] == key


@pytest.mark.parametrize("rows", [
    [{"patient": "P1", "label": "normal"}],  # no id column at all
    [{"key": "", "sop_instance_uid": "", "label": "normal"}],  # id columns, all empty
])
def test_side_table_without_ids_is_refused(tmp_path, rows):
    uri = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(KneescreenError, match="key, path or sop_instance_uid"):
        load_side_table(Store(), uri)


@pytest.mark.parametrize("uri", [None, ""])
def test_no_side_table_is_empty(uri):
    assert load_side_table(Store(), uri) == {}


def test_missing_side_table_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_side_table(Store(), str(tmp_path / "nope.csv"))
