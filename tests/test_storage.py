"""Local and S3 storage through the same API, against the moto server process."""

from __future__ import annotations

import pytest

from kneescreen.fileio.store import Store


@pytest.mark.s3
def test_listing_streams_pages_and_filters(s3_bucket):
    for i in range(7):
        Store.resolve().write_bytes(f"s3://{s3_bucket}/a/{i:02d}.dcm", b"x" * i)
    Store.resolve().write_bytes(f"s3://{s3_bucket}/a/skip.txt", b"t")
    it = Store.resolve().list_objects(f"s3://{s3_bucket}/a", include=("*.dcm",), page_size=2)
    first = next(it)  # a generator: the first page arrives before the rest is listed
    rest = list(it)
    objs = [first, *rest]
    assert [o.key for o in objs] == [f"{i:02d}.dcm" for i in range(7)]
    assert [o.size for o in objs] == list(range(7)) and all(o.etag for o in objs)
    assert Store.resolve().read_bytes(objs[3].uri) == b"xxx"


@pytest.mark.s3
def test_arrow_filesystem_honours_endpoint(s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = Store.resolve().filesystem(f"s3://{s3_bucket}/t/x.parquet")
    pq.write_table(pa.table({"a": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2]


def test_local_listing_and_atomic_write(tmp_path):
    Store.resolve().write_bytes(str(tmp_path / "d" / "b.png"), b"1")
    Store.resolve().write_bytes(str(tmp_path / "d" / "a.dcm"), b"22")
    objs = list(Store.resolve().list_objects(str(tmp_path / "d"), exclude=("*.png",)))
    assert [(o.key, o.size) for o in objs] == [("a.dcm", 2)]
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_missing_input_is_a_clear_error(tmp_path):
    from kneescreen.errors import KneescreenError

    with pytest.raises(KneescreenError, match="does not exist"):
        list(Store.resolve().list_objects(str(tmp_path / "nope")))


def _range_store_cases(tmp_path, bucket) -> list[str]:
    data = bytes(range(256)) * 400  # 102,400 bytes
    uris = [str(tmp_path / "obj.bin")]
    if bucket:
        uris.append(f"s3://{bucket}/r/obj.bin")
    for uri in uris:
        Store.resolve().write_bytes(uri, data)
    return uris


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_range_returns_the_slice_the_size_and_the_version(tmp_path, s3_bucket, where):
    uri = _range_store_cases(tmp_path, s3_bucket)[0 if where == "local" else 1]
    data = Store.resolve().read_bytes(uri)
    head = Store.resolve().read_range(uri, 0, 65_536)
    assert head.data == data[:65_536] and head.start == 0 and head.size == len(data) and head.etag
    # Past the end: what there is, no error; a later piece pinned to the first one's version.
    tail = Store.resolve().read_range(uri, 65_536, 10**9, if_match=head.etag)
    assert head.data + tail.data == data and tail.etag == head.etag
    with pytest.raises(ValueError):
        Store.resolve().read_range(uri, 0, 0)


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_range_refuses_a_changed_object_and_reports_a_missing_one(tmp_path, s3_bucket, where):
    import time

    from kneescreen.fileio.store import ObjectChanged

    uri = _range_store_cases(tmp_path, s3_bucket)[0 if where == "local" else 1]
    head = Store.resolve().read_range(uri, 0, 1024)
    time.sleep(0.01)  # a new mtime for the local file
    Store.resolve().write_bytes(uri, b"another version of the object, longer than before" * 100)
    with pytest.raises(ObjectChanged):
        Store.resolve().read_range(uri, 1024, 1024, if_match=head.etag)
    with pytest.raises(FileNotFoundError):
        Store.resolve().read_range(uri + ".gone", 0, 1024)


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_range_of_an_empty_object(tmp_path, s3_bucket, where):
    uri = str(tmp_path / "empty") if where == "local" else f"s3://{s3_bucket}/empty"
    Store.resolve().write_bytes(uri, b"")
    part = Store.resolve().read_range(uri, 0, 65_536)
    assert part.data == b"" and part.size == 0
