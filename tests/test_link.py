"""`kneescreen link` end to end on a real synthetic archive + registry: synthetic truth recovered
exactly, no raw identifier in any output or log, S3, `train --data` and `screen --reference` on
the output, and errors a user would meet."""

from __future__ import annotations

import csv
import json
import os
import pathlib

import pyarrow.parquet as pq
import pytest

from kneescreen.cli import main
from kneescreen.data.decode import load_side_table
from kneescreen.data.link_output import LABELS_SCHEMA
from kneescreen.data.synth import SynthConfig, draw_subjects
from kneescreen.data.synth_registry import write_archive_with_registry
from kneescreen.fileio.privacy import ENV_KEY, patient_pseudo_id
from kneescreen.fileio.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.ray]
KEY = "link-test-key-0123456789"
ARCHIVE = SynthConfig(n=90, seed=5, size=64, plant_bad=True, workers=1,
                      formats=("dicom", "dicom", "dicom", "png"))


@pytest.fixture(scope="module")
def key_env():
    old = os.environ.get(ENV_KEY)
    os.environ[ENV_KEY] = KEY
    yield KEY
    if old is None:
        os.environ.pop(ENV_KEY, None)
    else:
        os.environ[ENV_KEY] = old


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("link-archive")
    summary = write_archive_with_registry(str(root), ARCHIVE)
    return root, summary


@pytest.fixture(scope="module")
def linked(ray_local, key_env, archive, tmp_path_factory):
    root, _ = archive
    out = tmp_path_factory.mktemp("link-out")
    # Three partitions: a patient's films and exams must meet in one partition whatever their number.
    rc = main(["link", "--archive", str(root / "images"), "--registry", str(root / "registry.csv"), "--out", str(out),
               "--partitions", "3", "--header-batch-size", "16"])
    assert rc == 0
    return out


def _rows(folder: pathlib.Path) -> dict[str, dict]:
    return {r["key"]: r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def _truth(root: pathlib.Path) -> dict[str, dict]:
    with open(root / "registry_truth.csv") as fh:
        return {r["key"]: r for r in csv.DictReader(fh)}


def test_synthetic_truth_is_recovered_exactly(archive, linked):
    root, summary = archive
    truth, labels, unlinked = _truth(root), _rows(linked / "labels"), _rows(linked / "unlinked")
    assert set(labels) | set(unlinked) == set(truth) and not set(labels) & set(unlinked)
    for key, t in truth.items():
        if t["expect"] == "linked":
            got = labels[key]
            assert (str(got["exam_date"]), got["t_score"], got["site"], got["label"], got["gap_days"]) == (
                t["exam_date"], float(t["t_score"]), t["site"], t["label"], int(t["gap_days"])), key
            assert abs(got["gap_days"]) <= 365
        else:
            assert unlinked[key]["reason"] == t["expect"], key
    audit = json.loads((linked / "link_audit.json").read_text())
    c = audit["counts"]
    assert c["accounted"] and c["listed"] == len(truth) and c["linked"] == summary["registry"]["linked"] > 20
    assert audit["conflicting_patients"] == summary["registry"]["conflicting_patients"] > 0
    assert audit["registry_rows"]["bad"] == summary["registry"]["bad_rows"]
    assert set(audit["registry_rows"]["bad"]) == {"empty_id", "bad_date", "t_score_not_a_number", "t_score_out_of_range",
                                                  "no_t_score"}
    assert audit["archive"] == str(root / "images") and audit["partitions"] == 3
    assert pq.read_schema(next((linked / "labels").glob("*.parquet"))).remove_metadata() == LABELS_SCHEMA
    scen = summary["registry"]["scenarios"]
    assert scen["tie"] and scen["changing"] and scen["outside"] and scen["no_dxa"]  # the truth covers every case


def test_no_raw_identifier_in_any_output_or_log(archive, linked):
    root, _ = archive
    with open(root / "registry.csv") as fh:
        raw = {r["patient_id"].strip() for r in csv.DictReader(fh)} - {""}
    raw |= {s.mrn for s in draw_subjects(ARCHIVE)}  # every PatientID in the archive, DXA or not
    assert len(raw) > 40
    files = [p for p in linked.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files) and any(p.suffix == ".parquet" for p in files)
    for p in files:
        data = p.read_bytes()
        leaked = [r for r in raw if r.encode() in data]
        assert not leaked, (p, leaked[:3])


def test_train_data_and_screen_reference_read_the_link_output(archive, linked, tmp_path):
    from kneescreen.train.config import TrainConfig
    from kneescreen.train.run import run_train

    labels = _rows(linked / "labels")
    ref = load_side_table(Store.resolve(), str(linked))
    assert {k: r["label"] for k, r in ref.items()} == {k: r["label"] for k, r in labels.items()}
    cfg = TrainConfig(data=str(linked), out=str(tmp_path / "bundle"), members=("test_cnn:gray:frozen",), weights="none",
                      image_size=0, epochs=1, num_workers=1, batch_size=8, oof_folds=2,
                      storage_path=str(tmp_path / "runs"), name="linked")
    out = run_train(cfg)
    split = {r["key"]: r for r in csv.DictReader(open(tmp_path / "bundle" / "split" / "split.csv"))}
    assert set(split) <= set(labels) and len(split) >= len(labels) - 2  # near-duplicates may drop a copy
    assert all(split[k]["label"] == labels[k]["label"] for k in split)
    assert out["version"]


def test_pseudonymised_registry_links_the_same(archive, linked, tmp_path):
    root, _ = archive
    with open(root / "registry.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["patient_id"] = patient_pseudo_id(r["patient_id"], KEY.encode()) or ""
    reg = tmp_path / "registry-pseudo.csv"
    with open(reg, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    assert main(["link", "--archive", str(root / "images"), "--registry", str(reg), "--out", str(out),
                 "--registry-ids", "pseudonymised"]) == 0
    assert {k: r["label"] for k, r in _rows(out / "labels").items()} == {
        k: r["label"] for k, r in _rows(linked / "labels").items()}


def test_missing_registry_columns_is_an_error_that_names_them(archive, key_env, tmp_path, capsys):
    root, _ = archive
    reg = tmp_path / "reg.csv"
    reg.write_text("mrn,date,bmd\nA,2022-01-01,0.8\n")
    rc = main(["link", "--archive", str(root / "images"), "--registry", str(reg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing id column 'patient_id', date column 'exam_date'" in err and "found columns: mrn, date, bmd" in err


@pytest.mark.s3
def test_s3_end_to_end(archive, linked, s3_bucket, tmp_path):
    """Archive, a Parquet registry and the output all in the local S3 server."""
    import pyarrow as pa

    root, _ = archive
    store = Store.resolve()
    for p in (root / "images").rglob("*"):
        if p.is_file():
            store.write_bytes(f"s3://{s3_bucket}/archive/{p.relative_to(root / 'images').as_posix()}", p.read_bytes())
    with open(root / "registry.csv") as fh:
        store.write_parquet(pa.Table.from_pylist(list(csv.DictReader(fh))), f"s3://{s3_bucket}/dxa/registry.parquet")
    out = f"s3://{s3_bucket}/link"
    assert main(["link", "--archive", f"s3://{s3_bucket}/archive", "--registry", f"s3://{s3_bucket}/dxa/registry.parquet",
                 "--out", out]) == 0
    audit = json.loads(store.read_bytes(f"{out}/link_audit.json"))
    local = json.loads((linked / "link_audit.json").read_text())
    assert audit["counts"] == local["counts"] and audit["classes"] == local["classes"]
    assert audit["registry_rows"]["bad"] == local["registry_rows"]["bad"]
    got = {r["key"]: r["label"] for r in load_side_table(store, out).values()}
    assert got == {k: r["label"] for k, r in _rows(linked / "labels").items()}
    # Header triage on S3: ranged reads, never more than the objects hold.
    assert 0 < audit["bytes"]["read"] <= audit["bytes"]["listed"]
