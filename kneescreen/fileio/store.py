"""Local paths and s3:// URIs behind one object: the `Store`.

A `Store` is resolved once per command from ``--endpoint-url`` or the standard
``AWS_ENDPOINT_URL`` variable and then passed everywhere (into Ray tasks and actors as one
argument), so an S3-compatible endpoint (MinIO, a local test server) reaches every read and
write: images, splits, weights, checkpoints, bundles and screening output. It pickles as its
settings only; each process builds its boto3 client and pyarrow filesystem once, on first use.
Credentials come from boto3's default chain and are never logged. pyarrow's S3FileSystem ignores
``AWS_ENDPOINT_URL`` (pyarrow 26), hence the explicit ``endpoint_override``.

Both clients retry transient S3 failures (throttling, 5xx, connection resets, timeouts) up to
``max_attempts`` attempts in all (``AWS_MAX_ATTEMPTS``, default 5): boto3 in botocore's
``adaptive`` mode (standard retries plus client-side rate limiting when S3 says SlowDown),
pyarrow with the AWS SDK's standard strategy. What still fails becomes a ``read_failed`` row,
which the next incremental run retries (docs/operations.md).

Each URI goes to one of two backends with the same methods (`_Backend`): local folders
(`kneescreen.fileio._store_local`) or S3 (`kneescreen.fileio._store_s3`, which owns the clients and the
one ``list_objects_v2`` paginator). This module holds the settings, the dispatch, the method
contracts, and the table helpers built on them.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol


from kneescreen.errors import KneescreenError
from kneescreen.fileio._store_local import LocalBackend
from kneescreen.fileio._store_s3 import S3Backend
from kneescreen.fileio.objects import (
    ByteRange,
    ListPage,
    ObjectChanged,
    ObjectInfo,
    is_s3,
    join,
    key_matches,
    split_s3,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = ["ByteRange", "ListPage", "ObjectChanged", "ObjectInfo", "Store", "is_s3", "join", "key_matches", "split_s3"]


class _Backend(Protocol):
    """What `LocalBackend` and `S3Backend` both provide; the contracts are `Store`'s methods."""

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]: ...
    def make_parent(self, path: str) -> None: ...
    def read_bytes(self, uri: str, if_match: str | None) -> bytes: ...
    def read_range(self, uri: str, start: int, length: int, if_match: str | None) -> ByteRange: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def exists(self, uri: str) -> bool: ...
    def delete(self, uri: str) -> bool: ...
    def delete_prefix(self, uri: str) -> int: ...
    def list_dirs(self, uri: str) -> list[str]: ...
    def list_objects(self, root: str, include: tuple[str, ...], exclude: tuple[str, ...],
                     page_size: int) -> Iterator[ObjectInfo]: ...
    def list_pages(self, root: str, prefix: str, recursive: bool, page_size: int) -> Iterator[ListPage]: ...


class Store:
    """Read, write, list and delete below local folders and s3:// prefixes.

    Args:
        endpoint_url: S3-compatible endpoint (``http://127.0.0.1:9000``); None = AWS.
        region: AWS region for pyarrow (boto3 finds its own).
        max_attempts: S3 attempts per request in all, first one included (1 = no retries), for
            boto3 and pyarrow alike.
        connect_timeout: seconds to open a connection before the attempt fails (and is retried).
        read_timeout: seconds without a byte from S3 before the attempt fails (and is retried).

    Raises:
        KneescreenError: ``max_attempts`` below 1.
    """

    def __init__(self, endpoint_url: str | None = None, region: str | None = None, max_attempts: int = 5,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0):
        if int(max_attempts) < 1:
            raise KneescreenError(f"S3 max_attempts must be at least 1 (AWS_MAX_ATTEMPTS), not {max_attempts}")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.max_attempts = int(max_attempts)
        # 10 s to connect is long for S3 (normally milliseconds) yet short enough that a dead
        # endpoint is retried rather than hanging; 60 s read covers a slow large-object first byte.
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self._local = LocalBackend()
        # Holds the settings only until first use: its client and filesystem are built lazily.
        self._s3 = S3Backend(**self.__getstate__())

    @classmethod
    def resolve(cls, endpoint_url: str | None = None) -> Store:
        """The store for a command: the flag, else ``AWS_ENDPOINT_URL(_S3)``, else AWS; attempts
        from the standard ``AWS_MAX_ATTEMPTS`` (else 5)."""
        env = os.environ
        return cls(endpoint_url or env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3"),
                   env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                   max_attempts=int(env.get("AWS_MAX_ATTEMPTS") or 5))

    # Pickled as settings only: clients are per process and rebuilt on first use.
    def __getstate__(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "region": self.region, "max_attempts": self.max_attempts,
                "connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __eq__(self, other) -> bool:
        return isinstance(other, Store) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash(tuple(self.__getstate__().items()))

    def __repr__(self) -> str:
        return f"Store(endpoint_url={self.endpoint_url!r}, region={self.region!r}, max_attempts={self.max_attempts})"

    def _backend(self, uri: str) -> _Backend:
        return self._s3 if is_s3(uri) else self._local

    # -- clients --------------------------------------------------------------------------------

    @property
    def client(self):
        """This process's boto3 S3 client (thread-safe, built once)."""
        return self._s3.client

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
        return self._backend(uri).filesystem(uri)

    # -- objects --------------------------------------------------------------------------------

    def read_bytes(self, uri: str, if_match: str | None = None) -> bytes:
        """Whole object or file as bytes.

        ``if_match`` pins the read to one version: the etag a listing gave (`ObjectInfo.etag`,
        quoted or not). On S3 the ``GetObject`` carries ``If-Match`` and the response's ETag is
        compared as well (servers that ignore ``If-Match``); locally the open file's size+mtime
        tag is compared before and after the read. Same code path as `read_range`.

        Raises:
            FileNotFoundError: no such object or file.
            PermissionError: S3 403 (the message names the permission to grant).
            ObjectChanged: ``if_match`` is given and the object is no longer that version.
        """
        uri = str(uri)
        return self._backend(uri).read_bytes(uri, if_match)

    def read_range(self, uri: str, start: int, length: int, if_match: str | None = None) -> ByteRange:
        """Up to ``length`` bytes from offset ``start`` (fewer where the object ends first).

        One S3 ``GetObject`` with a ``Range`` header (same client, hence the same retries) or
        one seek and read of a local file. ``if_match`` as for `read_bytes`: the listed etag,
        or, reading an object in pieces, the first piece's ``etag``, so the pieces cannot come
        from two versions of it.

        Raises:
            FileNotFoundError: no such object or file.
            PermissionError: S3 403.
            ObjectChanged: ``if_match`` is given and the object is no longer that version.
        """
        uri, start, length = str(uri), int(start), int(length)
        if start < 0 or length < 1:
            raise ValueError(f"read_range needs start >= 0 and length >= 1, not {start}, {length}")
        return self._backend(uri).read_range(uri, start, length, if_match)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write an object; local files are replaced atomically (readers never see half a file)."""
        uri = str(uri)
        self._backend(uri).write_bytes(uri, data)

    def exists(self, uri: str) -> bool:
        return self._backend(uri).exists(uri)

    def delete(self, uri: str) -> bool:
        """Delete one object or file; returns whether it existed (S3 cannot tell: always True)."""
        return self._backend(uri).delete(uri)

    def delete_prefix(self, uri: str) -> int:
        """Delete every object/file below ``uri``; returns how many. Used to drop uncommitted runs."""
        return self._backend(uri).delete_prefix(uri)

    # -- listings -------------------------------------------------------------------------------

    def list_objects(self, root: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                     page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Stream objects below ``root`` in key order, one page at a time.

        A generator, so an archive of millions of keys never sits in driver memory at once.
        Local files get an etag built from size and mtime.

        Raises:
            KneescreenError: a local ``root`` that does not exist.
        """
        root = str(root)
        yield from self._backend(root).list_objects(root, include, exclude, page_size)

    def list_pages(self, root: str, prefix: str = "", recursive: bool = True,
                   page_size: int = 1000) -> Iterator[ListPage]:
        """Pages of one part of the listing below ``root``: `ListPage` (objects, sub-folders,
        directory markers skipped).

        The building block of a parallel listing (`screen.listing`): each call lists only the keys
        that start with ``prefix`` (relative to ``root``; a string prefix, not necessarily a
        folder). ``recursive=False`` lists one level (``prefix`` must be "" or end with "/"):
        the objects directly in it, and its sub-folders as keys relative to ``root`` ending in
        "/"; recursive listings report no sub-folders. Keys are relative to ``root`` as in
        `list_objects` (hidden local files are left out; S3 directory markers, keys ending in
        "/", are left out of ``objects`` and counted in ``markers``); no include or exclude
        filter is applied and pages are in no particular order across calls.

        Raises:
            KneescreenError: a local ``root`` that does not exist.
        """
        root = str(root)
        yield from self._backend(root).list_pages(root, prefix, recursive, page_size)

    def list_dirs(self, uri: str) -> list[str]:
        """Immediate sub-folder names below ``uri`` (S3: common prefixes)."""
        return self._backend(uri).list_dirs(uri)

    # -- tables ---------------------------------------------------------------------------------

    def read_table(self, uri: str) -> list[dict]:
        """Rows of a CSV or Parquet file as dicts: labels, sidecars, splits."""
        data = self.read_bytes(uri)
        if uri.endswith(".parquet"):
            import pyarrow.parquet as pq  # here and below: byte reads (`kneescreen inspect`) never load pyarrow

            return pq.read_table(io.BytesIO(data)).to_pylist()
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))

    def write_csv(self, uri: str, rows: list[dict], fields: list[str] | None = None) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields or (list(rows[0]) if rows else ["key"]))
        writer.writeheader()
        writer.writerows(rows)
        self.write_bytes(uri, buf.getvalue().encode())

    def write_parquet(self, table, uri: str) -> None:
        """One Parquet file at ``uri`` (parent folders created locally)."""
        backend = self._backend(uri)
        fs, path = backend.filesystem(uri)
        backend.make_parent(path)
        import pyarrow.parquet as pq

        pq.write_table(table, path, filesystem=fs)

    def read_parquet(self, uri: str, **kwargs):
        """A Parquet file or folder of files as one Arrow table (``partitioning=None``)."""
        import pyarrow.parquet as pq

        fs, path = self.filesystem(uri)
        return pq.read_table(path, filesystem=fs, partitioning=None, **kwargs)

    def count_parquet_rows(self, uri: str) -> int:
        """Rows in a Parquet file or folder, from the file footers (no data pages read)."""
        import pyarrow.dataset as pads

        fs, path = self.filesystem(uri)
        return pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).count_rows()

    def iter_parquet_batches(self, uri: str, columns: list[str], schema=None, batch_size: int = 65_536,
                             readahead: bool = True) -> Iterator:
        """Record batches of a Parquet file or folder, a few at a time.

        Readahead is kept to one file and two batches, so memory holds a handful of batches
        whatever the number of rows (aggregations over a whole run stay bounded on the driver).
        ``readahead=False`` reads one file after another in the calling thread: slower, but
        nothing is decoded ahead of a slow consumer (measured: the scanner's background reads
        held ~60 MB ahead of a per-row Python loop over 900,000 rows, this ~5 MB).
        """
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq

        fs, path = self.filesystem(uri)
        ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None, schema=schema)
        if readahead:
            yield from ds.to_batches(columns=columns, batch_size=batch_size, batch_readahead=2, fragment_readahead=1)
            return
        for file in ds.files:
            with fs.open_input_file(file) as fh:
                yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns, use_threads=False)
