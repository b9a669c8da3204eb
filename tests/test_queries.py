"""docs/queries.md stays true: the Athena DDL's columns are the Parquet schemas (screen.schema) and
the run manifest the code writes, its locations follow the output layout, and the DuckDB queries
run on a small output written in that layout (built with pyarrow and the ledger; no Ray)."""

from __future__ import annotations

import datetime as _dt
import json
import pathlib
import re

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kneescreen.fileio.store import Store
from kneescreen.screen import ledger, pipeline
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.schema import PATIENTS, PREDICTIONS, STATS

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "queries.md"
HIVE_TYPES = {"string": pa.string(), "bigint": pa.int64(), "double": pa.float64(), "boolean": pa.bool_(),
              "timestamp": pa.timestamp("us", tz="UTC"), "array<double>": pa.list_(pa.float64()), "date": pa.date32()}


def _sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)$", DOC.read_text(), flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def _sql_blocks(section: str) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", _sections()[section], flags=re.DOTALL)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside <...> and (...)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "<("
        depth -= ch in ">)"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [c.strip() for c in out + [cur] if c.strip()]


def _ddl() -> dict[str, dict]:
    """table -> {columns: {name: type}, partitions: {name: type}, location, properties}."""
    tables = {}
    for block in _sql_blocks("Athena / Glue"):
        m = re.match(r"\s*CREATE EXTERNAL TABLE (\w+) \((.*?)\n\)\n(.*)", block, flags=re.DOTALL)
        if not m:
            continue
        name, cols, rest = m.groups()
        parts = re.search(r"PARTITIONED BY \((.*?)\)\n", rest)
        props = re.search(r"TBLPROPERTIES \((.*)\)", rest, flags=re.DOTALL)
        tables[name] = {
            "columns": dict(c.split(None, 1) for c in _split_top_level(cols)),
            "partitions": dict(c.split(None, 1) for c in _split_top_level(parts.group(1))) if parts else {},
            "location": re.search(r"LOCATION '([^']+)'", rest).group(1),
            "properties": dict(re.findall(r"'([^']+)' = '([^']+)'", props.group(1))) if props else {},
            "text": rest,
        }
    return tables


def test_ddl_has_the_four_tables():
    assert set(_ddl()) == {"kneescreen_predictions", "kneescreen_stats", "kneescreen_patients", "kneescreen_runs"}


@pytest.mark.parametrize("table,schema,folder", [("kneescreen_predictions", PREDICTIONS, "predictions"),
                                                 ("kneescreen_stats", STATS, "stats"),
                                                 ("kneescreen_patients", PATIENTS, "patients")])
def test_parquet_ddl_columns_equal_the_schema(table, schema, folder):
    ddl = _ddl()[table]
    assert list(ddl["partitions"]) == ["model_version", "run_id"]  # the directory order of the layout
    declared = {**ddl["columns"], **ddl["partitions"]}
    assert len(declared) == len(ddl["columns"]) + len(ddl["partitions"])  # no column twice
    assert set(declared) == set(schema.names)
    for field in schema:
        assert HIVE_TYPES[declared[field.name]] == field.type, field.name
    root = "s3://RESULTS_BUCKET/kneescreen"
    assert ddl["location"] == f"{root}/{folder}/" and "STORED AS PARQUET" in ddl["text"]
    props = ddl["properties"]
    assert props["projection.enabled"] == "true"
    assert props["projection.model_version.type"] == props["projection.run_id.type"] == "injected"
    assert props["storage.location.template"] == f"{root}/{folder}/model_version=${{model_version}}/run_id=${{run_id}}/"


def _manifest() -> dict:
    """A run manifest as the pipeline writes it (the function the commit serialises)."""
    cfg = ScreenConfig(input="s3://a/in", output="s3://b/out", bundle="s3://b/bundle")
    df = pd.DataFrame({"status": ["ok", "ok", "error"], "error_code": [None, None, "not_dicom"]})
    listing = {"fingerprint": "f" * 32, "listed": 3, "already_done": 0}
    started = _dt.datetime(2026, 1, 5, 2, tzinfo=_dt.timezone.utc)
    return pipeline._run_manifest(cfg, "20260105T020000Z-abc123", "mv1", b"k" * 16, listing, df, started,
                                  {"list_and_diff": 0.5, "screen": 2.0, "total": 2.6}, "s3://b/out/predictions/x")


def test_runs_ddl_matches_the_manifest_the_code_writes():
    ddl = _ddl()["kneescreen_runs"]
    manifest = json.loads(json.dumps(_manifest()))  # as the SerDe sees it
    assert set(manifest) - set(ddl["columns"]) == {"config"}  # documented: settings live in configs/
    assert set(ddl["columns"]) <= set(manifest)
    py = {"string": str, "bigint": int, "double": (int, float)}
    for name, kind in ddl["columns"].items():
        value = manifest[name]
        if kind.startswith("struct<"):
            fields = dict(f.split(":", 1) for f in _split_top_level(kind[7:-1]))
            assert set(fields) == set(value), name
            assert all(isinstance(value[k], py[t.strip()]) for k, t in fields.items()), name
        elif kind.startswith("map<"):
            assert all(isinstance(v, int) for v in value.values()), name
        else:
            assert value is None or isinstance(value, py[kind]), name
    assert ddl["location"] == "s3://RESULTS_BUCKET/kneescreen/runs_jsonl/" and "JsonSerDe" in ddl["text"]
    assert not ddl["partitions"]


# --- DuckDB on the documented layout ---------------------------------------------------------

def _rows(run_id: str, model_version: str, specs: list[tuple]) -> pa.Table:
    base = {f.name: None for f in PREDICTIONS}
    rows = [{**base, "run_id": run_id, "model_version": model_version, "key": key, "etag": "e", "size": 1,
             "status": status, "error_code": code, "site": site, "predicted_class": cls}
            for key, status, code, site, cls in specs]
    return pa.Table.from_pylist(rows, schema=PREDICTIONS)


def _stats(run_id: str, model_version: str) -> pa.Table:
    rows = [{"run_id": run_id, "model_version": model_version, "subgroup_type": "site", "subgroup": site,
             "target": "low_bmd", "metric": "sensitivity", "value": v, "ci_lo": lo, "ci_hi": hi,
             "numerator": n, "denominator": 10} for site, v, lo, hi, n in (("A", 0.9, 0.6, 0.98, 9), ("B", 0.7, 0.4, 0.89, 7))]
    rows.append({**rows[0], "metric": "specificity"})
    return pa.Table.from_pylist(rows, schema=STATS)


def _patients(run_id: str, model_version: str) -> pa.Table:
    base = {f.name: None for f in PATIENTS}
    rows = [{**base, "run_id": run_id, "model_version": model_version, "patient_pseudo_id": pid,
             "patient_id_missing": False, "n_images": 2, "n_studies": 1, "deciding_key": f"{pid}.dcm",
             "risk_score": risk, "triage_zone": zone, "t_score_est": -1.5, "t_score_lo": -2.5, "t_score_hi": -0.5}
            for pid, risk, zone in (("pA", 0.5, "refer"), ("pB", 0.7, "refer"), ("pC", 0.1, "rule_out"))]
    return pa.Table.from_pylist(rows, schema=PATIENTS)


@pytest.fixture
def output(tmp_path) -> pathlib.Path:
    """Two runs of one model: r1 committed (through the ledger), r2 died before its commit."""
    out = tmp_path / "out"
    for run_id, committed, specs in [
        ("20260105T020000Z-aaaaaa", True, [("k1", "ok", None, "A", "normal"), ("k2", "ok", None, "A", "osteoporosis"),
                                           ("k3", "ok", None, "B", "normal"), ("k4", "error", "not_dicom", "B", None)]),
        ("20260106T020000Z-bbbbbb", False, [("k5", "ok", None, "A", "osteopenia"), ("k6", "error", "truncated", "B", None)]),
    ]:
        part = out / "predictions" / "model_version=mv1" / f"run_id={run_id}"
        part.mkdir(parents=True)
        pq.write_table(_rows(run_id, "mv1", specs), part / "part-0.parquet")
        spart = out / "stats" / "model_version=mv1" / f"run_id={run_id}"
        spart.mkdir(parents=True)
        pq.write_table(_stats(run_id, "mv1"), spart / "stats.parquet")
        ppart = out / "patients" / "model_version=mv1" / f"run_id={run_id}"
        ppart.mkdir(parents=True)
        pq.write_table(_patients(run_id, "mv1"), ppart / "part-0.parquet")
        if committed:
            manifest = {**_manifest(), "run_id": run_id, "model_version": "mv1"}
            ledger.commit_run(Store(), str(out), manifest)
    return out


def _run(sql: str, out: pathlib.Path):
    return duckdb.sql(sql.replace("'out/", f"'{out}/").replace("<run id>", "20260105T020000Z-aaaaaa")).fetchall()


def test_duckdb_queries_in_the_docs_read_the_layout(output):
    prevalence, sensitivity, errors, worklist, runs = _sql_blocks("DuckDB on a local folder")
    assert _run(prevalence, output) == [("A", "normal", 1, 0.5), ("A", "osteoporosis", 1, 0.5), ("B", "normal", 1, 1.0)]
    assert _run(sensitivity, output) == [("A", 0.9, 0.6, 0.98, 9, 10), ("B", 0.7, 0.4, 0.89, 7, 10)]
    assert _run(errors, output) == [("not_dicom", 1)]  # the uncommitted run's 'truncated' is not counted
    assert _run(runs, output) == [("20260105T020000Z-aaaaaa", "mv1", 3, 2, 1)]
    # The committed run's snapshot only, referred patients highest risk first.
    assert [r[:3] for r in _run(worklist, output)] == [("pB", 0.7, "refer"), ("pA", 0.5, "refer")]


def test_documented_layout_matches_the_files_written(output):
    layout = re.search(r"```\n(predictions/.*?)```", DOC.read_text(), flags=re.DOTALL).group(1)
    folders = [line.split("/", 1)[0] for line in layout.splitlines()]
    assert folders == ["predictions", "stats", "patients", "runs_jsonl", "runs"]
    assert {p.name for p in output.iterdir()} == set(folders)
