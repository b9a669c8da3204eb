"""The interface both split engines implement, as module functions of the same names and
signatures (`engine_local`: in process; `engine_ray`: Ray Data stages), and the handle they pass.

`run.run_split` drives either one the same way::

    fp = engine.fingerprint(store, batches, scratch, key)             -> Fingerprints
    dup_rows = engine.find_exact_duplicates(fp, duplicates, conflicts) -> shared-hash rows, sorted
    (dropped, edges = components.dedupe(dup_rows))
    near = engine.find_near_pairs(fp, dropped, min_corr, bands, bits) -> pair rows
    (roots = components.components(edges, near))
    audit = engine.write_split(fp, dropped, roots, split_uri, targets, folds, seed)

tests/test_split.py checks that both modules match `Engine`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from kneescreen.data.split.collection import Item
from kneescreen.fileio.store import Store


@dataclass
class Fingerprints:
    """What `Engine.fingerprint` found, and where the engine keeps the rows."""

    store: Store
    scratch: str  # the engine's scratch prefix (the Ray engine's Parquet files; removed by write_split)
    rows: Any  # `fingerprints.FINGERPRINT_SCHEMA` rows: a pa.Table (local) or a ray.data.Dataset (ray)
    items: int  # labelled items read
    readable: int  # of which decoded (no error code)
    errors: list[dict]  # {key, error_code} of the others, sorted by key
    patients_from_labels: bool  # whether the labels named any patient


class Engine(Protocol):
    """The split engine interface (a module satisfies it by defining these functions)."""

    def fingerprint(self, store: Store, batches: Iterator[list[Item]], scratch: str, key: bytes) -> Fingerprints:
        """Fingerprint every item (`fingerprints.fingerprint_batch`); ``key`` pseudonymises
        DICOM patient ids."""

    def find_exact_duplicates(self, fp: Fingerprints, duplicates: str, conflicts: str) -> list[dict]:
        """Rows of images whose pixel hash is shared (`tables.exact_duplicate_rows` under the
        policy), sorted by (pixel_hash, key)."""

    def find_near_pairs(self, fp: Fingerprints, dropped: frozenset, min_corr: float, bands: int,
                        bits: int) -> list[dict]:
        """Pairs of kept images whose thumbnails correlate at ``min_corr`` or more
        (`fingerprints.PAIR_SCHEMA` rows, ``key_a`` < ``key_b``); ``bands`` x ``bits`` are the
        LSH parameters where the engine searches by LSH."""

    def write_split(self, fp: Fingerprints, dropped: frozenset, roots: dict, split_uri: str,
                    targets: list[float], folds: int, seed: int) -> dict:
        """Group, assign (`assign.assign_stream`) and write ``split_uri``; returns its audit
        (`audit.audit_split`'s form)."""
