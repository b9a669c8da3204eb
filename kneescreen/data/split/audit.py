"""The split's audit: proof, from the rows or the written ``split.csv``, that no patient, pixel
hash or group sits in two splits or two folds, and the class counts per split and fold.

`leak_rows` over `audit_rows` is the check on one whole table (`audit_split`, the local engine)
and the Ray engine's map_groups function over a partition of (attribute, value)
(`engine_ray.audit_written_split`). No Ray here.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa

from kneescreen.data.fingerprints import value_partition
from kneescreen.fileio.store import Store

AUDITED = ("patient", "pixel_hash", "group")
LEAK_SCHEMA = pa.schema([("by", pa.string()), ("attribute", pa.string()), ("value", pa.string()),
                         ("in", pa.list_(pa.string()))])


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
    return out.append_column("part", pa.array(value_partition([f"{a}:{v}" for a, v in zip(
        out.column("attribute").to_pylist(), values)], parts), pa.int64()))


def sort_leaks(leaks) -> list[dict]:
    """Leak rows as plain dicts in one order, whichever engine found them."""
    return sorted(({"by": r["by"], "attribute": r["attribute"], "value": r["value"], "in": list(r["in"])}
                   for r in leaks), key=lambda r: (r["by"], r["attribute"], r["value"]))


def audit_split(rows: list[dict]) -> dict:
    """Prove that no patient, pixel hash or near-duplicate group appears in two splits/folds
    (in memory, for a list of rows; `engine_ray.audit_written_split` does the same for a written
    split with bounded memory).

    Returns:
        ``summary`` (``leaks``, ``split_class_counts``, ``fold_class_counts``) and ``leaks``.
    """
    table = pa.Table.from_pylist([{a: r[a] for a in (*AUDITED, "split", "fold")} for r in rows]) if rows else None
    leaks = sort_leaks(leak_rows(audit_rows(table)).to_pylist()) if table is not None else []
    counts = {s: {} for s in ("train", "val", "test")}
    folds: dict[str, dict] = {}
    for r in rows:
        counts[r["split"]][r["label"]] = counts[r["split"]].get(r["label"], 0) + 1
        f = folds.setdefault(str(r["fold"]), {})
        f[r["label"]] = f.get(r["label"], 0) + 1
    return {"summary": {"leaks": len(leaks), "split_class_counts": counts,
                        "fold_class_counts": dict(sorted(folds.items(), key=lambda kv: int(kv[0])))},
            "leaks": leaks}


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
