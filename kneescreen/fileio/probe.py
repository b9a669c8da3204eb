"""`kneescreen inspect`: one JSON line per file, describing how the reader sees it.

Named ``probe``, not ``inspect``, so that it never shadows the standard library's `inspect`."""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kneescreen.config import opt
from kneescreen.errors import DecodeError
from kneescreen.fileio.reader import ReaderConfig, read_radiograph
from kneescreen.fileio.store import Store, is_s3, split_s3


@dataclass(frozen=True)
class InspectConfig:
    """``kneescreen inspect`` settings."""

    targets: tuple[str, ...] = opt(help="files, folders or s3:// URIs/prefixes", positional=True)
    max_pixels: int = opt(64_000_000, "refuse images above this many pixels")
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")


FIELDS = (
    "path", "status", "error_code", "message", "size", "rows", "cols", "photometric",
    "transfer_syntax", "modality", "body_part", "view_position", "laterality", "format",
    "pixel_hash", "warnings", "elapsed_ms",
)


def inspect_bytes(path: str, data: bytes, config: ReaderConfig = ReaderConfig()) -> dict:
    """Describe one file's decode outcome as a flat dict (no patient identifiers)."""
    t0 = time.perf_counter()
    row = dict.fromkeys(FIELDS)
    row.update(path=path, size=len(data))
    try:
        rg = read_radiograph(data, config)
    except DecodeError as exc:
        row.update(status="error", error_code=exc.error_code, message=exc.message)
    else:
        m = rg.meta
        row.update(
            status="ok", rows=m.rows, cols=m.cols, photometric=m.photometric,
            transfer_syntax=m.transfer_syntax, modality=m.modality, body_part=m.body_part,
            view_position=m.view_position, laterality=m.laterality, format=m.format,
            pixel_hash=rg.pixel_hash, warnings=rg.warnings or None,
        )
    row["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return row


def _expand(targets: Iterable[str], store: Store) -> Iterator[tuple[str, str]]:
    """(display path, uri) for each file, expanding folders and s3 prefixes."""
    for target in targets:
        if is_s3(target):
            _, key = split_s3(target)
            if key and not key.endswith("/") and store.exists(target):
                yield target, target
                continue
            for obj in store.list_objects(target):
                yield obj.uri, obj.uri
        elif pathlib.Path(target).is_dir():
            for obj in store.list_objects(target):
                yield obj.uri, obj.uri
        else:
            yield target, target


def run_inspect(targets: list[str], store: Store | None = None, out=None,
                config: ReaderConfig = ReaderConfig()) -> int:
    """Write one JSON line per input file to ``out``. Returns 0 whenever it ran."""
    out = out or sys.stdout
    store = store or Store.resolve()
    for display, uri in _expand(targets, store):
        try:
            data = store.read_bytes(uri)
        except Exception as exc:  # noqa: BLE001 - an unreadable object is a row, not a crash
            row = dict.fromkeys(FIELDS)
            row.update(path=display, status="error", error_code="read_failed",
                       message=f"{type(exc).__name__}: {exc}"[:300])
            out.write(json.dumps(row) + "\n")
            continue
        out.write(json.dumps(inspect_bytes(display, data, config)) + "\n")
        out.flush()
    return 0
