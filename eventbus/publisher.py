"""Drains the outbox to the broker: a row leaves the outbox only after the broker acknowledged it.

Fresh rows come straight from memory after their commit (no re-read); anything else (after
a restart or a reconnect, or while the broker was away) is read back from SQLite in id
order, so the backlog drains in order with its original measurement timestamps.
Acknowledgements are handed to the twin in batches (TwinStore.outbox_sent: outbox rows are
deleted, telemetry carried in history rows moves the published cursor). After a reconnect
everything not yet acknowledged is sent again: duplicates are possible (QoS 1 allows them)
and the `seq` field reveals them.

Rows may be offered out of commit order: each caller offers after its own await of the twin
thread (a reading batch's commit comes back through one more hop than a twin reply's), so a
batch can be offered after a reply committed after it. Such rows are not taken live (rows
above them may have gone out already); the backlog is read again from just before them.

Publishing does not await each message: rows are handed to the connection (`publish_nowait`)
while fewer than `max_inflight` are unacknowledged, and PUBACKs come back as message ids
(`on_ack`), so a message costs no task, event or timer of its own. Each burst ends with
`flush()`, which writes it in one go.

While the twin cannot be written, the recorder hands the telemetry of the readings waiting for
it here to go out live (`offer_live`, mapper.recorder's doc): they go after every committed row
(those are older), within the same window, and each is handed to the connection once. None is
kept for a resend: one in flight when the connection is lost (`live_unacked`: the broker may or
may not have it) is not sent again, and its reading's history row is still committed (one the broker
refuses is logged as a refused outbox row is); the ones not handed yet wait for the next connection,
after the backlog, unless the recorder cancelled them meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable

import aiomqtt
import orjson

from eventbus.bus import MqttBus
from eventbus.paho_fastpath import publish_size
from mapper.logs import Throttle, held_note
from mapper.recorder import LiveMessage
from mapper.store_worker import StoreWorker
from mapper.ticks import next_tick
from twin.store import OutboxRow, SentIds

log = logging.getLogger("mapper.publisher")


def _reason_name(code: int) -> str:
    try:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        return f"{ReasonCode(PacketTypes.PUBACK, identifier=code)} (0x{code:02x})"
    except Exception:  # noqa: BLE001 - a code paho does not know
        return f"reason code 0x{code:02x}"

LIVE_LIMIT = 20_000
PAGE = 1_000
# Bytes a PUBLISH packet has besides its payload and topic, at most: fixed header byte, remaining
# length (up to 4), topic length (2), message id (2), property length (MQTT 5: 1).
_PACKET_OVERHEAD = 10
# Connections lost in a row with the same outbox message unacknowledged, larger than any acknowledged,
# after which it is held back for a connection to see whether its size is the cause (see _note_loss).
LOSSES_OVER_LIMIT = 3
_LIVE_ID = 0  # the outbox row id of a live message in flight (outbox ids start at 1)
# A reply to an app's request ($hw/events/.../twin/get/result, membership/get/result, ...) starts
# with its event_id: eventbus.payloads builds each with orjson, event_id first. An event_id is at
# most 128 characters (payloads.EventIn), as JSON up to 6 bytes each (`\u0001`; UTF-8: up to 4).
_REPLY_TOPIC = re.compile(r"\$hw/events/.+/result")
_REPLY_EVENT_ID = re.compile(rb'\{"event_id":("(?:[^"\\]|\\.){0,768}")')
_ACL_HINT = " (if that topic is meant to be published, the broker's ACL must let the mapper's user write it)"


class OutboxPublisher:
    def __init__(self, bus: MqttBus, worker: StoreWorker, *, max_inflight: int = 100, ack_delay_s: float = 2.0,
                 ack_timeout_s: float = 30.0) -> None:
        self._bus = bus
        self._worker = worker
        self._max_inflight = max(1, max_inflight - 1)  # one left for the awaited availability messages
        self._ack_delay_s = ack_delay_s
        self._ack_timeout_s = ack_timeout_s
        self._live: deque[OutboxRow] = deque()
        self._backlog = True            # the outbox may hold rows not in `_live`
        self._last_queued = 0           # highest id handed to the broker in this connection
        self._max_committed = 0         # highest id known to be committed
        self._rewind: int | None = None  # read the backlog from after this id (rows offered out of order)
        self._acked: list[int] = []
        self._acked_refused = 0         # of `_acked`, rows dropped as undeliverable (counted in the twin with them)
        self._acked_since = 0.0         # monotonic time (the loop's clock) of the oldest ack in `_acked`
        self._wake = asyncio.Event()
        self._ack_wake = asyncio.Event()   # 500 acks waiting: delete them now
        self._ack_first = asyncio.Event()  # some acks waiting: delete them after ack_delay_s
        self._inflight: dict[int, OutboxRow] = {}  # message id -> outbox row, this connection only
        self._early: set[int] = set()   # acks that arrived before publish_nowait returned (QoS 0)
        self._largest_acked = 0         # payload bytes of the largest row the broker acknowledged
        self._suspect: tuple[int, int] | None = None  # (row id, losses in a row it was unacknowledged at)
        self._held_back: tuple[int, int] | None = None  # (row id, packet bytes) not sent this connection (_note_loss)
        self._learned_limit: int | None = None  # a packet limit the broker did not announce, learned (_note_loss)
        self._replaced: set[int] = set()  # rows sent as an error reply in their place (_too_large), this connection
        self._sending = False
        self._room = asyncio.Event()    # set by acks and by a lost connection
        self._failed = asyncio.Event()
        self.published = 0
        self.undeliverable = 0          # rows paho or the broker refused outright (dropped from the outbox, logged)
        self.on_undeliverable: Callable[[], None] | None = None  # told after each (on the event loop): the health
        self.twin_errors = 0            # twin calls that failed (a lock held too long, a full disk): retried
        self._log_throttle = Throttle()
        # Live messages (see the module's doc), in order; handed to the connection, acknowledged,
        # in flight when the connection was lost, refused (by paho or the broker).
        self._live_out: deque[LiveMessage] = deque()
        self.live_published = 0
        self.live_acked = 0
        self.live_unacked = 0
        self.live_refused = 0
        self.idle = asyncio.Event()     # set while nothing is queued or in flight
        bus.on_ack = self._on_ack
        bus.on_lost = self._on_lost

    def offer(self, rows: list[OutboxRow]) -> None:
        """Rows just committed (called on the event loop after the commit; rows of a later commit
        may have been offered first)."""
        first = rows[0].id
        if first <= self._max_committed:
            # Out of commit order: rows above these may be on their way already, and live rows
            # and backlog reads alike skip ids up to the highest one handed to the broker.
            self._rewind = first - 1 if self._rewind is None else min(self._rewind, first - 1)
            self._backlog = True
        self._max_committed = max(self._max_committed, rows[-1].id)
        self.idle.clear()
        if self._backlog or not self._bus.connected.is_set() or len(self._live) >= LIVE_LIMIT:
            self._backlog = True
        else:
            self._live.extend(rows)
        self._wake.set()

    def live_ready(self) -> bool:
        """Whether live messages would go out now: connected, and no committed row waits to be sent
        (a backlog the twin cannot be read for would hold them back until the next commit try, to
        be made again then). Else the recorder does not make them."""
        return self._bus.connected.is_set() and not self._backlog and not self._live

    def offer_live(self, entries: list[LiveMessage]) -> None:
        """Telemetry of readings not committed yet, to go out after every committed row."""
        self._live_out.extend(entries)
        self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._ack_loop(), name="outbox-acks")
            while True:
                await self._bus.connected.wait()
                # Failed connection attempts while we waited also report a loss: this one is fresh.
                self._failed.clear()
                try:
                    await self._drain()
                except aiomqtt.MqttError as exc:
                    log.debug("publishing stopped: %s", exc)
                await self._reset()

    def _on_ack(self, mid: int, reason: int = 0) -> bool:
        row = self._inflight.pop(mid, None)
        if (self._held_back is not None and reason < 0x80 and row is not None and row.qos
                and (row.id == _LIVE_ID or row.id > self._held_back[0])):
            # The broker took a message sent in the held-back row's place: a row behind it, or live
            # telemetry (after every committed row). Not the node's `online` (no row here), which
            # starts every connection; not a QoS 0 message, which paho reports once written.
            self._over_learned_limit()
        if row is None:
            if self._sending:
                self._early.add(mid)
                return True
            return False  # a publish of someone else (availability, twin replies)
        if row.id == _LIVE_ID:  # nothing to delete: it was never in the outbox
            if reason >= 0x80:
                # Said as an outbox row's refusal is: its reading is committed without it, so the
                # outbox never sees it, and this is the only trace of telemetry nobody received.
                self.live_refused += 1
                held = self._log_throttle("undeliverable")
                if held is not None:
                    log.error("dropped live telemetry on %r: the broker refused it: %s%s%s", row.topic[:200],
                              _reason_name(reason), _ACL_HINT, held_note(held))
            else:
                self.live_acked += 1
            self._room.set()
            if not self._inflight and not self._live and not self._backlog:
                self.idle.set()
            return True
        if reason >= 0x80:
            self._replaced.discard(row.id)
            self._undeliverable(row, f"the broker refused it: {_reason_name(reason)}")
        else:
            if row.qos and len(row.payload) > self._largest_acked:  # (QoS 0: written, not acknowledged)
                self._largest_acked = len(row.payload)
            self._acked_done(row.id)
        return True

    def _acked_done(self, row_id: int) -> None:
        """A row the broker acknowledged: delivered, or an error reply went in its place."""
        if row_id in self._replaced:
            self._replaced.discard(row_id)
            self._count_undeliverable()
            self._acked_row(row_id, delivered=False)
        else:
            self._acked_row(row_id)

    def _undeliverable(self, row: OutboxRow, why: object, hint: str = _ACL_HINT) -> None:
        """A row that can never go (paho refuses its topic; the broker refused it: its ACL denies
        the mapper's user that topic; or it is larger than the broker takes): it leaves the outbox,
        counted, and must not hold up the rows behind it. Sending it again would only be refused
        again (or, too large, get the mapper disconnected at every resend)."""
        self._count_undeliverable()
        held = self._log_throttle("undeliverable")
        if held is not None:
            log.error("dropped outbox message %d on %r: %s%s%s", row.id, row.topic[:200], why, hint, held_note(held))
        self._acked_row(row.id, delivered=False)

    def _count_undeliverable(self) -> None:
        self.undeliverable += 1
        if self.on_undeliverable is not None:
            self.on_undeliverable()

    def _too_large(self, row: OutboxRow, v5: bool) -> bytes | None:
        """The payload to send for a row near the broker's limit (bus.packet_limit): its own if it
        fits. A larger one must not go: the broker would close the connection on receiving it (MQTT 5
        forbids sending it, 3.1.2.11.4), and it would be sent again first at every reconnect. A reply
        to an app's request goes as an error reply instead (same topic, its event_id, code 500 with
        the sizes: the app waits for it); anything else is dropped like a refused row (None)."""
        size = publish_size(len(row.topic.encode()), len(row.payload), row.qos, v5)
        limit, source = self.packet_limit()
        if size <= limit:
            return row.payload
        why = f"its packet would be {size} bytes, over the broker's limit of {limit} bytes ({source})"
        error = self._error_reply(row, size, limit)
        if error is not None and publish_size(len(row.topic.encode()), len(error), row.qos, v5) <= limit:
            held = self._log_throttle("undeliverable")
            if held is not None:
                log.error("dropped outbox message %d on %r: %s; answered with an error instead%s", row.id,
                          row.topic[:200], why, held_note(held))
            self._replaced.add(row.id)
            return error
        self._undeliverable(row, why, hint="")
        return None

    def packet_limit(self) -> tuple[int, str]:
        """The largest packet the broker takes on this connection, and what says so."""
        bus = self._bus
        if bus.packet_limit_announced:
            return bus.packet_limit, "its Maximum Packet Size"
        if self._learned_limit is not None and self._learned_limit < bus.packet_limit:
            return self._learned_limit, "learned: it closed the connection on a larger one, set mqtt.max_packet_bytes"
        return bus.packet_limit, "mqtt.max_packet_bytes: the broker announced no limit"

    def _note_loss(self) -> None:
        """A connection was lost with outbox rows unacknowledged. A broker closes the connection on a
        packet over its limit (Mosquitto: "disconnected due to oversize packet"), and under MQTT 3.1.1
        it cannot say what its limit is: with mqtt.max_packet_bytes above it, that row, first in the
        outbox, was sent again at every reconnect, for ever, and nothing behind it went out. The
        largest row in flight, unacknowledged at LOSSES_OVER_LIMIT losses in a row and larger than
        any the broker acknowledged, is held back on the next connection: a PUBACK there for a
        message sent in its place (a row behind it, live telemetry; see _on_ack) shows the broker
        takes the rest, and packets as large as it are taken as over the broker's limit
        (_over_learned_limit). That connection lost before, it was not the row's size (a broker out
        of memory also closes connections): it goes again."""
        held, self._held_back = self._held_back, None
        if held is not None:
            log.info("the connection was lost again with outbox message %d (%d bytes) held back: not its size; "
                     "sending it again", *held)
            self._suspect = None
            return
        rows = [row for row in self._inflight.values() if row.id != _LIVE_ID]
        if self._bus.packet_limit_announced or not rows or not self._bus.closed_by_broker:
            # Only a connection the broker closed can have been closed on a packet. A broker gone
            # silent until the keepalive ran out (frozen, a stalled disk), or an acknowledgement the
            # mapper stopped waiting for, three times in a row, convicted the largest message in
            # flight, and packets as large were dropped until a restart.
            self._suspect = None
            return
        largest = max(rows, key=lambda row: len(row.payload))
        if len(largest.payload) <= self._largest_acked:
            self._suspect = None
            return
        losses = self._suspect[1] + 1 if self._suspect is not None and self._suspect[0] == largest.id else 1
        self._suspect = (largest.id, losses)
        if losses < LOSSES_OVER_LIMIT:
            return
        self._suspect = None
        size = publish_size(len(largest.topic.encode()), len(largest.payload), largest.qos,
                            self._bus.protocol == aiomqtt.ProtocolVersion.V5)
        self._held_back = (largest.id, size)
        log.warning("the connection was lost %d times in a row with outbox message %d on %r (%d bytes, larger than any "
                    "the broker acknowledged) unacknowledged: holding it back on the next connection, in case it is "
                    "over a packet limit the broker did not announce", losses, largest.id, largest.topic[:200], size)

    def _over_learned_limit(self) -> None:
        """The broker acknowledged a message with the held-back row kept from it: the row's size was
        the cause. Packets as large are not sent again until a restart, and the row is read again,
        to be dropped (or answered with an error) as one over an announced limit is."""
        (row_id, size), self._held_back = self._held_back, None
        self._learned_limit = size - 1
        log.error("outbox message %d (%d bytes) is taken as over the broker's packet limit, which it did not announce "
                  "(MQTT 3.1.1 cannot): the connection was lost at every try while it was sent, and kept without it. "
                  "Packets of %d bytes or more are not sent until a restart; set mqtt.max_packet_bytes to the broker's "
                  "limit (Mosquitto: max_packet_size)", row_id, size, size)
        self._rewind = row_id - 1 if self._rewind is None else min(self._rewind, row_id - 1)
        self._backlog = True
        self.idle.clear()
        self._wake.set()

    @staticmethod
    def _error_reply(row: OutboxRow, size: int, limit: int) -> bytes | None:
        """The error reply that stands in for a reply too large to send (None: the row is no reply).
        Its event_id is read from the payload's start, not by parsing megabytes of JSON."""
        if not _REPLY_TOPIC.fullmatch(row.topic):
            return None
        found = _REPLY_EVENT_ID.match(row.payload)
        if found is None:
            return None
        try:
            event_id = json.loads(found.group(1))
        except ValueError:
            return None
        reason = f"the reply of {size} bytes is over the broker's packet limit of {limit} bytes"
        return orjson.dumps({"event_id": event_id, "timestamp": int(time.time() * 1000), "code": 500, "reason": reason})

    def _acked_row(self, row_id: int, *, delivered: bool = True) -> None:
        if delivered:
            self.published += 1
        else:
            self._acked_refused += 1
        if not self._acked:
            self._acked_since = time.monotonic()  # = loop.time()
        self._acked.append(row_id)
        self._ack_first.set()
        if len(self._acked) >= 500:
            self._ack_wake.set()
        self._room.set()
        if not self._inflight and not self._live and not self._backlog:
            self.idle.set()

    def take_acked(self) -> SentIds:
        """Hand over the acknowledged row ids, for the recorder to delete in its next transaction
        (with the count of undeliverable ones among them, for the twin's counters)."""
        ids = SentIds(self._acked, self._acked_refused)
        self._acked, self._acked_refused = [], 0
        return ids

    def return_acked(self, ids: list[int]) -> None:
        """The transaction that took them failed: they are deleted later, here or by the next one."""
        if not self._acked:
            self._acked_since = time.monotonic()  # = loop.time()
        self._acked[:0] = ids
        self._acked_refused += getattr(ids, "refused", 0)
        self._ack_first.set()

    def _on_lost(self) -> None:
        self._failed.set()
        self._room.set()
        self._wake.set()

    async def _reset(self) -> None:
        """After a disconnect: forget what is in flight (it stays in the outbox; live messages are
        lost), delete what was acked, resend the rest."""
        self.live_unacked += sum(1 for row in self._inflight.values() if row.id == _LIVE_ID)
        self._note_loss()
        self._inflight.clear()
        self._early.clear()
        self._replaced.clear()  # (still in the outbox: read back, and replaced again)
        await self._flush_acks()
        self._live.clear()
        self._backlog = True
        self._last_queued = 0
        self._rewind = None  # a new connection reads everything not acknowledged anyway
        self._failed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._bus.disconnected.wait()

    async def _next_rows(self) -> tuple[list[OutboxRow], bool]:
        """The next rows to send, and whether they were read again from below the highest id
        already handed to the broker (rows offered out of order: see `_drain`)."""
        while True:
            if self._failed.is_set() or not self._bus.connected.is_set():
                raise aiomqtt.MqttError("disconnected")
            if self._backlog:
                await self._flush_acks()
                after = self._last_queued
                rewind, self._rewind = self._rewind, None
                again = rewind is not None and rewind < after
                if again:
                    after = rewind
                committed_before = self._max_committed
                try:
                    rows = await self._worker.call(lambda s: s.outbox_pending(after_id=after, limit=PAGE))
                except Exception as exc:  # noqa: BLE001 - a locked twin: read the backlog again in a second
                    self._twin_trouble("cannot read the backlog", exc)
                    if again:
                        self._rewind = after if self._rewind is None else min(self._rewind, after)
                    await asyncio.sleep(1.0)
                    continue
                if rows:
                    if again and len(rows) == PAGE and rows[-1].id < self._last_queued:
                        # A full page below the rows already sent: the next page goes on from here.
                        self._rewind = rows[-1].id if self._rewind is None else min(self._rewind, rows[-1].id)
                    return rows, again
                # Nothing left in the table. Rows offered while we read are in the table
                # but not in memory: read again. Otherwise new rows will come live.
                self._backlog = self._max_committed != committed_before
                if self._backlog:
                    continue
            if self._live:
                rows = list(self._live)
                self._live.clear()
                return rows, False
            if self._live_out:
                return [], False  # nothing committed waits: the live messages may go
            if not self._inflight:
                self.idle.set()
            self._wake.clear()
            await self._wake.wait()  # offer() and a lost connection set it

    async def _wait_room(self) -> None:
        """Wait until fewer than `max_inflight` are unacknowledged (or the connection is gone)."""
        while len(self._inflight) >= self._max_inflight:
            if self._failed.is_set():
                raise aiomqtt.MqttError("disconnected")
            self._room.clear()
            try:
                async with asyncio.timeout(self._ack_timeout_s):
                    await self._room.wait()
            except TimeoutError:
                raise aiomqtt.MqttError(f"no acknowledgement within {self._ack_timeout_s:g} s") from None

    async def _drain(self) -> None:
        bus = self._bus
        inflight = self._inflight
        window = self._max_inflight
        while True:
            rows, again = await self._next_rows()
            if not rows:
                await self._send_live()
                continue
            # The broker's limit, less what a packet adds to its payload and topic (a topic's UTF-8 is
            # at most 4 bytes a character): the exact size is computed only for rows near the limit.
            room = self.packet_limit()[0] - _PACKET_OVERHEAD
            v5 = bus.protocol == aiomqtt.ProtocolVersion.V5
            # Rows acknowledged whose delete has not committed yet (the twin refused it) are still in
            # the outbox: read back after a reconnect, they must not go out a second time.
            held = set(self._acked) if self._acked else ()
            # Read again from below the rows already sent (some were offered out of order): of the
            # rows up to `_last_queued`, those in flight or acknowledged went out in this connection
            # (acknowledged ones whose delete committed are not read back); the others did not.
            sending = {r.id for r in inflight.values()} if again else ()
            for row in rows:
                if row.id <= self._last_queued and (not again or row.id in sending):
                    continue
                if row.id in held or (self._held_back is not None and row.id == self._held_back[0]):
                    self._last_queued = max(self._last_queued, row.id)
                    continue
                payload = row.payload
                if len(payload) + 4 * len(row.topic) > room and (payload := self._too_large(row, v5)) is None:
                    self._last_queued = max(self._last_queued, row.id)
                    continue
                if len(inflight) >= window:
                    bus.flush()
                    await self._wait_room()
                if self._failed.is_set():
                    raise aiomqtt.MqttError("disconnected")
                self._last_queued = max(self._last_queued, row.id)
                self._sending = True
                try:
                    mid = bus.publish_nowait(row.topic, payload, qos=row.qos, retain=row.retain)
                except (ValueError, TypeError) as exc:
                    # paho refuses it (a wildcard topic queued before topics were validated).
                    self._replaced.discard(row.id)
                    self._undeliverable(row, f"paho cannot publish it: {exc}")
                    continue
                finally:
                    self._sending = False
                if mid in self._early:
                    self._early.discard(mid)
                    self._acked_done(row.id)
                else:
                    inflight[mid] = row
            bus.flush()  # the fast path queues without writing: one write for the burst

    async def _send_live(self) -> None:
        """Hand the live messages to the connection, oldest first, while no committed row waits
        (committed rows are older: they go first) and within the window."""
        bus, queue, inflight = self._bus, self._live_out, self._inflight
        window = self._max_inflight
        while queue:
            entry = queue[0]
            if entry.cancelled:
                queue.popleft()
                continue
            if len(inflight) >= window:
                bus.flush()
                await self._wait_room()
                continue  # (awaited: look again, the recorder may have cancelled it meanwhile)
            if self._failed.is_set():
                raise aiomqtt.MqttError("disconnected")
            if self._live or self._backlog:
                break  # committed rows came meanwhile
            m = entry.message
            payload = entry.payload()
            limit = self.packet_limit()[0]
            if (len(payload) + 4 * len(m.topic) > limit - _PACKET_OVERHEAD
                    and publish_size(len(m.topic.encode()), len(payload), m.qos,
                                     bus.protocol == aiomqtt.ProtocolVersion.V5) > limit):
                # The broker would close the connection on it: it stays with its reading, and its
                # committed row is dropped as undeliverable (and said so) by the outbox.
                queue.popleft()
                self.live_refused += 1
                continue
            self._sending = True
            try:
                mid = bus.publish_nowait(m.topic, payload, qos=m.qos, retain=m.retain)
            except (ValueError, TypeError) as exc:
                # paho refuses it: it stays with its reading, its committed row is dropped (and said so) by the outbox.
                queue.popleft()
                self.live_refused += 1
                log.debug("paho cannot publish a live message on %r: %s", m.topic[:200], exc)
                continue
            finally:
                self._sending = False
            queue.popleft()
            entry.handed = True
            self.live_published += 1
            if mid in self._early:
                self._early.discard(mid)
                self.live_acked += 1
            else:
                inflight[mid] = OutboxRow(_LIVE_ID, m.topic, b"", m.qos, m.retain, "telemetry")
        bus.flush()

    async def _ack_loop(self) -> None:
        """Delete acknowledged rows once they have waited `ack_delay_s`, or at once at 500 acks.

        While readings flow, the recorder takes the acknowledged ids into its own transaction
        first (take_acked), so this loop mostly finds nothing to do: it is the fallback for a
        mapper that stopped recording. Sleeps while nothing was acknowledged. Its deadlines are
        on the clock grid (mapper.ticks), so it shares a wake-up with the reads; and it leaves
        acks younger than `ack_delay_s` to the recorder: woken on the tick where the recorder is
        about to take them, it would otherwise commit them itself, a transaction more (a tick
        every 2 s on a Pi doing one reading batch a second).
        """
        loop = asyncio.get_running_loop()
        while True:
            await self._ack_first.wait()
            deadline = next_tick(self._acked_since + self._ack_delay_s, min(1.0, self._ack_delay_s))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(max(deadline, loop.time())):
                    await self._ack_wake.wait()
            if self._ack_wake.is_set() or not self._acked or loop.time() - self._acked_since >= self._ack_delay_s:
                self._ack_wake.clear()
                self._ack_first.clear()
                await self._flush_acks()
            # else: the recorder took those meanwhile; these are newer, wait for them in turn

    async def _flush_acks(self) -> bool:
        """Delete the acknowledged rows now. If the twin refuses (locked by another process past
        its busy timeout, a full disk), the acks are kept for a later try: the rows are sent, only
        not yet marked so, and at worst a restart sends them again (QoS 1 allows it; `seq` shows it).
        False when the twin refused."""
        if not self._acked:
            return True
        ids = self.take_acked()
        try:
            await self._worker.call(lambda s: s.outbox_sent(ids))
        except Exception as exc:  # noqa: BLE001 - a twin error must not stop publishing
            self.return_acked(ids)
            self._twin_trouble("cannot mark acknowledged messages as sent", exc)
            return False
        return True

    def _twin_trouble(self, what: str, exc: Exception) -> None:
        self.twin_errors += 1
        held = self._log_throttle("twin")
        if held is not None:
            log.error("outbox: %s, trying again shortly: %s%s", what, exc, held_note(held))

    async def drain(self) -> None:
        """Wait until everything committed so far was acknowledged and deleted from the outbox.

        The twin has the last word: rows it still holds once the publisher is idle (committed with
        the publisher never told, as a device state was whose write outlived its device's stop,
        before the service shielded it) are read again from the lowest, so that a clean stop
        leaves none behind.
        """
        while True:
            await self.idle.wait()
            marked = await self._flush_acks()
            # Deletes refused (a full disk, a lock): the acknowledged rows are still in the outbox,
            # and reading it again would find them (skipped, as sent), idle again, refused again:
            # a busy loop until drain_on_stop_s is up. Only rows not acknowledged are sent; of the
            # first len(acked) + 1 rows at least one is such a row, if there is any.
            acked = set() if marked else set(self._acked)
            try:
                left = await self._worker.call(lambda s: s.outbox_pending(after_id=0, limit=len(acked) + 1))
            except Exception as exc:  # noqa: BLE001 - what is left is sent at the next start; the stop goes on
                self._twin_trouble("cannot check the outbox is empty", exc)
                return
            left = [row for row in left if row.id not in acked]
            if not left:
                if acked:
                    log.warning("outbox: %d acknowledged message(s) stay queued, the twin refused to mark them sent;"
                                " they are sent again at the next start", len(acked))
                return
            log.debug("outbox: %d still queued once idle (id %d): reading it again", len(left), left[0].id)
            first = left[0].id - 1
            self._rewind = first if self._rewind is None else min(self._rewind, first)
            self._backlog = True
            self.idle.clear()
            self._wake.set()
