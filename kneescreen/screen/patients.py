"""The patients table: one row per pseudonymous patient over the archive's current state.

    committed runs' predictions (+ this run's) --read (Ray tasks, one per file)-->
      groupby(key): the latest ok row per object (`latest_ok`)
      --> groupby(patient): one row per patient (`aggregate_patient`)
      --> patients/model_version=<v>/run_id=<r>/*.parquet (`schema.PATIENTS`)

The archive's state is the latest committed ``ok`` prediction of every object key, across runs
and model versions (latest by ``screened_at``, then run id): an incremental rescan screens only
new or changed objects, so the earlier runs' rows still describe the rest. Both groupings run as
Ray Data shuffles and the driver holds only the file list; a small state (at most
`LOCAL_MAX_FILES` files and `LOCAL_MAX_ROWS` rows by their footers) is grouped in process by the
same two functions instead, because two shuffles cost seconds of fixed overhead per run.

Aggregation rule (`AGGREGATION_RULE`): the patient's prediction is that of the **highest-risk
film of the latest study**. The latest study, because bone density only changes over time and a
programme refers on the current state, not on a film from years ago; the highest-risk film, because
the two knees of one study are the same patient on the same day, and low bone density in one is
reason enough to refer (a mean would dilute a one-sided finding). Studies are ordered by study
date (undated studies count as older than dated ones, ties by study id); films without a study id
are each their own study. Films without a patient id (PNG / JPEG without a sidecar) are one-film
patients with a null ``patient_pseudo_id`` and ``patient_id_missing`` set; their ``deciding_key``
identifies them.

Incremental: adding a film to a patient changes that patient's row only; every other row of the
next snapshot has the same content (bar the snapshot's ``run_id`` / ``model_version``).
"""

from __future__ import annotations

import datetime as _dt

import pyarrow as pa
import pyarrow.compute as pc
import ray

from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES
from kneescreen.screen.schema import PATIENTS, PREDICTIONS

AGGREGATION_RULE = ("the highest-risk film of the latest study (by study date; undated studies oldest; ties by "
                    "study id) over the latest committed ok prediction per object; films without a patient id are "
                    "one-film patients")
STATE_COLUMNS = ("key", "status", "patient_pseudo_id", "study_pseudo_id", "study_date", "laterality", "risk_score",
                 "p_osteoporosis", "predicted_class", "low_bmd_flag", "triage_zone", "t_score_est", "t_score_lo", "t_score_hi",
                 "predictor", "model_version", "run_id", "reference_label", "reference_t_score", "screened_at")
LOCAL_MAX_FILES = 64  # engine "auto": at most this many predictions files ...
LOCAL_MAX_ROWS = 20_000  # ... holding at most this many rows are grouped in process
ENGINES = ("auto", "local", "ray")
STATE_SCHEMA = pa.schema([PREDICTIONS.field(c) for c in STATE_COLUMNS] + [pa.field("patient_group", pa.string())])


def state_rows(table: pa.Table) -> pa.Table:
    """Prediction rows -> the state columns (`STATE_SCHEMA`); files written before a column
    existed read it as null. ``patient_group`` is the patient id, or ``film:<key>`` without one."""
    n = table.num_rows
    cols = {c: table.column(c).cast(PREDICTIONS.field(c).type) if c in table.schema.names
            else pa.nulls(n, PREDICTIONS.field(c).type) for c in STATE_COLUMNS}
    film = pc.binary_join_element_wise(pa.array(["film:"] * n, pa.string()), cols["key"], "")
    cols["patient_group"] = pc.coalesce(cols["patient_pseudo_id"], film)
    return pa.table(cols, schema=STATE_SCHEMA)


def read_state_file(batch: pa.Table, store: Store) -> pa.Table:
    """Ray task: one predictions file (``file`` column) -> its ok rows in `STATE_SCHEMA`."""
    tables = [state_rows(store.read_parquet(uri)) for uri in batch.column("file").to_pylist()]
    t = pa.concat_tables(tables) if tables else STATE_SCHEMA.empty_table()
    return t.filter(pc.equal(t.column("status"), "ok"))


def latest_ok(group: pa.Table) -> pa.Table:
    """One object's rows -> its latest ok row (by screened_at, then run id); none when none is ok."""
    ok = group.filter(pc.equal(group.column("status"), "ok"))
    if ok.num_rows <= 1:
        return ok
    order = ok.sort_by([("screened_at", "descending"), ("run_id", "descending")])
    return order.slice(0, 1)


def _study_order(row: dict) -> tuple:
    date = row["study_date"]
    return (date is not None, date or _dt.date.min, row["study_pseudo_id"] or f"film:{row['key']}")


def aggregate_patient(group: pa.Table, run_id: str, model_version: str) -> pa.Table:
    """One patient's state rows -> one `schema.PATIENTS` row (`AGGREGATION_RULE`)."""
    rows = group.to_pylist()
    for r in rows:
        r["study"] = r["study_pseudo_id"] or f"film:{r['key']}"
    latest = max(rows, key=_study_order)["study"]
    study = [r for r in rows if r["study"] == latest]
    top = max(study, key=lambda r: (r["risk_score"] if r["risk_score"] is not None else -1.0, r["key"]))
    dates = [r["study_date"] for r in rows if r["study_date"] is not None]
    refs = [r["reference_label"] for r in study if r["reference_label"] in CLASSES]
    ref_t = [r["reference_t_score"] for r in study if r["reference_t_score"] is not None]
    out = {
        "run_id": run_id, "model_version": model_version, "patient_pseudo_id": top["patient_pseudo_id"],
        "patient_id_missing": top["patient_pseudo_id"] is None, "n_images": len(rows),
        "n_studies": len({r["study"] for r in rows}), "first_study_date": min(dates) if dates else None,
        "last_study_date": max(dates) if dates else None, "deciding_key": top["key"],
        "deciding_study_pseudo_id": top["study_pseudo_id"], "deciding_laterality": top["laterality"],
        **{c: top[c] for c in ("risk_score", "p_osteoporosis", "predicted_class", "low_bmd_flag", "triage_zone", "t_score_est",
                               "t_score_lo", "t_score_hi", "predictor")},
        "deciding_model_version": top["model_version"], "deciding_run_id": top["run_id"],
        "reference_label": max(refs, key=CLASSES.index) if refs else None,
        "reference_t_score": min(ref_t) if ref_t else None,
    }
    return pa.Table.from_pylist([out], schema=PATIENTS)


def _groups(table: pa.Table, column: str):
    """The rows of ``table`` sharing each value of ``column``, one slice per value (sorted)."""
    ordered = table.sort_by([(column, "ascending")])
    values = ordered.column(column).to_pylist()
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            yield ordered.slice(start, i - start)
            start = i


def _patients_of_state(state: pa.Table, run_id: str, model_version: str) -> pa.Table:
    """State rows -> patients rows in process: `latest_ok` per key, then `aggregate_patient`."""
    latest = [latest_ok(g) for g in _groups(state, "key")]
    latest = pa.concat_tables(latest) if latest else STATE_SCHEMA.empty_table()
    rows = [aggregate_patient(g, run_id, model_version) for g in _groups(latest, "patient_group")]
    return pa.concat_tables(rows) if rows else PATIENTS.empty_table()


def patients_of(predictions: pa.Table, run_id: str, model_version: str) -> pa.Table:
    """The whole computation in memory, from prediction rows (small tables and tests)."""
    return _patients_of_state(state_rows(predictions), run_id, model_version)


def prediction_files(store: Store, prediction_uris: list[str]) -> list[str]:
    """Every Parquet file below the given predictions folders."""
    return [obj.uri for uri in prediction_uris for obj in store.list_objects(uri, include=("*.parquet",))]


def shuffle_partitions(n_files: int) -> int:
    """Hash partitions for the two groupbys: one per predictions file, between 2 and 200.

    Ray Data's default (`DataContext.default_hash_shuffle_parallelism`, 200) starts 200 reduce
    tasks even for a 40-row run, which cost ~5 s per screen on a 2-core machine; the predictions
    files already bound the data's size (each holds at most one write block).
    """
    return max(2, min(200, n_files))


def build_patients(store: Store, files: list[str], run_id: str, model_version: str) -> ray.data.Dataset:
    """The lazy Ray Data plan from predictions files to `schema.PATIENTS` rows."""
    parts = shuffle_partitions(len(files))
    return (
        ray.data.from_items([{"file": f} for f in files])
        .map_batches(read_state_file, batch_size=1, batch_format="pyarrow", fn_kwargs={"store": store})
        .groupby("key", num_partitions=parts).map_groups(latest_ok, batch_format="pyarrow")
        .groupby("patient_group", num_partitions=parts).map_groups(
            aggregate_patient, batch_format="pyarrow", fn_kwargs={"run_id": run_id, "model_version": model_version})
    )


def choose_engine(store: Store, files: list[str], engine: str = "auto") -> str:
    """``local`` for a small state (`LOCAL_MAX_FILES`, `LOCAL_MAX_ROWS` from the footers), else ``ray``."""
    if engine not in ENGINES:
        raise KneescreenError(f"patients engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine != "auto":
        return engine
    if len(files) > LOCAL_MAX_FILES:
        return "ray"
    rows = 0
    for f in files:
        rows += store.count_parquet_rows(f)
        if rows > LOCAL_MAX_ROWS:
            return "ray"
    return "local"


def write_patients(store: Store, output: str, prediction_uris: list[str], run_id: str, model_version: str,
                   engine: str = "auto") -> str:
    """Compute the snapshot and write it under ``patients/``; returns its folder.

    Args:
        prediction_uris: the predictions folders of every committed run and of this run.
        engine: ``ray`` (two Ray Data shuffles), ``local`` (in process) or ``auto`` (`choose_engine`).
    """
    dest = join(output, "patients", f"model_version={model_version}", f"run_id={run_id}")
    files = prediction_files(store, prediction_uris)
    if not files:
        store.write_parquet(PATIENTS.empty_table(), join(dest, "patients.parquet"))
        return dest
    if choose_engine(store, files, engine) == "local":
        state = read_state_file(pa.table({"file": files}), store)  # the Ray plan's read, in one call
        store.write_parquet(_patients_of_state(state, run_id, model_version), join(dest, "patients.parquet"))
        return dest
    ds = build_patients(store, files, run_id, model_version)
    fs, path = store.filesystem(dest)
    ds.write_parquet(path, filesystem=fs, schema=PATIENTS)
    try:
        wrote = next(iter(store.list_objects(dest, include=("*.parquet",))), None) is not None
    except KneescreenError:  # a local folder Ray never created
        wrote = False
    if not wrote:  # no ok rows anywhere: an empty snapshot, so readers find the table
        store.write_parquet(PATIENTS.empty_table(), join(dest, "patients.parquet"))
    return dest
