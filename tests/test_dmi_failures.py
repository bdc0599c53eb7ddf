"""KubeEdge DMI: failures that must not stop the mapper, nor its reports of the other devices.

The real MapperService in kubeedge mode against the test edgecore (a real gRPC server on a
unix socket), with a real SQLite twin. Only the failure itself is injected: a twin read that
raises what SQLite raises under a lock, a conversion that raises, an adoption that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import grpc

from devices.ids import DeviceId
from devices.loader import LoadResult
from dmi_edgecore import FakeEdgecore, device, model
from helpers import TwinLock
from plugin_drivers import installed
from mapper.device_loop import DeviceRunner
from mapper.dmi import api_pb2 as pb
from mapper.dmi import api_pb2_grpc as pb_grpc
from mapper.dmi import client as client_module
from mapper.dmi.catalog import Catalog
from test_dmi import (  # noqa: F401 - sockdir: fixture
    SWITCH, TEMP, Mapper, registered, room, run, running_mapper, sockdir, switch, until,
)

COUNT = model("count-model", {"count": ("INT", "ReadOnly")})


def counter(name: str, cycle_ms: int = 20, **kw) -> pb.Device:  # noqa: ANN003
    """A device whose value changes on every read: each reading is a new report."""
    return device(name, "count-model", {"count": {"kind": "counter"}}, cycle_ms=cycle_ms, **kw)


def reports_of(edgecore: FakeEdgecore, name: str, after: float = 0.0) -> int:
    return len([c for c in edgecore.calls
                if c.method == "ReportDeviceStatus" and c.request.deviceName == name and c.at > after])


# -- reports --------------------------------------------------------------------------------

def test_a_failed_twin_read_is_logged_counted_retried_and_blocks_nobody(
    sockdir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Reading one device's twin for its report fails as SQLite fails under a lock: the failure is
    logged and counted, the other devices go on being reported, the mapper keeps running, and the
    device is reported again once its twin can be read. (The exception used to escape the
    reporter's loop and end the task group: the whole mapper stopped.)"""
    failing = {"left": 3, "at": []}

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock", rate=100) as edgecore:
            edgecore.devices = [(counter("bad"), COUNT), (counter("good"), COUNT), (switch("lamp"), SWITCH)]
            async with running_mapper(sockdir, rate_per_s=100) as mapper:
                reporter = mapper.ext.reporter
                read = reporter._read_twin  # noqa: SLF001

                async def locked_for_bad(device_id):  # noqa: ANN001, ANN202
                    if device_id.name == "bad" and failing["left"] > 0:
                        failing["left"] -= 1
                        failing["at"].append(time.monotonic())
                        raise sqlite3.OperationalError("database is locked")
                    return await read(device_id)

                reporter._read_twin = locked_for_bad  # noqa: SLF001
                await registered(mapper)
                await until(lambda: failing["left"] == 0, timeout=10)
                first, last = failing["at"][0], failing["at"][-1]
                # The others are reported while "bad" fails, and after; "bad" again once it can be read.
                await edgecore.wait_for(lambda: reports_of(edgecore, "good", after=last) >= 3)
                await edgecore.wait_for(lambda: reports_of(edgecore, "bad", after=last) >= 1)
                assert reports_of(edgecore, "good", after=first) >= 3
                assert reporter.failures >= 3
        failed = [r for r in caplog.records if "report twins of default/bad failed" in r.getMessage()]
        assert failed and "OperationalError: database is locked" in failed[0].getMessage()
        assert "retrying in" in failed[0].getMessage()

    run(scenario())


def test_a_report_that_fails_every_time_backs_off_and_blocks_nobody(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """One device's status cannot be converted, every time (a bug, or a value convert.py cannot
    handle): while the others are reported on every change, that device is tried with a growing
    backoff, not on each of its readings (which arrive every 20 ms), and not in a tight loop.

    The failure is injected in the converter: no real value makes device_status raise (edgecore's
    refusals of a value are caught in it), and this path is for such a bug. The back-off is
    checked against what the reporter's failure handler (Reporter._failed, wrapped, not replaced)
    leaves behind: the n-th failure in a row is attempt n, its retry deadline (`_retry_at`, on the
    reporter's own clock, time.monotonic) is attempt n's delay away, within the schedule, and no
    retry comes before that deadline."""
    bad = DeviceId("default", "bad")
    tried: list[float] = []
    # (attempt, delay bounds, earliest retry) per failure of "bad"'s report: the delay is between the
    # deadline less the time after the call and the deadline less the time before it.
    computed: list[tuple[int, tuple[float, float], float]] = []
    device_status = client_module.device_status
    failed = client_module.Reporter._failed  # noqa: SLF001

    def broken_for_bad(definition, twin, left_out):  # noqa: ANN001, ANN202
        if definition.id == bad:
            tried.append(time.monotonic())
            raise TypeError("cannot convert this value")
        return device_status(definition, twin, left_out)

    def observed_failed(self, key, exc):  # noqa: ANN001, ANN202
        before = time.monotonic()
        failed(self, key, exc)
        after = time.monotonic()
        if key == ("twins", bad):
            at = self._retry_at[key]  # noqa: SLF001
            computed.append((self._failing[key], (at - after, at - before), at))  # noqa: SLF001

    monkeypatch.setattr(client_module, "device_status", broken_for_bad)
    monkeypatch.setattr(client_module.Reporter, "_failed", observed_failed)
    cap = 30.0  # the backoff cap (register_backoff_max_s, 0.2 s elsewhere in these tests) at its default

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock", rate=100) as edgecore:
            edgecore.devices = [(counter("bad"), COUNT), (counter("good"), COUNT)]
            async with running_mapper(sockdir, rate_per_s=100, register_backoff_max_s=cap) as mapper:
                await registered(mapper)
                await until(lambda: len(tried) >= 4, timeout=10)
                await edgecore.wait_for(lambda: reports_of(edgecore, "good", after=tried[0]) >= 30, timeout=20)
                assert mapper.ext.reporter.failures >= len(tried)
        assert reports_of(edgecore, "bad") == 0
        # Each failure asks for the next attempt's delay: 0.25-0.5 s, then 0.5-1 s, 1-2 s ...
        attempts = [a for a, _, _ in computed]
        assert attempts, "the reporter's failure handler never ran for bad"
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) >= len(tried) - 1, computed
        for attempt, (least, most), _ in computed:
            step = min(cap, 0.25 * 2 ** min(attempt, 16))
            assert step / 2 <= most and least <= step, computed
        # ... and waits for it: try n+1 not before the deadline failure n set.
        early = [(n + 1, at, computed[n][2]) for n, at in enumerate(tried[1:]) if at < computed[n][2]]
        assert early == [], early
        lines = [r for r in caplog.records if "report twins of default/bad failed" in r.getMessage()]
        assert 1 <= len(lines) <= len(tried)
        assert lines[0].levelno == logging.ERROR and lines[0].exc_info  # a bug: the traceback is logged

    run(scenario())


def test_a_report_marked_again_while_its_attempt_fails_still_waits_for_its_retry(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reading of the device arrives while its report is being tried (during the twin read's
    thread hop: with a reading every 20 ms, often), and the attempt fails. The report is held until
    its retry all the same ("held until its retry, new readings do not mark it"): it was tried
    again at once, the mark made during the attempt outliving the failure. The reading is made to
    arrive at that moment here (the converter, the injected fault, tells the reporter before it
    raises), so this fails every time instead of in about a third of the runs of the test above."""
    bad = DeviceId("default", "bad")
    tried: list[float] = []
    deadlines: list[float] = []  # the retry deadline each failure of "bad"'s report set
    reporters = []
    device_status = client_module.device_status
    failed = client_module.Reporter._failed  # noqa: SLF001

    def broken_for_bad(definition, twin, left_out):  # noqa: ANN001, ANN202
        if definition.id != bad:
            return device_status(definition, twin, left_out)
        tried.append(time.monotonic())
        reporters[0].twins_changed({bad})  # a new reading, while this attempt runs
        raise TypeError("cannot convert this value")

    def observed_failed(self, key, exc):  # noqa: ANN001, ANN202
        failed(self, key, exc)
        if key == ("twins", bad):
            deadlines.append(self._retry_at[key])  # noqa: SLF001

    monkeypatch.setattr(client_module, "device_status", broken_for_bad)
    monkeypatch.setattr(client_module.Reporter, "_failed", observed_failed)

    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock", rate=100) as edgecore:
            edgecore.devices = [(counter("bad", cycle_ms=60_000), COUNT)]
            async with running_mapper(sockdir, rate_per_s=100, register_backoff_max_s=30) as mapper:
                reporters.append(mapper.ext.reporter)
                await registered(mapper)
                await until(lambda: len(tried) >= 2, timeout=10)
        assert deadlines, "the reporter's failure handler never ran for bad"
        assert tried[1] >= deadlines[0], (tried, deadlines)

    run(scenario())


# -- registration ---------------------------------------------------------------------------

def test_a_failure_while_adopting_the_registration_reply_is_retried(
    sockdir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Starting the devices of edgecore's reply fails once (the twin database is locked): the
    mapper logs it, registers again and runs the devices. (It used to end the registration loop's
    task group: the whole mapper stopped.) The lock is real: another connection holds the twin
    file's write lock, the service's busy timeout made short, and lets go when the failure is logged."""
    async def scenario() -> None:
        edgecore = FakeEdgecore(sockdir / "dmi.sock")
        edgecore.devices = [(switch("lamp"), SWITCH)]
        async with running_mapper(sockdir) as mapper:
            await mapper.service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=100"))  # 30 s as shipped
            with TwinLock(sockdir / "twin.db") as lock:
                lock.release_on_log("cannot adopt edgecore's MapperRegister reply")
                async with edgecore:  # the mapper has been retrying MapperRegister until now
                    await registered(mapper)
                    assert lock.released_by  # the reply adopted after the lock was let go
                    assert mapper.runner("lamp") is not None
                    assert len(edgecore.of("MapperRegister")) == 2
                    await edgecore.wait_for(lambda: reports_of(edgecore, "lamp") >= 1)
        (line,) = [r for r in caplog.records if "cannot adopt" in r.getMessage()]
        assert "OperationalError: database is locked" in line.getMessage() and "registering again" in line.getMessage()

    run(scenario())


def test_edgecore_away_for_long_is_logged_at_each_change_of_cause_not_at_each_attempt(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """edgecore not there (restarting, not installed yet): every MapperRegister retry logged a
    WARNING, a line every few seconds (register_backoff_max_s, 30 s shipped) for as long as it
    stayed away. Now it is logged as the MQTT bus logs a broker outage (mapper.logs.Outage): the
    first failure at WARNING, the other attempts at DEBUG, "no answer since" at most every
    OUTAGE_NOTE_S (1 s here), and once edgecore answers one INFO line with how long it took."""
    monkeypatch.setattr(client_module, "OUTAGE_NOTE_S", 1.0, raising=False)
    caplog.set_level(logging.DEBUG, logger="mapper.dmi")

    def told(text: str, level: int | None = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mapper.dmi" and level in (None, r.levelno)
                and text in r.getMessage()]

    async def scenario() -> float:
        async with running_mapper(sockdir) as mapper:
            started = time.monotonic()
            await until(lambda: len(told("MapperRegister to", None)) >= 30, timeout=20)
            assert len(told("failed (")) <= 1, told("failed (")  # the first attempt; the rest at DEBUG
            await until(lambda: told("no answer since"), timeout=20)
            async with FakeEdgecore(sockdir / "dmi.sock"):
                await registered(mapper)
            return time.monotonic() - started

    lasted = asyncio.run(scenario())
    (first,) = told("failed (")
    assert "UNAVAILABLE" in first and "attempt 1," in first, first
    assert len(told("failed (UNAVAILABLE", logging.DEBUG)) >= 25  # the other attempts
    still = told("no answer since")
    assert 1 <= len(still) <= lasted / 1.0 + 1, (still, lasted)
    assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ: UNAVAILABLE: .+; \d+ attempts", still[0]), still
    (back,) = told("answered after", logging.INFO)
    assert re.search(r"answered after \d+ s down \(since .+Z; \d+ failed attempts\)$", back), back


def test_edgecore_away_while_reporting_is_logged_at_each_change_of_cause_not_at_each_report(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """edgecore goes away while the mapper reports: every failed report (retried with backoff,
    register_backoff_max_s) logged a WARNING "report twins of ... failed: UNAVAILABLE", a line every
    few seconds for as long as it stayed away. Now as MapperRegister's retries: the first failure
    and each change of cause at WARNING, the others at DEBUG, "none taken since" at most every
    OUTAGE_NOTE_S (1 s here), and one INFO line when a report is taken again."""
    monkeypatch.setattr(client_module, "OUTAGE_NOTE_S", 1.0, raising=False)
    caplog.set_level(logging.DEBUG, logger="mapper.dmi")

    def told(text: str, level: int | None = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mapper.dmi" and level in (None, r.levelno)
                and text in r.getMessage()]

    def refused() -> list[str]:
        return told("report twins of default/c failed: UNAVAILABLE", None)

    async def scenario() -> float:
        async with running_mapper(sockdir, rate_per_s=100) as mapper:
            async with FakeEdgecore(sockdir / "dmi.sock", rate=100) as edgecore:
                edgecore.devices = [(counter("c"), COUNT)]
                await registered(mapper)
                await edgecore.wait_for(lambda: reports_of(edgecore, "c") >= 1)
            gone = time.monotonic()
            await until(lambda: len(refused()) >= 30, timeout=20)
            warned = [m for m in told("report twins of default/c failed") if "UNAVAILABLE" in m]
            causes = {m.split("; retrying")[0] for m in warned}
            assert len(warned) == len(causes) <= 3, warned  # the first failure and each change of cause
            await until(lambda: told("reports to edgecore: none taken since"), timeout=20)
            async with FakeEdgecore(sockdir / "dmi.sock", rate=100) as edgecore:
                edgecore.devices = [(counter("c"), COUNT)]
                await edgecore.wait_for(lambda: reports_of(edgecore, "c") >= 1)
                await until(lambda: told("taken again", logging.INFO), timeout=10)
            return time.monotonic() - gone

    lasted = asyncio.run(scenario())
    still = told("none taken since")
    assert 1 <= len(still) <= lasted / 1.0 + 1, (still, lasted)
    assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ: UNAVAILABLE: .+; \d+ failed attempts", still[0]), still
    (back,) = told("taken again", logging.INFO)
    assert re.search(r"taken again after \d+ s down \(since .+Z; \d+ failed attempts\)$", back), back


def big_reply(count: int, pad: int) -> list[tuple[pb.Device, pb.DeviceModel]]:
    """`count` devices of `pad` bytes more than usual each (a long method description, as a device
    with many properties or long addresses has), idle: read once a minute."""
    devices = []
    for i in range(count):
        padded = counter(f"c{i:05d}", cycle_ms=60_000)
        padded.spec.methods.add(name="note", description="x" * pad, propertyNames=["count"])
        devices.append((padded, COUNT))
    return devices


def test_a_register_reply_over_grpcs_default_4_mb_is_received(sockdir: Path) -> None:
    """edgecore with many devices for this mapper: its MapperRegister reply is larger than gRPC's
    default 4 MiB receive limit. It used to fail with RESOURCE_EXHAUSTED, retried for ever."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            edgecore.devices = big_reply(300, 15_000)
            size = pb.MapperRegisterResponse(deviceList=[d for d, _ in edgecore.devices],
                                             modelList=[m for _, m in edgecore.devices]).ByteSize()
            assert size > 4 * 1024 * 1024
            async with running_mapper(sockdir) as mapper:
                await registered(mapper)
                assert len(mapper.service.runners) == 300
                assert len(edgecore.of("MapperRegister")) == 1

    run(scenario())


def test_a_register_reply_over_the_limit_is_an_error_saying_what_to_do(
    sockdir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A reply over `kubeedge.max_receive_mb`: one error naming the sizes and what to change, retried
    at the backoff cap (not logged again each time), and the mapper keeps running."""
    async def scenario() -> None:
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
            edgecore.devices = big_reply(100, 15_000)  # 1523300 bytes
            async with running_mapper(sockdir, max_receive_mb=1) as mapper:
                await edgecore.wait_for(lambda: len(edgecore.of("MapperRegister")) >= 2)
                assert mapper.ext.registrations == 0 and mapper.service.runners == {}
                assert mapper.ext.started.is_set()
        # Two attempts (or more), one line: the same reply is not logged again on every retry.
        (line,) = [r for r in caplog.records if "MapperRegister" in r.getMessage()]
        text = line.getMessage()
        assert line.levelno == logging.ERROR
        assert "1523300 bytes" in text and "(1048576 bytes, kubeedge.max_receive_mb: 1)" in text, text
        assert "Raise kubeedge.max_receive_mb to at least 2" in text and "Retrying every 0.2 s" in text, text

    run(scenario())


# -- every DMI loop ---------------------------------------------------------------------------

def test_supervised_restarts_a_loop_after_an_unexpected_error(caplog: pytest.LogCaptureFixture) -> None:
    """A DMI loop that raises is logged with its traceback and started again (after a backoff),
    instead of ending the task group and with it the mapper; a clean return ends it."""
    from mapper.dmi.client import supervised

    calls = []

    async def loop() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("a bug")

    async def scenario() -> None:
        async with asyncio.timeout(10):
            await supervised("dmi.test", loop, cap=0.01)

    run(scenario())
    assert len(calls) == 3
    lines = [r for r in caplog.records if "dmi.test" in r.getMessage()]
    assert len(lines) == 2 and all(r.exc_info for r in lines)


# -- a call cancelled past edgecore's deadline -----------------------------------------------

def gated_room(name: str, gate: Path, **kw) -> pb.Device:  # noqa: ANN003
    """A room on a `gated` bus (tests/plugin_site): closing its driver creates `gate/closing` and
    waits (in the driver's thread) until `gate/close_when` exists, as a stuck bus holds a stop."""
    return device(name, "temp-model", {"temperature": {"kind": "temperature", "base": 21.5},
                                       "humidity": {"kind": "humidity", "base": 48}},
                  config={"seed": 7, "closing": str(gate / "closing"), "close_when": str(gate / "close_when"),
                          "wait_s": 20}, protocol="gated", **kw)


@contextlib.asynccontextmanager
async def gated_room_a_running(sockdir: Path) -> AsyncIterator[tuple[FakeEdgecore, Mapper]]:
    """A registered mapper of the `gated` test protocol running edgecore's room-a on a gated bus."""
    with installed():
        async with FakeEdgecore(sockdir / "dmi.sock") as edgecore, \
                running_mapper(sockdir, name="gated", protocol="gated") as mapper:
            await registered(mapper)
            await edgecore.add(gated_room("room-a", sockdir), TEMP)
            yield edgecore, mapper


def collect_cycle(runner: DeviceRunner | None) -> int | None:
    return None if runner is None else runner.definition.properties[0].collect_cycle_ms


def saved_device(sockdir: Path, name: str) -> pb.Device | None:
    """Device `name` as the `gated` mapper's state file holds it (None: not there, or no file)."""
    saved = Catalog("gated")
    if not saved.restore(sockdir / "twin.db.kubeedge.json"):
        return None
    return saved.devices.get(("default", name))


def test_an_update_past_edgecores_deadline_still_completes(sockdir: Path) -> None:
    """UpdateDevice whose deadline passes while the old device is being stopped: grpc.aio cancels
    the handler. The update still completes: the device runs with its new spec, and the state file
    holds it. (The cancellation used to land in the stop: the device stayed stopped, the state file
    was not saved, and resending the same update found an identical device and did nothing.)
    What holds the stop is the old driver's close() on its bus (the `gated` test driver)."""
    async def scenario() -> None:
        async with gated_room_a_running(sockdir) as (edgecore, mapper):
            assert collect_cycle(mapper.runner("room-a")) == 50
            async with grpc.aio.insecure_channel(f"unix:{edgecore.mapper_address}") as channel:
                stub = pb_grpc.DeviceMapperServiceStub(channel)
                call = asyncio.ensure_future(stub.UpdateDevice(
                    pb.UpdateDeviceRequest(device=gated_room("room-a", sockdir, cycle_ms=80)), timeout=0.5))
                await until((sockdir / "closing").exists)  # the old driver's close() waits on its bus
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await call
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert mapper.runner("room-a") is None  # still stopping
            (sockdir / "close_when").touch()  # the bus lets the close end
            await until(lambda: collect_cycle(mapper.runner("room-a")) == 80)
            # The new runner shows inside the switch; the state file is saved once the switch has
            # returned to the change, a few loop turns later: wait for the file itself (bounded).
            updated = gated_room("room-a", sockdir, cycle_ms=80)
            with contextlib.suppress(TimeoutError):
                await until(lambda: saved_device(sockdir, "room-a") == updated)
            assert saved_device(sockdir, "room-a") == updated
            # Sending it again is answered, and changes nothing.
            running = mapper.runner("room-a")
            await edgecore.call_mapper("UpdateDevice",
                                       pb.UpdateDeviceRequest(device=gated_room("room-a", sockdir, cycle_ms=80)))
            assert mapper.runner("room-a") is running
    run(scenario())


def test_a_device_switch_whose_caller_is_cancelled_still_completes(sockdir: Path) -> None:
    """service.update_devices cancelled while it stops a changed device (a reload at shutdown, any
    caller with a deadline): the switch runs to its end, the device starts again with its new
    definition. (It used to stay stopped, never restarted.) What holds the stop is the old
    driver's close() on its bus (the `gated` test driver)."""
    async def scenario() -> None:
        async with gated_room_a_running(sockdir) as (edgecore, mapper):
            catalog = Catalog("gated", models=dict(mapper.ext.catalog.models))
            catalog.put_device(gated_room("room-a", sockdir, cycle_ms=80))
            switching = asyncio.ensure_future(mapper.service.update_devices(catalog.build(LoadResult())))
            await until((sockdir / "closing").exists)  # the old driver's close() waits on its bus
            switching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await switching
            assert mapper.runner("room-a") is None  # still stopping
            (sockdir / "close_when").touch()  # the bus lets the close end
            await until(lambda: collect_cycle(mapper.runner("room-a")) == 80)
            assert DeviceId("default", "room-a") in mapper.service.definitions.devices
    run(scenario())


async def _restarting_with_saved_state(sockdir: Path, name: str, device, model):  # noqa: ANN001, ANN202
    """A mapper under a fake edgecore registers `device` (its KubeEdge state file saved) and stops,
    edgecore with it; then a kubeedge-mode service on the same socket directory and twin, built, not
    started: (service, its KubeEdge extension). It restores `device` from the state file at start."""
    from mapper.config import MapperConfig, TwinSettings
    from mapper.runtime import build_service
    from test_dmi import settings

    async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
        edgecore.devices = [(device, model)]
        async with running_mapper(sockdir) as mapper:
            await registered(mapper)
            assert mapper.runner(name) is not None
    config = MapperConfig(mode="kubeedge", node="test-node", twin=TwinSettings(path=sockdir / "twin.db"),
                          kubeedge=settings(sockdir))
    service = build_service(config)
    return service, next(e for e in service.extensions if hasattr(e, "catalog"))


def test_a_restore_at_start_the_twin_refuses_is_logged_and_the_mapper_runs_on(
    sockdir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A mapper restarts with a saved KubeEdge state while another process holds the twin's write
    lock: the device switch of the restore fails. The mapper logs what to do and runs on; the devices
    run once the twin can be written (the restore's own retry, or edgecore's registration reply,
    whichever comes first). (The failure used to escape the extension's task: the whole mapper
    ended with a traceback.)"""
    async def scenario() -> None:
        service, ext = await _restarting_with_saved_state(sockdir, "lamp", switch("lamp"), SWITCH)
        lock = sqlite3.connect(sockdir / "twin.db", isolation_level=None)

        def locked_from_now() -> None:  # after the service's own start-up writes, before the restore's switch
            service.worker.submit(lambda s: s.conn.execute("PRAGMA busy_timeout=100"))  # 30 s as shipped
            lock.execute("BEGIN IMMEDIATE")

        service.before_devices.append(locked_from_now)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            async with asyncio.timeout(10):
                await ext.started.wait()  # the restore is over, the DMI socket served
            assert not task.done() and DeviceId("default", "lamp") not in service.runners
            (line,) = [r for r in caplog.records if "restored from" in r.getMessage()
                       and r.levelno == logging.ERROR]
            assert "database is locked" in line.getMessage() and "twin.db" in line.getMessage()
            lock.execute("ROLLBACK")
            await service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=30000"))
            async with FakeEdgecore(sockdir / "dmi.sock") as edgecore:
                edgecore.devices = [(switch("lamp"), SWITCH)]
                await until(lambda: ext.registrations >= 1, timeout=10)
                assert DeviceId("default", "lamp") in service.runners
                await edgecore.wait_for(lambda: reports_of(edgecore, "lamp") >= 1)
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()
            stop.set()
            await task

    run(scenario())


def test_a_restore_the_twin_refuses_is_retried_and_the_devices_run_without_edgecore(
    sockdir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A mapper restarts with a saved KubeEdge state, edgecore is away (nothing on its socket), and
    another process holds the twin's write lock: the restore's device switch fails. It is tried
    again on its own back-off; once the lock is gone the restored device runs, its readings reach
    the twin, and edgecore never answered. (The restored devices used to stay stopped until
    edgecore's registration reply was adopted: for good with edgecore away, the case the restore
    is for.) The lock is let go from inside the start's refusal line: the refusal is over before
    any retry, and nothing but a retry of the mapper's own can start the device."""
    room_a = DeviceId("default", "room-a")
    caplog.set_level(logging.INFO, logger="mapper.dmi")

    async def scenario() -> None:
        service, ext = await _restarting_with_saved_state(sockdir, "room-a", room("room-a"), TEMP)
        assert not (sockdir / "dmi.sock").exists()  # edgecore is gone for the rest of the test
        locks: list[TwinLock] = []

        def locked_from_now() -> None:  # after the service's own start-up writes, before the restore's switch
            service.worker.submit(lambda s: s.conn.execute("PRAGMA busy_timeout=100"))  # 30 s as shipped
            lock = TwinLock(sockdir / "twin.db")
            lock.release_on_log("cannot start the 1 device(s) restored from")
            locks.append(lock)

        service.before_devices.append(locked_from_now)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            async with asyncio.timeout(10):
                await ext.started.wait()  # the restore's first try is over, the DMI socket served
            assert not task.done() and room_a not in service.runners
            (line,) = [r for r in caplog.records if r.getMessage().startswith("cannot start the 1 device(s) restored")]
            assert "database is locked" in line.getMessage() and locks[0].released_by == [line.getMessage()]
            before = (await service.twin(lambda s: s.device(room_a))).properties["temperature"].reported_version
            await until(lambda: room_a in service.runners, timeout=10)

            async def temperature_version() -> int:
                return (await service.twin(lambda s: s.device(room_a))).properties["temperature"].reported_version

            async with asyncio.timeout(10):  # new readings in the twin
                while await temperature_version() <= before:
                    await asyncio.sleep(0.02)
            assert any("started the 1 device(s) restored from" in r.getMessage() for r in caplog.records)
            assert ext.registrations == 0 and not (sockdir / "dmi.sock").exists()
        finally:
            for lock in locks:
                lock.close()
            stop.set()
            await task

    run(scenario())
