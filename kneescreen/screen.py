"""Archive screening on Ray Data: per-image risk classes and confusion statistics in Parquet.

    list (driver, paged) -> diff against committed runs -> listing chunks (Parquet, scratch)
      -> blocks of `decode_batch_size` rows -> decode + preprocess (CPU tasks; bad input ->
         error/skipped rows)
      -> ensemble inference (ActorPoolStrategy: 1 GPU per actor on clusters, CPU actors here)
      -> postprocess (pure fn: schema.PREDICTIONS) -> write_parquet(predictions/...)
      -> stats (driver, this run's rows) -> runs/run_id=<r>.json (the commit, written last)

Exactly once: a run is committed when its manifest exists. Before starting, a run deletes the
files of runs that never committed (they died before their manifest); incremental mode skips
every (key, etag) that a committed run with the same model version already holds.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from kneescreen import storage
from kneescreen.errors import KneescreenError
from kneescreen.datasets import to_float
from kneescreen.labels import CLASSES
from kneescreen.stats import compute_stats

_logger = logging.getLogger(__name__)
KNEE_BODY_PARTS = {"KNEE", "LEG", "LOWER LIMB", "LOWERLIMB", "EXTREMITY", "LOWER EXTREMITY", "TIBIA", "FEMUR", "PATELLA"}
RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "OT", "DR", "PX"}
DECODE_MEMORY = 512 * 1024**2
LISTING_CHUNK = 5000  # listing rows per scratch Parquet file: bounded driver memory per page
PREDICTION_FILE_ROWS = 20_000  # target rows per predictions Parquet file (a few MB)


@dataclass(frozen=True)
class ScreenConfig:
    """Screening settings; the CLI flags and ``--config`` YAML map onto these fields."""

    input: str
    output: str
    bundle: str
    reference: str | None = None
    metadata: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    mode: str = "incremental"  # incremental | full
    # Inference batch: 32 keeps a CPU actor's working set (32 x 224^2 activations) in cache-
    # friendly sizes; on a GPU raise it (256+) until the GPU is busy.
    batch_size: int = 32
    # Rows per decode task (and per block streaming into the actors). Small enough that the
    # first inference batch is ready soon after start and every actor has blocks to take; large
    # enough that per-task overhead stays small next to decoding (bench/screen_bench.py).
    decode_batch_size: int = 32
    # Inference actors. None = one per GPU with use_gpu, else one 1-CPU actor per two cluster
    # CPUs (the other half decodes). Two 1-thread processes out-infer one 2-thread process on
    # CPUs (benchmarks.md); on a GPU cluster, one per GPU.
    actors: int | None = None
    # CPUs (and torch threads) per CPU inference actor. Ray starts 1-CPU actors with one torch
    # thread; on CPU nodes give the actor more so inference is not the single-threaded bottleneck.
    actor_cpus: int = 1
    use_gpu: bool = False
    body_part_policy: str = "skip"  # skip | keep: non-knee DICOM (BodyPartExamined) is skipped
    max_pixels: int = 64_000_000
    endpoint: str | None = None


# ---------------------------------------------------------------------------------------------
# side tables: reference labels and metadata sidecar


def load_side_table(uri: str | None, endpoint: str | None) -> dict[str, dict]:
    """key / relative path / SOP Instance UID -> row, for --reference and --metadata."""
    if not uri:
        return {}
    out: dict[str, dict] = {}
    for row in storage.read_table(uri, endpoint):
        for col in ("key", "path", "relative_path", "sop_instance_uid"):
            v = row.get(col)
            if v not in (None, ""):
                out[str(v)] = row
    if not out:
        raise KneescreenError(f"{uri}: no rows with a key, path or sop_instance_uid column")
    return out


# ---------------------------------------------------------------------------------------------
# stage 1: decode + preprocess (pure batch function, CPU tasks)


def decode_batch(batch: dict, input_root: str, sizes: list[int], pseudo_key: bytes, reference: dict,
                 metadata: dict, body_part_policy: str = "skip", max_pixels: int = 64_000_000,
                 endpoint: str | None = None) -> dict:
    """Listing rows -> decoded, letterboxed images plus metadata; failures become rows too."""
    from kneescreen.errors import DecodeError
    from kneescreen.evaluate import age_band
    from kneescreen.labels import normalise_label, t_score_to_class
    from kneescreen.preprocess import letterbox
    from kneescreen.privacy import pseudonymise
    from kneescreen.reader import ReaderConfig, read_radiograph

    cfg = ReaderConfig(max_pixels=max_pixels, hash_pixels=False)
    cols: dict[str, list] = {k: [] for k in (
        "status", "error_code", "message", "format", "patient_pseudo_id", "study_pseudo_id", "laterality", "view",
        "site", "manufacturer", "sex", "age", "age_band", "reference_label", "reference_t_score", "decode_ms")}
    images = {s: [] for s in sizes}
    client = storage.s3_client(endpoint) if storage.is_s3(input_root) else None
    for key in batch["key"]:
        t0 = time.perf_counter()
        status, code, msg, meta, image = "ok", None, None, None, None
        try:
            data = storage.read_bytes(storage.join(input_root, key), endpoint, client=client)
            rg = read_radiograph(data, cfg)
            meta, image = rg.meta, rg.image
            body = (meta.body_part or "").upper()
            if meta.modality and meta.modality.upper() not in RADIOGRAPH_MODALITIES:
                status, code, msg = "skipped", "not_radiograph", f"modality {meta.modality} is not a radiograph"
            elif body_part_policy == "skip" and body and body not in KNEE_BODY_PARTS:
                status, code, msg = "skipped", "not_knee", f"BodyPartExamined is {meta.body_part}"
        except DecodeError as exc:
            status, code, msg = "error", exc.error_code, exc.message
        except Exception as exc:  # noqa: BLE001 - storage failures are rows, not a dead batch
            status, code, msg = "error", "read_failed", f"{type(exc).__name__}: {exc}"[:300]
        side = metadata.get(key) or (metadata.get(meta.sop_uid) if meta and meta.sop_uid else None) or {}
        ref = reference.get(key) or (reference.get(meta.sop_uid) if meta and meta.sop_uid else None)
        # DICOM headers win where both exist; the sidecar fills formats without headers.
        age = meta.age if meta and meta.age is not None else to_float(side.get("age"))
        sex = (meta.sex if meta and meta.sex else None) or (str(side.get("sex") or "").upper()[:1] or None)
        sex = sex if sex in ("F", "M") else None
        ref_label, ref_t = None, None
        if ref:
            ref_t = to_float(ref.get("t_score"))
            try:
                ref_label = normalise_label(ref["label"]) if ref.get("label") else (
                    t_score_to_class(ref_t) if ref_t is not None else None)
            except ValueError:
                ref_label = None
        cols["status"].append(status)
        cols["error_code"].append(code)
        cols["message"].append(msg)
        cols["format"].append(meta.format if meta else None)
        cols["patient_pseudo_id"].append(pseudonymise(meta.patient_id, pseudo_key, "p") if meta else None)
        cols["study_pseudo_id"].append(pseudonymise(meta.study_uid, pseudo_key, "s") if meta else None)
        cols["laterality"].append((meta.laterality if meta else None) or side.get("laterality") or None)
        cols["view"].append((meta.view_position if meta else None) or side.get("view") or None)
        cols["site"].append(side.get("site") or (meta.institution if meta else None))
        cols["manufacturer"].append((meta.manufacturer if meta else None) or side.get("manufacturer") or None)
        cols["sex"].append(sex)
        cols["age"].append(age)
        cols["age_band"].append(age_band(age))
        cols["reference_label"].append(ref_label)
        cols["reference_t_score"].append(ref_t)
        cols["decode_ms"].append((time.perf_counter() - t0) * 1000)
        for s in sizes:
            images[s].append(letterbox(image, s) if status == "ok" else np.zeros((s, s), np.uint8))
    out = {k: batch[k] for k in ("key", "etag", "size")}
    out.update(cols)
    out.update({f"img_{s}": np.stack(v) for s, v in images.items()})
    return typed_table(out)


def _column(values, field):
    """One column's values -> an Arrow array of the field's type (NaN and None become null)."""
    import pyarrow as pa

    vals = [None if (v is None or (isinstance(v, float) and np.isnan(v))) else v
            for v in (values.tolist() if isinstance(values, np.ndarray) else list(values))]
    if pa.types.is_boolean(field.type):
        vals = [None if v is None else bool(v) for v in vals]
    elif pa.types.is_string(field.type):
        vals = [None if v is None else str(v) for v in vals]
    return pa.array(vals, type=field.type)


def typed_table(cols: dict):
    """Stage output -> an Arrow table whose column types never depend on the values.

    Every block between stages carries the same schema: a block whose error codes happen to be
    all null must not reach an actor as a float column while the next one is a string column
    (Ray Data cannot concatenate those into one batch). Scalar columns take their types from
    `schema.PREDICTIONS`; `img_<size>` columns are uint8 tensors.
    """
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from kneescreen.schema import PREDICTIONS

    names, arrays = [], []
    for name, values in cols.items():
        names.append(name)
        if name.startswith("img_"):
            arrays.append(ArrowTensorArray.from_numpy(np.ascontiguousarray(values, dtype=np.uint8)))
        else:
            arrays.append(_column(values, PREDICTIONS.field(name)))
    return pa.Table.from_arrays(arrays, names=names)


# ---------------------------------------------------------------------------------------------
# stage 2: ensemble inference (callable class: models built once per actor)


class EnsemblePredictor:
    """Ray Data actor: builds the bundle's models once from the driver-verified payload."""

    def __init__(self, payload, use_gpu: bool = False, threads: int = 1):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))

        from kneescreen.bundle import Bundle
        from kneescreen.models import create_model

        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        models = []
        for spec, state in zip(payload["manifest"]["members"], payload["states"]):
            m = create_model(spec["architecture"], len(CLASSES), spec["input_mode"], weights=None)
            m.load_state_dict(state)
            models.append(m.to(device).eval())
        self.bundle = Bundle(payload["manifest"], models, device)

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["key"])
        ok = np.asarray(batch["status"] == "ok", bool)
        res = {"p_normal": np.full(n, np.nan), "p_osteopenia": np.full(n, np.nan), "p_osteoporosis": np.full(n, np.nan),
               "predicted_class": np.full(n, None, dtype=object), "risk_score": np.full(n, np.nan),
               "low_bmd_flag": np.full(n, None, dtype=object), "osteoporosis_flag": np.full(n, None, dtype=object),
               "predictor": np.full(n, None, dtype=object), "covariates_imputed": np.full(n, None, dtype=object),
               "infer_ms": np.full(n, np.nan), "inferred_at": np.full(n, None, dtype=object)}
        if ok.any():
            started = _dt.datetime.now(_dt.timezone.utc)
            t0 = time.perf_counter()
            idx = np.nonzero(ok)[0]
            ages = [None if np.isnan(a) else float(a) for a in batch["age"][idx]]
            with torch.inference_mode():
                pred = self.bundle.predict({s: batch[f"img_{s}"][idx] for s in self.bundle.sizes},
                                           ages, list(batch["sex"][idx]))
            per_image = (time.perf_counter() - t0) * 1000 / len(idx)
            res["p_normal"][idx], res["p_osteopenia"][idx], res["p_osteoporosis"][idx] = pred.probs.T
            res["predicted_class"][idx] = [CLASSES[i] for i in pred.pred]
            res["risk_score"][idx] = pred.low_bmd_score
            res["low_bmd_flag"][idx] = pred.low_bmd_flag
            res["osteoporosis_flag"][idx] = pred.osteoporosis_flag
            res["predictor"][idx] = pred.predictor
            res["covariates_imputed"][idx] = pred.covariates_imputed
            res["infer_ms"][idx] = per_image
            res["inferred_at"][idx] = started
        out = {k: v for k, v in batch.items() if not k.startswith("img_")}
        out.update(res)
        return typed_table(out)


# ---------------------------------------------------------------------------------------------
# stage 3: postprocess (pure fn)


def to_prediction_table(batch: dict, run_id: str, model_version: str, screened_at: _dt.datetime):
    """A batch of predictor output -> an Arrow table in exactly `schema.PREDICTIONS`."""
    import pyarrow as pa

    from kneescreen.schema import PREDICTIONS

    n = len(batch["key"])
    run = {"run_id": run_id, "model_version": model_version, "screened_at": screened_at}
    cols = {f.name: _column([run[f.name]] * n if f.name in run else batch[f.name], f) for f in PREDICTIONS}
    return pa.Table.from_pydict(cols, schema=PREDICTIONS)


# ---------------------------------------------------------------------------------------------
# runs: commit log, garbage collection, diff


def committed_runs(output: str, endpoint: str | None = None) -> list[dict]:
    runs_dir = storage.join(output, "runs")
    out = []
    if not storage.is_s3(output) and not os.path.isdir(runs_dir):
        return out
    for obj in storage.list_objects(runs_dir, include=("*.json",), endpoint=endpoint):
        out.append(json.loads(storage.read_bytes(obj.uri, endpoint)))
    return sorted(out, key=lambda r: r["started_at"])


def drop_uncommitted(output: str, committed_ids: set[str], endpoint: str | None = None) -> list[str]:
    """Delete prediction/stats/scratch files of runs that never wrote a manifest."""
    dropped = []
    for table in ("predictions", "stats"):
        for mv in storage.list_dirs(storage.join(output, table), endpoint):
            for run_dir in storage.list_dirs(storage.join(output, table, mv), endpoint):
                run_id = run_dir.split("=", 1)[-1]
                if run_id not in committed_ids:
                    storage.delete_prefix(storage.join(output, table, mv, run_dir), endpoint)
                    dropped.append(run_id)
    storage.delete_prefix(storage.join(output, "_scratch"), endpoint)
    return sorted(set(dropped))


def _digest(key: str, etag: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{etag}".encode(), digest_size=12).digest()


def done_set(output: str, runs: list[dict], model_version: str, endpoint: str | None = None) -> set[bytes]:
    """(key, etag) digests already screened by committed runs of this model version.

    12-byte digests keep ~10 million screened objects within about 1 GB of driver memory.
    """
    import pyarrow.parquet as pq

    done: set[bytes] = set()
    for run in runs:
        if run["model_version"] != model_version:
            continue
        uri = storage.join(output, "predictions", f"model_version={model_version}", f"run_id={run['run_id']}")
        fs, path = storage.arrow_filesystem(uri, endpoint)
        table = pq.read_table(path, filesystem=fs, columns=["key", "etag"], partitioning=None)
        for k, e in zip(table.column("key").to_pylist(), table.column("etag").to_pylist()):
            done.add(_digest(k, e or ""))
    return done


def _write_parquet(table, uri: str, endpoint: str | None) -> None:
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(uri, endpoint)
    if not storage.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs)


def stream_listing(cfg: ScreenConfig, run_id: str, done: set[bytes]) -> dict:
    """Stream the archive listing page by page into scratch Parquet chunks, minus ``done``."""
    import pyarrow as pa

    scratch = storage.join(cfg.output, "_scratch", f"run_id={run_id}")
    fp = hashlib.sha256()
    chunk: list[dict] = []
    counts = {"listed": 0, "already_done": 0, "to_screen": 0}
    schema = pa.schema([("key", pa.string()), ("etag", pa.string()), ("size", pa.int64())])

    uris: list[str] = []

    def flush():
        if chunk:
            uris.append(storage.join(scratch, f"listing-{len(uris):06d}.parquet"))
            _write_parquet(pa.Table.from_pylist(chunk, schema=schema), uris[-1], cfg.endpoint)
            chunk.clear()

    for obj in storage.list_objects(cfg.input, cfg.include, cfg.exclude, cfg.endpoint):
        counts["listed"] += 1
        fp.update(f"{obj.key}\t{obj.etag}\n".encode())
        if _digest(obj.key, obj.etag) in done:
            counts["already_done"] += 1
            continue
        chunk.append({"key": obj.key, "etag": obj.etag, "size": obj.size})
        counts["to_screen"] += 1
        if len(chunk) >= LISTING_CHUNK:
            flush()
    flush()
    counts["fingerprint"] = fp.hexdigest()[:32]
    counts["scratch"] = scratch
    counts["chunk_uris"] = uris
    return counts


def _read_listing_chunks(batch, endpoint: str | None = None):
    """Ray Data task: scratch chunk URIs -> their listing rows (key, etag, size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for uri in batch["chunk"].to_pylist():
        fs, path = storage.arrow_filesystem(uri, endpoint)
        tables.append(pq.read_table(path, filesystem=fs, partitioning=None))
    return pa.concat_tables(tables)


# ---------------------------------------------------------------------------------------------


def resolve_actors(cfg: ScreenConfig, cluster: dict) -> int:
    """The inference pool size: as configured, else sized from the cluster's resources."""
    if cfg.actors is not None:
        return cfg.actors
    if cfg.use_gpu:
        return max(1, int(cluster.get("GPU", 0)))
    return max(1, int(cluster.get("CPU", 1)) // (2 * max(1, cfg.actor_cpus)))


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def run_screen(cfg: ScreenConfig) -> dict:
    """Screen an archive and commit a run. Returns the run manifest.

    Raises:
        KneescreenError: bad configuration (missing key, unreadable bundle or side tables), or a
            row-count mismatch (the run is then not committed and the next run re-screens).
    """
    import pyarrow.parquet as pq
    import ray

    from kneescreen.bundle import load_bundle
    from kneescreen.privacy import pseudonym_key
    from kneescreen.schema import PREDICTIONS
    from kneescreen.train import ensure_ray

    if cfg.mode not in ("incremental", "full"):
        raise KneescreenError(f"--mode must be incremental or full, not {cfg.mode!r}")
    for name in ("batch_size", "decode_batch_size", "actor_cpus", "actors"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise KneescreenError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    key = pseudonym_key(required=True)  # fail before any work if the secret is missing
    started = _dt.datetime.now(_dt.timezone.utc)
    run_id = new_run_id()
    t_start = time.perf_counter()
    runs = committed_runs(cfg.output, cfg.endpoint)
    dropped = drop_uncommitted(cfg.output, {r["run_id"] for r in runs}, cfg.endpoint)
    if dropped:
        _logger.warning("removed files of %d uncommitted run(s): %s", len(dropped), ", ".join(dropped))
    # Heavy set-up once, on the driver: download + verify the bundle, then share the verified
    # tensors with every actor through the object store (no per-actor S3 reads or re-hashing).
    bundle = load_bundle(cfg.bundle, endpoint=cfg.endpoint)
    version = bundle.version
    done = done_set(cfg.output, runs, version, cfg.endpoint) if cfg.mode == "incremental" else set()
    listing = stream_listing(cfg, run_id, done)
    t_listed = time.perf_counter()
    _logger.info("run %s: listed %d objects, %d already screened by model %s, %d to screen",
                 run_id, listing["listed"], listing["already_done"], version, listing["to_screen"])
    pred_uri = storage.join(cfg.output, "predictions", f"model_version={version}", f"run_id={run_id}")
    written = 0
    if listing["to_screen"]:
        ensure_ray()
        cfg = replace(cfg, actors=resolve_actors(cfg, ray.cluster_resources()))
        _logger.info("run %s: %d inference actor(s) x %s", run_id, cfg.actors,
                     "1 GPU" if cfg.use_gpu else f"{cfg.actor_cpus} CPU")
        payload = ray.put({"manifest": bundle.manifest, "states": [m.cpu().state_dict() for m in bundle.models]})
        reference = ray.put(load_side_table(cfg.reference, cfg.endpoint))
        metadata = ray.put(load_side_table(cfg.metadata, cfg.endpoint))
        screened_at = _dt.datetime.now(_dt.timezone.utc)
        ds = (
            # One row per scratch chunk, read by a plain task and split into decode-sized blocks.
            # (read_parquet would spend seconds of start-up on file discovery and footers for a
            # handful of small files, and would hand a whole chunk to a single decode task and
            # then a single actor: no overlap between decode and inference, one busy actor.)
            ray.data.from_items([{"chunk": uri} for uri in listing["chunk_uris"]])
            .map_batches(_read_listing_chunks, batch_size=1, batch_format="pyarrow",
                         fn_kwargs={"endpoint": cfg.endpoint})
            .repartition(target_num_rows_per_block=cfg.decode_batch_size)
            # Decode tasks reserve memory (a 4k x 4k 16-bit radiograph peaks near 0.5 GB as float
            # arrays). The reservation also keeps Ray from fusing decode into the inference
            # actor, so decoding runs in parallel CPU tasks while the actor keeps inferring.
            .map_batches(_decode_task, batch_size=cfg.decode_batch_size, memory=DECODE_MEMORY, fn_kwargs={
                "input_root": cfg.input, "sizes": bundle.sizes, "pseudo_key": key, "reference": reference,
                "metadata": metadata, "body_part_policy": cfg.body_part_policy, "max_pixels": cfg.max_pixels,
                "endpoint": cfg.endpoint})
            .map_batches(EnsemblePredictor, batch_size=cfg.batch_size,
                         compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                         fn_constructor_kwargs={"payload": payload, "use_gpu": cfg.use_gpu,
                                                "threads": cfg.actor_cpus},
                         num_gpus=1 if cfg.use_gpu else 0, num_cpus=0 if cfg.use_gpu else cfg.actor_cpus)
            .map_batches(to_prediction_table, batch_format="numpy",
                         fn_kwargs={"run_id": run_id, "model_version": version, "screened_at": screened_at})
        )
        out_fs, out_path = storage.arrow_filesystem(pred_uri, cfg.endpoint)
        # Blocks are small (decode_batch_size rows) for pipelining; files are not: analytics
        # engines prefer fewer, larger Parquet files.
        ds.write_parquet(out_path, filesystem=out_fs, min_rows_per_file=PREDICTION_FILE_ROWS)
        table = pq.read_table(out_path, filesystem=out_fs, partitioning=None, schema=PREDICTIONS)
        written = table.num_rows
        if written != listing["to_screen"]:
            raise KneescreenError(f"run {run_id}: wrote {written} rows for {listing['to_screen']} listed objects; "
                                  "not committing (the next run re-screens)")
        df = table.to_pandas()
    else:
        import pandas as pd

        df = pd.DataFrame({f.name: [] for f in PREDICTIONS})
    t_screened = time.perf_counter()
    stats = compute_stats(df, run_id, version)
    _write_parquet(stats, storage.join(cfg.output, "stats", f"model_version={version}", f"run_id={run_id}",
                                       "stats.parquet"), cfg.endpoint)
    counts = {s: int((df["status"] == s).sum()) for s in ("ok", "error", "skipped")}
    screen_s = t_screened - t_listed
    manifest = {
        "run_id": run_id, "started_at": started.isoformat(), "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "model_version": version, "bundle": cfg.bundle, "input": cfg.input, "output": cfg.output, "mode": cfg.mode,
        "listing_fingerprint": listing["fingerprint"],
        # Which pseudonymisation key made this run's ids (a hash of the key, never the key):
        # rows with different key ids cannot be joined on patient_pseudo_id.
        "pseudonym_key_id": hashlib.sha256(b"kneescreen-key-id:" + key).hexdigest()[:12],
        "counts": {"listed": listing["listed"], "already_screened": listing["already_done"], "screened": written,
                   **counts},
        "timing_s": {"list_and_diff": round(t_listed - t_start, 3), "screen": round(screen_s, 3),
                     "total": round(time.perf_counter() - t_start, 3)},
        "throughput_images_per_s": round(written / screen_s, 2) if written and screen_s > 0 else None,
        "error_codes": {k: int(v) for k, v in df["error_code"].value_counts().items()} if len(df) else {},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "predictions": pred_uri if written else None,
    }
    storage.delete_prefix(listing["scratch"], cfg.endpoint)
    # The commit: once this file exists the run is visible to readers and to the next rescan.
    storage.write_bytes(storage.join(cfg.output, "runs", f"run_id={run_id}.json"),
                        json.dumps(manifest, indent=2).encode(), cfg.endpoint)
    _logger.info("run %s committed: %s", run_id, json.dumps(manifest["counts"]))
    return manifest


def _decode_task(batch: dict, reference, metadata, **kw) -> dict:
    import ray

    # Side tables travel as object refs: fetched once per task from the object store.
    if isinstance(reference, ray.ObjectRef):
        reference = ray.get(reference)
    if isinstance(metadata, ray.ObjectRef):
        metadata = ray.get(metadata)
    return decode_batch(batch, reference=reference, metadata=metadata, **kw)
