"""Batches readings into twin transactions: the hand-off from device loops to everything else.

Group commit: while the mapper is not busy, pending readings are committed as soon as the
previous commit is done (readings that arrive during a commit form the next batch), so a
reading waits for one fsync, not for a timer. Once batches grow to `BUSY_BATCH` readings the
mapper is busy, and a batch then also waits up to `batch_delay` (or until `batch_max`) for
company: fewer, larger transactions and fewer wake-ups where throughput matters. With a
`commit_interval` (twin.commit_interval_ms, for SD-card wear) every batch waits that long for
company, busy or not; a flush (the stop's, a write's read-back) never waits. The same
transaction queues the telemetry those readings cause in the outbox; the committed outbox
rows then go to the publisher (if any) straight from memory.

Work that belongs with a batch (an inference decision on the window those readings closed)
can ride in the same transaction through `pre_commit` hooks: one commit and one fsync
instead of two, and the decision is exactly as durable as the readings it was made from.
A batch whose commit failed is retried as it was (a full disk passes), but never held back
for its extras: after EXTRA_TRIES failures the readings commit alone and each extra is
tried on its own after them, so a bug in an extra cannot stop the readings. Nor can a bug in the
message factory: a batch whose messages cannot be made is committed without them (logged).

While the twin cannot be written (a full disk, a read-only remount, another process's lock)
readings keep coming and wait in memory; at most `max_waiting` of them (twin.waiting_max_readings,
plus the batch being committed). Beyond that the OLDEST waiting readings are dropped (the
newest values matter most for a twin), with the telemetry they carry, counted and logged, a line
a minute: `dropped` those whose telemetry nobody saw, `dropped_live` those whose telemetry had gone
out live (below); in the twin's counters('readings_dropped') and ('readings_dropped_live') with the
next commit, shown by `mapper devices` and `<node>/health`.
The failed commits themselves (retried every `retry_s`) are logged the same way: the first at
once, then a line a minute saying how many were not logged; the commit that succeeds again logs
how long the twin could not be written and how many readings waited.
The outage is also kept for whoever tells it elsewhere (eventbus/health.py: `<node>/health` on
MQTT): `outage_failures`, `outage_since_ms`, `last_error`, `writable_since_ms`, and `on_health` is
called after each failed commit and once at the commit that ends the outage; never per reading or
per commit that succeeds as the one before.
What came with a dropped reading's batch and is not that reading's own telemetry (the batch's
extras, such as inference decisions with their offload requests, and its other messages) stays
and commits with what is left of the batch, or alone: extras are neither lost nor run twice.

The live path. Telemetry normally leaves only from committed outbox rows, so while the twin could not
be written a node went dark on every dashboard although its sensors and broker were fine (and with a
card remounted read-only, until a reboot). Once the twin is unwritable (UNWRITABLE_AFTER failed
commits in a row, as health.py says it), after each failed commit the telemetry of the waiting readings
goes out live, from memory: pending readings are made into batches (hooks and message factory, as
their commit would), and each telemetry message of a waiting reading whose telemetry has not gone out
yet is handed to `live_out` (the outbox publisher, after every committed row and within its window)
as a LiveMessage, at the QoS and retain flag it would have had, with `"live":true` in place of the
`seq`. A seq is made durable by the commit that carries it; one handed out while nothing can be
written would be handed out again after a restart, to another reading, and an app that drops
duplicates by seq would drop that one. Live messages are sent once and need none.
Before the next commit try, the live messages the publisher handed to the connection are done: their
readings are still committed to history (the twin keeps its history and reported values) but their
telemetry leaves the batch, so it is not queued again and every subscriber sees each reading once.
Those not handed yet are cancelled and their telemetry commits with the readings (through the outbox,
with a seq); if the commit fails they are made live again after it. So nothing is live while a
commit is tried, and the telemetry of a batch that commits never goes out after a later reading's.
Only a reading's own telemetry goes live. Device states (retained views that supersede each other in
the outbox), twin documents and replies (they tell what the twin holds), offload requests (a cloud
worker's answer is applied to a decision that must be committed first) and the other messages of a
batch wait for its commit, as before.
The broker down at the same time: nothing is made live while the publisher is not connected, or
has committed rows to send first (the readings wait for their commit and go through the outbox,
or are dropped unseen for the bound; the next failed commit looks again), and
live messages not yet handed wait for the next connection, after the outbox's backlog. None is kept
for a resend: one in flight when the connection is lost (at most the publisher's window, mqtt.max_inflight;
the broker may or may not have it: counted as publisher.live_unacked) is not sent again, its reading
still committed. paho keeps nothing across
connections (a connection is a new client).
How soon: after each failed commit, so a second apart on a full or read-only disk (`retry_s`), but
twin.busy_timeout_ms apart while another process holds the lock (each try waits that long), and at
most LIVE_MAX each time.
Cost: none while the twin takes commits (the live path starts only in `run`'s failure branch; the
commit path tests an empty list once a batch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import orjson

from mapper.finish import outcome
from mapper.logs import Throttle, held_note
from mapper.store_worker import StoreWorker
from twin.records import Reading
from twin.store import OutboxRow, OutMessage, TwinStore

log = logging.getLogger("mapper.recorder")

MessageFactory = Callable[[list[Reading]], Iterable[OutMessage]]

# A batch at least this large means readings arrive faster than commits finish.
BUSY_BATCH = 64
# Failed commits of a batch with its extras before the readings are committed without them.
EXTRA_TRIES = 2
# Failed commits in a row before the twin counts as unwritable (the first and its retry: one lock
# held a moment too long is not news). Then `<node>/health` says `unwritable` and telemetry goes live.
UNWRITABLE_AFTER = 2
# Live messages made per failed commit at most (the oldest waiting telemetry first; the rest the next
# time): those not handed by the next try are made again after it, and making one costs ~1 us on
# the event loop, so a round after a long broker outage (100,000 waiting) stays ~10 ms, not ~100.
LIVE_MAX = 10_000


@dataclass
class Extra:
    """Work to commit with a batch: `work(store)` runs inside its transaction (in the twin
    thread), then `done(result)` on the event loop once it is committed. If the work keeps
    failing it is given up: `failed(exc)` on the event loop instead of `done`."""

    work: Callable[[TwinStore], Any]
    done: Callable[[Any], None]
    failed: Callable[[BaseException], None] | None = None


PreCommit = Callable[[list[Reading]], "Extra | None"]


@dataclass
class _Batch:
    """A batch made (its hooks run, its messages made) whose commit failed or was not tried yet."""

    readings: list[Reading]
    messages: list[OutMessage]
    extras: list[Extra]
    failures: int = 0


class LiveMessage:
    """A telemetry message of a reading not committed yet, handed to the publisher to go out now
    (see the module's doc). The publisher sets `handed` once it gave it to the connection, and
    skips it once the recorder set `cancelled` (its reading is committed with it, or dropped)."""

    __slots__ = ("message", "handed", "cancelled")

    def __init__(self, message: OutMessage) -> None:
        self.message = message
        self.handed = False
        self.cancelled = False

    def payload(self) -> bytes:
        """The payload its history row would carry (twin.store: `{"value":…,"ts":…,<body>}`), with
        `"live":true` in place of the `seq` (made when it goes, not before)."""
        m = self.message
        r = m.reading
        assert r is not None and isinstance(m.body, dict)
        fields = orjson.dumps(m.body)[1:-1]
        value = b"null" if r.value is None else orjson.dumps(r.value)
        return b'{"value":%b,"ts":%d%b,"live":true}' % (value, r.taken_at_ms, b"," + fields if fields else b"")


class LiveOut(Protocol):
    """Where live messages go (eventbus.publisher.OutboxPublisher)."""

    live_published: int

    def live_ready(self) -> bool: ...

    def offer_live(self, entries: list[LiveMessage]) -> None: ...


def goes_live(m: OutMessage) -> bool:
    """A reading's own telemetry (carried in its history row once committed): the one kind of
    message published live while the twin cannot be written."""
    return m.reading is not None and m.kind == "telemetry" and m.sequenced and isinstance(m.body, dict)


@dataclass(frozen=True)
class _Failed:
    """The result of an extra whose work failed in its own transaction."""

    exc: BaseException


class Recorder:
    def __init__(self, worker: StoreWorker, *, batch_max: int = 500, batch_delay_s: float = 0.02,
                 max_waiting: int | None = None, commit_interval_s: float = 0.0) -> None:
        self._worker = worker
        # > 0: readings wait up to this long (or until batch_max) before their commit, busy or not.
        self._commit_interval_s = commit_interval_s
        self._batch_max = batch_max
        self._batch_delay_s = batch_delay_s
        self._pending: deque[Reading] = deque()
        # At most this many readings wait for a commit (None: no bound); the oldest go first.
        self._max_waiting = max_waiting
        self.dropped = 0  # readings dropped for that bound since start whose telemetry nobody saw
        self.dropped_live = 0  # ... and those whose telemetry had gone out live (delivered, not in the history)
        self._dropped_unsaved = 0  # ... not yet counted in the twin (they go with the next commit)
        self._dropped_live_unsaved = 0
        self._log_throttle = Throttle(burst=1, interval_s=60.0)
        self.retry_s = 1.0  # between tries of a commit that failed
        self.commit_failures = 0  # failed commits since start
        self._failing_since: float | None = None  # monotonic time of the first failure of the current outage
        self._failures_unlogged = 0  # failed commits of the current outage not logged (throttled)
        self.outage_failures = 0  # failed commits of the current outage (0: the twin takes commits)
        self.outage_since_ms: int | None = None  # wall clock (ms) of the current outage's first failed commit
        self.last_error: BaseException | None = None  # what the last failed commit raised
        self.writable_since_ms = time.time_ns() // 1_000_000  # the start, or the end of the last outage
        # Told after each failed commit and at the commit that ends an outage (see the module's doc).
        self.on_health: Callable[[], None] | None = None
        # Told at the commit that ends an outage: the twin takes writes again (the device loops'
        # twin writes that wait are tried then, not at the end of their back-off).
        self.on_writable_again: list[Callable[[], None]] = []
        self._has_data = asyncio.Event()
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last_batch = 0
        self.committed = 0
        self.message_factory: MessageFactory | None = None
        self.on_outbox: Callable[[list[OutboxRow]], None] | None = None
        self.on_commit: Callable[[list[Reading]], None] | None = None
        # The publisher's acknowledged outbox rows ride along in the next transaction.
        self.take_acks: Callable[[], list[int]] | None = None
        self.return_acks: Callable[[list[int]], None] | None = None
        # Called once per batch before its transaction; an Extra it returns commits with the batch.
        self.pre_commit: list[PreCommit] = []
        # The same, called after the message factory made the batch's messages (so it may act on
        # what the factory found due: the event bus's twin documents at a report cycle).
        self.after_messages: list[PreCommit] = []
        # Readings taken on demand (a REST GET, a DMI GetDevice), by id: recorded like the others, but not
        # the device's own sampling, which pre_commit hooks may tell apart (inference: not window steps).
        # Held until their batch has been through the hooks (or they are shed): an id is not reused meanwhile.
        # Empty while nobody asks: the hot path pays one truthiness test per batch.
        self.on_demand: dict[int, Reading] = {}
        # Batches whose commit failed (the first), or made while the twin was unwritable (the
        # others), oldest first; and how many readings they hold.
        self._retry: deque[_Batch] = deque()
        self._retry_readings = 0
        # The live path (see the module's doc): where live messages go (None: nowhere, none are
        # made); those handed to it since the last commit try, in order; how many of those at the
        # front belong to readings dropped since; readings whose telemetry went out live (by id).
        self.live_out: LiveOut | None = None
        self._live: list[LiveMessage] = []
        self._live_from = 0
        self._seen_live: set[int] = set()

    def add(self, reading: Reading) -> None:
        self._pending.append(reading)
        self._has_data.set()
        if len(self._pending) >= self._batch_max:
            self._full.set()
        if self._max_waiting is not None and self.waiting() > self._max_waiting:
            self._shed()

    def add_on_demand(self, reading: Reading) -> None:
        """A reading taken because someone asked (REST, DMI), not by the device's collect or change loops."""
        self.on_demand[id(reading)] = reading
        self.add(reading)

    def _shed(self) -> None:
        """Drop the oldest waiting readings beyond the bound: first from the batch whose commit
        failed (the oldest), with the telemetry messages they carry, then from the front of the
        pending ones (no hook has seen those yet)."""
        assert self._max_waiting is not None
        excess = self.waiting() - self._max_waiting
        if excess <= 0:
            return
        shed = seen = 0
        retry = self._retry
        i = 0
        while i < len(retry) and excess > 0:
            waiting = retry[i]
            batch = waiting.readings
            k = min(excess, len(batch))
            if k:
                gone = {id(r) for r in batch[:k]}
                waiting.readings = batch[k:]  # a new list: hooks that saw the batch may still hold the old one
                # A dropped reading's own telemetry goes with it (else it would be published
                # without its history row); the batch's other messages and its extras stay.
                waiting.messages = [m for m in waiting.messages
                                    if m.reading is None or m.kind != "telemetry" or id(m.reading) not in gone]
                self._retry_readings -= k
                shed += k
                excess -= k
                if self._live or self._seen_live:
                    seen += self._shed_live(gone)
            if waiting.readings or waiting.messages or waiting.extras:
                i += 1  # emptied of readings, what else it holds still commits, once, before later readings
            else:
                del retry[i]
        pending = self._pending
        on_demand = self.on_demand
        for _ in range(min(excess, len(pending))):
            gone = pending.popleft()
            if on_demand:
                on_demand.pop(id(gone), None)
            shed += 1
        self.dropped += shed - seen
        self._dropped_unsaved += shed - seen
        self.dropped_live += seen
        self._dropped_live_unsaved += seen
        held = self._log_throttle("waiting_full")
        if held is not None:
            log.warning("%d readings wait for a twin commit, the limit (twin.waiting_max_readings): the oldest are "
                        "dropped, %d so far (counted in the twin once it can be written)%s%s",
                        self.waiting(), self.dropped + self.dropped_live,
                        f"; {self.dropped_live} of them had gone out live" if self.dropped_live else "",
                        held_note(held))

    def _shed_live(self, gone: set[int]) -> int:
        """Of the dropped readings `gone` (the oldest waiting), how many had their telemetry go out
        live; the live messages of the others are cancelled (they must not go out now: counted as
        unseen)."""
        seen_live = self._seen_live
        seen = 0
        if seen_live:
            before = len(seen_live)
            seen_live.difference_update(gone)
            seen = before - len(seen_live)
        live, i = self._live, self._live_from
        # The live messages are in the order of their readings: those of the oldest come first.
        while i < len(live) and id(live[i].message.reading) in gone:
            if live[i].handed:
                seen += 1
            else:
                live[i].cancelled = True
            i += 1
        self._live_from = i
        return seen

    async def run(self) -> None:
        while True:
            await self._has_data.wait()
            busy = self._last_batch >= BUSY_BATCH
            delay = self._commit_interval_s or (self._batch_delay_s if busy else 0.0)
            if delay > 0 and len(self._pending) < self._batch_max:
                try:
                    async with asyncio.timeout(delay):
                        await self._full.wait()
                except TimeoutError:
                    pass
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - a full disk must not kill the loop; readings stay queued
                # A full disk can last hours: the first failure is logged at once, then a line a minute.
                held = self._log_throttle("commit_failed")
                if held is None:
                    self._failures_unlogged += 1
                else:
                    self._failures_unlogged = 0
                    log.error("cannot commit %d readings to the twin, retrying every %g s: %s%s",
                              self.waiting(), self.retry_s, exc, held_note(held))
                if self.live_out is not None and self.outage_failures >= UNWRITABLE_AFTER:
                    try:
                        await self._go_live()
                    except Exception:  # noqa: BLE001 - live telemetry is a courtesy: it must not stop the commits
                        log.exception("cannot send the waiting readings' telemetry live; they wait for their commit")
                await asyncio.sleep(self.retry_s)

    def waiting_seen_live(self) -> int:
        """Of the waiting readings, those whose telemetry went out live (as of the last commit try)."""
        return len(self._seen_live)

    @property
    def published_live(self) -> int:
        """Readings whose telemetry went out live (handed to the connection) since the start."""
        return self.live_out.live_published if self.live_out is not None else 0

    def _make_batch(self) -> _Batch:
        """The next batch of pending readings, through the hooks and the message factory."""
        pending = self._pending
        if len(pending) <= self._batch_max:
            batch = list(pending)
            pending.clear()
        else:
            batch = [pending.popleft() for _ in range(self._batch_max)]
        extras = self._extras(batch) if self.pre_commit else []
        if self.on_demand:  # the hooks have seen them: forgotten (a retry does not run the hooks again)
            for reading in batch:
                self.on_demand.pop(id(reading), None)
        messages = self._messages(batch) if self.message_factory else []
        if self.after_messages:
            extras += self._extras(batch, self.after_messages)
        return _Batch(batch, messages, extras)

    def _messages(self, batch: list[Reading]) -> list[OutMessage]:
        """The batch's messages; none when making them fails (a bug): the readings are committed
        without them rather than lost with the exception (they were taken from the pending queue)."""
        assert self.message_factory is not None
        try:
            return list(self.message_factory(batch))
        except Exception:  # noqa: BLE001 - a bug in the telemetry must not lose the readings or stop the loop
            held = self._log_throttle("messages_failed")
            if held is not None:
                log.exception("making the messages of %d readings failed: the readings are committed without"
                              " them%s", len(batch), held_note(held))
            return []

    async def _go_live(self) -> None:
        """The twin is unwritable: hand the telemetry of every waiting reading whose telemetry has not
        gone out yet to the publisher, to go out now. Pending readings are made into batches first
        (hooks and messages, as their commit would), kept in order behind the failed one."""
        live_out = self.live_out
        assert live_out is not None
        async with self._lock:
            if self._live or not live_out.live_ready():
                return  # handed already since the last try; or no connection: they wait for their commit
            while self._pending:
                made = self._make_batch()
                self._retry.append(made)
                self._retry_readings += len(made.readings)
            live = [LiveMessage(m) for m in islice(
                (m for waiting in self._retry for m in waiting.messages if goes_live(m)), LIVE_MAX)]
            if live:
                self._live, self._live_from = live, 0
                live_out.offer_live(live)

    def _take_back_live(self) -> None:
        """Before a commit try: live messages handed to the connection are done, their readings'
        telemetry leaves their batches (the readings are committed to history, their telemetry not
        queued again); the others are cancelled: their telemetry commits with their readings and
        goes out through the outbox (or they are made live again if the commit fails)."""
        live, self._live = self._live, []
        start, self._live_from = self._live_from, 0
        sent: set[int] = set()
        for entry in live[start:]:
            if entry.handed:
                sent.add(id(entry.message))
                self._seen_live.add(id(entry.message.reading))
            else:
                entry.cancelled = True
        if sent:
            for waiting in self._retry:
                waiting.messages = [m for m in waiting.messages if id(m) not in sent]

    def _writable_again(self, batch: int) -> None:
        """A commit succeeded after failed ones: say so, once per outage."""
        assert self._failing_since is not None
        waited = batch + self.waiting()  # this batch and those behind it (committed next)
        dropped = self.dropped + self.dropped_live
        log.warning("twin writable again after %.0f s, %d readings waited%s%s%s",
                    time.monotonic() - self._failing_since, waited,
                    f"; {self.published_live} went out live since start" if self.published_live else "",
                    f" ({dropped} dropped since start, twin.waiting_max_readings"
                    f"{f', {self.dropped_live} of them after going out live' if self.dropped_live else ''})"
                    if dropped else "",
                    f" ({self._failures_unlogged} more failed commits not logged)" if self._failures_unlogged else "")
        self._failing_since = None
        self._failures_unlogged = 0
        self._log_throttle.reset("commit_failed")  # the next outage's first failure is logged at once
        self.outage_failures = 0
        self.outage_since_ms = None
        self.last_error = None
        self.writable_since_ms = time.time_ns() // 1_000_000
        if self.on_health is not None:
            self.on_health()
        for listener in self.on_writable_again:
            listener()

    def waiting(self) -> int:
        """Readings taken and not committed yet (pending, or in a batch whose commit failed), and
        not dropped for the bound; the batch being committed is not among them."""
        return len(self._pending) + self._retry_readings

    async def flush(self) -> None:
        """Commit everything pending now."""
        async with self._lock:
            await self._flush()

    def _extras(self, batch: list[Reading], hooks: list[PreCommit] | None = None) -> list[Extra]:
        extras = []
        for hook in self.pre_commit if hooks is None else hooks:
            try:
                extra = hook(batch)
            except Exception:  # noqa: BLE001 - a failing hook must not keep readings from the twin
                log.exception("pre-commit hook %r failed; the readings are committed without it", hook)
                continue
            if extra is not None:
                extras.append(extra)
        return extras

    @staticmethod
    def _commit(store: TwinStore, batch: list[Reading], messages: list[OutMessage], sent: list[int],
                extras: list[Extra], apart: bool, dropped: tuple[int, int] = (0, 0)) -> tuple[list[OutboxRow], list[Any]]:
        """One transaction for the batch and its extras; or (`apart`) the batch alone, then each
        extra in a transaction of its own, a failure being its result. `dropped` readings (for the
        bound on waiting ones: unseen, and whose telemetry had gone out live) are counted in the
        batch's transaction."""
        unseen, seen = dropped
        if not extras:
            return store.record(batch, messages, sent, dropped=unseen, dropped_live=seen), []
        if not apart:
            with store.transaction():
                rows = store.record(batch, messages, sent, dropped=unseen, dropped_live=seen)
                return rows, [extra.work(store) for extra in extras]
        rows = store.record(batch, messages, sent, dropped=unseen, dropped_live=seen)
        results: list[Any] = []
        for extra in extras:
            try:
                with store.transaction():
                    results.append(extra.work(store))
            except Exception as exc:  # noqa: BLE001 - handed to the extra's failed()
                results.append(_Failed(exc))
        return rows, results

    async def _flush(self) -> None:
        while self._retry or self._pending:
            if self._live:  # (only after the twin was unwritable)
                self._take_back_live()
            if self._retry:
                # The same batch, messages and extras: hooks and the message factory (which
                # remembers what it made due) see each reading once.
                waiting = self._retry.popleft()
                self._retry_readings -= len(waiting.readings)
                batch, messages, extras, failures = waiting.readings, waiting.messages, waiting.extras, waiting.failures
            else:
                made = self._make_batch()
                batch, messages, extras, failures = made.readings, made.messages, made.extras, 0
            apart = failures >= EXTRA_TRIES
            if not self._pending:
                self._has_data.clear()
                self._full.clear()
            sent = self.take_acks() if self.take_acks else []
            dropped = (self._dropped_unsaved, self._dropped_live_unsaved)  # counted in the twin with this commit
            commit = self._worker.submit(
                lambda store, batch=batch, messages=messages, extras=extras, apart=apart, sent=sent, dropped=dropped:
                self._commit(store, batch, messages, sent, extras, apart, dropped))
            # A cancel (a device stopped while it waited for its read-back to commit): acted on once
            # the commit's outcome is known, else a batch that did commit would be committed twice.
            cancelled = await outcome(commit)
            try:
                rows, results = commit.result()
            except BaseException as exc:
                if isinstance(exc, Exception):
                    self.commit_failures += 1
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                        self.outage_since_ms = time.time_ns() // 1_000_000
                    self.outage_failures += 1
                    self.last_error = exc
                # Not committed: first again, in order.
                self._retry.appendleft(_Batch(batch, messages, extras, failures + 1))
                self._retry_readings += len(batch)
                self._has_data.set()
                if self._max_waiting is not None and self.waiting() > self._max_waiting:
                    self._shed()  # what came meanwhile, with this batch back, may be over the bound
                if isinstance(exc, Exception) and self.on_health is not None:
                    self.on_health()
                if sent and self.return_acks:
                    self.return_acks(sent)
                if cancelled is not None:
                    raise cancelled from None
                raise
            self._dropped_unsaved -= dropped[0]
            self._dropped_live_unsaved -= dropped[1]
            if self._seen_live:
                self._seen_live.difference_update(id(r) for r in batch)
            if self._failing_since is not None:
                self._writable_again(len(batch))
            self.committed += len(batch)
            self._last_batch = len(batch)
            if self.on_commit:
                self.on_commit(batch)
            if rows and self.on_outbox:
                self.on_outbox(rows)
            for extra, result in zip(extras, results, strict=True):
                try:
                    if isinstance(result, _Failed):
                        log.error("gave up %s, the work that came with %d readings, after %d failed commits: %s",
                                  getattr(extra.work, "__qualname__", extra.work), len(batch), failures, result.exc)
                        if extra.failed is not None:
                            extra.failed(result.exc)
                    else:
                        extra.done(result)
                except Exception:  # noqa: BLE001
                    log.exception("after the commit: %r failed", extra.done)
            if cancelled is not None:
                raise cancelled
        self._has_data.clear()
        self._full.clear()
