"""Split rows -> decoded, letterboxed arrays for training and evaluation.

Decoding runs as Ray Data tasks through the shared `decode_batch` (the screening decoder), so
training reads through the same `Store` (S3 endpoint included) and the same reader policies.
Rows that cannot be used are left out and their error codes logged (`ok_rows`).
"""

from __future__ import annotations

import numpy as np
import ray

from kneescreen.data.decode import DecodeSpec, decode_batch, ok_rows
from kneescreen.data.preprocess import blank_input, is_input_key, parse_input_key
from kneescreen.io.store import Store
from kneescreen.labels import CLASSES

_KEEP = ("key", "label", "row_age", "row_sex", "row_t", "split", "fold", "status", "error_code")


def _decode_for_training(batch: dict, spec: DecodeSpec) -> dict:
    out = decode_batch(batch, spec)
    # Only what training needs, with fixed kinds (no all-null columns in some blocks).
    kept = {k: out[k] for k in _KEEP}
    kept["error_code"] = np.asarray([c or "" for c in out["error_code"]], dtype=object)
    kept.update({k: v for k, v in out.items() if is_input_key(k)})
    return kept


def load_arrays(rows: list[dict], inputs, store: Store) -> dict:
    """Decode split rows with Ray Data tasks.

    Args:
        rows: split rows (`kneescreen.data.datasets.load_split`).
        inputs: member input keys (``img_160``, ``roi_128``, ...; a bare int is ``img_<int>``).
        store: where the images live.

    Returns:
        ``label``, ``key``, ``split``, ``fold`` arrays, ``age``/``sex``/``t_score`` lists (from the labels,
        not the headers) and ``images``: input key -> uint8 array, sorted by key. Films whose
        knee joint is not found are left out (logged) when a native view is asked for.
    """
    keys = sorted({f"img_{k}" if isinstance(k, (int, np.integer)) else k for k in inputs})
    sizes = tuple(parse_input_key(k)[1] for k in keys if k.startswith("img_"))
    items = [{"uri": r["uri"], "key": r["key"], "label": CLASSES.index(r["label"]),
              "row_age": np.nan if r.get("age") is None else float(r["age"]), "row_sex": r.get("sex") or "",
              "row_t": np.nan if r.get("t_score") is None else float(r["t_score"]),
              "split": r["split"], "fold": int(r["fold"])} for r in rows]
    spec = DecodeSpec(store=store, sizes=sizes, views=tuple(k for k in keys if not k.startswith("img_")),
                      root=None, body_part_policy="keep")
    ds = ray.data.from_items(items).map_batches(_decode_for_training, fn_kwargs={"spec": spec}, batch_size=8)
    got = sorted(ok_rows(ds.take_all(), "training data"), key=lambda g: g["key"])
    arrays = {k: np.asarray([g[k] for g in got]) for k in ("label", "split", "fold", "key")}
    arrays["age"] = [None if np.isnan(g["row_age"]) else float(g["row_age"]) for g in got]
    arrays["sex"] = [g["row_sex"] or None for g in got]
    arrays["t_score"] = [None if np.isnan(g["row_t"]) else float(g["row_t"]) for g in got]
    arrays["images"] = {k: np.stack([g[k] for g in got]) if got else blank_input(k, 0) for k in keys}
    return arrays


def subset(arrays: dict, mask: np.ndarray) -> dict:
    """The rows of ``arrays`` where ``mask`` holds (label, key, age, sex, images)."""
    idx = np.nonzero(mask)[0]
    return {
        "label": arrays["label"][idx], "key": arrays["key"][idx],
        "age": [arrays["age"][i] for i in idx], "sex": [arrays["sex"][i] for i in idx],
        "t_score": [arrays["t_score"][i] for i in idx] if "t_score" in arrays else [None] * len(idx),
        "images": {s: v[idx] for s, v in arrays["images"].items()},
    }
