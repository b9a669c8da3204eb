"""Labelled collections -> fingerprinted, de-duplicated, leakage-free splits.

Why so careful: the public knee-osteoporosis sets behind the published 84-93% accuracies hold
exact and near duplicates, some under two labels; a random image-level split then puts the same
knee in train and test. Here every image gets two fingerprints (the decoded pixel hash, so a
re-encoding collides, and a 32x32 thumbnail for resized or re-compressed copies), and the unit of
splitting is the connected component of (patient, pixel hash, near-duplicate pair). The audit
written next to the split proves, from the written file, that no patient and no fingerprint
crosses splits.

Scale: `run_split` has two engines with one result. Up to `SplitConfig.local_max_images` images
(20,000) it runs in process (`data.split_local`: a process pool, all pairs compared; seconds, driver
memory ~25 KB per image, 666 MB at 20,000). Above, it runs as Ray Data stages
(`data.split_stages`) with bounded driver memory: the labels stream into scratch Parquet chunks,
fingerprints are Ray tasks writing scratch Parquet, duplicates and near duplicates
(locality-sensitive hashing, `data.fingerprints`) are found by groupby/map_groups, and the driver
holds only what grows with the duplicates (duplicate rows, near pairs, the union-find over them,
decode errors) plus one batch per file it merges. Both share the duplicate policy, union-find,
assignment order and rule, writer and audit, so a seed gives the same split.csv on either.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from kneescreen.config import opt
from kneescreen.data import link_output
from kneescreen.data import split_local as local
from kneescreen.data import split_stages as st
from kneescreen.data.fingerprints import ITEM_SCHEMA, thumbnail  # noqa: F401  (thumbnail: public helper)
from kneescreen.errors import KneescreenError
from kneescreen.io.privacy import pseudonym_key
from kneescreen.io.store import Store, is_s3, join
from kneescreen.labels import CLASSES, normalise_label, t_score_to_class

_logger = logging.getLogger(__name__)
_IMAGE_EXT = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", "")
_PATIENT_COLUMNS = ("patient_ref", "patient_id", "patient", "subject_id")
ITEM_CHUNK = 5000  # labels rows per scratch Parquet chunk: the driver holds one chunk at a time


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
    # 20 x 20: a pair at 0.995 is missed with probability 4e-7 (data.fingerprints has the numbers).
    near_duplicate_bands: int = opt(20, "LSH bands for the near-duplicate search (more: fewer misses, more work)")
    near_duplicate_bits: int = opt(20, "LSH sign bits per band, 1..32 (more: fewer candidate pairs, more misses)")
    # auto: in process up to local_max_images, Ray Data above. The in-process engine takes seconds
    # but its driver grows ~25 KB per image (666 MB at 20,000, bench/split_rss.py); the Ray engine
    # stays near 400 MB at any size but pays minutes of Ray start-up and shuffles.
    engine: str = opt("auto", "split engine: local (in process), ray (Ray Data stages, bounded driver "
                      "memory) or auto (local up to --local-max-images images)", choices=("auto", "local", "ray"))
    local_max_images: int = opt(20000, "largest collection the auto engine splits in process")


@dataclass
class Item:
    key: str
    uri: str
    label: str
    patient: str
    t_score: float | None = None
    age: float | None = None
    sex: str | None = None


# ---------------------------------------------------------------------------------------------
# loading


def to_float(value) -> float | None:
    try:
        v = float(value)
        return None if np.isnan(v) else v
    except (TypeError, ValueError):
        return None


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


def choose_engine(cfg: "SplitConfig", batches: Iterator[list[Item]]) -> tuple[str, Iterator[list[Item]]]:
    """The engine for a collection and its item batches (the ones read to decide, then the rest).

    ``auto`` reads batches until the collection proves larger than ``local_max_images`` (the
    driver then holds at most that many items) and picks ``ray`` if it does, else ``local``.
    """
    if cfg.engine == "ray":
        return "ray", batches
    held, n = [], 0
    for batch in batches:
        held.append(batch)
        n += len(batch)
        if cfg.engine == "auto" and n > cfg.local_max_images:
            return "ray", itertools.chain(held, batches)
    return "local", iter(held)


def _write_item_chunks(store: Store, batches: Iterator[list[Item]], scratch: str) -> tuple[list[str], int, bool]:
    """The collection as scratch Parquet chunks; returns (chunk URIs, items, any patient from labels)."""
    uris, n, patients = [], 0, False
    for batch in batches:
        rows = [asdict(it) for it in batch]
        patients = patients or any(it.patient for it in batch)
        uri = join(scratch, "items", f"part-{len(uris):05d}.parquet")
        store.write_parquet(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), uri)
        uris.append(uri)
        n += len(rows)
    return uris, n, patients


# ---------------------------------------------------------------------------------------------
# splitting


def _dedupe(dup_rows: list[dict]) -> tuple[frozenset, list[dict], list[tuple[str, str]], dict]:
    """From the shared-hash rows: (dropped keys, dropped rows, hash edges between kept units, counts)."""
    dropped = [{"key": r["key"], "reason": r["action"]} for r in dup_rows if r["action"] != "keep"]
    edges, first_unit, kinds = [], {}, {}
    for r in dup_rows:
        kinds[r["pixel_hash"]] = r["kind"]
        if r["action"] == "keep":
            first = first_unit.setdefault(r["pixel_hash"], r["unit"])
            if first != r["unit"]:
                edges.append((first, r["unit"]))
    counts = {"exact_duplicate_groups": len(kinds),
              "label_conflict_groups": sum(k == "conflict" for k in kinds.values())}
    return frozenset(d["key"] for d in dropped), sorted(dropped, key=lambda d: d["key"]), edges, counts


def _components(hash_edges: list[tuple[str, str]], near: list[dict]) -> dict[str, str]:
    """unit -> group root, for units tied to another by a kept exact duplicate or a near pair."""
    uf = st.UnionFind()
    for a, b in hash_edges:
        uf.union(a, b)
    for p in near:
        if p["unit_a"] != p["unit_b"]:
            uf.union(p["unit_a"], p["unit_b"])
    return uf.roots()


def run_split(source: str, out_dir: str, cfg: SplitConfig = SplitConfig(), images_root: str | None = None,
              store: Store | None = None) -> dict:
    """Load, fingerprint, split and write ``split.csv``, ``duplicates.csv`` and ``audit.json``.

    The engine (`SplitConfig.engine`; `choose_engine`): ``local`` in process (`data.split_local`),
    ``ray`` as Ray Data stages with bounded driver memory (`data.split_stages`; scratch files under
    ``<out_dir>/_scratch``, removed at the end); ``auto`` local up to ``local_max_images`` images.
    Both write the same files for the same seed. The one way they can differ: the Ray engine finds
    near duplicates by LSH, which misses a pair at exactly the threshold with probability ~4e-7
    (`data.fingerprints`), where the local engine compares all pairs.

    Returns:
        The audit: ``summary`` (leaks, class counts per split and fold, duplicate counts),
        ``leaks``, ``dropped``, ``decode_errors``, ``duplicates`` and ``config``.

    Raises:
        KneescreenError: no labels, an unknown label, or fractions that leave no training share.
    """
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise KneescreenError("val_fraction + test_fraction must be below 1")
    store = store or Store.resolve()
    engine, batches = choose_engine(cfg, iter_collection(source, images_root, store))
    _logger.info("splitting %s with the %s engine", source, engine)
    audit = (_split_local if engine == "local" else _split_ray)(store, batches, out_dir, cfg)
    audit["config"] = asdict(cfg)
    write_audit(store, out_dir, audit)
    _logger.info("split written to %s: %s", out_dir, json.dumps(audit["summary"]["split_class_counts"]))
    return audit


def _targets(cfg: SplitConfig) -> list[float]:
    return [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]


def _split_local(store: Store, batches: Iterator[list[Item]], out_dir: str, cfg: SplitConfig) -> dict:
    items = [it for batch in batches for it in batch]
    _logger.info("fingerprinting %d images in process", len(items))
    table = pa.Table.from_pylist([asdict(it) for it in items], schema=ITEM_SCHEMA)
    fp = local.fingerprint_table(table, store, pseudonym_key(required=False))
    errors = sorted(({"key": k, "error_code": e} for k, e in zip(fp.column("key").to_pylist(),
                     fp.column("error_code").to_pylist()) if e), key=lambda e: e["key"])
    dup_rows = local.find_exact_duplicates(fp, cfg.duplicates, cfg.conflicts)
    dropped_keys, dropped, hash_edges, dup_counts = _dedupe(dup_rows)
    near = local.find_near_pairs(fp, dropped_keys, cfg.near_duplicate_corr)
    rows = local.assign(fp, dropped_keys, _components(hash_edges, near), _targets(cfg), cfg.folds, cfg.seed)
    st.write_split_rows(store, join(out_dir, "split.csv"), rows)
    audit = audit_split(rows)
    return _summarise(audit, len(items), errors, dropped, dup_counts, dup_rows, near, any(it.patient for it in items))


def _split_ray(store: Store, batches: Iterator[list[Item]], out_dir: str, cfg: SplitConfig) -> dict:
    from kneescreen._private.cluster import ensure_ray

    scratch = join(out_dir, "_scratch")
    store.delete_prefix(scratch)
    chunks, n_items, patients_from_labels = _write_item_chunks(store, batches, scratch)
    ensure_ray()
    _logger.info("fingerprinting %d images in Ray tasks", n_items)
    st.fingerprint_collection(store, chunks, join(scratch, "fingerprints"), pseudonym_key(required=False))
    fp = st.read_fingerprints(store, join(scratch, "fingerprints"))
    errors, ok_counts = st.scan_fingerprints(store, join(scratch, "fingerprints"))
    dup_rows = st.find_exact_duplicates(fp, st.partitions(sum(ok_counts.values())), cfg.duplicates, cfg.conflicts)
    dropped_keys, dropped, hash_edges, dup_counts = _dedupe(dup_rows)
    kept = sum(ok_counts.values()) - len(dropped)
    near = st.find_near_pairs(fp, dropped_keys, kept, cfg.near_duplicate_corr,
                              cfg.near_duplicate_bands, cfg.near_duplicate_bits)
    roots = _components(hash_edges, near)
    group_uris, totals = st.write_groups(fp, dropped_keys, roots, kept, join(scratch, "groups"), store, cfg.seed)
    chunk_uris = st.assign_groups(store, group_uris, totals, join(scratch, "assigned"), _targets(cfg),
                                  cfg.folds, cfg.seed)
    rows = st.write_split_csv(store, join(out_dir, "split.csv"), chunk_uris)
    audit = audit_written_split(store, join(out_dir, "split.csv"), rows)
    store.delete_prefix(scratch)
    return _summarise(audit, n_items, errors, dropped, dup_counts, dup_rows, near, patients_from_labels)


def _summarise(audit: dict, n_items: int, errors: list[dict], dropped: list[dict], dup_counts: dict,
               dup_rows: list[dict], near: list[dict], patients_from_labels: bool) -> dict:
    """The audit of a written split plus what the engine found on the way (the same for both)."""
    kept = sum(sum(c.values()) for c in audit["summary"]["split_class_counts"].values())
    audit["summary"].update({
        "input_items": n_items, "decode_errors": len(errors), "kept": kept, "dropped": len(dropped), **dup_counts,
        "near_duplicate_pairs": len(near),
        "near_duplicate_pairs_with_different_labels": sum(p["label_a"] != p["label_b"] for p in near),
        "patients_from_labels": patients_from_labels,
    })
    audit.update(dropped=dropped, decode_errors=errors,
                 duplicates=[{k: r[k] for k in ("pixel_hash", "kind", "key", "label")} for r in dup_rows])
    return audit


def audit_written_split(store: Store, split_uri: str, rows: int) -> dict:
    """`audit_split` of a written ``split.csv``, with bounded driver memory: leaks by Ray tasks
    (grouped by attribute value), class counts streamed in record batches."""
    leaks = st.find_leaks(store, split_uri, rows)
    splits, folds = st.class_counts(store, split_uri)
    return {"summary": {"leaks": len(leaks), "split_class_counts": splits, "fold_class_counts": folds},
            "leaks": leaks}


def audit_split(rows: list[dict]) -> dict:
    """Prove that no patient, pixel hash or near-duplicate group appears in two splits/folds
    (in memory, for a list of rows; `audit_written_split` does the same for a written split)."""
    table = pa.Table.from_pylist([{a: r[a] for a in (*st.AUDITED, "split", "fold")} for r in rows]) if rows else None
    leaks = st.leak_rows(st.audit_rows(table)).to_pylist() if table is not None else []
    leaks.sort(key=lambda r: (r["by"], r["attribute"], r["value"]))  # as `st.find_leaks` orders them
    counts = {s: {} for s in ("train", "val", "test")}
    folds: dict[str, dict] = {}
    for r in rows:
        counts[r["split"]][r["label"]] = counts[r["split"]].get(r["label"], 0) + 1
        f = folds.setdefault(str(r["fold"]), {})
        f[r["label"]] = f.get(r["label"], 0) + 1
    return {"summary": {"leaks": len(leaks), "split_class_counts": counts,
                        "fold_class_counts": dict(sorted(folds.items(), key=lambda kv: int(kv[0])))},
            "leaks": leaks}


def write_audit(store: Store, out_dir: str, audit: dict) -> None:
    """``duplicates.csv`` and ``audit.json`` beside the split."""
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
