"""The Parquet schemas of every screening output (one module: writers cast to these, tests
assert them, docs/schema.md explains them).

Layout under the output root (hive-style directories, queryable by DuckDB/Athena/Trino)::

    predictions/model_version=<v>/run_id=<r>/*.parquet   one row per listed object per run
    stats/model_version=<v>/run_id=<r>/stats.parquet      per run and subgroup, long format
    stats/model_version=<v>/run_id=<r>/patient_stats.parquet   patient-level rows (with --reference)
    patients/model_version=<v>/run_id=<r>/*.parquet       one row per patient: the archive's state
    runs/run_id=<r>.json                                  the run manifest, written LAST

A run without its manifest did not happen: readers and incremental rescans only look at runs
listed under ``runs/``, and the next run deletes an uncommitted run's files before it starts.
"""

from __future__ import annotations

import pyarrow as pa

PREDICTIONS = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),  # object key relative to the input root
    pa.field("etag", pa.string()),
    pa.field("size", pa.int64()),
    pa.field("status", pa.string(), nullable=False),  # ok | error | skipped
    pa.field("error_code", pa.string()),  # kneescreen.errors.ERROR_CODES, or not_knee / not_radiograph
    pa.field("message", pa.string()),
    pa.field("format", pa.string()),  # dicom | png | jpeg
    pa.field("patient_pseudo_id", pa.string()),  # HMAC-SHA256(KNEESCREEN_PSEUDONYM_KEY, PatientID)
    pa.field("study_pseudo_id", pa.string()),  # HMAC of StudyInstanceUID
    pa.field("laterality", pa.string()),
    pa.field("view", pa.string()),
    pa.field("site", pa.string()),
    pa.field("manufacturer", pa.string()),
    pa.field("sex", pa.string()),  # F | M | None
    pa.field("age", pa.float64()),  # years
    pa.field("age_band", pa.string()),
    pa.field("study_date", pa.date32()),  # DICOM StudyDate (or the sidecar's study_date)
    pa.field("p_normal", pa.float64()),
    pa.field("p_osteopenia", pa.float64()),
    pa.field("p_osteoporosis", pa.float64()),
    pa.field("predicted_class", pa.string()),
    pa.field("risk_score", pa.float64()),  # P(osteopenia) + P(osteoporosis): low-BMD risk
    pa.field("low_bmd_flag", pa.bool_()),  # risk_score >= the bundle's low-BMD threshold
    pa.field("osteoporosis_flag", pa.bool_()),
    pa.field("predictor", pa.string()),  # covariates | fused | image (image-only fallback: age/sex missing)
    pa.field("covariates_imputed", pa.bool_()),
    # What the deployed predictor is compared with (report, "what the radiograph adds"): the
    # image ensemble's and the age/sex model's class probabilities [normal, osteopenia,
    # osteoporosis]; null where that predictor has no output (no covariate model, age/sex missing).
    pa.field("image_probs", pa.list_(pa.float64())),
    pa.field("covariates_probs", pa.list_(pa.float64())),
    # rule_out (risk below the bundle's rule-out threshold: NPV >= target out of fold) | rule_in
    # (PPV >= target) | refer (send to DXA); null for bundles trained before triage zones.
    pa.field("triage_zone", pa.string()),
    # T-score estimate and its split-conformal interval (the bundle's coverage, default 90%);
    # null where the bundle has no T-score estimate (too few training T-scores: its manifest says).
    pa.field("t_score_est", pa.float64()),
    pa.field("t_score_lo", pa.float64()),
    pa.field("t_score_hi", pa.float64()),
    pa.field("reference_label", pa.string()),
    pa.field("reference_t_score", pa.float64()),
    pa.field("decode_ms", pa.float64()),
    # Bytes fetched from storage for this object: its size, or less where header triage skipped
    # a non-knee DICOM after its header (docs/operations.md).
    pa.field("bytes_read", pa.int64()),
    pa.field("infer_ms", pa.float64()),  # per image: batch inference time / batch size
    pa.field("inferred_at", pa.timestamp("us", tz="UTC")),  # when this image's inference batch started
    pa.field("screened_at", pa.timestamp("us", tz="UTC")),
])

STATS = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("subgroup_type", pa.string(), nullable=False),  # all | site | manufacturer | sex | age_band | view | patient
    pa.field("subgroup", pa.string(), nullable=False),
    pa.field("target", pa.string(), nullable=False),  # status / class / low_bmd / overall / confusion:<true>-><pred>
    pa.field("metric", pa.string(), nullable=False),  # count | prevalence | sensitivity | specificity | ppv | ...
    pa.field("value", pa.float64()),
    pa.field("ci_lo", pa.float64()),  # Wilson 95% interval where the metric is a proportion
    pa.field("ci_hi", pa.float64()),
    pa.field("numerator", pa.int64()),
    pa.field("denominator", pa.int64()),
])

# One row per patient over the archive's current state: the latest committed ok prediction per
# object across runs (`screen.patients` states the aggregation rule). Each committed run writes a
# whole snapshot; readers take the latest committed run's.
PATIENTS = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),  # the run that wrote this snapshot
    pa.field("model_version", pa.string(), nullable=False),  # that run's bundle
    pa.field("patient_pseudo_id", pa.string()),  # null: a film without a patient id (one-film patient)
    pa.field("patient_id_missing", pa.bool_(), nullable=False),
    pa.field("n_images", pa.int64(), nullable=False),
    pa.field("n_studies", pa.int64(), nullable=False),
    pa.field("first_study_date", pa.date32()),
    pa.field("last_study_date", pa.date32()),
    pa.field("deciding_key", pa.string(), nullable=False),  # the film whose prediction is the patient's
    pa.field("deciding_study_pseudo_id", pa.string()),
    pa.field("deciding_laterality", pa.string()),
    pa.field("risk_score", pa.float64()),  # the deciding film's low-BMD risk
    pa.field("p_osteoporosis", pa.float64()),
    pa.field("predicted_class", pa.string()),
    pa.field("low_bmd_flag", pa.bool_()),
    pa.field("triage_zone", pa.string()),
    pa.field("t_score_est", pa.float64()),
    pa.field("t_score_lo", pa.float64()),
    pa.field("t_score_hi", pa.float64()),
    pa.field("predictor", pa.string()),
    pa.field("deciding_model_version", pa.string()),  # the bundle that scored the deciding film
    pa.field("deciding_run_id", pa.string()),  # the run that scored it
    # Most severe reference class / lowest reference T-score over the deciding study's films.
    pa.field("reference_label", pa.string()),
    pa.field("reference_t_score", pa.float64()),
])

STATUSES = ("ok", "error", "skipped")
