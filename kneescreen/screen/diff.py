"""The incremental diff: the archive listing minus what committed runs have done, with driver
memory that does not grow with the archive.

    committed runs' predictions of this model version (key, etag, status, error_code: record
    batches) -> (digest, done) rows -> hash partition -> done/p=<p>/*.parquet
    listing pages (`screen.listing`, parallel) -> (key, etag, size, digest) -> hash partition
      -> listing/p=<p>/*.parquet; the driver keeps counts and the fingerprint's sum
    per partition: listing/p anti-join done/p on the digest -> todo/p=<p>/*.parquet chunks
      (on the driver when there is one partition, else one Ray task per partition)

All under ``<output>/_scratch/run_id=<r>/``, removed before the commit (and by the next run if
this one never commits). The rule is `ledger.is_done`: ok, skipped and permanent errors are
done; transient errors are retried (counted in ``retried``), and with ``--retry-errors``
permanent errors too. Each chunk row carries ``attempts``: how many committed error rows its
object version already has, so that the decode stage can end a transient error that persists
past ``--max-retries`` as a permanent ``retries_exhausted`` row (`screen.stages.decode_stage`). An object done by any run is done.

Why hash partitions: a (key, etag) digest is uniform, so P partitions of one archive hold about
N / P objects each whatever the key layout, and both sides of one object land in the same
partition. The driver only ever holds bounded write buffers (`BUFFER_ROWS`), a few listing pages and
per-partition counters; a partition's anti-join holds that partition's done digests (sorted
12-byte strings, membership by binary search) and one listing file. `choose_partitions` sizes P to ~1 million objects
per partition from the previous run. When no committed run of this model version exists (first
run, ``--mode full``) there is nothing to subtract: one partition, and the listing files are the
chunks to screen, as before.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from kneescreen.fileio.store import Store, join
from kneescreen.screen import ledger, listing
from kneescreen.screen.config import ScreenConfig

LISTING_CHUNK = 5000  # rows per chunk to screen (and per listing file with one partition)
PARTITION_ROWS = 1_000_000  # target objects per partition: its anti-join holds ~30-40 MB
# Rows buffered by a partition writer in all before every partition is flushed (~100 bytes a
# listing row in Arrow: ~25 MB). Larger buffers mean fewer, larger scratch files at many partitions.
BUFFER_ROWS = 250_000
DONE_BATCH = 16_384  # committed rows per record batch read for the done side
LISTING_SCHEMA = pa.schema([("key", pa.string()), ("etag", pa.string()), ("size", pa.int64())])
DIGEST = pa.binary(12)


def choose_partitions(cfg: ScreenConfig, runs: list[dict], model_version: str) -> int:
    """Hash partitions for this run: ``--diff-partitions``, else one per ~`PARTITION_ROWS` objects
    of the larger of the previous listing and the rows committed by this model version (1 when
    nothing is to be subtracted)."""
    if cfg.mode != "incremental" or not ledger.prediction_uris(cfg.output, runs, model_version):
        return 1
    if cfg.diff_partitions:
        return cfg.diff_partitions
    committed = sum(int(r.get("counts", {}).get("screened", 0)) for r in runs if r["model_version"] == model_version)
    listed = int(runs[-1].get("counts", {}).get("listed", 0)) if runs else 0
    return max(1, math.ceil(max(committed, listed) / PARTITION_ROWS))


def digest_partition(digests: list[bytes], partitions: int) -> np.ndarray:
    """Each (key, etag) digest's partition: its first 4 bytes (big-endian) modulo ``partitions``.
    The digest is already a uniform hash, so no second hash (`data.fingerprints.value_partition`)."""
    if partitions == 1:
        return np.zeros(len(digests), dtype=np.int64)
    return np.array([int.from_bytes(d[:4], "big") for d in digests], dtype=np.int64) % partitions


def part_uri(folder: str, p: int, i: int) -> str:
    return join(folder, f"p={p:05d}", f"{i:06d}.parquet")


class PartitionWriter:
    """Arrow rows split by partition into ``<folder>/p=<p>/<i>.parquet``, with bounded buffers.

    Buffers hold at most ``min(BUFFER_ROWS, LISTING_CHUNK x partitions)`` rows in all; then every
    partition is flushed (one file each, written concurrently). With one partition that is a
    file per `LISTING_CHUNK` rows. ``files[p]`` and ``rows[p]`` count what was written, so the
    file names need not be kept: ``part_uri(folder, p, i)`` for i < files[p].
    """

    def __init__(self, store: Store, folder: str, partitions: int):
        self.store, self.folder, self.partitions = store, folder, partitions
        self.cap = min(BUFFER_ROWS, LISTING_CHUNK * partitions)
        self.files = [0] * partitions
        self.rows = [0] * partitions
        self._buffers: list[list[pa.Table]] = [[] for _ in range(partitions)]
        self._buffered = 0

    def add(self, table: pa.Table, parts: np.ndarray) -> None:
        if self.partitions == 1:
            self._buffers[0].append(table)
        else:
            order = np.argsort(parts, kind="stable")
            ordered = table.take(pa.array(order))
            bounds = np.searchsorted(parts[order], np.arange(self.partitions + 1))
            for p in np.flatnonzero(np.diff(bounds)):
                self._buffers[p].append(ordered.slice(bounds[p], bounds[p + 1] - bounds[p]))
        self._buffered += table.num_rows
        if self._buffered >= self.cap:
            self.flush()

    def flush(self) -> None:
        jobs = []
        for p, buffer in enumerate(self._buffers):
            if buffer:
                jobs.append((pa.concat_tables(buffer), part_uri(self.folder, p, self.files[p])))
                self.files[p] += 1
                self.rows[p] += jobs[-1][0].num_rows
                self._buffers[p] = []
        self._buffered = 0
        if len(jobs) > 1:  # many small files at many partitions: S3 PUTs in parallel
            with ThreadPoolExecutor(min(16, len(jobs))) as pool:
                list(pool.map(lambda job: self.store.write_parquet(*job), jobs))
        elif jobs:
            self.store.write_parquet(*jobs[0])


def write_done_side(store: Store, uris: list[str], retry_errors: bool, writer: PartitionWriter) -> int:
    """Committed prediction rows -> (digest, done) rows by partition; returns the rows read."""
    n = 0
    for uri in uris:
        for batch in store.iter_parquet_batches(uri, ["key", "etag", "status", "error_code"], batch_size=DONE_BATCH,
                                                  readahead=False):
            keys, etags, status, codes = (batch.column(c).to_pylist() for c in ("key", "etag", "status", "error_code"))
            digests = [ledger.object_digest(k, e or "") for k, e in zip(keys, etags)]
            done = [ledger.is_done(s, c, retry_errors) for s, c in zip(status, codes)]
            writer.add(pa.table({"digest": pa.array(digests, DIGEST), "done": pa.array(done, pa.bool_())}),
                       digest_partition(digests, writer.partitions))
            n += len(digests)
    writer.flush()
    return n


def write_listing_side(store: Store, cfg: ScreenConfig, writer: PartitionWriter) -> tuple[listing.Fingerprint, int]:
    """The archive listing -> (key, etag, size, digest) rows by partition; returns the fingerprint
    (whose ``count`` is the objects listed) and the directory markers skipped (S3 keys ending in "/")."""
    fp = listing.Fingerprint()
    markers = 0
    pages = listing.iter_pages(store, cfg.input, cfg.include, cfg.exclude, fanout_depth=cfg.list_fanout_depth,
                               prefixes=cfg.list_prefixes, workers=cfg.list_workers)
    for page in pages:
        markers += page.markers
        if not page.objects:
            continue
        keys = [o.key for o in page.objects]
        etags = [o.etag for o in page.objects]
        digests = [ledger.object_digest(k, e) for k, e in zip(keys, etags)]
        fp.add(digests)
        table = pa.table({"key": pa.array(keys, pa.string()), "etag": pa.array(etags, pa.string()),
                          "size": pa.array([o.size for o in page.objects], pa.int64()),
                          "digest": pa.array(digests, DIGEST)})
        writer.add(table, digest_partition(digests, writer.partitions))
    writer.flush()
    return fp, markers


def _digests(column) -> np.ndarray:
    """A digest column as a numpy array of 12-byte strings (a view, no copy for one chunk)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.frombuffer(arr.buffers()[1], dtype="S12")[arr.offset:arr.offset + len(arr)]


def _isin(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Membership by binary search: the set is sorted once per partition, not hashed per file."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[idx] == values


def _done_digests(store: Store, folder: str, p: int, files: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A partition's done digests, the digests to retry (failed, and not done by any run), each
    sorted for `_isin`, and per retry digest its failed rows so far (the attempts already made).
    Duplicates across runs are harmless to a binary search."""
    done, failed = [], []
    for i in range(files):
        table = store.read_parquet(part_uri(folder, p, i), use_threads=False)
        digest, mask = _digests(table.column("digest")), table.column("done").to_numpy(zero_copy_only=False)
        done.append(digest[mask])  # boolean indexing copies: the file's table can go
        failed.append(digest[~mask])
    done_set = np.concatenate(done)
    del done
    done_set.sort()
    failed = np.concatenate(failed)
    retry_set, attempts = np.unique(failed[~_isin(failed, done_set)], return_counts=True)  # sorted
    return done_set, retry_set, attempts


def diff_partition(store: Store, scratch: str, p: int, listing_files: int, done_files: int,
                   chunk_rows: int = LISTING_CHUNK) -> dict:
    """One partition's anti-join: its listing minus its done digests, written as chunks to screen.

    Holds the partition's done digests (12 bytes each, sorted) and one listing file at a time.
    Runs on the driver or as a Ray task (`diff_listing`).

    Returns:
        already_done, to_screen, retried (listed objects whose committed rows are all errors to
        try again) and the chunk URIs.
    """
    done_set, retry_set, attempts = _done_digests(store, join(scratch, "done"), p, done_files)
    counts = {"already_done": 0, "to_screen": 0, "retried": 0}
    chunks, buffer = [], []

    def flush():
        if buffer:
            chunks.append(part_uri(join(scratch, "todo"), p, len(chunks)))
            store.write_parquet(pa.concat_tables(buffer), chunks[-1])
            buffer.clear()

    for i in range(listing_files):
        table = store.read_parquet(part_uri(join(scratch, "listing"), p, i), use_threads=False)
        keep_mask = ~_isin(_digests(table.column("digest")), done_set)
        keep = table.filter(pa.array(keep_mask))
        counts["already_done"] += table.num_rows - keep.num_rows
        counts["to_screen"] += keep.num_rows
        digests = _digests(keep.column("digest"))
        retried = _isin(digests, retry_set)
        counts["retried"] += int(retried.sum())
        if keep.num_rows:
            prior = np.zeros(len(digests), dtype=np.int32)
            if retried.any():
                prior[retried] = attempts[np.searchsorted(retry_set, digests[retried])]
            buffer.append(keep.select(LISTING_SCHEMA.names).append_column("attempts", pa.array(prior, pa.int32())))
            if sum(t.num_rows for t in buffer) >= chunk_rows:
                flush()
    flush()
    return {**counts, "chunks": chunks}


def _run_partitions(store: Store, scratch: str, jobs: list[dict], use_ray: bool) -> list[dict]:
    """`diff_partition` for each job: in this process one after another, or as Ray tasks
    (one partition per task: what a task holds does not grow with the archive either)."""
    if not use_ray or not jobs:
        return [diff_partition(store, scratch, **job) for job in jobs]
    import ray

    from kneescreen._private.cluster import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(diff_partition)
    return ray.get([task.remote(store, scratch, **job) for job in jobs])


def diff_listing(store: Store, cfg: ScreenConfig, run_id: str, runs: list[dict], model_version: str,
                 use_ray: bool | None = None) -> dict:
    """List the archive and subtract what committed runs of ``model_version`` have done.

    Args:
        store: where input and output live.
        cfg: the run's settings (input, include/exclude, listing fan-out, mode, retry_errors,
            output, diff_partitions).
        run_id: the run, for its scratch prefix.
        runs: committed run manifests (`ledger.committed_runs`).
        model_version: only runs of this bundle version count.
        use_ray: anti-joins as Ray tasks; None: when there is more than one partition.

    Returns:
        counts (listed, already_done, to_screen, retried, skipped_directory_markers), the listing
        fingerprint, partitions, the scratch prefix and the URIs of the chunks to screen.
    """
    scratch = join(cfg.output, "_scratch", f"run_id={run_id}")
    done_uris = ledger.prediction_uris(cfg.output, runs, model_version) if cfg.mode == "incremental" else []
    parts = choose_partitions(cfg, runs, model_version)
    done_w = PartitionWriter(store, join(scratch, "done"), parts)
    write_done_side(store, done_uris, cfg.retry_errors, done_w)
    list_w = PartitionWriter(store, join(scratch, "listing"), parts)
    fp, markers = write_listing_side(store, cfg, list_w)
    counts = {"listed": fp.count, "already_done": 0, "to_screen": 0, "retried": 0}
    chunk_uris, jobs = [], []
    for p in range(parts):
        if not list_w.files[p]:
            continue
        if not done_w.files[p]:  # nothing to subtract: the listing files are the chunks
            chunk_uris += [part_uri(list_w.folder, p, i) for i in range(list_w.files[p])]
            counts["to_screen"] += list_w.rows[p]
        else:
            jobs.append({"p": p, "listing_files": list_w.files[p], "done_files": done_w.files[p]})
    for result in _run_partitions(store, scratch, jobs, parts > 1 if use_ray is None else use_ray):
        chunk_uris += result.pop("chunks")
        counts = {k: counts[k] + result.get(k, 0) for k in counts}
    return {**counts, "skipped_directory_markers": markers, "fingerprint": fp.hexdigest(), "partitions": parts,
            "scratch": scratch, "chunk_uris": chunk_uris}


def read_listing_chunks(batch, store: Store) -> pa.Table:
    """Ray Data task: chunk URIs -> their listing rows (key, etag, size, attempts: the failed
    attempts committed runs already made at this object version, 0 for a new one)."""
    tables = []
    for uri in batch["chunk"].to_pylist():
        table = store.read_parquet(uri)
        attempts = (table.column("attempts") if "attempts" in table.column_names
                    else pa.array(np.zeros(table.num_rows, dtype=np.int32)))
        tables.append(table.select(LISTING_SCHEMA.names).append_column("attempts", attempts))
    return pa.concat_tables(tables)
