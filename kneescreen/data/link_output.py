"""What `kneescreen link` writes, and how training and screening read it back.

A link output folder (local or s3://) holds ``labels/`` (a Parquet dataset, one row per linked
radiograph, `LABELS_SCHEMA`), ``unlinked/`` (one row per object not linked, with the reason) and
``link_audit.json`` (counts, and ``archive``: the root the keys are relative to). The audit is
written last, so a folder with it is complete. `kneescreen train --data OUT` and
`kneescreen screen --reference OUT` read it through this module; it sits in the data layer so
both can, while the writer lives in `kneescreen.link`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa

from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join

AUDIT_FILE = "link_audit.json"
LABELS_SCHEMA = pa.schema([
    ("key", pa.string()),  # relative to the archive root recorded in link_audit.json
    ("etag", pa.string()),
    ("patient_pseudo_id", pa.string()),
    ("study_date", pa.date32()),  # the radiograph's date
    ("exam_date", pa.date32()),  # the DXA exam it was linked to
    ("gap_days", pa.int32()),  # exam_date - study_date: negative when the DXA came first
    ("t_score", pa.float64()),  # the lowest T-score among the exam's sites
    ("site", pa.string()),  # the site that gave it (e.g. lumbar_spine; "t_score" for a single column)
    ("label", pa.string()),  # WHO class of t_score
    ("age", pa.float64()),
    ("sex", pa.string()),
])
UNLINKED_SCHEMA = pa.schema([
    ("key", pa.string()), ("etag", pa.string()), ("status", pa.string()),  # skipped | unlinked
    ("reason", pa.string()), ("patient_pseudo_id", pa.string()), ("study_date", pa.date32()),
])


def is_link_output(store: Store, source: str) -> bool:
    """Whether ``source`` is a folder written by `kneescreen link` (it holds ``link_audit.json``)."""
    return not source.endswith((".csv", ".parquet")) and store.exists(join(source, AUDIT_FILE))


def read_audit(store: Store, source: str) -> dict:
    """The link audit of a link output folder.

    Raises:
        KneescreenError: the folder has no readable ``link_audit.json``.
    """
    try:
        return json.loads(store.read_bytes(join(source, AUDIT_FILE)))
    except (OSError, ValueError) as exc:
        raise KneescreenError(f"{source}: no readable {AUDIT_FILE} ({exc}); run `kneescreen link` first") from None


def label_batches(store: Store, source: str, batch_rows: int = 5000) -> Iterator[list[dict]]:
    """Rows of ``OUT/labels/`` in batches, read file by file (bounded memory)."""
    if not read_audit(store, source).get("counts", {}).get("linked"):
        raise KneescreenError(f"{source}: the link output has no linked radiographs (see {AUDIT_FILE})")
    for batch in store.iter_parquet_batches(join(source, "labels"), LABELS_SCHEMA.names, schema=LABELS_SCHEMA,
                                            batch_size=batch_rows, readahead=False):
        yield batch.to_pylist()


def item_rows(store: Store, source: str, batch_rows: int = 5000) -> Iterator[list[dict]]:
    """Training items from a link output, in batches: dicts with `kneescreen.data.split.collection.Item`'s
    fields (``uri`` under the recorded archive root, ``patient`` the pseudonymous id)."""
    root = read_audit(store, source)["archive"]
    for rows in label_batches(store, source, batch_rows):
        yield [{"key": r["key"], "uri": join(root, r["key"]), "label": r["label"], "patient": r["patient_pseudo_id"] or "",
                "t_score": r["t_score"], "age": r["age"], "sex": r["sex"]} for r in rows]


def reference_rows(store: Store, source: str) -> Iterator[dict]:
    """Reference rows (key, label, t_score, ...) for `screen --reference`: keys are relative to the
    archive root the link ran on, so screen that same root."""
    for rows in label_batches(store, source):
        yield from rows
