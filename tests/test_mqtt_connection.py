"""The MQTT connection: TLS with the configured CA, credentials never logged, local-only without `mqtt`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import orjson
import pytest

from brokers import MosquittoBroker, ensure_mosquitto_installed
from devices.ids import DeviceId
from eventbus.bus import SHORT_WARN, MqttBus
from eventbus.settings import MqttSettings
from helpers import async_wait_for, wait_for, write_devices
from mapper_proc import MapperProcess
from test_systemd import NotifyListener
from twin.store import TwinStore, committed_seqs


async def nothing(*_args: object) -> None:
    """A bus callback that does nothing (on_message, on_connect)."""
    return None


def tls_block(broker, tmp_path, ca_file) -> str:
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    return (f"mqtt:\n  url: mqtts://localhost:{broker.tls_port}\n  username: mapper\n  password_file: {secret}\n"
            f"  reconnect_min_s: 0.2\n  reconnect_max_s: 0.5\n  tls:\n    ca_file: {ca_file}\n")


def test_tls_connection_with_the_configured_ca(broker, tmp_path):
    """Over mqtts:// with the broker's CA the mapper connects and publishes; the password is never logged."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    mapper = MapperProcess(tmp_path, devices, None)
    mapper.config.write_text(mapper.config.read_text() + tls_block(broker, tmp_path, broker.ca_file))
    with mapper, broker.client("app") as app:
        app.subscribe("mapper/test-node/default/lamp/count")
        mapper.wait_log("connected to mqtts://")
        assert app.next_message(timeout=10).topic == "mapper/test-node/default/lamp/count"
        assert mapper.stop() == 0
    assert broker.users["mapper"] not in mapper.log()


def test_tls_with_a_wrong_ca_is_refused_and_retried(broker, tmp_path):
    """A broker certificate not signed by the configured CA is refused, logged (a WARNING once, the
    same refusal again at DEBUG), and retried with backoff."""
    other_ca = tmp_path / "other-ca.pem"
    import subprocess
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(other_ca), "-days", "1", "-subj", "/CN=other"], check=True, capture_output=True)
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    mapper = MapperProcess(tmp_path, devices, None)
    mapper.config.write_text(mapper.config.read_text().replace("log_level: info", "log_level: debug")
                             + tls_block(broker, tmp_path, other_ca))
    with mapper:
        wait_for(lambda: mapper.log().count("MQTT connection to mqtts://") >= 3, timeout=20, what="retries")
        log = mapper.log()
        assert "certificate verify failed" in log
        assert "connected to mqtts://" not in log
        assert log.count("WARNING mapper.mqtt: MQTT connection to mqtts://") == 1, log
        assert mapper.stop() == 0


def test_without_mqtt_the_mapper_runs_local_only(tmp_path):
    """No `mqtt` section: the mapper says so and the twin still fills."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    mapper = MapperProcess(tmp_path, devices, None)

    def history() -> list:
        with TwinStore.open(mapper.twin_path) as store:
            return store.history(DeviceId("default", "lamp"), "count", limit=1_000_000)

    with mapper:
        mapper.wait_log("running local-only")
        # Logged before the twin is opened: about 17 fsyncs (creating the twin, its devices, the
        # first readings' commits) and 0.2 s of readings to go, 0.5 s on an idle machine, nothing
        # else to wait for (no network, no lock held by anyone else). It once took over 10 s on a
        # busy 2-core CI machine; a mapper that exits fails the test at once, not at the timeout.
        wait_for(lambda: mapper.process.poll() is not None or len(history()) >= 3, timeout=60,
                 what="readings in the twin")
        assert mapper.process.poll() is None, f"the mapper exited:\n{mapper.log()[-3000:]}"
        assert mapper.stop() == 0
    assert [value for _, value, _ in history()][:3] == [0, 1, 2]  # the counter, read by read


def test_mqtt_311_when_asked(broker, tmp_path):
    """`protocol: "3.1.1"` connects with MQTT 3.1.1 and works the same."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    with MapperProcess(tmp_path, devices, broker, extra='  protocol: "3.1.1"\n') as mapper, broker.client("app") as app:
        app.subscribe("mapper/test-node/default/lamp/count")
        mapper.wait_log("(MQTT 3.1.1)")
        assert app.next_message(timeout=10).topic == "mapper/test-node/default/lamp/count"
        assert mapper.stop() == 0


def _freeze(pid: int) -> None:
    """SIGSTOP, and return once the process is stopped (it answers nothing from then on)."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", what="broker stopped")


def test_a_frozen_broker_is_noticed_by_keepalive_and_the_mapper_reconnects(broker, tmp_path):
    """A broker that stops answering but keeps the connection open (SIGSTOP) is noticed by the
    keepalive check (a ping unanswered for keepalive_s), and the mapper reconnects once it answers;
    the readings taken meanwhile all arrive."""
    topic = "mapper/test-node/default/lamp/count"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    extra = "  keepalive_s: 5\n  reconnect_min_s: 0.2\n  reconnect_max_s: 0.5\n"
    with broker.client("app") as app:
        app.subscribe(topic)
        with MapperProcess(tmp_path, devices, broker, extra=extra) as mapper:
            mapper.wait_log("connected to mqtt://")
            pid = broker._process.pid  # noqa: SLF001
            _freeze(pid)
            try:
                mapper.wait_log("lost or refused", timeout=30)
            finally:
                os.kill(pid, signal.SIGCONT)
            mapper.wait_log("connected to mqtt://", count=2, timeout=30)
            assert mapper.stop() == 0
        with contextlib.closing(sqlite3.connect(mapper.twin_path)) as db:
            last = committed_seqs(db)[topic]
        seqs: set[int] = set()

        def all_arrived() -> bool:
            while not app.messages.empty():
                seqs.add(json.loads(app.messages.get().payload)["seq"])
            return seqs >= set(range(1, last + 1))

        wait_for(all_arrived, timeout=30, what=f"readings 1..{last} at the subscriber")


async def test_a_broker_frozen_before_it_acknowledges_online_is_noticed_by_keepalive(broker, tmp_path):
    """The broker freezes right after the CONNACK, before it acknowledges the first publish (the
    node's `online`): the publish ends with the connection, which the keepalive check drops, not
    at its own 30 s timeout; and the bus connects again once the broker answers."""
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                            keepalive_s=5, reconnect_min_s=0.2, reconnect_max_s=0.5)
    pid = broker._process.pid  # noqa: SLF001
    failed, reconnected = asyncio.Event(), asyncio.Event()
    errors: list[aiomqtt.MqttError] = []

    async def online() -> None:
        if bus.connects == 1:
            _freeze(pid)
        else:
            reconnected.set()
        try:
            await bus.publish("mapper/frozen-test/availability", b"online", retain=True)
        except aiomqtt.MqttError as exc:
            errors.append(exc)
            failed.set()
            raise

    bus = MqttBus(settings, client_id="frozen-test", will_topic="mapper/frozen-test/availability",
                  subscriptions=[], on_message=nothing, on_connect=online)
    task = asyncio.create_task(bus.run())
    try:
        try:
            async with asyncio.timeout(60):
                await failed.wait()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert isinstance(errors[0].__cause__, aiomqtt.MqttCodeError), errors[0]  # the disconnect, not a timeout
        async with asyncio.timeout(30):
            await reconnected.wait()
    finally:
        await _cancelled(task)


async def _made_again(task: asyncio.Task, ready: asyncio.Event, fake: _FakeBroker) -> None:
    """Wait (20 s at most) for `ready`, the fake broker having taken two connections: the one it
    dropped and the one made again. The task is stopped either way."""
    try:
        async with asyncio.timeout(20):
            await ready.wait()
        assert fake.connections == 2
    finally:
        await _cancelled(task)


async def _attempted(task: asyncio.Task, bus: MqttBus, enough: Callable[[], bool]) -> None:
    """Let the bus's task try to connect, each attempt awaited, until `enough()` (30 s at most);
    then stop it."""
    try:
        async with asyncio.timeout(30):
            await bus.first_attempt.wait()
            while not enough():
                bus.first_attempt.clear()  # set again after every attempt
                await bus.first_attempt.wait()
    finally:
        await _cancelled(task)


async def _cancelled(task: asyncio.Task) -> None:
    """Cancel a bus task and wait until it has ended; cancel it again while it goes on.

    Under Python 3.11, asyncio.wait_for (aiomqtt's wait for a CONNACK, SUBACK or PUBACK) swallows
    a cancel that comes in the loop iteration where the awaited packet arrives: the task went on,
    connected, and the test hung in its `finally` until pytest-timeout's 300 s
    (test_a_long_broker_outage_is_logged_by_the_cloud_worker_at_each_change_of_cause, cancelled
    right after "back after", while its SUBSCRIBE was in flight)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_cancelled_ends_a_task_whose_wait_for_swallowed_the_cancel():
    """_cancelled above, on a task inside asyncio.wait_for whose future completes in the loop
    iteration of the cancel (Python 3.11 then returns the result and drops the cancel)."""
    arrived = asyncio.get_running_loop().create_future()

    async def connect_then_serve() -> None:
        await asyncio.wait_for(arrived, timeout=30)  # a CONNACK, as aiomqtt waits for it
        await asyncio.Event().wait()  # serving until cancelled

    task = asyncio.create_task(connect_then_serve())
    await asyncio.sleep(0)  # the task waits in wait_for
    arrived.set_result(None)
    ending = asyncio.create_task(_cancelled(task))
    try:
        done, _ = await asyncio.wait({ending}, timeout=10)  # (no cancel from here: it would end the task)
        assert ending in done, "the task went on after _cancelled cancelled it"
        assert task.cancelled()
    finally:
        ending.cancel()
        task.cancel()


@pytest.mark.parametrize("who", ["bus", "cloud worker"])
async def test_a_stop_that_comes_with_the_connack_ends_the_connection_task(who, broker, tmp_path, monkeypatch):
    """A stop (the task group's cancel at SIGTERM; the cloud worker's own) that comes in the loop
    iteration where the broker's CONNACK arrives. aiomqtt waits for the CONNACK with
    asyncio.wait_for, which under Python 3.11 then returns and drops the cancel: the connection
    task went on, connected, and `mapper run` (or the worker) never ended until systemd's SIGKILL.
    Here the cancel comes from aiomqtt's CONNACK handler itself, right after it resolved the wait."""
    if who == "cloud worker":
        pytest.importorskip("onnxruntime")
    user = "mapper" if who == "bus" else "worker"
    secret = tmp_path / "pw"
    secret.write_text(broker.users[user])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username=user, password_file=secret,
                            reconnect_min_s=5, reconnect_max_s=10)
    stopping: list[asyncio.Task] = []
    their_on_connect = aiomqtt.Client._on_connect

    def on_connect_then_stop(client: aiomqtt.Client, *args: object) -> None:
        their_on_connect(client, *args)  # the CONNACK: the wait for it is done
        for task in stopping:
            task.cancel()  # ... and the stop, in the same iteration

    monkeypatch.setattr(aiomqtt.Client, "_on_connect", on_connect_then_stop)
    if who == "bus":
        bus = MqttBus(settings, client_id="stop-test", will_topic="mapper/test-node/availability",
                      subscriptions=[], on_message=nothing, on_connect=nothing)
        task = asyncio.create_task(bus.run())
    else:
        from mapper.inference.worker import CloudWorker, WorkerSettings

        worker = CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id="stop-test"))
        task = asyncio.create_task(worker.run())
    stopping.append(task)
    try:
        done, _ = await asyncio.wait({task}, timeout=10)  # (no cancel from here: it would end the task)
        assert task in done, "the connection task went on after its stop"
        assert task.cancelled()
    finally:
        await _cancelled(task)


async def test_a_stop_whose_disconnect_the_frozen_broker_never_takes_ends_the_bus(broker, tmp_path):
    """The stop cancels the connected bus while the broker takes nothing (frozen, or the network to it
    gone, with the socket's buffers full): aiomqtt's DISCONNECT cannot be written, and its wait for
    the disconnect ends after 10 s with an MqttError in place of the cancel; run() took it for a lost
    connection and connected again, for ever, and the mapper's stop never ended."""
    secret = tmp_path / "pw"
    secret.write_text(broker.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                            keepalive_s=600, reconnect_min_s=0.2, reconnect_max_s=0.5)
    bus = MqttBus(settings, client_id="stop-frozen-test", will_topic="mapper/test-node/availability",
                  subscriptions=[], on_message=nothing, on_connect=nothing)
    task = asyncio.create_task(bus.run())
    try:
        async with asyncio.timeout(20):
            await bus.connected.wait()
        broker.freeze()
        paho_client = bus.client._client  # noqa: SLF001
        async with asyncio.timeout(60):  # the kernel's buffers fill: paho keeps what it could not write
            while len(paho_client._out_packet) < 200:  # noqa: SLF001
                for _ in range(50):
                    paho_client.publish("mapper/test-node/default/filler/count", b"x" * 8192, qos=0)
                await asyncio.sleep(0.01)  # (what the socket takes is written meanwhile)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=25)  # (no cancel from here: it would end the task)
        assert task in done, "the bus went on after its stop"
        assert task.cancelled()
    finally:
        broker.thaw()
        await _cancelled(task)


class _FakeBroker:
    """A minimal MQTT 5 broker on 127.0.0.1 for what Mosquitto cannot be made to do on cue: its first
    `drop_first` connections get a CONNACK and, in the same write, a DISCONNECT "session taken
    over" (another client with the same client id, or a broker going down, right after accepting);
    later ones are served (CONNACK, SUBACK granting what was asked, PINGRESP). With `close_first_at`
    ("CONNECT" or "SUBSCRIBE"), the first connection served is closed when that packet comes, unanswered
    (the broker stopped before its CONNACK or before its SUBACK). With `close_every_other`, every
    second connection is closed at its CONNECT, unanswered. With `answer_pings` false, no PINGREQ is
    answered (a broker that froze, or the network to it gone: the client's keepalive gives up on the
    connection). `connections` counts those that sent a CONNECT."""

    def __init__(self, drop_first: int = 1, *, close_after_suback: bool = False, close_first_at: str | None = None,
                 close_every_other: bool = False, answer_pings: bool = True) -> None:
        self.drop_first = drop_first
        self.answer_pings = answer_pings
        self.close_after_suback = close_after_suback
        self.close_first_at = close_first_at
        self.close_every_other = close_every_other
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> _FakeBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()

    @staticmethod
    async def _packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        header = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return header, await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await self._packet(reader)  # CONNECT
            self.connections += 1  # (not the bus's check that the broker listens: it sends nothing)
            if ((self.close_first_at == "CONNECT" and self.connections == self.drop_first + 1)
                    or (self.close_every_other and self.connections % 2 == 0)):
                writer.close()
                return
            if self.connections <= self.drop_first:
                writer.write(bytes([0x20, 3, 0, 0, 0, 0xE0, 2, 0x8E, 0]))  # CONNACK ok, DISCONNECT 0x8E
                await writer.drain()
                writer.close()
                return
            writer.write(bytes([0x20, 3, 0, 0, 0]))
            while True:
                header, body = await self._packet(reader)
                kind = header >> 4
                if kind == 8 and self.close_first_at == "SUBSCRIBE" and self.connections == self.drop_first + 1:
                    writer.close()
                    return
                if kind == 8:  # SUBSCRIBE: message id, properties (length 0 here), then filters + options
                    mid, rest = body[:2], body[3:]
                    granted = []
                    while rest:
                        n = int.from_bytes(rest[:2], "big")
                        granted.append(rest[2 + n] & 0x03)
                        rest = rest[3 + n:]
                    writer.write(bytes([0x90, 3 + len(granted)]) + mid + b"\x00" + bytes(granted))
                    if self.close_after_suback:
                        await writer.drain()
                        writer.close()
                        return
                elif kind == 12 and self.answer_pings:  # PINGREQ
                    writer.write(bytes([0xD0, 0]))
                elif kind == 14:  # DISCONNECT
                    return
                await writer.drain()


@pytest.mark.parametrize(("packet", "logged"), [("CONNECT", "connection lost before the broker's CONNACK"),
                                               ("SUBSCRIBE", "connection lost while subscribing")])
@pytest.mark.parametrize("who", ["bus", "cloud worker"])
async def test_a_connection_lost_before_the_connack_or_suback_is_made_again_at_once(who, packet, logged, caplog):
    """A broker that goes down before its CONNACK or its SUBACK (restarted again just as the mapper
    got back in: a flapping broker, upgrades one after another): aiomqtt waits for the acknowledgement
    alone, so the mapper (and the cloud worker) sat 10 s on the dead connection, `connected` false and
    nothing logged, then logged "Operation timed out" in place of the disconnect. The wait now ends
    with the connection, which is made again at once, the disconnect named in the log."""
    caplog.set_level(logging.WARNING, logger="mapper")
    async with _FakeBroker(drop_first=0, close_first_at=packet) as fake:
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{fake.port}", keepalive_s=5,
                                reconnect_min_s=0.05, reconnect_max_s=0.1)
        if who == "bus":
            bus = MqttBus(settings, client_id="suback-test", will_topic="mapper/suback-test/availability",
                          subscriptions=[("mapper/suback-test/+/+/+/set", 1)], on_message=nothing, on_connect=nothing)
            task, ready = asyncio.create_task(bus.run()), bus.connected
        else:
            pytest.importorskip("onnxruntime")
            from mapper.inference.worker import CloudWorker, WorkerSettings

            worker = CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id="suback-test"))
            task, ready = asyncio.create_task(worker.run()), worker.ready
        await _made_again(task, ready, fake)
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lost) == 1 and logged in lost[0] and "Unspecified error" in lost[0], lost


@pytest.mark.parametrize("subscriptions", [[], [("mapper/dropped-test/+/+/+/set", 1)]])
async def test_a_connection_dropped_right_after_the_connack_is_noticed_and_made_again(subscriptions, caplog):
    """The broker accepts the connection and drops it at once (another client took the client id
    over, or the broker went down): the bus notices, logs the broker's reason and connects again.
    aiomqtt forgot such a disconnect: without subscriptions the bus stayed "connected" to a closed
    socket for ever; with them the subscribe failed with "not currently connected" (the reason lost)."""
    caplog.set_level(logging.WARNING, logger="mapper.mqtt")
    async with _FakeBroker(drop_first=1) as fake:
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{fake.port}", keepalive_s=5,
                                reconnect_min_s=0.05, reconnect_max_s=0.1)
        served = asyncio.Event()

        async def on_connect() -> None:
            if fake.connections >= 2:
                served.set()

        bus = MqttBus(settings, client_id="dropped-test", will_topic="mapper/dropped-test/availability",
                      subscriptions=subscriptions, on_message=nothing, on_connect=on_connect)
        task = asyncio.create_task(bus.run())
        await _made_again(task, served, fake)
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lost) == 1 and "Session taken over" in lost[0] and "'dropped-test'" in lost[0], lost


async def test_the_cloud_worker_notices_a_connection_dropped_right_after_the_connack(caplog):
    """The same for `mapper cloud-worker`'s own connection: it logs the broker's reason (not "the client is
    not currently connected" from its subscribe), connects again and subscribes."""
    caplog.set_level(logging.WARNING, logger="mapper.worker")
    from mapper.inference.worker import CloudWorker, WorkerSettings

    async with _FakeBroker(drop_first=1) as fake:
        settings = WorkerSettings(models=["sensor_faults"], worker_id="dropped", mqtt=MqttSettings(
            url=f"mqtt://127.0.0.1:{fake.port}", keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.1))
        worker = CloudWorker(settings)
        task = asyncio.create_task(worker.run())
        await _made_again(task, worker.ready, fake)
    lost = [r.getMessage() for r in caplog.records if "lost or refused" in r.getMessage()]
    assert len(lost) == 1 and "Session taken over" in lost[0], lost



async def test_connections_lost_soon_after_they_are_made_do_not_reset_the_backoff(caplog):
    """A broker that closes each connection soon after accepting it (Mosquitto 2.0 does so, with no
    reason, to the older of two clients with the same client id: two mappers with the same
    mqtt.client_id): the reconnect backoff grows towards reconnect_max_s instead of starting over at every
    CONNACK (the mapper reconnected every second or so for ever, resubscribing and resending its
    unacknowledged outbox each time), and the log asks whether another client uses the client id
    (it said only "Disconnected during message iteration")."""
    caplog.set_level(logging.INFO, logger="mapper.mqtt")
    async with _FakeBroker(drop_first=0, close_after_suback=True) as fake:
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{fake.port}", keepalive_s=5,
                                reconnect_min_s=0.01, reconnect_max_s=0.05)
        attempts: list[int] = []
        enough = asyncio.Event()

        bus = MqttBus(settings, client_id="twin-name-test", will_topic="mapper/twin-name-test/availability",
                      subscriptions=[("mapper/twin-name-test/default/+/+/set", 1)], on_message=nothing,
                      on_connect=nothing)
        backoff = bus._backoff  # noqa: SLF001

        def counted(attempt: int) -> float:
            attempts.append(attempt)
            if len(attempts) >= 5:
                enough.set()
            return backoff(attempt)

        bus._backoff = counted  # type: ignore[method-assign]  # noqa: SLF001
        task = asyncio.create_task(bus.run())
        try:
            async with asyncio.timeout(30):
                await enough.wait()
        finally:
            await _cancelled(task)
    assert attempts[:5] == [1, 2, 3, 4, 5], attempts  # was [1, 1, 1, 1, 1]: started over at each CONNACK
    hints = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert hints and "'twin-name-test'" in hints[0] and "another mapper using the same mqtt.client_id" in hints[0], hints


async def _past_the_takeover_hint(settings: MqttSettings, client_id: str, *, timeout: float,
                                  then_lost: bool = False) -> None:
    """Run a bus until it has connected once more than the losses the takeover hint needs (SHORT_WARN),
    and with `then_lost` until that connection is lost too; then stop it."""
    enough = asyncio.Event()

    async def on_connect() -> None:
        if bus.connects > SHORT_WARN:
            enough.set()

    bus = MqttBus(settings, client_id=client_id, will_topic=f"mapper/{client_id}/availability",
                  subscriptions=[(f"mapper/{client_id}/default/+/+/set", 1)], on_message=nothing,
                  on_connect=on_connect)
    task = asyncio.create_task(bus.run())
    try:
        async with asyncio.timeout(timeout):
            await enough.wait()
            if then_lost:
                await bus.disconnected.wait()
    finally:
        await _cancelled(task)


async def test_connections_lost_soon_after_they_are_made_with_failed_attempts_between_are_not_a_takeover(caplog):
    """Connections lost soon after they were made while the broker's address still accepts TCP
    connections, but with a failed attempt between each two (a broker behind a proxy that accepts
    while the broker restarts, a broker not ready yet): the broker did not accept connection after
    connection at once, as it does for another client taking the client id, so the log asks no such
    thing (test_broker_restarts.py: the broker not listening right after the loss)."""
    caplog.set_level(logging.INFO, logger="mapper.mqtt")
    async with _FakeBroker(drop_first=0, close_after_suback=True, close_every_other=True) as fake:
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{fake.port}", keepalive_s=5,
                                reconnect_min_s=0.01, reconnect_max_s=0.05)
        # (and that connection's loss judged too, with no loss left to retrieve)
        await _past_the_takeover_hint(settings, "failing-between-test", timeout=30, then_lost=True)
    assert fake.connections >= 2 * SHORT_WARN + 1  # (served and closed by turns)
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not told, told


async def test_connections_lost_to_the_keepalive_are_not_taken_for_another_client_with_the_client_id(caplog):
    """A broker that stops answering again and again (frozen by SIGSTOP, swapping, a network that
    drops everything): each time the mapper's keepalive gives up on the connection, and the next
    attempt connects once the broker answers again. The broker closed none of those connections, so
    the log does not ask whether another client uses the client id (it did at the third such loss
    within a minute, a broker frozen three times for longer than the keepalive)."""
    caplog.set_level(logging.INFO, logger="mapper.mqtt")
    async with _FakeBroker(drop_first=0, answer_pings=False) as fake:
        # A keepalive below the config's 5 s minimum: three losses in seconds, not half a minute.
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{fake.port}", reconnect_min_s=0.01,
                                reconnect_max_s=0.05).model_copy(update={"keepalive_s": 1})
        await _past_the_takeover_hint(settings, "frozen-again-test", timeout=60)
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lost and all("Keep alive timeout" in m for m in lost), lost
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not told, told


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_refused_credentials_are_logged_with_what_to_check(broker, tmp_path, caplog, protocol):
    """A wrong password: the broker's "[code:135] Not authorized" (MQTT 3.1.1: return code 5) was
    logged bare. The line now names the user and the password file to check against the broker's
    password file (never the password), and the bus retries as before (the same refusal again only
    at DEBUG: see test_a_long_broker_outage_is_logged_at_each_change_of_cause_not_at_each_attempt)."""
    secret = tmp_path / "pw"
    secret.write_text("not-" + broker.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                            protocol=protocol, reconnect_min_s=0.05, reconnect_max_s=0.1)

    bus = MqttBus(settings, client_id="refused-test", will_topic="mapper/refused-test/availability",
                  subscriptions=[], on_message=nothing, on_connect=nothing)
    caplog.set_level(logging.DEBUG, logger="mapper.mqtt")
    task = asyncio.create_task(bus.run())
    await _attempted(task, bus, lambda: bus.connects > 0 or bus.failed_attempts >= 3)
    assert bus.connects == 0
    refusals = [r for r in caplog.records if "lost or refused" in r.getMessage()]
    assert len(refusals) >= 3 and all("Not authorized" in r.getMessage() for r in refusals), refusals  # retried
    hint = (f"the broker did not accept the credentials: check mqtt.username ('mapper') / mqtt.password_file "
            f"({secret}) against the broker's password file (mosquitto_passwd)")
    (told,) = [r.getMessage() for r in refusals if r.levelno >= logging.WARNING]
    assert hint in told, told
    assert not any(secret.read_text() in r.getMessage() for r in caplog.records)


async def test_a_url_where_no_broker_listens_is_logged_with_what_to_do(caplog):
    """The mapper started before its broker, or given another port: "[Errno 111] Connection refused"
    was logged bare, the first line a newcomer reads. It now says no broker listens at mqtt.url and
    what to do, once (the attempts after it at DEBUG, as for any outage)."""
    from brokers import free_port

    port = free_port()  # (bound and closed: nothing listens there)
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", reconnect_min_s=0.05, reconnect_max_s=0.1)
    bus = MqttBus(settings, client_id="nobody-test", will_topic="mapper/nobody-test/availability",
                  subscriptions=[], on_message=nothing, on_connect=nothing)
    caplog.set_level(logging.DEBUG, logger="mapper.mqtt")
    task = asyncio.create_task(bus.run())
    await _attempted(task, bus, lambda: bus.failed_attempts >= 3)
    refusals = [r for r in caplog.records if "lost or refused" in r.getMessage()]
    (told,) = [r.getMessage() for r in refusals if r.levelno >= logging.WARNING]
    assert "Connection refused" in told and (f"no broker listens at mqtt://127.0.0.1:{port}: start it (systemctl"
                                             " start mosquitto), or fix mqtt.url") in told, told


async def test_a_long_broker_outage_is_logged_at_each_change_of_cause_not_at_each_attempt(broker_for, tmp_path, caplog,
                                                                                       monkeypatch):
    """Every reconnect attempt of an outage logged a WARNING "lost or refused ... retrying in": ~2,900
    lines a day on the Pi's SD card while the broker stayed away. Now the first failure and each change
    of its cause are WARNINGs, the attempts between them DEBUG, a "still not connected since" line
    comes at most every OUTAGE_NOTE_S (5 min; 1 s here), and the connection says at INFO how long it
    was down."""
    import eventbus.bus

    monkeypatch.setattr(eventbus.bus, "OUTAGE_NOTE_S", 1.0, raising=False)
    edge = broker_for("outage-node")
    secret = tmp_path / "pw"
    secret.write_text(edge.users["mapper"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{edge.port}", username="mapper", password_file=secret,
                            reconnect_min_s=0.01, reconnect_max_s=0.03)

    bus = MqttBus(settings, client_id="outage-test", will_topic="mapper/outage-node/availability",
                  subscriptions=[], on_message=nothing, on_connect=nothing)
    caplog.set_level(logging.DEBUG, logger="mapper.mqtt")

    told = _log_lines(caplog, "mapper.mqtt")

    task = asyncio.create_task(bus.run())
    try:
        async with asyncio.timeout(60):
            await bus.connected.wait()
            await asyncio.to_thread(edge.stop)
            down_at = time.monotonic()
            await async_wait_for(lambda: len(told("lost or refused", None)) >= 30, timeout=20, what="30 attempts")
            assert len(told("lost or refused")) <= 2, told("lost or refused")  # the loss, the first refusal
            await async_wait_for(lambda: told("still not connected since"), timeout=20, what="a note it lasts")
            refused = len(told("lost or refused"))
            secret.write_text("not-" + edge.users["mapper"])  # another cause: told at once
            await asyncio.to_thread(edge.start)
            await async_wait_for(lambda: len(told("lost or refused")) > refused, timeout=20, what="the new cause")
            lasted = time.monotonic() - down_at
            secret.write_text(edge.users["mapper"])
            await async_wait_for(lambda: bus.connected.is_set(), timeout=20, what="the connection back")
            assert bus.failed_attempts == 0 and bus.down_since is None  # the next outage is told from its start
    finally:
        await _cancelled(task)
    lost = _assert_outage_told(told, lasted, f"MQTT connection to mqtt://127.0.0.1:{edge.port}")
    causes = [line.split("lost or refused: ", 1)[1].split("; retrying in")[0] for line in lost]
    assert all(a != b for a, b in zip(causes, causes[1:])), lost  # a WARNING for each change of cause only


def _log_lines(caplog, logger: str):  # noqa: ANN001, ANN202
    """told(text, level=WARNING): the messages `logger` logged at `level` (None: any) holding `text`."""
    def told(text: str, level: int | None = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger and level in (None, r.levelno)
                and text in r.getMessage()]
    return told


def _assert_outage_told(told, lasted: float, connection: str) -> list[str]:  # noqa: ANN001
    """What an outage of `lasted` seconds (its cause changed once, to refused credentials, then fixed)
    left in the log as `told(text, level)` finds it: the loss and each new cause at WARNING (the last
    with the password file to check), the other attempts at DEBUG, a note that it lasts at most once
    a second (OUTAGE_NOTE_S here), one INFO line when `connection` is back. Returns the WARNINGs."""
    lost = told("lost or refused")
    assert len(lost) <= 3 and "Not authorized" in lost[-1] and "mqtt.password_file" in lost[-1], lost
    assert len(told("lost or refused", logging.DEBUG)) >= 25  # the other attempts
    still = told("still not connected since")
    assert 1 <= len(still) <= lasted / 1.0 + 1, (still, lasted)
    assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ: .+; \d+ attempts", still[0]), still
    (back,) = told("back after", logging.INFO)
    assert re.search(rf"^{re.escape(connection)} back after \d+ s down \(since .+Z; \d+ failed attempts\)$",
                     back), back
    return lost


async def test_the_cloud_worker_logs_refused_credentials_with_what_to_check(broker, tmp_path, caplog):
    """The same hint for `mapper cloud-worker`, which retries as before."""
    pytest.importorskip("onnxruntime")
    from mapper.inference.worker import CloudWorker, WorkerSettings

    secret = tmp_path / "pw"
    secret.write_text("not-" + broker.users["worker"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="worker", password_file=secret,
                            reconnect_min_s=0.05, reconnect_max_s=0.1)
    worker = CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id="refused"))
    caplog.set_level(logging.DEBUG, logger="mapper.worker")

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "lost or refused" in r.getMessage()]

    task = asyncio.create_task(worker.run())
    try:
        await async_wait_for(lambda: len(refusals()) >= 3, timeout=30, what="three refused connections")
    finally:
        await _cancelled(task)
    hint = (f"the broker did not accept the credentials: check mqtt.username ('worker') / mqtt.password_file "
            f"({secret}) against the broker's password file (mosquitto_passwd)")
    assert not worker.ready.is_set()
    assert all("Not authorized" in r.getMessage() for r in refusals()), refusals()  # retried
    (told,) = [r.getMessage() for r in refusals() if r.levelno >= logging.WARNING]  # the rest at DEBUG
    assert hint in told, told
    assert not any(secret.read_text() in r.getMessage() for r in caplog.records)


async def test_a_long_broker_outage_is_logged_by_the_cloud_worker_at_each_change_of_cause(tmp_path, caplog,
                                                                                        monkeypatch):
    """`mapper cloud-worker` logged a WARNING "lost or refused ... retrying in" at every reconnect
    attempt while its broker was away. Now it logs an outage as the mapper's bus does (the shared
    mapper.logs.Outage): the first failure and each change of its cause at WARNING, the other
    attempts at DEBUG, "still not connected since" at most every OUTAGE_NOTE_S (1 s here), and the
    connection, when it comes back, once at INFO with how long it was down."""
    pytest.importorskip("onnxruntime")
    import mapper.inference.worker as worker_module
    from mapper.inference.worker import CloudWorker, WorkerSettings

    monkeypatch.setattr(worker_module, "OUTAGE_NOTE_S", 1.0, raising=False)
    ensure_mosquitto_installed()
    with MosquittoBroker("mosquitto.conf", node="outage-worker") as cloud:
        secret = tmp_path / "pw"
        secret.write_text(cloud.users["worker"])
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{cloud.port}", username="worker", password_file=secret,
                                reconnect_min_s=0.01, reconnect_max_s=0.03)
        worker = CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id="outage"))
        caplog.set_level(logging.DEBUG, logger="mapper.worker")

        told = _log_lines(caplog, "mapper.worker")

        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(60):
                await worker.ready.wait()
                await asyncio.to_thread(cloud.stop)
                down_at = time.monotonic()
                await async_wait_for(lambda: len(told("lost or refused", None)) >= 30, timeout=20,
                                     what="30 attempts")
                assert len(told("lost or refused")) <= 2, told("lost or refused")  # the loss, the first refusal
                await async_wait_for(lambda: told("still not connected since"), timeout=20, what="a note it lasts")
                refused = len(told("lost or refused"))
                secret.write_text("not-" + cloud.users["worker"])  # another cause: told at once
                await asyncio.to_thread(cloud.start)
                await async_wait_for(lambda: len(told("lost or refused")) > refused, timeout=20,
                                     what="the new cause")
                lasted = time.monotonic() - down_at
                secret.write_text(cloud.users["worker"])
                await async_wait_for(lambda: told("back after", logging.INFO), timeout=20, what="the connection back")
                assert worker.outage.attempts == 0 and worker.outage.since is None
        finally:
            await _cancelled(task)
    _assert_outage_told(told, lasted, f"worker: connection to mqtt://127.0.0.1:{cloud.port}")


async def test_the_cloud_worker_answers_after_the_broker_comes_back(tmp_path):
    """The broker goes down while the worker is answering a request (A), with a second request (B)
    received but not yet handled. The worker's publish waited aiomqtt's 30 s timeout, then the
    worker reconnected without A's answer, and B (acknowledged on arrival, in the lost client's
    queue) was gone too. Now the lost connection ends the publish at once, and once the broker is
    back both answers are sent, before anything new."""
    pytest.importorskip("onnxruntime")
    from brokers import MosquittoBroker, MqttProbe
    import numpy as np

    from mapper.inference.codec import OffloadRequest
    from mapper.inference.worker import CloudWorker, WorkerSettings

    node = "restart-node"
    result_topic = f"mapper/{node}/offload/result"

    def request(request_id: str) -> bytes:  # a model the worker does not have: answered with an error
        return orjson.dumps(OffloadRequest(request_id, node, "default/probe", "default/probe-x", "m", "0" * 16, 5,
                                           False, "int8", np.zeros(8, dtype=np.float32)).to_json())

    with MosquittoBroker("mosquitto.conf", node=node) as broker:  # the ACL: `worker` answers this node
        secret = tmp_path / "pw"
        secret.write_text(broker.users["worker"])
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="worker", password_file=secret,
                                reconnect_min_s=0.1, reconnect_max_s=0.5)
        worker = CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id="restarted"))
        answer, handled = worker.answer, []
        # The requester keeps a durable session, so answers sent while it reconnects wait for it.
        requester = MqttProbe.connected(broker, "mapper", client_id="requester", clean=False)
        assert requester.subscribe(result_topic).value == 1

        def answer_then_lose_the_broker(topic: str, payload: bytes):  # noqa: ANN202
            handled.append(orjson.loads(payload)["id"])
            if len(handled) == 1:
                # B is published (and so sent on to the worker) before the broker goes down under A.
                requester.publish(f"mapper/{node}/offload/request", request("b" * 16))
                broker.stop()
            return answer(topic, payload)

        worker.answer = answer_then_lose_the_broker
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(20):
                await worker.ready.wait()
            await asyncio.to_thread(requester.publish, f"mapper/{node}/offload/request", request("a" * 16))
            # The lost connection is noticed while A's answer waits for its PUBACK (before: 30 s later).
            await async_wait_for(lambda: handled and not worker.ready.is_set(), timeout=20,
                                 what="the worker noticing the broker gone")
            assert [orjson.loads(p)["id"] for _, p in worker.owed] == ["a" * 16]
            assert [orjson.loads(m.payload)["id"] for m in worker.unanswered] == ["b" * 16]
            requester.close()
            await asyncio.to_thread(broker.start)
            requester = MqttProbe.connected(broker, "mapper", client_id="requester", clean=False)
            answers = [orjson.loads((await asyncio.to_thread(requester.next_message, 20)).payload) for _ in "ab"]
            assert [(a["id"], a["error"]) for a in answers] == [("a" * 16, "unknown model"),
                                                                ("b" * 16, "unknown model")]
            # Each stays owed until its PUBACK, which may come after the requester has the answer.
            await async_wait_for(lambda: not worker.owed and not worker.unanswered, what="nothing owed any more")
            assert worker.ready.is_set()
        finally:
            await _cancelled(task)
            requester.close()


async def test_a_clean_stop_sends_what_the_twin_holds_even_if_the_publisher_was_not_told(broker, tmp_path):
    """Rows committed to the outbox without the publisher being told of them (as the messages of
    a device state, or of a reconnect's announcements, were when that write outlived the task
    that asked for it) stayed in the outbox after a clean stop, though connected: the drain
    trusted the publisher's idea of what was queued. It now asks the twin, and sends them."""
    from helpers import write_config
    from mapper.config import load_config
    from mapper.runtime import build_service
    from mapper_proc import mqtt_block
    from twin.store import OUTBOX_DEPTH_SQL, OutMessage

    node = "drain-test"
    devices = write_devices(tmp_path / "dev", ["a"], cycle=200)
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db", node=node,
                                      extra=mqtt_block(broker, tmp_path)))
    received: list[bytes] = []
    async with aiomqtt.Client("127.0.0.1", broker.port, username="app", password=broker.users["app"],
                              identifier="drain-test-app") as app:
        await app.subscribe(f"mapper/{node}/default/a/note", qos=1)
        service = build_service(config)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            await asyncio.wait_for(service.ready.wait(), 10)
            await async_wait_for(lambda: service.bus.publisher.idle.is_set(), what="the publisher idle")
            # Committed behind the publisher's back: no offer().
            await service.twin(lambda s: s.record([], [OutMessage(f"mapper/{node}/default/a/note", {"n": 1},
                                                                  sequenced=False)]))
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        async with asyncio.timeout(10):
            async for message in app.messages:
                received.append(bytes(message.payload))
                break
    assert received == [b'{"n":1}']
    with sqlite3.connect(config.twin.path) as db:
        assert db.execute(OUTBOX_DEPTH_SQL).fetchone()[0] == 0


def test_a_rotated_password_is_read_again_at_the_reconnect(tmp_path):
    """The operator rotates the mapper's broker password: a new one in the broker's password file
    and in mqtt.password_file, the broker restarted. The file is read at every connection attempt,
    and one that cannot be read then (not there yet while the new one is installed, or emptied)
    was an OSError that ended the mapper. It is now logged naming the file, the last password read
    is sent meanwhile, and the mapper gets back in with the new password, no restart."""
    from brokers import MosquittoBroker, write_password_file

    topic = "mapper/test-node/default/lamp/count"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    with MosquittoBroker() as broker, MapperProcess(tmp_path, devices, broker) as mapper:
        secret = tmp_path / "mapper.password"  # mapper_proc's mqtt_block wrote it
        mapper.wait_log("connected to mqtt://")
        old = broker.users["mapper"]
        broker.users["mapper"] = new = "rotated-" + old
        write_password_file(broker.workdir / "passwd", broker.users)
        secret.unlink()  # the new password is being installed: no file for a moment
        broker.restart()
        mapper.wait_log(f"cannot read {secret}", timeout=20)
        secret.write_text(new + "\n")
        secret.chmod(0o600)
        mapper.wait_log("connected to mqtt://", count=2, timeout=20)
        with broker.client("app") as app:
            app.subscribe(topic)
            assert not app.next_message(timeout=10).retain  # a reading sent on the new connection

        secret.write_text("")  # e.g. `> file` before the write: the last good password is sent
        broker.restart()
        mapper.wait_log(f"{secret} is empty", timeout=20)
        mapper.wait_log("connected to mqtt://", count=3, timeout=20)
        with broker.client("app") as app:
            app.subscribe(topic)
            assert not app.next_message(timeout=10).retain
        assert mapper.stop() == 0
    assert old not in mapper.log() and new not in mapper.log()


def test_tls_files_broken_at_a_reconnect_are_logged_and_the_last_good_ones_used(tmp_path):
    """The TLS files are read again at every connection attempt, so renewed certificates need no
    restart. A CA file caught half written at a reconnect was an ssl.SSLError that ended the
    mapper with a traceback; now it is logged naming the field and the file, and the context
    built before is used meanwhile: the mapper gets back in and its readings arrive."""
    from brokers import MosquittoBroker

    topic = "mapper/test-node/default/lamp/count"
    ca_file = tmp_path / "ca.pem"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    with MosquittoBroker() as broker:
        ca_file.write_bytes(broker.ca_file.read_bytes())
        mapper = MapperProcess(tmp_path, devices, None)
        mapper.config.write_text(mapper.config.read_text() + tls_block(broker, tmp_path, ca_file))
        with mapper:
            mapper.wait_log("connected to mqtts://")
            ca_file.write_text("-----BEGIN CERTIFICATE-----\n")  # the renewal is being written
            broker.restart()
            mapper.wait_log(f"mqtt.tls.ca_file: {ca_file} holds no CA certificate", timeout=20)
            mapper.wait_log("connected to mqtts://", count=2, timeout=20)
            with broker.client("app") as app:
                app.subscribe(topic)
                assert not app.next_message(timeout=10).retain  # a reading sent on the new connection
            assert mapper.stop() == 0
    assert "Traceback" not in mapper.log()


async def test_the_cloud_worker_reads_a_rotated_password_at_the_reconnect(tmp_path, caplog):
    """As the mapper's: the worker's password is rotated with no file for a moment, the broker
    restarted. The worker's connection task ended with the OSError (`mapper cloud-worker` stopped);
    now the file is logged and retried, and the worker answers again with the new password."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from brokers import MosquittoBroker, MqttProbe, write_password_file

    from mapper.inference.codec import OffloadRequest
    from mapper.inference.worker import CloudWorker, WorkerSettings

    node = "rotated-node"
    with MosquittoBroker(node=node) as broker:  # the ACL: `worker` answers this node
        secret = tmp_path / "pw"
        secret.write_text(broker.users["worker"])
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="worker", password_file=secret,
                                reconnect_min_s=0.1, reconnect_max_s=0.5)
        worker = CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id="rotated"))
        caplog.set_level(logging.WARNING, logger="mapper.worker")
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(20):
                await worker.ready.wait()
            old = broker.users["worker"]
            broker.users["worker"] = new = "rotated-" + old
            await asyncio.to_thread(write_password_file, broker.workdir / "passwd", broker.users)
            secret.unlink()
            await asyncio.to_thread(broker.restart)
            await async_wait_for(lambda: task.done() or any(f"cannot read {secret}" in r.getMessage()
                                                            for r in caplog.records), timeout=20, what="the logged file")
            assert not task.done(), task
            secret.write_text(new)
            async with asyncio.timeout(20):
                await worker.ready.wait()
            requester = await asyncio.to_thread(MqttProbe.connected, broker, "mapper")
            try:
                assert requester.subscribe(f"mapper/{node}/offload/result").value == 1
                request = OffloadRequest("c" * 16, node, "default/probe", "default/probe-x", "m", "0" * 16, 5,
                                         False, "int8", np.zeros(8, dtype=np.float32))
                requester.publish(f"mapper/{node}/offload/request", orjson.dumps(request.to_json()))
                answer = orjson.loads((await asyncio.to_thread(requester.next_message, 20)).payload)
                assert (answer["id"], answer["error"]) == ("c" * 16, "unknown model")
            finally:
                requester.close()
        finally:
            await _cancelled(task)
    assert not any(old in r.getMessage() or new in r.getMessage() for r in caplog.records)


# The mapper's role under Mosquitto's dynamic-security plugin: everything it needs but reading
# KubeEdge's twin updates. The shipped acl_file cannot show it: Mosquitto 2.0 grants every SUBSCRIBE
# (2.0.11 answers "Granted QoS 1", MQTT 5 and 3.1.1, for a filter no `read` line covers, tried by hand) and
# applies `read` only when delivering, so only a plugin (or another broker) refuses in the SUBACK.
MAPPER_BUT_TWIN_UPDATES = [("publishClientSend", "mapper/#"), ("publishClientSend", "$hw/#"),
                           ("subscribePattern", "mapper/#"), ("subscribePattern", "$hw/events/device/+/+/twin/get"),
                           ("subscribePattern", "$hw/events/device/+/+/state/update"),
                           ("subscribePattern", "$hw/events/node/#")]


def _value_comes_back(app, topic: str, value: object, timeout: float = 20.0) -> None:
    """Wait (bounded) for a reading of `value` on `topic` at the app."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        message = app.next_message(timeout=left)
        if message.topic == topic and json.loads(message.payload)["value"] == value:
            return
    raise AssertionError(f"no {value!r} on {topic}")


@pytest.mark.parametrize(("protocol", "reason"), [("5", "Not authorized (0x87)"), ("3.1.1", "Unspecified error (0x80)")])
def test_a_subscription_the_broker_refuses_is_logged_and_in_the_status_and_the_others_still_deliver(
        tmp_path, protocol, reason):
    """The broker refuses the mapper's subscription to KubeEdge twin updates in its SUBACK: an ERROR
    line names the filter, the reason, what will not arrive and the user whose ACL to check, once
    for the connection; systemd's STATUS= shows it; and a desired value sent to `/set` (allowed)
    still reaches the device and comes back as reported. Before, the mapper logged only "connected"."""
    ensure_mosquitto_installed()
    refused = "$hw/events/device/+/+/twin/update"
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    listener = NotifyListener(f"@mapper-test-{uuid.uuid4().hex}")
    power = "mapper/test-node/default/lamp/power"
    try:
        with MosquittoBroker(dynsec={"mapper": MAPPER_BUT_TWIN_UPDATES,
                                     "app": [("publishClientSend", "#"), ("subscribePattern", "#")]}) as broker, \
             MapperProcess(tmp_path, devices, broker, extra=f'  protocol: "{protocol}"\n',
                           env={"NOTIFY_SOCKET": listener.address}) as mapper, broker.client("app") as app:
            assert app.subscribe(power).value < 0x80
            mapper.wait_log(f"(MQTT {protocol})")  # "connected ...", logged once the subscriptions are answered
            lines = [line for line in mapper.log().splitlines() if "refused the subscription" in line]
            assert len(lines) == 1, mapper.log()[-3000:]
            assert " ERROR " in lines[0] and repr(refused) in lines[0] and reason in lines[0], lines[0]
            assert f"desired values (KubeEdge twin updates) sent to {refused} will not reach this mapper" in lines[0]
            assert "check the broker's ACL for user 'mapper'" in lines[0]
            listener.wait_for(re.compile(rf"STATUS=.*; broker refused subscription\(s\) to {re.escape(refused)} "
                                         r"\(see the log\)"), timeout=20)
            assert app.publish(f"{power}/set", b"true").value < 0x80
            _value_comes_back(app, power, True)
            assert mapper.stop() == 0
    finally:
        listener.close()
    assert mapper.log().count("refused the subscription") == 1  # one connection, one line


def test_a_node_availability_the_broker_refuses_is_logged_and_the_mapper_goes_on(tmp_path):
    """MQTT 5: the broker's ACL denies the mapper's user writing the node's availability topic, and
    answers its `online` with PUBACK 0x87: an ERROR line names the topic, the reason and the user;
    the readings (allowed) still go out. Before, bus.publish returned as for a success, silently."""
    ensure_mosquitto_installed()
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=200)
    broker = MosquittoBroker()
    # Rendered but not started: its ACL replaced by one without write on mapper/test-node/availability.
    (broker.workdir / "acl").write_text("user mapper\ntopic readwrite mapper/test-node/default/#\ntopic readwrite $hw/#\n"
                                        "topic read mapper/test-node/availability\n\nuser app\ntopic read mapper/#\n")
    count = "mapper/test-node/default/lamp/count"
    with broker, MapperProcess(tmp_path, devices, broker) as mapper, broker.client("app") as app:
        app.subscribe(count)
        mapper.wait_log("refused the mapper's message on 'mapper/test-node/availability'")
        line = next(line for line in mapper.log().splitlines() if "refused the mapper's message" in line)
        assert " ERROR " in line and "Not authorized (0x87)" in line and "user 'mapper'" in line, line
        assert app.next_message(timeout=10).topic == count
        assert mapper.stop() == 0


async def test_refused_subscriptions_are_forgotten_when_the_connection_ends(tmp_path):
    """`refused_subscriptions` (systemd's STATUS=) are those of the current connection: once it is
    lost there is none, and the status no longer shows the previous connection's refusals (they were
    kept until the next subscribe, however long the mapper stayed disconnected)."""
    ensure_mosquitto_installed()
    refused = "$hw/events/device/+/+/twin/update"
    with MosquittoBroker(dynsec={"mapper": MAPPER_BUT_TWIN_UPDATES}) as broker:
        secret = tmp_path / "pw"
        secret.write_text(broker.users["mapper"])
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="mapper", password_file=secret,
                                reconnect_min_s=5, reconnect_max_s=10)

        bus = MqttBus(settings, client_id="forget-test", will_topic="mapper/forget-test/availability",
                      subscriptions=[(refused, 1), ("mapper/forget-test/default/+/+/set", 1)], on_message=nothing,
                      on_connect=nothing)
        task = asyncio.create_task(bus.run())
        try:
            async with asyncio.timeout(20):
                await bus.connected.wait()
            assert bus.refused_subscriptions == {refused: "Not authorized (0x87)"}
            await asyncio.to_thread(broker.stop)
            async with asyncio.timeout(20):
                await bus.disconnected.wait()
            assert bus.refused_subscriptions == {}
        finally:
            await _cancelled(task)


def _worker_on(broker: MosquittoBroker, tmp_path: Path, worker_id: str):  # noqa: ANN202
    from mapper.inference.worker import CloudWorker, WorkerSettings

    secret = tmp_path / "worker-pw"
    secret.write_text(broker.users["worker"])
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", username="worker", password_file=secret,
                            reconnect_min_s=5, reconnect_max_s=10)
    return CloudWorker(WorkerSettings(mqtt=settings, models=["sensor_faults"], worker_id=worker_id))


async def test_a_cloud_worker_whose_subscription_the_broker_refuses_says_so(tmp_path, caplog):
    """The broker refuses the worker's shared subscription to the requests in its SUBACK (its role has
    no subscribe right): an ERROR line names the filter, the reason and the user, and the worker
    neither claims "subscribed to" nor is `ready`. Before, it logged "subscribed to" and looked
    healthy while no request ever reached it."""
    pytest.importorskip("onnxruntime")
    ensure_mosquitto_installed()
    caplog.set_level(logging.INFO, logger="mapper.worker")
    with MosquittoBroker(dynsec={"worker": [("publishClientSend", "mapper/+/offload/result")]}) as broker:
        worker = _worker_on(broker, tmp_path, "unsubscribed")
        task = asyncio.create_task(worker.run())
        try:
            record = await async_wait_for(
                lambda: next((r for r in caplog.records if "refused the subscription" in r.getMessage()), None),
                timeout=20, what="the worker's refused subscription in the log")
        finally:
            await _cancelled(task)
    line = record.getMessage()
    assert record.levelno == logging.ERROR, line
    assert "'$share/workers/mapper/+/offload/request'" in line and "Not authorized (0x87)" in line, line
    assert "user 'worker'" in line, line
    assert not any("subscribed to" in r.getMessage() for r in caplog.records), caplog.text
    assert not worker.ready.is_set()


async def test_a_cloud_worker_answer_the_broker_refuses_is_logged_naming_its_topic(tmp_path, caplog):
    """MQTT 5: the worker's role may take requests but not write the node's result topic, and the broker
    answers its answer with PUBACK 0x87: an ERROR line names the topic, the reason and the user, and it
    is counted. Before, aiomqtt's publish returned as for a success and the answer vanished silently."""
    pytest.importorskip("onnxruntime")
    ensure_mosquitto_installed()
    from brokers import MqttProbe
    import numpy as np

    from mapper.inference.codec import OffloadRequest

    caplog.set_level(logging.INFO, logger="mapper.worker")
    node = "refused-node"
    request = orjson.dumps(OffloadRequest("c" * 16, node, "default/probe", "default/probe-x", "m", "0" * 16, 5,
                                          False, "int8", np.zeros(8, dtype=np.float32)).to_json())
    with MosquittoBroker(dynsec={"worker": [("subscribePattern", "#")],
                                 "mapper": [("publishClientSend", "mapper/#")]}) as broker:
        worker = _worker_on(broker, tmp_path, "unheard")
        task = asyncio.create_task(worker.run())
        requester = None
        try:
            requester = MqttProbe.connected(broker, "mapper")
            async with asyncio.timeout(20):
                await worker.ready.wait()
            assert (await asyncio.to_thread(requester.publish, f"mapper/{node}/offload/request", request)).value < 0x80
            record = await async_wait_for(
                lambda: next((r for r in caplog.records if "refused worker unheard's answer" in r.getMessage()), None),
                timeout=20, what="the refused answer in the log")
        finally:
            if requester is not None:
                requester.close()
            await _cancelled(task)
    line = record.getMessage()
    assert record.levelno == logging.ERROR, line
    assert f"on 'mapper/{node}/offload/result'" in line and "Not authorized (0x87)" in line, line
    assert "user 'worker'" in line, line
    assert worker.answers_refused == 1


def test_a_password_is_never_sent_in_clear_text_to_another_machine(tmp_path):
    """`mqtt://` with a password to a broker named by a host name (it may be any machine): the
    CONNECT carries the password as it is, so it crossed the network in clear text at every
    (re)connect, also to a TLS-only listener (the shipped LAN and cloud ones), which drops the
    connection only after reading it. Now `mapper run` refuses the config, naming the field, and
    connects nowhere; loopback (127.0.0.1, ::1, localhost) and mqtts:// are as before."""
    import select
    import socket
    import subprocess
    import sys

    from helpers import write_config
    from mapper.config import load_config
    from mapper_proc import REPO

    server = socket.create_server(("", 0))  # every interface: the host name may resolve to any of them
    port = server.getsockname()[1]
    secret = tmp_path / "pw"
    secret.write_text("not-for-the-wire\n")
    secret.chmod(0o600)
    mqtt = f"mqtt:\n  url: mqtt://{socket.gethostname()}:{port}\n  username: mapper\n  password_file: {secret}\n"
    config = write_config(tmp_path / "c.yaml", write_devices(tmp_path / "dev", ["lamp"]), tmp_path / "twin.db",
                          extra=mqtt)
    proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([server], [], [], 0.1)[0]:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(5)
                    pytest.fail(f"the mapper connected and sent {conn.recv(4096)!r}")
        assert proc.poll() is not None, "the mapper neither connected nor stopped within 30 s"
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate(timeout=10)[0]
        server.close()
    assert proc.returncode != 0, output
    line = config.read_text().splitlines().index(f"  url: mqtt://{socket.gethostname()}:{port}") + 1
    assert f"{config}:{line}: mqtt.url: " in output, output
    assert "the password would cross the network in clear text" in output
    assert "not-for-the-wire" not in output

    for url, extra in ((f"mqtt://127.0.0.1:{port}", ""), ("mqtt://[::1]", ""), ("mqtt://localhost", ""),
                       ("mqtts://broker.example", ""), ("mqtt://broker.example", "  allow_password_in_clear: true\n")):
        config.write_text(config.read_text().split("mqtt:\n")[0]
                          + f"mqtt:\n  url: {url}\n  username: mapper\n  password_file: {secret}\n{extra}")
        assert load_config(config).mqtt.url == url
