"""The local-folder backend of `kneescreen.fileio.store.Store`: files, atomic writes, listings in key
order with an etag built from size and mtime. The method contracts are `Store`'s.

The tag is the local stand-in for an ETag: a read pinned to a listed tag (``if_match``) checks it
on the open file before and after reading, so a file replaced or rewritten since the listing
raises `ObjectChanged`. It is weaker than an ETag: a rewrite to the same size within one tick of
the kernel's file-time clock (a few milliseconds on Linux ext4/xfs; 2 s on FAT) keeps the tag
and is not noticed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING


from kneescreen.errors import KneescreenError
from kneescreen.fileio.objects import ByteRange, ListPage, ObjectChanged, ObjectInfo, key_matches

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def _local_tag(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"  # cheap, changes when the file does


def _info(path: pathlib.Path, key: str) -> ObjectInfo:
    st = path.stat()
    return ObjectInfo(str(path), key, st.st_size, _local_tag(st))


def _root(root: str) -> pathlib.Path:
    """The listed root: a file or a folder, else an error that says what was expected."""
    base = pathlib.Path(root)
    if not base.is_file() and not base.is_dir():
        raise KneescreenError(f"input {root!r} does not exist (expected a folder, file or s3:// prefix)")
    return base


def _local_entries(base: pathlib.Path, prefix: str, recursive: bool) -> Iterator[tuple[pathlib.Path, bool]]:
    """(path, is_dir) below ``base`` whose key starts with ``prefix``: `Store.list_pages` on disk.

    Recursive: files only, every level; else files and folders of one level. Hidden files are left
    out (as `Store.list_objects` does); hidden folders are not.
    """
    folder, _, start = prefix.rpartition("/")
    top = base / folder if folder else base
    if not top.is_dir():
        return
    for entry in sorted(os.scandir(top), key=lambda e: e.name):
        if not entry.name.startswith(start):
            continue
        path = pathlib.Path(entry.path)
        if entry.is_dir():
            if entry.is_symlink():
                continue  # os.walk (`Store.list_objects`) does not descend into linked folders either
            if not recursive:
                yield path, True
                continue
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                yield from ((pathlib.Path(dirpath, n), False) for n in sorted(filenames) if not n.startswith("."))
        elif not entry.name.startswith("."):
            yield path, False


class LocalBackend:
    """Local paths: stateless, one per `Store`."""

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        import pyarrow.fs as pafs  # only where a filesystem is asked for: byte reads never load pyarrow

        return pafs.LocalFileSystem(), str(pathlib.Path(uri).absolute())

    def make_parent(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def _read(self, uri: str, start: int, length: int | None, if_match: str | None) -> ByteRange:
        """The one read of whole files and ranges: the open file's tag is checked against
        ``if_match`` before the read and again after it (a rewrite in place during the read)."""
        with open(uri, "rb") as f:
            st = os.fstat(f.fileno())
            tag = _local_tag(st)
            if if_match is not None and tag != if_match:
                raise ObjectChanged(f"{uri} is no longer version {if_match} (now {tag})")
            f.seek(start)
            data = f.read() if length is None else f.read(length)
            if if_match is not None and _local_tag(os.fstat(f.fileno())) != tag:
                raise ObjectChanged(f"{uri} changed while it was being read")
        return ByteRange(data, start, st.st_size, tag)

    def read_bytes(self, uri: str, if_match: str | None) -> bytes:
        return self._read(uri, 0, None, if_match).data

    def read_range(self, uri: str, start: int, length: int, if_match: str | None) -> ByteRange:
        return self._read(uri, start, length, if_match)

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = pathlib.Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def exists(self, uri: str) -> bool:
        return pathlib.Path(uri).exists()

    def list_objects(self, root: str, include: tuple[str, ...], exclude: tuple[str, ...],
                     page_size: int) -> Iterator[ObjectInfo]:
        base = _root(root)
        if base.is_file():
            yield _info(base, base.name)
            return
        # os.walk with sorted dirs gives key order without materialising the whole tree.
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                path = pathlib.Path(dirpath, name)
                key = path.relative_to(base).as_posix()
                if name.startswith(".") or not key_matches(key, include, exclude):
                    continue
                yield _info(path, key)

    def list_pages(self, root: str, prefix: str, recursive: bool, page_size: int) -> Iterator[ListPage]:
        base = _root(root)
        if base.is_file():
            if not prefix or base.name.startswith(prefix):
                yield ListPage([_info(base, base.name)])
            return
        page: list[ObjectInfo] = []
        dirs: list[str] = []
        for path, is_dir in _local_entries(base, prefix, recursive):
            key = path.relative_to(base).as_posix()
            if is_dir:
                dirs.append(key + "/")
                continue
            page.append(_info(path, key))
            if len(page) >= page_size:
                yield ListPage(page)
                page = []
        if page or dirs:
            yield ListPage(page, dirs)

    def delete_prefix(self, uri: str) -> int:
        path = pathlib.Path(uri)
        if not path.exists():
            return 0
        n = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        return n

    def delete(self, uri: str) -> bool:
        try:
            pathlib.Path(uri).unlink()
        except FileNotFoundError:
            return False
        return True

    def list_dirs(self, uri: str) -> list[str]:
        path = pathlib.Path(uri)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
