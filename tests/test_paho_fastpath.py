"""The leaner paho receive path (eventbus/paho_fastpath.py), against a real Mosquitto.

It must be active with the paho we pin (or the figures in docs/benchmarks.md no longer
hold), deliver every outbox message exactly as paho's own path does, and leave publishes
that aiomqtt awaits to paho.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors

import orjson
import pytest

from eventbus.bus import MqttBus
from eventbus.publisher import OutboxPublisher
from eventbus.settings import MqttSettings
from mapper.store_worker import StoreWorker
from twin.store import OutMessage, TwinStore

COUNT = 3_000


def _outbox_rows(path) -> int:  # noqa: ANN001
    """Rows in the twin file's outbox table, read by a connection of the test's own."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]


async def _connected_bus(broker, tmp_path, protocol: str) -> tuple[MqttBus, asyncio.Task]:
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                            protocol=protocol, reconnect_min_s=0.2, reconnect_max_s=0.5)

    async def nothing(*_args: object) -> None:
        return None

    bus = MqttBus(settings, client_id=f"fastpath-{protocol}", will_topic="mapper/fastpath/availability",
                  subscriptions=[], on_message=nothing, on_connect=nothing)
    task = asyncio.create_task(bus.run())
    async with asyncio.timeout(10):
        await bus.connected.wait()
    return bus, task


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_outbox_acks_take_the_fast_path_and_nothing_is_lost(broker, tmp_path, protocol):
    """3,000 outbox messages: all are published and acknowledged by the fast path, all arrive in order, the
    outbox ends empty, the acks were read with far fewer recv() calls than messages, and
    publishes were joined into fewer sends."""
    with broker.client("app") as app:
        app.subscribe("mapper/fastpath/default/+/+")
        bus, bus_task = await _connected_bus(broker, tmp_path, protocol)
        try:
            fast = bus.fastpath
            assert fast is not None, "the fast path did not install with this paho-mqtt"
            async with StoreWorker(lambda: TwinStore.open(tmp_path / "twin.db", check_same_thread=False)) as worker:
                publisher = OutboxPublisher(bus, worker, max_inflight=100)
                pub_task = asyncio.create_task(publisher.run())
                messages = [OutMessage(f"mapper/fastpath/default/dev/m{i % 7}", {"i": i}) for i in range(COUNT)]
                # QoS 0 rows are not the fast path's: paho publishes them, and they leave the outbox too.
                messages += [OutMessage("mapper/fastpath/default/dev/q0", {"i": i}, qos=0) for i in range(COUNT, COUNT + 5)]
                # QoS 2 needs paho's record of the message for PUBREC/PUBREL: paho's path too.
                messages += [OutMessage("mapper/fastpath/default/dev/q2", {"i": i}, qos=2) for i in range(3)]
                rows = await worker.call(lambda s: s.record([], messages))
                # paho's own publishes (here one aiomqtt awaits) interleave with the outbox's bursts.
                awaited = [asyncio.create_task(bus.publish("mapper/fastpath/default/dev/awaited", b"x"))]
                publisher.offer(rows)
                awaited.append(asyncio.create_task(bus.publish("mapper/fastpath/default/dev/awaited", b"y")))
                async with asyncio.timeout(30):
                    await publisher.drain()
                    await asyncio.gather(*awaited)
                for _ in range(3):
                    await asyncio.sleep(0)
                # Nothing left to write, so the event loop must not still be watching for "writable":
                # a stale writer would wake the mapper in a busy loop.
                sock = bus.client._client.socket()  # noqa: SLF001
                key = asyncio.get_running_loop()._selector.get_map().get(sock.fileno())  # noqa: SLF001
                assert key is None or not key.events & selectors.EVENT_WRITE
                pub_task.cancel()
                await asyncio.gather(pub_task, return_exceptions=True)
                left = await worker.call(lambda s: s.outbox_pending(limit=10))
            assert left == []
            assert fast.fast_publishes == COUNT and fast.fast_acks == COUNT
            assert publisher.published == COUNT + 5 + 3
            # paho alone reads 3-4 times per PUBACK; buffered, a read carries several.
            assert fast.reads < COUNT / 2, f"{fast.reads} recv() calls for {COUNT} acknowledgements"
            assert fast.joined_writes > 0  # bursts of publishes went out as one send
            assert fast.flushes > 0        # written by the publisher's flush, not a later "writable" wake-up

            # A publish that aiomqtt awaits is not the outbox's: paho's own path completes it.
            slow_before = fast.slow_acks
            async with asyncio.timeout(10):
                await bus.publish("mapper/fastpath/default/dev/awaited", b"x")
            assert fast.slow_acks == slow_before + 1
        finally:
            bus_task.cancel()
            await asyncio.gather(bus_task, return_exceptions=True)

        received = [app.next_message(timeout=10) for _ in range(COUNT + 11)]

    numbers = [orjson.loads(m.payload)["i"] for m in received if m.topic.split("/")[-1][0] == "m"]
    assert numbers == list(range(COUNT))
    # The broker may let QoS 0 overtake QoS 1 messages queued for the subscriber: no order across them.
    assert sorted(orjson.loads(m.payload)["i"] for m in received if m.topic.endswith("/q0")) == list(
        range(COUNT, COUNT + 5))
    assert sorted(orjson.loads(m.payload)["i"] for m in received if m.topic.endswith("/q2")) == [0, 1, 2]
    assert [m.topic for m in received if m.topic.endswith("/awaited")] == ["mapper/fastpath/default/dev/awaited"] * 3


async def _published_while_locked(worker, publisher, lock, path, name: str, *, errors: int):  # noqa: ANN001, ANN202
    """Commit 10 messages (topics `<name>0`..`<name>9`), lock the twin, offer them: all 10 are
    published and acknowledged while their rows stay, as the deletes fail (`errors` of them)."""
    from helpers import async_wait_for

    rows = await worker.call(lambda s: s.record(
        [], [OutMessage(f"mapper/fastpath/default/dev/{name}{i}", {"i": i}) for i in range(10)]))
    lock.execute("BEGIN IMMEDIATE")
    publisher.offer(rows)
    await async_wait_for(lambda: publisher.twin_errors >= errors, timeout=15, what="failed ack deletes")
    assert publisher.published == 10 and _outbox_rows(path) == 10
    return rows


@contextlib.asynccontextmanager
async def _publishing(broker, tmp_path, *, ack_delay_s: float, busy_timeout_ms: int | None = None):  # noqa: ANN001, ANN202
    """A connected bus, the twin's worker on tmp_path/twin.db and an OutboxPublisher running on
    them: (bus, worker, publisher, its task), all stopped on the way out."""
    path = tmp_path / "twin.db"
    bus, bus_task = await _connected_bus(broker, tmp_path, "5")
    try:
        async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
            if busy_timeout_ms is not None:  # 30 s as shipped
                await worker.call(lambda s: s.conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}"))
            publisher = OutboxPublisher(bus, worker, max_inflight=100, ack_delay_s=ack_delay_s)
            pub_task = asyncio.create_task(publisher.run())
            try:
                yield bus, worker, publisher, pub_task
            finally:
                pub_task.cancel()
                await asyncio.gather(pub_task, return_exceptions=True)
    finally:
        bus_task.cancel()
        await asyncio.gather(bus_task, return_exceptions=True)


async def test_without_a_recorder_acknowledged_rows_leave_the_outbox_after_the_ack_delay(broker, tmp_path):
    """The publisher's own fallback for acknowledged rows (a mapper with no readings to commit):
    nobody takes the acks, so the publisher deletes the rows itself, once the acks have waited
    `ack_delay_s` (until then they are left for the next reading batch to take along)."""

    from helpers import async_wait_for

    path = tmp_path / "twin.db"
    async with _publishing(broker, tmp_path, ack_delay_s=1.0) as (_, worker, publisher, _):
        rows = await worker.call(lambda s: s.record(
            [], [OutMessage(f"mapper/fastpath/default/dev/m{i}", {"i": i}) for i in range(20)]))
        publisher.offer(rows)
        await async_wait_for(lambda: publisher.published == 20, what="20 acknowledgements")
        # Acknowledged, and still there (the delay is 1 s): left for a recorder to take along ...
        assert _outbox_rows(path) == 20
        # ... and, with none, deleted by the publisher itself.
        await async_wait_for(lambda: _outbox_rows(path) == 0, what="the acknowledged rows deleted")


async def test_a_twin_locked_past_its_timeout_delays_the_ack_deletes_but_stops_nothing(broker, tmp_path):
    """Another process holds the twin's write lock longer than the busy timeout (a backup, a CLI
    session): deleting acknowledged rows fails. The publisher keeps the acks, says so, goes on
    publishing, and deletes the rows once the lock is gone (it used to end, taking the mapper down)."""
    import sqlite3

    from helpers import async_wait_for

    path = tmp_path / "twin.db"
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        async with _publishing(broker, tmp_path, ack_delay_s=0.2, busy_timeout_ms=100) as (_, worker, publisher,
                                                                                          pub_task):
            rows = await _published_while_locked(worker, publisher, lock, path, "l", errors=2)
            assert not pub_task.done()
            more = rows[-1].id + 1
            lock.execute("ROLLBACK")
            rows = await worker.call(lambda s: s.record(
                [], [OutMessage(f"mapper/fastpath/default/dev/l{i}", {"i": i}) for i in range(10, 15)]))
            assert rows[0].id >= more
            publisher.offer(rows)
            await async_wait_for(lambda: publisher.published == 15, what="the later messages published")
            await async_wait_for(lambda: _outbox_rows(path) == 0, timeout=15, what="every acknowledged row deleted")
            assert not pub_task.done()
    finally:
        lock.close()


@pytest.mark.parametrize("never_offered", [0, 1])
async def test_a_drain_while_the_twin_refuses_the_deletes_sends_what_is_unsent_and_ends(broker, tmp_path,
                                                                                      never_offered):
    """A stop drains the outbox while the twin refuses the deletes of acknowledged rows (locked past
    its busy timeout; a full disk does the same). Those rows stay in the outbox: the drain read them
    back, skipped them as sent, was idle again, failed the deletes again and read them back again,
    a busy loop until the stop's drain_on_stop_s (5 s) was up. It ends at once now; the rows, sent
    once, are left for the next start, which skips nothing it cannot tell was delivered.
    A row committed with the publisher never told (`never_offered`) is still read back and sent
    first: the drain's last word is the twin's (a first fix ended the drain at the first refusal)."""
    import sqlite3

    path = tmp_path / "twin.db"
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        async with _publishing(broker, tmp_path, ack_delay_s=0.2, busy_timeout_ms=100) as (_, worker, publisher,
                                                                                          pub_task):
            await _published_while_locked(worker, publisher, lock, path, "d", errors=1)
            if never_offered:  # committed by the lock's holder, which locks again at once
                lock.execute("INSERT INTO outbox (id, topic, payload, qos, retain, kind, created_ts) SELECT"
                             " max(id) + 1, 'mapper/fastpath/default/dev/stray', CAST('{\"i\":99}' AS BLOB), 1, 0,"
                             " 'telemetry', 0 FROM outbox")
                lock.execute("COMMIT")
                lock.execute("BEGIN IMMEDIATE")
            async with asyncio.timeout(10):  # (it never ended while the lock stayed)
                await publisher.drain()
            expected = 10 + never_offered
            assert publisher.published == expected and _outbox_rows(path) == expected  # (deletes still refused)
            assert not pub_task.done()
    finally:
        lock.close()


async def test_rows_acknowledged_but_not_yet_deleted_are_not_sent_again_after_a_reconnect(broker, tmp_path):
    """The twin refuses the deletes of acknowledged rows (locked past its busy timeout), and then the
    connection drops. The rows read back after the reconnect include those acknowledged ones: they
    are not published a second time (they used to be, and counted twice)."""
    import sqlite3
    from collections import Counter

    from helpers import async_wait_for

    path = tmp_path / "twin.db"

    with broker.client("app") as app:
        app.subscribe("mapper/fastpath/default/dev/+")
        lock = sqlite3.connect(path, isolation_level=None)
        try:
            async with _publishing(broker, tmp_path, ack_delay_s=0.2, busy_timeout_ms=100) as (bus, worker, publisher,
                                                                                              pub_task):
                rows = await _published_while_locked(worker, publisher, lock, path, "r", errors=1)
                last = rows[-1].id
                with broker.client("mapper", client_id=bus.client_id):  # takes the client id over
                    await asyncio.wait_for(bus.disconnected.wait(), 10)
                # The publisher forgets what it queued on the lost connection, then, connected
                # again, goes through the outbox from the start: the lock stays until it did.
                await async_wait_for(lambda: publisher._last_queued == 0, what="the publisher reset")  # noqa: SLF001
                await async_wait_for(lambda: publisher._last_queued == last, what="the outbox read back")  # noqa: SLF001
                lock.execute("ROLLBACK")
                rows = await worker.call(lambda s: s.record(
                    [], [OutMessage(f"mapper/fastpath/default/dev/r{i}", {"i": i}) for i in range(10, 15)]))
                publisher.offer(rows)
                await async_wait_for(lambda: _outbox_rows(path) == 0, timeout=15, what="every row acknowledged, deleted")
                assert not pub_task.done()
        finally:
            lock.close()
        seen: Counter[str] = Counter()
        for _ in range(100):  # bounded: the broker delivers in order, r14 comes last
            topic = app.next_message().topic
            seen[topic.rsplit("/", 1)[1]] += 1
            if topic.endswith("/r14"):
                break
        assert seen == Counter(f"r{i}" for i in range(15)), seen
        assert publisher.published == 15


async def test_rows_offered_out_of_commit_order_all_go_out_on_the_same_connection(broker, tmp_path):
    """Each caller offers its committed rows after its own await of the twin thread, and a reading
    batch's commit comes back through one hop more than a twin reply's: a reply committed after a
    batch can be offered, and sent, first. The batch's telemetry must still go out on this
    connection. It was skipped (ids up to the highest one sent were taken as sent) and waited for a
    reconnect or the next start, holding the published cursor back meanwhile; a clean stop left it
    in the outbox (the stress audit's reproduction: a `mapper run` answering twin/get at 200/s)."""
    from devices.ids import DeviceId
    from twin.records import Reading

    device = DeviceId("default", "dev")
    with broker.client("app") as app:
        app.subscribe("mapper/fastpath/default/dev/+")
        async with _publishing(broker, tmp_path, ack_delay_s=0.2) as (_, worker, publisher, _):
            async with asyncio.timeout(10):
                await publisher.drain()  # the (empty) backlog is read: rows offered from now on go live
            batch = [Reading(device, "count", i, 1000 + i) for i in range(5)]
            carried = [OutMessage("mapper/fastpath/default/dev/count", {}, reading=r) for r in batch]
            readings = await worker.call(lambda s: s.record(batch, carried))
            reply = await worker.call(lambda s: s.record(
                [], [OutMessage("mapper/fastpath/default/dev/reply", b"r", kind="twin", sequenced=False)]))
            assert readings[-1].id < reply[0].id  # committed in that order
            publisher.offer(reply)  # ... offered the other way round
            async with asyncio.timeout(10):
                await publisher.drain()
            publisher.offer(readings)
            async with asyncio.timeout(10):
                await publisher.drain()
            left = await worker.call(lambda s: s.outbox_pending())
            assert left == [], f"committed, connected, and not sent: {[(r.topic, r.payload) for r in left]}"
            assert publisher.published == 6
        received = [app.next_message(timeout=10) for _ in range(6)]
    assert received[0].topic.endswith("/reply")
    assert [orjson.loads(m.payload)["value"] for m in received[1:]] == list(range(5))


@pytest.mark.parametrize("v5", [True, False])
def test_publish_size_is_the_length_of_the_packet_sent(v5):
    """publish_size(), which the publisher checks against the broker's Maximum Packet Size, is the
    length of the PUBLISH packet the fast path builds, across the remaining length field's 1/2/3-byte
    boundaries and for a topic whose UTF-8 is longer than its characters."""
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5, MQTTv311

    from eventbus.paho_fastpath import FastPath, publish_size

    client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5 if v5 else MQTTv311)
    client._sock = object()  # noqa: SLF001 - FastPath.publish only checks that there is one
    fast = FastPath(client, lambda mid, reason: True)
    try:
        for topic in ("a/b", "mapper/n/default/t\u00e9mp\U0001f321"):
            head = 2 + len(topic.encode()) + 2 + (1 if v5 else 0)
            for remaining in (10, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152):
                payload = b"x" * (remaining - head)
                assert fast.publish(topic, payload, 1, False) is not None
                packet = client._out_packet.pop()["packet"]  # noqa: SLF001
                assert publish_size(len(topic.encode()), len(payload), 1, v5) == len(packet), (topic, remaining)
    finally:
        client._sock = None  # noqa: SLF001


def test_a_large_message_whose_last_bytes_come_with_the_100th_read_is_handled_at_once():
    """paho 2.2 stops reading a packet after 100 recv() calls and returns before it checks whether
    the packet is complete: when the 100th brought its last bytes, the packet waited, unhandled,
    for more bytes to wake the event loop's reader (the next message, or the keepalive's PINGRESP).
    The fast path serves paho's reads 4 KiB at a time: a PUBLISH of about 400 KB (refused above the
    default mqtt.max_payload_bytes, taken under a raised one) can end so. Here a socket that has
    the whole packet: one loop_read hands it to on_message."""
    import socket

    from paho.mqtt.client import MQTT_ERR_SUCCESS, CallbackAPIVersion, Client, MQTTv5

    from eventbus.paho_fastpath import READ_SIZE, install

    client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
    received: list[int] = []
    client.on_message = lambda _c, _u, message: received.append(len(message.payload))
    body = READ_SIZE - 4 + 99 * READ_SIZE  # the first read also holds the fixed header (4 bytes here)
    header = bytes([0x30, body & 0x7F | 0x80, body >> 7 & 0x7F | 0x80, body >> 14])
    unread = bytearray(header + b"\x00\x01t\x00" + b"x" * (body - 4))  # topic "t", no properties

    def recv(size: int) -> bytes:
        if not unread:
            raise BlockingIOError
        chunk = bytes(unread[:size])
        del unread[:size]
        return chunk

    client._sock_recv = recv  # noqa: SLF001 - the socket's data, as the fast path reads it
    assert install(client, lambda mid, reason: True) is not None
    ours, other = socket.socketpair()
    client._sock = ours  # noqa: SLF001 - loop_read reads only with a socket
    try:
        assert client.loop_read() == MQTT_ERR_SUCCESS
    finally:
        client._sock = None  # noqa: SLF001
        ours.close()
        other.close()
    assert not unread
    assert received == [body - 4]
