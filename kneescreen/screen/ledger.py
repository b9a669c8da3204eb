"""The run ledger: which runs committed, what they screened, and the listing still to screen.

A run is committed when ``runs/run_id=<r>.json`` exists (written last). Its one-line copy in
``runs_jsonl/`` (for Athena/Glue JSON SerDe tables, which read one object per line) is written just
before it, and cleaned up with the other files of a run that never committed. Before a run starts,
files of runs that never committed are deleted; incremental mode skips every (key, etag) that a
committed run of the same model version has *done*: screened ok, skipped by policy, or failed with
a permanent error code. A transient failure (`data.decode.TRANSIENT_ERROR_CODES`: storage errors,
decoder crashes) is not done, so the next incremental run retries it, at most ``--max-retries``
times: the retry that fails last writes a permanent ``retries_exhausted`` row (`screen.diff` counts
an object version's earlier error rows, `screen.stages.exhaust_retries` applies the limit); with ``--retry-errors``
permanent errors are retried too. An object with an ok row is never screened again, so committed
runs hold at most one ok row per (key, etag, model version), and the retried row belongs to the
later run, which readers' "latest row per object" picks. `screen.diff` applies this rule to the
listing without holding either side in driver memory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import secrets

from kneescreen.data.decode import is_transient
from kneescreen.fileio.store import Store, is_s3, join

RUNS_JSONL = "runs_jsonl"  # one-line copies of the run manifests, for JSON SerDe tables (Athena)


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
    """Delete prediction/stats/patients/scratch files and one-line manifests of runs that never committed."""
    dropped = []
    for table in ("predictions", "stats", "patients"):
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


def object_digest(key: str, etag: str) -> bytes:
    """The 96-bit identity of a listed object version: blake2b of (key, etag). The diff joins on
    it, partitions by its first bytes and the listing fingerprint sums it."""
    return hashlib.blake2b(f"{key}\0{etag}".encode(), digest_size=12).digest()


def is_done(status: str, error_code: str | None, retry_errors: bool) -> bool:
    """Whether a committed row settles its object (see the module docstring)."""
    if status != "error":
        return True  # ok, or skipped by policy: reading the object again changes nothing
    return not retry_errors and not is_transient(error_code)


def prediction_uris(output: str, runs: list[dict], model_version: str) -> list[str]:
    """The predictions folders of the committed runs of this model version that wrote any."""
    return [join(output, "predictions", f"model_version={model_version}", f"run_id={run['run_id']}")
            for run in runs if run["model_version"] == model_version and run.get("predictions")]


def done_set(store: Store, output: str, runs: list[dict], model_version: str,
             retry_errors: bool = False) -> set[bytes]:
    """(key, etag) digests already done by committed runs of this model version (`screen_state`)."""
    return screen_state(store, output, runs, model_version, retry_errors)[0]


def screen_state(store: Store, output: str, runs: list[dict], model_version: str,
                 retry_errors: bool = False) -> tuple[set[bytes], set[bytes]]:
    """What committed runs of this model version left, as two sets in memory.

    The reference form of the done/retry rule, for small outputs and tests: its sets grow with
    everything ever screened (~100 bytes per object). `run_screen` uses `screen.diff`, which
    applies the same rule (`is_done`) one hash partition at a time.

    Args:
        store: where the output lives.
        output: the output root.
        runs: committed run manifests (`committed_runs`).
        model_version: only runs of this bundle version count.
        retry_errors: treat permanent errors as not done too (``--retry-errors``).

    Returns:
        (done, retry): (key, etag) digests to skip, and digests whose committed rows are all errors
        that are to be tried again (the run manifest's ``retried`` counts those it re-screens).
        An object done by any run is done, whatever other runs hold for it.
    """
    done: set[bytes] = set()
    failed: set[bytes] = set()
    for uri in prediction_uris(output, runs, model_version):
        for batch in store.iter_parquet_batches(uri, ["key", "etag", "status", "error_code"]):
            cols = [batch.column(c).to_pylist() for c in ("key", "etag", "status", "error_code")]
            for k, e, status, code in zip(*cols):
                (done if is_done(status, code, retry_errors) else failed).add(object_digest(k, e or ""))
    return done, failed - done
