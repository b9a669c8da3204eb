"""Split rows -> one decoded Ray Dataset in the object store, small per-row metadata on the driver.

    split.csv --one Ray task: Arrow columns (train.split_table), sorted by key, numbered ``row``,
      cut into ~128-row Arrow blocks--> from_arrow_refs (the split never reaches the driver;
      `load_training_data` takes row dicts from tests and benchmarks the same way)
      decode (Ray Data tasks: the screening decoder, `data.decode.decode_batch`)
      --materialize--> decoded blocks in the object store: images never reach the driver
      --select_columns(row, key, label, fold, ...)--> driver: `TrainingData.meta` (usable rows, NumPy
      columns: no per-row Python objects but the keys)
    TrainingData.where(mask) -> the same blocks, rows picked by number in Ray Data tasks, for:
      frozen members:  `map_model` (features, Ray Data tasks) -> the head fit in one Ray task
      fine-tuned ones: `TrainingData.dataset` -> TorchTrainer datasets (per-worker shards)
      scoring:         `bundle_logits` (Ray Data tasks) -> n x members x 3 logits to the driver

Decoding runs through the shared `decode_batch`, so training reads through the same `Store` (S3
endpoint included) and the same reader policies. Rows that cannot be used are left out and their
error codes logged (`usable_decoded_rows`). The driver holds O(rows) metadata and logits, never
images or features (docs/operations.md, "Training memory").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from kneescreen.data.decode import DecodeSpec, decode_batch, usable_decoded_rows
from kneescreen.data.preprocess import is_input_key, parse_input_key
from kneescreen.fileio.store import Store
from kneescreen.labels import CLASSES
from kneescreen.train.split_table import decode_inputs, load_split_table, rows_to_columns, split_columns, split_fingerprint

_KEEP = ("row", "key", "label", "row_age", "row_sex", "row_t", "split", "fold", "status", "error_code")
# Decoded rows per block: every later selection runs one task per block, so not Ray's default
# for from_items (~200 blocks whatever the size: 10-row blocks at 2,000 images).
BLOCK_ROWS = 128
# Rows per inference call in the feature and scoring tasks.
INFER_BATCH = 64


def _decode_for_training(batch: dict, spec: DecodeSpec) -> dict:
    out = decode_batch(batch, spec)
    # Only what training needs, with fixed kinds (no all-null columns in some blocks).
    kept = {k: out[k] for k in _KEEP}
    kept["error_code"] = np.asarray([c or "" for c in out["error_code"]], dtype=object)
    kept.update({k: v for k, v in out.items() if is_input_key(k)})
    return kept


def _pick(table: pa.Table, pick: ray.ObjectRef, columns: list[str]) -> pa.Table:
    """The rows of a block whose number ``pick`` (the ref of a bool array over all rows) marks."""
    keep = ray.get(pick)[table["row"].to_numpy()]
    return table.filter(pa.array(keep)).select(columns)


@dataclass(frozen=True)
class TrainingData:
    """Decoded rows: the blocks stay in the object store, the small per-row columns on the driver.

    Attributes:
        base: the materialized decoded dataset (every row, errors included, column ``row``
            numbering them).
        meta: NumPy columns of the usable rows of this selection, in key order (``data["label"]``
            reads them): ``row``, ``label``, ``key``, ``split``, ``fold``, ``age`` and ``t_score``
            (float, NaN where missing), ``sex`` (object, None where missing).
        inputs: the image columns (member input keys) the blocks carry.
        n_rows: rows in ``base`` (the length of a selection mask over row numbers).
    """

    base: ray.data.Dataset
    meta: dict
    inputs: tuple[str, ...]
    n_rows: int

    def __getitem__(self, name: str):
        return self.meta[name]

    def __len__(self) -> int:
        return len(self.meta["row"])

    def where(self, mask: np.ndarray) -> TrainingData:
        """The rows where ``mask`` (aligned with ``meta``) holds; lazy, nothing is read."""
        idx = np.nonzero(np.asarray(mask, bool))[0]
        meta = {k: v[idx] for k, v in self.meta.items()}
        return TrainingData(self.base, meta, self.inputs, self.n_rows)

    def dataset(self, columns: list[str]) -> ray.data.Dataset:
        """These rows as a lazy Ray Dataset of ``columns``, picked by row number in Ray Data tasks."""
        pick = np.zeros(self.n_rows, bool)
        pick[self.meta["row"]] = True
        return self.base.map_batches(_pick, batch_format="pyarrow", batch_size=None,
                                     fn_kwargs={"pick": ray.put(pick), "columns": list(columns)})

    @classmethod
    def from_arrays(cls, images: dict[str, np.ndarray], labels: np.ndarray) -> TrainingData:
        """In-memory images (input key -> uint8 array) and labels as training rows (benchmarks)."""
        n = len(labels)
        items = [{"row": i, "key": f"{i:08d}", "label": int(labels[i]), **{k: v[i] for k, v in images.items()}}
                 for i in range(n)]
        meta = {"row": np.arange(n), "key": np.asarray([it["key"] for it in items], object),
                "label": np.asarray(labels, int), "split": np.full(n, "train", object), "fold": np.zeros(n, int),
                "age": np.full(n, np.nan), "sex": np.full(n, None, object), "t_score": np.full(n, np.nan)}
        base = ray.data.from_items(items, override_num_blocks=_blocks(n)).materialize()
        return cls(base, meta, tuple(sorted(images)), n)


def _blocks(n: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 2))
    return max(1, min(n, max(2 * cpus, n // BLOCK_ROWS)))


def _meta(base: ray.data.Dataset) -> dict:
    """The usable rows' small columns, read back in record batches (no per-row dicts)."""
    parts: dict[str, list] = {k: [] for k in _KEEP}
    for batch in base.select_columns(list(_KEEP)).iter_batches(batch_format="numpy", batch_size=4096):
        for k in _KEEP:
            parts[k].append(batch[k])
    cols = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    order = np.argsort(cols["row"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    bad = cols["status"] != "ok"
    if bad.any():  # logged by code, as the screening decoder's rows would be
        bad_rows = [{"status": s, "error_code": e} for s, e in zip(cols["status"][bad], cols["error_code"][bad])]
        usable_decoded_rows(bad_rows, "training data")
    ok = ~bad
    sex = _shared_text(cols["row_sex"][ok])
    return {"row": cols["row"][ok].astype(np.int64), "key": cols["key"][ok].astype(object),
            "label": cols["label"][ok].astype(int), "split": _shared_text(cols["split"][ok]),
            "fold": cols["fold"][ok].astype(int), "age": cols["row_age"][ok].astype(float),
            "sex": np.where(sex == "", None, sex), "t_score": cols["row_t"][ok].astype(float)}


def _shared_text(values: np.ndarray) -> np.ndarray:
    """An object array of few distinct strings whose rows share one str object per value."""
    distinct, inverse = np.unique(values.astype(str), return_inverse=True)
    return distinct.astype(object)[inverse.reshape(-1)]


@ray.remote(num_cpus=1)
def _read_split(path: str, store: Store, splits: tuple[str, ...] | None):
    """In a Ray task: (the decoder's input table, {"n", "folds", "fingerprint"}); options(num_returns=2)."""
    table = load_split_table(path, store, splits)
    cols = split_columns(table)
    info = {"n": table.num_rows, "folds": int(cols["fold"].max()) + 1 if table.num_rows else 0,
            "fingerprint": split_fingerprint(table)}
    return decode_inputs(cols), info


@ray.remote(num_cpus=1)
def _cut(table: pa.Table, n_blocks: int) -> tuple:
    """In a Ray task: the table in ``n_blocks`` consecutive slices, sized as `ray.data.from_items` sizes
    its blocks (so every later batch holds the same rows as before the split was read as Arrow).
    Copies (`take`), not zero-copy slices: a slice can carry the whole table's buffers along."""
    size, extra = divmod(table.num_rows, n_blocks)
    starts = [i * size + min(i, extra) for i in range(n_blocks + 1)]
    return tuple(table.take(pa.array(np.arange(starts[i], starts[i + 1]))) for i in range(n_blocks))


def _decode(table: ray.ObjectRef, n: int, inputs, store: Store) -> TrainingData:
    """Decode the rows of the input table (an object ref, never on the driver) in Ray Data tasks."""
    keys = sorted({f"img_{k}" if isinstance(k, (int, np.integer)) else k for k in inputs})
    sizes = tuple(parse_input_key(k)[1] for k in keys if k.startswith("img_"))
    n_blocks = _blocks(n)
    blocks = [table] if n_blocks == 1 else list(_cut.options(num_returns=n_blocks).remote(table, n_blocks))
    spec = DecodeSpec(store=store, sizes=sizes, views=tuple(k for k in keys if not k.startswith("img_")),
                      root=None, body_part_policy="keep")
    decoded = ray.data.from_arrow_refs(blocks).map_batches(_decode_for_training, fn_kwargs={"spec": spec},
                                                           batch_size=8)
    # The object store, not the driver heap: every fold and member reads these blocks again.
    base = decoded.materialize()
    return TrainingData(base, _meta(base), tuple(keys), n)


def load_split_data(split: str, inputs, store: Store, splits: tuple[str, ...] | None = None
                    ) -> tuple[TrainingData, dict]:
    """Read a ``split.csv`` as Arrow in a Ray task and decode its rows with Ray Data tasks.

    Args:
        split: the ``split.csv`` or its folder (local or s3://).
        inputs: member input keys (``img_160``, ``roi_128``, ...; a bare int is ``img_<int>``).
        splits: only these splits' rows (e.g. ``("test",)``); all by default.

    Returns:
        (`TrainingData`, ``{"n": rows read, "folds": fold count, "fingerprint":
        `split_table.split_fingerprint`}``). The driver receives the small columns of the decoded
        rows, never the split's rows.
    """
    table, info = _read_split.options(num_returns=2).remote(split, store, splits)
    info = ray.get(info)
    return _decode(table, info["n"], inputs, store), info


def load_training_data(rows: list[dict], inputs, store: Store) -> TrainingData:
    """Decode split rows (`kneescreen.data.split.run.load_split`, as tests and benchmarks hold them)
    with Ray Data tasks into the object store; `load_split_data` reads a split file without them.

    Returns:
        `TrainingData`: the decoded blocks (materialized once, reused by every fold and member)
        and the metadata of the usable rows. Films whose knee joint is not found are left out
        (logged) when a native view is asked for.
    """
    return _decode(ray.put(decode_inputs(rows_to_columns(rows))), len(rows), inputs, store)


# Models built in a Ray worker process, by payload: tasks of one map reuse them (at most 2 kept).
_MODELS: OrderedDict = OrderedDict()


def _cached(payload: ray.ObjectRef, build):
    key = payload.hex()
    if key not in _MODELS:
        torch.set_num_threads(1)  # one task per CPU: tasks, not threads, give the parallelism
        _MODELS[key] = build(ray.get(payload))
        while len(_MODELS) > 2:
            _MODELS.popitem(last=False)
    return _MODELS[key]


def _apply(batch: dict, payload: ray.ObjectRef, build, fn) -> dict:
    with torch.no_grad():
        return {"row": batch["row"], "out": fn(_cached(payload, build), batch)}


def map_model(data: TrainingData, columns: list[str], payload: dict, build, fn) -> ray.data.Dataset:
    """``fn(model, batch)`` over the rows of ``data`` in Ray Data tasks -> dataset of (row, out).

    Args:
        payload: what ``build`` needs (state dicts, settings); put in the object store once.
        build: payload -> model, called once per worker process and payload (cached there).
        fn: (model, numpy batch of ``columns``) -> one output array row per input row.
    """
    return data.dataset(["row", *columns]).map_batches(
        _apply, batch_size=INFER_BATCH, fn_kwargs={"payload": ray.put(payload), "build": build, "fn": fn})


def collect(ds: ray.data.Dataset, rows: np.ndarray) -> np.ndarray:
    """The ``out`` column of a `map_model` dataset in the order of ``rows`` (``data["row"]``).

    Raises:
        RuntimeError: the dataset holds other rows than ``rows``.
    """
    got, outs = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        got.append(batch["row"])
        outs.append(batch["out"])
    if not got:
        return np.zeros((0,))
    got, outs = np.concatenate(got), np.concatenate(outs)
    order = np.argsort(got, kind="stable")
    if not np.array_equal(got[order], rows):
        raise RuntimeError("a Ray Data map returned other rows than were sent")
    return outs[order]


def _score_build(p: dict):
    from kneescreen.model.bundle import Bundle

    return Bundle.from_states(p["manifest"], p["states"])


def _score(bundle, batch: dict) -> np.ndarray:
    logits = bundle.member_logits({k: batch[k] for k in bundle.manifest.input_keys}, batch_size=INFER_BATCH)
    return np.stack(logits, 1).astype(np.float32)


def bundle_logits(data: TrainingData, manifest, states: list[dict]) -> list[np.ndarray]:
    """Each member's logits on the rows of ``data`` (aligned with its meta), computed in Ray Data
    tasks from the decoded blocks; only (n, 3) arrays per member reach the driver."""
    if not len(data):
        return [np.zeros((0, len(CLASSES))) for _ in manifest.members]
    ds = map_model(data, list(manifest.input_keys), {"manifest": manifest, "states": states}, _score_build, _score)
    logits = collect(ds, data["row"]).astype(np.float64)
    return [logits[:, i] for i in range(len(manifest.members))]
