"""Labelled collections -> fingerprinted, de-duplicated, leakage-free splits.

Why so careful: the public knee-osteoporosis sets behind the published 84-93% accuracies hold
exact and near duplicates, some under two labels; a random image-level split then puts the same
knee in train and test. Here every image gets two fingerprints (the decoded pixel hash, so a
re-encoding collides, and a 32x32 normalised thumbnail for resized or re-compressed copies), and the
unit of splitting is the connected component of (patient, pixel hash, near-duplicate cluster).
The audit written next to the split proves no patient and no fingerprint crosses splits.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from kneescreen.config import opt
from kneescreen.errors import DecodeError, KneescreenError
from kneescreen.io.privacy import pseudonym_key, pseudonymise
from kneescreen.io.reader import read_radiograph
from kneescreen.io.store import Store, is_s3, join
from kneescreen.labels import CLASSES, normalise_label, t_score_to_class

_logger = logging.getLogger(__name__)
_IMAGE_EXT = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", "")
_PATIENT_COLUMNS = ("patient_ref", "patient_id", "patient", "subject_id")


@dataclass(frozen=True)
class SplitConfig:
    """Split policy. Fractions are of patients' images, stratified by class."""

    folds: int = opt(5, "cross-validation folds (patient-level, stratified)")
    val_fraction: float = opt(0.15, "share of images for validation")
    test_fraction: float = opt(0.15, "share of images for the held-out test split")
    seed: int = opt(0, "seed for the group assignment")
    duplicates: str = opt("drop", "exact duplicates with one label: keep one (drop) or keep all in one group",
                          choices=("drop", "group"))
    conflicts: str = opt("drop", "duplicates under different labels: drop all copies, or keep them",
                         choices=("drop", "keep"))
    # Thumbnail correlation at or above which two images count as one. Measured: a half-size
    # JPEG-q70 copy of a dev-set knee scores 0.99998; the closest two distinct dev-set knees 0.988.
    near_duplicate_corr: float = opt(0.995, "thumbnail correlation at which two images count as one")


@dataclass
class Item:
    key: str
    uri: str
    label: str
    patient: str
    t_score: float | None = None
    age: float | None = None
    sex: str | None = None
    pixel_hash: str | None = None
    thumb: np.ndarray | None = None
    error_code: str | None = None


# ---------------------------------------------------------------------------------------------
# loading


def to_float(value) -> float | None:
    try:
        v = float(value)
        return None if np.isnan(v) else v
    except (TypeError, ValueError):
        return None


def load_collection(source: str, images_root: str | None = None, store: Store | None = None) -> list[Item]:
    """Items of a labelled collection.

    Args:
        source: a folder-per-class tree (``normal/``, ``osteopenia/``, ``osteoporosis/``), a folder
            or prefix holding ``labels.csv``, or a labels CSV/Parquet file (local or s3://) with a
            ``key`` or ``path`` column and a ``label`` or ``t_score`` column.
        images_root: where keys are relative to (default: beside the labels file, or its
            ``images/`` folder when that exists).

    Raises:
        KneescreenError: when no labels can be found or a label is not a known class.
    """
    store = store or Store.resolve()
    labels_uri = None
    if source.endswith((".csv", ".parquet")):
        labels_uri = source
    elif store.exists(join(source, "labels.csv")):
        labels_uri = join(source, "labels.csv")
    if labels_uri is None:
        return _load_class_folders(source)
    base = labels_uri.rsplit("/", 1)[0] if is_s3(labels_uri) else str(pathlib.Path(labels_uri).parent)
    rows = store.read_table(labels_uri)
    if not rows:
        raise KneescreenError(f"{labels_uri} has no rows")
    key_col = "key" if "key" in rows[0] else "path" if "path" in rows[0] else None
    if key_col is None:
        raise KneescreenError(f"{labels_uri}: needs a 'key' or 'path' column; has {sorted(rows[0])}")
    if images_root is None:
        images_root = base
        first = str(rows[0][key_col])
        if not store.exists(join(base, first)) and store.exists(join(base, "images", first)):
            images_root = join(base, "images")
    patient_col = next((c for c in _PATIENT_COLUMNS if c in rows[0]), None)
    items = []
    for i, row in enumerate(rows):
        key = str(row[key_col])
        t = to_float(row.get("t_score"))
        try:
            label = normalise_label(row["label"]) if row.get("label") not in (None, "") else t_score_to_class(t)
        except ValueError as exc:
            raise KneescreenError(f"{labels_uri} row {i + 2} ({key}): {exc}") from None
        items.append(Item(
            key=key, uri=join(images_root, key), label=label,
            patient=str(row[patient_col]) if patient_col and row.get(patient_col) else "",
            t_score=t, age=to_float(row.get("age")), sex=(row.get("sex") or None),
        ))
    return items


def _load_class_folders(source: str) -> list[Item]:
    root = pathlib.Path(source)
    if not root.is_dir():
        raise KneescreenError(f"{source!r}: not a folder, labels file or folder with labels.csv")
    items = []
    for cls in CLASSES:
        for path in sorted((root / cls).glob("*")) if (root / cls).is_dir() else []:
            if path.is_file() and path.suffix.lower() in _IMAGE_EXT:
                items.append(Item(key=f"{cls}/{path.name}", uri=str(path), label=cls, patient=""))
    if not items:
        raise KneescreenError(f"{source!r}: no labels.csv and no {'/'.join(CLASSES)} sub-folders with images")
    return items


# ---------------------------------------------------------------------------------------------
# fingerprints


def thumbnail(image: np.ndarray, side: int = 32) -> np.ndarray:
    """Zero-mean, unit-norm ``side`` x ``side`` thumbnail: a dot product of two is their Pearson
    correlation, which survives resizing, re-compression and window changes."""
    from PIL import Image

    t = np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR),
                   dtype=np.float32).ravel()
    t = t - t.mean()
    return (t / (np.linalg.norm(t) + 1e-9)).astype(np.float32)


def _fingerprint(args: tuple[str, Store]) -> tuple[str | None, np.ndarray | None, str | None, str | None]:
    uri, store = args
    try:
        rg = read_radiograph(store.read_bytes(uri))
    except DecodeError as exc:
        return None, None, exc.error_code, None
    except OSError:
        return None, None, "read_failed", None
    return rg.pixel_hash, thumbnail(rg.image), None, rg.meta.patient_id


def fingerprint(items: list[Item], store: Store, workers: int = 0) -> None:
    """Fill ``pixel_hash`` / ``thumb`` (or ``error_code``) on every item, in place."""
    workers = workers or (os.cpu_count() or 1)
    jobs = [(it.uri, store) for it in items]
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_fingerprint, jobs, chunksize=4))
    else:
        results = [_fingerprint(j) for j in jobs]
    key = None
    for it, (ph, dh, err, raw_patient) in zip(items, results):
        it.pixel_hash, it.thumb, it.error_code = ph, dh, err
        if not it.patient and raw_patient:
            key = key or pseudonym_key(required=False)
            it.patient = pseudonymise(raw_patient, key)  # from the DICOM header; never kept raw


def _near_duplicate_pairs(thumbs: list[np.ndarray], min_corr: float, chunk: int = 2048) -> list[tuple[int, int]]:
    """Index pairs whose thumbnails correlate at or above ``min_corr`` (chunked Gram matrix:
    10,000 images cost about 1e11 flops, seconds with BLAS)."""
    if len(thumbs) < 2:
        return []
    mat = np.stack(thumbs)
    pairs = []
    for start in range(0, len(mat), chunk):
        sims = mat[start : start + chunk] @ mat.T
        ii, jj = np.nonzero(sims >= min_corr)
        pairs += [(int(i) + start, int(j)) for i, j in zip(ii, jj) if int(i) + start < int(j)]
    return pairs


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# ---------------------------------------------------------------------------------------------
# splitting


def _assign(groups: list[list[int]], labels: list[int], targets: list[float], seed: int) -> list[int]:
    """Greedy stratified group assignment: biggest groups first, each to the bin whose classes
    are least filled relative to that bin's target share."""
    rng = np.random.default_rng(seed)
    k, n_cls = len(targets), len(CLASSES)
    totals = np.bincount(labels, minlength=n_cls).astype(float) + 1e-9
    alloc = np.zeros((k, n_cls))
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), rng.random()))
    out = [0] * len(groups)
    for g in order:
        counts = np.bincount([labels[i] for i in groups[g]], minlength=n_cls).astype(float)
        fill = [(((alloc[j] + counts) / (targets[j] * totals)) * counts).sum() / counts.sum() for j in range(k)]
        j = int(np.argmin(np.array(fill) + rng.random(k) * 1e-9))
        alloc[j] += counts
        out[g] = j
    return out


def _dedupe(ok: list[Item], cfg: SplitConfig) -> tuple[list[Item], list[dict], list[dict], dict]:
    """Exact duplicates (same pixel hash): keep one, group them, or drop label conflicts.

    Returns:
        (kept items sorted by key, duplicate rows, dropped rows, items by pixel hash)
    """
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for it in ok:
        by_hash[it.pixel_hash].append(it)
    dup_rows, dropped, keep = [], [], []
    for h, members in by_hash.items():
        if len(members) > 1:
            kind = "conflict" if len({m.label for m in members}) > 1 else "duplicate"
            dup_rows += [{"pixel_hash": h, "kind": kind, "key": m.key, "label": m.label} for m in members]
            if kind == "conflict" and cfg.conflicts == "drop":
                dropped += [{"key": m.key, "reason": "label_conflict"} for m in members]
                continue
            if kind == "duplicate" and cfg.duplicates == "drop":
                members = sorted(members, key=lambda m: m.key)
                dropped += [{"key": m.key, "reason": "exact_duplicate"} for m in members[1:]]
                members = members[:1]
        keep += members
    keep.sort(key=lambda m: m.key)
    return keep, dup_rows, dropped, by_hash


def _groups(keep: list[Item], min_corr: float) -> tuple[list[list[int]], int, int]:
    """Connected components over patient, pixel hash and near-duplicate links.

    Returns:
        (groups of indices into ``keep``, near-duplicate pairs, of which with different labels)
    """
    uf = _UnionFind(len(keep))
    first_by: dict[tuple[str, str], int] = {}
    for i, it in enumerate(keep):
        for attr in ("patient", "pixel_hash"):
            v = getattr(it, attr)
            if v:
                uf.union(i, first_by.setdefault((attr, v), i))
    near = _near_duplicate_pairs([it.thumb for it in keep], min_corr)
    for a, b in near:
        uf.union(a, b)
    comp: dict[int, list[int]] = defaultdict(list)
    for i in range(len(keep)):
        comp[uf.find(i)].append(i)
    return list(comp.values()), len(near), sum(keep[a].label != keep[b].label for a, b in near)


def make_split(items: list[Item], cfg: SplitConfig = SplitConfig()) -> tuple[list[dict], dict]:
    """Dedupe and split fingerprinted items.

    Returns:
        (rows, audit): one row per kept item with ``split`` (train/val/test), ``fold`` and
        ``group``; the audit dict with duplicate groups, dropped items and the leakage check.

    Raises:
        KneescreenError: validation and test fractions that leave no training share.
    """
    train_frac = 1 - cfg.val_fraction - cfg.test_fraction
    if train_frac <= 0:
        raise KneescreenError("val_fraction + test_fraction must be below 1")
    errors = [{"key": it.key, "error_code": it.error_code} for it in items if it.error_code]
    keep, dup_rows, dropped, by_hash = _dedupe([it for it in items if it.error_code is None], cfg)
    groups, n_near, near_conflicts = _groups(keep, cfg.near_duplicate_corr)
    labels = [CLASSES.index(it.label) for it in keep]
    split_of_group = _assign(groups, labels, [train_frac, cfg.val_fraction, cfg.test_fraction], cfg.seed)
    fold_of_group = _assign(groups, labels, [1 / cfg.folds] * cfg.folds, cfg.seed + 1)
    rows = []
    for g, members in enumerate(groups):
        for i in members:
            it = keep[i]
            rows.append({
                "key": it.key, "uri": it.uri, "label": it.label, "patient": it.patient or f"img:{it.key}",
                "t_score": it.t_score, "age": it.age, "sex": it.sex, "pixel_hash": it.pixel_hash, "group": g,
                "split": ("train", "val", "test")[split_of_group[g]], "fold": fold_of_group[g],
            })
    rows.sort(key=lambda r: r["key"])
    audit = audit_split(rows)
    audit["summary"].update({
        "input_items": len(items), "decode_errors": len(errors), "kept": len(rows),
        "dropped": len(dropped), "exact_duplicate_groups": sum(1 for v in by_hash.values() if len(v) > 1),
        "label_conflict_groups": sum(1 for v in by_hash.values() if len({m.label for m in v}) > 1),
        "near_duplicate_pairs": n_near, "near_duplicate_pairs_with_different_labels": near_conflicts,
        "patients_from_labels": any(it.patient for it in items),
    })
    audit.update(config=asdict(cfg), dropped=dropped, decode_errors=errors, duplicates=dup_rows)
    return rows, audit


def audit_split(rows: list[dict]) -> dict:
    """Prove that no patient, pixel hash or near-duplicate group appears in two splits/folds."""
    leaks: list[dict] = []
    for part in ("split", "fold"):
        for attr in ("patient", "pixel_hash", "group"):
            seen: dict[str, set] = defaultdict(set)
            for r in rows:
                seen[r[attr]].add(r[part])
            crossing = {k: sorted(map(str, v)) for k, v in seen.items() if len(v) > 1}
            leaks += [{"by": part, "attribute": attr, "value": k, "in": v} for k, v in crossing.items()]
    counts = {
        s: dict(Counter(r["label"] for r in rows if r["split"] == s)) for s in ("train", "val", "test")
    }
    folds = {
        str(f): dict(Counter(r["label"] for r in rows if r["fold"] == f)) for f in sorted({r["fold"] for r in rows})
    }
    return {"summary": {"leaks": len(leaks), "split_class_counts": counts, "fold_class_counts": folds},
            "leaks": leaks}


def run_split(source: str, out_dir: str, cfg: SplitConfig = SplitConfig(), images_root: str | None = None,
              store: Store | None = None) -> dict:
    """Load, fingerprint, split and write ``split.csv``, ``duplicates.csv`` and ``audit.json``."""
    store = store or Store.resolve()
    items = load_collection(source, images_root=images_root, store=store)
    _logger.info("fingerprinting %d images from %s", len(items), source)
    fingerprint(items, store)
    rows, audit = make_split(items, cfg)
    write_split(store, out_dir, rows, audit)
    _logger.info("split written to %s: %s", out_dir, json.dumps(audit["summary"]["split_class_counts"]))
    return audit


def write_split(store: Store, out_dir: str, rows: list[dict], audit: dict) -> None:
    store.write_csv(join(out_dir, "split.csv"), rows)
    store.write_csv(join(out_dir, "duplicates.csv"), audit["duplicates"], ["pixel_hash", "kind", "key", "label"])
    store.write_bytes(join(out_dir, "audit.json"), json.dumps(audit, indent=2).encode())


def load_split(path: str, store: Store | None = None) -> list[dict]:
    """Rows of a ``split.csv`` written by `run_split`, with numeric fields parsed."""
    store = store or Store.resolve()
    rows = store.read_table(path if path.endswith(".csv") else join(path, "split.csv"))
    for r in rows:
        r["fold"] = int(r["fold"])
        r["group"] = int(r["group"])
        for k in ("t_score", "age"):
            r[k] = to_float(r.get(k))
        r["sex"] = r.get("sex") or None
    return rows
