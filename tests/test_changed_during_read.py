"""Reads pinned to the listed version (issue #20, item 3): an object replaced between the listing
and its read becomes a transient ``changed_during_read`` row, and the next incremental run (whose
listing has the new etag) screens the new version. On the moto S3 server (which honours If-Match),
behind the fault proxy playing a server that ignores If-Match, and in a local folder (size+mtime
tag). Replacements happen at fixed points (list, then overwrite, then read), never by timing."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pyarrow as pa
import pytest
from s3_fault_proxy import FaultProxy

from kneescreen.data.decode import DecodeSpec, decode_batch, is_transient
from kneescreen.errors import ERROR_CODES
from kneescreen.fileio._store_s3 import _etag
from kneescreen.fileio.store import ObjectChanged, Store, join
from kneescreen.link.headers import HeaderSpec, header_batch
from kneescreen.screen import diff
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.pipeline import run_screen
from kneescreen.screen.stages import exhaust_retries


def _two_dicoms(small_archive, labels, planted) -> tuple[bytes, bytes]:
    root, _ = small_archive
    keys = [k for k in sorted(labels) if k.endswith(".dcm") and k not in planted][:2]
    first, second = ((root / "images" / k).read_bytes() for k in keys)
    assert first != second
    return first, second


def _root(where: str, tmp_path: pathlib.Path, bucket: str) -> str:
    return str(tmp_path / "in") if where == "local" else f"s3://{bucket}/in"


def _replace(store: Store, uri: str, data: bytes) -> None:
    """A new version of the object. Locally the mtime moves 1 s on as well, so the size+mtime
    tag changes even where the new bytes have the old size and the clock has not ticked."""
    store.write_bytes(uri, data)
    if not uri.startswith("s3://"):
        st = os.stat(uri)
        os.utime(uri, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _decode(store: Store, root: str, listed: dict, triage: bool) -> dict:
    keys = sorted(listed)
    out = decode_batch({"key": keys, "etag": [listed[k].etag for k in keys], "size": [listed[k].size for k in keys]},
                       DecodeSpec(store=store, sizes=(64,), root=root, header_triage=triage))
    return {k: (s, c, m, b) for k, s, c, m, b in zip(keys, out["status"], out["error_code"], out["message"],
                                                     out["bytes_read"])}


# -- the code and the ETag spelling ----------------------------------------------------------------

@pytest.mark.parametrize("raw, bare", [('"9b2cf535f27731c974343645a3985328"', "9b2cf535f27731c974343645a3985328"),
                                       ("9b2cf535f27731c974343645a3985328", "9b2cf535f27731c974343645a3985328"),
                                       (' "d41d8cd98f00b204e9800998ecf8427e-3" ', "d41d8cd98f00b204e9800998ecf8427e-3"),
                                       ('""', ""), (None, None)])
def test_etags_are_kept_without_quotes(raw, bare):
    assert _etag(raw) == bare


def test_changed_during_read_is_registered_transient_and_bounded():
    assert "changed_during_read" in ERROR_CODES and is_transient("changed_during_read")
    out = {"error_code": ["changed_during_read", "changed_during_read"], "message": ["storage: changed", "x"]}
    got = exhaust_retries(out, np.array([3, 2]), max_retries=3)  # same budget as read_failed
    assert got["error_code"] == ["retries_exhausted", "changed_during_read"]
    assert got["message"][0].startswith("changed_during_read on attempt 4 of 4")


# -- Store: whole and ranged reads pinned to a version ---------------------------------------------

@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_pinned_reads_refuse_a_replaced_object(where, tmp_path, s3_bucket):
    store = Store.resolve()
    root = _root(where, tmp_path, s3_bucket)
    uri = join(root, "a#b?.dcm")
    old, new = b"version one " * 10_000, b"version two " * 10_000  # same size: only the content differs
    store.write_bytes(uri, old)
    (info,) = store.list_objects(root)
    assert store.read_bytes(uri, if_match=info.etag) == old
    assert store.read_range(uri, 70_000, 100, if_match=info.etag).data == old[70_000:70_100]
    if where == "s3":  # a quoted spelling names the same version
        assert store.read_bytes(uri, if_match=f'"{info.etag}"') == old
    _replace(store, uri, new)
    with pytest.raises(ObjectChanged):
        store.read_bytes(uri, if_match=info.etag)
    with pytest.raises(ObjectChanged):
        store.read_range(uri, 0, 65_536, if_match=info.etag)
    with pytest.raises(ObjectChanged):
        store.read_range(uri, 70_000, 100, if_match=info.etag)  # a later range too
    # Unpinned reads see the new version; the next listing names it, and reads pinned to it work.
    assert store.read_bytes(uri) == new
    (again,) = store.list_objects(root)
    assert again.etag != info.etag and store.read_bytes(uri, if_match=again.etag) == new
    assert store.read_range(uri, 0, 12, if_match=again.etag).etag == again.etag


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("triage", [True, False], ids=["ranged", "whole"])
def test_a_replaced_object_is_a_transient_changed_during_read_row(where, triage, tmp_path, s3_bucket,
                                                                   small_archive, labels, planted):
    first, second = _two_dicoms(small_archive, labels, planted)
    store = Store.resolve()
    root = _root(where, tmp_path, s3_bucket)
    for name in ("kept.dcm", "swapped.dcm"):
        store.write_bytes(join(root, name), first)
    listed = {o.key: o for o in store.list_objects(root)}
    _replace(store, join(root, "swapped.dcm"), second)
    got = _decode(store, root, listed, triage)
    assert got["kept.dcm"][:2] == ("ok", None)
    status, code, message, nbytes = got["swapped.dcm"]
    assert (status, code) == ("error", "changed_during_read") and is_transient(code)
    assert "changed between listing and read" in message and nbytes == 0  # the first read already refused
    # The next listing has the new etag: the same decode then reads the new version.
    relisted = {o.key: o for o in store.list_objects(root)}
    assert relisted["swapped.dcm"].etag != listed["swapped.dcm"].etag
    assert _decode(store, root, relisted, triage)["swapped.dcm"][:2] == ("ok", None)


# -- a server that ignores If-Match ----------------------------------------------------------------

@pytest.mark.s3
def test_a_server_that_ignores_if_match_is_caught_by_the_response_etag(s3_server, s3_bucket, small_archive,
                                                                         labels, planted):
    first, second = _two_dicoms(small_archive, labels, planted)
    store = Store.resolve()
    root = f"s3://{s3_bucket}/in"
    uri = join(root, "swapped.dcm")
    store.write_bytes(uri, first)
    listed = {o.key: o for o in store.list_objects(root)}
    _replace(store, uri, second)
    proxy = FaultProxy(s3_server, fraction=0.0, ignore_if_match=True).start()
    try:
        lax = Store(proxy.url, "us-east-1", max_attempts=1)
        assert lax.read_bytes(uri) == second  # the proxy hands out whatever version it holds
        with pytest.raises(ObjectChanged, match="ignored If-Match"):
            lax.read_bytes(uri, if_match=listed["swapped.dcm"].etag)
        with pytest.raises(ObjectChanged, match="ignored If-Match"):
            lax.read_range(uri, 0, 1024, if_match=listed["swapped.dcm"].etag)
        for triage in (True, False):
            assert _decode(lax, root, listed, triage)["swapped.dcm"][:2] == ("error", "changed_during_read")
        assert proxy.if_match_seen >= 4  # every pinned read asked for the version, and was ignored
    finally:
        proxy.close()


@pytest.mark.s3
def test_a_response_etag_is_compared_and_a_missing_one_trusted(s3_server, s3_bucket):
    store = Store.resolve()
    uri = f"s3://{s3_bucket}/in/x.dcm"
    store.write_bytes(uri, b"unchanged object")
    (info,) = store.list_objects(f"s3://{s3_bucket}/in")
    other = FaultProxy(s3_server, fraction=0.0, response_headers={"ETag": '"0123456789abcdef0123456789abcdef"'}).start()
    try:  # the server honoured If-Match, yet says another version came back: refused
        with pytest.raises(ObjectChanged, match="0123456789abcdef0123456789abcdef"):
            Store(other.url, "us-east-1", max_attempts=1).read_bytes(uri, if_match=info.etag)
    finally:
        other.close()
    bare = FaultProxy(s3_server, fraction=0.0, response_headers={"ETag": None}).start()
    try:  # no ETag to compare: the If-Match the server honoured is all there is
        silent = Store(bare.url, "us-east-1", max_attempts=1)
        assert silent.read_bytes(uri, if_match=info.etag) == b"unchanged object"
        assert silent.read_range(uri, 0, 9, if_match=info.etag).etag == info.etag
    finally:
        bare.close()


# -- link reads headers pinned too -----------------------------------------------------------------

@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_link_reports_a_replaced_object_as_changed_during_read(where, tmp_path, s3_bucket, small_archive, labels,
                                                               planted):
    first, second = _two_dicoms(small_archive, labels, planted)
    store = Store.resolve()
    root = _root(where, tmp_path, s3_bucket)
    store.write_bytes(join(root, "swapped.dcm"), first)
    (info,) = store.list_objects(root)
    _replace(store, join(root, "swapped.dcm"), second)
    batch = pa.table({"key": [info.key], "etag": [info.etag], "size": [info.size]})
    spec = HeaderSpec(store=store, root=root, key=b"k" * 16, threads=1)
    (row,) = header_batch(batch, spec).to_pylist()
    assert (row["status"], row["reason"], row["etag"]) == ("unlinked", "changed_during_read", info.etag)


# -- end to end: the next incremental run screens the new version ----------------------------------

@pytest.mark.slow  # ~45-55 s each: three screening runs
@pytest.mark.ray
@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_next_incremental_run_screens_the_new_version(where, ray_local, s3_bucket, small_archive, labels,
                                                          planted, tiny_bundle, tmp_path, monkeypatch):
    first, second = _two_dicoms(small_archive, labels, planted)
    store = Store.resolve()
    root = _root(where, tmp_path, s3_bucket)
    for name in ("kept.dcm", "swapped.dcm"):
        store.write_bytes(join(root, name), first)
    real_diff = diff.diff_listing

    def listed_then_replaced(*args, **kwargs):  # the run lists; then a new version lands; then it reads
        out = real_diff(*args, **kwargs)
        _replace(store, join(root, "swapped.dcm"), second)
        return out

    monkeypatch.setattr(diff, "diff_listing", listed_then_replaced)
    cfg = ScreenConfig(input=root, output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=8)
    run1 = run_screen(cfg, store=store)
    monkeypatch.setattr(diff, "diff_listing", real_diff)
    assert run1["counts"]["screened"] == 2 and run1["counts"]["ok"] == 1 and run1["counts"]["error"] == 1
    assert run1["error_codes"] == {"changed_during_read": 1}
    run2 = run_screen(cfg, store=store)
    c2 = run2["counts"]
    assert (c2["listed"], c2["already_screened"], c2["screened"], c2["ok"], c2["retried"]) == (2, 1, 1, 1, 0)
    assert run_screen(cfg, store=store)["counts"]["screened"] == 0
    rows = Store().read_parquet(join(cfg.output, "predictions")).to_pylist()
    got = sorted((r["key"], r["run_id"] == run2["run_id"], r["status"], r["error_code"]) for r in rows)
    assert got == [("kept.dcm", False, "ok", None), ("swapped.dcm", False, "error", "changed_during_read"),
                   ("swapped.dcm", True, "ok", None)]
    swapped = {r["status"]: r["etag"] for r in rows if r["key"] == "swapped.dcm"}
    assert swapped["ok"] == next(o.etag for o in store.list_objects(root) if o.key == "swapped.dcm")
    assert swapped["error"] != swapped["ok"]  # the error row names the listed (old) version
