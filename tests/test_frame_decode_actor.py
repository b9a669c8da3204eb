"""``--frame-decode actor`` (#22): decode tasks hand compressed frames on and the inference actor
decodes them before preprocessing on its device. Same rows, codes and probabilities as decoding
in the tasks; a frame the device decoder fails on falls back to the CPU decoders, and one that
nothing decodes is an error row, not a failed batch. Stages without Ray, then a real Ray run."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from ray.data.block import BlockAccessor
from test_frame_decoders import FlakyDevice

from kneescreen.data.decode import DecodeSpec, load_side_table
from kneescreen.data.frame_block import frames_from_batch
from kneescreen.data.jpeg_lossless import lossless_jpeg_dicom
from kneescreen.errors import DecodeError, KneescreenError
from kneescreen.fileio.frame_decoders import CpuFrameDecoder, FallbackDecoder, nvimgcodec_available
from kneescreen.fileio.frames import EncodedFrame
from kneescreen.fileio.reader import read_radiograph
from kneescreen.fileio.store import Store
from kneescreen.model.bundle import load_bundle
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.device import DevicePreprocessor
from kneescreen.screen.stages import EnsemblePredictor, decode_stored_stage, to_prediction_table

PROBS = ["p_normal", "p_osteopenia", "p_osteoporosis"]
SAME = ["key", "status", "error_code", "message", "predicted_class", "bytes_read"]
# Header columns: a frame that fails to decode in a task fails the whole read (no header columns);
# on the actor the header was read before, and the row keeps it (as `--preprocess device` does for
# pixels judged on the actor).
HEADER = ["format", "patient_pseudo_id", "age", "sex", "site"]


def assert_same_rows(a, b):
    for c in SAME:
        assert a[c].fillna("-").astype(str).tolist() == b[c].fillna("-").astype(str).tolist(), c
    # The same pixels; batches that differ in composition may round the last bits differently.
    ok = (b["status"] == "ok").to_numpy()
    assert np.abs(a.loc[ok, PROBS].to_numpy(float) - b.loc[ok, PROBS].to_numpy(float)).max() <= 1e-6
    read = b["format"].notna()
    for c in HEADER:
        assert a.loc[read, c].fillna("-").astype(str).tolist() == b.loc[read, c].fillna("-").astype(str).tolist(), c


def _numpy(table: pa.Table) -> dict:
    return BlockAccessor.for_block(table).to_batch_format("numpy")


@pytest.fixture(scope="module")
def archive(small_archive, tmp_path_factory):
    """``small_archive`` (uncompressed, RLE, JPEG-LS, JPEG 2000 DICOM; PNG; JPEG; planted bad
    files) plus a JPEG Lossless copy of a knee and a JPEG 2000 knee whose codestream ends half
    way (the file and the header checks are fine; no decoder can decode it)."""
    import shutil

    src, _ = small_archive
    root = tmp_path_factory.mktemp("actor-archive")
    shutil.copytree(src / "images", root / "images")
    shutil.copy(src / "labels.csv", root / "labels.csv")
    by_syntax = {}
    for path in sorted((root / "images").rglob("*.dcm")):
        try:
            if read_radiograph(path.read_bytes()).meta.body_part != "KNEE":  # not a planted chest film
                continue
        except DecodeError:  # nor a planted bad file
            continue
        by_syntax.setdefault(str(pydicom.dcmread(path).file_meta.TransferSyntaxUID), path)
    ds = pydicom.dcmread(by_syntax["1.2.840.10008.1.2.1"])
    lossless_jpeg_dicom(ds, ds.pixel_array)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
    _save(ds, root / "images" / "extra-jpeg-lossless.dcm")
    ds = pydicom.dcmread(by_syntax["1.2.840.10008.1.2.4.90"])
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 2]])  # a consistent file, half a codestream
    _save(ds, root / "images" / "extra-broken-j2k.dcm")
    return root


def _save(ds, path) -> None:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def setup(archive, tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    store = Store()
    spec = DecodeSpec(store=store, sizes=tuple(bundle.sizes), views=bundle.views, root=str(archive / "images"),
                      pseudo_key=b"k" * 16, reference=load_side_table(store, str(archive / "labels.csv")))
    objs = store.list_objects(str(archive / "images"))
    listing = pa.Table.from_pylist([{"key": o.key, "etag": o.etag, "size": o.size} for o in objs])
    return bundle, spec, listing


def _blocks(spec, listing, frame_decode: str) -> list[pa.Table]:
    return list(decode_stored_stage(_numpy(listing), dataclasses.replace(spec, frame_decode=frame_decode)))


def _predict(bundle, blocks, pre: DevicePreprocessor | None = None):
    pred = EnsemblePredictor({"manifest": bundle.manifest, "states": bundle.states()}, preprocess="device")
    if pre is not None:
        pred.pre = pre
    out = [to_prediction_table(_numpy(pred(_numpy(b))), "r", bundle.version, None) for b in blocks]
    return pa.concat_tables(out).to_pandas().sort_values("key").reset_index(drop=True)


def test_actor_decode_gives_the_rows_of_task_decode(setup):
    bundle, spec, listing = setup
    task, actor = _blocks(spec, listing, "task"), _blocks(spec, listing, "actor")
    codecs = [c for b in actor for c in b.column("frame_codec").to_pylist() if c]
    assert {"jpeg2000", "jpeg-lossless", "png", "jpeg"} <= set(codecs)  # handed on compressed
    assert not any(c for b in task for c in b.column("frame_codec").to_pylist())
    assert sum(b.nbytes for b in actor) < sum(b.nbytes for b in task)  # what crosses the object store
    a, t = _predict(bundle, actor), _predict(bundle, task)
    assert_same_rows(a, t)
    broken = a.set_index("key").loc["extra-broken-j2k.dcm"]
    assert broken["status"] == "error" and broken["error_code"] == "decode_failed"  # the CPU decoder's code
    assert (a["status"] == "ok").sum() >= 15


def test_device_decoder_failures_fall_back_per_frame_or_become_error_rows(setup):
    bundle, spec, listing = setup
    blocks = _blocks(spec, listing, "actor")
    keys = bundle.manifest.input_keys
    flaky = FallbackDecoder(FlakyDevice())  # fails every JPEG 2000 frame, raises on PNG batches
    rows = _predict(bundle, blocks, DevicePreprocessor(keys, "cpu", decoder=flaky)).set_index("key")
    want = _predict(bundle, blocks).set_index("key")
    broken = rows.loc["extra-broken-j2k.dcm"]
    assert broken["status"] == "error" and broken["error_code"] == "frame_decode_failed"
    assert broken["message"].startswith("jpeg2000 frame: fake-gpu: RuntimeError: ")  # both errors, named
    assert "; cpu: decode_failed: " in broken["message"]
    # Every other row as with the CPU decoder alone; frames that fail there fail here too, as
    # frame_decode_failed (both decoders failed) instead of the CPU decoder's decode_failed.
    expect = want["error_code"].where(~((want["error_code"] == "decode_failed") & rows["message"].str.contains(
        "fake-gpu", na=False)), "frame_decode_failed")
    assert rows["status"].tolist() == want["status"].tolist()
    ok = (want["status"] == "ok").to_numpy()
    assert np.abs(rows.loc[ok, PROBS].to_numpy(float) - want.loc[ok, PROBS].to_numpy(float)).max() <= 1e-6
    assert rows["error_code"].fillna("-").tolist() == expect.fillna("-").tolist()
    assert flaky.fallbacks >= 3 and flaky.failures == (rows["error_code"] == "frame_decode_failed").sum() >= 1


@pytest.mark.skipif(not nvimgcodec_available(), reason="nvImageCodec (kneescreen[gpu]) not installed")
def test_nvimgcodec_in_the_actor_gives_the_same_rows(setup, monkeypatch):
    """The real package on its CPU backends, chosen the way a pod's env chooses it: the same rows
    and probabilities; the frames no decoder takes are frame_decode_failed (both named)."""
    bundle, spec, listing = setup
    monkeypatch.setenv("KNEESCREEN_FRAME_DECODER", "nvimgcodec")
    blocks = _blocks(spec, listing, "actor")
    nv = _predict(bundle, blocks)
    monkeypatch.setenv("KNEESCREEN_FRAME_DECODER", "cpu")
    cpu = _predict(bundle, blocks)
    assert nv["status"].tolist() == cpu["status"].tolist()
    ok = (cpu["status"] == "ok").to_numpy()
    assert np.abs(nv.loc[ok, PROBS].to_numpy(float) - cpu.loc[ok, PROBS].to_numpy(float)).max() <= 1e-6
    differ = nv["error_code"].fillna("-") != cpu["error_code"].fillna("-")
    assert set(cpu.loc[differ, "error_code"]) == {"decode_failed"} and set(nv.loc[differ, "error_code"]) == {
        "frame_decode_failed"}
    assert "extra-broken-j2k.dcm" in set(nv.loc[differ, "key"])


def test_frames_travel_compressed_with_what_decodes_them(setup):
    _, spec, listing = setup
    task_codes = {}
    for block in _blocks(spec, listing, "task"):
        task_codes.update(zip(block.column("key").to_pylist(), block.column("error_code").to_pylist()))
    encoded = {}
    for block in _blocks(spec, listing, "actor"):
        frames, facts = frames_from_batch(_numpy(block))
        for key, f, ff in zip(block.column("key").to_pylist(), frames, facts):
            if isinstance(f, EncodedFrame):
                assert f.facts == ff
                encoded[key] = f
    assert "extra-broken-j2k.dcm" in encoded and "extra-jpeg-lossless.dcm" in encoded
    assert all(f.bits_allocated == 16 for f in encoded.values() if f.transfer_syntax)
    decoded = dict(zip(encoded, CpuFrameDecoder().decode(list(encoded.values()))))
    failed = {k for k, d in decoded.items() if not isinstance(d, np.ndarray)}
    # What the actor cannot decode is what the task could not: the same objects, the same code.
    assert failed == {k for k in encoded if task_codes[k] == "decode_failed"}
    assert all(decoded[k].error_code == "decode_failed" for k in failed)


def test_frame_decode_actor_needs_device_preprocessing():
    cfg = ScreenConfig(input="in", output="out", bundle="b", preprocess="cpu", frame_decode="actor")
    with pytest.raises(KneescreenError, match="--frame-decode actor needs --preprocess device"):
        cfg.validate()
    dataclasses.replace(cfg, preprocess="device").validate()
    ScreenConfig(input="in", output="out", bundle="b", use_gpu=True, frame_decode="actor").validate()


@pytest.mark.ray
def test_ray_screen_with_actor_decode_equals_task_decode(ray_local, archive, tiny_bundle, tmp_path):
    from kneescreen.screen.pipeline import run_screen

    base = ScreenConfig(input=str(archive / "images"), output="", bundle=tiny_bundle, preprocess="device",
                        reference=str(archive / "labels.csv"), decode_batch_size=8, actors=1)
    tables = {}
    for mode in ("task", "actor"):
        manifest = run_screen(dataclasses.replace(base, output=str(tmp_path / mode), frame_decode=mode))
        assert manifest["config"]["frame_decode"] == mode
        tables[mode] = pq.read_table(manifest["predictions"]).to_pandas().sort_values("key").reset_index(drop=True)
    assert_same_rows(tables["actor"], tables["task"])
