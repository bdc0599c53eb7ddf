"""Another process holds the twin's write lock while the mapper starts or reloads.

`sqlite3 twin.db 'BEGIN IMMEDIATE;'` left open, a `mapper twin set` or a backup in progress: every
write of the mapper waits twin.busy_timeout_ms for the lock, then fails with "database is locked".
The start's device list write (TwinStore.sync_devices) used to stop `mapper run`, and a SIGHUP
reload's was lost ("reload failed"). Both now wait for the lock, with a WARNING naming the process
that holds it, and go on once it is released. The holder is a real process here: a lock of the
mapper's own process is not named (another process is what holds it up).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.ids import DeviceId
from helpers import async_wait_for, device_yaml, running_service, write_config, write_devices
from mapper.config import load_config
from twin.store import TwinStore

A, B = DeviceId("default", "a"), DeviceId("default", "b")


class LockHolder:
    """A process holding the twin's write lock (BEGIN IMMEDIATE) until `release()`."""

    def __init__(self, twin: Path) -> None:
        script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
                  " c.execute('BEGIN IMMEDIATE'); print('held', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", script, str(twin)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # its transaction ends with it
            self.proc.wait(10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


@pytest.fixture
def holder_of(tmp_path: Path) -> Iterator:
    holders: list[LockHolder] = []

    def hold(twin: Path) -> LockHolder:
        holders.append(LockHolder(twin))
        return holders[-1]

    yield hold
    for holder in holders:
        holder.release()


def short_busy_config(tmp_path: Path, names: list[str], busy_ms: int = 200):  # noqa: ANN201
    """A config whose twin waits `busy_ms` for a lock (30 s as shipped)."""
    devices = write_devices(tmp_path / "dev", names, cycle=20)
    path = write_config(tmp_path / "c.yaml", devices, tmp_path / "twin.db")
    path.write_text(path.read_text().replace("  batch_delay_ms: 5\n", f"  batch_delay_ms: 5\n  busy_timeout_ms: {busy_ms}\n"))
    config = load_config(path)
    assert config.twin.busy_timeout_ms == busy_ms
    return config, devices


def readings(config, device: DeviceId) -> int:  # noqa: ANN001
    with TwinStore.open(config.twin.path) as twin:
        return len(twin.history(device, "count", limit=1_000_000))


async def test_a_start_waits_for_a_twin_another_process_holds_locked(tmp_path: Path, caplog, holder_of) -> None:
    """Before: `mapper run` stopped after busy_timeout_ms with "cannot write the twin ... at start:
    database is locked". Now it says who holds the lock and starts once the lock is released."""
    from mapper.service import TWIN_LOCKED_RETRY_S

    assert TWIN_LOCKED_RETRY_S * 1000 != 200  # (the busy timeout below tells the two apart)
    caplog.set_level(logging.INFO)
    config, _ = short_busy_config(tmp_path, ["a"])
    TwinStore.open(config.twin.path).close()  # the twin file there, as after an earlier run
    holder = holder_of(Path(config.twin.path))
    from mapper.service import MapperService

    service = MapperService(config)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await async_wait_for(lambda: "write lock" in caplog.text or task.done(), what="the lock's warning")
        assert not task.done(), task.exception() if not task.cancelled() else "cancelled"
        warned = [r for r in caplog.records if "write lock" in r.getMessage()]
        assert warned[0].levelno == logging.WARNING
        assert f"pid {holder.proc.pid} (" in warned[0].getMessage() and "BEGIN IMMEDIATE" in warned[0].getMessage()
        assert not service.ready.is_set()
        holder.release()
        async with asyncio.timeout(10):
            await service.ready.wait()
        await async_wait_for(lambda: readings(config, A) >= 3, what="the device's readings in the twin")
        # Each try waits at most 1 s for the lock (a stop is not held up for busy_timeout_ms);
        # the twin that started waits busy_timeout_ms again.
        assert await service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout").fetchone()[0]) == 200
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def test_the_start_names_the_lock_holder_before_its_busy_timeout(tmp_path: Path, caplog, holder_of) -> None:
    """The first try of the start waited twin.busy_timeout_ms (30 s as shipped) for the lock before
    the WARNING naming the holder: the operator saw nothing meanwhile. Each try waits at most
    TWIN_LOCKED_RETRY_S now, the first too: the WARNING comes while the holder still holds the
    lock, long before the busy timeout (ten minutes here; the wait's own timeout bounds the test).
    The twin that started waits the configured busy timeout."""
    caplog.set_level(logging.INFO)
    config, _ = short_busy_config(tmp_path, ["a"], busy_ms=600_000)
    TwinStore.open(config.twin.path).close()
    holder = holder_of(Path(config.twin.path))
    from mapper.service import MapperService

    service = MapperService(config)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await async_wait_for(lambda: "write lock" in caplog.text or task.done(), timeout=30, what="the lock's warning")
        assert not task.done(), task.exception() if not task.cancelled() else "cancelled"
        assert holder.proc.poll() is None  # still holding it
        warned = [r for r in caplog.records if "write lock" in r.getMessage()]
        assert warned[0].levelno == logging.WARNING and f"pid {holder.proc.pid} (" in warned[0].getMessage()
        holder.release()
        async with asyncio.timeout(10):
            await service.ready.wait()
        assert await service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout").fetchone()[0]) == 600_000
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def test_a_reload_waits_for_a_twin_another_process_holds_locked(tmp_path: Path, caplog, holder_of) -> None:
    """Before: the reload's device list write failed after busy_timeout_ms ("reload failed; still
    running the previous devices") and the reload was lost until another SIGHUP. Now it waits, the
    previous devices reading on, says who holds the lock, and switches once it is released."""
    from mapper.cli import reload_devices

    caplog.set_level(logging.INFO)
    config, devices = short_busy_config(tmp_path, ["a", "b"])
    async with running_service(config) as service:
        before = {d: r.definition.fingerprint for d, r in service.runners.items()}
        (devices / "b.yaml").write_text(device_yaml("b", cycle=20, config="{seed: 7}"))
        (devices / "a.yaml").unlink()
        holder = holder_of(Path(config.twin.path))
        reload = asyncio.create_task(reload_devices(service, config))
        await async_wait_for(lambda: "the reload waits for the twin" in caplog.text or reload.done(),
                             what="the reload's warning")
        assert not reload.done(), reload.exception() if not reload.cancelled() else "cancelled"
        assert f"pid {holder.proc.pid} (" in caplog.text
        # Nothing stopped for the switch meanwhile: both devices still run their previous definitions.
        assert {d: r.definition.fingerprint for d, r in service.runners.items()} == before
        reads = {d: r.reads for d, r in service.runners.items()}
        await async_wait_for(lambda: all(service.runners[d].reads > reads[d] + 3 for d in (A, B)),
                             what="a and b still reading")
        holder.release()
        async with asyncio.timeout(10):
            assert await reload
        assert set(service.runners) == {B} and service.runners[B].definition.fingerprint != before[B]
        assert "reload done: changed default/b; removed default/a" in caplog.text


async def test_a_reload_names_the_lock_holder_before_its_busy_timeout(tmp_path: Path, caplog, holder_of) -> None:
    """The reload's try of the write lock runs in the twin thread, behind the device loops'
    commits, each waiting twin.busy_timeout_ms (30 s as shipped) for the lock: the WARNING naming
    the holder came only after that, the operator seeing nothing meanwhile. A watcher on the event
    loop names the holder once the try has waited TWIN_LOCKED_RETRY_S: the WARNING comes while the
    holder still holds the lock (busy timeout ten minutes here; the wait's own timeout bounds the
    test), and the reload completes once it lets go."""
    from mapper.cli import reload_devices

    caplog.set_level(logging.INFO)
    config, devices = short_busy_config(tmp_path, ["a", "b"], busy_ms=600_000)
    async with running_service(config) as service:
        (devices / "a.yaml").unlink()
        holder = holder_of(Path(config.twin.path))
        reload = asyncio.create_task(reload_devices(service, config))
        try:
            await async_wait_for(lambda: "the reload waits for the twin" in caplog.text or reload.done(), timeout=30,
                                 what="the reload's warning")
            assert not reload.done(), reload.exception() if not reload.cancelled() else "cancelled"
            assert holder.proc.poll() is None  # still holding it
            warned = [r for r in caplog.records if "the reload waits for the twin" in r.getMessage()]
            assert warned[0].levelno == logging.WARNING and f"pid {holder.proc.pid} (" in warned[0].getMessage()
            assert set(service.runners) == {A, B}  # nothing switched yet
        finally:  # (the stop's twin writes wait for it too, ten minutes)
            holder.release()
        async with asyncio.timeout(10):
            assert await reload
        assert set(service.runners) == {B}
        assert "reload done: removed default/a" in caplog.text


async def test_a_desired_value_applied_while_the_twin_is_locked_is_recorded_once_released(
        tmp_path: Path, caplog, holder_of) -> None:
    """A desired value set just before another process took the twin's lock: the device loop writes
    it to the device, then cannot record it (its read-back's commit, mark_applied). That crashed the
    device loop ("device loop crashed"), which closed the device and restarted it after a back-off.
    Now the device keeps reading and the record is made once the lock is released."""
    caplog.set_level(logging.INFO)
    config, _ = short_busy_config(tmp_path, ["a"])
    async with running_service(config) as service:
        runner = service.runners[A]
        with TwinStore.open(config.twin.path) as twin:
            twin.set_desired(A, "power", True)
            holder = holder_of(Path(config.twin.path))  # (no await since the set: the mapper has not seen it)
            await async_wait_for(lambda: "cannot write the result of the desired value True of power" in caplog.text
                                 or "device loop crashed" in caplog.text, what="the record refused")
            assert "device loop crashed" not in caplog.text
            assert runner.driver._switch["power"][1] is True  # written to the device
            assert [c.property for c in twin.pending_desired()] == ["power"]
            reads = runner.reads
            await async_wait_for(lambda: runner.reads > reads + 3, what="the device still reading")
            holder.release()
            await async_wait_for(lambda: twin.pending_desired() == [], what="the value recorded as applied")
            assert twin.device(A).properties["power"].reported is True and twin.device(A).delta() == {}
    assert "device loop crashed" not in caplog.text
    assert caplog.text.count("applied desired value True") == 1  # written once, not again by a restarted loop


async def test_an_auto_off_while_the_twin_is_locked_becomes_the_desired_value_once_released(
        tmp_path: Path, caplog, holder_of) -> None:
    """A relay's auto-off fires while another process holds the twin's lock. Its read-back could not
    be committed, and the auto-off was dropped ("cannot commit the read-back yet; the desired value
    is left as it is"): the twin kept `on` desired, so the next restore (`initial: restore`) switched
    the relay on again. Now the off becomes the desired value once the lock is released."""
    from test_gpio import IO, RELAY, _relay_applied, cycles, twin_prop, wire_of, write_io

    caplog.set_level(logging.INFO)
    relay = "{pin: 18, direction: out, initial: restore, auto_off_s: 600}"
    devices = write_io(tmp_path / "dev", cycles(RELAY % relay, 50))
    path = write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db")
    path.write_text(path.read_text().replace("  batch_delay_ms: 5\n", "  batch_delay_ms: 5\n  busy_timeout_ms: 200\n"))
    config = load_config(path)
    async with running_service(config) as service:
        runner = service.runners[IO]
        with TwinStore.open(config.twin.path) as store:
            _, on_version = store.set_desired(IO, "relay", True)
        await async_wait_for(_relay_applied(config, True, on_version), what="relay on")
        holder = holder_of(Path(config.twin.path))
        wire = wire_of(runner.driver)
        wire.advance(601)  # the auto-off is due: it fires at the next read
        await async_wait_for(lambda: "cannot write relay's value False" in caplog.text
                             or "cannot commit the read-back yet" in caplog.text, what="the auto-off met the lock")
        assert wire.pin(18).level is False
        holder.release()
        await async_wait_for(_relay_applied(config, False, on_version + 1), what="off the desired value")
        assert twin_prop(config, "relay").desired_version == on_version + 1
    assert "device loop crashed" not in caplog.text


async def test_a_record_that_waits_for_the_twin_is_made_at_the_stop(
        tmp_path: Path, caplog, holder_of, monkeypatch) -> None:
    """The record of a desired value applied while another process held the twin's lock waits out
    its retry's back-off (up to loop.max_backoff_s). The lock released, a stop (or a reload that
    changes the device) meanwhile dropped it: the value stayed pending in the twin, and the next
    start wrote it to the device again (a relay with `initial: false` switched on by a restart).
    Now the stop makes the writes that wait, in order, before it closes the device."""
    caplog.set_level(logging.DEBUG, logger="mapper.device")
    config, _ = short_busy_config(tmp_path, ["a"])
    retried = "a twin write that waits still fails"
    async with running_service(config) as service:
        runner = service.runners[A]
        # The back-off not cut short by the twin's next commit (twin_takes_writes): the stop makes the record.
        monkeypatch.setattr(runner, "twin_takes_writes", lambda: None)
        with TwinStore.open(config.twin.path) as twin:
            _, version = twin.set_desired(A, "power", True)
            holder = holder_of(Path(config.twin.path))
            # Four failed retries: the next one is at least 4 s away (its back-off), past this stop.
            await async_wait_for(lambda: caplog.text.count(retried) >= 4, timeout=30, what="the record's retries")
            assert runner.driver._switch["power"][1] is True  # written to the device
            holder.release()
    with TwinStore.open(config.twin.path) as twin:
        assert twin.pending_desired() == []
        power = twin.device(A).properties["power"]
        assert (power.desired, power.desired_version, power.reported) == (True, version, True)


async def test_a_record_that_waited_out_a_long_lock_is_made_once_it_is_released(
        tmp_path: Path, caplog, holder_of, monkeypatch) -> None:
    """The record of a desired value applied while another process held the twin's lock sat out
    its retry's back-off, which grows up to loop.max_backoff_s (30 s as shipped) with a long lock:
    once the lock was released it waited for the rest of it. The back-off ends as soon as the twin
    commits again (here the device's readings). An hour's back-off here: the wait's own timeout
    bounds the test."""
    caplog.set_level(logging.DEBUG, logger="mapper.device")
    config, _ = short_busy_config(tmp_path, ["a"])
    retried = "a twin write that waits still fails"
    async with running_service(config) as service:
        runner = service.runners[A]
        monkeypatch.setattr(runner, "_backoff", lambda attempt: 3600.0)  # as after a long lock
        with TwinStore.open(config.twin.path) as twin:
            _, version = twin.set_desired(A, "power", True)
            holder = holder_of(Path(config.twin.path))
            await async_wait_for(lambda: retried in caplog.text, what="the record's first retry failed")
            assert runner.driver._switch["power"][1] is True  # written to the device
            holder.release()
            await async_wait_for(lambda: twin.pending_desired() == [], what="the value recorded as applied")
            power = twin.device(A).properties["power"]
            assert (power.desired_version, power.reported, power.apply_error) == (version, True, None)
            assert caplog.text.count(retried) == 1  # no try more: the back-off was cut short


async def test_a_success_starts_the_back_off_of_the_twin_writes_that_wait_over(tmp_path: Path, monkeypatch) -> None:
    """After a write that waited through many failed tries, the next write's first failure backed
    off as the many tries' next one (up to loop.max_backoff_s): a success starts it over."""
    config, _ = short_busy_config(tmp_path, ["a"])
    attempts: list[int] = []
    first_fails, second_fails = [3], [1]
    made: list[str] = []

    def write(name: str, fails: list[int]):  # noqa: ANN202
        async def made_or_refused() -> None:
            if fails[0]:
                fails[0] -= 1
                raise sqlite3.OperationalError("database is locked")
            made.append(name)
        return made_or_refused

    async with running_service(config) as service:
        runner = service.runners[A]
        monkeypatch.setattr(runner, "_backoff", lambda attempt: attempts.append(attempt) or 0.01)
        runner._write_later(write("first", first_fails))  # noqa: SLF001 - as the twin had refused them
        runner._write_later(write("second", second_fails))  # noqa: SLF001
        await async_wait_for(lambda: made == ["first", "second"], what="both writes made")
    assert attempts == [1, 2, 3, 1]


async def test_a_write_that_waits_and_fails_at_the_stop_does_not_end_the_stop(tmp_path: Path, caplog) -> None:
    """The stop's last try of the twin writes that wait: one that fails (here a bug) is said and
    dropped with those after it; the stop goes on, every device closed and the twin flushed."""
    caplog.set_level(logging.INFO)
    config, _ = short_busy_config(tmp_path, ["a", "b"])
    made: list[str] = []

    async def bug() -> None:
        raise RuntimeError("a bug in a twin write")

    async def after() -> None:
        made.append("after")

    async with running_service(config) as service:
        service.runners[A]._twin_writes.extend([bug, after])  # noqa: SLF001 - as the twin had refused them
    assert "default/a: stopping: 2 twin write(s) that waited are not made (RuntimeError: a bug in a twin write)" \
        in caplog.text
    assert made == [] and "twin flushed" in caplog.text


async def test_a_write_that_waits_and_fails_for_a_bug_crashes_the_device_loop_once(tmp_path: Path, caplog) -> None:
    """The twin writes that wait outlive a crash-restart of the device loop (they are made by the
    restarted loop). One that fails for something other than the twin's refusal (a bug) crashed
    the loop, and, still first in line, the restarted loop too, and so on for good, the device
    closed and opened again at each restart. It crashes the loop once, as the same bug does when
    the twin takes the write at once."""
    caplog.set_level(logging.ERROR, logger="mapper.service")
    config, _ = short_busy_config(tmp_path, ["a"])

    async def bug() -> None:
        raise RuntimeError("a bug in a twin write")

    async with running_service(config) as service:
        runner = service.runners[A]
        runner._write_later(bug)  # noqa: SLF001 - as the twin had refused it
        await async_wait_for(lambda: "device loop crashed" in caplog.text, what="the loop crashed")
        reads = runner.reads
        await async_wait_for(lambda: runner.reads > reads + 5 or caplog.text.count("device loop crashed") > 1,
                             timeout=30, what="the restarted loop reading, or crashing again")
        assert caplog.text.count("device loop crashed") == 1


def test_the_holder_is_read_from_proc_locks(tmp_path: Path, holder_of, monkeypatch) -> None:
    """lock_holder packed a 64-bit Linux struct flock for F_GETLK and said nothing on 32-bit Linux
    (armv7l Raspberry Pi OS): its lines named no holder there. It reads /proc/locks now, the same
    text on every architecture. (A C long of 4 bytes, as there: nothing depends on it now.)"""
    import struct

    from mapper.twin_disk import lock_holder

    calcsize = struct.calcsize
    monkeypatch.setattr(struct, "calcsize", lambda fmt: 4 if fmt == "l" else calcsize(fmt))

    twin = tmp_path / "twin.db"
    TwinStore.open(twin).close()
    assert lock_holder(twin) is None  # no lock held
    holder = holder_of(twin)
    named = lock_holder(twin)
    assert named is not None and named.startswith(f"pid {holder.proc.pid} (") and "BEGIN IMMEDIATE" in named
    holder.release()
    assert lock_holder(twin) is None


def test_the_lines_of_proc_locks_that_name_the_holder() -> None:
    """Only a POSIX or OFD write lock over the byte of that very file names a holder: not a read
    lock, another file (same inode on another device), a request waiting for the lock, an OFD
    lock without a pid. Lines as an armv7l Raspberry Pi's kernel writes them (SD card b3:02)."""
    import os

    from mapper.twin_disk import write_lock_pids

    device, inode = os.makedev(0xB3, 0x02), 131075
    locks = "\n".join([
        "1: POSIX  ADVISORY  READ  901 b3:02:131075 120 120",  # a read lock
        "2: POSIX  ADVISORY  WRITE 902 b3:01:131075 120 120",  # the boot partition's file
        "3: POSIX  ADVISORY  WRITE 903 b3:02:131076 120 120",  # another file
        "4: POSIX  ADVISORY  WRITE 904 b3:02:131075 121 130",  # other bytes
        "5: FLOCK  ADVISORY  WRITE 905 b3:02:131075 0 EOF",  # flock(), not SQLite's
        "6: OFDLCK ADVISORY  WRITE -1 b3:02:131075 0 EOF",  # no pid to name
        "7: POSIX  ADVISORY  WRITE 1234 b3:02:131075 120 120",
        "7: -> POSIX  ADVISORY  WRITE 1300 b3:02:131075 120 120",  # waits for 1234's
        "8: POSIX  ADVISORY  WRITE 1235 b3:02:131075 100 EOF",
        "not a lock line",
    ])
    assert write_lock_pids(locks, device, inode, 120) == [1234, 1235]
    assert write_lock_pids(locks, device, inode, 99) == []
