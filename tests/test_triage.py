"""Header triage in the decode batch function: a non-knee DICOM is skipped having read only its
header, everything else reads and decodes exactly as a whole-object read does, and ``bytes_read``
says how much was fetched (local files and the S3 server process)."""

from __future__ import annotations

import io
import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from kneescreen.data.decode import HEAD_BYTES, DecodeSpec, decode_batch, is_transient
from kneescreen.data.synth import SynthConfig, Subject, draw_subjects, encode_dicom, encode_raster, render_knee
from kneescreen.fileio.store import Store, join

SIZE = 1024  # 1024 x 1024 x 16 bit: a 2 MB uncompressed object, 32x the first read
_COLUMNS = ("status", "error_code", "message", "format", "patient_pseudo_id", "study_pseudo_id", "laterality",
            "view", "site", "manufacturer", "sex", "age", "age_band")


def _subject(fmt: str = "dicom") -> Subject:
    sub = draw_subjects(SynthConfig(n=1, seed=5, size=SIZE))[0]
    return Subject(**{**sub.__dict__, "fmt": fmt, "syntax": "1.2.840.10008.1.2.1"})  # explicit VR LE


def _edited(data: bytes, edit) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    edit(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _long_sequence(ds: Dataset) -> None:
    """~150 KB of header in a sequence before Pixel Data (the 64 KB boundary falls inside it)."""
    items = []
    for i in range(1500):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = f"C{i:05d}", "99X", "x" * 60
        items.append(item)
    ds.ProcedureCodeSequence = Sequence(items)


def _private_blob(ds: Dataset) -> None:
    """A 200 KB private OB element before Pixel Data (vendor CSA-style headers)."""
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091010, "OB", b"\x01" * 200_000)


@pytest.fixture(scope="module")
def objects() -> dict[str, bytes]:
    sub = _subject()
    img = render_knee(sub, SIZE)
    knee = encode_dicom(sub, img)
    chest = encode_dicom(sub, img, body_part="CHEST")
    out = {
        "knee.dcm": knee,
        "chest.dcm": chest,
        "ct.dcm": _edited(chest, lambda ds: setattr(ds, "Modality", "CT")),
        "chest-long-sequence.dcm": _edited(chest, _long_sequence),
        "chest-private-blob.dcm": _edited(chest, _private_blob),
        "knee-private-blob.dcm": _edited(knee, _private_blob),
        "chest-truncated.dcm": chest[: len(chest) // 2],
        "knee-truncated.dcm": knee[: len(knee) // 2],
        "knee-small.dcm": encode_dicom(sub, render_knee(sub, 128)),
        "knee.png": encode_raster(_subject("png"), img),
        "knee.jpg": encode_raster(_subject("jpeg"), img),
    }
    assert all(len(v) > HEAD_BYTES for k, v in out.items() if k != "knee-small.dcm")
    return out


def _decode(root: str, keys, triage: bool, store: Store | None = None) -> dict:
    spec = DecodeSpec(store=store or Store.resolve(), sizes=(256,), root=root, pseudo_key=b"k" * 16,
                      header_triage=triage)
    return decode_batch({"key": np.array(list(keys), object)}, spec)


def _rows(out: dict) -> dict[str, dict]:
    return {k: {c: out[c][i] for c in (*_COLUMNS, "bytes_read")} | {"img": out["img_256"][i]}
            for i, k in enumerate(out["key"])}


@pytest.fixture(scope="module")
def local(objects, tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("triage")
    for k, v in objects.items():
        (root / k).write_bytes(v)
    return _rows(_decode(str(root), sorted(objects), True)), _rows(_decode(str(root), sorted(objects), False))


SKIPPED = {"chest.dcm": ("not_knee", HEAD_BYTES), "ct.dcm": ("not_radiograph", HEAD_BYTES),
           "chest-long-sequence.dcm": ("not_knee", 4 * HEAD_BYTES),  # 64 KB, then 128 KB more
           "chest-private-blob.dcm": ("not_knee", 4 * HEAD_BYTES)}


@pytest.mark.parametrize("key", sorted(SKIPPED))
def test_non_knee_dicom_is_skipped_after_its_header(objects, local, key):
    triage, full = local
    code, read = SKIPPED[key]
    assert triage[key]["status"] == "skipped" and triage[key]["error_code"] == code
    assert triage[key]["bytes_read"] == read < len(objects[key]) / 5
    assert full[key]["bytes_read"] == len(objects[key])
    # The row is the one a whole read gives: same code, message, pseudonyms, age, sex, ...
    for c in _COLUMNS:
        assert triage[key][c] == full[key][c], c
    assert triage[key]["patient_pseudo_id"].startswith("p_") and triage[key]["age"] > 0


@pytest.mark.parametrize("key", ["knee.dcm", "knee-private-blob.dcm", "knee-small.dcm", "knee.png", "knee.jpg"])
def test_kept_objects_decode_exactly_as_a_whole_read(objects, local, key):
    triage, full = local
    assert triage[key]["status"] == "ok"
    for c in _COLUMNS:
        assert triage[key][c] == full[key][c], c
    np.testing.assert_array_equal(triage[key]["img"], full[key]["img"])
    assert triage[key]["img"].max() > 0
    # Every byte once: the header read plus the rest, never the head twice.
    assert triage[key]["bytes_read"] == full[key]["bytes_read"] == len(objects[key])


def test_error_codes_of_broken_objects_do_not_change(objects, local):
    triage, full = local
    # The header announces more pixel data than the object holds: left to the whole read.
    for key in ("knee-truncated.dcm", "chest-truncated.dcm"):
        assert triage[key]["error_code"] == full[key]["error_code"] == "truncated", key
        assert triage[key]["bytes_read"] == len(objects[key])


def test_planted_bad_objects_keep_their_codes_with_and_without_triage(small_archive, planted):
    root, _ = small_archive
    keys = sorted(planted)
    for triage in (True, False):
        out = _decode(str(root / "images"), keys, triage)
        assert dict(zip(keys, out["error_code"])) == planted
        sizes = [os.path.getsize(root / "images" / k) for k in keys]
        assert list(out["bytes_read"]) == sizes  # all small: one read each


def test_an_object_that_changes_between_reads_is_a_transient_error(objects, tmp_path):
    """The pieces of one object must come from one version of it (If-Match / size+mtime tag)."""
    path = tmp_path / "knee.dcm"
    path.write_bytes(objects["knee.dcm"])

    class Rewriting(Store):
        def read_range(self, uri, start, length, if_match=None):
            part = super().read_range(uri, start, length, if_match)
            if start == 0:  # a new version lands between the header read and the rest
                os.utime(uri, ns=(0, os.stat(uri).st_mtime_ns + 10**9))
            return part

    out = _decode(str(tmp_path), ["knee.dcm"], True, store=Rewriting())
    assert list(out["error_code"]) == ["changed_during_read"] and "changed" in out["message"][0]
    assert is_transient("changed_during_read")
    assert list(out["bytes_read"]) == [HEAD_BYTES]


def test_missing_object_reads_nothing(tmp_path):
    out = _decode(str(tmp_path), ["gone.dcm"], True)
    assert list(out["error_code"]) == ["vanished"] and list(out["bytes_read"]) == [0]


def test_real_dicom_files_give_the_same_rows_with_and_without_triage(dicom_files):
    """pydicom's and pydicom-data's files (CT, MR, US, ..., odd encodings): the same status and
    code as a whole read, except that a skipped object may now be one whose pixels would not
    have decoded (its header already says it is not a knee radiograph)."""
    import shutil
    import tempfile

    # Larger than the first read (else triage changes nothing) and quick to decode whole.
    names = sorted(k for k, p in dicom_files.items() if HEAD_BYTES < os.path.getsize(p) < 8 * 1024**2)
    assert len(names) >= 10
    with tempfile.TemporaryDirectory() as root:
        for n in names:
            shutil.copy(dicom_files[n], os.path.join(root, n))
        triage, full = _rows(_decode(root, names, True)), _rows(_decode(root, names, False))
    saved = 0
    for n in names:
        t, f = triage[n], full[n]
        if t["status"] == "skipped" and t["bytes_read"] < f["bytes_read"]:
            assert f["status"] in ("skipped", "error"), n
            assert f["status"] == "error" or t["error_code"] == f["error_code"], n
            saved += 1
        else:
            assert (t["status"], t["error_code"]) == (f["status"], f["error_code"]), n
            assert t["bytes_read"] == f["bytes_read"] == os.path.getsize(dicom_files[n]), n
    assert saved >= 5  # CT and MR volumes are skipped from their headers


@pytest.mark.s3
def test_triage_reads_only_the_header_on_s3(objects, s3_bucket):
    """The same through ranged GetObject requests on the S3 server process."""
    root = f"s3://{s3_bucket}/archive"
    keys = ["chest.dcm", "chest-private-blob.dcm", "knee.dcm", "knee.png", "knee-small.dcm"]
    for k in keys:
        Store.resolve().write_bytes(join(root, k), objects[k])
    triage, full = _rows(_decode(root, keys, True)), _rows(_decode(root, keys, False))
    assert triage["chest.dcm"]["status"] == "skipped" and triage["chest.dcm"]["bytes_read"] == HEAD_BYTES
    assert triage["chest-private-blob.dcm"]["error_code"] == "not_knee"
    assert triage["chest-private-blob.dcm"]["bytes_read"] == 4 * HEAD_BYTES
    for k in ("knee.dcm", "knee.png", "knee-small.dcm"):
        assert triage[k]["status"] == "ok" and triage[k]["bytes_read"] == len(objects[k]), k
        np.testing.assert_array_equal(triage[k]["img"], full[k]["img"])
    for k in keys:
        assert full[k]["bytes_read"] == len(objects[k])
        assert {c: triage[k][c] for c in _COLUMNS} == {c: full[k][c] for c in _COLUMNS}, k


def test_run_manifest_total_is_the_sum_of_the_column():
    import datetime as _dt

    import pyarrow as pa

    from kneescreen.screen import pipeline
    from kneescreen.screen.config import ScreenConfig
    from kneescreen.screen.stats import PredictionCounts

    batches = [pa.table({"status": ["ok", "skipped"], "bytes_read": pa.array([2_098_146, 65_536], pa.int64())}),
               pa.table({"status": ["error"], "bytes_read": pa.array([None], pa.int64())}),  # never read
               pa.table({"status": ["ok"]})]  # written before the column existed
    counts = PredictionCounts.of(batches)
    assert counts.bytes_read == 2_098_146 + 65_536 and counts.rows == 4
    cfg = ScreenConfig(input="in", output="out", bundle="b")
    manifest = pipeline._run_manifest(cfg, "r", "v", b"k" * 16, {"fingerprint": "f", "listed": 4, "already_done": 0},
                                      counts, _dt.datetime.now(_dt.timezone.utc), {"screen": 1.0}, "p")
    assert manifest["bytes_read"] == 2_163_682 and isinstance(manifest["bytes_read"], int)
