"""The run ledger: which runs committed, what they screened, and the listing still to screen.

A run is committed when ``runs/run_id=<r>.json`` exists (written last). Its one-line copy in
``runs_jsonl/`` (for Athena/Glue JSON SerDe tables, which read one object per line) is written just
before it, and cleaned up with the other files of a run that never committed. Before a run starts,
files of runs that never committed are deleted; incremental mode skips every (key, etag) that a
committed run of the same model version has *done*: screened ok, skipped by policy, or failed with
a permanent error code. A transient failure (`data.decode.TRANSIENT_ERROR_CODES`: storage errors,
decoder crashes) is not done, so the next incremental run retries it; with ``--retry-errors``
permanent errors are retried too. An object with an ok row is never screened again, so committed
runs hold at most one ok row per (key, etag, model version), and the retried row belongs to the
later run, which readers' "latest row per object" picks. The listing streams page by page into
scratch Parquet chunks, so the driver never holds the whole archive's keys at once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import secrets

import pyarrow as pa

from kneescreen.data.decode import is_transient
from kneescreen.io.store import Store, is_s3, join
from kneescreen.screen.config import ScreenConfig

LISTING_CHUNK = 5000  # listing rows per scratch Parquet file: bounded driver memory per page
RUNS_JSONL = "runs_jsonl"  # one-line copies of the run manifests, for JSON SerDe tables (Athena)
LISTING_SCHEMA = pa.schema([("key", pa.string()), ("etag", pa.string()), ("size", pa.int64())])


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def committed_runs(store: Store, output: str) -> list[dict]:
    """Manifests of every committed run below ``output``, oldest first."""
    runs_dir = join(output, "runs")
    if not is_s3(output) and not store.exists(runs_dir):
        return []
    out = [json.loads(store.read_bytes(obj.uri)) for obj in store.list_objects(runs_dir, include=("*.json",))]
    return sorted(out, key=lambda r: r["started_at"])


def commit_run(store: Store, output: str, manifest: dict) -> None:
    """The commit: once ``runs/run_id=<r>.json`` exists the run is visible to readers and to the
    next rescan.

    The same manifest is first written as one JSON line to ``runs_jsonl/run_id=<r>.json`` for
    engines whose JSON SerDe needs one object per line (Athena, Glue, Hive; docs/queries.md). It is
    written before the commit file so that the commit stays the last write: a crash between the two
    leaves an orphan line that the next run deletes (`drop_uncommitted`), never a committed run
    missing from the JSON-lines table.
    """
    name = f"run_id={manifest['run_id']}.json"
    store.write_bytes(join(output, RUNS_JSONL, name), (json.dumps(manifest, separators=(",", ":")) + "\n").encode())
    store.write_bytes(join(output, "runs", name), json.dumps(manifest, indent=2).encode())


def drop_uncommitted(store: Store, output: str, committed_ids: set[str]) -> list[str]:
    """Delete prediction/stats/scratch files and one-line manifests of runs that never committed."""
    dropped = []
    for table in ("predictions", "stats"):
        for mv in store.list_dirs(join(output, table)):
            for run_dir in store.list_dirs(join(output, table, mv)):
                run_id = run_dir.split("=", 1)[-1]
                if run_id not in committed_ids:
                    store.delete_prefix(join(output, table, mv, run_dir))
                    dropped.append(run_id)
    jsonl = join(output, RUNS_JSONL)
    if is_s3(output) or store.exists(jsonl):
        for obj in store.list_objects(jsonl, include=("*.json",)):
            run_id = obj.key.rsplit("/", 1)[-1].removeprefix("run_id=").removesuffix(".json")
            if run_id not in committed_ids:
                store.delete(obj.uri)
                dropped.append(run_id)
    store.delete_prefix(join(output, "_scratch"))
    return sorted(set(dropped))


def _digest(key: str, etag: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{etag}".encode(), digest_size=12).digest()


def done_set(store: Store, output: str, runs: list[dict], model_version: str,
             retry_errors: bool = False) -> set[bytes]:
    """(key, etag) digests already done by committed runs of this model version (`screen_state`)."""
    return screen_state(store, output, runs, model_version, retry_errors)[0]


def _is_done(status: str, error_code: str | None, retry_errors: bool) -> bool:
    """Whether a committed row settles its object (see the module docstring)."""
    if status != "error":
        return True  # ok, or skipped by policy: reading the object again changes nothing
    return not retry_errors and not is_transient(error_code)


def screen_state(store: Store, output: str, runs: list[dict], model_version: str,
                 retry_errors: bool = False) -> tuple[set[bytes], set[bytes]]:
    """What committed runs of this model version left: done objects and objects to retry.

    Args:
        store: where the output lives.
        output: the output root.
        runs: committed run manifests (`committed_runs`).
        model_version: only runs of this bundle version count.
        retry_errors: treat permanent errors as not done too (``--retry-errors``).

    Returns:
        (done, retry): (key, etag) digests to skip, and digests whose committed rows are all errors
        that are to be tried again (the run manifest's ``retried`` counts those it re-screens).
        An object done by any run is done, whatever other runs hold for it. 12-byte digests keep
        ~10 million screened objects within about 1 GB of driver memory.
    """
    done: set[bytes] = set()
    failed: set[bytes] = set()
    for run in runs:
        if run["model_version"] != model_version:
            continue
        uri = join(output, "predictions", f"model_version={model_version}", f"run_id={run['run_id']}")
        if not run.get("predictions"):
            continue  # a run that screened nothing wrote no predictions
        for batch in store.iter_parquet_batches(uri, ["key", "etag", "status", "error_code"]):
            cols = [batch.column(c).to_pylist() for c in ("key", "etag", "status", "error_code")]
            for k, e, status, code in zip(*cols):
                (done if _is_done(status, code, retry_errors) else failed).add(_digest(k, e or ""))
    return done, failed - done


def stream_listing(store: Store, cfg: ScreenConfig, run_id: str, done: set[bytes],
                   retry: set[bytes] = frozenset()) -> dict:
    """Stream the archive listing page by page into scratch Parquet chunks, minus ``done``.

    Returns:
        counts (listed, already_done, to_screen, retried: listed objects in ``retry``), the
        listing fingerprint, the scratch prefix and the chunk URIs.
    """
    scratch = join(cfg.output, "_scratch", f"run_id={run_id}")
    fp = hashlib.sha256()
    chunk: list[dict] = []
    counts = {"listed": 0, "already_done": 0, "to_screen": 0, "retried": 0}
    uris: list[str] = []

    def flush():
        if chunk:
            uris.append(join(scratch, f"listing-{len(uris):06d}.parquet"))
            store.write_parquet(pa.Table.from_pylist(chunk, schema=LISTING_SCHEMA), uris[-1])
            chunk.clear()

    for obj in store.list_objects(cfg.input, cfg.include, cfg.exclude):
        counts["listed"] += 1
        fp.update(f"{obj.key}\t{obj.etag}\n".encode())
        digest = _digest(obj.key, obj.etag)
        if digest in done:
            counts["already_done"] += 1
            continue
        counts["retried"] += digest in retry
        chunk.append({"key": obj.key, "etag": obj.etag, "size": obj.size})
        counts["to_screen"] += 1
        if len(chunk) >= LISTING_CHUNK:
            flush()
    flush()
    return {**counts, "fingerprint": fp.hexdigest()[:32], "scratch": scratch, "chunk_uris": uris}


def read_listing_chunks(batch, store: Store):
    """Ray Data task: scratch chunk URIs -> their listing rows (key, etag, size)."""
    return pa.concat_tables([store.read_parquet(uri) for uri in batch["chunk"].to_pylist()])
