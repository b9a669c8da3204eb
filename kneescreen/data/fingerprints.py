"""Image fingerprints and the near-duplicate search, as batch functions for Ray Data.

Per image only small columns leave the fingerprint task: the decoded pixel hash (exact
duplicates in any container), a 32 x 32 uint8 thumbnail (1,024 bytes; near duplicates) and an
error code. The normalised thumbnail (zero mean, unit norm, float32) is rebuilt from the uint8 one
exactly as before, so a dot product of two is their Pearson correlation.

Near duplicates are found by locality-sensitive hashing instead of all pairs: each normalised
thumbnail gets ``bands`` x ``bits`` random-hyperplane sign bits (SimHash, Charikar 2002: two
vectors at angle theta agree on one bit with probability 1 - theta / pi); images that agree on all
``bits`` of at least one band share a bucket, and only images sharing a bucket are compared,
exactly, at ``min_corr``. For the default 20 bands of 20 bits a pair at the 0.995 threshold
(theta = 0.10) shares some band with probability 1 - 4e-7; a re-compressed copy (0.9999+) with
1 - 1e-20. Unrelated pairs rarely collide: 0.6 at correlation 0.9, 0.006 at 0.5, 3e-4 at 0.23
(the median pair of the dev set), so the exact comparisons are a small fraction of all pairs on
real radiographs. On collections where unrelated images correlate above ~0.95 (64 px synthetic
archives: median pair 0.95) most pairs collide and the work approaches ``bands`` x all pairs,
still spread over Ray tasks, never on the driver. A pair found in several bands is reported by
the first band it collides in only, so every pair comes out once.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kneescreen.errors import DecodeError
from kneescreen.fileio.privacy import patient_pseudo_id
from kneescreen.fileio.reader import read_radiograph
from kneescreen.fileio.store import Store

THUMB_SIDE = 32
LSH_SEED = 20240611  # fixed: the same collection gives the same buckets whatever the split seed
ITEM_SCHEMA = pa.schema([
    ("key", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("patient", pa.string()),
    ("t_score", pa.float64()), ("age", pa.float64()), ("sex", pa.string()),
])
FINGERPRINT_SCHEMA = pa.schema(list(ITEM_SCHEMA) + [
    ("pixel_hash", pa.string()), ("thumb", pa.binary()), ("error_code", pa.string()),
])
PAIR_SCHEMA = pa.schema([
    ("key_a", pa.string()), ("key_b", pa.string()), ("unit_a", pa.string()), ("unit_b", pa.string()),
    ("label_a", pa.string()), ("label_b", pa.string()), ("corr", pa.float32()),
])


def thumbnail_u8(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """``side`` x ``side`` uint8 thumbnail of a [0, 1] image (bilinear), flattened."""
    from PIL import Image

    small = Image.fromarray((image * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    return np.asarray(small, dtype=np.uint8).ravel()


def normalise(thumbs_u8: np.ndarray) -> np.ndarray:
    """Rows of uint8 thumbnails -> zero-mean, unit-norm float32 rows (dot product = correlation)."""
    t = np.atleast_2d(thumbs_u8).astype(np.float32)
    t = t - t.mean(axis=1, keepdims=True)
    return (t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-9)).astype(np.float32)


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """Zero-mean, unit-norm ``side`` x ``side`` thumbnail: a dot product of two is their Pearson
    correlation, which survives resizing, re-compression and window changes."""
    return normalise(thumbnail_u8(image, side))[0]


def _fingerprint_one(uri: str, store: Store) -> tuple[str | None, bytes | None, str | None, str | None]:
    try:
        rg = read_radiograph(store.read_bytes(uri))
    except DecodeError as exc:
        return None, None, exc.error_code, None
    except OSError:
        return None, None, "read_failed", None
    return rg.pixel_hash, thumbnail_u8(rg.image).tobytes(), None, rg.meta.patient_id


def fingerprint_batch(batch: pa.Table, store: Store, key: bytes) -> pa.Table:
    """Ray Data batch function: item rows (`ITEM_SCHEMA`) -> `FINGERPRINT_SCHEMA` rows.

    A missing patient is filled from the DICOM PatientID, pseudonymised with ``key`` here, so the
    raw identifier never leaves the task. Bad inputs become ``error_code`` rows, never a failed batch.
    """
    hashes, thumbs, errors, patients = [], [], [], []
    for uri, patient in zip(batch.column("uri").to_pylist(), batch.column("patient").to_pylist()):
        ph, thumb, err, raw_patient = _fingerprint_one(uri, store)
        hashes.append(ph)
        thumbs.append(thumb)
        errors.append(err)
        if not patient and raw_patient:
            patient = patient_pseudo_id(raw_patient, key)  # from the DICOM header; never kept raw
        patients.append(patient or "")
    cols = {name: batch.column(name) for name in ITEM_SCHEMA.names}
    cols.update(patient=pa.array(patients, pa.string()), pixel_hash=pa.array(hashes, pa.string()),
                thumb=pa.array(thumbs, pa.binary()), error_code=pa.array(errors, pa.string()))
    return pa.table(cols, schema=FINGERPRINT_SCHEMA)


def all_pairs_near_duplicates(thumbs: np.ndarray, min_corr: float, chunk: int = 2048) -> list[tuple[int, int]]:
    """Index pairs (i < j) of normalised thumbnails that correlate at or above ``min_corr``, by a
    chunked Gram matrix: the exact reference the LSH search is tested against, and the check
    inside one bucket."""
    if len(thumbs) < 2:
        return []
    pairs = []
    for start in range(0, len(thumbs), chunk):
        sims = thumbs[start : start + chunk] @ thumbs.T
        ii, jj = np.nonzero(sims >= min_corr)
        keep = ii + start < jj
        pairs += list(zip((ii[keep] + start).tolist(), jj[keep].tolist()))
    return pairs


# ---------------------------------------------------------------------------------------------
# locality-sensitive hashing


def band_keys(thumbs: np.ndarray, bands: int, bits: int) -> np.ndarray:
    """(n, bands) int64 bucket keys of normalised thumbnails: band index in the high 32 bits, that
    band's ``bits`` hyperplane signs in the low ones. The planes come from a fixed seed."""
    if not 1 <= bits <= 32:
        raise ValueError(f"LSH bits per band must be 1..32, not {bits}")
    planes = np.random.default_rng(LSH_SEED).standard_normal((bands * bits, thumbs.shape[1])).astype(np.float32)
    signs = (thumbs @ planes.T > 0).reshape(len(thumbs), bands, bits).astype(np.int64)
    low = (signs << np.arange(bits, dtype=np.int64)).sum(axis=2)
    return (np.arange(bands, dtype=np.int64) << 32) | low


def value_partition(values, parts: int) -> np.ndarray:
    """Stable partition numbers 0..parts-1 of values (pixel hashes, LSH bucket keys, group names,
    audited attribute values): blake2b of a string, splitmix of an integer array, the same in every
    process (Python's ``hash`` is salted per process)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        x = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return ((x >> np.uint64(33)) % np.uint64(parts)).astype(np.int64)
    return np.array([int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") % parts
                     for v in values], dtype=np.int64)


def bucket_rows(batch: pa.Table, bands: int, bits: int, parts: int) -> pa.Table:
    """Ray Data batch function: each kept image once per band, keyed by its bucket, with its
    thumbnail and all its band keys (to report a pair in its first common band only)."""
    thumbs = np.frombuffer(b"".join(batch.column("thumb").to_pylist()), np.uint8).reshape(-1, THUMB_SIDE ** 2)
    keys = band_keys(normalise(thumbs), bands, bits)
    n = batch.num_rows
    rep = pa.array(np.repeat(np.arange(n), bands))
    flat = keys.ravel()
    return pa.table({
        "part": value_partition(flat, parts), "bucket": flat,
        "key": batch.column("key").take(rep), "unit": batch.column("unit").take(rep),
        "label": batch.column("label").take(rep), "thumb": batch.column("thumb").take(rep),
        "bands": pa.array([k.tobytes() for k in keys], pa.binary()).take(rep),
    })


def _pairs_in_bucket(rows: pa.Table, band: int, min_corr: float) -> dict[str, list]:
    thumbs = normalise(np.frombuffer(b"".join(rows.column("thumb").to_pylist()), np.uint8).reshape(rows.num_rows, -1))
    bands = np.frombuffer(b"".join(rows.column("bands").to_pylist()), np.int64).reshape(rows.num_rows, -1)
    keys, units, labels = (rows.column(c).to_pylist() for c in ("key", "unit", "label"))
    out: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
    for i, j in all_pairs_near_duplicates(thumbs, min_corr):
        if band and (bands[i, :band] == bands[j, :band]).any():
            continue  # the pair shares an earlier band and is reported there
        a, b = (i, j) if keys[i] < keys[j] else (j, i)
        for name, col in (("key", keys), ("unit", units), ("label", labels)):
            out[f"{name}_a"].append(col[a])
            out[f"{name}_b"].append(col[b])
        out["corr"].append(float(thumbs[i] @ thumbs[j]))
    return out


def near_pairs(part: pa.Table, min_corr: float) -> pa.Table:
    """Ray Data map_groups function over one partition of `bucket_rows`: every pair in a shared
    bucket whose correlation is at least ``min_corr``, reported once (`PAIR_SCHEMA`).

    A partition holds whole buckets; singletons (most buckets) are skipped without a comparison.
    """
    part = part.sort_by("bucket")
    buckets = part.column("bucket").to_numpy()
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    ends = np.r_[starts[1:], len(buckets)]
    cols: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        found = _pairs_in_bucket(part.slice(s, e - s), int(buckets[s] >> 32), min_corr)
        for name in cols:
            cols[name] += found[name]
    return pa.table(cols, schema=PAIR_SCHEMA)


def usable_fingerprints(table: pa.Table) -> pa.Table:
    """Fingerprint rows without an error code (the image was read and decoded)."""
    return table.filter(pc.is_null(table.column("error_code")))
