"""sd_notify over a real AF_UNIX datagram socket: READY after ready, watchdog pings that stop when the loop hangs
or the twin thread stalls, STOPPING."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from brokers import MosquittoBroker
from eventbus.extension import EventBusExtension
from helpers import async_wait_for, write_config, write_devices
from mapper.config import SystemdSettings, load_config
from mapper.service import MapperService
from mapper.systemd import Notifier, SystemdExtension, status_line, watchdog_interval
from mapper_proc import mqtt_block
from plugin_drivers import installed, write_device

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]


class NotifyListener:
    """systemd's side: a bound datagram socket; a thread keeps the messages in the order they arrive.

    Datagrams sent from one thread (the event loop's) are queued in the order they were sent, so
    positions in `messages` tell what was sent before what, however late the thread reads them.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[set[str]] = []
        self._changed = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._changed:
                self.messages.append(set(data.decode().splitlines()))
                self._changed.notify_all()

    def wait_for(self, line: str | re.Pattern[str], timeout: float = 10.0, after: int = -1) -> int:
        """Block until a message with `line` (or a line the pattern matches in full) arrives at a
        position later than `after`; returns its position."""
        def matches(lines: set[str]) -> bool:
            return line in lines if isinstance(line, str) else any(line.fullmatch(item) for item in lines)

        def found() -> int | None:
            return next((i for i, lines in enumerate(self.messages) if i > after and matches(lines)), None)

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {line!r} within {timeout} s; got {self.messages}")
            return found()  # type: ignore[return-value]

    def positions(self, line: str) -> list[int]:
        with self._changed:
            return [i for i, lines in enumerate(self.messages) if line in lines]

    def having(self, prefix: str) -> list[str]:
        with self._changed:
            return [item for lines in self.messages for item in lines if item.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[NotifyListener]:
    if request.param == "path":
        # AF_UNIX paths are limited to ~107 bytes: keep it short rather than under tmp_path.
        directory = tempfile.mkdtemp(prefix="sdn-")
        address = os.path.join(directory, "notify")
    else:
        address = f"@mapper-test-{uuid.uuid4().hex}"
    listening = NotifyListener(address)
    yield listening
    listening.close()
    if request.param == "path":
        shutil.rmtree(os.path.dirname(address))


@pytest.fixture
def plugin_drivers() -> Iterator[None]:
    """The `gated` driver of tests/plugin_site, installed through its entry point."""
    with installed():
        yield


def config_for(tmp_path: Path, devices: Path | None = None, *, node: str = "test-node", extra: str = ""):  # noqa: ANN201
    """The config for `devices` (default: simulated devices `a` and `b`, read every 50 ms)."""
    devices = devices or write_devices(tmp_path / "dev", ["a", "b"], cycle=50)
    return load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db", node=node, extra=extra))


def gated_devices(tmp_path: Path, config: Callable[[str], dict[str, object]]) -> Path:
    """Devices `a` and `b` of the plugin's `gated` driver, `config(name)` their configData."""
    devices = write_devices(tmp_path / "dev", [])
    for name in ("a", "b"):
        write_device(devices, name, "gated", config(name))
    return devices


async def to_thread(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_ready_waits_for_service_and_first_broker_attempt(tmp_path: Path, listener: NotifyListener,
                                                                broker: MosquittoBroker) -> None:
    """READY=1 comes only after service.ready and the bus's first connection attempt; it carries a STATUS summary.

    The broker is frozen (SIGSTOP) while the mapper starts: the kernel accepts the connection and
    the CONNECT waits unanswered, so the first attempt lasts until the broker is let go on.
    """
    node = f"systemd-{uuid.uuid4().hex[:8]}"  # an MQTT session of its own on the shared broker
    config = config_for(tmp_path, node=node, extra=mqtt_block(broker, tmp_path, extra="  session_expiry_s: 0\n"))
    service = MapperService(config)
    ext = SystemdExtension(Notifier(listener.address), watchdog_s=0.05, status_every_s=0.05)
    service.extensions += [EventBusExtension(config.mqtt), ext]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))  # runs from the first await on: after the freeze
    pid = broker._process.pid  # noqa: SLF001
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.wait_for(service.ready.wait(), 10)
            await to_thread(listener.wait_for, "STATUS=devices started; waiting for the first broker connection attempt")
            assert not listener.positions("READY=1")
        finally:
            os.kill(pid, signal.SIGCONT)  # the shared broker never stays frozen
        await asyncio.wait_for(ext.ready_sent.wait(), 10)
        await to_thread(listener.wait_for, "READY=1")
        assert service.bus.bus.connected.is_set(), "READY after a failed attempt: the broker was let go too late"
        ready_status = [s for s in listener.having("STATUS=") if s.startswith("STATUS=2 devices")]
        assert ready_status, listener.messages
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    await to_thread(listener.wait_for, "STOPPING=1")


async def test_watchdog_pings_stop_while_the_loop_hangs(tmp_path: Path, listener: NotifyListener) -> None:
    """WATCHDOG=1 arrives every interval; while a coroutine blocks the loop none arrive; then they resume."""
    service = MapperService(config_for(tmp_path))
    service.extensions.append(SystemdExtension(Notifier(listener.address), watchdog_s=0.02))
    marker = Notifier(listener.address)  # the test's own messages, queued in line with the pings
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await to_thread(listener.wait_for, "READY=1")
        ping = await to_thread(listener.wait_for, "WATCHDOG=1")
        for _ in range(5):  # pings keep coming
            ping = await to_thread(listener.wait_for, "WATCHDOG=1", after=ping)

        async def hang() -> None:
            # Sent from the loop right before and after it is blocked: a ping between the two was
            # sent while it was, wherever the listener thread happened to be.
            assert marker.notify("X_TEST=loop blocked")
            time.sleep(0.6)  # a driver that blocks the loop instead of using a thread
            assert marker.notify("X_TEST=loop free")

        await hang()
        blocked = await to_thread(listener.wait_for, "X_TEST=loop blocked")
        free = await to_thread(listener.wait_for, "X_TEST=loop free", after=blocked)
        await to_thread(listener.wait_for, "WATCHDOG=1", after=free)  # they resume
        # Of the ~30 pings the 0.6 s would hold, none may come.
        during = [i for i in listener.positions("WATCHDOG=1") if blocked < i < free]
        assert during == [], f"pings arrived while the event loop was blocked: {listener.messages[blocked:free + 1]}"
    finally:
        marker.close()
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_watchdog_pings_stop_while_the_twin_thread_is_stalled(tmp_path: Path, listener: NotifyListener,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A twin call that does not return (a stuck fsync, a deadlock) holds the pings back while the
    event loop runs on, with the reason in STATUS= and the log; once it returns they resume.

    The devices keep reading meanwhile, so the loop is busy and its readings wait for the thread.
    """
    service = MapperService(config_for(tmp_path))
    ext = SystemdExtension(Notifier(listener.address), watchdog_s=0.02, status_every_s=0.05, twin_stall_s=0.5)
    service.extensions.append(ext)
    marker = Notifier(listener.address)  # the test's own messages, queued in line with the pings
    caplog.set_level(logging.INFO, logger="mapper.systemd")
    entered, release = threading.Event(), threading.Event()

    def stuck_twin_call(_store: object) -> None:
        entered.set()
        assert release.wait(30), "never released"  # bounded: a failed test must not leave the thread stuck

    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        ping = await to_thread(listener.wait_for, "READY=1")
        for _ in range(5):  # a healthy worker: pings keep coming
            ping = await to_thread(listener.wait_for, "WATCHDOG=1", after=ping)

        assert service.worker is not None
        assert marker.notify("X_TEST=blocking")  # a slow commit before this is not the stall looked for
        blocked = service.worker.submit(stuck_twin_call)
        assert await to_thread(entered.wait, 10)
        blocking = await to_thread(listener.wait_for, "X_TEST=blocking", after=ping)
        stalled = await to_thread(listener.wait_for, re.compile(
            r"STATUS=twin thread stalled: \d+ call\(s\) waiting, none finished for [\d.]+ s; watchdog pings stopped"),
            after=blocking)
        held = ext.held_pings
        await async_wait_for(lambda: ext.held_pings >= held + 10, what="ten watchdog rounds while stalled")
        assert not blocked.done()
        assert marker.notify("X_TEST=releasing")  # from the loop: after every ping it held back
        release.set()
        await asyncio.wait_for(blocked, 10)
        releasing = await to_thread(listener.wait_for, "X_TEST=releasing", after=stalled)
        await to_thread(listener.wait_for, "WATCHDOG=1", after=releasing)  # they resume
        await to_thread(listener.wait_for, re.compile(r"STATUS=2 devices: .*"), after=releasing)  # and so does the summary
        during = [i for i in listener.positions("WATCHDOG=1") if stalled < i < releasing]
        assert during == [], f"pings arrived while the twin thread was stalled: {listener.messages[stalled:releasing + 1]}"

        logged = [r for r in caplog.records if r.name == "mapper.systemd"]
        errors = [r.getMessage() for r in logged if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "twin thread stalled" in errors[0], errors
        assert "stuck_twin_call" in errors[0], "the log does not say where the twin thread is stuck"
        assert any("watchdog pings resumed" in r.getMessage() for r in logged if r.levelno == logging.WARNING)
    finally:
        release.set()
        marker.close()
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_an_idle_twin_thread_does_not_stop_the_pings(tmp_path: Path, listener: NotifyListener) -> None:
    """No devices, no twin calls for many times the stall bound: idle is not stalled, the pings go on."""
    service = MapperService(config_for(tmp_path, write_devices(tmp_path / "dev", [])))
    ext = SystemdExtension(Notifier(listener.address), watchdog_s=0.02, status_every_s=60, twin_stall_s=0.1)
    service.extensions.append(ext)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        ping = await to_thread(listener.wait_for, "READY=1")
        # 30 rounds of asyncio.sleep(0.02) outlast the 0.1 s bound several times over.
        for _ in range(30):
            ping = await to_thread(listener.wait_for, "WATCHDOG=1", after=ping)
        assert ext.held_pings == 0 and not ext.twin_stalled
        assert not any(s.startswith("STATUS=twin thread stalled") for s in listener.having("STATUS="))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_mapper_run_under_notify_socket(tmp_path: Path, listener: NotifyListener) -> None:
    """`mapper run` with NOTIFY_SOCKET/WATCHDOG_USEC: READY, pings, and STOPPING then exit 0 on SIGTERM."""
    devices = write_devices(tmp_path / "dev", ["a"], cycle=100)
    config = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db")
    env = {**os.environ, "NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000", "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            ready = listener.wait_for("READY=1")
            listener.wait_for("WATCHDOG=1", after=ready)
            proc.send_signal(signal.SIGTERM)
            listener.wait_for("STOPPING=1")
            output, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, output
    assert "told systemd we are ready" in output


def test_watchdog_interval_from_environment() -> None:
    """Half of WATCHDOG_USEC, and only for the process named by WATCHDOG_PID."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=42) is None
    assert watchdog_interval({}, pid=42) is None
    assert SystemdExtension.from_environ({}) is None
    settings = SystemdSettings(twin_stall_s=90)
    from_env = SystemdExtension.from_environ({"NOTIFY_SOCKET": "@mapper-test-unused"}, settings)
    assert from_env is not None and from_env.twin_stall_s == 90
    from_env.notifier.close()


def test_status_line() -> None:
    """The STATUS= summary counts device states, refused devices, those kept but not run, and the outbox."""
    assert status_line(["ok", "ok", "unhealthy"], 1, {"depth": 12, "dropped": 0}) == (
        "4 devices: 2 ok, 1 unhealthy, 1 refused; outbox 12 queued")
    assert status_line(["ok"], 1, None, not_run=2) == (
        "4 devices: 1 ok, 1 refused, 2 not run (invalid, or waiting for their model or a resource)")
    assert status_line([], 0, None) == "0 devices"
    assert status_line(["ok"], 0, {"depth": 0, "dropped": 3}) == "1 device: 1 ok; outbox 0 queued, 3 dropped (outbox limits)"
    assert status_line(["ok"], 0, {"depth": 0}, readings_dropped=120, undeliverable=3) == (
        "1 device: 1 ok; outbox 0 queued; 120 readings dropped (twin not writable); 3 messages undeliverable")
    assert status_line(["ok"], 0, None, 2, readings_dropped=1, undeliverable=1) == (
        "1 device: 1 ok; 1 reading dropped (twin not writable); 1 message undeliverable; 2 MQTT messages refused")
    assert status_line(["ok"], 0, None, 1) == "1 device: 1 ok; 1 MQTT message refused"
    assert status_line(["ok", "ok"], 0, None, undeliverable=1, views_left_out=1) == (
        "2 devices: 2 ok; 1 message undeliverable; state view of 1 device over the broker's packet limit, not sent "
        "(see the log)")
    assert status_line(["ok"], 0, {"depth": 0}, 250) == "1 device: 1 ok; outbox 0 queued; 250 MQTT messages refused"
    assert status_line(["ok"], 0, None, cloud_silent="since 2026-11-30 21:30:00Z, 3 offload(s) unanswered") == (
        "1 device: 1 ok; no cloud worker answers since 2026-11-30 21:30:00Z, 3 offload(s) unanswered (see the log)")


async def test_status_counts_the_mqtt_messages_refused(tmp_path: Path, listener: NotifyListener,
                                                       broker_for: Callable[[str], MosquittoBroker],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The log shows a few refusals a minute; STATUS= carries the total (the router's real counters).

    An app sends 25 values for a read-only property through the broker; the mapper refuses each with a 400.
    """
    node = f"systemd-{uuid.uuid4().hex[:8]}"  # topics and an MQTT session of its own
    broker = broker_for(node)  # its ACL lets apps write this node's topics
    config = config_for(tmp_path, node=node, extra=mqtt_block(broker, tmp_path, extra="  session_expiry_s: 0\n"))
    service = MapperService(config)
    service.extensions += [EventBusExtension(config.mqtt),
                           SystemdExtension(Notifier(listener.address), status_every_s=0.05)]
    caplog.set_level(logging.INFO, logger="mapper.router")

    def send_read_only_sets() -> None:
        with broker.client("app") as app:
            for _ in range(25):
                code = app.publish(f"mapper/{node}/default/a/temperature/set", b"21.5")
                assert code is not None and not code.is_failure, f"the broker refused the app's message: {code}"

    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await to_thread(listener.wait_for, "READY=1")
        assert service.bus.bus.connected.is_set(), "READY without the broker: the messages would be lost"
        await to_thread(send_read_only_sets)
        await to_thread(listener.wait_for, re.compile(r"STATUS=2 devices: 2 ok; outbox \d+ queued; 25 MQTT messages refused"))
        logged = [r for r in caplog.records if r.name == "mapper.router" and r.getMessage().startswith("refused set")]
        assert 0 < len(logged) < 25, f"{len(logged)} refusals logged"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_status_counts_the_edgecore_devices_kept_but_not_run(tmp_path: Path, listener: NotifyListener,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """In `mode: kubeedge`, edgecore's Devices that are invalid or wait for their DeviceModel are kept,
    not run, and announced `offline` (MapperService.not_run). STATUS= counted only the running and
    the refused devices, so `systemctl status` said "3 devices: 3 ok" for a node with 5, two of them
    offline; it now counts them apart, and the log names them when that set changes."""
    from dmi_edgecore import FakeEdgecore, device, model
    from mapper.dmi.extension import KubeEdgeExtension
    from mapper.runtime import build_service

    sockdir = Path(tempfile.mkdtemp(prefix="sdk-", dir="/tmp"))  # unix socket paths: 107 bytes at most
    switch = model("switch-model", {"power": ("BOOLEAN", "ReadWrite")})
    kubeedge = (f"mode: kubeedge\nkubeedge:\n  name: sim\n  protocol: simulated\n"
                f"  edgecore_socket: {sockdir / 'dmi.sock'}\n  socket: {sockdir / 'sim.sock'}\n"
                "  register_backoff_max_s: 0.2\n  report_interval_s: 0\n")
    config = config_for(tmp_path, extra=kubeedge)
    caplog.set_level(logging.INFO, logger="mapper.service")
    try:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            edgecore.devices = [
                (device("edge-lamp", "switch-model", {"power": {"kind": "switch"}}, cycle_ms=50), switch),
                (device("broken", "switch-model", {"power": {"kind": "switch"}}, config={"failure_rate": 5}), switch),
                (device("orphan", "no-such-model", {"power": {"kind": "switch"}}), switch),
            ]
            service = build_service(config)
            service.extensions.append(SystemdExtension(Notifier(listener.address), status_every_s=0.05))
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            try:
                await asyncio.wait_for(service.ready.wait(), 15)
                ext = next(e for e in service.extensions if isinstance(e, KubeEdgeExtension))
                await asyncio.wait_for(ext.registered.wait(), 15)
                await to_thread(listener.wait_for, "STATUS=5 devices: 3 ok, 2 not run (invalid, or waiting for their"
                                " model or a resource); outbox 0 queued", timeout=15)
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    assert ("2 device(s) kept but not run (invalid, or waiting for their model or a resource; announced offline): "
            "default/broken, default/orphan") in caplog.text, caplog.text[-3000:]


def test_bad_notify_socket_is_refused() -> None:
    """A relative NOTIFY_SOCKET is a configuration error, not silently ignored."""
    with pytest.raises(ValueError, match="not an absolute path"):
        Notifier("relative/socket")


async def test_service_is_ready_only_after_every_driver_was_opened(tmp_path: Path, plugin_drivers: None) -> None:
    """READY means devices started: a driver still inside open() (a slow sensor bus) holds it back."""
    gate = tmp_path / "bus-up"
    devices = gated_devices(tmp_path, lambda name: {"opening": str(tmp_path / f"{name}.opening"), "open_when": str(gate)})
    service = MapperService(config_for(tmp_path, devices))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await async_wait_for(lambda: (tmp_path / "a.opening").exists() and (tmp_path / "b.opening").exists(),
                             what="both drivers inside open()")
        assert not service.ready.is_set(), "ready while a driver was still opening"
        gate.touch()
        await asyncio.wait_for(service.ready.wait(), 10)
        assert all(r.first_open_done.is_set() and r.driver.opened for r in service.runners.values())
    finally:
        gate.touch()  # lets open() return on the way out of a failed test too
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_stopping_is_sent_before_the_devices_are_stopped(tmp_path: Path, listener: NotifyListener,
                                                               plugin_drivers: None) -> None:
    """STOPPING=1 goes out as soon as the stop is requested, while drivers are still being closed.

    The drivers' close() waits (bounded) for a file that appears once the listener has STOPPING=1,
    and logs whether it did: a STOPPING=1 sent only after the drivers closed leaves them waiting in vain.
    """
    stopping_seen, close_log = tmp_path / "stopping-seen", tmp_path / "closed.log"
    devices = gated_devices(tmp_path, lambda name: {"close_when": str(stopping_seen), "close_log": str(close_log)})
    service = MapperService(config_for(tmp_path, devices))
    service.extensions.append(SystemdExtension(Notifier(listener.address), status_every_s=60))

    def mark_when_stopping() -> None:
        try:
            listener.wait_for("STOPPING=1", timeout=10)
        except AssertionError:
            return  # the drivers give up waiting and log it
        stopping_seen.touch()

    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    watcher = threading.Thread(target=mark_when_stopping, daemon=True)
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        watcher.start()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    watcher.join(15)
    assert set(close_log.read_text().splitlines()) == {"a yes", "b yes"}


@pytest.mark.parametrize(("journal", "first"), [("8:1234", "<3>ERROR mapper.device: sensor gone"), (None, None)])
def test_log_lines_carry_the_journal_priority_under_systemd(journal: str | None, first: str | None) -> None:
    """Under journald each line starts with its syslog priority (so `journalctl -p err` filters);
    elsewhere lines carry a timestamp and no prefix."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = journal
    code = ("import logging; from mapper import logs; logs.setup('info');"
            "logging.getLogger('mapper.device').error('sensor gone');"
            "logging.getLogger('mapper.device').warning('slow');"
            "logging.getLogger('mapper.device').info('ok');"
            "logging.getLogger('mapper.device').debug('hidden')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=30, check=True)
    lines = done.stderr.splitlines()
    assert len(lines) == 3, lines
    if first:
        assert lines == [first, "<4>WARNING mapper.device: slow", "<6>INFO mapper.device: ok"]
    else:
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"  # logging's asctime
        expected = [f"{stamp} ERROR mapper.device: sensor gone", f"{stamp} WARNING mapper.device: slow",
                    f"{stamp} INFO mapper.device: ok"]
        for line, pattern in zip(lines, expected, strict=True):
            assert re.fullmatch(pattern, line), (line, pattern)


@pytest.mark.parametrize("section, problem", [
    ("systemd:\n  status_every_s: fast\n", "systemd.status_every_s"),
    ("systemd:\n  status_every_s: 0\n", "systemd.status_every_s: must be > 0"),
    ("systemd:\n  status_every: 5\n", "systemd.status_every: unknown field"),
    ("systemd:\n  twin_stall_s: 0\n", "systemd.twin_stall_s: must be > 0"),
])
def test_the_systemd_section_is_validated_with_the_rest(tmp_path: Path, section: str, problem: str) -> None:
    """A wrong `systemd:` value is refused when the config loads, with file, line and field, like
    any other section; it used to pass and then stop the mapper only under systemd (or, for 0,
    spin its status loop)."""
    from devices.errors import DefinitionError

    with pytest.raises(DefinitionError) as refused:
        config_for(tmp_path, extra=section)
    assert any(problem in str(p) and "mapper.yaml:" in str(p) for p in refused.value.problems), refused.value.problems


def _mapper_devices(config: Path) -> tuple[str, dict]:
    """`mapper devices` as a user runs it: its text, and its --json."""
    import json

    run = [sys.executable, "-m", "mapper", "devices", "--config", str(config)]
    text = subprocess.run(run, capture_output=True, text=True, timeout=30, cwd=REPO, check=True).stdout
    as_json = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=30, cwd=REPO, check=True).stdout
    return text, json.loads(as_json)


async def test_readings_dropped_while_the_twin_cannot_be_written_are_in_status_and_mapper_devices(
        tmp_path: Path, listener: NotifyListener) -> None:
    """Another process holds the twin's write lock (as a full disk would fail every commit) past
    twin.waiting_max_readings: the oldest readings are dropped. The count used to be only in the
    twin's counters (and the text of `mapper devices`): STATUS= now says so while it happens, and
    after a restart (the count comes from the twin), and `mapper devices --json` has it too."""
    import sqlite3

    devices = write_devices(tmp_path / "dev", ["a", "b"], cycle=10)
    path = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db")
    config = load_config(path)
    config = config.model_copy(update={"twin": config.twin.model_copy(update={"waiting_max_readings": 100})})
    dropped_status = re.compile(r"STATUS=2 devices: 2 ok; outbox \d+ queued; (\d+) readings dropped \(twin not writable\)")

    def service_with_status() -> MapperService:
        service = MapperService(config)
        service.extensions.append(SystemdExtension(Notifier(listener.address), status_every_s=0.05))
        return service

    service = service_with_status()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    lock = sqlite3.connect(config.twin.path, isolation_level=None)
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=0"))  # a failed commit fails at once
        # Both devices ok first: the STATUS= line this test waits for names the states the twin holds.
        ok = await to_thread(listener.wait_for, re.compile(r"STATUS=2 devices: 2 ok; outbox \d+ queued"))
        lock.execute("BEGIN IMMEDIATE")  # the twin cannot be written from here on
        await to_thread(listener.wait_for, dropped_status, after=ok)
        lock.execute("ROLLBACK")
        assert service.recorder is not None
        await async_wait_for(lambda: service.recorder.waiting() == 0, what="the readings that waited committed")
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        stop.set()
        await asyncio.wait_for(task, 10)
    dropped = service.recorder.dropped
    assert dropped > 0
    text, as_json = await to_thread(_mapper_devices, path)
    assert f"readings: {dropped} dropped while the twin could not be written" in text, text
    assert as_json["readings_dropped"] == dropped, as_json

    # Restarted: the count comes from the twin, before anything is dropped again.
    shown = len(listener.messages)
    service = service_with_status()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await to_thread(listener.wait_for, f"STATUS=2 devices: 2 ok; outbox 0 queued; {dropped} readings dropped"
                        " (twin not writable)", after=shown)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_undeliverable_outbox_messages_are_in_status_and_mapper_devices(
        tmp_path: Path, listener: NotifyListener, broker: MosquittoBroker) -> None:
    """An outbox message paho refuses outright (a wildcard topic, queued before topics were
    validated) is dropped as undeliverable. The count was only the publisher's, in memory: it is
    now in the twin (with the row's delete), in STATUS= (also after a restart) and in
    `mapper devices` (text and --json)."""
    from devices.loader import load
    from twin.store import OutMessage, TwinStore

    node = f"systemd-{uuid.uuid4().hex[:8]}"
    devices = write_devices(tmp_path / "dev", ["a", "b"], cycle=50)
    path = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db", node=node,
                        extra=mqtt_block(broker, tmp_path, extra="  session_expiry_s: 0\n"))
    config = load_config(path)
    with TwinStore.open(config.twin.path) as store:
        store.sync_devices(load([devices]).devices.values())
        store.record([], [OutMessage(f"mapper/{node}/default/+/count", {"n": 1}, sequenced=False)])

    def service_with_status() -> MapperService:
        service = MapperService(config)
        service.extensions += [EventBusExtension(config.mqtt),
                               SystemdExtension(Notifier(listener.address), status_every_s=0.05)]
        return service

    undeliverable = re.compile(r"STATUS=2 devices: 2 ok; outbox \d+ queued; 1 message undeliverable")
    for run in ("first", "restarted"):
        shown = len(listener.messages)
        service = service_with_status()
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            await to_thread(listener.wait_for, undeliverable, after=shown)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert service.bus.publisher.undeliverable == (1 if run == "first" else 0)
        text, as_json = await to_thread(_mapper_devices, path)
        assert "; 1 undeliverable (refused by the broker or over its packet limit)" in text, text
        assert as_json["outbox"]["undeliverable"] == 1, as_json


async def test_telemetry_dropped_by_the_outbox_limits_is_in_status_and_mapper_devices(
        tmp_path: Path, listener: NotifyListener) -> None:
    """The broker cannot be reached and the outbox is at twin.outbox_max_rows: the oldest telemetry
    is dropped, counted in the twin; STATUS= and `mapper devices` (text and --json) say how many."""
    devices = write_devices(tmp_path / "dev", ["a", "b"], cycle=10)
    # Port 1 of the loopback: nothing listens there, every connection attempt is refused.
    path = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db",
                        extra="mqtt:\n  url: mqtt://127.0.0.1:1\n  reconnect_min_s: 0.2\n  reconnect_max_s: 1.0\n")
    config = load_config(path)
    config = config.model_copy(update={"twin": config.twin.model_copy(update={"outbox_max_rows": 100})})
    service = MapperService(config)
    service.extensions += [EventBusExtension(config.mqtt),
                           SystemdExtension(Notifier(listener.address), status_every_s=0.05)]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await to_thread(listener.wait_for,
                        re.compile(r"STATUS=2 devices: 2 ok; outbox 100 queued, \d+ dropped \(outbox limits\); "
                                   r"MQTT broker not connected since .*Connection refused.*"))
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    text, as_json = await to_thread(_mapper_devices, path)
    dropped = as_json["outbox"]["dropped"]
    assert dropped > 0 and as_json["outbox"]["depth"] == 100, as_json
    assert f"; {dropped} dropped by policy (twin.outbox_max_rows, outbox_max_bytes);" in text, text


async def test_status_says_the_broker_is_not_connected_and_why(tmp_path: Path, listener: NotifyListener,
                                                               broker: MosquittoBroker) -> None:
    """A broker that refuses the mapper (its password changed there, not in mqtt.password_file) left
    STATUS= at `2 devices: 2 ok; outbox N queued`: `systemctl status` looked healthy while nothing
    left the Pi. STATUS= now says the broker is not connected, since when and why; once the password
    file holds the broker's password (read again at the next attempt), the note goes."""
    node = f"systemd-{uuid.uuid4().hex[:8]}"  # an MQTT session of its own on the shared broker
    extra = mqtt_block(broker, tmp_path, extra="  session_expiry_s: 0\n")
    password_file = tmp_path / "mapper.password"
    password_file.write_text("not-the-brokers-password")
    config = config_for(tmp_path, node=node, extra=extra)
    service = MapperService(config)
    ext = SystemdExtension(Notifier(listener.address), status_every_s=0.05)
    service.extensions += [EventBusExtension(config.mqtt), ext]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        refused = re.compile(r"STATUS=2 devices: 2 ok; outbox \d+ queued; MQTT broker not connected since "
                             r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ: .*Not authorized.*")
        seen = await to_thread(listener.wait_for, refused)
        password_file.write_text(broker.users["mapper"])
        await asyncio.wait_for(service.bus.bus.connected.wait(), 10)
        await to_thread(listener.wait_for, re.compile(r"STATUS=2 devices: 2 ok; outbox \d+ queued"), after=seen)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
