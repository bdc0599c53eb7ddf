"""Every twin call of a running mapper happens in one dedicated thread.

SQLite commits (an fsync with synchronous=FULL) can take milliseconds on an SD card; doing
them off the event loop keeps device cycles on time. One thread, one connection: calls are
serialised, and batching (mapper.recorder) keeps the thread hop to one per batch.

After every call the worker also notes how the twin files look and SQLite's `data_version`
(which moves only when *another* connection commits). `changed_elsewhere()` compares that
note with the files as they are now, so the loop can notice `mapper twin set` from another
process with two stat() calls instead of a thread hop per poll.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from twin.store import TwinStore

T = TypeVar("T")
Stamp = tuple[tuple[int, int, int, int] | None, ...]


def file_stamp(paths: tuple[Path, ...]) -> Stamp:
    """Identity, size and change times of each file (None when it does not exist)."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class StoreWorker:
    def __init__(self, opener: Callable[[], TwinStore]) -> None:
        self._opener = opener
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twin")
        self._store: TwinStore | None = None
        self._files: tuple[Path, ...] = ()
        # (files, data_version) right after our latest call; replaced whole, so safe to read from the loop.
        self.last_seen: tuple[Stamp, int] | None = None

    async def __aenter__(self) -> StoreWorker:
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._executor, self._opener)
        path = Path(self._store.path)
        self._files = (path, path.with_name(path.name + "-wal"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        if self._store is not None:
            await loop.run_in_executor(self._executor, self._store.close)
            self._store = None
        self._executor.shutdown(wait=True)

    def _run(self, fn: Callable[[TwinStore], T], store: TwinStore) -> T:
        try:
            return fn(store)
        finally:
            # Files first, version second: a commit by someone else in between shows in the version.
            stamp = file_stamp(self._files)
            self.last_seen = (stamp, store.conn.execute("PRAGMA data_version").fetchone()[0])

    async def call(self, fn: Callable[[TwinStore], T]) -> T:
        """Run `fn(store)` in the twin thread and return its result."""
        return await self.submit(fn)

    def submit(self, fn: Callable[[TwinStore], T]) -> asyncio.Future[T]:
        """Start `fn(store)` in the twin thread; its future (no task of its own: the recorder's path)."""
        if self._store is None:
            raise RuntimeError("twin store is not open")
        return asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn, self._store)

    async def data_version(self) -> int:
        """SQLite's data_version of our connection (a thread hop)."""
        await self.call(lambda _s: None)
        assert self.last_seen is not None
        return self.last_seen[1]

    def known_version(self) -> int | None:
        """The data_version, without a thread hop, if nothing touched the twin files since our last call."""
        seen = self.last_seen
        if seen is None or seen[0] != file_stamp(self._files):
            return None
        return seen[1]
