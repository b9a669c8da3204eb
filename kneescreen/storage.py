"""Local paths and s3:// URIs behind one small API (read, write, list).

Every S3 client kneescreen makes goes through `s3_client()` / `arrow_filesystem()`, so an
S3-compatible endpoint (MinIO, a local test server) is configured once: ``--endpoint-url`` or the
standard ``AWS_ENDPOINT_URL`` variable. Credentials come from boto3's default chain and are never
logged. pyarrow's S3FileSystem ignores ``AWS_ENDPOINT_URL``, hence the explicit override.
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from kneescreen.errors import KneescreenError


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key relative to the listed root, size in bytes, etag (or mtime tag)."""

    uri: str
    key: str
    size: int
    etag: str


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise KneescreenError(f"not an s3 URI: {uri!r} (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


def endpoint_url(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def s3_client(endpoint: str | None = None):
    """A boto3 S3 client honouring ``endpoint`` / ``AWS_ENDPOINT_URL``."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url(endpoint))


def arrow_filesystem(uri: str, endpoint: str | None = None):
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(pathlib.Path(uri).absolute())
    bucket, key = split_s3(uri)
    ep = endpoint_url(endpoint)
    kwargs = {}
    if ep:
        parsed = urlparse(ep)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def join(root: str, *parts: str) -> str:
    root = str(root)
    if is_s3(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(pathlib.Path(root, *parts))


def read_bytes(uri: str, endpoint: str | None = None, client=None) -> bytes:
    """Whole object or file as bytes. Raises FileNotFoundError when it does not exist."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = client or s3_client(endpoint)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(uri) from exc
    return pathlib.Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes, endpoint: str | None = None, client=None) -> None:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        (client or s3_client(endpoint)).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = pathlib.Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic on POSIX: readers never see half a file


def exists(uri: str, endpoint: str | None = None) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(endpoint)
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except client.exceptions.ClientError:
            return False
    return pathlib.Path(uri).exists()


def _matches(key: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatch(key, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(key, p) for p in exclude)


def list_objects(
    root: str,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    endpoint: str | None = None,
    page_size: int = 1000,
) -> Iterator[ObjectInfo]:
    """Stream objects below ``root`` in key order, one page at a time.

    A generator, so an archive of millions of keys never sits in driver memory at once.
    Local files get an etag built from size and mtime (cheap, changes when the file does).
    """
    root = str(root)
    if is_s3(root):
        bucket, prefix = split_s3(root)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        client = s3_client(endpoint)
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        ):
            for obj in page.get("Contents", ()):
                key = obj["Key"][len(prefix):]
                if key.endswith("/") or not _matches(key, include, exclude):
                    continue
                yield ObjectInfo(
                    f"s3://{bucket}/{obj['Key']}", key, int(obj["Size"]), obj["ETag"].strip('"')
                )
        return
    base = pathlib.Path(root)
    if base.is_file():
        st = base.stat()
        yield ObjectInfo(str(base), base.name, st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}")
        return
    if not base.is_dir():
        raise KneescreenError(f"input {root!r} does not exist (expected a folder, file or s3:// prefix)")
    # os.walk with sorted dirs gives key order without materialising the whole tree.
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            path = pathlib.Path(dirpath, name)
            key = path.relative_to(base).as_posix()
            if name.startswith(".") or not _matches(key, include, exclude):
                continue
            st = path.stat()
            yield ObjectInfo(str(path), key, st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}")


def delete_prefix(uri: str, endpoint: str | None = None) -> int:
    """Delete every object/file below ``uri``; returns how many. Used to drop uncommitted runs."""
    import shutil

    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/"
        client = s3_client(endpoint)
        n = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
                n += len(keys)
        return n
    path = pathlib.Path(uri)
    if not path.exists():
        return 0
    n = sum(1 for p in path.rglob("*") if p.is_file())
    shutil.rmtree(path)
    return n


def list_dirs(uri: str, endpoint: str | None = None) -> list[str]:
    """Immediate sub-folder names below ``uri`` (S3: common prefixes)."""
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        client = s3_client(endpoint)
        names = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [cp["Prefix"][len(prefix):].rstrip("/") for cp in page.get("CommonPrefixes", ())]
        return sorted(names)
    path = pathlib.Path(uri)
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def read_table(uri: str, endpoint: str | None = None) -> list[dict]:
    """Rows of a CSV or Parquet file (local or s3://) as dicts: labels, sidecars, splits."""
    import io

    data = read_bytes(uri, endpoint)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    import csv

    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
