"""The split's table functions, the same for both engines: on one whole table (`engine_local`) or
as Ray Data batch / map_groups functions over a partition (`engine_ray`). No Ray here.

    fingerprint rows -> `with_unit` (readable, not dropped, + unit: the patient, else the image)
      -> `hash_rows` -> `exact_duplicate_rows`           (rows of images sharing a pixel hash)
      -> `group_rows` (+ group, class one-hots) -> `group_table` (one row per group, in the
         order `assign.assign_stream` assigns them)

A ``part`` column (`fingerprints.value_partition` of the grouping key) says which map_groups call
a row goes to; with ``parts=1`` (the local engine) everything is one partition.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kneescreen.data.fingerprints import ITEM_SCHEMA, usable_fingerprints, value_partition
from kneescreen.labels import CLASSES

FINGERPRINT_BLOCK = 32  # images per fingerprint task: starts within seconds, many tasks in flight
SPLIT_COLUMNS = ["key", "uri", "label", "patient", "t_score", "age", "sex", "pixel_hash", "group", "split", "fold"]
SPLIT_SCHEMA = pa.schema([(c, ITEM_SCHEMA.field(c).type) for c in ITEM_SCHEMA.names] + [
    ("pixel_hash", pa.string()), ("group", pa.int64()), ("split", pa.string()), ("fold", pa.int64())])
MEMBER_COLUMNS = ["key", "uri", "label", "patient", "t_score", "age", "sex", "pixel_hash"]
DUP_SCHEMA = pa.schema([("pixel_hash", pa.string()), ("kind", pa.string()), ("key", pa.string()),
                        ("label", pa.string()), ("unit", pa.string()), ("action", pa.string())])


def with_unit(table: pa.Table, dropped: frozenset = frozenset()) -> pa.Table:
    """Readable, not dropped rows with ``unit``: the patient, else the image alone."""
    table = usable_fingerprints(table)
    if dropped:
        table = table.filter(pa.array([k not in dropped for k in table.column("key").to_pylist()], pa.bool_()))
    units = [p or f"img:{k}" for p, k in zip(table.column("patient").to_pylist(), table.column("key").to_pylist())]
    return table.append_column("unit", pa.array(units, pa.string()))


# ---------------------------------------------------------------------------------------------
# exact duplicates


def hash_rows(batch: pa.Table, parts: int) -> pa.Table:
    t = with_unit(batch)
    t = t.select(["pixel_hash", "key", "label", "unit"])
    return t.append_column("part", pa.array(value_partition(t.column("pixel_hash").to_pylist(), parts), pa.int64()))


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


# ---------------------------------------------------------------------------------------------
# groups


def group_rows(batch: pa.Table, dropped: frozenset, roots: dict, parts: int) -> pa.Table:
    """Kept rows with their group (``roots`` of `components.components`, else the unit itself),
    one-hot class columns ``c0..c2`` and the group's partition."""
    t = with_unit(batch, dropped)
    units = t.column("unit").to_pylist()
    groups = [roots.get(u, u) for u in units]
    cols = {c: t.column(c) for c in ("key", "uri", "label", "t_score", "age", "sex", "pixel_hash")}
    cols["patient"] = t.column("unit")
    for i, c in enumerate(CLASSES):
        cols[f"c{i}"] = pc.cast(pc.equal(t.column("label"), c), pa.int64())
    cols["group_unit"] = pa.array(groups, pa.string())
    cols["part"] = pa.array(value_partition(groups, parts), pa.int64())
    return pa.table(cols)


def tiebreak(group_units: list[str], seed: int) -> np.ndarray:
    """Seeded 63-bit hash of each group id: the order of equal-size groups, reproducible by seed."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest(), "little") >> 1
                     for g in group_units], dtype=np.int64)


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
