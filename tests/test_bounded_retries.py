"""Nothing read forever, nothing a crash (issue #20): a transient error is retried by at most
``--max-retries`` incremental runs and then becomes a permanent ``retries_exhausted`` row; objects
deleted, replaced, empty or forbidden between listing and read become rows with their own codes.
Faults come from the real fault proxy (tests/s3_fault_proxy.py) in front of the moto server."""

from __future__ import annotations

import numpy as np
import pytest
from s3_fault_proxy import FaultProxy

from kneescreen.data.decode import DecodeSpec, RangedRead, decode_batch, is_transient
from kneescreen.errors import ERROR_CODES
from kneescreen.fileio.store import ObjectChanged, Store, join
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.ledger import committed_runs
from kneescreen.screen.pipeline import run_screen
from kneescreen.screen.stages import exhaust_retries


def _good_dicom(small_archive, labels, planted) -> bytes:
    root, _ = small_archive
    key = next(k for k in sorted(labels) if k.endswith(".dcm") and k not in planted)
    return (root / "images" / key).read_bytes()


def test_new_codes_are_registered_and_permanent():
    for code in ("retries_exhausted", "vanished", "access_denied"):
        assert code in ERROR_CODES and not is_transient(code)


def test_exhaust_retries_turns_only_transient_errors_past_the_limit():
    out = {"error_code": ["read_failed", "read_failed", "not_dicom", None],
           "message": ["storage: SlowDown", "storage: reset", "bad", None]}
    got = exhaust_retries(out, np.array([2, 1, 5, 9]), max_retries=2)
    assert got["error_code"] == ["retries_exhausted", "read_failed", "not_dicom", None]
    assert "read_failed" in got["message"][0] and "storage: SlowDown" in got["message"][0]


@pytest.mark.slow
@pytest.mark.ray
def test_a_failing_object_ends_retries_exhausted_and_a_recovering_one_ok(ray_local, s3_bucket, s3_server,
                                                                          small_archive, labels, planted,
                                                                          tiny_bundle, tmp_path):
    data = _good_dicom(small_archive, labels, planted)
    store = Store.resolve()
    for name in ("always.dcm", "recovers.dcm", "fine.dcm"):
        store.write_bytes(f"s3://{s3_bucket}/in/{name}", data)
    n = 2
    cfg = ScreenConfig(input=f"s3://{s3_bucket}/in", output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=8,
                       max_retries=n)
    proxy = FaultProxy(s3_server, per_key=10**6, max_faults=10**6, seconds=600,
                       keys={f"{s3_bucket}/in/always.dcm", f"{s3_bucket}/in/recovers.dcm"}).start()
    try:
        flaky = Store(proxy.url, "us-east-1", max_attempts=1)
        manifests = [run_screen(cfg, store=flaky)]
        proxy.keys.discard(f"{s3_bucket}/in/recovers.dcm")
        manifests += [run_screen(cfg, store=flaky) for _ in range(n + 1)]
    finally:
        proxy.close()
    assert [m["counts"]["screened"] for m in manifests] == [3, 2, 1, 0]
    assert [m["counts"]["retried"] for m in manifests] == [0, 2, 1, 0]
    assert [m["counts"]["exhausted"] for m in manifests] == [0, 0, 1, 0]
    rows = Store().read_parquet(join(cfg.output, "predictions")).to_pylist()
    always = sorted((r for r in rows if r["key"] == "always.dcm"), key=lambda r: r["screened_at"])
    assert len(always) == n + 1  # the first attempt and n retries, then never again
    assert [r["error_code"] for r in always] == ["read_failed"] * n + ["retries_exhausted"]
    assert "read_failed" in always[-1]["message"] and "storage:" in always[-1]["message"]
    recovers = [r["status"] for r in rows if r["key"] == "recovers.dcm"]
    assert recovers == ["error", "ok"] or sorted(recovers) == ["error", "ok"]
    # --retry-errors still re-drives everything not ok, exhausted rows included.
    redrive = run_screen(ScreenConfig(**{**cfg.__dict__, "retry_errors": True}), store=store)
    assert redrive["counts"]["screened"] == 1 and redrive["counts"]["ok"] == 1
    assert len(committed_runs(store, cfg.output)) == n + 3


@pytest.mark.s3
def test_storage_surprises_are_rows(s3_bucket, s3_server, small_archive, labels, planted):
    data = _good_dicom(small_archive, labels, planted)
    store = Store.resolve()
    root = f"s3://{s3_bucket}/in"
    for name in ("gone.dcm", "empty.dcm", "denied.dcm", "ok.dcm"):
        store.write_bytes(join(root, name), b"" if name == "empty.dcm" else data)
    listed = {o.key: o for o in store.list_objects(root)}
    store.delete(join(root, "gone.dcm"))  # deleted between the listing and the read
    proxy = FaultProxy(s3_server, fraction=0.0, forbid={f"{s3_bucket}/in/denied.dcm"}).start()
    try:
        spec = DecodeSpec(store=Store(proxy.url, "us-east-1", max_attempts=1), sizes=(64,), root=root)
        keys = sorted(listed)
        out = decode_batch({"key": keys, "etag": [listed[k].etag for k in keys],
                            "size": [listed[k].size for k in keys]}, spec)
    finally:
        proxy.close()
    got = dict(zip(keys, zip(out["status"], out["error_code"], out["message"])))
    assert got["ok.dcm"][0] == "ok"
    assert got["gone.dcm"][:2] == ("error", "vanished")
    assert got["denied.dcm"][:2] == ("error", "access_denied") and "s3:GetObject" in got["denied.dcm"][2]
    assert got["empty.dcm"][:2] == ("error", "truncated")
    # Replaced between two ranged reads: the ETag-pinned read refuses to mix versions; as a row
    # that is a transient changed_during_read (tests/test_changed_during_read.py), and the next
    # listing sees the new etag.
    obj = RangedRead(store, join(root, "ok.dcm"))
    obj.extend(128)
    store.write_bytes(join(root, "ok.dcm"), data + b"\0")
    with pytest.raises(ObjectChanged):
        obj.extend(128)
    assert is_transient("changed_during_read")
    assert {o.key: o.etag for o in store.list_objects(root)}["ok.dcm"] != listed["ok.dcm"].etag
