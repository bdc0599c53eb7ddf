"""Calls to edgecore's DeviceManagerService: registration and the twin/state reporter.

Every call opens a fresh connection to edgecore's socket (as the Go framework does), so an
edgecore restart needs no reconnect logic; every call first takes a token from the mapper's
one TokenBucket, so the mapper stays under edgecore's limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from devices.definitions import DeviceDefinition
from devices.ids import DeviceId
from mapper.dmi import api_pb2 as pb
from mapper.dmi import api_pb2_grpc as pb_grpc
from mapper.dmi.convert import LeftOutLog, device_status, edgecore_state
from mapper.dmi.ratelimit import TokenBucket
from mapper.dmi.settings import MIB, KubeEdgeSettings
from mapper.logs import OUTAGE_NOTE_S, Outage, Throttle, held_note
from twin.records import DeviceTwin

log = logging.getLogger("mapper.dmi")

# Errors that mean "edgecore is not there (any more)": registration is redone once it is back.
GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def backoff_s(attempt: int, cap: float) -> float:
    """Full jitter, bounded: uniform(0, min(cap, 0.25 * 2**attempt))."""
    return random.uniform(0, min(cap, 0.25 * 2 ** min(attempt, 16)))


def retry_delay_s(attempt: int, cap: float) -> float:
    """Half jitter, bounded: min(cap, 0.25 * 2**attempt) * uniform(0.5, 1).

    For something that failed on its own (one device's report, a crashed loop): unlike full
    jitter it never comes back almost at once, so attempt n waits at least half its step.
    """
    return min(cap, 0.25 * 2 ** min(attempt, 16)) * random.uniform(0.5, 1.0)


async def supervised(name: str, run: Callable[[], Awaitable[None]], cap: float) -> None:
    """Run `run()`; when it raises (a bug), log it with its traceback and run it again after a backoff.

    Every DMI loop runs under this: an exception escaping one would end its task group, and
    with it the whole mapper (devices, telemetry, twin), for a failure of one DMI task.
    Cancellation is not an Exception and ends it; so does `run()` returning.
    """
    failures = 0
    while True:
        try:
            await run()
            return
        except Exception:
            failures += 1
            delay = retry_delay_s(failures, cap)
            log.exception("%s stopped on an unexpected error (%d so far); restarting it in %.1f s",
                          name, failures, delay)
            await asyncio.sleep(delay)


# grpc core's text for a message over the receive limit: "Received message larger than max (N vs. M)".
_TOO_LARGE = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


def reply_too_large(exc: grpc.aio.AioRpcError) -> tuple[int, int] | None:
    """(reply size, limit) in bytes when the call failed because the reply exceeds our receive limit."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    found = _TOO_LARGE.search(exc.details() or "")
    return (int(found[1]), int(found[2])) if found else None


class EdgecoreClient:
    def __init__(self, settings: KubeEdgeSettings, bucket: TokenBucket) -> None:
        self.settings = settings
        self.bucket = bucket
        # A reply over our receive limit comes back the same on every retry: said once, then every 10 min.
        self._too_large_log = Throttle(burst=1, interval_s=600.0)

    def mapper_info(self) -> pb.MapperInfo:
        s = self.settings
        return pb.MapperInfo(
            name=s.name, version=s.version, api_version=s.api_version, protocol=s.protocol,
            address=str(s.socket).encode(), state="ok",
        )

    async def _call(self, method: str, request: Any, *, token: bool = True) -> Any:
        if token:  # False when the caller took it already (to build the request after waiting)
            await self.bucket.take()
        target = f"unix:{self.settings.edgecore_socket_file()}"
        # The receive limit: MapperRegister's reply carries every device and model of this protocol on
        # the node; gRPC's default 4 MiB is about 5,000 devices (see KubeEdgeSettings.max_receive_mb).
        options = [("grpc.max_receive_message_length", self.settings.max_receive_mb * MIB)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.DeviceManagerServiceStub(channel)
            return await getattr(stub, method)(request, timeout=self.settings.call_timeout_s)

    async def register(self) -> pb.MapperRegisterResponse:
        # withData=true: otherwise edgecore neither sends devices nor creates its client for us.
        return await self._call("MapperRegister", pb.MapperRegisterRequest(withData=True, mapper=self.mapper_info()))

    async def report_status(self, device_id: DeviceId, status: pb.DeviceStatus, *, token: bool = True) -> None:
        await self._call("ReportDeviceStatus", pb.ReportDeviceStatusRequest(
            deviceName=device_id.name, deviceNamespace=device_id.namespace, reportedDevice=status,
        ), token=token)

    async def report_state(self, device_id: DeviceId, state: str, *, token: bool = True) -> None:
        await self._call("ReportDeviceStates", pb.ReportDeviceStatesRequest(
            deviceName=device_id.name, deviceNamespace=device_id.namespace, state=edgecore_state(state),
        ), token=token)

    async def register_until_done(self, before_attempt: Callable[[], None] | None = None) -> pb.MapperRegisterResponse:
        """MapperRegister, retried with jittered backoff until edgecore answers.

        Whatever fails is retried: edgecore away, a refusal, a reply over our receive limit
        (edgecore's devices may be removed meanwhile), or an unexpected error.
        `before_attempt` is called just before each attempt is sent.

        edgecore away (restarting, not installed yet) is logged as mapper.logs.Outage says: the
        first failure and each change of its cause, a note at most every OUTAGE_NOTE_S that it
        lasts, and once edgecore answers how long it took; not a line per attempt.
        """
        cap = self.settings.register_backoff_max_s
        attempt = unexpected = 0
        outage = Outage(note_s=OUTAGE_NOTE_S)
        where = self.settings.edgecore_socket_file()
        while True:
            try:
                if before_attempt is not None:
                    before_attempt()
                reply = await self.register()
                if (back := outage.back()) is not None:
                    log.info("MapperRegister to %s answered %s", where, back)
                return reply
            except grpc.aio.AioRpcError as exc:
                attempt += 1
                outage.failed()
                if (sizes := reply_too_large(exc)) is not None:
                    # The same reply until someone acts: no quicker retries, no warning per attempt.
                    delay = cap
                    held = self._too_large_log("too-large")
                    if held is not None:
                        log.error(
                            "MapperRegister reply from edgecore is %d bytes, larger than this mapper accepts "
                            "(%d bytes, kubeedge.max_receive_mb: %d): edgecore has that much Device and "
                            "DeviceModel data for protocol %r on this node. None of it is adopted; the mapper "
                            "runs the devices it last knew. Raise kubeedge.max_receive_mb to at least %d (if the "
                            "node has the memory for it), or move devices to another protocol or node. "
                            "Retrying every %g s (attempt %d); this error is repeated at most every 10 min%s",
                            sizes[0], sizes[1], self.settings.max_receive_mb, self.settings.protocol,
                            -(-sizes[0] // MIB), delay, attempt, held_note(held))
                    outage.told("too-large")
                else:
                    delay = backoff_s(attempt, cap)
                    cause = f"{exc.code().name}: {exc.details()}"
                    verdict = outage.tell(cause[:200])
                    if verdict == Outage.FIRST:
                        log.warning("MapperRegister to %s failed (%s); attempt %d, retrying in %.1f s", where, cause,
                                    attempt, delay)
                    elif verdict == Outage.STILL:
                        log.warning("MapperRegister to %s: no answer %s: %s; %d attempts (the next in %.1f s)", where,
                                    outage.note(), cause, attempt, delay)
                    else:
                        log.debug("MapperRegister to %s failed (%s); attempt %d, retrying in %.1f s", where, cause,
                                  attempt, delay)
            except Exception as exc:  # noqa: BLE001 - a bug, or the request cannot be made: retry, not stop the mapper
                attempt += 1
                unexpected += 1
                outage.failed()
                delay = backoff_s(attempt, cap)
                cause = f"{type(exc).__name__}: {exc}"
                verdict = outage.tell(cause[:200])
                log.log(logging.DEBUG if verdict is None else logging.ERROR,
                        "MapperRegister to %s failed: %s; attempt %d, retrying in %.1f s", where, cause, attempt,
                        delay, exc_info=unexpected == 1)
            await asyncio.sleep(delay)


TwinReader = Callable[[DeviceId], Awaitable[tuple[DeviceDefinition, DeviceTwin] | None]]


class Reporter:
    """Sends twins and states to edgecore: coalesced per device, one bucket token per call.

    A device marked dirty again before its report went out is reported once, with the latest
    values (read from the twin when the call is made); a failed report stays queued.

    A report that fails here rather than at edgecore (its twin cannot be read: the database is
    locked, the disk is full; its status cannot be converted; a bug) is logged (throttled),
    counted in `failures` and retried on its own backoff, with the latest values; the other
    devices' reports go on meanwhile.

    Twins are re-sent unchanged every `interval_s` (0: only on change). Device states follow
    each device's `spec.stateReport` (see `forget`): none at all for `reportToCloud: false`,
    and re-sent unchanged every `reportCycle` of that device.
    """

    def __init__(
        self, client: EdgecoreClient, read_twin: TwinReader, *, interval_s: float, on_gone: Callable[[], None]
    ) -> None:
        self.client = client
        self._read_twin = read_twin
        self._interval_s = interval_s
        self._on_gone = on_gone
        # (kind, device) -> None, in the order first marked; kind is "twins" or "state".
        self._dirty: dict[tuple[str, DeviceId], None] = {}
        self._states: dict[DeviceId, str] = {}
        self._last: dict[tuple[str, DeviceId], tuple[Any, float]] = {}
        self._wake = asyncio.Event()
        self.allowed: set[DeviceId] = set()
        # Devices whose states are reported -> their re-send period in seconds (0: only on change).
        self.state_every: dict[DeviceId, float] = {}
        # When each device's unchanged state is next due again (monotonic).
        self._state_due: dict[DeviceId, float] = {}
        self._state_wake = asyncio.Event()
        self.sent = 0
        self.failures = 0
        # Reports that failed here (not at edgecore): failures in a row, and when each is retried
        # (monotonic). A key waiting for its retry is not marked dirty by new readings.
        self._failing: dict[tuple[str, DeviceId], int] = {}
        self._retry_at: dict[tuple[str, DeviceId], float] = {}
        # Keys: (kind, exception class), a fixed set. A locked database fails every device at once.
        self._log_throttle = Throttle(burst=10, interval_s=60.0)
        # edgecore away (UNAVAILABLE, DEADLINE_EXCEEDED): logged as mapper.logs.Outage says, not a
        # line per failed report. Its refusals of one report (other codes) are logged each.
        self._outage = Outage(note_s=OUTAGE_NOTE_S)
        # The twins left out for a value edgecore's pattern refuses, here and in GetDevice's answers.
        self.left_out = LeftOutLog()

    def _mark(self, key: tuple[str, DeviceId]) -> None:
        if key not in self._retry_at:  # (its retry reads the latest values anyway)
            self._dirty.setdefault(key, None)

    def twins_changed(self, device_ids: set[DeviceId]) -> None:
        for device_id in device_ids:
            if device_id in self.allowed:
                self._mark(("twins", device_id))
        self._wake.set()

    def state_changed(self, device_id: DeviceId, state: str) -> None:
        if device_id in self.state_every:
            self._states[device_id] = state
            self._mark(("state", device_id))
            self._wake.set()
            self._state_wake.set()

    def forget(self, keep: set[DeviceId], state_every: dict[DeviceId, float] | None = None) -> None:
        """Report only `keep` (the devices edgecore gives us); states only for the devices in
        `state_every` (default: all of `keep`, every `interval_s`), each re-sent at its period."""
        self.allowed = set(keep)
        if state_every is None:
            state_every = dict.fromkeys(keep, self._interval_s)
        self.state_every = {d: every for d, every in state_every.items() if d in self.allowed}
        # _last too: a device edgecore removed and creates again starts there with an empty twin
        # and no state, so its first report must go out even when it equals the removed one's last.
        for queue in (self._dirty, self._failing, self._retry_at, self._last):
            for key in [k for k in queue if k[1] not in keep or (k[0] == "state" and k[1] not in self.state_every)]:
                del queue[key]
        for device_id in [d for d in self._states if d not in self.state_every]:
            del self._states[device_id]
            self._state_due.pop(device_id, None)
        self.left_out.forget(keep)
        self._state_wake.set()

    async def run(self) -> None:
        cap = self.client.settings.register_backoff_max_s
        loops = [("dmi.reporter", self._send_loop), ("dmi.reporter.states", self._state_heartbeat)]
        if self._interval_s > 0:
            loops.append(("dmi.reporter.heartbeat", self._heartbeat))
        tasks = [asyncio.create_task(supervised(name, loop, cap), name=name) for name, loop in loops]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.twins_changed(set(self.allowed))

    async def _state_heartbeat(self) -> None:
        """Mark each device's known state dirty once its own period has passed since it was last sent."""
        while True:
            self._state_wake.clear()
            now = time.monotonic()
            next_due = None
            for device_id, every in self.state_every.items():
                if every <= 0 or device_id not in self._states:
                    continue
                due = self._state_due.setdefault(device_id, now + every)
                if due <= now:
                    self._mark(("state", device_id))
                    self._wake.set()
                    due = self._state_due[device_id] = now + every  # pushed on again when it is sent
                next_due = due if next_due is None else min(next_due, due)
            timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._state_wake.wait()

    async def _send_loop(self) -> None:
        attempt = 0
        while True:
            now = time.monotonic()
            for key in [k for k, at in self._retry_at.items() if at <= now]:
                del self._retry_at[key]
                self._dirty.setdefault(key, None)
            if not self._dirty:
                self._wake.clear()
                timeout = max(0.0, min(self._retry_at.values()) - now) if self._retry_at else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            key = next(iter(self._dirty))
            del self._dirty[key]
            try:
                await self._send(key)
                attempt = 0
                self._failing.pop(key, None)
            except grpc.aio.AioRpcError as exc:
                self.failures += 1
                self._dirty.setdefault(key, None)  # keep it; coalesces with anything newer
                attempt += 1
                delay = backoff_s(attempt, self.client.settings.register_backoff_max_s)
                self._log_refused(key, exc, delay)
                if exc.code() in GONE:
                    self._on_gone()
                await asyncio.sleep(delay)
            except Exception as exc:  # noqa: BLE001 - see _failed
                self._failed(key, exc)

    def _log_refused(self, key: tuple[str, DeviceId], exc: grpc.aio.AioRpcError, delay: float) -> None:
        """A report edgecore did not take. edgecore away: its first failure and each change of cause
        at WARNING, then a note at most every OUTAGE_NOTE_S, the other failures at DEBUG (a line per
        report retried was one every few seconds for the whole time); a refusal: WARNING each."""
        cause = f"{exc.code().name}: {exc.details()}"
        if exc.code() not in GONE:
            log.warning("report %s of %s failed: %s", key[0], key[1], cause)
            return
        self._outage.failed()
        verdict = self._outage.tell(cause[:200])
        if verdict == Outage.FIRST:
            log.warning("report %s of %s failed: %s; retrying in %.1f s", key[0], key[1], cause, delay)
        elif verdict == Outage.STILL:
            log.warning("reports to edgecore: none taken %s: %s; %d failed attempts (the next in %.1f s)",
                        self._outage.note(), cause, self._outage.attempts, delay)
        else:
            log.debug("report %s of %s failed: %s; retrying in %.1f s", key[0], key[1], cause, delay)

    def _failed(self, key: tuple[str, DeviceId], exc: Exception) -> None:
        """A report failed before or apart from edgecore: log (throttled), count, retry it on its own backoff.

        Retried, not dropped, even when the failure is deterministic (a value convert.py cannot
        convert, a bug): the reporter cannot tell that from a transient failure (SQLite's
        "database is locked", a full disk), every retry reads the latest twin (a later reading
        may convert), and dropping would not stop the retries anyway (the device's next reading,
        every collectCycle, marks it again). Held until its retry, new readings do not mark it,
        so a report that always fails costs one twin read and at most one log line per backoff
        step (growing to register_backoff_max_s), and no edgecore call (a twin that cannot be read
        or converted fails before the token is taken). The other reports are not delayed by it.
        """
        self.failures += 1
        failing = self._failing[key] = self._failing.get(key, 0) + 1
        delay = retry_delay_s(failing, self.client.settings.register_backoff_max_s)
        self._retry_at[key] = time.monotonic() + delay
        self._dirty.pop(key, None)  # marked again while this attempt ran: held until the retry too
        held = self._log_throttle((key[0], type(exc).__name__))
        if held is None:
            return
        environment = isinstance(exc, OSError | sqlite3.Error)  # not a bug here: no traceback
        log.log(logging.WARNING if environment else logging.ERROR,
                "report %s of %s failed (%d in a row): %s: %s; retrying in %.1f s, the other devices' reports go on%s",
                key[0], key[1], failing, type(exc).__name__, exc, delay,
                held_note(held), exc_info=not environment and failing == 1)

    async def _payload(self, key: tuple[str, DeviceId]) -> Any:
        kind, device_id = key
        if kind == "state":
            return self._states.get(device_id)
        found = await self._read_twin(device_id)
        if found is None:
            return None
        status = device_status(*found, self.left_out)
        return status if status.twins else None  # edgecore refuses a report without twins

    @staticmethod
    def _comparable(payload: Any) -> Any:
        if isinstance(payload, pb.DeviceStatus):  # values only: timestamps change on every reading
            return [(t.propertyName, t.observedDesired.value, t.reported.value) for t in payload.twins]
        return payload

    async def _send(self, key: tuple[str, DeviceId]) -> None:
        payload = await self._payload(key)
        if payload is None:
            return
        kind, device_id = key
        if kind == "state" and device_id not in self.state_every:
            return  # stateReport.reportToCloud is false (or the device is gone)
        last = self._last.get(key)
        now = time.monotonic()
        every = self.state_every[device_id] if kind == "state" else self._interval_s
        if last and last[0] == self._comparable(payload) and (every <= 0 or now - last[1] < every):
            return  # nothing new, heartbeat not due: no call, no token
        await self.client.bucket.take()
        payload = await self._payload(key)  # the latest values at the moment we may send
        if payload is None or (kind == "state" and device_id not in self.state_every):
            return  # the device went while this waited for its token
        if kind == "state":
            await self.client.report_state(device_id, payload, token=False)
        else:
            await self.client.report_status(device_id, payload, token=False)
        self.sent += 1
        if (back := self._outage.back()) is not None:
            log.info("reports to edgecore taken again %s", back)
        self._last[key] = (self._comparable(payload), time.monotonic())
        if kind == "state" and self.state_every.get(device_id, 0) > 0:
            self._state_due[device_id] = self._last[key][1] + self.state_every[device_id]
            self._state_wake.set()
