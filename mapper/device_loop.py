"""One device's loop: collect every property on its cycle, apply desired values, track health.

Drivers never see the event loop: a blocking driver is called in a worker thread with a
timeout, so a 250 ms sensor read never delays another device. A device that fails
`failure_threshold` reads in a row is `unhealthy` and retried with capped, jittered backoff;
it is `ok` again after its first good read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import DriverError
from devices.values import Value, coerce, range_problem
from mapper.config import DeviceLoopSettings
from twin.records import ERROR, GOOD, OUT_OF_RANGE, Reading
from twin.store import DesiredChange

log = logging.getLogger("mapper.device")

OK = "ok"
UNHEALTHY = "unhealthy"
OFFLINE = "offline"

StateCallback = Callable[[DeviceDefinition, str, str | None], Awaitable[None]]
AppliedCallback = Callable[[DesiredChange, str | None], Awaitable[None]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    ) -> None:
        self.definition = definition
        self.driver = driver
        self._record = record
        self._settings = settings
        self._on_state = on_state
        self._on_applied = on_applied
        self.state = "unknown"
        self.failures = 0
        self.reads = 0
        self.read_errors = 0
        self._inflight: asyncio.Future[Any] | None = None
        self._desired: dict[str, DesiredChange] = {}
        self._desired_seen: dict[str, int] = {}
        self._desired_event = asyncio.Event()
        self._io_lock = asyncio.Lock()
        self._opened = False

    @property
    def id(self):  # noqa: ANN201 - DeviceId
        return self.definition.id

    # -- driver calls ----------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.driver.blocking:
            return fn(*args)
        if self._inflight is not None and not self._inflight.done():
            raise DriverError(f"{self.id}: the previous call has not returned yet (driver hung?)")
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._inflight = future
        try:
            async with asyncio.timeout(self.driver.timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DriverError(f"{self.id}: no answer within {self.driver.timeout_s:g} s") from None

    async def _open(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._io_lock:
                    await self._call(self.driver.open)
                self._opened = True
                return
            except Exception as exc:  # noqa: BLE001 - any driver failure: report, back off, retry
                attempt += 1
                await self._set_state(OFFLINE, f"cannot open: {exc}")
                await asyncio.sleep(self._backoff(attempt))

    def close(self) -> None:
        try:
            self.driver.close()
        except Exception as exc:  # noqa: BLE001 - closing must not stop the other devices closing
            log.warning("%s: error while closing the driver: %s", self.id, exc)

    # -- health ----------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base = min(self._settings.max_backoff_s, 0.5 * 2 ** min(attempt, 16))
        return random.uniform(base / 2, base)

    async def _set_state(self, state: str, detail: str | None = None) -> None:
        if state != self.state:
            previous, self.state = self.state, state
            if state == OK:
                log.info("%s: state %s (was %s)", self.id, state, previous)
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
            await self._set_state(UNHEALTHY, f"{self.failures} failures in a row, last: {exc}")

    # -- loops -----------------------------------------------------------------------------

    async def run(self) -> None:
        await self._open()
        by_cycle: dict[int, list[PropertyDefinition]] = {}
        for prop in self.definition.properties:
            by_cycle.setdefault(prop.collect_cycle_ms, []).append(prop)
        async with asyncio.TaskGroup() as tg:
            for cycle_ms, props in by_cycle.items():
                tg.create_task(self._collect(cycle_ms, props), name=f"collect[{self.id}/{cycle_ms}ms]")
            tg.create_task(self._apply_loop(), name=f"apply[{self.id}]")

    async def read_once(self, prop: PropertyDefinition) -> Reading:
        try:
            async with self._io_lock:
                raw = await self._call(self.driver.read, prop)
            taken = now_ms()
            value = coerce(prop.type, raw)
        except Exception as exc:  # noqa: BLE001 - driver errors of any kind count as a failed read
            await self._failed(exc)
            return Reading(self.id, prop.name, None, now_ms(), ERROR, str(exc))
        self.reads += 1
        await self._succeeded()
        why = range_problem(value, prop.minimum, prop.maximum)
        return Reading(self.id, prop.name, value, taken, OUT_OF_RANGE if why else GOOD, why)

    async def _collect(self, cycle_ms: int, props: list[PropertyDefinition]) -> None:
        """Read the properties that share a cycle, one after another, once per cycle.

        One timer per device and cycle, not per property; and cycles are aligned to multiples
        of their length on the loop's clock, so devices with the same cycle wake together:
        a Pi with 20 sensors at 1 Hz wakes once a second, not 20 times.
        """
        loop = asyncio.get_running_loop()
        cycle = cycle_ms / 1000
        while True:
            for prop in props:
                self._record(await self.read_once(prop))
            now = loop.time()
            if self.state == UNHEALTHY:
                await asyncio.sleep(max(cycle, self._backoff(self.failures)))
            else:  # the next slot of the grid; a read that overran its cycle skips the missed slots
                await asyncio.sleep((math.floor(now / cycle) + 1) * cycle - now)

    # -- desired values --------------------------------------------------------------------

    def submit_desired(self, change: DesiredChange) -> None:
        """Queue a desired value (already validated by the twin) for the driver."""
        if change.version <= self._desired_seen.get(change.property, 0):
            return
        self._desired_seen[change.property] = change.version
        self._desired[change.property] = change
        self._desired_event.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._desired_event.wait()
            self._desired_event.clear()
            pending, self._desired = self._desired, {}
            for change in pending.values():
                await self._apply(change)

    async def _apply(self, change: DesiredChange) -> None:
        prop = self.definition.prop(change.property)
        error: str | None = None
        try:
            if not prop.writable:
                raise DriverError(f"property {prop.name!r} is ReadOnly")
            value: Value = coerce(prop.type, change.value)
            async with self._io_lock:
                await self._call(self.driver.write, prop, value)
            reading = await self._read_back(prop, value)
            self._record(reading)
            if reading.quality != GOOD or reading.value != value:
                error = f"read back {reading.value!r} after writing {value!r}"
        except Exception as exc:  # noqa: BLE001 - report any driver failure on the twin
            error = f"write failed: {exc}"
        if error:
            log.warning("%s/%s: %s", self.id, prop.name, error)
        else:
            log.info("%s/%s: applied desired value %r (version %d)", self.id, prop.name, change.value, change.version)
        await self._on_applied(change, error)

    async def _read_back(self, prop: PropertyDefinition, value: Value, attempts: int = 10) -> Reading:
        """Read until the device reports the written value (relays and LEDs take a moment)."""
        reading = await self.read_once(prop)
        for _ in range(attempts - 1):
            if reading.quality == GOOD and reading.value == value:
                break
            await asyncio.sleep(0.05)
            reading = await self.read_once(prop)
        return reading
