"""What a `kneescreen.fileio.store.Store` lists and reads, and the URI helpers every layer uses:
`ObjectInfo`, `ListPage`, `ByteRange`, `ObjectChanged`; `is_s3`, `split_s3`, `join`, `key_matches`.
Re-exported by `kneescreen.fileio.store`, which is where callers import them from."""

from __future__ import annotations

import fnmatch
import pathlib
from dataclasses import dataclass, field
from kneescreen.errors import KneescreenError


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key relative to the listed root, size in bytes, etag (or mtime tag)."""

    uri: str
    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, start + len(data))`` of one object, with the whole object's size and the
    version tag (S3 ETag, local size+mtime tag) they came from."""

    data: bytes
    start: int
    size: int
    etag: str


@dataclass(frozen=True)
class ListPage:
    """One page of a listing (`Store.list_pages`).

    Attributes:
        objects: the objects on it (keys relative to the listed root).
        dirs: sub-folders (non-recursive listings only), relative keys ending in "/".
        markers: directory markers on it: S3 keys ending in "/" (zero-byte objects that consoles
            and some tools create for "folders"). They are not objects and are left out of
            ``objects``, but counted, so that a run can say what it skipped. Always 0 locally.
    """

    objects: list[ObjectInfo]
    dirs: list[str] = field(default_factory=list)
    markers: int = 0


class ObjectChanged(OSError):
    """The object is no longer the version the caller named (``if_match``): it was replaced
    between the listing (or a first ranged read) and this read. Screening reports it as the
    transient ``changed_during_read``; the next listing sees the new version."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``).

    Split by hand, never by a URL parser: an S3 key may hold any UTF-8 character, and
    ``urlparse`` would cut a key at ``#`` (fragment) or ``?`` (query) (issue #20). The key
    is everything after the first ``/`` behind the bucket, byte for byte (including a trailing
    ``/`` and repeated ``//``).
    """
    uri = str(uri)
    bucket, _, key = uri[len("s3://"):].partition("/") if is_s3(uri) else ("", "", "")
    if not bucket:
        raise KneescreenError(f"not an s3 URI: {uri!r} (expected s3://bucket/prefix)")
    return bucket, key


def join(root: str, *parts: str) -> str:
    root = str(root)
    if is_s3(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(pathlib.Path(root, *parts))


def key_matches(key: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether a key (relative to the listed root) passes the include and exclude globs."""
    if include and not any(fnmatch.fnmatch(key, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(key, p) for p in exclude)
