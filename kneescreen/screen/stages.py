"""The screening pipeline's stages, each testable without Ray.

    decode_stage (CPU tasks: kneescreen.data.decode.decode_batch -> typed block), or with
      --preprocess device decode_stored_stage (stored frames, blocks bounded by bytes)
    -> EnsemblePredictor (actor: models built once from the driver-verified bundle; with
      --preprocess device it first preprocesses the frames on its device, `screen.device`)
    -> to_prediction_table (pure fn: exactly `schema.PREDICTIONS`)

Between stages every block is an Arrow table with fixed column types (`typed_table`), so blocks
with and without errors concatenate.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.extensions import ArrowTensorArray

from kneescreen.data.decode import DecodeSpec, decode_batch, is_transient
from kneescreen.data.decode_stored import decode_stored_batch
from kneescreen.data.frame_block import RAW_BLOCK_BYTES, is_frame_column
from kneescreen.data.preprocess import is_input_key
from kneescreen.labels import CLASSES
from kneescreen.model.bundle import Bundle
from kneescreen.model.manifest import BundleManifest
from kneescreen.screen.device import DevicePreprocessor
from kneescreen.screen.schema import PREDICTIONS


def _column(values, field: pa.Field) -> pa.Array:
    """One column's values -> an Arrow array of the field's type (NaN and None become null)."""
    vals = [None if (v is None or (isinstance(v, float) and np.isnan(v))) else v
            for v in (values.tolist() if isinstance(values, np.ndarray) else list(values))]
    if pa.types.is_list(field.type):
        vals = [None if v is None else [float(x) for x in v] for v in vals]
    elif pa.types.is_boolean(field.type):
        vals = [None if v is None else bool(v) for v in vals]
    elif pa.types.is_string(field.type):
        vals = [None if v is None else str(v) for v in vals]
    return pa.array(vals, type=field.type)


def typed_table(cols: dict) -> pa.Table:
    """Stage output -> an Arrow table whose column types never depend on the values.

    A block whose error codes happen to be all null must not reach an actor as a float column
    while the next one is a string column (Ray Data cannot concatenate those into one batch).
    Scalar columns take their types from `schema.PREDICTIONS`; model inputs (``img_<size>``,
    ``roi_<size>``, ``tiles_<size>``) are uint8 tensors.
    """
    names, arrays = [], []
    for name, values in cols.items():
        names.append(name)
        if isinstance(values, pa.Array):  # already typed (`data.frame_block` columns)
            arrays.append(values)
        elif is_input_key(name):
            arrays.append(ArrowTensorArray.from_numpy(np.ascontiguousarray(values, dtype=np.uint8)))
        else:
            arrays.append(_column(values, PREDICTIONS.field(name)))
    return pa.Table.from_arrays(arrays, names=names)


def exhaust_retries(out: dict, attempts, max_retries: int) -> dict:
    """Rows whose transient error follows ``max_retries`` failed retries already (``attempts``:
    the object version's earlier error rows) become permanent ``retries_exhausted`` rows that
    name the last error, so no object is read forever (issue #20; docs/operations.md)."""
    codes, messages = list(out["error_code"]), list(out["message"])
    for i, (code, prior) in enumerate(zip(codes, attempts)):
        if is_transient(code) and prior is not None and int(prior) >= max_retries:
            messages[i] = f"{code} on attempt {int(prior) + 1} of {max_retries + 1}: {messages[i] or ''}"[:300]
            codes[i] = "retries_exhausted"
    return {**out, "error_code": codes, "message": messages}


def _resolved(spec: DecodeSpec) -> DecodeSpec:
    # Side tables travel as object refs: fetched once per task from the object store.
    if isinstance(spec.reference, ray.ObjectRef) or isinstance(spec.metadata, ray.ObjectRef):
        spec = dataclasses.replace(
            spec, reference=ray.get(spec.reference) if isinstance(spec.reference, ray.ObjectRef) else spec.reference,
            metadata=ray.get(spec.metadata) if isinstance(spec.metadata, ray.ObjectRef) else spec.metadata)
    return spec


def decode_stage(batch: dict, spec: DecodeSpec, max_retries: int | None = None) -> pa.Table:
    """Ray Data task: listing rows (key, etag, size[, attempts]) -> typed decoded block; with
    ``max_retries``, transient errors past it become ``retries_exhausted`` (`exhaust_retries`)."""
    out = decode_batch({k: batch[k] for k in ("key", "etag", "size")}, _resolved(spec))
    if max_retries is not None and "attempts" in batch:
        out = exhaust_retries(out, batch["attempts"], max_retries)
    return typed_table(out)


def decode_stored_stage(batch: dict, spec: DecodeSpec, max_retries: int | None = None,
                        block_bytes: int = RAW_BLOCK_BYTES):
    """`decode_stage` for ``--preprocess device``: yields blocks of stored frames
    (`data.decode_stored.decode_stored_batch`), each at most ``block_bytes`` of frames."""
    start = 0
    for out in decode_stored_batch({k: batch[k] for k in ("key", "etag", "size")}, _resolved(spec), block_bytes):
        n = len(out["key"])
        if max_retries is not None and "attempts" in batch:
            out = exhaust_retries(out, batch["attempts"][start : start + n], max_retries)
        start += n
        yield typed_table(out)


_RESULT_COLUMNS = ("p_normal", "p_osteopenia", "p_osteoporosis", "predicted_class", "risk_score", "low_bmd_flag",
                   "osteoporosis_flag", "predictor", "covariates_imputed", "image_probs", "covariates_probs",
                   "triage_zone", "t_score_est", "t_score_lo", "t_score_hi", "infer_ms", "inferred_at")


class EnsemblePredictor:
    """Ray Data actor: builds the bundle's models once from the driver-verified payload.

    Args:
        payload: ``{"manifest": BundleManifest, "states": [state dicts]}`` (or its ObjectRef).
        use_gpu: run on this actor's GPU (bf16 autocast).
        threads: torch threads for CPU inference.
        preprocess: ``cpu`` (blocks carry model inputs) or ``device`` (blocks carry stored frames,
            preprocessed here by `screen.device.DevicePreprocessor` on the actor's device).
    """

    def __init__(self, payload, use_gpu: bool = False, threads: int = 1, preprocess: str = "cpu"):
        torch.set_num_threads(max(1, threads))
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        manifest: BundleManifest = payload["manifest"]
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.bundle = Bundle.from_states(manifest, payload["states"], device)
        self.pre = DevicePreprocessor(manifest.input_keys, device) if preprocess == "device" else None

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["key"])
        inputs = batch
        if self.pre is not None:
            with torch.inference_mode():
                batch, inputs = self.pre(batch)
        ok = np.asarray(batch["status"] == "ok", bool)
        res = {k: np.full(n, None, dtype=object) for k in _RESULT_COLUMNS}
        if ok.any():
            started = _dt.datetime.now(_dt.timezone.utc)
            t0 = time.perf_counter()
            idx = np.nonzero(ok)[0]
            ages = [None if np.isnan(a) else float(a) for a in batch["age"][idx]]
            pick = torch.from_numpy(idx) if self.pre is not None else idx
            with torch.inference_mode():
                pred = self.bundle.predict({k: inputs[k][pick] for k in self.bundle.manifest.input_keys},
                                           ages, list(batch["sex"][idx]))
            for i, c in enumerate(("p_normal", "p_osteopenia", "p_osteoporosis")):
                res[c][idx] = pred.probs[:, i]
            res["predicted_class"][idx] = [CLASSES[i] for i in pred.pred]
            res["risk_score"][idx] = pred.low_bmd_score
            res["low_bmd_flag"][idx] = pred.low_bmd_flag
            res["osteoporosis_flag"][idx] = pred.osteoporosis_flag
            res["predictor"][idx] = pred.predictor
            res["covariates_imputed"][idx] = pred.covariates_imputed
            if pred.triage_zone is not None:
                res["triage_zone"][idx] = pred.triage_zone
            for c in ("t_score_est", "t_score_lo", "t_score_hi"):
                res[c][idx] = getattr(pred, c)
            for j, i in enumerate(idx):  # one list per row (numpy would broadcast a 2-D assignment)
                res["image_probs"][i] = pred.image_probs[j].tolist()
                if pred.covariate_probs is not None and not np.isnan(pred.covariate_probs[j]).any():
                    res["covariates_probs"][i] = pred.covariate_probs[j].tolist()
            res["infer_ms"][idx] = (time.perf_counter() - t0) * 1000 / len(idx)
            res["inferred_at"][idx] = started
        out = {k: v for k, v in batch.items() if not is_input_key(k) and not is_frame_column(k)}
        out.update(res)
        return typed_table(out)


def to_prediction_table(batch: dict, run_id: str, model_version: str, screened_at: _dt.datetime) -> pa.Table:
    """A batch of predictor output -> an Arrow table in exactly `schema.PREDICTIONS`."""
    n = len(batch["key"])
    run = {"run_id": run_id, "model_version": model_version, "screened_at": screened_at}
    cols = {f.name: _column([run[f.name]] * n if f.name in run else batch[f.name], f) for f in PREDICTIONS}
    return pa.Table.from_pydict(cols, schema=PREDICTIONS)
