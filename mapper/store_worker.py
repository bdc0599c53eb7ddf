"""Every twin call of a running mapper happens in one dedicated thread.

SQLite commits (an fsync with synchronous=FULL) can take milliseconds on an SD card; doing
them off the event loop keeps device cycles on time. One thread, one connection: calls are
serialised, and batching (mapper.recorder) keeps the thread hop to one per batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from twin.store import TwinStore

T = TypeVar("T")


class StoreWorker:
    def __init__(self, opener: Callable[[], TwinStore]) -> None:
        self._opener = opener
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twin")
        self._store: TwinStore | None = None

    async def __aenter__(self) -> StoreWorker:
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._executor, self._opener)
        return self

    async def __aexit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        if self._store is not None:
            await loop.run_in_executor(self._executor, self._store.close)
            self._store = None
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[[TwinStore], T]) -> T:
        """Run `fn(store)` in the twin thread and return its result."""
        if self._store is None:
            raise RuntimeError("twin store is not open")
        store = self._store
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, store)
