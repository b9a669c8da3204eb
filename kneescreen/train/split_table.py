"""A ``split.csv`` as columns (Arrow, then NumPy): what training reads instead of one dict per row.

    split.csv --pyarrow CSV, every column text--> `load_split_table` (optionally some splits only)
      -> `split_columns`: NumPy columns parsed as `data.split.run.load_split` parses each row
         (``fold``/``group`` int, ``age``/``t_score`` float with NaN for missing, ``sex`` None
         when empty)
      -> `decode_inputs`: the Arrow table the training decoder reads (sorted by key, numbered)
      -> `split_fingerprint`: `train.run.training_fingerprint` of the same rows

At 100,000 films a list of row dicts costs the driver ~1 KB per row while it is read (and Python
keeps much of that heap afterwards); columns cost tens of bytes per row, and `train.data` reads
them inside a Ray task so the driver holds none of it (docs/operations.md, "Training memory").
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io

import numpy as np
import pyarrow as pa

from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES, to_floats


def read_split_csv(data: bytes) -> pa.Table:
    """A split CSV's bytes as an Arrow table of text columns ("" where a cell is empty)."""
    import pyarrow.csv as pacsv

    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8"))), [])
    return pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(newlines_in_values=True),
                          convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                               strings_can_be_null=False))


def load_split_table(path: str, store: Store | None = None, splits: tuple[str, ...] | None = None) -> pa.Table:
    """The rows of a ``split.csv`` (the file or its folder) as text columns, only ``splits`` if given."""
    store = store or Store.resolve()
    table = read_split_csv(store.read_bytes(path if path.endswith(".csv") else join(path, "split.csv")))
    if splits is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["split"], value_set=pa.array(list(splits), pa.string())))
    return table


def _text(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(object)


def split_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """`load_split_table`'s text columns parsed as `load_split` parses each row, one array each."""
    out = {name: _text(table, name) for name in table.column_names}
    for name in ("fold", "group"):
        if name in out:
            out[name] = out[name].astype(np.int64)
    for name in ("t_score", "age"):
        out[name] = to_floats(out[name]) if name in out else np.full(table.num_rows, np.nan)
    sex = out.get("sex", np.full(table.num_rows, "", dtype=object))
    out["sex"] = np.where(sex == "", None, sex)
    return out


def rows_to_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Parsed split rows (`load_split`; tests, benchmarks) as the columns `split_columns` gives."""
    cols = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "uri", "label", "split")}
    cols["fold"] = np.array([int(r["fold"]) for r in rows], np.int64)
    cols["age"] = to_floats([r.get("age") for r in rows])
    cols["t_score"] = to_floats([r.get("t_score") for r in rows])
    cols["sex"] = np.array([r.get("sex") or None for r in rows], dtype=object)
    return cols


def decode_inputs(cols: dict[str, np.ndarray]) -> pa.Table:
    """The training decoder's input (`train.data`): sorted by key, numbered ``row``, label as class index.

    Raises:
        ValueError: a label that is not one of `CLASSES`.
    """
    order = np.argsort(cols["key"], kind="stable")
    names, index = np.unique(cols["label"][order].astype(str), return_inverse=True)
    unknown = [v for v in names if v not in CLASSES]
    if unknown:
        raise ValueError(f"unknown label {unknown[0]!r} in the split; expected one of {list(CLASSES)}")
    sex = cols["sex"][order]
    return pa.table({
        "row": pa.array(np.arange(len(order), dtype=np.int64)),
        "uri": pa.array(cols["uri"][order], pa.string()), "key": pa.array(cols["key"][order], pa.string()),
        "label": pa.array(np.array([CLASSES.index(v) for v in names], np.int64)[index].reshape(-1)),
        "row_age": pa.array(cols["age"][order]),
        "row_sex": pa.array(np.where(np.equal(sex, None), "", sex), pa.string()),
        "row_t": pa.array(cols["t_score"][order]),
        "split": pa.array(cols["split"][order], pa.string()), "fold": pa.array(cols["fold"][order]),
    })


def split_fingerprint(table: pa.Table) -> str:
    """`train.run.training_fingerprint` of a split's rows, from its text columns."""
    pixel_hash, label, split = (_text(table, c) for c in ("pixel_hash", "label", "split"))
    order = np.argsort(pixel_hash, kind="stable")
    text = "".join(f"{p}:{lab}:{s}\n" for p, lab, s in zip(pixel_hash[order], label[order], split[order]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
