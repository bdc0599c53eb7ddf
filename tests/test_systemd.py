"""sd_notify over a real AF_UNIX datagram socket: READY after ready, watchdog pings that stop when the loop hangs, STOPPING."""

from __future__ import annotations

import asyncio
import os
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

import pytest

from helpers import write_config, write_devices
from mapper.config import load_config
from mapper.service import MapperService
from mapper.systemd import Notifier, SystemdExtension, status_line, watchdog_interval

REPO = Path(__file__).resolve().parents[1]


class NotifyListener:
    """systemd's side: a bound datagram socket; a thread stamps each message when it arrives."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, set[str]]] = []
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
                self.messages.append((time.monotonic(), set(data.decode().splitlines())))
                self._changed.notify_all()

    def wait_for(self, line: str, timeout: float = 10.0, after: float = 0.0) -> float:
        """Block until a message with `line` arrives (later than `after`); returns its arrival time."""
        def found() -> float | None:
            return next((t for t, lines in self.messages if line in lines and t > after), None)

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {line!r} within {timeout} s; got {self.messages}")
            return found()  # type: ignore[return-value]

    def times(self, line: str) -> list[float]:
        with self._changed:
            return [t for t, lines in self.messages if line in lines]

    def having(self, prefix: str) -> list[str]:
        with self._changed:
            return [item for _, lines in self.messages for item in lines if item.startswith(prefix)]

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


def config_for(tmp_path: Path):
    devices = write_devices(tmp_path / "dev", ["a", "b"], cycle=50)
    return load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))


async def to_thread(fn: Callable[..., float], *args: object, **kwargs: object) -> float:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_ready_waits_for_service_and_first_broker_attempt(tmp_path: Path, listener: NotifyListener) -> None:
    """READY=1 comes only after service.ready and the bus's first attempt; it carries a STATUS summary."""
    service = MapperService(config_for(tmp_path))
    first_attempt = asyncio.Event()
    service.bus_first_attempt = first_attempt
    ext = SystemdExtension(Notifier(listener.address), watchdog_s=0.05, status_every_s=0.05)
    service.extensions.append(ext)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 10)
    await to_thread(listener.wait_for, "STATUS=devices started; waiting for the first broker connection attempt")
    assert not listener.times("READY=1")
    first_attempt.set()
    await asyncio.wait_for(ext.ready_sent.wait(), 10)
    await to_thread(listener.wait_for, "READY=1")
    ready_status = [s for s in listener.having("STATUS=") if s.startswith("STATUS=2 devices")]
    assert ready_status, listener.messages
    stop.set()
    await asyncio.wait_for(task, 10)
    await to_thread(listener.wait_for, "STOPPING=1")


async def test_watchdog_pings_stop_while_the_loop_hangs(tmp_path: Path, listener: NotifyListener) -> None:
    """WATCHDOG=1 arrives every interval; while a coroutine blocks the loop none arrive; then they resume."""
    service = MapperService(config_for(tmp_path))
    service.extensions.append(SystemdExtension(Notifier(listener.address), watchdog_s=0.02))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 10)
    await to_thread(listener.wait_for, "READY=1")
    first = await to_thread(listener.wait_for, "WATCHDOG=1")
    await to_thread(listener.wait_for, "WATCHDOG=1", after=first + 0.1)  # pings keep coming

    async def hang() -> None:
        time.sleep(0.6)  # a driver that blocks the loop instead of using a thread

    hung_at = time.monotonic()
    await hang()
    resumed_at = time.monotonic()
    after = await to_thread(listener.wait_for, "WATCHDOG=1", after=resumed_at)
    # The listener stamps a ping when its thread gets to it: one sent just before the hang may be
    # stamped a little into it on a busy machine. Of the ~30 pings the 0.6 s would hold, none may come.
    during = [t for t in listener.times("WATCHDOG=1") if hung_at + 0.1 < t < resumed_at]
    assert during == [], "pings arrived while the event loop was blocked"
    assert after - resumed_at < 1.0
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


def test_status_line() -> None:
    """The STATUS= summary counts device states, refused devices and the outbox."""
    assert status_line(["ok", "ok", "unhealthy"], 1, {"depth": 12, "dropped": 0}) == (
        "4 devices: 2 ok, 1 unhealthy, 1 refused; outbox 12 queued")
    assert status_line([], 0, None) == "0 devices"
    assert status_line(["ok"], 0, {"depth": 0, "dropped": 3}) == "1 device: 1 ok; outbox 0 queued, 3 dropped"
    assert status_line(["ok"], 0, None, 1) == "1 device: 1 ok; 1 MQTT message refused"
    assert status_line(["ok"], 0, {"depth": 0}, 250) == "1 device: 1 ok; outbox 0 queued; 250 MQTT messages refused"


async def test_status_counts_the_mqtt_messages_refused(tmp_path: Path, listener: NotifyListener) -> None:
    """The log shows a few refusals a minute; STATUS= carries the total (the router's real counters)."""
    from eventbus.router import Router
    from eventbus.topics import Topics

    class RouterOnly:  # the event bus's router, without a broker: messages are handed to it directly
        async def setup(self, service: MapperService) -> None:
            service.bus = self
            self.router = Router(service, Topics("test-node"), max_payload=4096, serve_twin_protocol=True)

        async def run(self, service: MapperService) -> None:
            return None

        async def shutdown(self, service: MapperService) -> None:
            return None

    service = MapperService(config_for(tmp_path))
    bus = RouterOnly()
    service.extensions += [bus, SystemdExtension(Notifier(listener.address), status_every_s=0.05)]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await to_thread(listener.wait_for, "READY=1")
        for _ in range(25):  # temperature is read-only: each is refused with a 400
            await bus.router.handle("mapper/test-node/default/a/temperature/set", b"21.5")
        await to_thread(listener.wait_for, "STATUS=2 devices: 2 ok; outbox 0 queued; 25 MQTT messages refused")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_bad_notify_socket_is_refused() -> None:
    """A relative NOTIFY_SOCKET is a configuration error, not silently ignored."""
    with pytest.raises(ValueError, match="not an absolute path"):
        Notifier("relative/socket")


async def test_service_is_ready_only_after_every_driver_was_opened(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """READY means devices started: a driver still inside open() (a slow sensor bus) holds it back."""
    from devices.drivers.simulated import SimulatedDriver

    entered, gate = threading.Event(), threading.Event()
    real_open = SimulatedDriver.open

    def slow_open(self) -> None:  # noqa: ANN001
        entered.set()
        assert gate.wait(10), "the test never opened the gate"
        real_open(self)

    monkeypatch.setattr(SimulatedDriver, "blocking", True)  # open() runs in a worker thread
    monkeypatch.setattr(SimulatedDriver, "open", slow_open)
    service = MapperService(config_for(tmp_path))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await to_thread(entered.wait, 10)
        assert not service.ready.is_set(), "ready while a driver was still opening"
        gate.set()
        await asyncio.wait_for(service.ready.wait(), 10)
        assert all(r.first_open_done.is_set() and r.driver.opened for r in service.runners.values())
    finally:
        gate.set()
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_stopping_is_sent_before_the_devices_are_stopped(tmp_path: Path, listener: NotifyListener,
                                                               monkeypatch) -> None:  # noqa: ANN001
    """STOPPING=1 goes out as soon as the stop is requested, while drivers are still being closed."""
    from devices.drivers.simulated import SimulatedDriver

    stopping_seen, gate = threading.Event(), threading.Event()
    seen_when_closing: list[bool] = []
    real_close = SimulatedDriver.close

    def watch() -> None:
        try:
            listener.wait_for("STOPPING=1", timeout=10)
            stopping_seen.set()
        finally:
            gate.set()

    def close(self) -> None:  # noqa: ANN001 - runs on the loop: holds the stop until STOPPING=1 is out
        gate.wait(15)
        seen_when_closing.append(stopping_seen.is_set())
        real_close(self)

    monkeypatch.setattr(SimulatedDriver, "close", close)
    service = MapperService(config_for(tmp_path))
    service.extensions.append(SystemdExtension(Notifier(listener.address), status_every_s=60))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 10)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stop.set()
    await asyncio.wait_for(task, 30)
    watcher.join(15)
    assert seen_when_closing and all(seen_when_closing), seen_when_closing


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
        assert all(not line.startswith("<") and " ERROR " in lines[0] for line in lines), lines
