"""Groups -> train / val / test and folds: the stratified greedy rule, one group at a time, in
`tables.group_table` order (largest first, seeded ties). Both engines assign through
`assign_stream`: the local engine on one in-memory group table (`assign_table`), the Ray engine on
a k-way merge of sorted group files written in key-sorted chunks (`assign_groups`), so a seed
gives the same assignment on either. Driver code; no Ray.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from kneescreen.data.split.tables import MEMBER_COLUMNS, SPLIT_SCHEMA, class_totals, group_rows, group_table
from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES

ASSIGNED_CHUNK = 20_000  # assigned rows per key-sorted scratch file (driver memory per chunk)


class GreedyAssigner:
    """The stratified greedy rule, one group at a time: each group goes to the bin whose classes
    are least filled relative to that bin's target share (ties broken by a seeded draw)."""

    def __init__(self, targets: list[float], totals: np.ndarray, seed: int):
        self.targets = np.asarray(targets, dtype=float)[:, None]
        self.totals = np.asarray(totals, dtype=float) + 1e-9
        self.alloc = np.zeros((len(targets), len(self.totals)))
        self.rng = np.random.default_rng(seed)

    def __call__(self, counts: np.ndarray) -> int:
        fill = (((self.alloc + counts) / (self.targets * self.totals)) * counts).sum(axis=1) / counts.sum()
        j = int(np.argmin(fill + self.rng.random(len(fill)) * 1e-9))
        self.alloc[j] += counts
        return j


def assign_stream(groups, totals: np.ndarray, targets: list[float], folds: int, seed: int) -> Iterator[dict]:
    """Member rows of groups (`group_table` rows, in its order) with ``group`` (the position in
    that order), ``split`` and ``fold``, each chosen by `GreedyAssigner` (split and fold
    independently). Both engines assign through here."""
    split_of = GreedyAssigner(targets, totals, seed)
    fold_of = GreedyAssigner([1 / folds] * folds, totals, seed + 1)
    for gid, g in enumerate(groups):
        counts = np.array([g[f"c{i}"] for i in range(len(CLASSES))], dtype=float)
        split, fold = ("train", "val", "test")[split_of(counts)], fold_of(counts)
        for member in zip(*(g[c] for c in MEMBER_COLUMNS)):
            yield {**dict(zip(MEMBER_COLUMNS, member)), "group": gid, "split": split, "fold": fold}


def assign_table(fp: pa.Table, dropped: frozenset, roots: dict, targets: list[float], folds: int,
                 seed: int) -> list[dict]:
    """Split rows of the kept images of one in-memory fingerprint table, sorted by key:
    `group_table` then `assign_stream`."""
    rows = group_rows(fp, dropped, roots, 1)
    totals = np.array(class_totals(rows), dtype=float)
    groups = group_table(rows, seed).to_pylist()
    return sorted(assign_stream(groups, totals, targets, folds, seed), key=lambda r: r["key"])


def _sorted_rows(store: Store, uri: str, columns: list[str], sort_key) -> Iterator[tuple]:
    for batch in store.iter_parquet_batches(uri, columns, batch_size=1024):
        for row in batch.to_pylist():
            yield sort_key(row), row


def merged(store: Store, uris: list[str], columns: list[str], sort_key) -> Iterator[dict]:
    """Rows of several files, each sorted by ``sort_key``, in one sorted stream (k-way merge:
    one batch per file in memory)."""
    streams = [_sorted_rows(store, u, columns, sort_key) for u in uris]
    for _, row in heapq.merge(*streams, key=lambda kv: kv[0]):
        yield row


def assign_groups(store: Store, group_uris: list[str], totals: np.ndarray, out_uri: str,
                  targets: list[float], folds: int, seed: int) -> list[str]:
    """Stream the groups largest first (merge of the sorted group files) through `assign_stream`
    and write the member rows in key-sorted chunks of `ASSIGNED_CHUNK` rows; returns the chunk URIs."""
    columns = ["group_unit", "n", "tb"] + [f"c{i}" for i in range(len(CLASSES))] + MEMBER_COLUMNS
    rows: list[dict] = []
    uris: list[str] = []
    stream = merged(store, group_uris, columns, lambda r: (-r["n"], r["tb"], r["group_unit"]))
    for row in assign_stream(stream, totals, targets, folds, seed):
        rows.append(row)
        if len(rows) >= ASSIGNED_CHUNK:
            uris.append(_write_chunk(store, out_uri, len(uris), rows))
            rows = []
    if rows or not uris:
        uris.append(_write_chunk(store, out_uri, len(uris), rows))
    return uris


def _write_chunk(store: Store, out_uri: str, n: int, rows: list[dict]) -> str:
    uri = join(out_uri, f"part-{n:05d}.parquet")
    rows.sort(key=lambda r: r["key"])
    store.write_parquet(pa.Table.from_pylist(rows, schema=SPLIT_SCHEMA), uri)
    return uri
