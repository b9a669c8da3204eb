"""The split's in-process engine: the same steps as `data.split_stages`, on whole tables in memory.

```
items (list) -> fingerprint (process pool, `fingerprint_batch` per 32 rows) -> one table
  -> exact duplicates: `exact_duplicate_rows` over the whole table
  -> near duplicates:  all pairs, chunked Gram matrix (exact; the Ray engine's LSH approximates it)
  -> union-find (the caller's)  -> `group_table` -> `assign_stream` -> rows sorted by key
```
For collections up to `SplitConfig.local_max_images` (20,000) this takes seconds where the Ray
engine pays Ray start-up and several Ray Data shuffles (minutes on 2 cores). Its driver memory
grows with the collection (~25 KB per image: 666 MB at 20,000, benchmarks.md "Split at scale"),
hence the threshold. Every step but the near-duplicate search is the Ray engine's own function,
so both give the same split.csv for the same seed (see `run_split` for the one caveat).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa

from kneescreen.data import split_stages as st
from kneescreen.data.fingerprints import PAIR_SCHEMA, THUMB_SIDE, all_pairs_near_duplicates, fingerprint_batch, \
    normalise
from kneescreen.io.store import Store


def _fingerprint_slice(args: tuple[pa.Table, Store, bytes]) -> pa.Table:
    return fingerprint_batch(*args)


def fingerprint_table(items: pa.Table, store: Store, key: bytes, workers: int = 0) -> pa.Table:
    """`fingerprint_batch` over the item rows in a process pool (one task per 32 rows)."""
    workers = workers or (os.cpu_count() or 1)
    block = st.FINGERPRINT_BLOCK
    jobs = [(items.slice(i, block), store, key) for i in range(0, items.num_rows, block)]
    if workers > 1 and items.num_rows > 8:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            parts = list(pool.map(_fingerprint_slice, jobs))
    else:
        parts = [_fingerprint_slice(j) for j in jobs]
    return pa.concat_tables(parts) if parts else fingerprint_batch(items, store, key)


def find_exact_duplicates(fp: pa.Table, duplicates: str, conflicts: str) -> list[dict]:
    """`split_stages.find_exact_duplicates` on one in-memory table."""
    rows = st.exact_duplicate_rows(st.hash_rows(fp, 1), duplicates, conflicts).to_pylist()
    return sorted(rows, key=lambda r: (r["pixel_hash"], r["key"]))


def find_near_pairs(fp: pa.Table, dropped: frozenset, min_corr: float) -> list[dict]:
    """Pairs of kept images whose thumbnails correlate at ``min_corr`` or more, by comparing all
    pairs; rows as `near_pairs` writes them (``key_a`` < ``key_b``)."""
    t = st.with_unit(fp, dropped)
    raw = np.frombuffer(b"".join(t.column("thumb").to_pylist()), np.uint8).reshape(t.num_rows, THUMB_SIDE ** 2)
    thumbs = normalise(raw) if t.num_rows else np.zeros((0, THUMB_SIDE ** 2), np.float32)
    keys, units, labels = (t.column(c).to_pylist() for c in ("key", "unit", "label"))
    out = []
    for i, j in all_pairs_near_duplicates(thumbs, min_corr):
        a, b = (i, j) if keys[i] < keys[j] else (j, i)
        out.append({"key_a": keys[a], "key_b": keys[b], "unit_a": units[a], "unit_b": units[b],
                    "label_a": labels[a], "label_b": labels[b], "corr": float(thumbs[i] @ thumbs[j])})
    return pa.Table.from_pylist(out, schema=PAIR_SCHEMA).to_pylist()  # corr as float32, as the Ray engine


def assign(fp: pa.Table, dropped: frozenset, roots: dict, targets: list[float], folds: int,
           seed: int) -> list[dict]:
    """Split rows of the kept images, sorted by key: `group_table` then `assign_stream`."""
    rows = st.group_rows(fp, dropped, roots, 1)
    totals = np.array(st.class_totals(rows), dtype=float)
    groups = st.group_table(rows, seed).to_pylist()
    return sorted(st.assign_stream(groups, totals, targets, folds, seed), key=lambda r: r["key"])
