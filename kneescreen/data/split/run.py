"""Labelled collections -> fingerprinted, de-duplicated, leakage-free splits: `run_split` writes
them, `load_split` reads them back; `SplitConfig` is the policy.

Why so careful: the public knee-osteoporosis sets behind the published 84-93% accuracies hold
exact and near duplicates, some under two labels; a random image-level split then puts the same
knee in train and test. Here every image gets two fingerprints (the decoded pixel hash, so a
re-encoding collides, and a 32x32 thumbnail for resized or re-compressed copies), and the unit of
splitting is the connected component of (patient, pixel hash, near-duplicate pair). The audit
written next to the split proves, from the written file, that no patient and no fingerprint
crosses splits.

Scale: `run_split` has two engines with one interface (`engine.Engine`) and one result. Up to
`SplitConfig.local_max_images` images (20,000) it runs in process (`engine_local`: a process pool,
all pairs compared; seconds, driver memory ~25 KB per image, 666 MB at 20,000). Above, it runs as
Ray Data stages (`engine_ray`) with bounded driver memory: the labels stream into scratch Parquet
chunks, fingerprints are Ray tasks writing scratch Parquet, duplicates and near duplicates
(locality-sensitive hashing, `data.fingerprints`) are found by groupby/map_groups, and the driver
holds only what grows with the duplicates (duplicate rows, near pairs, the union-find over them,
decode errors) plus one batch per file it merges. Both share the duplicate policy
(`components.dedupe`), union-find, assignment order and rule (`assign`), writer and audit, so a
seed gives the same split.csv on either.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from kneescreen.config import opt
from kneescreen.data.split import engine_local, engine_ray
from kneescreen.data.split.collection import Item, iter_collection
from kneescreen.data.split.components import components, dedupe
from kneescreen.data.split.engine import Engine, Fingerprints
from kneescreen.data.split.writer import write_audit
from kneescreen.errors import KneescreenError
from kneescreen.fileio.privacy import pseudonym_key
from kneescreen.fileio.store import Store, join
from kneescreen.labels import to_float

_logger = logging.getLogger(__name__)
ENGINES: dict[str, Engine] = {"local": engine_local, "ray": engine_ray}


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


def choose_engine(cfg: SplitConfig, batches: Iterator[list[Item]]) -> tuple[str, Iterator[list[Item]]]:
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


def run_split(source: str, out_dir: str, cfg: SplitConfig = SplitConfig(), images_root: str | None = None,
              store: Store | None = None) -> dict:
    """Load, fingerprint, split and write ``split.csv``, ``duplicates.csv`` and ``audit.json``.

    The engine (`SplitConfig.engine`; `choose_engine`): ``local`` in process (`engine_local`),
    ``ray`` as Ray Data stages with bounded driver memory (`engine_ray`; scratch files under
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
    audit = _split(ENGINES[engine], store, batches, out_dir, cfg)
    audit["config"] = asdict(cfg)
    write_audit(store, out_dir, audit)
    _logger.info("split written to %s: %s", out_dir, json.dumps(audit["summary"]["split_class_counts"]))
    return audit


def _split(engine: Engine, store: Store, batches: Iterator[list[Item]], out_dir: str, cfg: SplitConfig) -> dict:
    """The steps of a split, on either engine: fingerprint, exact duplicates under the policy,
    near pairs among the kept images, components, then assign, write and audit."""
    fp = engine.fingerprint(store, batches, join(out_dir, "_scratch"), pseudonym_key(required=False))
    dup_rows = engine.find_exact_duplicates(fp, cfg.duplicates, cfg.conflicts)
    dropped_keys, dropped, hash_edges, dup_counts = dedupe(dup_rows)
    near = engine.find_near_pairs(fp, dropped_keys, cfg.near_duplicate_corr, cfg.near_duplicate_bands,
                                  cfg.near_duplicate_bits)
    targets = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]
    audit = engine.write_split(fp, dropped_keys, components(hash_edges, near), join(out_dir, "split.csv"),
                               targets, cfg.folds, cfg.seed)
    return _summarise(audit, fp, dropped, dup_counts, dup_rows, near)


def _summarise(audit: dict, fp: Fingerprints, dropped: list[dict], dup_counts: dict, dup_rows: list[dict],
               near: list[dict]) -> dict:
    """The audit of a written split plus what the engine found on the way (the same for both)."""
    kept = sum(sum(c.values()) for c in audit["summary"]["split_class_counts"].values())
    audit["summary"].update({
        "input_items": fp.items, "decode_errors": len(fp.errors), "kept": kept, "dropped": len(dropped), **dup_counts,
        "near_duplicate_pairs": len(near),
        "near_duplicate_pairs_with_different_labels": sum(p["label_a"] != p["label_b"] for p in near),
        "patients_from_labels": fp.patients_from_labels,
    })
    audit.update(dropped=dropped, decode_errors=fp.errors,
                 duplicates=[{k: r[k] for k in ("pixel_hash", "kind", "key", "label")} for r in dup_rows])
    return audit


def load_split(path: str, store: Store | None = None) -> list[dict]:
    """Rows of a ``split.csv`` written by `run_split`, with numeric fields parsed.

    Args:
        path: the ``split.csv`` file or the folder holding it (local or s3://).
    """
    store = store or Store.resolve()
    rows = store.read_table(path if path.endswith(".csv") else join(path, "split.csv"))
    for r in rows:
        r["fold"] = int(r["fold"])
        r["group"] = int(r["group"])
        for k in ("t_score", "age"):
            r[k] = to_float(r.get(k))
        r["sex"] = r.get("sex") or None
    return rows
