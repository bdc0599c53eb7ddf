"""One device's loop: collect every property on its cycle, apply desired values, track health.

Drivers never see the event loop: a blocking driver is called in a worker thread with a
timeout, so a 250 ms sensor read never delays another device. A device that fails
`failure_threshold` reads in a row is `unhealthy` (the detail includes the driver's
`health()` summary) and retried with capped, jittered backoff; it is `ok` again after its
first good read.

Besides the collectCycle poll, a driver can push (`Driver.changed`, from any thread): the
property is then read as soon as it has settled and recorded at once. A driver that sets a
writable property back by itself (`Driver.reverted`, a timed auto-off) makes that value the
new desired value (a new version, already applied), so the twin shows no delta and the old
desired value is never written again.

A desired value whose write fails (the driver raised: the device does not answer, refused the
write) is not applied: its error is stored on the twin and reported to the apply listeners
(the twin protocol's document and delta, DMI) at once, and the value stays pending there. It is
written again: as soon as the device's state turns `ok` again, on a back-off of its own (the
device's retry back-off, capped by `loop.max_backoff_s`: a device that stays broken gets one
write attempt per property every 15 to 30 s by default), after a reload, and at the next start
(a pending value is applied there, never replaced by a boot value). A retry that fails again
with the same error changes nothing in the twin and tells no listener again. A value the
device's definition refuses (out of range, a property removed), or the driver refuses for good
(`WriteError(retryable=False)`), is not retried: it can never be written. A write whose read-back differs is written, not retried; its error goes once a later
reading equals the desired value (TwinStore's fold).

At start (and after every re-open) a writable property with a `boot_value` (a GPIO output's
`initial`) starts in that state, and a desired value that was already applied before is
*not* re-applied: it is replaced by the boot value as a new desired version, so the twin
tells the truth and a relay never switches itself on after a restart or a power cut. A
desired value not applied yet (set while the mapper was down, one whose write failed, or the
YAML's `desired` of a new or changed device) is applied as usual.

A property whose driver says `restore_desired` (opt-in: a GPIO output's `initial: restore`, a
driver whose hardware forgets a setting when opened) is the exception: after every open, before
its first read, the twin's last desired value, applied before or not, is written and read back as
any desired value (an applied one becomes pending again first, as a new version), so the device
comes back as it was asked to be and the twin shows no delta; a write that fails stays pending.
A value refused for good (out of range, WriteError(retryable=False): its apply error says so) is
left as it is: not written again at each open as a new version. A restored value the driver sets
back by itself after a while (`Driver.time_limit`: a GPIO output's auto_off_s) does not get that
time again at each open, or a device loop (or mapper) restarting faster than it would keep a relay
on for good: the new version keeps the time the value was set (desired_ts, wall clock: restarts lose
the monotonic one), the value is written with what is left of the limit counted from then
(`Driver.write_for`), and with nothing left it is not written: the property stays at its boot value,
which becomes the desired value, as the driver's own auto-off does. A clock behind that time (a Pi
without a real-time clock before its time sync) cannot tell how long it has been: nothing is left.

The twin writes of a start (the boot-state reset, the new version of a restored value) never stop
the device from starting: while the twin cannot be written (another process holds its lock past
its busy timeout, a full disk) the device reads as usual (its readings wait in the recorder), a
restored value is written to the device at once from the twin's desired value (a read, which needs
no write lock), and those twin writes are retried in the background, in that order, until they
succeed or the runner stops. The late boot-state reset replaces only a desired version that was
there at the start: one set and applied since is the device's state, not a value from before.
Likewise the record of a desired value's result (applied, or its write failed) and a value the
driver set back by itself (an auto-off) as the new desired value: made, and told to the apply
listeners, once the twin takes writes, in order after those (the first used to crash and restart
the device loop; the second was dropped, and `initial: restore` switched the relay on again).
The device's stop (a mapper stop, a reload) makes those still waiting, once more, in order
(`write_what_waits`): a stop during their retry's back-off used to drop them.

Readings outside the model's minimum/maximum, or outside the driver's `rated_range`, are
recorded `out_of_range`. A calibrated property's reading (PropertyDefinition.calibration) is
calibrated first: the minimum/maximum are checked on it, the rated range on the raw value; a desired
value goes to the driver through the inverse, and a value the driver gives by itself (a boot value,
a revert) is calibrated as its readings are.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import DriverError, DriverTimeout, NotReady, WriteError
from devices.ids import DeviceId, shown
from devices.values import Value, coerce, range_problem
from mapper.config import DeviceLoopSettings
from mapper.logs import Throttle, duration, held_note, utc
from mapper.ticks import next_tick, sleep_until
from twin.records import ERROR, GOOD, OUT_OF_RANGE, AdminLock, PropertyTwin, Reading
from twin.store import DesiredChange, NotWritable, TwinStore, UnknownProperty, VersionConflict

log = logging.getLogger("mapper.device")
# The twin's apply_error of a desired value refused for good (never written, not retried): a restore
# at open leaves such a value as it is (_desired_to_restore).
NOT_WRITTEN = "write failed: not written: "
REFUSED_BY_DRIVER = "write refused by the driver: "
# Out-of-range readings: one line per property a minute at most (a sensor stuck at 255 reads every cycle).
_out_of_range_log = Throttle(burst=1, interval_s=60.0)

UNKNOWN = "unknown"  # no state yet: not opened, or no read decided one since the start
OK = "ok"
UNHEALTHY = "unhealthy"
OFFLINE = "offline"

StateCallback = Callable[[DeviceDefinition, str, str | None], Awaitable[None]]
# (change, error); `pending=True` (keyword, given only then): the write failed, the value stays pending.
AppliedCallback = Callable[..., Awaitable[None]]
# Runs a function in the twin's thread (MapperService.twin).
TwinCall = Callable[[Callable[[TwinStore], Any]], Awaitable[Any]]

# A change-driven read waits this much longer than the driver's settle time, so it never
# lands a hair before the debounce window ends (timer and clock resolution).
SETTLE_MARGIN_S = 0.002


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class StuckCall:
    """A blocking driver call still running in its thread after its runner let go of the device
    (a reload, a stop): a thread stuck in a driver cannot be stopped. The service keeps one per
    device (MapperService.stuck_calls), so the device's next runner makes no call meanwhile:
    it used to start a driver instance whose first read got stuck too, one thread more per reload."""

    call: concurrent.futures.Future[Any]
    since: float  # when it started (the event loop's clock)


@dataclasses.dataclass(frozen=True, slots=True)
class OnDemand:
    """What an on-demand read (read_on_demand) came to."""

    reading: Reading
    # Answered with the property's last reading, taken less than loop.on_demand_min_interval_s
    # before: the device was not read again, and nothing was recorded again.
    recent: bool = False
    # The device did not answer in time, or the previous call to its driver still runs (DriverTimeout).
    timed_out: bool = False


class DeviceRunner:
    def __init__(
        self,
        definition: DeviceDefinition,
        driver: Driver,
        record: Callable[[Reading], None],
        *,
        settings: DeviceLoopSettings,
        on_state: StateCallback,
        on_applied: AppliedCallback,
        twin: TwinCall | None = None,
        flush: Callable[[], Awaitable[None]] | None = None,
        record_on_demand: Callable[[Reading], None] | None = None,
        stuck_calls: dict[DeviceId, StuckCall] | None = None,
        replaces: str | None = None,
    ) -> None:
        """`replaces`: the state of the runner this one takes over from (a reload that changed the
        device), which its first state change names: `was unknown` read as if it had not been known."""
        self.definition = definition
        self._flush = flush  # commit the readings recorded so far (the recorder's flush)
        self.driver = driver
        self._record = record
        # Records a reading someone asked for (read_once(on_demand=True)): not the device's own sampling.
        self._record_on_demand = record_on_demand or record
        self._settings = settings
        self._on_state = on_state
        self._on_applied = on_applied
        self.state = UNKNOWN
        self._replaced_state = replaces
        self.failures = 0
        self.reads = 0
        self.read_errors = 0
        # Reads whose collect slot passed because the previous round (or the wake-up) came too
        # late: readings never taken, counted so that an overloaded mapper shows it.
        self.missed_reads = 0
        # The loop's clock (time.monotonic) at the last reading of good quality (a metric's age: mapper/metrics.py).
        self.last_good_at: float | None = None
        self._inflight: asyncio.Future[Any] | None = None
        self._thread: DriverThread | None = None  # a blocking driver's calls run here, one at a time
        self._inflight_since = 0.0  # when the call in `_inflight` started (the loop's clock)
        self._inflight_call: concurrent.futures.Future[Any] | None = None  # its thread's side
        # Calls of earlier runners of a device still stuck in its driver (see StuckCall), shared by the service.
        self._stuck_calls = stuck_calls if stuck_calls is not None else {}
        self._desired: dict[str, DesiredChange] = {}
        self._desired_seen: dict[str, int] = {}
        self._desired_event = asyncio.Event()
        self._io_lock = asyncio.Lock()
        self._opened = False
        # Set once the driver's first open() attempt has returned, opened or not (systemd READY waits for it).
        self.first_open_done = asyncio.Event()
        self._twin = twin
        # Change-driven reads: settle timers per property, then the properties due for a read.
        self._settling: dict[str, asyncio.TimerHandle] = {}
        self._changed: dict[str, PropertyDefinition] = {}
        self._changed_event = asyncio.Event()
        # Values the driver set back by itself, waiting to become desired values.
        self._reverts: dict[str, tuple[PropertyDefinition, Any, str]] = {}
        # Desired values whose write failed, per property: (the change, its error, failed attempts);
        # pending in the twin and written again (see _retry_failed), each on a timer of its own.
        self._failed_writes: dict[str, tuple[DesiredChange, str, int]] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._in_hand: dict[str, DesiredChange] = {}  # the apply loop's batch: being written, or next
        # Per property, the desired version a restore made and when its value was set (desired_ts, ms):
        # a driver's time limit counts from then (see _time_left).
        self._restored: dict[str, tuple[int, int | None]] = {}
        # Twin writes the twin refused (another process's lock, a full disk), retried in order in
        # the background (_twin_writes_later); kept across a crash-restart of the loop.
        self._twin_writes: list[Callable[[], Awaitable[None]]] = []
        self._twin_writes_task: asyncio.Task[None] | None = None
        # Set when the twin commits again after failed commits (twin_takes_writes): ends their back-off.
        self._twin_writable = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._rated = {p.name: driver.rated_range(p) for p in definition.properties}
        # Per property, its last reading of any kind: (the loop's clock then, the reading, timed out).
        self._last_read: dict[str, tuple[float, Reading, bool]] = {}

    @property
    def id(self):  # noqa: ANN201 - DeviceId
        return self.definition.id

    # -- driver calls ----------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A driver call; whatever it raises that is no Exception (a binding's own BaseException, a
        library's sys.exit) is a DriverError of this device, never the end of the mapper's tasks."""
        try:
            return await self._call_driver(fn, *args)
        except (Exception, asyncio.CancelledError):
            raise
        except BaseException as exc:  # noqa: BLE001 - the driver's, not ours: a failed call
            raise DriverError(f"{self.id}: the driver raised {_raised(exc)}") from exc

    async def _call_driver(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.driver.blocking:
            return fn(*args)
        if (stuck := self._stuck()) is not None:
            raise DriverTimeout(stuck)
        if self._thread is None:
            self._thread = DriverThread(f"driver[{self.id}]")
        self._inflight_call = self._thread.submit(fn, *args)
        future = asyncio.wrap_future(self._inflight_call)
        self._inflight, self._inflight_since = future, asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.driver.timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DriverTimeout(f"{self.id}: no answer within {self.driver.timeout_s:g} s") from None

    def _stuck(self) -> str | None:
        """Why no driver call can be made now (one is still stuck in the driver), or None.

        Each call runs one at a time in the device's thread, and a stuck one cannot be stopped: a
        new call would only queue behind it, or (a new runner's) get stuck in a thread of its own."""
        if self._inflight is not None and not self._inflight.done():
            since, whose = self._inflight_since, "its previous call"
        elif (earlier := self._stuck_calls.get(self.id)) is not None:
            if earlier.call.done():
                del self._stuck_calls[self.id]
                return None
            since, whose = earlier.since, "a call of its driver from before the device was restarted (a reload)"
        else:
            return None
        age = asyncio.get_running_loop().time() - since
        return (f"{self.id}: {whose} has not returned yet, stuck in the {self.definition.protocol} driver for"
                f" {age:.0f} s; no other call is made until it returns (a slow device: it may yet); if it never returns,"
                " fix the driver (or its bus), then restart the mapper")

    async def _open(self) -> None:
        attempt = 0
        late: asyncio.Future[Any] | None = None  # an open() that timed out, still running in its thread
        while True:
            before = self._inflight
            try:
                if late is not None and late.done() and not late.cancelled() and late.exception() is None:
                    pass  # it did open, after all: opened again, the hardware would be claimed twice
                else:
                    async with self._io_lock:
                        await self._call(self.driver.open)
                self._opened = True
                self.first_open_done.set()
                return
            except Exception as exc:  # noqa: BLE001 - any driver failure: report, back off, retry
                if self._inflight is not before and self._inflight is not None and not self._inflight.done():
                    late = self._inflight
                attempt += 1
                await self._set_state(OFFLINE, f"cannot open: {exc}")
                self.first_open_done.set()
                await asyncio.sleep(self._backoff(attempt))

    async def close_when_idle(self) -> None:
        """close(), once a driver call still running in its thread has returned. A cancelled read
        or open goes on there: a DHT sensor opened after close() would hold its GPIO pin for good.
        A call that outlives its timeout (plus a second) does not hold the close back for ever,
        and a blocking driver's close() runs in a thread too (the DHT driver's waits for a read in
        progress): the event loop, and every other device, never waits for a stuck bus."""
        grace = self.driver.timeout_s + 1.0
        future = self._inflight
        if future is not None and not future.done():
            # Counted from the call's start: a call stuck for an hour is not waited for again.
            left = self._inflight_since + grace - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(0.0, left)):
                    await asyncio.shield(future)
            except TimeoutError:
                if self._inflight_call is not None:
                    self._stuck_calls[self.id] = StuckCall(self._inflight_call, self._inflight_since)
                log.warning("%s: a driver call still runs %g s after it started, stuck in the %s driver; closing"
                            " the driver anyway. The device makes no other call until it returns: fix the"
                            " driver, then restart the mapper", self.id, grace, self.definition.protocol)
            except BaseException:
                if not future.done():  # this close cancelled, not the call's outcome
                    raise
                # The call's own failure (a binding's BaseException too, BusPanic): nobody waits for
                # its result any more. Let out, it ended the stop in the service's task group.
        self._detach()
        if not self.driver.blocking:
            self._close_driver()
            return
        closing = asyncio.wrap_future(DriverThread(f"close[{self.id}]", once=True).submit(self._close_driver))
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(closing)
        except TimeoutError:
            log.warning("%s: the driver's close() still runs %g s on; going on without it", self.id, grace)

    def close(self) -> None:
        """Close at once, on the event loop (at shutdown; a stopping device uses close_when_idle)."""
        self._detach()
        self._close_driver()

    def _detach(self) -> None:
        if self._thread is not None:
            self._thread.stop()  # once the call it may still be in returns; it never holds up the exit
            self._thread = None
        self.driver.on_change = self.driver.on_revert = None
        for handle in (*self._settling.values(), *self._retries.values()):
            handle.cancel()
        self._settling.clear()
        self._retries.clear()  # (failed values stay in _failed_writes: a restarted run() retries them)

    def _close_driver(self) -> None:
        try:
            self.driver.close()
        except BaseException as exc:  # noqa: BLE001 - closing must not stop the other devices closing
            log.warning("%s: error while closing the driver: %s", self.id, _raised(exc))

    # -- health ----------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base = min(self._settings.max_backoff_s, 0.5 * 2 ** min(attempt, 16))
        return random.uniform(base / 2, base)

    async def _set_state(self, state: str, detail: str | None = None) -> None:
        if state != self.state:
            previous, self.state = self.state, state
            if previous == UNKNOWN and self._replaced_state is not None:
                previous = f"{self._replaced_state} before a reload changed the device"
            self._replaced_state = None
            if state == OK:
                log.info("%s: state %s (was %s)", self.id, state, previous)
                if self._failed_writes:  # the device answers again: what it could not take is written now
                    self.retry_failed_desired()
            else:
                log.warning("%s: state %s: %s", self.id, state, detail)
            await self._on_state(self.definition, state, detail)

    async def _succeeded(self) -> None:
        self.failures = 0
        if self.state != OK:
            await self._set_state(OK)

    async def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.read_errors += 1
        log.debug("%s: read failed (%d in a row): %s", self.id, self.failures, exc)
        if self.failures >= self._settings.failure_threshold:
            await self._set_state(UNHEALTHY, self._unhealthy_detail(exc))

    def _unhealthy_detail(self, exc: BaseException) -> str:
        """`3 failures in a row (checksum 2, incomplete 1 since the last good measurement); last: ...`."""
        try:
            summary = self.driver.health()
        except BaseException as health_exc:  # noqa: BLE001 - a broken health() must not hide the failure
            summary = f"health() failed: {_raised(health_exc)}"
        summary = "" if not summary or summary == OK else f" ({summary})"
        return f"{self.failures} failures in a row{summary}; last: {exc}"

    # -- loops -----------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.driver.on_change = lambda prop, settle_s: _soon(loop, self._note_change, prop, settle_s)
        self.driver.on_revert = lambda prop, value, reason: _soon(loop, self._note_revert, prop, value, reason)
        await self._open()
        deferred = self._twin_writes  # start-time twin writes the twin refused, after those still waiting
        try:
            await self._sync_boot_values()
        except (sqlite3.Error, OSError) as exc:
            deferred.append(await self._boot_values_later(exc))
        if self._failed_writes:  # a crash-restart of this loop: the failed values' timers went with it
            self.retry_failed_desired()
        try:
            await self._restore_desired()
        except (sqlite3.Error, OSError) as exc:
            deferred.append(await self._restore_desired_unwritable(exc))
        by_cycle: dict[int, list[PropertyDefinition]] = {}
        for prop in self.definition.properties:
            by_cycle.setdefault(prop.collect_cycle_ms, []).append(prop)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for cycle_ms, props in by_cycle.items():
                    tg.create_task(self._collect(cycle_ms, props), name=f"collect[{self.id}/{cycle_ms}ms]")
                tg.create_task(self._apply_loop(), name=f"apply[{self.id}]")
                tg.create_task(self._change_loop(), name=f"changes[{self.id}]")
                if deferred:
                    self._twin_writes_task = tg.create_task(self._twin_writes_later(), name=f"twin-writes[{self.id}]")
        finally:
            self._tg = self._twin_writes_task = None

    # -- start-time twin writes while the twin cannot be written ------------------------------

    def _twin_unwritable(self, what: str, exc: BaseException) -> None:
        log.warning("%s: cannot write %s into the twin (%s); the device reads on meanwhile (its readings wait in"
                    " memory) and the write is retried until the twin takes it", self.id, what, exc)

    async def _boot_values_later(self, exc: BaseException) -> Callable[[], Awaitable[None]]:
        """The boot-state reset the twin refused (another process's lock, a full disk): done once it
        can be written, for the desired versions there now only (read: a read needs no write lock). A
        value this run applies meanwhile is the device's state, not one from before the start."""
        self._twin_unwritable("the reset of its writable properties to their boot state", exc)
        assert self._twin is not None
        device_id = self.id
        properties = await self._twin(lambda s: s.device(device_id).properties)
        versions = {name: prop.desired_version for name, prop in properties.items()}
        return lambda: self._sync_boot_values(versions)

    async def _restore_desired_unwritable(self, exc: BaseException) -> Callable[[], Awaitable[None]]:
        """The restore (Driver.restore_desired) when the twin cannot be written: the twin's desired
        values are read (a read needs no write lock) and written to the device now, before its first
        read; the new versions, and the write and read-back that record them, once the twin takes writes."""
        self._twin_unwritable("the restored desired values as new versions", exc)
        assert self._twin is not None
        names = [p.name for p in self.definition.properties if p.writable and self.driver.restore_desired(p)]
        device_id = self.id
        properties = await self._twin(lambda s: s.device(device_id).properties)
        for name in names:
            prop = properties.get(name)
            if prop is None or prop.desired is None or (
                    prop.apply_error and prop.apply_error.startswith((NOT_WRITTEN, REFUSED_BY_DRIVER))):
                continue
            try:
                value = self.definition.desired_value(name, prop.desired)
                definition = self.definition.prop(name)
                left, spent = self._time_left(definition, value, prop.desired_ts)
                if spent is not None:
                    log.warning("%s/%s: the desired value %s is %s; its boot value becomes the desired value once"
                                " the twin takes writes", self.id, name, shown(prop.desired, 200), spent)
                    continue
                async with self._io_lock:
                    await self._write(definition, value, left)
            except Exception as write_exc:  # noqa: BLE001 - written again with the new version, its error recorded then
                log.warning("%s/%s: restoring the desired value %s failed: %s; written again once the twin takes"
                            " writes", self.id, name, shown(prop.desired, 200), write_exc)
            else:
                log.info("%s/%s: restored the desired value %s after the open (its new version once the twin"
                         " takes writes)", self.id, name, shown(prop.desired, 200))
        return lambda: self._restore_desired(queue=True)

    def _write_later(self, write: Callable[[], Awaitable[None]]) -> None:
        """A twin write the twin refused, made once it takes writes, after those waiting before it."""
        self._twin_writes.append(write)
        if self._tg is not None and (self._twin_writes_task is None or self._twin_writes_task.done()):
            self._twin_writes_task = self._tg.create_task(self._twin_writes_later(), name=f"twin-writes[{self.id}]")

    def twin_takes_writes(self) -> None:
        """The twin committed again after failed commits (another process let its lock go, the disk
        has room): the twin writes that wait are tried now, not at the end of their back-off."""
        self._twin_writable.set()

    async def _twin_writes_later(self) -> None:
        """Retry the twin writes the twin refused (the start's, a desired value's result), in
        order, until each succeeds (or the runner stops: what is left is kept for its next run).

        Each failed try backs off (up to loop.max_backoff_s), cut short once the twin commits again
        (twin_takes_writes): after a long lock the records waited up to that long after its release.
        A success starts the back-off over: the next write that fails is tried again soon."""
        attempt = 0
        writes = self._twin_writes
        while writes:
            self._twin_writable.clear()  # (a commit from now on ends the back-off after this try)
            try:
                await writes[0]()
            except (sqlite3.Error, OSError) as exc:
                attempt += 1
                log.debug("%s: a twin write that waits still fails (%s); retried", self.id, exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._backoff(attempt)):
                        await self._twin_writable.wait()
                continue
            except Exception:
                writes.pop(0)  # a bug crashes the loop once, not each restarted one (the queue outlives it)
                raise
            writes.pop(0)
            attempt = 0
        log.info("%s: the twin writes that waited are done, the twin takes writes again", self.id)

    async def write_what_waits(self) -> None:
        """At the runner's stop (its loop ended): the twin writes that wait, tried once more, in order.
        The twin may take writes again while they sit out their retry's back-off (up to
        loop.max_backoff_s); a stop dropped them then: a desired value written to the device stayed
        pending in the twin, and the next start wrote it again. What the twin still refuses is lost."""
        writes = self._twin_writes
        self._twin_writes_task = asyncio.current_task()  # (as _twin_writes_later: what they do is done in turn)
        try:
            while writes:
                try:
                    await writes[0]()
                except Exception as exc:  # noqa: BLE001 - the stop goes on (a bug in one: not the stop's end)
                    log.warning("%s: stopping: %d twin write(s) that waited are not made (%s)", self.id, len(writes),
                                f"{type(exc).__name__}: {exc}")
                    writes.clear()
                    return
                writes.pop(0)
        finally:
            self._twin_writes_task = None

    async def read_once(self, prop: PropertyDefinition, *, on_demand: bool = False) -> Reading:
        """`on_demand`: someone asked (REST, DMI GetDevice) and records the reading; if they give up
        meanwhile, it is still recorded as one taken on demand (see _keeping)."""
        return (await self._read(prop, on_demand))[0]

    async def _read(self, prop: PropertyDefinition, on_demand: bool = False,
                    recent_within_s: float | None = None) -> tuple[Reading, bool, bool]:
        """read_once's work: (reading, recent, timed out). `recent_within_s`: if the property's last
        reading (any) was taken less than that long ago, once the device's lock is ours, it is the
        answer (recent) and the device is not read: on-demand reads waiting behind one another are
        answered by the first. The collect loop calls this directly: a plain tuple, no coroutine or
        object more per reading."""
        try:
            async with self._io_lock:
                if recent_within_s is not None and (last := self._last_read.get(prop.name)) is not None \
                        and time.monotonic() - last[0] < recent_within_s:
                    return last[1], True, last[2]
                raw = await self._call(self.driver.read, prop)
            taken = now_ms()
            try:
                value = coerce(prop.type, raw)
            except ValueError as exc:  # the driver's bug, or the model's type: say whose value it was
                raise ValueError(f"{self.id}: the {self.definition.protocol} driver's read of {prop.name} returned"
                                 f" {shown(raw, 100)}, not a {prop.type.value}: {exc}") from None
        except NotReady as exc:  # no value yet, and not a failure of its own (the last attempt was one)
            reading = Reading(self.id, prop.name, None, now_ms(), ERROR, str(exc))
            self._last_read[prop.name] = (time.monotonic(), reading, False)
            return reading, False, False
        except Exception as exc:  # noqa: BLE001 - driver errors of any kind count as a failed read
            reading = Reading(self.id, prop.name, None, now_ms(), ERROR, str(exc))
            timed_out = isinstance(exc, DriverTimeout)
            self._last_read[prop.name] = (time.monotonic(), reading, timed_out)
            await self._keeping(reading, self._failed(exc), on_demand)
            return reading, False, timed_out
        self.reads += 1
        raw = value
        if prop.calibration is not None:  # (the one test a property without one costs)
            value = prop.calibration.reading(value)
        why = range_problem(value, prop.minimum, prop.maximum)
        rated = self._rated.get(prop.name)
        if why is None and rated is not None and range_problem(raw, *rated):
            why = (f"{value} is outside the sensor's rated range {rated[0]:g} to {rated[1]:g}" if raw is value else
                   f"{value} (raw {raw}) is outside the sensor's rated range {rated[0]:g} to {rated[1]:g} (raw)")
        reading = Reading(self.id, prop.name, value, taken, OUT_OF_RANGE if why else GOOD, why)
        if why is not None and (held := _out_of_range_log((self.id, prop.name))) is not None:
            log.warning("%s: %s: %s: recorded and published with quality out_of_range, not as its value "
                        "(is the sensor failing, or the model's range too narrow?)%s", self.id, prop.name, why,
                        held_note(held))
        self._last_read[prop.name] = (now := time.monotonic(), reading, False)
        if why is None:
            self.last_good_at = now
        if self.failures or self.state != OK:  # (the hot path of a healthy device awaits nothing here)
            await self._keeping(reading, self._succeeded(), on_demand)
        return reading, False, False

    async def read_on_demand(self, prop: PropertyDefinition) -> OnDemand:
        """A read someone asked for (REST GET, DMI GetDevice), recorded as one taken on demand whatever
        came of it: a good value, one outside the range, or a failure with its detail (the twin's quality
        shows it, as for the collect loop's reads; never an inference window step). Recorded here on
        the loop, in the same step as read_once returns: a caller that gave up at that moment (REST's
        504) does not lose it, and nobody records it twice. Cancelled before the device answered, there
        is no reading to record (and one taken meanwhile is recorded by read_once, see _keeping).

        At most one a `loop.on_demand_min_interval_s` per property reads the device: one within that
        long of the property's last reading of any kind (the collect loop's too) is answered with it,
        `recent`, and records nothing (it was recorded when taken). A client polling as fast as it can
        neither reads a sensor faster than it allows (a DHT11: once a second) nor fills the twin's
        history, shared by all devices, with rows of one property."""
        interval = self._settings.on_demand_min_interval_s
        reading, recent, timed_out = await self._read(prop, True, interval if interval > 0 else None)
        answer = OnDemand(reading, recent=recent, timed_out=timed_out)
        if not answer.recent:
            self._record_on_demand(answer.reading)
        return answer

    async def _keeping(self, reading: Reading, state_update: Awaitable[None], on_demand: bool) -> None:
        """Await a state update (a change waits for the twin). If the read is cancelled meanwhile (the
        device stopped, or a DMI/REST caller gave up), the reading already taken is still recorded,
        not dropped: every caller records it only once read_once returns, so never twice. One taken on
        demand is recorded as such (recorded as the device's own sampling, it became an inference window step)."""
        try:
            await state_update
        except asyncio.CancelledError:
            (self._record_on_demand if on_demand else self._record)(reading)
            raise

    async def _collect(self, cycle_ms: int, props: list[PropertyDefinition]) -> None:
        """Read the properties that share a cycle, one after another, once per cycle.

        One timer per device and cycle, not per property; and cycles are aligned to multiples
        of their length on the loop's clock, so devices with the same cycle wake together:
        a Pi with 20 sensors at 1 Hz wakes once a second, not 20 times.
        """
        loop = asyncio.get_running_loop()
        cycle = cycle_ms / 1000
        slot: float | None = None  # the grid slot this round was for
        while True:
            for prop in props:
                self._record((await self._read(prop))[0])
            now = loop.time()
            if self.state == UNHEALTHY:
                slot = None
                await asyncio.sleep(max(cycle, self._backoff(self.failures)))
            else:  # the next slot of the grid; a read that overran its cycle skips the missed slots
                due = next_tick(now, cycle)
                if slot is not None:
                    self.missed_reads += max(0, round((due - slot) / cycle) - 1) * len(props)
                slot = due
                await sleep_until(due)

    # -- change-driven reads ---------------------------------------------------------------

    def _note_change(self, prop: PropertyDefinition, settle_s: float) -> None:
        """On the loop: (re)start the property's settle timer; every new change restarts it."""
        handle = self._settling.pop(prop.name, None)
        if handle is not None:
            handle.cancel()
        if settle_s <= 0:
            self._change_due(prop)
        else:
            loop = asyncio.get_running_loop()
            self._settling[prop.name] = loop.call_later(settle_s + SETTLE_MARGIN_S, self._change_due, prop)

    def _change_due(self, prop: PropertyDefinition) -> None:
        self._settling.pop(prop.name, None)
        self._changed[prop.name] = prop
        self._changed_event.set()

    async def _change_loop(self) -> None:
        while True:
            await self._changed_event.wait()
            self._changed_event.clear()
            due, self._changed = self._changed, {}
            for prop in due.values():
                self._record((await self._read(prop))[0])

    # -- desired values --------------------------------------------------------------------

    def submit_desired(self, change: DesiredChange) -> None:
        """Queue a desired value (already validated by the twin) for the driver."""
        if change.version <= self._desired_seen.get(change.property, 0):
            return
        self._desired_seen[change.property] = change.version
        self._desired[change.property] = change
        self._forget_failed(change.property, change.version)
        self._desired_event.set()

    def retry_failed_desired(self) -> None:
        """Write the desired values whose write failed again, now (the device is `ok` again, a reload)."""
        for name in list(self._failed_writes):
            self._cancel_retry(name)
            self._retry_failed(name)

    def _cancel_retry(self, name: str) -> None:
        handle = self._retries.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _retry_failed(self, name: str) -> None:
        """On the loop: queue a failed desired value again, unless a newer one replaced it."""
        self._retries.pop(name, None)
        entry = self._failed_writes.get(name)
        if entry is None or name in self._desired or name in self._in_hand:
            # A value queued, or being written right now (the device turned `ok` during its own
            # retry's read-back), is this change or a newer one: its result settles the failed one
            # (written: forgotten; failed again: a new retry timer). Queued again, it was written twice.
            return
        change = entry[0]
        if self._desired_seen.get(name, 0) > change.version:
            self._forget_failed(name, self._desired_seen[name])
            return
        self._desired[name] = change
        self._desired_event.set()

    def _forget_failed(self, name: str, newer_than: int) -> None:
        """A failed value older than version `newer_than` is not written again (a newer one was set)."""
        entry = self._failed_writes.get(name)
        if entry is not None and entry[0].version < newer_than:
            del self._failed_writes[name]
            self._cancel_retry(name)

    def _write_failed(self, change: DesiredChange, error: str) -> bool:
        """Keep a desired value whose write failed, to write it again after a back-off. Whether the
        result is news (a first failure, or another error) for the twin and the apply listeners."""
        name = change.property
        before = self._failed_writes.get(name)
        same = before is not None and before[0].version == change.version
        attempts = before[2] + 1 if same else 1
        self._failed_writes[name] = (change, error, attempts)
        self._cancel_retry(name)
        delay = self._backoff(attempts)
        self._retries[name] = asyncio.get_running_loop().call_later(delay, self._retry_failed, name)
        news = not same or before[1] != error
        (log.warning if news else log.debug)(
            "%s/%s: %s; desired value %s (version %d) kept pending: written again in %.1f s (attempt %d)%s",
            self.id, name, error, shown(change.value, 200), change.version, delay, attempts,
            "" if self.state == OK else ", or as soon as the device is ok again")
        return news

    async def _apply_loop(self) -> None:
        while True:
            await self._desired_event.wait()
            self._desired_event.clear()
            pending, self._desired = self._desired, {}
            reverts, self._reverts = self._reverts, {}
            written = set(pending)
            self._in_hand = pending
            try:
                for name in list(pending):
                    await self._apply(pending[name])
                    del pending[name]
            finally:
                self._in_hand = {}
            for name, (prop, value, reason) in reverts.items():
                if name in written or name in self._desired:
                    continue  # a newer desired value was written (or is about to be): it wins
                await self._revert(prop, value, reason)

    def _note_revert(self, prop: PropertyDefinition, value: Any, reason: str) -> None:
        """On the loop: the driver set `prop` back by itself (to `value`, raw); handled in the apply loop, in order."""
        self._reverts[prop.name] = (prop, _calibrated(prop, value), reason)
        self._desired_event.set()

    async def _revert(self, prop: PropertyDefinition, value: Any, reason: str) -> None:
        """Make the value the driver set by itself the desired value (a new version, already applied).
        A ReadOnly property has no desired value (the twin refuses one): its read-back is recorded,
        nothing more (storing one raised NotWritable, which crashed and restarted the device loop)."""
        last = await self._twin_before() if prop.writable else {}
        reading = await self.read_once(prop)
        self._record(reading)
        if not prop.writable:
            log.info("%s/%s: %s; ReadOnly, so only the reading %r is recorded", self.id, prop.name, reason,
                     reading.value)
            return
        if reading.quality != GOOD or reading.value != value:
            log.warning("%s/%s: %s, but the read-back is %r; the desired value is left as it is",
                        self.id, prop.name, reason, reading.value)
            return
        if self._twin is None:
            return
        expected = self._desired_seen.get(prop.name, 0)
        store = functools.partial(self._store_revert, prop, value, reason, last.get(prop.name), expected)
        if self._twin_writes:  # after the twin writes that wait: in order
            self._write_later(store)
            return
        try:
            await store()
        except (sqlite3.Error, OSError) as exc:
            # The twin refused it (another process's lock, a full disk): made once it takes writes. It
            # used to be dropped (the read-back's commit) or to crash the loop (the desired value's),
            # leaving the old value desired: a relay an auto-off had switched off was switched on
            # again by the next restore (`initial: restore`).
            self._twin_unwritable(f"{prop.name}'s value {value!r} ({reason}) as its desired value", exc)
            self._write_later(store)

    async def _store_revert(self, prop: PropertyDefinition, value: Any, reason: str, last: PropertyTwin | None,
                            expected: int) -> None:
        """_revert's twin writes: the read-back committed first, then the desired value, so the twin
        never shows the new desired version next to the old reported value."""
        if self._flush is not None:
            await self._flush()
        assert self._twin is not None
        try:
            version = await self._twin(
                lambda s: _store_applied_desired(s, self.id, prop.name, value, expected_version=expected))
        except VersionConflict:
            log.info("%s/%s: %s, but a newer desired value is waiting; it is applied next", self.id, prop.name, reason)
            return
        except NotWritable:  # the twin's model says ReadOnly (a reload changed it meanwhile): likewise
            log.info("%s/%s: %s (ReadOnly in the twin: reported, no desired value)", self.id, prop.name, reason)
            return
        log.warning("%s/%s: %s: desired value is now %r (version %d)", self.id, prop.name, reason, value, version)
        await self._settled_desired(prop.name, value, version, last)

    async def _settled_desired(self, name: str, value: Any, version: int, last: PropertyTwin | None) -> None:
        """A desired version stored as applied already: its record and listeners (later, in order,
        if the twin refuses it now)."""
        self._desired_seen[name] = max(version, self._desired_seen.get(name, 0))
        self._forget_failed(name, version)
        change = DesiredChange(self.id, name, value, version, last)
        if self._twin_writes and self._twin_writes_task is not asyncio.current_task():
            self._write_later(lambda: self._on_applied(change, None))
            return
        try:
            await self._on_applied(change, None)
        except (sqlite3.Error, OSError) as exc:
            self._twin_unwritable(f"the record of the desired value {shown(value, 200)} of {name} (version {version})",
                                  exc)
            self._write_later(lambda: self._on_applied(change, None))

    async def _twin_before(self) -> dict[str, PropertyTwin]:
        """The device's properties in the twin now, before a change is made: what the twin
        document sends as `last` (edgecore's previous twin state). Empty if the twin cannot say
        (no twin, a lock held past its timeout): the document then has `last: null`."""
        if self._twin is None:
            return {}
        device_id = self.id
        try:
            return await self._twin(lambda s: s.device(device_id).properties)
        except Exception as exc:  # noqa: BLE001 - the change goes on; only the document lacks `last`
            log.debug("%s: no twin state before a change (%s)", device_id, exc)
            return {}

    async def _sync_boot_values(self, versions: dict[str, int] | None = None) -> None:
        """After open: an applied desired value that differs from the boot state becomes the boot state.
        `versions`: only a property whose desired version is still this one (a reset done late)."""
        await self._settle_boot(self._boot_values(lambda p: p.writable and not self.driver.restore_desired(p)),
                                versions)

    def _boot_values(self, which: Callable[[PropertyDefinition], bool]) -> dict[str, Any]:
        """The boot state (Driver.boot_value), calibrated as a reading is, of the properties `which` picks."""
        boot: dict[str, Any] = {}
        for prop in self.definition.properties:
            if which(prop) and (value := self.driver.boot_value(prop)) is not None:
                boot[prop.name] = _calibrated(prop, coerce(prop.type, value))
        return boot

    async def _settle_boot(self, boot: dict[str, Any], versions: dict[str, int] | None = None) -> None:
        """_sync_boot_values for these properties' boot states."""
        if not boot or self._twin is None:
            return
        seen, reset = await self._twin(lambda s: _reset_to_boot(s, self.id, boot, versions))
        for name, version in seen.items():
            self._desired_seen[name] = max(version, self._desired_seen.get(name, 0))
        for name, before, version in reset:
            if before.apply_error:  # refused, or its read-back differed: not known to be applied
                log.warning("%s/%s: started in its boot state %r; the desired value %r (%s) is replaced by it"
                            " (desired is now %r, version %d)", self.id, name, boot[name], before.desired,
                            before.apply_error, boot[name], version)
            else:
                log.warning("%s/%s: started in its boot state %r; the desired value %r applied before the restart"
                            " is not re-applied (desired is now %r, version %d)", self.id, name, boot[name],
                            before.desired, boot[name], version)
            await self._settled_desired(name, boot[name], version, before)

    async def _restore_desired(self, *, queue: bool = False) -> None:
        """After open, before the first read: write the twin's last desired value of each property
        whose driver asks for it (Driver.restore_desired), whether it was applied before or not.

        An applied one is made pending again first (the same value as a new desired version): the
        device does not have it until the write succeeds, so a write that fails leaves it pending
        with its error and retried, as any failed write, and the next start writes it too.
        `queue`: handed to the apply loop instead (a restore done late, the loops running)."""
        names = [p.name for p in self.definition.properties if p.writable and self.driver.restore_desired(p)]
        if not names or self._twin is None:
            return
        if (lock := await self._admin_lock()) is not None:
            # Locked for maintenance: left as open() set it, and that boot state becomes the desired
            # value, or a start after the unlock would restore the value from before the lock.
            log.warning("%s: no desired value is restored: %s", self.id, lock.describe(self.id))
            await self._settle_boot(self._boot_values(lambda p: p.name in names))
            return
        changes = await self._twin(lambda s: _desired_to_restore(s, self.id, names))
        for change, was_applied, set_at in changes:
            name = change.property
            self._restored[name] = (change.version, set_at)
            if queue:
                self.submit_desired(change)  # (once: a version already seen is not queued again)
                continue
            self._desired_seen[name] = max(change.version, self._desired_seen.get(name, 0))
            queued = self._desired.get(name)
            if queued is not None and queued.version <= change.version:
                del self._desired[name]  # (a crash-restart's queued value: this write is it)
            log.info("%s/%s: restoring the desired value %s%s (version %d) after the open", self.id, name,
                     shown(change.value, 200), " applied before" if was_applied else "", change.version)
            await self._apply(change)

    async def _apply(self, change: DesiredChange) -> None:
        """Write a desired value and read it back; any refusal or failure is the change's error in
        the twin. Checked here again, whatever wrote it (the router, `mapper twin set`, the REST
        API, an inference action): only a declared, writable property gets a typed value within
        its model's range.

        A failed write leaves the value pending, to be written again (the module's docstring);
        only its first failure (or a different error) is recorded and told to the listeners."""
        error: str | None = None
        failed = False  # the write itself failed: pending, retried
        name = change.property
        change = dataclasses.replace(change, last=(await self._twin_before()).get(name))
        try:
            lock = await self._admin_lock()
        except (sqlite3.Error, OSError) as exc:
            # Not known not to be locked: not written now; pending, and tried again as a failed write.
            lock, error, failed = None, f"write failed: cannot tell whether it is locked for maintenance: {exc}", True
        try:
            value: Value = self.definition.desired_value(name, change.value)
        except ValueError as exc:  # (a property a reload removed since: refused here too)
            error, failed = f"{NOT_WRITTEN}{exc}", False
        else:
            if lock is not None:
                # Stored before `mapper lock` (or a retry of a failed write): never written while
                # locked, nor at the unlock; refused for good, as the lock's own drop of it.
                error = f"{NOT_WRITTEN}{lock.describe(self.id)}"
        if error is None:
            prop = self.definition.prop(name)
            restored = self._restored.get(name)
            left: float | None = None
            if restored is not None and restored[0] == change.version:
                left, spent = self._time_left(prop, value, restored[1])
                if spent is not None:
                    # Not written: the device is still as open() left it (a GPIO output off).
                    await self._revert(prop, _calibrated(prop, self.driver.boot_value(prop)),
                                       f"the desired value {shown(value, 200)} is {spent}")
                    return
            try:
                async with self._io_lock:
                    # A reading from before the write no longer answers an on-demand read (it
                    # would show the relay as it was before a write that has finished).
                    self._last_read.pop(name, None)
                    await self._write(prop, value, left)
            except WriteError as exc:
                if exc.retryable:
                    error, failed = f"write failed: {exc}", True
                else:  # the device can never take this value: done with, as a definition's refusal
                    error = f"{REFUSED_BY_DRIVER}{exc}"
            except Exception as exc:  # noqa: BLE001 - report any driver failure on the twin
                error, failed = f"write failed: {exc}", True
            else:
                try:
                    reading = await self._read_back(prop, value)
                    self._record(reading)
                    if reading.quality != GOOD or reading.value != value:
                        error = f"read back {shown(reading.value, 200)} after writing {shown(value, 200)}"
                except Exception as exc:  # noqa: BLE001 - written: the failure is the read-back's
                    error = f"read back failed after writing {shown(value, 200)}: {exc}"
        if failed:
            assert error is not None
            if not self._write_failed(change, error):
                return  # the same error as the last attempt: already in the twin, already told
        else:
            self._forget_failed(name, change.version + 1)
            if error:
                log.warning("%s/%s: %s", self.id, name, error)
            else:
                log.info("%s/%s: applied desired value %s (version %d)", self.id, name, shown(change.value, 200),
                         change.version)
        if self._twin_writes:  # results that wait for the twin go first: the listeners hear them in order
            self._write_later(lambda: self._on_applied(change, error, pending=failed))
            return
        try:
            if failed:
                await self._on_applied(change, error, pending=True)
            else:
                await self._on_applied(change, error)
        except (sqlite3.Error, OSError) as exc:
            # The twin refused the record (another process's lock past its timeout, a full disk): the
            # device has the value; the record is made once the twin takes writes. It used to crash
            # the device loop, which restarted after a back-off, the device closed and opened again.
            self._twin_unwritable(f"the result of the desired value {shown(change.value, 200)} of {name}"
                                  f" (version {change.version})", exc)
            self._write_later(lambda: self._on_applied(change, error, pending=failed))
        except BaseException:
            # Not marked applied in the twin (locked past its timeout, a full disk): it stays pending
            # there, so it must not stay "seen" here, or the restarted loop would skip it for good.
            if self._desired_seen.get(name) == change.version:
                self._desired_seen[name] = change.version - 1
            entry = self._failed_writes.get(name)
            if entry is not None and entry[0].version == change.version:
                self._failed_writes[name] = (change, "", entry[2])  # its error was not recorded: news next time
            raise

    async def _admin_lock(self) -> AdminLock | None:
        """The device's maintenance lock (`mapper lock`) as the twin has it now: asked before each
        write, as another process (the CLI) sets it."""
        if self._twin is None:
            return None
        device_id = self.id
        return await self._twin(lambda s: s.admin_lock(device_id))

    async def _write(self, prop: PropertyDefinition, value: Value, left: float | None) -> None:
        """`left`: seconds left of the driver's time limit for a restored value (Driver.write_for). A
        calibrated property's driver is given the raw value (its readings are calibrated again)."""
        if prop.calibration is not None:
            value = prop.calibration.raw(value)
        if left is None:
            await self._call(self.driver.write, prop, value)
        else:
            log.info("%s/%s: %s left of its auto-off", self.id, prop.name, duration(left))
            await self._call(self.driver.write_for, prop, value, left)

    def _time_left(self, prop: PropertyDefinition, value: Value, set_at: int | None) -> tuple[float | None, str | None]:
        """For a restored value set at `set_at` (ms, wall clock): (seconds left of the driver's time
        limit, None), or (None, None) when the driver sets no limit, or (0, why) when nothing is left."""
        limit = self.driver.time_limit(prop, value)
        if limit is None:
            return None, None
        now = now_ms()
        if set_at is None:
            return 0, (f"not written: the twin has no time of when it was set, so its {limit:g} s auto-off is taken"
                       " as spent")
        if set_at > now:
            return 0, (f"not written: it was set at {utc(set_at / 1000)}, later than the clock says it is now"
                       f" ({utc(now / 1000)}): the clock is behind (a Pi without a real-time clock before its time"
                       f" sync?), so how long it has been on cannot be told, and its {limit:g} s auto-off is taken"
                       " as spent")
        left = limit - (now - set_at) / 1000
        if left <= 0:
            return 0, (f"not written: its {limit:g} s auto-off, counted from when it was set ({utc(set_at / 1000)}),"
                       f" ran out at {utc(set_at / 1000 + limit)}")
        return left, None

    async def _read_back(self, prop: PropertyDefinition, value: Value, attempts: int = 10) -> Reading:
        """Read until the device reports the written value (relays and LEDs take a moment)."""
        reading = await self.read_once(prop)
        for _ in range(attempts - 1):
            if reading.quality == GOOD and reading.value == value:
                break
            await asyncio.sleep(0.05)
            reading = await self.read_once(prop)
        return reading


class DriverThread:
    """One daemon thread for one device's blocking driver calls, run one at a time.

    Not asyncio's shared default executor: a bus that hangs would hold one of its few threads
    for good at every reload, until healthy devices' reads queued behind them timed out, and
    the process could not exit (it joins those threads). A daemon thread per device holds
    only its own device up and never the exit.
    """

    def __init__(self, name: str, *, once: bool = False) -> None:
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._once = once
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((future, fn, args))
        return future

    def stop(self) -> None:
        """The thread ends after the calls queued so far."""
        self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            if self._once:
                return


def _calibrated(prop: PropertyDefinition, raw: Any) -> Any:
    """A value from the driver other than a reading (a boot value, a value it set back by itself) in
    the property's calibrated units, as its readings are (None stays None)."""
    if prop.calibration is None or raw is None:
        return raw
    try:
        return prop.calibration.reading(coerce(prop.type, raw))
    except ValueError:  # not of the property's type (the driver's bug): its read-back says so
        return raw


def _raised(exc: BaseException) -> str:
    """`BusPanic: the bus gave up`: what a driver raised, named when it is no Exception."""
    return str(exc) if isinstance(exc, Exception) else f"{type(exc).__name__}: {exc}"


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on `loop` from any thread; dropped once the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the mapper is stopping
        pass


def _store_applied_desired(
    store: TwinStore, device_id: DeviceId, name: str, value: Value, *, expected_version: int | None = None,
) -> int:
    """In the twin thread: store a desired value the device already has, as a new, applied version.
    One transaction (joined, inside one): never seen, nor left, pending in between."""
    if not store.conn.in_transaction:
        with store.transaction():
            return _store_applied_desired(store, device_id, name, value, expected_version=expected_version)
    # `applied`: the device has it (an auto-off's off, a boot state), locked for maintenance or not.
    _, version = store.set_desired(device_id, name, value, expected_version=expected_version, applied=True)
    store.mark_applied(device_id, name, version)
    return version


def _desired_to_restore(
    store: TwinStore, device_id: DeviceId, names: list[str],
) -> list[tuple[DesiredChange, bool, int | None]]:
    """In the twin thread: the desired values of these properties to write now, each with whether
    it was applied before and when it was set (desired_ts). An applied one is stored again as a new
    version, pending until written, with the time it was set: a time limit keeps counting from then.
    A pending one is written as it is. One transaction: a value `mapper twin set` commits meanwhile
    is the one written."""
    changes: list[tuple[DesiredChange, bool, int | None]] = []
    with store.transaction():
        if (lock := store.admin_lock(device_id)) is not None:
            log.warning("%s: no desired value is restored: %s", device_id, lock.describe(device_id))
            return changes
        pending = {c.property: c for c in store.pending_desired() if c.device_id == device_id}
        twin = store.device(device_id)
        for name in names:
            prop = twin.properties.get(name)
            if name in pending:
                changes.append((pending[name], False, prop.desired_ts if prop is not None else None))
            elif prop is not None and prop.desired is not None:
                if prop.apply_error and prop.apply_error.startswith((NOT_WRITTEN, REFUSED_BY_DRIVER)):
                    # Refused for good: writing it again at each open would bump its version, clear its
                    # error and tell the listeners again, for a value the device can never take.
                    refuser = ("driver refused" if prop.apply_error.startswith(REFUSED_BY_DRIVER)
                               else "device's definition refused")
                    log.info("%s/%s: the desired value %s is not restored: the %s it (%s); it stays so until a"
                             " value is set again (mapper twin set)", device_id, name, shown(prop.desired, 200),
                             refuser, prop.apply_error)
                    continue
                try:
                    value, version = store.set_desired(device_id, name, prop.desired, ts=prop.desired_ts)
                except (NotWritable, UnknownProperty, ValueError) as exc:  # the twin's model changed since
                    log.warning("%s/%s: the desired value %s is not restored: %s", device_id, name,
                                shown(prop.desired, 200), exc)
                    continue
                changes.append((DesiredChange(device_id, name, value, version, prop), True, prop.desired_ts))
    return changes


def _reset_to_boot(
    store: TwinStore, device_id: DeviceId, boot: dict[str, Value], versions: dict[str, int] | None = None,
) -> tuple[dict[str, int], list[tuple[str, PropertyTwin, int]]]:
    """In the twin thread: for each property not waiting for a desired value, its desired version
    (after replacing an applied desired value that differs from the boot state), and the replaced
    ones with their twin before (the twin document's `last`: read in the same transaction).
    `versions`: a property whose desired version is no longer this one is left as it is."""
    seen: dict[str, int] = {}
    reset: list[tuple[str, PropertyTwin, int]] = []
    # One transaction: a desired value `mapper twin set` commits meanwhile is pending, not replaced.
    with store.transaction():
        pending = {c.property for c in store.pending_desired() if c.device_id == device_id}
        twin = store.device(device_id)
        for name, value in boot.items():
            prop = twin.properties.get(name)
            if prop is None or name in pending:
                continue
            if versions is not None and prop.desired_version != versions.get(name):
                continue  # set (and applied) since the start: the device's state now, not a value from before
            if prop.desired is None or prop.desired == value:
                seen[name] = prop.desired_version
                continue
            seen[name] = _store_applied_desired(store, device_id, name, value)
            reset.append((name, prop, seen[name]))
    return seen, reset
