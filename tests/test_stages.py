"""The three screening stages without Ray: listing -> decode_stage -> EnsemblePredictor ->
to_prediction_table, chained by hand the way `pipeline.build_dataset` chains them.

Between stages the blocks go through Ray Data's own Arrow -> numpy batch conversion
(`BlockAccessor.to_batch_format("numpy")`, no cluster needed), so what the actor and the
postprocess function see here is what they see in a real run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import pathlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pydicom
import pytest
from ray.data.block import BlockAccessor

from kneescreen.data.decode import DecodeSpec, load_side_table
from kneescreen.fileio.privacy import pseudonymise
from kneescreen.fileio.store import Store
from kneescreen.labels import CLASSES
from kneescreen.model.bundle import load_bundle
from kneescreen.screen.schema import PREDICTIONS
from kneescreen.screen.stages import EnsemblePredictor, decode_stage, to_prediction_table

PSEUDO_KEY = b"k" * 16
SCREENED_AT = _dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=_dt.timezone.utc)
PROBS = ["p_normal", "p_osteopenia", "p_osteoporosis"]


def _numpy(table: pa.Table) -> dict:
    """An Arrow block as Ray Data hands it to a ``batch_format="numpy"`` function."""
    return BlockAccessor.for_block(table).to_batch_format("numpy")


def _listing(root: pathlib.Path, extra: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> pa.Table:
    """Listing rows (key, etag, size) as the ledger writes them, plus made-up keys in ``extra``."""
    objs = [o for o in Store().list_objects(str(root / "images")) if only is None or o.key in only]
    rows = [{"key": o.key, "etag": o.etag, "size": o.size} for o in objs]
    rows += [{"key": k, "etag": "0-0", "size": 0} for k in extra]
    return pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("etag", pa.string()),
                                                         ("size", pa.int64())]))


def _spec(root: pathlib.Path, metadata: str | None = None, policy: str = "skip") -> DecodeSpec:
    store = Store()
    return DecodeSpec(store=store, sizes=(64,), root=str(root / "images"), pseudo_key=PSEUDO_KEY,
                      reference=load_side_table(store, str(root / "labels.csv")),
                      metadata=load_side_table(store, metadata), body_part_policy=policy)


def _chain(listing: pa.Table, spec: DecodeSpec, predictor: EnsemblePredictor, version: str) -> pa.Table:
    decoded = decode_stage(_numpy(listing), spec)
    predicted = predictor(_numpy(decoded))
    return to_prediction_table(_numpy(predicted), run_id="run-1", model_version=version, screened_at=SCREENED_AT)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def predictor(bundle):
    return EnsemblePredictor({"manifest": bundle.manifest, "states": bundle.states()})


@pytest.fixture(scope="module")
def metadata_csv(small_archive, labels, tmp_path_factory) -> tuple[str, set[str]]:
    """A sidecar for the PNG/JPEG images (no headers): the first one gets age and sex, the rest only
    a site. Returns (path, keys whose sidecar carries age and sex)."""
    raster = sorted(k for k, r in labels.items() if r["format"] != "dicom")
    assert len(raster) >= 2, "the archive fixture should hold several PNG/JPEG images"
    rows, with_cov = [], set(raster[:1])
    for k in raster:
        r = labels[k]
        rows.append({"key": k, "site": r["site"], "age": r["age"] if k in with_cov else "",
                     "sex": r["sex"] if k in with_cov else ""})
    path = tmp_path_factory.mktemp("sidecar") / "metadata.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["key", "site", "age", "sex"])
        w.writeheader()
        w.writerows(rows)
    return str(path), with_cov


@pytest.fixture(scope="module")
def screened(small_archive, metadata_csv, predictor, bundle):
    """(prediction table, as pandas, listed keys) for the whole archive plus one missing key."""
    root, _ = small_archive
    listing = _listing(root, extra=("site-a/missing-object.dcm",))
    before = _dt.datetime.now(_dt.timezone.utc)
    table = _chain(listing, _spec(root, metadata_csv[0]), predictor, bundle.version)
    after = _dt.datetime.now(_dt.timezone.utc)
    return table, table.to_pandas(), listing.column("key").to_pylist(), (before, after)


def test_one_row_per_listed_object(screened, labels):
    table, df, listed, _ = screened
    assert table.num_rows == len(listed)
    assert sorted(df["key"]) == sorted(listed)
    assert df["key"].is_unique
    # Every synthetic image decodes; nothing good is lost on the way.
    assert sorted(df.loc[df["status"] == "ok", "key"]) == sorted(labels)


def test_schema_is_exactly_predictions(screened):
    table, _, _, _ = screened
    assert table.schema == PREDICTIONS, table.schema


def test_run_columns_are_filled(screened, bundle):
    _, df, _, _ = screened
    assert (df["run_id"] == "run-1").all()
    assert (df["model_version"] == bundle.version).all()
    assert (df["screened_at"] == SCREENED_AT).all()


def test_planted_bad_objects_keep_their_codes(screened, planted):
    _, df, _, _ = screened
    assert planted, "planted.csv is empty"
    rows = df.set_index("key")
    for key, expected in planted.items():
        row = rows.loc[key]
        assert row["error_code"] == expected, (key, row["status"], row["error_code"], row["message"])
        assert row["status"] == ("skipped" if expected == "not_knee" else "error"), key
        assert row["message"], key
        assert row[PROBS + ["risk_score"]].isna().all(), key
        assert pd.isna(row["predicted_class"]) and pd.isna(row["predictor"]), key
        assert pd.isna(row["low_bmd_flag"]) and pd.isna(row["inferred_at"]), key


def test_missing_object_is_a_vanished_row(screened):
    _, df, _, _ = screened
    row = df.set_index("key").loc["site-a/missing-object.dcm"]
    assert row["status"] == "error"
    assert row["error_code"] == "vanished"  # listed, gone at read time (issue #20)
    assert "deleted after the listing" in row["message"]
    assert np.isnan(row["p_normal"])


def test_ok_rows_have_calibrated_outputs(screened, bundle):
    _, df, _, _ = screened
    ok = df[df["status"] == "ok"]
    assert len(ok) > 0
    assert ok["error_code"].isna().all()
    probs = ok[PROBS].to_numpy(float)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert set(ok["predicted_class"]) <= set(CLASSES)
    np.testing.assert_allclose(ok["risk_score"], ok["p_osteopenia"] + ok["p_osteoporosis"], atol=1e-9)
    threshold = bundle.manifest.thresholds.low_bmd.threshold
    assert (ok["low_bmd_flag"] == (ok["risk_score"] >= threshold)).all()
    assert (ok["infer_ms"] > 0).all() and (ok["decode_ms"] > 0).all()


def test_ok_rows_carry_triage_zone_and_t_score_interval(screened, bundle):
    _, df, _, _ = screened
    ok, bad = df[df["status"] == "ok"], df[df["status"] != "ok"]
    tri = bundle.manifest.triage
    expected = np.where(ok["risk_score"] < tri.rule_out.threshold, "rule_out",
                        np.where(ok["risk_score"] >= tri.rule_in.threshold, "rule_in", "refer"))
    assert (ok["triage_zone"].to_numpy() == expected).all() and set(expected) >= {"refer"}
    # The bundle's T-score model is age + sex: a linear function of the covariate features.
    assert ok[["t_score_est", "t_score_lo", "t_score_hi"]].notna().all().all()
    np.testing.assert_allclose(ok["t_score_hi"] - ok["t_score_est"], bundle.manifest.t_score.half_width)
    np.testing.assert_allclose(ok["t_score_est"] - ok["t_score_lo"], bundle.manifest.t_score.half_width)
    assert ok["t_score_est"].nunique() > 1
    assert bad[["triage_zone", "t_score_est", "t_score_lo", "t_score_hi"]].isna().all().all()


def test_inference_time_is_when_it_ran_in_utc(screened):
    """``inferred_at`` survives both numpy round trips without a time-zone shift."""
    _, df, _, (before, after) = screened
    ok = df[df["status"] == "ok"]
    assert ok["inferred_at"].between(pd.Timestamp(before), pd.Timestamp(after)).all(), (before, after)
    assert df.loc[df["status"] != "ok", "inferred_at"].isna().all()


def test_fused_only_with_age_and_sex_else_image_fallback(screened, metadata_csv):
    _, df, _, _ = screened
    _, with_cov = metadata_csv
    ok = df[df["status"] == "ok"]
    has_cov = ok["age"].notna() & ok["sex"].notna()
    assert has_cov.any() and (~has_cov).any(), "the fixture should give both kinds of rows"
    assert (ok.loc[has_cov, "predictor"] == "fused").all()
    assert (~ok.loc[has_cov, "covariates_imputed"].astype(bool)).all()
    assert (ok.loc[~has_cov, "predictor"] == "image").all()
    assert ok.loc[~has_cov, "covariates_imputed"].astype(bool).all()
    # DICOM headers give age and sex; the sidecar gives them to the one raster image that has them.
    assert (ok.loc[ok["format"] == "dicom", "predictor"] == "fused").all()
    raster = ok[ok["format"] != "dicom"].set_index("key")
    for key in raster.index:
        assert raster.loc[key, "predictor"] == ("fused" if key in with_cov else "image"), key


def test_sidecar_fills_raster_metadata(screened, labels):
    _, df, _, _ = screened
    raster = df[(df["status"] == "ok") & (df["format"] != "dicom")].set_index("key")
    for key, row in raster.iterrows():
        assert row["site"] == labels[key]["site"], key


def test_no_raw_patient_identifier_in_output(screened, small_archive, labels):
    table, df, _, _ = screened
    root, _ = small_archive
    dicoms = sorted(k for k, r in labels.items() if r["format"] == "dicom")
    ds = pydicom.dcmread(root / "images" / dicoms[0], stop_before_pixels=True)
    raw = {str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID)}
    assert all(len(v) >= 6 for v in raw)
    for field in table.schema:
        if pa.types.is_string(field.type):
            for value in table.column(field.name).to_pylist():
                for secret in raw:
                    assert value is None or secret not in value, (field.name, value)
    # The pseudonym is the keyed HMAC, so the same patient links across runs that share the key.
    row = df.set_index("key").loc[dicoms[0]]
    assert row["patient_pseudo_id"] == pseudonymise(str(ds.PatientID), PSEUDO_KEY, "p")
    assert row["study_pseudo_id"] == pseudonymise(str(ds.StudyInstanceUID), PSEUDO_KEY, "s")


def test_same_patient_same_pseudonym(screened, labels):
    _, df, _, _ = screened
    dicom_ok = df[(df["status"] == "ok") & (df["format"] == "dicom")]
    by_ref: dict[str, set] = {}
    for _, row in dicom_ok.iterrows():
        by_ref.setdefault(labels[row["key"]]["patient_ref"], set()).add(row["patient_pseudo_id"])
    assert any(len(v) == 1 for v in by_ref.values())
    assert all(len(v) == 1 for v in by_ref.values()), by_ref
    assert len({next(iter(v)) for v in by_ref.values()}) == len(by_ref)  # different patients differ


def test_reference_label_from_labels_csv(screened, labels):
    _, df, _, _ = screened
    rows = df.set_index("key")
    for key, lab in labels.items():
        assert rows.loc[key, "reference_label"] == lab["label"], key
        assert rows.loc[key, "reference_t_score"] == pytest.approx(float(lab["t_score"])), key
    assert rows.loc[[k for k in rows.index if k not in labels], "reference_label"].isna().all()


@pytest.mark.parametrize("policy,status,code", [("skip", "skipped", "not_knee"), ("keep", "ok", None)])
def test_body_part_policy_on_the_non_knee_object(small_archive, planted, predictor, bundle, policy, status, code):
    root, _ = small_archive
    chest = [k for k, c in planted.items() if c == "not_knee"]
    assert chest
    df = _chain(_listing(root, only=tuple(chest)), _spec(root, policy=policy), predictor, bundle.version).to_pandas()
    assert len(df) == len(chest)
    assert (df["status"] == status).all()
    if code is None:
        assert df["error_code"].isna().all()
        np.testing.assert_allclose(df[PROBS].sum(axis=1), 1.0, atol=1e-6)
    else:
        assert (df["error_code"] == code).all()
        assert df[PROBS].isna().all().all()


def test_a_block_without_ok_rows_passes_through(small_archive, planted, predictor, bundle):
    root, _ = small_archive
    bad = tuple(k for k, c in planted.items() if c != "not_knee")
    table = _chain(_listing(root, only=bad), _spec(root), predictor, bundle.version)
    assert table.schema == PREDICTIONS
    df = table.to_pandas()
    assert sorted(df["key"]) == sorted(bad)
    assert (df["status"] == "error").all()
    assert df[PROBS].isna().all().all() and df["predictor"].isna().all()


def test_blocks_with_and_without_errors_concatenate(small_archive, labels, planted):
    """A block whose error codes are all null keeps a string column, so Ray can batch it with others."""
    root, _ = small_archive
    good = decode_stage(_numpy(_listing(root, only=tuple(sorted(labels)[:3]))), _spec(root))
    bad = decode_stage(_numpy(_listing(root, only=tuple(planted))), _spec(root))
    assert good.column("error_code").null_count == good.num_rows
    both = pa.concat_tables([good, bad])
    assert both.num_rows == good.num_rows + bad.num_rows
    assert both.column("img_64").combine_chunks().to_numpy().shape == (both.num_rows, 64, 64)


def test_decoded_images_are_letterboxed_uint8(small_archive, labels, planted):
    root, _ = small_archive
    keys = tuple(sorted(labels)[:2]) + tuple(sorted(planted)[:2])
    batch = _numpy(decode_stage(_numpy(_listing(root, only=keys)), _spec(root)))
    img = batch["img_64"]
    assert img.dtype == np.uint8 and img.shape == (len(keys), 64, 64)
    ok = batch["status"] == "ok"
    assert ok.sum() == 2
    assert (img[ok].reshape(2, -1).max(1) > 0).all()  # real pixels for ok rows
    assert (img[~ok] == 0).all()  # zeros for the rest
