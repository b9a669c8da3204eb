"""Retries that lose nothing: transient S3 failures become read_failed rows that the next
incremental run retries, permanent errors stay done, and client retries absorb faults.

S3 faults come from a real proxy (tests/s3_fault_proxy.py) in front of the moto server: 503
SlowDown, 500 InternalError and connection resets on GETs of a fraction of the objects.
"""

from __future__ import annotations

import io
import pathlib
import pickle

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from s3_fault_proxy import FaultProxy

from kneescreen.data.decode import SKIP_CODES, is_transient
from kneescreen.errors import ERROR_CODES
from kneescreen.fileio.store import Store, join
from kneescreen.screen import ledger
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.ledger import committed_runs, screen_state
from kneescreen.screen.pipeline import run_screen
from kneescreen.screen.schema import PREDICTIONS

QUERIES = pathlib.Path(__file__).resolve().parents[1] / "docs" / "queries"


# --- classification and the ledger (no Ray) --------------------------------------------------------

def test_only_read_failed_and_changed_during_read_are_transient():
    assert is_transient("read_failed") and is_transient("changed_during_read")
    for code in [*ERROR_CODES, *SKIP_CODES, None]:
        assert is_transient(code) == (code in ("read_failed", "changed_during_read")), code


def _commit(output: str, run_id: str, started: str, rows: list[tuple], version: str = "mv") -> None:
    """A committed run holding (key, status, error_code) rows."""
    store = Store()
    table = pa.Table.from_pylist([{**{f.name: None for f in PREDICTIONS}, "run_id": run_id, "model_version": version,
                                   "key": k, "etag": "e", "status": s, "error_code": c} for k, s, c in rows],
                                 schema=PREDICTIONS)
    uri = join(output, "predictions", f"model_version={version}", f"run_id={run_id}", "part-0.parquet")
    store.write_parquet(table, uri)
    ledger.commit_run(store, output, {"run_id": run_id, "started_at": started, "model_version": version,
                                      "predictions": uri})


def test_transient_errors_are_not_done_and_any_ok_row_wins(tmp_path):
    out = str(tmp_path / "out")
    _commit(out, "r1", "2026-01-01", [("ok", "ok", None), ("flaky", "error", "read_failed"),
                                      ("bad", "error", "truncated"), ("hip", "skipped", "not_knee"),
                                      ("healed", "error", "read_failed")])
    _commit(out, "r2", "2026-01-02", [("healed", "ok", None), ("ok", "error", "read_failed")])
    _commit(out, "r3", "2026-01-03", [("other", "error", "read_failed")], version="older-model")
    runs = committed_runs(Store(), out)
    d = lambda *keys: {ledger.object_digest(k, "e") for k in keys}
    done, retry = screen_state(Store(), out, runs, "mv")
    assert done == d("ok", "bad", "hip", "healed") and retry == d("flaky")
    done, retry = screen_state(Store(), out, runs, "mv", retry_errors=True)
    assert done == d("ok", "hip", "healed") and retry == d("flaky", "bad")
    assert ledger.done_set(Store(), out, runs, "mv") == d("ok", "bad", "hip", "healed")


def test_store_retry_settings_reach_both_clients_and_survive_pickling(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    store = Store.resolve("http://127.0.0.1:1")
    assert store.max_attempts == 7
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store and clone.max_attempts == 7 and clone._s3._client is None  # settings only
    config = clone.client.meta.config
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 7}  # 7 attempts, first included
    assert (config.connect_timeout, config.read_timeout) == (store.connect_timeout, store.read_timeout)
    clone.filesystem("s3://bucket/x")  # builds pyarrow's S3FileSystem with the retry strategy
    assert Store(max_attempts=1) != Store(max_attempts=5)
    with pytest.raises(Exception, match="max_attempts"):
        Store(max_attempts=0)


@pytest.mark.s3
def test_pyarrow_reads_retry_through_faults(s3_bucket, s3_server):
    """pyarrow's S3FileSystem gets the same attempts: 2 faults per object are absorbed by 5 attempts
    and fail a read with 1."""
    table = pa.table({"x": list(range(100))})
    uris = [f"s3://{s3_bucket}/t/{name}.parquet" for name in ("a", "b")]
    for uri in uris:
        Store.resolve().write_parquet(table, uri)
    proxy = FaultProxy(s3_server, fraction=1.0, per_key=2, max_faults=4, seconds=60).start()
    try:
        assert Store(proxy.url, "us-east-1", max_attempts=5).read_parquet(uris[0]).equals(table)
        assert sum(proxy.kinds.values()) == 2
        with pytest.raises(OSError):
            Store(proxy.url, "us-east-1", max_attempts=1).read_parquet(uris[1])
    finally:
        proxy.close()


# --- end to end: Ray Data screening through the fault proxy -----------------------------------------

@pytest.fixture(scope="module")
def archive_bucket(ray_local, s3_server, small_archive) -> str:
    root, _ = small_archive
    bucket = "retry-e2e"
    store = Store.resolve()
    store.client.create_bucket(Bucket=bucket)
    for p in sorted((root / "images").rglob("*")):
        if p.is_file():
            store.write_bytes(f"s3://{bucket}/images/{p.relative_to(root / 'images').as_posix()}", p.read_bytes())
    return f"s3://{bucket}/images"


def _rows(output: str) -> pa.Table:
    """Every prediction row of committed runs (hive columns dropped: run_id is in the rows)."""
    runs = {r["run_id"] for r in committed_runs(Store(), output)}
    t = pads.dataset(join(output, "predictions"), format="parquet", partitioning=None).to_table()
    return t.filter(pc.is_in(t.column("run_id"), pa.array(sorted(runs))))


@pytest.mark.slow
def test_transient_read_failures_are_retried_by_the_next_incremental_run(archive_bucket, s3_server, tiny_bundle,
                                                                         labels, tmp_path):
    cfg = ScreenConfig(input=archive_bucket, output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=8)
    proxy = FaultProxy(s3_server, fraction=0.35, per_key=1, max_faults=40, seconds=300).start()
    try:
        # Client retries turned off: every injected fault reaches the pipeline as a failed read.
        first = run_screen(cfg, store=Store(proxy.url, "us-east-1", max_attempts=1))
        proxy.stop_faults()
        rows = _rows(cfg.output).to_pandas()
        failed = rows[rows["error_code"] == "read_failed"]
        assert len(failed) == sum(proxy.kinds.values()) > 0 and len(proxy.kinds) >= 2
        assert failed["status"].eq("error").all() and failed["error_code"].map(is_transient).all()
        assert first["counts"]["retried"] == 0 and first["error_codes"]["read_failed"] == len(failed)
        # Faults off: one incremental rescan re-screens exactly the transient failures.
        second = run_screen(cfg, store=Store(proxy.url, "us-east-1"))
    finally:
        proxy.close()
    assert second["counts"]["retried"] == second["counts"]["screened"] == len(failed)
    assert second["counts"]["already_screened"] == first["counts"]["screened"] - len(failed)
    rows = _rows(cfg.output).to_pandas()
    ok = rows[rows["status"] == "ok"]
    assert sorted(ok["key"]) == sorted(labels)  # every decodable object, once
    assert not ok.duplicated(["key", "etag", "model_version"]).any()
    listed = {o.key for o in Store.resolve().list_objects(cfg.input)}
    assert set(rows["key"]) == listed
    # The documented "latest row per object" sees the retried result: no read_failed left.
    sql = (QUERIES / "latest_per_object.sql").read_text().replace("{{output}}", cfg.output)
    latest = duckdb.sql(sql).df()
    assert sorted(latest["key"]) == sorted(listed) and not (latest["error_code"] == "read_failed").any()
    # A third run has nothing left to retry.
    assert run_screen(cfg, store=Store.resolve())["counts"]["screened"] == 0


@pytest.mark.slow
def test_client_retries_absorb_faults(archive_bucket, s3_server, tiny_bundle, labels, tmp_path):
    cfg = ScreenConfig(input=archive_bucket, output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=8)
    # Two faults in a row per chosen object, well under the default 5 attempts.
    proxy = FaultProxy(s3_server, fraction=0.35, per_key=2, max_faults=60, seconds=300).start()
    try:
        manifest = run_screen(cfg, store=Store(proxy.url, "us-east-1"))
    finally:
        proxy.close()
    assert sum(proxy.kinds.values()) > 0
    rows = _rows(cfg.output).to_pandas()
    assert "read_failed" not in manifest["error_codes"] and not (rows["error_code"] == "read_failed").any()
    assert sorted(rows.loc[rows["status"] == "ok", "key"]) == sorted(labels)
    # The stats the run wrote (streamed from its Parquet) agree with a whole-table recomputation.
    from test_stats_streaming import assert_same_stats, oracle_stats

    stats_uri = join(cfg.output, "stats", f"model_version={manifest['model_version']}",
                     f"run_id={manifest['run_id']}", "stats.parquet")
    written = pq.read_table(io.BytesIO(Store().read_bytes(stats_uri)))
    assert_same_stats(written, oracle_stats(rows, manifest["run_id"], manifest["model_version"]))
