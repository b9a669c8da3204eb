"""The split's files: ``split.csv`` streamed from key-sorted rows (both engines write through
`write_split_rows`), ``duplicates.csv`` and ``audit.json`` beside it (`run.load_split` reads the
split back). No Ray.
"""

from __future__ import annotations

import csv
import io
import json
import os

from kneescreen.data.split.assign import merged
from kneescreen.data.split.tables import SPLIT_COLUMNS, SPLIT_SCHEMA
from kneescreen.fileio.store import Store, is_s3, join


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


def write_split_csv(store: Store, uri: str, chunk_uris: list[str]) -> int:
    """split.csv from key-sorted Parquet chunks (`assign.assign_groups`), merged by key
    (`write_split_rows`); returns the rows written."""
    return write_split_rows(store, uri, merged(store, chunk_uris, SPLIT_SCHEMA.names, lambda r: r["key"]))


def write_audit(store: Store, out_dir: str, audit: dict) -> None:
    """``duplicates.csv`` and ``audit.json`` beside the split."""
    store.write_csv(join(out_dir, "duplicates.csv"), audit["duplicates"], ["pixel_hash", "kind", "key", "label"])
    store.write_bytes(join(out_dir, "audit.json"), json.dumps(audit, indent=2).encode())

