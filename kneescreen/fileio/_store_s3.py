"""The S3 backend of `kneescreen.fileio.store.Store`: one boto3 client and one pyarrow
S3FileSystem per process, both built on first use with the store's retry and timeout settings,
and one `list_objects_v2` paginator that every listing goes through. The method contracts are
`Store`'s."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse


from kneescreen.fileio.objects import ByteRange, ListPage, ObjectChanged, ObjectInfo, key_matches, split_s3

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def _folder(prefix: str) -> str:
    """A key prefix as a folder: ``a/b`` -> ``a/b/``, "" stays "" (the whole bucket)."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _etag(value: str | None) -> str | None:
    """An ETag as kneescreen keeps it: without the surrounding double quotes (and whitespace).

    S3 quotes ETags in listings, headers and GET responses (``"9b2cf5..."``, multipart
    ``"9b2c...-3"``); rows, digests and ``if_match`` arguments hold them bare. THE one place
    quotes are handled: every ETag that enters (listing, response) or leaves (``If-Match``)
    the S3 backend goes through here, so a quoted and a bare spelling of one version compare equal.
    """
    return None if value is None else value.strip().strip('"')


def _raise_denied(exc, uri: str) -> None:
    """An S3 403 on a read as a PermissionError that names the permission to grant."""
    err = getattr(exc, "response", {}) or {}
    if err.get("Error", {}).get("Code") in ("AccessDenied", "403") or \
            err.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
        raise PermissionError(f"access denied reading {uri}: grant s3:GetObject on it "
                              "(and kms:Decrypt where it is SSE-KMS encrypted)") from exc


class S3Backend:
    """s3:// URIs through boto3 (objects, listings) and pyarrow (Parquet).

    Args:
        endpoint_url, region, max_attempts, connect_timeout, read_timeout: as for `Store`.
    """

    def __init__(self, endpoint_url: str | None, region: str | None, max_attempts: int,
                 connect_timeout: float, read_timeout: float):
        self.endpoint_url, self.region, self.max_attempts = endpoint_url, region, max_attempts
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._lock = threading.Lock()
        self._client = None
        self._s3fs = None

    @property
    def client(self):
        """This process's boto3 S3 client (thread-safe, built once)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # adaptive = standard retries (5xx, throttling, resets, timeouts, with jittered
                # backoff) plus a client-side token bucket that slows down on SlowDown, so many
                # decode tasks hitting one prefix back off instead of failing in a burst.
                # total_max_attempts, not max_attempts: botocore's max_attempts counts retries
                # after the first attempt, AWS_MAX_ATTEMPTS and pyarrow count attempts in all.
                config = Config(retries={"mode": "adaptive", "total_max_attempts": self.max_attempts},
                                connect_timeout=self.connect_timeout, read_timeout=self.read_timeout)
                self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                            config=config)
            return self._client

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        bucket, key = split_s3(uri)
        with self._lock:
            if self._s3fs is None:
                kwargs = {}
                if self.endpoint_url:
                    parsed = urlparse(self.endpoint_url)
                    kwargs["endpoint_override"] = parsed.netloc or parsed.path
                    kwargs["scheme"] = parsed.scheme or "https"
                if self.region:
                    kwargs["region"] = self.region
                import pyarrow.fs as pafs  # only where a filesystem is asked for

                self._s3fs = pafs.S3FileSystem(
                    retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
                    connect_timeout=self.connect_timeout, request_timeout=self.read_timeout, **kwargs)
            return self._s3fs, f"{bucket}/{key}".rstrip("/")

    def make_parent(self, path: str) -> None:
        """Nothing to do: S3 has no folders."""

    def _pages(self, bucket: str, prefix: str, delimiter: bool = False, page_size: int = 1000) -> Iterator[dict]:
        """The one `list_objects_v2` paginator: raw pages below ``prefix``; with ``delimiter``
        one level only (sub-folders in ``CommonPrefixes``)."""
        kwargs = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": page_size}}
        if delimiter:
            kwargs["Delimiter"] = "/"
        yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    # -- objects --------------------------------------------------------------------------------

    def _get(self, uri: str, if_match: str | None, byte_range: str | None = None) -> dict:
        """The one ``GetObject`` of whole and ranged reads, pinned to ``if_match`` when given.

        The request carries ``If-Match`` (S3 answers 412 when the object is another version),
        and the response's ETag is compared too, for servers that ignore ``If-Match``. A response
        without an ETag cannot be compared and is taken as it is.

        Raises:
            FileNotFoundError: no such object.
            PermissionError: S3 403 (the message names the permission).
            ObjectChanged: the object is not the ``if_match`` version.
        """
        bucket, key = split_s3(uri)
        expected = _etag(if_match) or None  # "" names no version
        kwargs = {"IfMatch": f'"{expected}"'} if expected is not None else {}
        if byte_range is not None:
            kwargs["Range"] = byte_range
        client = self.client
        try:
            resp = client.get_object(Bucket=bucket, Key=key, **kwargs)
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(uri) from exc
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise ObjectChanged(f"{uri} is no longer version {expected} (S3 412 PreconditionFailed)") from exc
            _raise_denied(exc, uri)
            raise
        got = _etag(resp.get("ETag"))
        if expected is not None and got is not None and got != expected:
            resp["Body"].close()
            raise ObjectChanged(f"{uri} is no longer version {expected}: the server sent {got} "
                                "(it ignored If-Match)")
        resp["ETag"] = got if got is not None else expected
        return resp

    def read_bytes(self, uri: str, if_match: str | None) -> bytes:
        return self._get(uri, if_match)["Body"].read()

    def read_range(self, uri: str, start: int, length: int, if_match: str | None) -> ByteRange:
        try:
            resp = self._get(uri, if_match, f"bytes={start}-{start + length - 1}")
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange" and start == 0:
                # S3 refuses any range of an empty object: it has no bytes to give.
                return ByteRange(b"", 0, 0, _etag(if_match) or "")
            raise
        data = resp["Body"].read()
        etag = resp["ETag"] or ""
        # "bytes 0-65535/2097152": the whole object's size; a server that ignores Range sends
        # the whole object with no Content-Range.
        total = resp.get("ContentRange", "").rpartition("/")[2]
        if not total.isdigit():
            return ByteRange(data[start:start + length], start, len(data), etag)
        return ByteRange(data, start, int(total), etag)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except self.client.exceptions.ClientError:
            return False

    def delete(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        self.client.delete_object(Bucket=bucket, Key=key)
        return True  # S3 does not say whether it existed

    # -- listings -------------------------------------------------------------------------------

    def list_pages(self, root: str, prefix: str, recursive: bool, page_size: int) -> Iterator[ListPage]:
        bucket, base = split_s3(root)
        base = _folder(base)
        for page in self._pages(bucket, base + prefix, delimiter=not recursive, page_size=page_size):
            contents = page.get("Contents", ())
            objs = [ObjectInfo(f"s3://{bucket}/{o['Key']}", o["Key"][len(base):], int(o["Size"]), _etag(o["ETag"]))
                    for o in contents if not o["Key"].endswith("/")]
            dirs = [cp["Prefix"][len(base):] for cp in page.get("CommonPrefixes", ())]
            markers = len(contents) - len(objs)
            if objs or dirs or markers:
                yield ListPage(objs, dirs, markers)

    def list_objects(self, root: str, include: tuple[str, ...], exclude: tuple[str, ...],
                     page_size: int) -> Iterator[ObjectInfo]:
        for page in self.list_pages(root, "", True, page_size):
            yield from (o for o in page.objects if key_matches(o.key, include, exclude))

    def delete_prefix(self, uri: str) -> int:
        bucket, prefix = split_s3(uri)
        n = 0
        for page in self._pages(bucket, prefix.rstrip("/") + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
                n += len(keys)
        return n

    def list_dirs(self, uri: str) -> list[str]:
        bucket, prefix = split_s3(uri)
        prefix = _folder(prefix.rstrip("/"))
        names = []
        for page in self._pages(bucket, prefix, delimiter=True):
            names += [cp["Prefix"][len(prefix):].rstrip("/") for cp in page.get("CommonPrefixes", ())]
        return sorted(names)
