"""The split's Ray Data stages and the driver's bounded streaming steps.

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
one batch per open Parquet file during the merges, and the per-class counters.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import itertools
import os
from collections import Counter, defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from kneescreen.data.fingerprints import FINGERPRINT_SCHEMA, ITEM_SCHEMA, bucket_rows, fingerprint_batch, \
    near_pairs, ok_rows, partition_of
from kneescreen.io.store import Store, is_s3, join
from kneescreen.labels import CLASSES

ROWS_PER_PARTITION = 50_000  # rows per map_groups call: ~50 MB of LSH rows (thumbnail each)
FINGERPRINT_BLOCK = 32  # images per fingerprint task: starts within seconds, many tasks in flight
ASSIGNED_CHUNK = 20_000  # assigned rows per key-sorted scratch file (driver memory per chunk)
SPLIT_COLUMNS = ["key", "uri", "label", "patient", "t_score", "age", "sex", "pixel_hash", "group", "split", "fold"]
DUP_SCHEMA = pa.schema([("pixel_hash", pa.string()), ("kind", pa.string()), ("key", pa.string()),
                        ("label", pa.string()), ("unit", pa.string()), ("action", pa.string())])
LEAK_SCHEMA = pa.schema([("by", pa.string()), ("attribute", pa.string()), ("value", pa.string()),
                         ("in", pa.list_(pa.string()))])


def partitions(rows: int) -> int:
    return max(1, -(-rows // ROWS_PER_PARTITION))


def _local_dir(store: Store, uri: str) -> tuple:
    fs, path = store.filesystem(uri)
    if not is_s3(uri):
        os.makedirs(path, exist_ok=True)
    return fs, path


# ---------------------------------------------------------------------------------------------
# fingerprints


def _read_chunks(batch: pa.Table, store: Store) -> pa.Table:
    return pa.concat_tables([store.read_parquet(u).cast(ITEM_SCHEMA) for u in batch.column("chunk").to_pylist()])


def fingerprint_collection(store: Store, chunk_uris: list[str], out_uri: str, key: bytes) -> None:
    """Fingerprint every item of the chunks (Ray tasks) into Parquet under ``out_uri``."""
    fs, path = _local_dir(store, out_uri)
    (ray.data.from_items([{"chunk": u} for u in chunk_uris])
     .map_batches(_read_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"store": store})
     .repartition(target_num_rows_per_block=FINGERPRINT_BLOCK)
     .map_batches(fingerprint_batch, batch_size=FINGERPRINT_BLOCK, batch_format="pyarrow",
                  fn_kwargs={"store": store, "key": key})
     .write_parquet(path, filesystem=fs))


def read_fingerprints(store: Store, uri: str) -> ray.data.Dataset:
    fs, path = store.filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, schema=FINGERPRINT_SCHEMA)


def scan_fingerprints(store: Store, uri: str) -> tuple[list[dict], Counter]:
    """(decode error rows, label counts of the readable images), streamed on the driver."""
    errors, counts = [], Counter()
    for batch in store.iter_parquet_batches(uri, ["key", "label", "error_code"], schema=FINGERPRINT_SCHEMA):
        for key, label, err in zip(*(batch.column(c).to_pylist() for c in ("key", "label", "error_code"))):
            if err:
                errors.append({"key": key, "error_code": err})
            else:
                counts[label] += 1
    return sorted(errors, key=lambda e: e["key"]), counts


def with_unit(table: pa.Table, dropped: frozenset = frozenset()) -> pa.Table:
    """Readable, not dropped rows with ``unit``: the patient, else the image alone."""
    table = ok_rows(table)
    if dropped:
        table = table.filter(pa.array([k not in dropped for k in table.column("key").to_pylist()], pa.bool_()))
    units = [p or f"img:{k}" for p, k in zip(table.column("patient").to_pylist(), table.column("key").to_pylist())]
    return table.append_column("unit", pa.array(units, pa.string()))


# ---------------------------------------------------------------------------------------------
# exact and near duplicates


def hash_rows(batch: pa.Table, parts: int) -> pa.Table:
    t = with_unit(batch)
    t = t.select(["pixel_hash", "key", "label", "unit"])
    return t.append_column("part", pa.array(partition_of(t.column("pixel_hash").to_pylist(), parts), pa.int64()))


def exact_duplicate_rows(part: pa.Table, duplicates: str, conflicts: str) -> pa.Table:
    """map_groups function over one partition of pixel hashes: a row per image whose pixel hash
    is shared, with ``kind`` (duplicate / conflict) and ``action`` (keep / exact_duplicate /
    label_conflict) under the policy: same label keeps the first key (``drop``) or all (``group``);
    different labels drop all (``drop``) or keep all (``keep``)."""
    hashes = part.column("pixel_hash").to_numpy(zero_copy_only=False)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    shared = part.filter(pa.array(counts[inverse] > 1)).sort_by([("pixel_hash", "ascending"), ("key", "ascending")])
    out = {name: [] for name in DUP_SCHEMA.names}
    for h, members in itertools.groupby(shared.to_pylist(), key=lambda r: r["pixel_hash"]):
        members = list(members)
        kind = "conflict" if len({m["label"] for m in members}) > 1 else "duplicate"
        for i, m in enumerate(members):
            if kind == "conflict" and conflicts == "drop":
                action = "label_conflict"
            elif kind == "duplicate" and duplicates == "drop" and i > 0:
                action = "exact_duplicate"
            else:
                action = "keep"
            for name, value in (("pixel_hash", h), ("kind", kind), ("key", m["key"]), ("label", m["label"]),
                                ("unit", m["unit"]), ("action", action)):
                out[name].append(value)
    return pa.table(out, schema=DUP_SCHEMA)


def find_exact_duplicates(fp: ray.data.Dataset, parts: int, duplicates: str, conflicts: str) -> list[dict]:
    """Rows of images whose pixel hash is shared (`exact_duplicate_rows`), sorted; O(duplicates)."""
    rows = (fp.map_batches(hash_rows, batch_format="pyarrow", fn_kwargs={"parts": parts})
            .groupby("part", num_partitions=parts)
            .map_groups(exact_duplicate_rows, batch_format="pyarrow",
                        fn_kwargs={"duplicates": duplicates, "conflicts": conflicts})
            .take_all())
    return sorted(rows, key=lambda r: (r["pixel_hash"], r["key"]))


def _band_rows(batch: pa.Table, dropped: frozenset, bands: int, bits: int, parts: int) -> pa.Table:
    return bucket_rows(with_unit(batch, dropped), bands, bits, parts)


def find_near_pairs(fp: ray.data.Dataset, dropped: frozenset, kept: int, min_corr: float,
                    bands: int, bits: int) -> list[dict]:
    """Pairs of kept images whose thumbnails correlate at ``min_corr`` or more (LSH buckets)."""
    parts = partitions(kept * bands)
    return (fp.map_batches(_band_rows, batch_size=1024, batch_format="pyarrow",
                           fn_kwargs={"dropped": dropped, "bands": bands, "bits": bits, "parts": parts})
            .groupby("part", num_partitions=parts)
            .map_groups(near_pairs, batch_format="pyarrow", fn_kwargs={"min_corr": min_corr})
            .take_all())


class UnionFind:
    """Union-find over unit names that appear in duplicate edges; a root is its component's
    smallest name, so groups do not depend on the order edges arrive in."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        parent = self.parent
        root = parent.setdefault(a, a)
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> dict[str, str]:
        """unit -> root for every unit that is not its own root."""
        return {u: r for u in list(self.parent) if (r := self.find(u)) != u}


# ---------------------------------------------------------------------------------------------
# groups and their assignment


def group_rows(batch: pa.Table, dropped: frozenset, roots: dict, parts: int) -> pa.Table:
    t = with_unit(batch, dropped)
    units = t.column("unit").to_pylist()
    groups = [roots.get(u, u) for u in units]
    cols = {c: t.column(c) for c in ("key", "uri", "label", "t_score", "age", "sex", "pixel_hash")}
    cols["patient"] = t.column("unit")
    for i, c in enumerate(CLASSES):
        cols[f"c{i}"] = pc.cast(pc.equal(t.column("label"), c), pa.int64())
    cols["group_unit"] = pa.array(groups, pa.string())
    cols["part"] = pa.array(partition_of(groups, parts), pa.int64())
    return pa.table(cols)


def tiebreak(group_units: list[str], seed: int) -> np.ndarray:
    """Seeded 63-bit hash of each group id: the order of equal-size groups, reproducible by seed."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest(), "little") >> 1
                     for g in group_units], dtype=np.int64)


MEMBER_COLUMNS = ["key", "uri", "label", "patient", "t_score", "age", "sex", "pixel_hash"]


def group_table(rows: pa.Table, seed: int) -> pa.Table:
    """`group_rows` rows -> one row per group (size ``n``, class counts ``c0..c2``, seeded ``tb``,
    member columns as lists), sorted by (n desc, tb, group): the order groups are assigned in."""
    aggs = [("key", "count")] + [(f"c{i}", "sum") for i in range(len(CLASSES))] + [(c, "list") for c in MEMBER_COLUMNS]
    g = rows.group_by("group_unit", use_threads=False).aggregate(aggs)
    g = g.rename_columns([c.removesuffix("_sum").removesuffix("_list").replace("key_count", "n") for c in g.column_names])
    g = g.append_column("tb", pa.array(tiebreak(g.column("group_unit").to_pylist(), seed), pa.int64()))
    return g.sort_by([("n", "descending"), ("tb", "ascending"), ("group_unit", "ascending")])


def class_totals(rows: pa.Table) -> list[int]:
    """Images per class of `group_rows` rows."""
    return [int(pc.sum(rows.column(f"c{i}")).as_py() or 0) for i in range(len(CLASSES))]


def write_group_partition(part: pa.Table, out_uri: str, store: Store, seed: int) -> pa.Table:
    """map_groups function over one partition of groups: its `group_table`, written to
    ``<out_uri>/part-<p>.parquet``; returns the partition's number and class counts."""
    p = int(part.column("part")[0].as_py())
    store.write_parquet(group_table(part, seed), join(out_uri, f"part-{p:05d}.parquet"))
    return pa.table({"part": [p], **{f"c{i}": [n] for i, n in enumerate(class_totals(part))}})


def write_groups(fp: ray.data.Dataset, dropped: frozenset, roots: dict, kept: int, out_uri: str,
                 store: Store, seed: int) -> tuple[list[str], np.ndarray]:
    """Group files under ``out_uri`` (`write_group_partition`); returns (file URIs, class totals)."""
    parts = partitions(kept)
    summary = (fp.map_batches(group_rows, batch_size=4096, batch_format="pyarrow",
                              fn_kwargs={"dropped": dropped, "roots": roots, "parts": parts})
               .groupby("part", num_partitions=parts)
               .map_groups(write_group_partition, batch_format="pyarrow",
                           fn_kwargs={"out_uri": out_uri, "store": store, "seed": seed})
               .take_all())
    totals = np.array([sum(r[f"c{i}"] for r in summary) for i in range(len(CLASSES))], dtype=float)
    return [join(out_uri, f"part-{r['part']:05d}.parquet") for r in sorted(summary, key=lambda r: r["part"])], totals


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
    independently, as before). Both engines assign through here."""
    split_of = GreedyAssigner(targets, totals, seed)
    fold_of = GreedyAssigner([1 / folds] * folds, totals, seed + 1)
    for gid, g in enumerate(groups):
        counts = np.array([g[f"c{i}"] for i in range(len(CLASSES))], dtype=float)
        split, fold = ("train", "val", "test")[split_of(counts)], fold_of(counts)
        for member in zip(*(g[c] for c in MEMBER_COLUMNS)):
            yield {**dict(zip(MEMBER_COLUMNS, member)), "group": gid, "split": split, "fold": fold}


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


SPLIT_SCHEMA = pa.schema([(c, ITEM_SCHEMA.field(c).type) for c in ITEM_SCHEMA.names] + [
    ("pixel_hash", pa.string()), ("group", pa.int64()), ("split", pa.string()), ("fold", pa.int64())])


def _write_chunk(store: Store, out_uri: str, n: int, rows: list[dict]) -> str:
    uri = join(out_uri, f"part-{n:05d}.parquet")
    rows.sort(key=lambda r: r["key"])
    store.write_parquet(pa.Table.from_pylist(rows, schema=SPLIT_SCHEMA), uri)
    return uri


def write_split_csv(store: Store, uri: str, chunk_uris: list[str]) -> int:
    """split.csv from the assigned chunks, merged by key (`write_split_rows`); returns the rows written."""
    return write_split_rows(store, uri, merged(store, chunk_uris, SPLIT_SCHEMA.names, lambda r: r["key"]))


def write_split_rows(store: Store, uri: str, rows) -> int:
    """split.csv from key-sorted rows, written as they stream (an S3 multipart upload through
    pyarrow, or a local file); returns the rows written. Both engines write through here."""
    fs, path = store.filesystem(uri)
    if not is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    n = 0
    with fs.open_output_stream(path) as out:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SPLIT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            n += 1
            if buf.tell() > 1 << 20:
                out.write(buf.getvalue().encode())
                buf.seek(0)
                buf.truncate()
        out.write(buf.getvalue().encode())
    return n


# ---------------------------------------------------------------------------------------------
# audit

AUDITED = ("patient", "pixel_hash", "group")


def leak_rows(rows: pa.Table) -> pa.Table:
    """map_groups function (or a plain call on a whole table): every (attribute, value) of the
    rows, which hold ``attribute``, ``value``, ``split`` and ``fold``, that sits in two splits or
    two folds."""
    seen: dict[tuple[str, str], tuple[set, set]] = defaultdict(lambda: (set(), set()))
    cols = (rows.column(c).to_pylist() for c in ("attribute", "value", "split", "fold"))
    for attr, value, split, fold in zip(*cols):
        s = seen[(attr, value)]
        s[0].add(split)
        s[1].add(fold)
    out = {name: [] for name in LEAK_SCHEMA.names}
    for (attr, value), (splits, folds) in sorted(seen.items()):
        for by, where in (("split", splits), ("fold", folds)):
            if len(where) > 1:
                for name, v in (("by", by), ("attribute", attr), ("value", value), ("in", sorted(where))):
                    out[name].append(v)
    return pa.table(out, schema=LEAK_SCHEMA)


def audit_rows(batch: pa.Table, parts: int = 1) -> pa.Table:
    """One row per (image, audited attribute): attribute, value, split, fold (all strings), part."""
    n = batch.num_rows
    values = [str(v) for a in AUDITED for v in batch.column(a).to_pylist()]
    out = pa.table({
        "attribute": pa.array([a for a in AUDITED for _ in range(n)], pa.string()),
        "value": pa.array(values, pa.string()),
        "split": pa.array([str(v) for v in batch.column("split").to_pylist()] * len(AUDITED), pa.string()),
        "fold": pa.array([str(v) for v in batch.column("fold").to_pylist()] * len(AUDITED), pa.string()),
    })
    return out.append_column("part", pa.array(partition_of([f"{a}:{v}" for a, v in zip(
        out.column("attribute").to_pylist(), values)], parts), pa.int64()))


def find_leaks(store: Store, split_uri: str, rows: int) -> list[dict]:
    """Leaks of a written split.csv (`leak_rows`, in Ray tasks by partition of the value)."""
    import pyarrow.csv as pacsv

    fs, path = store.filesystem(split_uri)
    parts = partitions(rows * len(AUDITED))
    types = {c: pa.string() for c in SPLIT_COLUMNS}
    leaks = (ray.data.read_csv(path, filesystem=fs, convert_options=pacsv.ConvertOptions(column_types=types))
             .map_batches(audit_rows, batch_size=4096, batch_format="pyarrow", fn_kwargs={"parts": parts})
             .groupby("part", num_partitions=parts)
             .map_groups(leak_rows, batch_format="pyarrow")
             .take_all())
    return sorted(({"by": r["by"], "attribute": r["attribute"], "value": r["value"], "in": list(r["in"])}
                   for r in leaks), key=lambda r: (r["by"], r["attribute"], r["value"]))


def class_counts(store: Store, split_uri: str) -> tuple[dict, dict]:
    """(split -> label -> n, fold -> label -> n) of a written split.csv, streamed in record batches."""
    import pyarrow.csv as pacsv

    fs, path = store.filesystem(split_uri)
    opts = pacsv.ConvertOptions(include_columns=["label", "split", "fold"],
                                column_types={"label": pa.string(), "split": pa.string(), "fold": pa.int64()})
    splits: dict[str, Counter] = {s: Counter() for s in ("train", "val", "test")}
    folds: dict[int, Counter] = defaultdict(Counter)
    with fs.open_input_stream(path) as f:
        for batch in pacsv.open_csv(f, convert_options=opts):
            for label, split, fold in zip(*(batch.column(c).to_pylist() for c in ("label", "split", "fold"))):
                splits[split][label] += 1
                folds[fold][label] += 1
    return ({s: dict(c) for s, c in splits.items()}, {str(f): dict(folds[f]) for f in sorted(folds)})
