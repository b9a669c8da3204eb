"""Archive screening on Ray Data: per-image risk classes and confusion statistics in Parquet.

    list (driver threads over key prefixes, paged) -> diff against committed runs, by hash
      partition (driver for one partition, Ray tasks for more) -> chunks to screen (Parquet, scratch)
      -> blocks of `decode_batch_size` rows -> decode + preprocess (CPU tasks; bad input ->
         error/skipped rows); with --preprocess device, decode to stored pixels only (blocks
         bounded by frame bytes, `data.frame_block.RAW_BLOCK_BYTES`)
      -> [--preprocess device: display transform, letterbox, ROI, tiles on the actor's device]
         ensemble inference (ActorPoolStrategy: 1 GPU per actor on clusters, CPU actors here)
      -> postprocess (pure fn: schema.PREDICTIONS) -> write_parquet(predictions/...)
      -> stats (driver: this run's Parquet streamed batch by batch into counts)
      -> patients (Ray Data: latest ok row per object over committed runs + this one, groupby
         patient; `screen.patients`) -> patients/..., patient stats rows with reference labels
      -> runs/run_id=<r>.json (the commit, written last)

Exactly once: a run is committed when its manifest exists (`ledger`). Before starting, a run
deletes the files of runs that never committed; incremental mode skips every (key, etag) that a
committed run with the same model version has done (ok, skipped, or a permanent error) and retries
transient errors, at most ``--max-retries`` runs before they become ``retries_exhausted`` (and,
with ``--retry-errors``, permanent ones).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import time

import ray

from kneescreen._private.cluster import ensure_ray
from kneescreen.config import dump_yaml, to_flat_dict
from kneescreen.data.decode import DecodeSpec, load_side_table
from kneescreen.errors import KneescreenError
from kneescreen.fileio.privacy import pseudonym_key
from kneescreen.fileio.store import Store, join
from kneescreen.model.bundle import Bundle, load_bundle
from kneescreen.screen import diff, ledger
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.schema import PREDICTIONS
from kneescreen.screen.sizing import Plan, plan_screening, resolve_actors  # noqa: F401  (resolve_actors: public here too)
from kneescreen.screen.stages import (
    EnsemblePredictor,
    decode_stage,
    decode_stored_stage,
    to_prediction_table,
)
from kneescreen.screen.patients import write_patients
from kneescreen.screen.schema import PATIENTS
from kneescreen.screen.stats import STATS_COLUMNS, PredictionCounts, compute_stats, patient_stats

_logger = logging.getLogger(__name__)
DECODE_MEMORY = 512 * 1024**2
PREDICTION_FILE_ROWS = 20_000  # target rows per predictions Parquet file (a few MB)


def build_dataset(cfg: ScreenConfig, store: Store, bundle: Bundle, chunk_uris: list[str], pseudo_key: bytes,
                  run_id: str, plan: Plan | None = None) -> ray.data.Dataset:
    """The lazy Ray Data plan from listing chunks to `schema.PREDICTIONS` blocks (sizes from
    ``plan``, else from ``cfg`` as given: `actors` and `batch_size` set)."""
    plan = plan or Plan(actors=cfg.actors or 1, batch_size=cfg.batch_size or 32, decode_tasks=cfg.decode_tasks)
    # --use-gpu: at most the decode tasks that keep the GPUs busy (screen.sizing); CPU runs: Ray
    # Data schedules as many as the CPUs the actors leave.
    decode_compute = ray.data.TaskPoolStrategy(size=plan.decode_tasks) if plan.decode_tasks else None
    payload = ray.put({"manifest": bundle.manifest, "states": bundle.states()})
    device = cfg.resolved_preprocess == "device"
    spec = DecodeSpec(store=store, sizes=tuple(bundle.sizes), views=bundle.views, root=cfg.input, pseudo_key=pseudo_key,
                      reference=ray.put(load_side_table(store, cfg.reference)),
                      metadata=ray.put(load_side_table(store, cfg.metadata)),
                      body_part_policy=cfg.body_part_policy, max_pixels=cfg.max_pixels,
                      header_triage=cfg.header_triage, frame_decode=cfg.frame_decode if device else "task")
    return (
        # One row per scratch chunk, read by a plain task and split into decode-sized blocks.
        # (read_parquet would spend seconds of start-up on file discovery and footers for a
        # handful of small files, and would hand a whole chunk to a single decode task and then a
        # single actor: no overlap between decode and inference, one busy actor.)
        ray.data.from_items([{"chunk": uri} for uri in chunk_uris])
        .map_batches(diff.read_listing_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"store": store})
        .repartition(target_num_rows_per_block=cfg.decode_batch_size)
        # Decode tasks reserve memory (a 4k x 4k 16-bit radiograph peaks near 0.5 GB as float
        # arrays). The reservation also keeps Ray from fusing decode into the inference actor,
        # so decoding runs in parallel CPU tasks while the actor keeps inferring.
        # With --preprocess device the task stops at the stored pixels and yields blocks of at
        # most RAW_BLOCK_BYTES of frames (a quarter of the reservation: 13 full-size 10 MB films),
        # so a block of big films never outgrows the memory the task reserved.
        .map_batches(decode_stored_stage if device else decode_stage, batch_size=cfg.decode_batch_size,
                     memory=DECODE_MEMORY, compute=decode_compute,
                     fn_kwargs={"spec": spec, "max_retries": cfg.max_retries})
        .map_batches(EnsemblePredictor, batch_size=plan.batch_size, compute=ray.data.ActorPoolStrategy(size=plan.actors),
                     fn_constructor_kwargs={"payload": payload, "use_gpu": cfg.use_gpu, "threads": cfg.actor_cpus,
                                            "preprocess": cfg.resolved_preprocess},
                     num_gpus=1 if cfg.use_gpu else 0, num_cpus=0 if cfg.use_gpu else cfg.actor_cpus)
        .map_batches(to_prediction_table, batch_format="numpy", fn_kwargs={
            "run_id": run_id, "model_version": bundle.version, "screened_at": _dt.datetime.now(_dt.timezone.utc)})
    )


def _screen(cfg: ScreenConfig, store: Store, bundle: Bundle, listing: dict, key: bytes, run_id: str,
            pred_uri: str) -> int:
    """Run the pipeline for the listed objects; returns the rows written (checked against the listing)."""
    if not listing["to_screen"]:
        return 0
    ensure_ray()
    # Sizes the user left unset, from the cluster's resources and the measured rates (screen.sizing).
    plan = plan_screening(cfg, ray.cluster_resources())
    cfg = dataclasses.replace(cfg, actors=plan.actors, batch_size=plan.batch_size, decode_tasks=plan.decode_tasks)
    # The console turns this line into a progress line fed by the inference operator's output
    # rows (kneescreen._private.console); Ray Data's own progress dumps go to the log file.
    _logger.info("run %s: screening %d objects on %d inference actor(s) x %s, preprocessing on %s", run_id,
                 listing["to_screen"], cfg.actors, "1 GPU" if cfg.use_gpu else f"{cfg.actor_cpus} CPU",
                 "the actors' device" if cfg.resolved_preprocess == "device" else "CPU decode tasks",
                 extra={"progress_total": listing["to_screen"], "progress_unit": "images",
                        "progress_label": "screening", "progress_op": EnsemblePredictor.__name__})
    (_logger.warning if plan.bottleneck == "decode" else _logger.info)("run %s: sizing: %s", run_id, plan.describe())
    ds = build_dataset(cfg, store, bundle, listing["chunk_uris"], key, run_id, plan)
    out_fs, out_path = store.filesystem(pred_uri)
    # Blocks are small (decode_batch_size rows) for pipelining; files are not: analytics engines
    # prefer fewer, larger Parquet files.
    ds.write_parquet(out_path, filesystem=out_fs, min_rows_per_file=PREDICTION_FILE_ROWS)
    # From the footers: the check costs no data reads, whatever the run's size.
    written = store.count_parquet_rows(pred_uri)
    if written != listing["to_screen"]:
        raise KneescreenError(f"run {run_id}: wrote {written} rows for {listing['to_screen']} listed objects; "
                              "not committing (the next run re-screens)")
    return written


def _count_predictions(store: Store, pred_uri: str, written: int) -> PredictionCounts:
    """Stream this run's predictions (only the stats columns) into counts: driver memory holds
    a few record batches and the per-subgroup counts, never the run's rows."""
    if not written:
        return PredictionCounts()
    return PredictionCounts.of(store.iter_parquet_batches(pred_uri, list(STATS_COLUMNS), schema=PREDICTIONS))


def _patients(cfg: ScreenConfig, store: Store, runs: list[dict], run_id: str, version: str, pred_uri: str,
              written: int) -> dict:
    """Write the patients snapshot (and, with reference labels, the patient-level stats rows)."""
    uris = [r["predictions"] for r in runs if r.get("predictions")] + ([pred_uri] if written else [])
    if uris:
        ensure_ray()
    dest = write_patients(store, cfg.output, uris, run_id, version)
    n = store.count_parquet_rows(dest)
    if cfg.reference:
        batches = store.iter_parquet_batches(dest, ["predicted_class", "reference_label", "low_bmd_flag"],
                                             schema=PATIENTS)
        store.write_parquet(patient_stats(batches, run_id, version),
                            join(cfg.output, "stats", f"model_version={version}", f"run_id={run_id}",
                                 "patient_stats.parquet"))
    return {"uri": dest, "rows": n}


def _run_manifest(cfg: ScreenConfig, run_id: str, version: str, key: bytes, listing: dict, counts,
                  started: _dt.datetime, timing: dict, pred_uri: str, patients: dict | None = None) -> dict:
    """The run manifest (the commit's content).

    ``counts`` is the run's `PredictionCounts`, or its rows (a DataFrame or Arrow table) for
    callers that hold them; ``patients`` the snapshot `_patients` wrote (uri, rows).
    """
    counts = counts if isinstance(counts, PredictionCounts) else PredictionCounts.of(counts)
    written = counts.rows
    screen_s = timing["screen"]
    return {
        "run_id": run_id, "started_at": started.isoformat(), "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "model_version": version, "bundle": cfg.bundle, "input": cfg.input, "output": cfg.output, "mode": cfg.mode,
        "listing_fingerprint": listing["fingerprint"],
        # Which pseudonymisation key made this run's ids (a hash of the key, never the key):
        # rows with different key ids cannot be joined on patient_pseudo_id.
        "pseudonym_key_id": hashlib.sha256(b"kneescreen-key-id:" + key).hexdigest()[:12],
        # retried: objects screened again because an earlier committed run of this model version
        # left them as errors (transient ones, or any with --retry-errors); exhausted: this run's
        # retries_exhausted rows (a transient error past --max-retries, now permanent);
        # skipped_directory_markers: S3 keys ending in "/" below the input (not objects, not listed).
        "counts": {"listed": listing["listed"], "already_screened": listing["already_done"], "screened": written,
                   "retried": listing.get("retried", 0),
                   "skipped_directory_markers": listing.get("skipped_directory_markers", 0),
                   "exhausted": int(counts.error_codes.get("retries_exhausted", 0)), **counts.status_counts(),
                   "patients": patients["rows"] if patients else 0},
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "throughput_images_per_s": round(written / screen_s, 2) if written and screen_s > 0 else None,
        "error_codes": {k: int(v) for k, v in sorted(counts.error_codes.items(), key=lambda kv: (-kv[1], kv[0]))},
        # Storage bytes this run fetched (the predictions' bytes_read column summed).
        "bytes_read": int(counts.bytes_read),
        "config": to_flat_dict(cfg),
        "predictions": pred_uri if written else None,
        # This run's patients snapshot (`screen.patients`): the archive's state per patient.
        "patients": patients["uri"] if patients else None,
    }


def run_screen(cfg: ScreenConfig, store: Store | None = None) -> dict:
    """Screen an archive and commit a run. Returns the run manifest.

    Raises:
        KneescreenError: bad configuration (missing key, unreadable bundle or side tables), or a
            row-count mismatch (the run is then not committed and the next run re-screens).
    """
    cfg.validate()
    # Record what ran (the manifest's config and configs/run_id=<r>.yaml), not "default".
    cfg = dataclasses.replace(cfg, preprocess=cfg.resolved_preprocess)
    store = store or Store.resolve(cfg.endpoint_url)
    key = pseudonym_key(required=True)  # fail before any work if the secret is missing
    started, run_id, t_start = _dt.datetime.now(_dt.timezone.utc), ledger.new_run_id(), time.perf_counter()
    runs = ledger.committed_runs(store, cfg.output)
    dropped = ledger.drop_uncommitted(store, cfg.output, {r["run_id"] for r in runs})
    if dropped:
        _logger.warning("removed files of %d uncommitted run(s): %s", len(dropped), ", ".join(dropped))
    # Heavy set-up once, on the driver: download + verify the bundle, then share the verified
    # tensors with every actor through the object store (no per-actor S3 reads or re-hashing).
    bundle = load_bundle(cfg.bundle, store=store)
    listing = diff.diff_listing(store, cfg, run_id, runs, bundle.version)
    t_listed = time.perf_counter()
    _logger.info("run %s: listed %d objects, %d already screened by model %s, %d to screen (%d retried; "
                 "%d diff partition(s))", run_id, listing["listed"], listing["already_done"], bundle.version,
                 listing["to_screen"], listing["retried"], listing["partitions"])
    pred_uri = join(cfg.output, "predictions", f"model_version={bundle.version}", f"run_id={run_id}")
    written = _screen(cfg, store, bundle, listing, key, run_id, pred_uri)
    t_screened = time.perf_counter()
    counts = _count_predictions(store, pred_uri, written)
    store.write_parquet(compute_stats(counts, run_id, bundle.version),
                        join(cfg.output, "stats", f"model_version={bundle.version}", f"run_id={run_id}", "stats.parquet"))
    patients = _patients(cfg, store, runs, run_id, bundle.version, pred_uri, written)
    timing = {"list_and_diff": t_listed - t_start, "screen": t_screened - t_listed, "total": time.perf_counter() - t_start}
    manifest = _run_manifest(cfg, run_id, bundle.version, key, listing, counts, started, timing, pred_uri, patients)
    store.delete_prefix(listing["scratch"])
    # The resolved config beside the outputs: `kneescreen screen --config` replays this run.
    store.write_bytes(join(cfg.output, "configs", f"run_id={run_id}.yaml"), dump_yaml(cfg).encode())
    ledger.commit_run(store, cfg.output, manifest)
    _logger.info("run %s committed: %s", run_id, json.dumps(manifest["counts"]))
    return manifest
