"""Local and S3 storage through the same API, against the moto server process."""

from __future__ import annotations

import pytest

from kneescreen.io.store import Store


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
