"""The one decode + preprocess batch function, shared by training and screening.

``decode_batch(batch, spec)`` is a pure Ray Data batch function: it reads each object (pinned to
the listed ``etag`` where the batch has one), decodes it with the pinned reader, letterboxes it
to every size the models need, and adds metadata columns. A file that cannot be used is never dropped here: it becomes a row with ``status``
``error`` (or ``skipped``), a stable ``error_code`` and a message. Screening writes those rows;
training filters them out and logs their codes (`usable_decoded_rows`).
"""

from __future__ import annotations

import datetime as _dt

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kneescreen.data import link_output
from kneescreen.data.knee.views import view_inputs
from kneescreen.data.preprocess import blank_input, letterbox
from kneescreen.errors import DecodeError, KneescreenError
from kneescreen.fileio.privacy import patient_pseudo_id, pseudonymise
from kneescreen.fileio.reader import RadiographMeta, ReaderConfig, read_dicom_header, read_radiograph
from kneescreen.fileio.store import ObjectChanged, Store, join
from kneescreen.labels import age_band, normalise_label, t_score_to_class, to_float

_logger = logging.getLogger(__name__)
KNEE_BODY_PARTS = {"KNEE", "LEG", "LOWER LIMB", "LOWERLIMB", "EXTREMITY", "LOWER EXTREMITY", "TIBIA", "FEMUR", "PATELLA"}
RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "OT", "DR", "PX"}
# Which error codes say something about the *object* and which about the moment it was read.
# Transient: the storage read failed (throttling, 5xx, reset, timeout) after the client's own
# retries, or the decoder died for reasons outside the file (out of memory, a crashed native
# library): the same bytes may well screen next time, so the object is not done and the next
# incremental run retries it. changed_during_read: the object was replaced between the listing
# and the read (the read is pinned to the listed etag); the next listing has the new etag, a new
# object version screened afresh, and the old version's row is retried (bounded) only if a later
# listing still shows that etag. Every other code (not_dicom, truncated, malformed, ..., and the
# skip codes not_knee / not_radiograph) describes the bytes: reading them again gives the same
# answer, so the object is done unless `--retry-errors` asks for errors to be tried again.
TRANSIENT_ERROR_CODES = frozenset({"read_failed", "changed_during_read"})
SKIP_CODES = frozenset({"not_knee", "not_radiograph"})


def is_transient(error_code: str | None) -> bool:
    """Whether a row with this error code may succeed on a later attempt (see TRANSIENT_ERROR_CODES)."""
    return error_code in TRANSIENT_ERROR_CODES


META_COLUMNS = (
    "status", "error_code", "message", "format", "patient_pseudo_id", "study_pseudo_id", "laterality", "view",
    "site", "manufacturer", "sex", "age", "age_band", "study_date", "reference_label", "reference_t_score",
    "decode_ms", "bytes_read")


@dataclass(frozen=True)
class DecodeSpec:
    """Everything a decode task needs, passed as one argument.

    Attributes:
        store: where the objects live.
        sizes: letterbox sizes to produce (one ``img_<size>`` column each).
        views: native-resolution inputs around the located joint (``roi_<s>``, ``tiles_<s>``;
            `kneescreen.data.preprocess.VIEWS`), one column each. With any, a film whose knee
            joint cannot be found becomes an error row (``joint_not_found``).
        root: objects are ``join(root, key)``; None = the batch has a ``uri`` column instead.
        pseudo_key: HMAC key for patient/study pseudonyms (raw ids never leave the task).
        reference / metadata: side tables keyed by key or SOP Instance UID (`load_side_table`).
        body_part_policy: ``skip`` non-knee DICOM (BodyPartExamined) or ``keep`` it.
        max_pixels: decompression-bomb guard handed to the reader.
        header_triage: read a DICOM object's header first and the rest only when policy keeps
            the object (``bytes_read`` shows what it saved); False reads every object whole.
        frame_decode: with the device path (`decode_stored`), ``task`` decodes every frame here;
            ``actor`` leaves frames of the device codecs compressed for the inference actor.
    """

    store: Store
    sizes: tuple[int, ...]
    views: tuple[str, ...] = ()
    root: str | None = None
    pseudo_key: bytes = b""
    reference: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    body_part_policy: str = "skip"
    max_pixels: int = 64_000_000
    header_triage: bool = True
    frame_decode: str = "task"


def load_side_table(store: Store, uri: str | None) -> dict[str, dict]:
    """key / relative path / SOP Instance UID -> row, for reference labels and metadata sidecars.

    Raises:
        KneescreenError: a table with none of those columns filled.
    """
    if not uri:
        return {}
    out: dict[str, dict] = {}
    rows = link_output.reference_rows(store, uri) if link_output.is_link_output(store, uri) else store.read_table(uri)
    for row in rows:
        for col in ("key", "path", "relative_path", "sop_instance_uid"):
            v = row.get(col)
            if v not in (None, ""):
                out[str(v)] = row
    if not out:
        raise KneescreenError(f"{uri}: no rows with a key, path or sop_instance_uid column")
    return out


# Header triage: the first read of an object asks for this many bytes. A CR/DX header is a few
# KB, so one request nearly always holds it; smaller objects arrive whole in that one request.
HEAD_BYTES = 64 * 1024
# A header still incomplete here (huge private tags) is not worth more round trips: read it all.
MAX_HEADER_BYTES = 1024 * 1024


class RangedRead:
    """One object read front to back in ranges, counting the bytes that arrive. Every read names
    a version: ``etag`` (the listing's) from the first read on, else the first read's, so the
    pieces come from one version of the object, the listed one where there is a listing
    (`ObjectChanged` otherwise)."""

    def __init__(self, store: Store, uri: str, etag: str | None = None):
        self.store, self.uri = store, uri
        self.data, self.size, self.etag, self.bytes_read = b"", None, etag or None, 0

    @property
    def complete(self) -> bool:
        return self.size is not None and len(self.data) >= self.size

    def extend(self, n: int) -> None:
        """Read the next ``n`` bytes (fewer where the object ends)."""
        part = self.store.read_range(self.uri, len(self.data), n, if_match=self.etag)
        self.data += part.data
        self.bytes_read += len(part.data)
        self.size, self.etag = part.size, part.etag


def skip_reason(meta: RadiographMeta, body_part_policy: str = "skip") -> tuple[str, str] | None:
    """(error code, message) when policy skips an object with this header, else None: THE skip
    policy, shared by screening's decode and triage and by `kneescreen link`."""
    body = (meta.body_part or "").upper()
    if meta.modality and meta.modality.upper() not in RADIOGRAPH_MODALITIES:
        return "not_radiograph", f"modality {meta.modality} is not a radiograph"
    if body_part_policy == "skip" and body and body not in KNEE_BODY_PARTS:
        return "not_knee", f"BodyPartExamined is {meta.body_part}"
    return None


def _skip_reason(spec: DecodeSpec, meta: RadiographMeta) -> tuple[str, str] | None:
    return skip_reason(meta, spec.body_part_policy)


def read_header(obj: RangedRead, cfg: ReaderConfig) -> RadiographMeta | None:
    """The header facts of a DICOM object, reading no more of it than its header needs: the first
    `HEAD_BYTES` (unless ``obj`` already holds bytes), then doubling while the header continues,
    up to `MAX_HEADER_BYTES`.

    Returns:
        The checked header (`read_dicom_header`), or None: not DICOM, or a header only the whole
        object's read can judge (``obj.data`` then holds what was read so far).
    """
    if not obj.data and not obj.complete:
        obj.extend(HEAD_BYTES)
    while True:
        header = read_dicom_header(obj.data, cfg, obj.size)
        if header.meta is not None or not header.needs_more or obj.complete or len(obj.data) >= MAX_HEADER_BYTES:
            return header.meta
        obj.extend(len(obj.data))  # double: a long header costs a few requests, not one per 64 KB


def _fetch(spec: DecodeSpec, obj: RangedRead, cfg: ReaderConfig) -> RadiographMeta | None:
    """Read ``obj``: the header of a DICOM object first, the rest only if policy keeps it.

    Returns:
        The header's facts when they alone skip the object (``obj.data`` then holds only the
        header); otherwise None with the whole object in ``obj.data``.
    """
    obj.extend(HEAD_BYTES)
    if not obj.complete:  # an object that arrived whole in one request is decoded as it is
        meta = read_header(obj, cfg)
        if meta is not None and _skip_reason(spec, meta) is not None:
            return meta
    if not obj.complete:
        obj.extend(obj.size - len(obj.data))  # the rest, not the whole object again
    return None


def read_one(spec: DecodeSpec, uri: str, cfg: ReaderConfig, etag: str | None = None, read=read_radiograph):
    """(status, error_code, message, meta, result, bytes_read) for one object, every read pinned to
    ``etag`` (the listing's) when given; never raises.

    ``read`` turns the bytes into ``result``: `read_radiograph` (a `Radiograph`) or, for the
    device path, `kneescreen.fileio.reader.read_stored` (a `StoredFrame`)."""
    obj = RangedRead(spec.store, uri, etag)
    try:
        if spec.header_triage:
            meta = _fetch(spec, obj, cfg)
            if meta is not None:
                return ("skipped", *_skip_reason(spec, meta), meta, None, obj.bytes_read)
            data = obj.data
        else:
            data = spec.store.read_bytes(uri, if_match=etag or None)
            obj.bytes_read = len(data)
    except ObjectChanged as exc:  # replaced since the listing: the next listing has the new etag
        return ("error", "changed_during_read", f"storage: the object changed between listing and read; the next "
                f"run re-lists it: {exc}"[:300], None, None, obj.bytes_read)
    except FileNotFoundError as exc:  # listed, then deleted before this read: permanent for that etag
        return "error", "vanished", f"storage: deleted after the listing: {exc}"[:300], None, None, obj.bytes_read
    except PermissionError as exc:  # S3 403 / unreadable file: permanent until access is granted
        return "error", "access_denied", f"storage: {exc}"[:300], None, None, obj.bytes_read
    except Exception as exc:  # noqa: BLE001 - storage failures are rows, not a dead batch
        return "error", "read_failed", f"storage: {type(exc).__name__}: {exc}"[:300], None, None, obj.bytes_read
    try:
        rg = read(data, cfg)
    except DecodeError as exc:
        return "error", exc.error_code, exc.message, None, None, obj.bytes_read
    except Exception as exc:  # noqa: BLE001 - the reader raises only DecodeError for bad bytes, so
        # anything else (MemoryError, a crashed decoder library) is about this attempt: transient.
        return "error", "read_failed", f"decoder crashed: {type(exc).__name__}: {exc}"[:300], None, None, obj.bytes_read
    skip = _skip_reason(spec, rg.meta)
    if skip is not None:
        return "skipped", *skip, rg.meta, rg, obj.bytes_read
    return "ok", None, None, rg.meta, rg, obj.bytes_read


def _reference(ref: dict | None) -> tuple[str | None, float | None]:
    if not ref:
        return None, None
    t = to_float(ref.get("t_score"))
    try:
        label = normalise_label(ref["label"]) if ref.get("label") else (t_score_to_class(t) if t is not None else None)
    except ValueError:
        label = None
    return label, t


def study_date(value) -> _dt.date | None:
    """A DICOM DA (``YYYYMMDD``) or ISO (``YYYY-MM-DD``) date; None when absent or malformed."""
    text = str(value or "").strip().replace("-", "")[:8]
    try:
        return _dt.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


def describe(spec: DecodeSpec, key: str, meta: RadiographMeta | None) -> dict:
    """Metadata columns for one row: DICOM headers win, the sidecar fills formats without them."""
    sop = meta.sop_uid if meta and meta.sop_uid else None
    side = spec.metadata.get(key) or (spec.metadata.get(sop) if sop else None) or {}
    age = meta.age if meta and meta.age is not None else to_float(side.get("age"))
    sex = (meta.sex if meta and meta.sex else None) or (str(side.get("sex") or "").upper()[:1] or None)
    sex = sex if sex in ("F", "M") else None
    ref_label, ref_t = _reference(spec.reference.get(key) or (spec.reference.get(sop) if sop else None))
    return {
        "format": meta.format if meta else None,
        "patient_pseudo_id": patient_pseudo_id(meta.patient_id, spec.pseudo_key) if meta else None,
        "study_pseudo_id": pseudonymise(meta.study_uid, spec.pseudo_key, "s") if meta else None,
        "laterality": (meta.laterality if meta else None) or side.get("laterality") or None,
        "view": (meta.view_position if meta else None) or side.get("view") or None,
        "site": side.get("site") or (meta.institution if meta else None),
        "manufacturer": (meta.manufacturer if meta else None) or side.get("manufacturer") or None,
        "sex": sex, "age": age, "age_band": age_band(age), "reference_label": ref_label, "reference_t_score": ref_t,
        "study_date": study_date((meta.study_date if meta else None) or side.get("study_date")),
    }


def decode_batch(batch: dict, spec: DecodeSpec) -> dict:
    """Rows (``key``, or ``uri`` when ``spec.root`` is None) -> decoded, letterboxed images plus
    metadata; every input column passes through and every input row comes out.

    Returns:
        Columns: the input's, `META_COLUMNS`, ``img_<size>`` (n, size, size) uint8 arrays and one
        column per `DecodeSpec.views` entry (zeros for rows that are not ``ok``).
    """
    cfg = ReaderConfig(max_pixels=spec.max_pixels, hash_pixels=False)
    keys = list(batch["key"])
    uris = [join(spec.root, k) for k in keys] if spec.root is not None else list(batch["uri"])
    # The listing's etags pin every read to the listed version (rows without one read unpinned).
    etags = list(batch["etag"]) if "etag" in batch else [None] * len(keys)
    cols: dict[str, list] = {k: [] for k in META_COLUMNS}
    images: dict[str, list] = {f"img_{s}": [] for s in spec.sizes} | {v: [] for v in spec.views}
    for key, uri, etag in zip(keys, uris, etags):
        t0 = time.perf_counter()
        status, code, msg, meta, rg, nbytes = read_one(spec, uri, cfg, etag)
        image = rg.image if rg is not None else None
        views = {}
        if status == "ok" and spec.views:
            try:
                views = view_inputs(image, meta.pixel_spacing, spec.views)
            except DecodeError as exc:
                status, code, msg = "error", exc.error_code, exc.message
        row = {"status": status, "error_code": code, "message": msg, "bytes_read": nbytes,
               **describe(spec, key, meta)}
        for s in spec.sizes:
            images[f"img_{s}"].append(letterbox(image, s) if status == "ok" else blank_input(f"img_{s}")[0])
        for v in spec.views:
            images[v].append(views[v] if status == "ok" else blank_input(v)[0])
        row["decode_ms"] = (time.perf_counter() - t0) * 1000
        for k in META_COLUMNS:
            cols[k].append(row[k])
    out = dict(batch)
    out.update(cols)
    out.update({k: np.stack(v) if v else blank_input(k, 0) for k, v in images.items()})
    return out


def usable_decoded_rows(rows: list[dict], what: str = "training") -> list[dict]:
    """Keep the ``ok`` rows of decoded output; log how many were left out, by error code."""
    bad = Counter(r["error_code"] or r["status"] for r in rows if r["status"] != "ok")
    if bad:
        _logger.warning("%s: left out %d image(s) that could not be used: %s", what, sum(bad.values()),
                        ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))
    return [r for r in rows if r["status"] == "ok"]
