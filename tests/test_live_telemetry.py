"""Telemetry keeps flowing while the twin cannot be written (mapper/recorder.py, the live path).

A Pi's failing SD card is remounted read-only, or fills up. Readings then wait in memory for their
commit, and their telemetry went out only from committed outbox rows: the node went dark on every
dashboard although its sensors and its broker were fine. Now, once the twin is unwritable (a failed
commit and its retry), the telemetry of the waiting readings goes out live, from memory, once each,
`"live":true` in place of a `seq`; once the twin takes commits again those readings are committed
to history without queueing their telemetry again, so every subscriber sees each reading once.

Real Mosquitto, real SQLite; the twin made unwritable by another connection's write lock (as in
test_store_worker.py) or, for `mapper run`, by a full disk (RLIMIT_FSIZE, as in
test_store_and_forward.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from brokers import MosquittoBroker, MqttProbe
from devices.ids import DeviceId
from devices.loader import load
from eventbus.bus import MqttBus
from eventbus.publisher import OutboxPublisher
from eventbus.settings import MqttSettings
from eventbus.telemetry import Telemetry
from eventbus.topics import Topics
from helpers import async_wait_for, wait_for, write_devices
import mapper.recorder as recorder_module
from mapper.recorder import LIVE_MAX, Recorder
from mapper.store_worker import StoreWorker
from mapper_proc import MapperProcess
from test_store_and_forward import WAL_LIMIT, committed_seq
from twin.records import Reading
from twin.store import OutMessage, TwinStore

NODE = "test-node"  # the session broker's node (its ACL is rendered for it)
LAMP = DeviceId("default", "lamp")
COUNT = f"mapper/{NODE}/default/lamp/count"
PROPERTIES = [f"mapper/{NODE}/default/lamp/{name}" for name in ("temperature", "power", "count")]
HEALTH = f"mapper/{NODE}/health"


class Heard:
    """The lamp's telemetry (and the node's health) an app subscribed to them has received, in order."""

    def __init__(self, probe: MqttProbe) -> None:
        self.probe = probe
        self.telemetry: dict[str, list[dict]] = {topic: [] for topic in PROPERTIES}
        self.health: list[dict] = []

    def take(self) -> Heard:
        while not self.probe.messages.empty():
            message: mqtt.MQTTMessage = self.probe.messages.get_nowait()
            if message.retain or not message.payload:
                continue
            body = json.loads(message.payload)
            (self.health if message.topic == HEALTH else self.telemetry[message.topic]).append(body)
        return self

    @property
    def count(self) -> list[dict]:
        return self.take().telemetry[COUNT]

    def live(self, topic: str | None = None) -> list[dict]:
        self.take()
        return [b for t in ([topic] if topic else PROPERTIES) for b in self.telemetry[t] if b.get("live")]

    def values(self) -> list[int]:
        return [b["value"] for b in self.count]


def _lamp_twin(tmp_path: Path) -> Path:
    path = tmp_path / "twin.db"
    with TwinStore.open(path) as setup:
        setup.sync_devices(load([write_devices(tmp_path / "devices", ["lamp"])]).devices.values())
    return path


async def _connected_bus(broker: MosquittoBroker, tmp_path: Path) -> tuple[MqttBus, asyncio.Task]:
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                            reconnect_min_s=0.2, reconnect_max_s=0.5)

    async def nothing(*_args: object) -> None:
        return None

    bus = MqttBus(settings, client_id="live-telemetry", will_topic=f"mapper/{NODE}/availability",
                  subscriptions=[], on_message=nothing, on_connect=nothing)
    task = asyncio.create_task(bus.run())
    async with asyncio.timeout(10):
        await bus.connected.wait()
    return bus, task


def _wired(worker: StoreWorker, bus: MqttBus, factory: Telemetry | Callable[[list[Reading]], list[OutMessage]],
           tasks: list[asyncio.Task], **options: Any) -> tuple[Recorder, OutboxPublisher]:
    """A recorder and its outbox publisher wired as the mapper wires them, the live path on, both
    running (their tasks added to `tasks`); a failed commit is retried every 50 ms."""
    recorder = Recorder(worker, batch_delay_s=0, **options)
    recorder.retry_s = 0.05
    recorder.message_factory = factory
    publisher = OutboxPublisher(bus, worker)
    recorder.on_outbox = publisher.offer
    recorder.take_acks = publisher.take_acked
    recorder.return_acks = publisher.return_acked
    recorder.live_out = publisher
    tasks += [asyncio.create_task(publisher.run()), asyncio.create_task(recorder.run())]
    return recorder, publisher


async def _released(tasks: list[asyncio.Task], lock: sqlite3.Connection) -> None:
    """The end of a test on a lockable twin: its tasks stopped, the other connection's lock released."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if lock.in_transaction:
        lock.execute("ROLLBACK")
    lock.close()


@dataclass
class Rig:
    """A recorder and its publisher on a lamp twin another connection can lock (`lock`), and an app
    subscribed to the lamp's count (`heard`)."""

    heard: Heard
    lock: sqlite3.Connection
    worker: StoreWorker
    recorder: Recorder
    publisher: OutboxPublisher
    tasks: list[asyncio.Task]


@contextlib.asynccontextmanager
async def _rig(broker: MosquittoBroker, tmp_path: Path,
               factory: Callable[[Telemetry], Callable[[list[Reading]], list[OutMessage]]] | None = None,
               **options: Any) -> AsyncIterator[Rig]:
    """_wired on a fresh lamp twin, connected to the broker; `factory` makes the message factory
    of the real one (default: the real one). A failed commit fails at once (busy_timeout 0).
    Afterwards every task is stopped and the lock released."""
    path = _lamp_twin(tmp_path)
    telemetry = Telemetry(Topics(NODE), load([tmp_path / "devices"]).devices)
    lock = sqlite3.connect(path, isolation_level=None)
    with broker.client("app") as app:
        heard = Heard(app)
        assert not app.subscribe(COUNT).is_failure
        bus, bus_task = await _connected_bus(broker, tmp_path)
        tasks: list[asyncio.Task] = [bus_task]
        try:
            async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
                await worker.call(lambda s: s.conn.execute("PRAGMA busy_timeout=0"))
                recorder, publisher = _wired(worker, bus, factory(telemetry) if factory else telemetry, tasks, **options)
                yield Rig(heard, lock, worker, recorder, publisher, tasks)
        finally:
            await _released(tasks, lock)


def reading(i: int) -> Reading:
    return Reading(LAMP, "count", i, 1_000 + i * 60_000)  # a minute apart: each one's telemetry is due


@pytest.mark.parametrize("live_max", [LIVE_MAX, 2])
async def test_readings_waiting_for_a_locked_twin_go_out_live_once_and_are_committed_without_going_again(
        broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live_max: int) -> None:
    """Another process holds the twin's write lock: after a failed commit and its retry, the waiting
    readings' telemetry reaches the app live, in order, once each. Over the bound on waiting readings,
    the oldest are dropped, counted apart: those whose telemetry had gone out live, and those nobody
    saw. Once the lock is gone, the readings left are committed to history (with the twin's counts
    of both kinds of drops), none of their telemetry is queued in the outbox again, and the next
    reading's telemetry goes through the outbox with the seq after the last committed one.
    (live_max 2: LIVE_MAX cut down, the waiting readings go live 2 per failed commit, still in order.)"""
    monkeypatch.setattr(recorder_module, "LIVE_MAX", live_max)
    async with _rig(broker, tmp_path, max_waiting=10) as rig:
        heard, lock, worker, recorder, publisher = rig.heard, rig.lock, rig.worker, rig.recorder, rig.publisher
        recorder.add(reading(0))  # the twin takes it: through the outbox, seq 1
        await async_wait_for(lambda: heard.values() == [0], what="the first reading, committed")
        lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written from here on
        for i in range(1, 6):
            recorder.add(reading(i))
        await async_wait_for(lambda: len(heard.live()) == 5, what="the 5 waiting readings, live")
        assert recorder.outage_failures >= 2 and recorder.committed == 1
        assert recorder.published_live == 5

        # 12 more at once: 17 wait, 10 may. The 7 oldest go: 5 had gone out live, 2 nobody saw.
        for i in range(6, 18):
            recorder.add(reading(i))
        assert recorder.waiting() == 10
        assert (recorder.dropped_live, recorder.dropped) == (5, 2)
        await async_wait_for(lambda: len(heard.live()) == 15, what="the 10 readings left, live")

        lock.execute("ROLLBACK")  # the twin can be written again
        await async_wait_for(lambda: recorder.outage_failures == 0 and recorder.waiting() == 0,
                             what="the waiting readings committed")
        recorder.add(reading(18))
        await async_wait_for(lambda: 18 in heard.values(), what="the next reading, committed")
        await asyncio.wait_for(publisher.drain(), 10)
        assert await worker.call(lambda s: s.outbox_pending(limit=10)) == []
        history = await worker.call(lambda s: [v for _, v, _ in s.history(LAMP, "count", limit=100)])
        losses = await worker.call(lambda s: s.losses())
        seqs = await worker.call(
            lambda s: s.conn.execute("SELECT value, seq FROM readings ORDER BY id").fetchall())

    # Each reading once, in the order taken: the dropped ones that had gone out live among them.
    assert heard.values() == [0, *range(1, 6), *range(8, 18), 18]
    assert [b["value"] for b in heard.live()] == [*range(1, 6), *range(8, 18)]
    assert all("seq" not in b and b["ts"] == reading(b["value"]).taken_at_ms for b in heard.live())
    committed = [b for b in heard.count if not b.get("live")]
    assert [(b["value"], b["seq"]) for b in committed] == [(0, 1), (18, 2)]
    # The twin keeps what was not dropped; the telemetry that went live is not carried again.
    assert sorted(history) == [0, *range(8, 19)]
    assert seqs == [("0", 1), *((str(i), None) for i in range(8, 18)), ("18", 2)]
    assert losses["readings_dropped"] == 2 and losses["readings_dropped_live"] == 5, losses
    assert publisher.live_published == 15 and publisher.live_acked == 15 and publisher.live_unacked == 0


def test_a_full_twin_disk_keeps_the_dashboard_current_and_nobody_receives_a_reading_twice(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    """`mapper run` whose twin's disk fills up: the readings taken meanwhile reach the app live, in
    order, and `health` counts them; once the disk has room again they are in the twin's history
    and none of them comes a second time; every committed seq arrives, none twice."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=50)
    with broker.client("mapper") as cleaner:  # no retained health of another test's run comes first
        cleaner.publish(HEALTH, b"", retain=True)
    mapper = MapperProcess(tmp_path, devices, broker, file_size_limit=WAL_LIMIT)
    with broker.client("app") as app, mapper:
        heard = Heard(app)
        for topic in (*PROPERTIES, HEALTH):
            assert not app.subscribe(topic).is_failure
        mapper.wait_log("connected to mqtt://")
        wait_for(lambda: committed_seq(mapper.twin_path, COUNT) >= 5, timeout=20, what="readings committed")
        mapper.disk_full()
        wait_for(lambda: len(heard.live()) >= 20, timeout=30, what="readings going out live while the disk is full")
        assert mapper.wal_committed_end() == mapper.full_at  # the disk is full: nothing was committed meanwhile
        unwritable = wait_for(lambda: next((h for h in heard.take().health if h["twin"] == "unwritable"), None),
                              timeout=10, what="`unwritable` while the disk is full")
        assert unwritable["readings_dropped"] == 0, unwritable
        mapper.disk_freed()
        ok = wait_for(lambda: next((h for h in heard.take().health if h["twin"] == "ok" and h["at"] > unwritable["at"]),
                                   None), timeout=20, what="`ok` once the disk has room")
        assert ok["readings_dropped_live"] == 0, ok
        # (The broker keeps the order within a topic only: the last live ones may come after `ok`.)
        live = wait_for(lambda: len(heard.live()) == ok["readings_published_live"] and ok["readings_published_live"],
                        timeout=10, what=f"the {ok['readings_published_live']} readings `ok` says went out live")
        after = committed_seq(mapper.twin_path, COUNT) + 5
        wait_for(lambda: any(b.get("seq", 0) >= after for b in heard.take().count), timeout=20,
                 what="readings committed after the disk has room")
        assert mapper.stop() == 0, mapper.log()[-3000:]
    heard.take()
    # (power, a switch with no reportCycle, is published on a change only: it may have none meanwhile)
    assert heard.live(COUNT) and heard.live(PROPERTIES[0]), "a property's telemetry did not go out live"
    with contextlib.closing(sqlite3.connect(mapper.twin_path)) as db:
        for topic in PROPERTIES:
            taken = [b["ts"] for b in heard.telemetry[topic]]
            assert taken == sorted(set(taken)), f"{topic}: a reading received twice, or out of order"
            seqs = [b["seq"] for b in heard.telemetry[topic] if not b.get("live")]
            assert seqs == list(range(seqs[0], committed_seq(mapper.twin_path, topic) + 1)), f"{topic}: a seq missing or twice"
            history = {ts for (ts,) in db.execute("SELECT ts FROM readings WHERE device_id='default/lamp' AND property=?",
                                                  (topic.rsplit("/", 1)[1],))}
            assert {b["ts"] for b in heard.live(topic)} <= history, f"{topic}: a reading that went out live is not in the twin"
        assert db.execute("SELECT value FROM counters WHERE name='readings_dropped'").fetchone() is None
    assert len(heard.live()) == live  # none went live once the twin took commits again


async def test_with_the_broker_away_too_the_readings_wait_for_their_commit_and_go_through_the_outbox(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    """The twin locked and the broker out of reach: nothing is made live (there is no connection to
    hand it to). The connection back, the twin still locked: the waiting readings go out live. The
    connection gone again and the twin unlocked meanwhile: the readings taken since are committed
    with their telemetry, which the outbox sends with its seq once the connection is back. The app
    sees every reading once, in order, live or with the next seq."""
    path = _lamp_twin(tmp_path)
    definitions = load([tmp_path / "devices"]).devices
    lock = sqlite3.connect(path, isolation_level=None)
    with broker.client("app") as app:
        heard = Heard(app)
        assert not app.subscribe(COUNT).is_failure
        bus, bus_task = await _connected_bus(broker, tmp_path)
        tasks: list[asyncio.Task] = []

        async def connection_lost() -> None:
            """The mapper's connection ends (as when the broker goes away)."""
            bus_task.cancel()
            await asyncio.gather(bus_task, return_exceptions=True)
            assert not bus.connected.is_set()

        async def connection_back() -> asyncio.Task:
            task = asyncio.create_task(bus.run())
            async with asyncio.timeout(10):
                await bus.connected.wait()
            return task

        try:
            async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
                await worker.call(lambda s: s.conn.execute("PRAGMA busy_timeout=0"))  # a failed commit fails at once
                recorder, publisher = _wired(worker, bus, Telemetry(Topics(NODE), definitions), tasks)
                recorder.add(reading(0))
                await async_wait_for(lambda: heard.values() == [0], what="the first reading, committed")

                lock.execute("BEGIN IMMEDIATE")
                await connection_lost()
                for i in range(1, 4):
                    recorder.add(reading(i))
                failures = recorder.commit_failures
                await async_wait_for(lambda: recorder.commit_failures >= failures + 3, what="failed commits")
                assert recorder.waiting() == 3 and heard.values() == [0]  # nothing live without a connection

                bus_task = await connection_back()  # the twin still locked: they go out live
                await async_wait_for(lambda: heard.values() == [0, 1, 2, 3], what="the 3 waiting readings, live")
                await async_wait_for(lambda: publisher.live_acked == 3, what="the broker's acknowledgements")

                await connection_lost()
                for i in range(4, 7):
                    recorder.add(reading(i))
                lock.execute("ROLLBACK")  # writable again, the connection still gone: committed, queued in the outbox
                await async_wait_for(lambda: recorder.outage_failures == 0 and recorder.waiting() == 0,
                                     what="the waiting readings committed")
                bus_task = await connection_back()
                await async_wait_for(lambda: len(heard.values()) == 7, what="the readings queued in the outbox")
                await asyncio.wait_for(publisher.drain(), 10)
                history = await worker.call(lambda s: [v for _, v, _ in s.history(LAMP, "count", limit=100)])
        finally:
            await _released([*tasks, bus_task], lock)

    assert heard.values() == list(range(7))
    assert [b.get("live", False) for b in heard.count] == [False, True, True, True, False, False, False]
    assert [b.get("seq") for b in heard.count] == [1, None, None, None, 2, 3, 4]
    assert sorted(history) == list(range(7))
    assert recorder.published_live == publisher.live_published == 3 and publisher.live_unacked == 0


async def test_live_telemetry_the_brokers_acl_refuses_is_logged_as_the_outbox_logs_it(
        broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A topic the broker's ACL does not let the mapper write (a push topic outside `mapper/#`): under
    MQTT 5 the broker refuses each message (PUBACK 0x87). From the outbox such a message is dropped
    and logged, with the ACL hint. Gone out live, the refusal was only counted (publisher.live_refused):
    its reading was committed without it, so nothing was logged at all, then or later, and the
    telemetry a dashboard missed for the whole outage left no trace in the log."""
    from twin.store import OutMessage

    refused_topic = f"home/{NODE}/lamp/count"  # outside the shipped ACL's mapper/#
    path = _lamp_twin(tmp_path)
    lock = sqlite3.connect(path, isolation_level=None)
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                            protocol="5", reconnect_min_s=0.2, reconnect_max_s=0.5)

    async def nothing(*_args: object) -> None:
        return None

    bus = MqttBus(settings, client_id="live-telemetry-refused", will_topic=f"mapper/{NODE}/availability",
                  subscriptions=[], on_message=nothing, on_connect=nothing)
    tasks = [asyncio.create_task(bus.run())]
    try:
        async with asyncio.timeout(10):
            await bus.connected.wait()
        async with StoreWorker(lambda: TwinStore.open(path, check_same_thread=False)) as worker:
            await worker.call(lambda s: s.conn.execute("PRAGMA busy_timeout=0"))  # a failed commit fails at once
            recorder, publisher = _wired(
                worker, bus, lambda batch: [OutMessage(refused_topic, {}, reading=r) for r in batch], tasks)
            lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written
            for i in range(3):
                recorder.add(reading(i))
            await async_wait_for(lambda: publisher.live_refused == 3, what="the broker's 3 refusals")
    finally:
        await _released(tasks, lock)

    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and refused_topic in r.getMessage()]
    assert said, "the broker's refusal of live telemetry was not logged"
    assert "the broker refused it: Not authorized (0x87)" in said[0] and "ACL" in said[0], said[0]


async def test_a_bug_making_a_batchs_telemetry_loses_none_of_its_readings_and_stops_nothing(
        broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The message factory raises on a batch (a bug): the batch's readings were taken from the queue
    already, so they were lost with the exception when the twin was writable, and while the twin was
    unwritable the exception came out of the live path and ended the recorder (and the mapper with
    it). Now such a batch is committed without its telemetry, logged, and everything else goes on:
    readings before and after it, live and through the outbox."""

    def buggy(telemetry: Telemetry) -> Callable[[list[Reading]], list[OutMessage]]:
        def factory(batch: list[Reading]) -> list[OutMessage]:
            if any(r.value in (3, 13) for r in batch):
                raise RuntimeError("a bug in the telemetry")
            return list(telemetry(batch))
        return factory

    async with _rig(broker, tmp_path, buggy) as rig:
        heard, lock, worker, recorder = rig.heard, rig.lock, rig.worker, rig.recorder
        recorder_task = rig.tasks[-1]

        async def history() -> list[int]:
            return sorted(await worker.call(lambda s: [v for _, v, _ in s.history(LAMP, "count", limit=100)]))

        recorder.add(reading(0))
        await async_wait_for(lambda: heard.values() == [0], what="the first reading, committed")
        recorder.add(reading(3))  # the twin writable: its batch's telemetry cannot be made
        await async_wait_for(lambda: recorder.committed == 2, what="the reading whose telemetry failed, committed")

        lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written from here on
        recorder.add(reading(11))
        await async_wait_for(lambda: recorder.outage_failures >= 2, what="a failed commit and its retry")
        recorder.add(reading(12))
        recorder.add(reading(13))  # made into a batch by the live path: its telemetry cannot be made
        failures = recorder.commit_failures
        await async_wait_for(lambda: recorder.commit_failures >= failures + 3, what="more failed commits")
        assert not recorder_task.done(), recorder_task
        await async_wait_for(lambda: [b["value"] for b in heard.live()] == [11], what="11, live")

        lock.execute("ROLLBACK")
        await async_wait_for(lambda: recorder.outage_failures == 0 and recorder.waiting() == 0,
                             what="the waiting readings committed")
        recorder.add(reading(14))
        await async_wait_for(lambda: 14 in heard.values(), what="the next reading, committed")
        kept = await history()

    assert kept == [0, 3, 11, 12, 13, 14]
    assert heard.values() == [0, 11, 14]  # 3, 12 and 13 have no telemetry: their batches' could not be made
    assert [(b["value"], b.get("seq")) for b in heard.count] == [(0, 1), (11, None), (14, 2)]
    failed = [r for r in caplog.records if r.getMessage().startswith("making the messages of")]
    assert failed and "a bug in the telemetry" in (failed[0].exc_text or ""), [r.getMessage() for r in caplog.records]
