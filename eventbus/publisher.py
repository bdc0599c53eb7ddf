"""Drains the outbox to the broker: a row leaves the outbox only after the broker acknowledged it.

Fresh rows come straight from memory after their commit (no re-read); anything else (after
a restart or a reconnect, or while the broker was away) is read back from SQLite in id
order, so the backlog drains in order with its original measurement timestamps. Deletes
of acknowledged rows are batched. After a reconnect everything not yet deleted is sent
again: duplicates are possible (QoS 1 allows them) and the `seq` field reveals them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import aiomqtt

from eventbus.bus import MqttBus
from mapper.store_worker import StoreWorker
from twin.store import OutboxRow

log = logging.getLogger("mapper.publisher")

LIVE_LIMIT = 20_000
PAGE = 1_000


class OutboxPublisher:
    def __init__(self, bus: MqttBus, worker: StoreWorker, *, max_inflight: int = 100, ack_delay_s: float = 0.05) -> None:
        self._bus = bus
        self._worker = worker
        self._max_inflight = max_inflight
        self._ack_delay_s = ack_delay_s
        self._live: deque[OutboxRow] = deque()
        self._backlog = True            # the outbox may hold rows not in `_live`
        self._last_queued = 0           # highest id handed to the broker in this connection
        self._max_committed = 0         # highest id known to be committed
        self._acked: list[int] = []
        self._wake = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._failed = asyncio.Event()
        self.published = 0
        self.idle = asyncio.Event()     # set while nothing is queued or in flight

    def offer(self, rows: list[OutboxRow]) -> None:
        """Rows just committed (called on the event loop right after the commit)."""
        self._max_committed = max(self._max_committed, rows[-1].id)
        self.idle.clear()
        if self._backlog or not self._bus.connected.is_set() or len(self._live) >= LIVE_LIMIT:
            self._backlog = True
        else:
            self._live.extend(rows)
        self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._ack_loop(), name="outbox-acks")
            while True:
                await self._bus.connected.wait()
                try:
                    await self._drain()
                except aiomqtt.MqttError as exc:
                    log.debug("publishing stopped: %s", exc)
                await self._reset()

    async def _reset(self) -> None:
        """After a disconnect: settle in-flight publishes, delete what was acked, resend the rest."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._flush_acks()
        self._live.clear()
        self._backlog = True
        self._last_queued = 0
        self._failed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._bus.disconnected.wait()

    async def _next_rows(self) -> list[OutboxRow]:
        while True:
            if self._failed.is_set() or not self._bus.connected.is_set():
                raise aiomqtt.MqttError("disconnected")
            if self._backlog:
                await self._flush_acks()
                after = self._last_queued
                committed_before = self._max_committed
                rows = await self._worker.call(lambda s: s.outbox_pending(after_id=after, limit=PAGE))
                if rows:
                    return rows
                # Nothing left in the table. Rows offered while we read are in the table
                # but not in memory: read again. Otherwise new rows will come live.
                self._backlog = self._max_committed != committed_before
                if self._backlog:
                    continue
            if self._live:
                rows = list(self._live)
                self._live.clear()
                return rows
            if not self._inflight:
                self.idle.set()
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            failed = asyncio.ensure_future(self._failed.wait())
            try:
                await asyncio.wait({waiter, failed}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                failed.cancel()

    async def _drain(self) -> None:
        window = asyncio.Semaphore(self._max_inflight)
        while True:
            rows = await self._next_rows()
            for row in rows:
                if row.id <= self._last_queued:
                    continue
                await window.acquire()
                if self._failed.is_set():
                    window.release()
                    raise aiomqtt.MqttError("disconnected")
                self._last_queued = row.id
                task = asyncio.create_task(self._publish(row, window))
                self._inflight.add(task)
                task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not self._inflight and not self._live and not self._backlog:
            self.idle.set()

    async def _publish(self, row: OutboxRow, window: asyncio.Semaphore) -> None:
        try:
            await self._bus.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
        except aiomqtt.MqttError:
            self._failed.set()
            return
        finally:
            window.release()
        self.published += 1
        self._acked.append(row.id)
        if len(self._acked) >= 500:
            self._ack_wake.set()

    async def _ack_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ack_delay_s):
                    await self._ack_wake.wait()
            self._ack_wake.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        if not self._acked:
            return
        ids, self._acked = self._acked, []
        await self._worker.call(lambda s: s.outbox_sent(ids))

    async def drain(self) -> None:
        """Wait until everything committed so far was acknowledged and deleted from the outbox."""
        await self.idle.wait()
        await self._flush_acks()
