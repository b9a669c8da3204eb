"""The split's Ray Data engine (`engine.Engine`), with bounded driver memory. The only module of
the split that uses Ray, and it imports Ray inside its functions (`import kneescreen` stays light).

```
item chunks (scratch Parquet, 5,000 rows each, streamed from the labels by the driver)
  -> fingerprint (map_batches, CPU tasks)                      -> scratch fingerprints Parquet
  -> exact duplicates: groupby(partition of pixel_hash).map_groups   -> duplicate rows (driver)
  -> near duplicates:  one row per (image, LSH band) -> groupby(partition of bucket).map_groups
                       (compare within buckets only)                 -> near pairs (driver)
  -> union-find over the duplicate edges (driver: edges, not images) -> group of every unit
  -> groupby(partition of group).map_groups: per group class counts + members, each partition
     written sorted (size desc, seeded hash) -> driver k-way merge, greedy stratified assignment,
     assigned rows written in key-sorted chunks -> k-way merge by key -> split.csv
  -> audit: split.csv -> one row per (attribute, value) -> groupby(partition).map_groups -> leaks
```
Every groupby is on a partition number (a stable hash of the key modulo ``parts``), so one
map_groups call handles a whole partition with vectorised code rather than one Python call per
pixel hash, bucket or group, and every key's rows are in the same call. The driver holds the
duplicate rows, near pairs and union-find (all bounded by the number of duplicates, not images),
one batch per open Parquet file during the merges, and the per-class counters. The functions
the stages run are `tables`, `fingerprints` and `audit` functions, the local engine's own.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from kneescreen.data.fingerprints import FINGERPRINT_SCHEMA, ITEM_SCHEMA, bucket_rows, fingerprint_batch, near_pairs
from kneescreen.data.split.assign import assign_groups
from kneescreen.data.split.audit import AUDITED, audit_rows, class_counts, leak_rows, sort_leaks
from kneescreen.data.split.collection import Item
from kneescreen.data.split.engine import Fingerprints
from kneescreen.data.split.tables import FINGERPRINT_BLOCK, SPLIT_COLUMNS, class_totals, exact_duplicate_rows, \
    group_rows, group_table, hash_rows, with_unit
from kneescreen.data.split.writer import write_split_csv
from kneescreen.fileio.store import Store, is_s3, join
from kneescreen.labels import CLASSES

if TYPE_CHECKING:
    import ray

_logger = logging.getLogger(__name__)
ROWS_PER_PARTITION = 50_000  # rows per map_groups call: ~50 MB of LSH rows (thumbnail each)


def partitions(rows: int) -> int:
    return max(1, -(-rows // ROWS_PER_PARTITION))


def _local_dir(store: Store, uri: str) -> tuple:
    fs, path = store.filesystem(uri)
    if not is_s3(uri):
        os.makedirs(path, exist_ok=True)
    return fs, path


# ---------------------------------------------------------------------------------------------
# the engine interface


def fingerprint(store: Store, batches: Iterator[list[Item]], scratch: str, key: bytes) -> Fingerprints:
    """Items streamed into scratch Parquet chunks, fingerprinted in Ray tasks into scratch Parquet."""
    from kneescreen._private.cluster import ensure_ray

    store.delete_prefix(scratch)
    chunks, n_items, patients_from_labels = _write_item_chunks(store, batches, scratch)
    ensure_ray()
    _logger.info("fingerprinting %d images in Ray tasks", n_items)
    _fingerprint_collection(store, chunks, join(scratch, "fingerprints"), key)
    errors, ok_counts = _scan_fingerprints(store, join(scratch, "fingerprints"))
    return Fingerprints(store=store, scratch=scratch, rows=_read_fingerprints(store, join(scratch, "fingerprints")),
                        items=n_items, readable=sum(ok_counts.values()), errors=errors,
                        patients_from_labels=patients_from_labels)


def find_exact_duplicates(fp: Fingerprints, duplicates: str, conflicts: str) -> list[dict]:
    """Rows of images whose pixel hash is shared (`tables.exact_duplicate_rows` per partition of
    pixel hashes), sorted; O(duplicates) on the driver."""
    parts = partitions(fp.readable)
    rows = (fp.rows.map_batches(hash_rows, batch_format="pyarrow", fn_kwargs={"parts": parts})
            .groupby("part", num_partitions=parts)
            .map_groups(exact_duplicate_rows, batch_format="pyarrow",
                        fn_kwargs={"duplicates": duplicates, "conflicts": conflicts})
            .take_all())
    return sorted(rows, key=lambda r: (r["pixel_hash"], r["key"]))


def find_near_pairs(fp: Fingerprints, dropped: frozenset, min_corr: float, bands: int, bits: int) -> list[dict]:
    """Pairs of kept images whose thumbnails correlate at ``min_corr`` or more (LSH buckets,
    `fingerprints.near_pairs` per partition of buckets)."""
    parts = partitions((fp.readable - len(dropped)) * bands)
    return (fp.rows.map_batches(_band_rows, batch_size=1024, batch_format="pyarrow",
                                fn_kwargs={"dropped": dropped, "bands": bands, "bits": bits, "parts": parts})
            .groupby("part", num_partitions=parts)
            .map_groups(near_pairs, batch_format="pyarrow", fn_kwargs={"min_corr": min_corr})
            .take_all())


def write_split(fp: Fingerprints, dropped: frozenset, roots: dict, split_uri: str, targets: list[float],
                folds: int, seed: int) -> dict:
    """Group files (Ray tasks) -> `assign.assign_groups` -> `writer.write_split_csv`; removes the
    scratch files and returns `audit_written_split`."""
    store, scratch = fp.store, fp.scratch
    group_uris, totals = _write_groups(fp.rows, dropped, roots, fp.readable - len(dropped), join(scratch, "groups"),
                                       store, seed)
    chunk_uris = assign_groups(store, group_uris, totals, join(scratch, "assigned"), targets, folds, seed)
    rows = write_split_csv(store, split_uri, chunk_uris)
    audit = audit_written_split(store, split_uri, rows)
    store.delete_prefix(scratch)
    return audit


# ---------------------------------------------------------------------------------------------
# fingerprints


def _write_item_chunks(store: Store, batches: Iterator[list[Item]], scratch: str) -> tuple[list[str], int, bool]:
    """The collection as scratch Parquet chunks; returns (chunk URIs, items, any patient from labels)."""
    uris, n, patients = [], 0, False
    for batch in batches:
        rows = [asdict(it) for it in batch]
        patients = patients or any(it.patient for it in batch)
        uri = join(scratch, "items", f"part-{len(uris):05d}.parquet")
        store.write_parquet(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), uri)
        uris.append(uri)
        n += len(rows)
    return uris, n, patients


def _read_chunks(batch: pa.Table, store: Store) -> pa.Table:
    return pa.concat_tables([store.read_parquet(u).cast(ITEM_SCHEMA) for u in batch.column("chunk").to_pylist()])


def _fingerprint_collection(store: Store, chunk_uris: list[str], out_uri: str, key: bytes) -> None:
    """Fingerprint every item of the chunks (Ray tasks) into Parquet under ``out_uri``."""
    import ray

    fs, path = _local_dir(store, out_uri)
    (ray.data.from_items([{"chunk": u} for u in chunk_uris])
     .map_batches(_read_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"store": store})
     .repartition(target_num_rows_per_block=FINGERPRINT_BLOCK)
     .map_batches(fingerprint_batch, batch_size=FINGERPRINT_BLOCK, batch_format="pyarrow",
                  fn_kwargs={"store": store, "key": key})
     .write_parquet(path, filesystem=fs))


def _read_fingerprints(store: Store, uri: str) -> ray.data.Dataset:
    import ray

    fs, path = store.filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, schema=FINGERPRINT_SCHEMA)


def _scan_fingerprints(store: Store, uri: str) -> tuple[list[dict], Counter]:
    """(decode error rows, label counts of the readable images), streamed on the driver."""
    errors, counts = [], Counter()
    for batch in store.iter_parquet_batches(uri, ["key", "label", "error_code"], schema=FINGERPRINT_SCHEMA):
        for key, label, err in zip(*(batch.column(c).to_pylist() for c in ("key", "label", "error_code"))):
            if err:
                errors.append({"key": key, "error_code": err})
            else:
                counts[label] += 1
    return sorted(errors, key=lambda e: e["key"]), counts


def _band_rows(batch: pa.Table, dropped: frozenset, bands: int, bits: int, parts: int) -> pa.Table:
    return bucket_rows(with_unit(batch, dropped), bands, bits, parts)


# ---------------------------------------------------------------------------------------------
# groups


def _write_group_partition(part: pa.Table, out_uri: str, store: Store, seed: int) -> pa.Table:
    """map_groups function over one partition of groups: its `group_table`, written to
    ``<out_uri>/part-<p>.parquet``; returns the partition's number and class counts."""
    p = int(part.column("part")[0].as_py())
    store.write_parquet(group_table(part, seed), join(out_uri, f"part-{p:05d}.parquet"))
    return pa.table({"part": [p], **{f"c{i}": [n] for i, n in enumerate(class_totals(part))}})


def _write_groups(fp: ray.data.Dataset, dropped: frozenset, roots: dict, kept: int, out_uri: str,
                  store: Store, seed: int) -> tuple[list[str], np.ndarray]:
    """Group files under ``out_uri`` (`_write_group_partition`); returns (file URIs, class totals)."""
    parts = partitions(kept)
    summary = (fp.map_batches(group_rows, batch_size=4096, batch_format="pyarrow",
                              fn_kwargs={"dropped": dropped, "roots": roots, "parts": parts})
               .groupby("part", num_partitions=parts)
               .map_groups(_write_group_partition, batch_format="pyarrow",
                           fn_kwargs={"out_uri": out_uri, "store": store, "seed": seed})
               .take_all())
    totals = np.array([sum(r[f"c{i}"] for r in summary) for i in range(len(CLASSES))], dtype=float)
    return [join(out_uri, f"part-{r['part']:05d}.parquet") for r in sorted(summary, key=lambda r: r["part"])], totals


# ---------------------------------------------------------------------------------------------
# audit


def audit_written_split(store: Store, split_uri: str, rows: int) -> dict:
    """`audit.audit_split` of a written ``split.csv``, with bounded driver memory: leaks by Ray
    tasks (grouped by attribute value), class counts streamed in record batches."""
    leaks = _find_leaks(store, split_uri, rows)
    splits, folds = class_counts(store, split_uri)
    return {"summary": {"leaks": len(leaks), "split_class_counts": splits, "fold_class_counts": folds},
            "leaks": leaks}


def _find_leaks(store: Store, split_uri: str, rows: int) -> list[dict]:
    """Leaks of a written split.csv (`audit.leak_rows`, in Ray tasks by partition of the value)."""
    import pyarrow.csv as pacsv
    import ray

    fs, path = store.filesystem(split_uri)
    parts = partitions(rows * len(AUDITED))
    types = {c: pa.string() for c in SPLIT_COLUMNS}
    leaks = (ray.data.read_csv(path, filesystem=fs, convert_options=pacsv.ConvertOptions(column_types=types))
             .map_batches(audit_rows, batch_size=4096, batch_format="pyarrow", fn_kwargs={"parts": parts})
             .groupby("part", num_partitions=parts)
             .map_groups(leak_rows, batch_format="pyarrow")
             .take_all())
    return sort_leaks(leaks)
