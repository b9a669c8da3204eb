"""The split's in-process engine (`engine.Engine`): the table functions on whole tables in memory.

```
items (list) -> fingerprint (process pool, `fingerprint_batch` per 32 rows) -> one table
  -> exact duplicates: `tables.exact_duplicate_rows` over the whole table
  -> near duplicates:  all pairs, chunked Gram matrix (exact; the Ray engine's LSH approximates it)
  -> union-find (the caller's)  -> `assign.assign_table` -> `writer.write_split_rows`
  -> `audit.audit_split` of the rows
```
For collections up to `SplitConfig.local_max_images` (20,000) this takes seconds where the Ray
engine pays Ray start-up and several Ray Data shuffles (minutes on 2 cores). Its driver memory
grows with the collection (~25 KB per image: 666 MB at 20,000, benchmarks.md "Split at scale"),
hence the threshold. Every step but the near-duplicate search is a function the Ray engine runs
too, so both give the same split.csv for the same seed (see `run.run_split` for the one caveat).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from kneescreen.data.fingerprints import ITEM_SCHEMA, PAIR_SCHEMA, THUMB_SIDE, all_pairs_near_duplicates, \
    fingerprint_batch, normalise
from kneescreen.data.split.assign import assign_table
from kneescreen.data.split.audit import audit_split
from kneescreen.data.split.collection import Item
from kneescreen.data.split.engine import Fingerprints
from kneescreen.data.split.tables import FINGERPRINT_BLOCK, exact_duplicate_rows, hash_rows, with_unit
from kneescreen.data.split.writer import write_split_rows
from kneescreen.fileio.store import Store

_logger = logging.getLogger(__name__)


def fingerprint(store: Store, batches: Iterator[list[Item]], scratch: str, key: bytes) -> Fingerprints:
    """All items in memory, fingerprinted in a process pool (``scratch`` is not used)."""
    items = [it for batch in batches for it in batch]
    _logger.info("fingerprinting %d images in process", len(items))
    table = pa.Table.from_pylist([asdict(it) for it in items], schema=ITEM_SCHEMA)
    fp = _fingerprint_table(table, store, key)
    errors = sorted(({"key": k, "error_code": e} for k, e in zip(fp.column("key").to_pylist(),
                     fp.column("error_code").to_pylist()) if e), key=lambda e: e["key"])
    return Fingerprints(store=store, scratch=scratch, rows=fp, items=len(items), readable=fp.num_rows - len(errors),
                        errors=errors, patients_from_labels=any(it.patient for it in items))


def _fingerprint_slice(args: tuple[pa.Table, Store, bytes]) -> pa.Table:
    return fingerprint_batch(*args)


def _fingerprint_table(items: pa.Table, store: Store, key: bytes, workers: int = 0) -> pa.Table:
    """`fingerprint_batch` over the item rows in a process pool (one task per 32 rows)."""
    workers = workers or (os.cpu_count() or 1)
    block = FINGERPRINT_BLOCK
    jobs = [(items.slice(i, block), store, key) for i in range(0, items.num_rows, block)]
    if workers > 1 and items.num_rows > 8:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            parts = list(pool.map(_fingerprint_slice, jobs))
    else:
        parts = [_fingerprint_slice(j) for j in jobs]
    return pa.concat_tables(parts) if parts else fingerprint_batch(items, store, key)


def find_exact_duplicates(fp: Fingerprints, duplicates: str, conflicts: str) -> list[dict]:
    """`tables.exact_duplicate_rows` on the one in-memory table."""
    rows = exact_duplicate_rows(hash_rows(fp.rows, 1), duplicates, conflicts).to_pylist()
    return sorted(rows, key=lambda r: (r["pixel_hash"], r["key"]))


def find_near_pairs(fp: Fingerprints, dropped: frozenset, min_corr: float, bands: int, bits: int) -> list[dict]:
    """Pairs of kept images whose thumbnails correlate at ``min_corr`` or more, by comparing all
    pairs (exact: ``bands`` and ``bits`` are not used); rows as `fingerprints.near_pairs` writes
    them (``key_a`` < ``key_b``)."""
    t = with_unit(fp.rows, dropped)
    raw = np.frombuffer(b"".join(t.column("thumb").to_pylist()), np.uint8).reshape(t.num_rows, THUMB_SIDE ** 2)
    thumbs = normalise(raw) if t.num_rows else np.zeros((0, THUMB_SIDE ** 2), np.float32)
    keys, units, labels = (t.column(c).to_pylist() for c in ("key", "unit", "label"))
    out = []
    for i, j in all_pairs_near_duplicates(thumbs, min_corr):
        a, b = (i, j) if keys[i] < keys[j] else (j, i)
        out.append({"key_a": keys[a], "key_b": keys[b], "unit_a": units[a], "unit_b": units[b],
                    "label_a": labels[a], "label_b": labels[b], "corr": float(thumbs[i] @ thumbs[j])})
    return pa.Table.from_pylist(out, schema=PAIR_SCHEMA).to_pylist()  # corr as float32, as the Ray engine


def write_split(fp: Fingerprints, dropped: frozenset, roots: dict, split_uri: str, targets: list[float],
                folds: int, seed: int) -> dict:
    """`assign.assign_table`, written by `writer.write_split_rows`; the audit of the rows in memory."""
    rows = assign_table(fp.rows, dropped, roots, targets, folds, seed)
    write_split_rows(fp.store, split_uri, rows)
    return audit_split(rows)
