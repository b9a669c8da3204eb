"""The archive listing, in parallel over key prefixes, streamed page by page.

    units: --list-prefixes (each listed whole), else the folders at --list-fanout-depth, found by
           one delimiter listing per folder above that depth (whose own objects are listed on
           the way: no key is skipped or listed twice)
      -> one thread per unit at a time (--list-workers), each paging its unit (S3: 1,000 keys per
         request), include/exclude applied in the thread
      -> a bounded queue of pages -> the caller (`screen.diff`), page by page

Why threads: listing is waiting on S3 round trips (~20-100 ms per page), which boto3 does with
the GIL released; the per-key work that follows (digest, partition) is small. Pages arrive in no
fixed order, so the listing fingerprint (`Fingerprint`) does not depend on order: equal for equal
listings whatever the fan-out, the workers or the timing.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kneescreen.fileio.store import ListPage, Store, key_matches

PAGE_SIZE = 1000  # keys per S3 list request (the most S3 returns)
FINGERPRINT_FORMAT = "kneescreen-listing/2"


class Fingerprint:
    """Order-independent fingerprint of a listing: the object count and the sum, modulo 2^128,
    of each object's 96-bit (key, etag) digest (`ledger.object_digest`), hashed once at the end.

    A sum, unlike a running hash of the keys in order, gives the same value for the same set of
    (key, etag) pairs in any order (parallel listing), and partial sums combine by addition.
    Keys in one listing are distinct, so the sum does not suffer XOR's cancellation of pairs.
    """

    def __init__(self):
        self.count = 0
        self.total = 0

    def add(self, digests: list[bytes]) -> None:
        self.count += len(digests)
        self.total += sum(int.from_bytes(d, "big") for d in digests)

    def hexdigest(self) -> str:
        text = f"{FINGERPRINT_FORMAT}:{self.count}:{self.total % 2**128:032x}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Unit:
    """A part of the listing: keys starting with ``prefix``; ``depth`` folder levels still to fan
    out (0: list everything below it)."""

    prefix: str
    depth: int


def iter_pages(store: Store, root: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               fanout_depth: int = 0, prefixes: tuple[str, ...] = (), workers: int = 1,
               page_size: int = PAGE_SIZE) -> Iterator[ListPage]:
    """Every object below ``root`` that passes include/exclude, once, in pages of no fixed order.

    Each `ListPage` holds objects and the directory markers (S3 keys ending in "/", not
    objects) skipped on its listing page, counted whatever include/exclude say; ``dirs`` is
    empty. A page may hold markers and no objects.

    Args:
        store: the store to list with.
        root: the archive (folder or s3:// prefix); keys are relative to it.
        include, exclude: globs on keys, as `Store.list_objects`.
        fanout_depth: folder levels to expand before listing each folder in parallel
            (0: one listing of the whole root, the sequential case).
        prefixes: key prefixes to list instead of the whole root, each in parallel
            (keys outside them are not listed; none may start another).
        workers: concurrent listing threads.
        page_size: keys per page (S3 list request).

    Raises:
        KneescreenError: a local ``root`` that does not exist (from `Store.list_pages`).
    """
    units = [_Unit(p, 0) for p in prefixes] or [_Unit("", fanout_depth)]
    if workers == 1 and units == [_Unit("", 0)]:  # the sequential listing: no thread, no queue
        for page in store.list_pages(root, "", recursive=True, page_size=page_size):
            page = _filtered(page, include, exclude)
            if page.objects or page.markers:
                yield page
        return
    yield from _parallel_pages(store, root, include, exclude, units, workers, page_size)


def _filtered(page: ListPage, include: tuple[str, ...], exclude: tuple[str, ...]) -> ListPage:
    return ListPage([o for o in page.objects if key_matches(o.key, include, exclude)], [], page.markers)


def _parallel_pages(store, root, include, exclude, units, workers, page_size) -> Iterator[ListPage]:
    # The queue bounds what the threads hold ahead of the consumer: 2 pages per thread.
    out: queue.Queue = queue.Queue(maxsize=2 * workers)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():  # a consumer that stopped early must not leave threads blocked
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work(unit: _Unit) -> None:
        try:
            children = []
            for page in store.list_pages(root, unit.prefix, recursive=unit.depth == 0, page_size=page_size):
                children += [_Unit(d, unit.depth - 1) for d in page.dirs]
                page = _filtered(page, include, exclude)
                if page.objects or page.markers:
                    put(("page", page))
            put(("done", children))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            put(("error", exc))

    pool = ThreadPoolExecutor(workers, thread_name_prefix="kneescreen-list")
    pending = 0
    try:
        for unit in units:
            pool.submit(work, unit)
            pending += 1
        while pending:
            kind, value = out.get()
            if kind == "page":
                yield value
            elif kind == "error":
                raise value
            else:
                pending -= 1
                for child in value:
                    pool.submit(work, child)
                    pending += 1
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
