"""Every twin call of a running mapper happens in one dedicated thread.

SQLite commits (an fsync with synchronous=FULL) can take milliseconds on an SD card; doing
them off the event loop keeps device cycles on time. One thread, one connection: calls are
serialised, and batching (mapper.recorder) keeps the thread hop to one per batch.

After every call the worker also notes how the twin files look and SQLite's `data_version`
(which moves only when *another* connection commits). `changed_elsewhere()` compares that
note with the files as they are now, so the loop can notice `mapper twin set` from another
process with two stat() calls instead of a thread hop per poll.

The worker also keeps, for the systemd watchdog (mapper.systemd), when each call was handed
to the thread and when the thread last finished one: `stalled_for()` says how long the thread
has had work waiting without finishing any of it (a stuck fsync, a deadlock, a call that never
returns). A thread that is busy but getting through its queue is not stalled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
import traceback
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
        # For stalled_for(): calls handed to the thread and not finished yet (number -> when, in
        # time.monotonic(); numbered in the order submitted, so the first is the oldest), and when
        # the thread last finished one. Written from both threads, under the lock.
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}
        self._submitted = 0
        self._last_done = time.monotonic()
        self._thread_id: int | None = None
        # hurry(): the busy timeout (ms) the thread is to set before its next call, once.
        self._hurry_ms: int | None = None

    def hurry(self, busy_timeout_s: float) -> None:
        """A stop began: every call from now on waits at most `busy_timeout_s` for another process's
        lock on the twin, not twin.busy_timeout_ms (30 s). With the twin held locked (an sqlite3
        shell in a transaction, a VACUUM), each call queued at the stop waited that long in turn:
        the stop took minutes, said nothing meanwhile, and systemd killed it (TimeoutStopSec).
        (A call already waiting goes on waiting: SQLite's wait for a lock cannot be interrupted.)"""
        self._hurry_ms = round(busy_timeout_s * 1000)

    async def __aenter__(self) -> StoreWorker:
        if self._store is not None:  # opened already (MapperService._start_twin): `async with` closes it
            return self
        try:
            self._store = await self._start(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)  # (the thread ends: nothing is left in it)
            raise
        path = Path(self._store.path)
        self._files = (path, path.with_name(path.name + "-wal"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._store is not None:
            await self._start(self._store.close)
            self._store = None
        self._executor.shutdown(wait=True)

    def _open(self) -> TwinStore:
        self._thread_id = threading.get_ident()
        return self._opener()

    def _start(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Hand `fn(*args)` to the thread, noting when (run_in_executor, plus the bookkeeping)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            number = self._submitted
            self._submitted += 1
            self._pending[number] = time.monotonic()
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            with self._lock:
                del self._pending[number]
            raise
        future.add_done_callback(lambda f: self._finished(number, f))
        return asyncio.wrap_future(future, loop=loop)

    def _finished(self, number: int, future: concurrent.futures.Future[object]) -> None:
        # In the twin thread when the call ran; in the cancelling thread when it was cancelled
        # before it started (which is not the thread finishing anything).
        with self._lock:
            del self._pending[number]
            if not future.cancelled():
                self._last_done = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds the thread has had work waiting without finishing any: 0 when nothing waits,
        else since the later of the oldest unfinished call's submission and the last finish."""
        with self._lock:
            if not self._pending:
                return 0.0
            since = max(next(iter(self._pending.values())), self._last_done)
        return max(0.0, time.monotonic() - since)

    def pending(self) -> int:
        """Calls handed to the thread and not finished yet."""
        with self._lock:
            return len(self._pending)

    def thread_stack(self) -> str | None:
        """Where the twin thread is now (for the log when it is stalled), or None."""
        frame = sys._current_frames().get(self._thread_id) if self._thread_id is not None else None  # noqa: SLF001
        return "".join(traceback.format_stack(frame)) if frame is not None else None

    def _run(self, fn: Callable[[TwinStore], T], store: TwinStore) -> T:
        if self._hurry_ms is not None:
            store.conn.execute(f"PRAGMA busy_timeout={self._hurry_ms}")
            self._hurry_ms = None  # (set once: it stays)
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
        return self._start(self._run, fn, self._store)

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
