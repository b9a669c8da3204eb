"""Radiograph side of the link: DICOM headers only, through screening's header-first ranged reads.

`header_batch` is a pure Ray Data batch function: listing rows (key, etag, size) in, one row per
object out (`FILM_SCHEMA`) with the pseudonymous patient id, the film's date, age and sex, or why
the object cannot be linked. It reads each object's first 64 KB (more only while the header
continues; `kneescreen.data.decode.read_header`), never its pixel data, and applies screening's
skip policy (`kneescreen.data.decode.skip_reason`). Raw PatientIDs stay inside the task.

Statuses and reasons:
    ok                                  a knee radiograph with a patient and a date: joined next
    skipped   not_knee, not_radiograph  screening's policy (BodyPartExamined, Modality)
    unlinked  not_dicom                 PNG/JPEG/other bytes: no header, so no patient or date
              unreadable_header         DICOM whose header only the whole object could judge
              no_patient_id, no_date    the header lacks PatientID, or every date
              read_failed               the storage read failed (retried by the client first)
              changed_during_read       the object was replaced between listing and read (reads
                                        are pinned to the listed etag); the next link re-lists it
"""

from __future__ import annotations

import datetime as _dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from kneescreen.data.decode import RangedRead, read_header, skip_reason
from kneescreen.fileio.privacy import patient_pseudo_id
from kneescreen.fileio.reader import ReaderConfig
from kneescreen.fileio.store import ObjectChanged, Store, join
from kneescreen.link.registry import parse_date

FILM_SCHEMA = pa.schema([
    ("key", pa.string()), ("etag", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("patient_pseudo_id", pa.string()), ("study_date", pa.date32()), ("age", pa.float64()), ("sex", pa.string()),
    ("bytes_read", pa.int64()),
])


@dataclass(frozen=True)
class HeaderSpec:
    """What a header task needs."""

    store: Store
    root: str
    key: bytes
    body_part_policy: str = "skip"
    threads: int = 16


def film_row(meta, policy: str, key: bytes) -> tuple[str, str | None, str | None, _dt.date | None]:
    """(status, reason, pseudonymous id, film date) for a checked DICOM header."""
    skip = skip_reason(meta, policy)
    if skip is not None:
        return "skipped", skip[0], None, None
    pid = patient_pseudo_id(meta.patient_id, key)
    if pid is None:
        return "unlinked", "no_patient_id", None, None
    date = parse_date(meta.study_date) or parse_date(meta.other_date)
    if date is None:
        return "unlinked", "no_date", pid, None
    return "ok", None, pid, date


def _one(spec: HeaderSpec, key: str, etag: str, cfg: ReaderConfig) -> dict:
    obj = RangedRead(spec.store, join(spec.root, key), etag)  # pinned: the header of the listed version
    row = {"key": key, "etag": etag, "patient_pseudo_id": None, "study_date": None, "age": None, "sex": None}
    try:
        meta = read_header(obj, cfg)
    except ObjectChanged:
        return {**row, "status": "unlinked", "reason": "changed_during_read", "bytes_read": obj.bytes_read}
    except Exception:  # noqa: BLE001 - a failed read is a row, not a dead batch
        return {**row, "status": "unlinked", "reason": "read_failed", "bytes_read": obj.bytes_read}
    if meta is None:
        # A DICOM preamble with a header `read_dicom_header` could not judge alone (truncated,
        # an unsupported pixel layout): only the whole object's decode could say more.
        reason = "unreadable_header" if obj.data[128:132] == b"DICM" else "not_dicom"
        return {**row, "status": "unlinked", "reason": reason, "bytes_read": obj.bytes_read}
    status, reason, pid, date = film_row(meta, spec.body_part_policy, spec.key)
    return {**row, "status": status, "reason": reason, "patient_pseudo_id": pid, "study_date": date,
            "age": meta.age, "sex": meta.sex if meta.sex in ("F", "M") else None, "bytes_read": obj.bytes_read}


def header_batch(batch: pa.Table, spec: HeaderSpec) -> pa.Table:
    """Ray Data batch function: listing rows (key, etag, ...) -> `FILM_SCHEMA` rows, in order."""
    cfg = ReaderConfig(hash_pixels=False)
    keys, etags = batch.column("key").to_pylist(), batch.column("etag").to_pylist()
    if spec.threads > 1 and len(keys) > 1:
        with ThreadPoolExecutor(min(spec.threads, len(keys))) as pool:
            rows = list(pool.map(lambda ke: _one(spec, ke[0], ke[1], cfg), zip(keys, etags)))
    else:
        rows = [_one(spec, k, e, cfg) for k, e in zip(keys, etags)]
    return pa.Table.from_pylist(rows, schema=FILM_SCHEMA)
