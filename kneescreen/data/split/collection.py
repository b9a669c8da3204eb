"""A labelled collection -> `Item` rows, streamed in batches (bounded memory at any length).

Three layouts: a folder per class (``normal/``, ``osteopenia/``, ``osteoporosis/``), a folder or
prefix holding ``labels.csv``, or a labels CSV/Parquet file (local or s3://). The labels file is
read in record batches, every CSV column as text (like csv.DictReader), so a 10-million-row file
costs one batch of driver memory.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from kneescreen.data import link_output
from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, is_s3, join
from kneescreen.labels import CLASSES, normalise_label, t_score_to_class, to_float

_IMAGE_EXT = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", "")
_PATIENT_COLUMNS = ("patient_ref", "patient_id", "patient", "subject_id")
ITEM_CHUNK = 5000  # labels rows per batch (and per scratch Parquet chunk of the Ray engine)


@dataclass
class Item:
    key: str
    uri: str
    label: str
    patient: str
    t_score: float | None = None
    age: float | None = None
    sex: str | None = None


def load_collection(source: str, images_root: str | None = None, store: Store | None = None) -> list[Item]:
    """Items of a labelled collection (all in memory; `iter_collection` streams them).

    Args:
        source: a folder-per-class tree (``normal/``, ``osteopenia/``, ``osteoporosis/``), a folder
            or prefix holding ``labels.csv``, or a labels CSV/Parquet file (local or s3://) with a
            ``key`` or ``path`` column and a ``label`` or ``t_score`` column.
        images_root: where keys are relative to (default: beside the labels file, or its
            ``images/`` folder when that exists).

    Raises:
        KneescreenError: when no labels can be found or a label is not a known class.
    """
    return [it for batch in iter_collection(source, images_root, store) for it in batch]


def iter_collection(source: str, images_root: str | None = None, store: Store | None = None,
                    batch_rows: int = ITEM_CHUNK) -> Iterator[list[Item]]:
    """`load_collection` in batches of up to ``batch_rows`` items, reading the labels file in
    record batches (bounded memory whatever its length)."""
    store = store or Store.resolve()
    if link_output.is_link_output(store, source):  # `kneescreen link` output: labels/ + link_audit.json
        yield from ([Item(**r) for r in rows] for rows in link_output.item_rows(store, source, batch_rows))
        return
    labels_uri = None
    if source.endswith((".csv", ".parquet")):
        labels_uri = source
    elif store.exists(join(source, "labels.csv")):
        labels_uri = join(source, "labels.csv")
    if labels_uri is None:
        yield from _class_folder_batches(source, batch_rows)
        return
    base = labels_uri.rsplit("/", 1)[0] if is_s3(labels_uri) else str(pathlib.Path(labels_uri).parent)
    batches = _label_batches(store, labels_uri, batch_rows)
    first = next(batches, [])
    if not first:
        raise KneescreenError(f"{labels_uri} has no rows")
    key_col = "key" if "key" in first[0] else "path" if "path" in first[0] else None
    if key_col is None:
        raise KneescreenError(f"{labels_uri}: needs a 'key' or 'path' column; has {sorted(first[0])}")
    if images_root is None:
        images_root = base
        key0 = str(first[0][key_col])
        if not store.exists(join(base, key0)) and store.exists(join(base, "images", key0)):
            images_root = join(base, "images")
    patient_col = next((c for c in _PATIENT_COLUMNS if c in first[0]), None)
    line = 1
    for rows in _chain(first, batches):
        items = []
        for row in rows:
            line += 1
            items.append(_item(row, key_col, patient_col, images_root, f"{labels_uri} row {line}"))
        yield items


def _chain(first: list[dict], rest: Iterator[list[dict]]) -> Iterator[list[dict]]:
    yield first
    yield from rest


def _item(row: dict, key_col: str, patient_col: str | None, images_root: str, where: str) -> Item:
    key = str(row[key_col])
    t = to_float(row.get("t_score"))
    try:
        label = normalise_label(row["label"]) if row.get("label") not in (None, "") else t_score_to_class(t)
    except ValueError as exc:
        raise KneescreenError(f"{where} ({key}): {exc}") from None
    return Item(key=key, uri=join(images_root, key), label=label,
                patient=str(row[patient_col]) if patient_col and row.get(patient_col) else "",
                t_score=t, age=to_float(row.get("age")), sex=(row.get("sex") or None))


def _label_batches(store: Store, uri: str, batch_rows: int) -> Iterator[list[dict]]:
    """Rows of a labels CSV (every column as text, like csv.DictReader) or Parquet file, in batches."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = store.filesystem(uri)
    if uri.endswith(".parquet"):
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield batch.to_pylist()
        return
    with fs.open_input_stream(path) as f:  # the header first: every column is read as a string
        names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
    opts = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
    with fs.open_input_stream(path) as f:
        for batch in pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 20), convert_options=opts):
            yield batch.to_pylist()


def _class_folder_batches(source: str, batch_rows: int) -> Iterator[list[Item]]:
    root = pathlib.Path(source)
    if not root.is_dir():
        raise KneescreenError(f"{source!r}: not a folder, labels file or folder with labels.csv")
    items, found = [], False
    for cls in CLASSES:
        for path in sorted((root / cls).glob("*")) if (root / cls).is_dir() else []:
            if path.is_file() and path.suffix.lower() in _IMAGE_EXT:
                items.append(Item(key=f"{cls}/{path.name}", uri=str(path), label=cls, patient=""))
                found = True
            if len(items) >= batch_rows:
                yield items
                items = []
    if not found:
        raise KneescreenError(f"{source!r}: no labels.csv and no {'/'.join(CLASSES)} sub-folders with images")
    if items:
        yield items
