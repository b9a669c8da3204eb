"""`run_link`: the stages of ``kneescreen link``, with driver memory that does not grow with the
archive or the registry.

    archive listing (`screen.listing`, parallel pages) -> scratch listing chunks
      -> Ray Data: chunk -> listing rows -> `headers.header_batch` (ranged header reads, threads)
      -> films, streamed through the driver's bounded buffers into hash partitions by pseudonymous id
    registry CSV/Parquet -> Ray Data read -> `registry.clean_registry_batch` (pseudonymise, parse,
      lowest site) -> exams into the same hash partitions; bad rows counted by reason
    per partition (one Ray task each): `join.link_partition` -> OUT/labels/, OUT/unlinked/
    -> OUT/link_audit.json (last: a folder with it is complete) + OUT/link_config.yaml

Scratch lives under ``OUT/_scratch/`` in the incremental diff's layout (`screen.diff.PartitionWriter`)
and is removed at the end. The driver holds listing pages, one Ray Data batch at a time, the
writers' bounded buffers and counters: never a dict of the archive or of the registry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kneescreen import config as cfglib
from kneescreen.data.link_output import AUDIT_FILE
from kneescreen.errors import KneescreenError
from kneescreen.fileio.privacy import pseudonym_key
from kneescreen.fileio.store import Store, is_s3, join
from kneescreen.link.audit import build_audit
from kneescreen.link.config import LinkConfig
from kneescreen.link.headers import HeaderSpec, header_batch
from kneescreen.link.join import link_partition
from kneescreen.link.registry import RegistrySpec, clean_registry_batch, read_column_names, registry_columns
from kneescreen.screen import diff, listing

_logger = logging.getLogger(__name__)
PARTITION_ROWS = 250_000  # films per join partition (a join task holds ~300 bytes a film in pandas)
REGISTRY_BATCH = 20_000  # registry rows per cleaning task


def partitions_of(pids: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """Each pseudonymous id's partition (CRC-32 modulo ``partitions``; None -> 0). Films and exams
    use this one function, so a patient's both sides meet in one partition."""
    if partitions == 1:
        return np.zeros(len(pids), dtype=np.int64)
    return np.array([zlib.crc32(p.encode()) % partitions if p else 0 for p in pids.to_pylist()], dtype=np.int64)


def list_archive(store: Store, cfg: LinkConfig, scratch: str) -> tuple[dict, list[str]]:
    """List the archive into scratch chunks: ({objects, bytes, markers}, chunk URIs); markers are
    the directory markers skipped (S3 keys ending in "/")."""
    writer = diff.PartitionWriter(store, join(scratch, "listing"), 1)
    n = size = markers = 0
    for page in listing.iter_pages(store, cfg.archive, cfg.include, cfg.exclude, fanout_depth=cfg.list_fanout_depth,
                                   workers=cfg.list_workers):
        markers += page.markers
        if not page.objects:
            continue
        objs = page.objects
        table = pa.table({"key": [o.key for o in objs], "etag": [o.etag for o in objs],
                          "size": pa.array([o.size for o in objs], pa.int64())}, schema=diff.LISTING_SCHEMA)
        writer.add(table, np.zeros(len(objs), dtype=np.int64))
        n += len(objs)
        size += sum(o.size for o in objs)
    writer.flush()
    return ({"objects": n, "bytes": size, "markers": markers},
            [diff.part_uri(writer.folder, 0, i) for i in range(writer.files[0])])


def archive_films(store: Store, cfg: LinkConfig, scratch: str, key: bytes):
    """The default film source: (Ray Data dataset of `headers.FILM_SCHEMA` rows, listing counts)."""
    import ray

    listed, chunks = list_archive(store, cfg, scratch)
    if not chunks:
        raise KneescreenError(f"--archive {cfg.archive}: no objects listed (check the path and --include/--exclude)")
    spec = HeaderSpec(store=store, root=cfg.archive, key=key, body_part_policy=cfg.body_part_policy,
                      threads=cfg.header_threads)
    ds = (ray.data.from_items([{"chunk": u} for u in chunks])
          .map_batches(diff.read_listing_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"store": store})
          .map_batches(header_batch, batch_size=cfg.header_batch_size, batch_format="pyarrow", fn_kwargs={"spec": spec}))
    return ds, listed


def registry_dataset(store: Store, cfg: LinkConfig, t_cols: tuple[str, ...], key: bytes):
    """The registry as a Ray Data dataset of `registry.EXAM_SCHEMA` rows (cleaned in the tasks)."""
    import pyarrow.csv as pacsv
    import ray

    fs, path = store.filesystem(cfg.registry)
    cols = [cfg.id_column, cfg.date_column, *t_cols]
    if cfg.registry.lower().endswith(".parquet"):
        ds = ray.data.read_parquet(path, filesystem=fs, columns=cols, partitioning=None)
    else:  # every column as text: ids keep their leading zeros, dates their format
        ds = ray.data.read_csv(path, filesystem=fs, partitioning=None, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in cols}, include_columns=cols))
    spec = RegistrySpec(cfg.id_column, cfg.date_column, t_cols, key, cfg.registry_ids)
    return ds.map_batches(clean_registry_batch, batch_size=REGISTRY_BATCH, batch_format="pyarrow",
                          fn_kwargs={"spec": spec})


def stream_films(ds, writer: diff.PartitionWriter) -> None:
    """Film rows from the Ray tasks into hash partitions, one batch at a time."""
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        writer.add(batch, partitions_of(batch.column("patient_pseudo_id"), writer.partitions))
    writer.flush()


def stream_exams(ds, writer: diff.PartitionWriter) -> dict:
    """Good exams into hash partitions; returns the registry's row counts (rows, good, bad by reason)."""
    rows, bad = 0, Counter()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
        reasons = batch.column("bad")
        bad.update({r["values"]: r["counts"] for r in pc.value_counts(reasons.drop_null()).to_pylist()})
        good = batch.filter(pc.is_null(reasons)).drop_columns(["bad"])
        if good.num_rows:
            writer.add(good, partitions_of(good.column("patient_pseudo_id"), writer.partitions))
    writer.flush()
    return {"rows": rows, "good": rows - sum(bad.values()), "bad": dict(sorted(bad.items()))}


def join_partitions(store: Store, cfg: LinkConfig, scratch: str, films: diff.PartitionWriter,
                    exams: diff.PartitionWriter) -> list[dict]:
    """`join.link_partition` for every partition with films or exams, one Ray task each."""
    import ray

    task = ray.remote(num_cpus=1)(link_partition)
    refs = [task.remote(store, scratch, cfg.out, p, films.files[p], exams.files[p], cfg.window_days)
            for p in range(films.partitions) if films.files[p] or exams.files[p]]
    return ray.get(refs)


def _clear_output(store: Store, out: str) -> None:
    """A rerun replaces the output: audit first (the folder stops being complete), then the rest."""
    store.delete(join(out, AUDIT_FILE))
    for sub in ("labels", "unlinked", "_scratch"):
        store.delete_prefix(join(out, sub))


def run_link(cfg: LinkConfig, store: Store | None = None, film_source: Callable | None = None) -> dict:
    """Link an archive's radiographs to a DXA registry; write labels, unlinked rows and the audit.

    Args:
        cfg: the settings (`LinkConfig`).
        store: where archive, registry and output live (default: from ``cfg.endpoint_url``).
        film_source: ``(store, cfg, scratch, key) -> (Ray dataset of FILM_SCHEMA rows, {objects,
            bytes})`` instead of listing and reading headers (bench/link_scale.py simulates them).

    Returns:
        The audit written to ``OUT/link_audit.json`` (`kneescreen.link.audit.build_audit`).

    Raises:
        KneescreenError: no pseudonym key, a registry without its id/date/T-score columns, an
            empty archive.
    """
    from kneescreen._private.cluster import ensure_ray

    t0 = time.perf_counter()
    store = store or Store.resolve(cfg.endpoint_url)
    if not is_s3(cfg.archive) and "://" not in cfg.archive:  # the audit's root must resolve from any directory
        cfg = dataclasses.replace(cfg, archive=str(pathlib.Path(cfg.archive).absolute()))
    key = pseudonym_key(required=True)  # the same secret as screening's, or the pseudonyms cannot match
    t_cols = registry_columns(read_column_names(store, cfg.registry), cfg.id_column, cfg.date_column,
                              f"--registry {cfg.registry}")
    scratch = join(cfg.out, "_scratch")
    _clear_output(store, cfg.out)
    ensure_ray()
    timing = {}
    _logger.info("[1/4] listing %s and reading DICOM headers", cfg.archive)
    films_ds, listed = (film_source or archive_films)(store, cfg, scratch, key)
    parts = cfg.partitions or max(1, math.ceil(listed["objects"] / PARTITION_ROWS))
    films = diff.PartitionWriter(store, join(scratch, "films"), parts)
    stream_films(films_ds, films)
    timing["headers"] = time.perf_counter() - t0
    _logger.info("[2/4] reading the registry %s (%d column(s) of T-scores)", cfg.registry, len(t_cols))
    exams = diff.PartitionWriter(store, join(scratch, "exams"), parts)
    registry = stream_exams(registry_dataset(store, cfg, t_cols, key), exams)
    timing["registry"] = time.perf_counter() - t0 - timing["headers"]
    _logger.info("[3/4] linking in %d partition(s), window +-%d days", parts, cfg.window_days)
    results = join_partitions(store, cfg, scratch, films, exams)
    timing["join"] = time.perf_counter() - t0 - timing["headers"] - timing["registry"]
    audit = build_audit(cfg, listed, registry, results, parts, t_cols, timing | {"total": time.perf_counter() - t0})
    _logger.info("[4/4] writing %s", join(cfg.out, AUDIT_FILE))
    store.write_bytes(join(cfg.out, "link_config.yaml"), cfglib.dump_yaml(cfg).encode())
    store.write_bytes(join(cfg.out, AUDIT_FILE), audit_json(audit))
    store.delete_prefix(scratch)
    return audit


def audit_json(audit: dict) -> bytes:
    import json

    return json.dumps(audit, indent=2).encode()
