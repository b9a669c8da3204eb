"""Archive screening end to end: S3 server, Ray Data, Parquet outputs, exactly-once rescans."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from kneescreen.data.synth import SynthConfig, draw_subjects
from kneescreen.fileio.store import Store, join, split_s3
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.ledger import committed_runs
from kneescreen.screen.pipeline import run_screen
from kneescreen.screen.schema import PATIENTS, PREDICTIONS, STATS

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _upload(root: pathlib.Path, bucket: str, prefix: str) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            Store.resolve().write_bytes(f"s3://{bucket}/{prefix}/{p.relative_to(root).as_posix()}", p.read_bytes())


def _predictions(output: str):
    """Committed prediction rows (joined with run manifests) as a pandas frame."""
    runs = {r["run_id"] for r in committed_runs(Store.resolve(), output)}
    fs, path = Store.resolve().filesystem(join(output, "predictions"))
    t = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    df = t.to_pandas()
    return df[df["run_id"].isin(runs)]


@pytest.fixture(scope="module")
def s3_screen(ray_local, s3_server, small_archive, tiny_bundle):
    from kneescreen.fileio.store import Store

    root, _ = small_archive
    bucket = "screen-e2e"
    Store.resolve().client.create_bucket(Bucket=bucket)
    _upload(root, bucket, "archive")
    cfg = ScreenConfig(input=f"s3://{bucket}/archive/images", output=f"s3://{bucket}/out", bundle=tiny_bundle,
                       reference=f"s3://{bucket}/archive/labels.csv", batch_size=8)
    manifest = run_screen(cfg)
    return cfg, manifest, root


def test_every_listed_object_yields_one_row_with_its_code(s3_screen):
    cfg, manifest, root = s3_screen
    df = _predictions(cfg.output)
    listed = [o.key for o in Store.resolve().list_objects(cfg.input)]
    assert sorted(df["key"]) == sorted(listed) and manifest["counts"]["screened"] == len(listed)
    planted = {r["key"]: r["expected"] for r in csv.DictReader(open(root / "planted.csv"))}
    for key, expected in planted.items():
        row = df[df["key"] == key].iloc[0]
        assert row["error_code"] == expected, (key, row["status"], row["error_code"])
        assert row["status"] == ("skipped" if expected == "not_knee" else "error")
    ok = df[df["status"] == "ok"]
    assert len(ok) == manifest["counts"]["ok"] == 24
    # Every object is smaller than the first ranged read: read once, whole; the manifest's total
    # is the column's sum.
    assert (df["bytes_read"] == df["size"]).all()
    assert manifest["bytes_read"] == int(df["bytes_read"].sum()) > 0
    assert np.allclose(ok[["p_normal", "p_osteopenia", "p_osteoporosis"]].sum(1), 1)
    assert (ok["low_bmd_flag"] == (ok["risk_score"] >= 0.6)).all()
    assert ok["reference_label"].notna().all() and set(ok["predictor"]) <= {"fused", "image"}
    # PNG/JPEG rows have no header age/sex -> sidecar not given -> image-only fallback, flagged.
    raster = ok[ok["format"] != "dicom"]
    assert (raster["predictor"] == "image").all() and raster["covariates_imputed"].all()
    # Inference timestamps fall inside the run; rows that never reached the model have none.
    import pandas as pd

    started, finished = pd.Timestamp(manifest["started_at"]), pd.Timestamp(manifest["finished_at"])
    assert ok["inferred_at"].between(started, finished).all()
    assert df.loc[df["status"] != "ok", "inferred_at"].isna().all()


def test_outputs_match_the_schema_module(s3_screen):
    cfg, manifest, _ = s3_screen
    fs, path = Store.resolve().filesystem(manifest["predictions"])
    assert pq.read_table(path, filesystem=fs, partitioning=None).schema.equals(PREDICTIONS)
    uri = join(cfg.output, "stats", f"model_version={manifest['model_version']}", f"run_id={manifest['run_id']}")
    fs, path = Store.resolve().filesystem(uri)
    assert pq.read_table(path, filesystem=fs, partitioning=None).schema.equals(STATS)


def test_confusion_counts_equal_a_recomputation_from_rows(s3_screen):
    cfg, manifest, _ = s3_screen
    df = _predictions(cfg.output)
    fs, path = Store.resolve().filesystem(join(cfg.output, "stats"))
    stats = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()
    stats = stats[stats["run_id"] == manifest["run_id"]]
    ok = df[(df["status"] == "ok") & df["reference_label"].notna()]
    for gtype, gcol in (("all", None), ("site", "site"), ("sex", "sex")):
        groups = {"all": ok} if gcol is None else {g: ok[ok[gcol].fillna("unknown") == g] for g in ok[gcol].fillna("unknown").unique()}
        for g, sub in groups.items():
            s = stats[(stats["subgroup_type"] == gtype) & (stats["subgroup"] == g)]
            for t in ("normal", "osteopenia", "osteoporosis"):
                for p in ("normal", "osteopenia", "osteoporosis"):
                    want = int(((sub["reference_label"] == t) & (sub["predicted_class"] == p)).sum())
                    got = s[(s["target"] == f"confusion:{t}->{p}")]["value"]
                    assert int(got.iloc[0]) == want, (gtype, g, t, p)
            tp = int(((sub["reference_label"] != "normal") & sub["low_bmd_flag"].astype(bool)).sum())
            assert int(s[(s["target"] == "low_bmd") & (s["metric"] == "tp")]["value"].iloc[0]) == tp


def test_patients_table_and_patient_stats_on_s3(s3_screen):
    cfg, manifest, _ = s3_screen
    fs, path = Store.resolve().filesystem(manifest["patients"])
    patients = pq.read_table(path, filesystem=fs, partitioning=None)
    assert patients.schema.equals(PATIENTS) and patients.num_rows == manifest["counts"]["patients"]
    ok = _predictions(cfg.output)
    ok = ok[ok["status"] == "ok"]
    groups = set(ok["patient_pseudo_id"].dropna()) | {f"film:{k}" for k in ok.loc[ok["patient_pseudo_id"].isna(), "key"]}
    df = patients.to_pandas()
    assert len(df) == len(groups) and df["n_images"].sum() == len(ok)
    assert set(df.loc[df["patient_id_missing"], "deciding_key"]) == set(ok.loc[ok["patient_pseudo_id"].isna(), "key"])
    assert set(df["triage_zone"]) <= {"rule_out", "refer", "rule_in"} and df["t_score_est"].notna().all()
    fs, path = Store.resolve().filesystem(join(cfg.output, "stats"))
    stats = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()
    stats = stats[(stats["run_id"] == manifest["run_id"]) & (stats["subgroup_type"] == "patient")]
    ref = df[df["reference_label"].notna()]
    tp = int(((ref["reference_label"] != "normal") & ref["low_bmd_flag"]).sum())
    assert int(stats[(stats["target"] == "low_bmd") & (stats["metric"] == "tp")]["value"].iloc[0]) == tp
    assert int(stats[(stats["target"] == "objects") & (stats["metric"] == "count")]["value"].iloc[0]) == len(df)
    assert stats[(stats["target"] == "low_bmd") & (stats["metric"] == "npv")][["ci_lo", "ci_hi"]].notna().all().all()


def test_duckdb_reads_outputs_from_s3(s3_screen):
    import duckdb

    cfg, manifest, _ = s3_screen
    fs, path = Store.resolve().filesystem(join(cfg.output, "predictions"))
    con = duckdb.connect()
    con.register("predictions", pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive"))
    rows = con.execute("SELECT site, count(*) FILTER (WHERE low_bmd_flag) * 1.0 / count(*) AS low_bmd_prevalence, "
                       "count(*) AS n FROM predictions WHERE status = 'ok' GROUP BY site ORDER BY site").fetchall()
    assert sum(r[2] for r in rows) == manifest["counts"]["ok"] and all(0 <= r[1] <= 1 for r in rows)


def test_no_raw_patient_identifier_in_any_output(s3_screen, small_archive):
    cfg, _, _ = s3_screen
    subjects = draw_subjects(SynthConfig(n=24, seed=3, size=128, formats=("dicom", "dicom", "png", "jpeg")))
    secrets_ = {s.mrn for s in subjects} | {s.name for s in subjects} | {s.name.split("^")[1] for s in subjects} \
        | {s.birth_date for s in subjects}
    bucket, prefix = split_s3(cfg.output)
    texts = []
    for obj in Store.resolve().list_objects(cfg.output):
        data = Store.resolve().read_bytes(obj.uri)
        if obj.key.endswith(".parquet"):
            import io

            table = pq.read_table(io.BytesIO(data))
            texts.append(json.dumps(table.to_pylist(), default=str))
        else:
            texts.append(data.decode("utf-8", "replace"))
    blob = "\n".join(texts)
    assert blob and not [s for s in secrets_ if s in blob]


def test_crash_before_commit_then_rerun_and_rescan_are_exactly_once(ray_local, tmp_path, small_archive, tiny_bundle,
                                                                   monkeypatch):
    import kneescreen.screen.pipeline as screen_mod

    root, _ = small_archive
    archive = tmp_path / "archive"
    archive.mkdir()
    for p in sorted((root / "images").rglob("*.dcm"))[:10]:
        (archive / p.name).write_bytes(p.read_bytes())
    # Blocks of 3 rows: several decode tasks and blocks per run, still one predictions file per run.
    # One inference actor: the shared test Ray has 2 CPUs, and 2 actors would leave none for decoding.
    cfg = ScreenConfig(input=str(archive), output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=4,
                       decode_batch_size=3, actors=1)

    def crash(*a, **k):
        raise RuntimeError("simulated crash after the predictions were written")

    monkeypatch.setattr(screen_mod, "compute_stats", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_screen(cfg)
    monkeypatch.undo()
    assert list((tmp_path / "out" / "predictions").rglob("*.parquet"))  # orphan rows exist on disk
    assert committed_runs(Store.resolve(), cfg.output) == []  # ...but no run committed: invisible
    first = run_screen(cfg)
    assert first["counts"]["screened"] == 10
    # Add one object and change another: the rescan screens exactly those two.
    extra = sorted((root / "images").rglob("*.dcm"))[10]
    (archive / extra.name).write_bytes(extra.read_bytes())
    changed = sorted(archive.iterdir())[0]
    changed.write_bytes(changed.read_bytes() + b"\0\0")  # new size -> new etag
    second = run_screen(cfg)
    assert second["counts"]["screened"] == 2 and second["counts"]["already_screened"] == 9
    third = run_screen(cfg)
    assert third["counts"]["screened"] == 0
    df = _predictions(cfg.output)
    assert not df.duplicated(["key", "etag", "model_version"]).any()
    listing = {(o.key, o.etag) for o in Store.resolve().list_objects(cfg.input)}
    assert listing <= set(zip(df["key"], df["etag"]))  # no gaps
    # One file per committed run (10 then 2 rows; blocks coalesced), the orphan's file removed.
    assert len(list((tmp_path / "out" / "predictions").rglob("*.parquet"))) == 2
    # The documented reader query returns one latest row per object.
    import duckdb

    q = pathlib.Path(__file__).resolve().parents[1] / "docs" / "queries" / "latest_per_object.sql"
    sql = q.read_text().replace("{{output}}", str(tmp_path / "out"))
    latest = duckdb.sql(sql).df()
    assert len(latest) == 11 and latest["key"].is_unique
