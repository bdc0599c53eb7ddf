"""KubeEdgeExtension: the mapper as a KubeEdge DMI mapper (`mode: kubeedge`).

At start it restores the last known devices (so they keep running while edgecore is away),
serves DeviceMapperService on our socket, then registers with edgecore (retrying with
jittered backoff) and adopts the devices and models in the reply. edgecore's later calls
change the catalog; every change goes through `service.update_devices`, which restarts only
devices whose definition changed. Twins and states go back through the Reporter.

Registration is redone when edgecore comes back: its socket file was replaced, or a report
failed because it was unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc

from devices.definitions import DeviceDefinition
from devices.ids import DeviceId, clipped
from devices.loader import LoadResult, load_objects
from mapper.dmi import api_pb2 as pb
from mapper.dmi.catalog import Catalog, device_key, model_key, model_of
from mapper.dmi.client import EdgecoreClient, Reporter, retry_delay_s, supervised
from mapper.dmi.convert import fresh_status, model_document
from mapper.dmi.ratelimit import TokenBucket
from mapper.dmi.server import DeviceMapperServicer, DmiError, UnixServer
from mapper.dmi.settings import KubeEdgeSettings
from mapper.device_loop import OFFLINE
from mapper.finish import to_the_end
from mapper.logs import Throttle, held_note
from mapper.service import MapperStopping
from twin.records import GOOD, DeviceTwin, Reading
from twin.store import DesiredChange, OutMessage, UnknownDevice

if TYPE_CHECKING:
    from mapper.service import MapperService

log = logging.getLogger("mapper.dmi")

# How often edgecore's socket file is checked for a restart (a new inode).
WATCH_INTERVAL_S = 1.0

T = TypeVar("T")


class KubeEdgeExtension:
    def __init__(self, settings: KubeEdgeSettings) -> None:
        self.settings = settings
        # One token short of edgecore's burst: our token is taken a moment before the call reaches
        # edgecore, and that moment varies; the spare token absorbs up to 1/rate s of such jitter.
        self.bucket = TokenBucket(settings.rate_per_s, max(1, settings.burst - 1))
        self.client = EdgecoreClient(settings, self.bucket)
        self.catalog = Catalog(settings.protocol)
        self.server = UnixServer(DeviceMapperServicer(self), settings.socket)
        self.reporter = Reporter(self.client, self._read_twin, interval_s=settings.report_interval_s,
                                 on_gone=self._registration_lost)
        self.registrations = 0
        # Registration replies that could not be adopted (registered again after a backoff).
        self.adopt_failures = 0
        self.service: MapperService | None = None
        self.state_path: Path | None = None
        self._local = LoadResult()
        self._lock = asyncio.Lock()
        self._changes: set[asyncio.Future[object]] = set()  # DMI changes still running (see _change)
        # DMI changes made while a MapperRegister is in flight, re-applied on top of its reply
        # (edgecore built the reply at some moment meanwhile: it may not hold them); None otherwise.
        self._journal: list[Callable[[Catalog], object]] | None = None
        self._arrivals = 0       # DMI changes numbered as their calls arrive (before they wait for the lock)
        self._journal_from = 0   # journal the changes numbered above this (arrived after the attempt was sent)
        self._models_changed = asyncio.Condition()
        self.registered = asyncio.Event()
        self._lost = asyncio.Event()
        self._registered_socket: tuple[int, int, int] | None = None
        # Set once the last known devices are restored and our socket is served.
        self.started = asyncio.Event()
        # The restored devices the twin refused to start (see _retry_restore); cleared by any apply that succeeds.
        self._restore_pending = False
        self._restore_log = Throttle(burst=3, interval_s=60.0)
        # The warnings of edgecore's devices logged so far (each once, not at every update).
        self._warned: set[str] = set()

    # -- extension hooks -------------------------------------------------------------------

    async def setup(self, service: MapperService) -> None:
        self.service = service
        self.catalog.push_topics = service.config.push_topics()
        self._local = service.definitions or LoadResult()
        twin_path = service.config.twin.path
        self.state_path = self.settings.state_file or twin_path.with_name(twin_path.name + ".kubeedge.json")
        recorder = service.recorder
        assert recorder is not None
        previous = recorder.on_commit

        def on_commit(batch: list[Reading]) -> None:
            if previous is not None:
                previous(batch)
            self.reporter.twins_changed({r.device_id for r in batch})

        recorder.on_commit = on_commit
        service.local_devices_handler = self.local_devices_changed
        service.state_listeners.append(self._on_state)
        service.applied_listeners.append(self._on_applied)

    async def run(self, service: MapperService) -> None:
        assert self.state_path is not None
        if self.catalog.restore(self.state_path):
            log.info("restored %d device(s) and %d model(s) from %s until edgecore answers",
                     len(self.catalog.devices), len(self.catalog.models), self.state_path)
            async with self._lock:
                try:
                    await self._apply()
                except MapperStopping:  # a stop during the start-up: nothing to start
                    return
                except Exception as exc:  # noqa: BLE001 - the other devices run on, these are tried again
                    # (Ended here, the task group's failure ended the whole mapper, local devices too.)
                    self._restore_pending = True
                    log.error("cannot start the %d device(s) restored from %s: %s: %s; running without them, "
                              "trying again until that works or edgecore's registration reply is adopted. Is the "
                              "twin %s locked by another process, read-only or on a full disk?",
                              len(self.catalog.devices), self.state_path, type(exc).__name__, exc,
                              service.config.twin.path, exc_info=not isinstance(exc, OSError | sqlite3.Error))
        await self.server.start()
        self.started.set()
        # Each loop is restarted if a bug escapes it: otherwise this task group, and with it the
        # mapper's, would end, stopping every device for a failure of the DMI side.
        cap = self.settings.register_backoff_max_s
        async with asyncio.TaskGroup() as tg:
            if self._restore_pending:
                tg.create_task(supervised("dmi.restore", self._retry_restore, cap), name="dmi.restore")
            tg.create_task(supervised("dmi.register", self._registration_loop, cap), name="dmi.register")
            tg.create_task(self.reporter.run(), name="dmi.reporter")  # supervises its own loops
            tg.create_task(supervised("dmi.watch-edgecore", self._watch_edgecore, cap), name="dmi.watch-edgecore")

    async def stop_requested(self, service: MapperService) -> None:
        # A change whose call was cancelled ends before the devices stop (it may start some).
        if self._changes:
            await asyncio.gather(*self._changes, return_exceptions=True)

    async def before_stop(self, service: MapperService) -> None:
        await self.server.stop()

    async def shutdown(self, service: MapperService) -> None:
        await self.server.stop(None)

    async def _retry_restore(self) -> None:
        """Start the restored devices the twin refused at start: tried again on a back-off (1 s doubling
        to register_backoff_max_s, logged a few lines a minute) until that works or another apply ran
        them (edgecore's reply adopted, a DMI call): before, they waited for edgecore's reply, for good
        with edgecore away, the very case the restore is for. Each try applies the catalog as it is
        then, under the lock: what edgecore sent meanwhile is applied, never undone by the saved state."""
        tries = 1  # the one at start
        while True:
            delay = retry_delay_s(tries + 1, self.settings.register_backoff_max_s)  # 1 s, 2 s, ... (jittered)
            await asyncio.sleep(delay)
            async with self._lock:
                if not self._restore_pending:  # superseded: an apply since ran the catalog
                    return
                tries += 1
                try:
                    await self._apply()
                except MapperStopping:
                    return
                except Exception as exc:  # noqa: BLE001 - still refused: tried again
                    if (held := self._restore_log("refused")) is not None:
                        log.error("still cannot start the %d device(s) restored from %s (%d tries): %s: %s; "
                                  "trying again%s", len(self.catalog.devices), self.state_path, tries,
                                  type(exc).__name__, exc, held_note(held))
                    continue
            log.info("started the %d device(s) restored from %s after %d tries, until edgecore answers",
                     len(self.catalog.devices), self.state_path, tries)
            return

    # -- registration ----------------------------------------------------------------------

    async def _registration_loop(self) -> None:
        failures = 0
        while True:
            reply = await self.client.register_until_done(before_attempt=self._start_journal)
            # The edgecore that answered: taken before the reply is adopted (which may take a while),
            # so a restart meanwhile shows as a new socket and we register again.
            self._registered_socket = self._socket_id()
            try:
                await self._adopt(reply)
            except Exception as exc:  # noqa: BLE001 - the twin database locked or full, a bug: register again
                # Maybe half applied: registering again gets a fresh reply, and adopting it starts
                # what is missing (update_devices touches only what differs).
                failures += 1
                self.adopt_failures += 1
                delay = retry_delay_s(failures, self.settings.register_backoff_max_s)
                environment = isinstance(exc, OSError | sqlite3.Error)
                log.error("cannot adopt edgecore's MapperRegister reply (%d device(s)): %s: %s; "
                          "registering again in %.1f s (attempt %d)", len(reply.deviceList),
                          type(exc).__name__, exc, delay, failures, exc_info=not environment and failures == 1)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.registrations += 1
            self.registered.set()
            log.info("registered with edgecore as %s (protocol %s): %d device(s), %d model(s)",
                     self.settings.name, self.settings.protocol, len(reply.deviceList), len(self.catalog.models))
            await self._lost.wait()
            self._lost.clear()
            self.registered.clear()
            log.info("edgecore went away or restarted: registering again")

    def _start_journal(self) -> None:
        self._journal = []
        self._journal_from = self._arrivals

    def _journaled(self, arrival: int, change: Callable[[Catalog], T]) -> T:
        """Make a change to the catalog (caller holds the lock), journaled while a registration is in flight."""
        result = change(self.catalog)
        # A call that arrived before the attempt was sent (it waited for the lock) is in edgecore's
        # reply, or superseded there: replayed over it, a device edgecore deleted since came back.
        if self._journal is not None and arrival > self._journal_from:
            self._journal.append(change)
        return result

    def _registration_lost(self) -> None:
        if self.registered.is_set():
            self._lost.set()

    def _socket_id(self) -> tuple[int, int, int] | None:
        # ctime too: a socket re-created at once may get the freed inode number back.
        try:
            st = os.stat(self.settings.edgecore_socket_file())
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    async def _watch_edgecore(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = self._socket_id()
            if self.registered.is_set() and now is not None and now != self._registered_socket:
                self._lost.set()

    async def _adopt(self, reply: pb.MapperRegisterResponse) -> None:
        if len(reply.modelList) != len(reply.deviceList):
            log.warning("MapperRegister reply has %d models for %d devices (expected parallel lists)",
                        len(reply.modelList), len(reply.deviceList))
        async with self._lock:
            # The reply is what edgecore had when it built it: the calls that reached us since the
            # request was sent (a device deleted, one registered) may be missing from it, and edgecore
            # does not send them again. Replacing the catalog with the reply alone kept a deleted
            # device running (saved, reported: edgecore refuses its reports) or dropped a new one.
            journal, self._journal = self._journal or [], None
            self.catalog.replace(list(reply.deviceList), list(reply.modelList))
            for change in journal:
                change(self.catalog)
            if journal:
                log.info("%d DMI call(s) that arrived while registering applied on top of edgecore's reply",
                         len(journal))
            try:
                await self._apply()
            except MapperStopping:
                log.info("stopping: edgecore's registration reply is not applied")
        async with self._models_changed:
            self._models_changed.notify_all()

    # -- the catalog -> the running devices ------------------------------------------------

    async def local_devices_changed(self, local: LoadResult) -> dict[str, list[DeviceId]]:
        """SIGHUP: new local YAML devices; edgecore's devices keep running next to them.

        A new local device with the namespace/name of a running edgecore device wins here too:
        the edgecore device stops (logged, reported offline, kept in the catalog) and the local
        one starts, as at a start with both (see Catalog.build)."""
        async with self._lock:
            self._local = local
            return await self._apply()

    async def _apply(self) -> dict[str, list[DeviceId]]:
        """Run exactly what the catalog validates to (plus local YAML devices); caller holds the lock.

        A device of the catalog shadowed by a local YAML device of the same namespace/name does not
        run (the local one does, under that id) and is reported offline after every apply; nothing
        of the local device (its states, twins) is reported under its name (see `_shadowed`).

        A device of the catalog that does not run and was never reported (restored at start, in a
        registration reply, or registered later: a resource another device holds, a driver missing
        after an upgrade, invalid) is reported offline once, and its states go on as a stopped
        device's do: edgecore may still show it online from before a restart, or as it was before it
        was refused, and nothing else would tell it.
        """
        assert self.service is not None and self.state_path is not None
        built = self.catalog.build(self._local)
        shown = {str(w) for w in built.warnings}
        for warning in sorted(shown - self._warned):  # a local file's are logged at start and reload
            log.warning("device from edgecore: %s", warning)
        self._warned = shown
        # Disjoint: build() leaves out an edgecore device with a local device's namespace/name.
        merged = LoadResult(
            devices={**self._local.devices, **built.devices},
            models={**self._local.models, **built.models},
            warnings=[*self._local.warnings, *built.warnings],
            unrunnable={**self._local.unrunnable, **built.unrunnable},
            other_node=dict(self._local.other_node),  # (edgecore sends only this node's devices)
        )
        reported = set(built.devices) - set(built.unrunnable)
        state_every = {d: every for d in reported if (every := self._state_every(built.devices[d])) is not None}
        # A device edgecore still counts as ours that stops now (its update or its model's made it
        # invalid, it lost a resource): its states keep going, so edgecore hears it go offline.
        ours = self.catalog.device_ids()
        stopped = {d: every for d, every in self.reporter.state_every.items() if d in ours and d not in reported}
        not_running: list[DeviceId] = []
        for device_id in sorted(ours - reported - set(stopped)):
            if self._shadowed(device_id):
                every = self._state_every_of(self.catalog.devices[(device_id.namespace, device_id.name)])
                if every is not None:
                    stopped[device_id] = every
                continue
            definition = built.devices.get(device_id)
            every = (self._state_every(definition) if definition is not None
                     else self._state_every_of(self.catalog.devices[(device_id.namespace, device_id.name)]))
            if every is not None:
                stopped[device_id] = every
                not_running.append(device_id)
        # A shadowed device is reported offline after every apply: the local device of its name
        # may just have started or stopped (its own states are not reported under that name).
        not_running.extend(sorted(d for d in stopped if self._shadowed(d)))
        self.reporter.forget(reported | set(stopped), {**stopped, **state_every})
        ran = set(self.service.runners)
        try:
            changes = await self.service.update_devices(merged)
        finally:  # not running whatever the switch does (the reporter knows them now: reported once)
            for device_id in not_running:
                self.reporter.state_changed(device_id, OFFLINE)
        # The same on MQTT: `offline` on the availability of the catalog's devices that do not run
        # and have no definition (invalid, waiting for their model or a resource), as for a refused
        # local device. Not a shadowed one: its id is the local device's. (One that validated but
        # is refused, no driver here, is among the service's refused devices already.)
        await self.service.devices_not_run(
            {device_id: problem for key, problem in sorted(self.catalog.problems.items())
             if key not in self.catalog.shadowed and (device_id := DeviceId(*key)) not in merged.devices}, ran)
        self._restore_pending = False  # the catalog runs: restored devices still in it too
        try:
            self.catalog.save(self.state_path)
        except Exception as exc:  # noqa: BLE001 - a full disk, or a message protobuf cannot write: run on
            log.error("cannot save the KubeEdge state to %s: %s", self.state_path, exc)
        return changes

    def _shadowed(self, device_id: DeviceId) -> bool:
        """An edgecore device left out for a local YAML device of the same namespace/name."""
        return (device_id.namespace, device_id.name) in self.catalog.shadowed

    def _state_every_of(self, device: pb.Device) -> float | None:
        """`_state_every` of a device that did not validate (its stateReport as edgecore sent it)."""
        if not device.HasField("status"):
            return self.settings.report_interval_s
        if not device.status.reportToCloud:
            return None
        return device.status.reportCycle / 1000 if device.status.reportCycle > 0 else self.settings.report_interval_s

    def _state_every(self, definition: DeviceDefinition) -> float | None:
        """The device's state re-send period in seconds, or None for `stateReport.reportToCloud: false`.

        `reportCycle` is in milliseconds; 0 (or no stateReport at all) means the global
        `report_interval_s`, so a CRD without a cycle does not spend edgecore's node-wide
        1 call/s on states.
        """
        report = definition.device.spec.state_report
        if report is None:
            return self.settings.report_interval_s
        if not report.report_to_cloud:
            return None
        return report.report_cycle / 1000 if report.report_cycle > 0 else self.settings.report_interval_s

    async def _change(self, change: Callable[[int], Awaitable[T]]) -> T:
        """Run a catalog change and its apply under the lock, to the end, in a task of its own.

        grpc.aio cancels a handler once edgecore's deadline passes, and a stop may take that long
        (a driver call in progress). Cancelled half way, the catalog held the new spec while the
        device stayed stopped, and the state file was not saved; resending the same change then
        found an identical device and did nothing. The call may still end DEADLINE_EXCEEDED for
        edgecore; the mapper ends consistent with what it accepted.
        """
        self._arrivals += 1
        arrival = self._arrivals

        async def locked() -> T:
            async with self._lock:
                try:
                    return await change(arrival)
                except MapperStopping as exc:  # edgecore sends it again to the next mapper's registration
                    raise DmiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

        return await to_the_end(locked(), self._changes, "a DMI change (edgecore had given up on its call)")

    async def _put_device(self, device: pb.Device) -> None:
        """RegisterDevice and UpdateDevice alike: an update may be the first this mapper hears of a
        device too (one moved to our protocol: edgecore routes its update by the new protocol), and
        its model may not be here; both wait for it (bounded) and say so if it does not come."""
        if not device.name or not device.spec.deviceModelReference:
            raise DmiError(grpc.StatusCode.INVALID_ARGUMENT, "device name and spec.deviceModelReference are required")
        key = device_key(device)
        DeviceId(*key)  # ValueError -> INVALID_ARGUMENT

        async def put(arrival: int) -> None:
            if self._journaled(arrival, lambda catalog: catalog.put_device(device)):
                await self._apply()

        await self._change(put)
        if key in self.catalog.shadowed:
            # The local YAML device of that name wins; not INVALID_ARGUMENT: the device is kept, and
            # starts if the local one is removed. edgecore only logs it: the message says where it is.
            raise DmiError(grpc.StatusCode.FAILED_PRECONDITION, self.catalog.problems[key])
        if model_of(device) not in self.catalog.models:
            await self._wait_for_model(device)
        problem = self.catalog.problems.get(key)
        if problem and key in self.catalog.conflicts:
            # Valid, but a resource it claims (a GPIO pin ...) is held by another device. It stays in
            # the catalog and starts when that frees up, hence not INVALID_ARGUMENT. edgecore only
            # logs the error (it does not retry), so the message names the device and the resource.
            raise DmiError(grpc.StatusCode.FAILED_PRECONDITION, problem)
        if problem and model_of(device) in self.catalog.models:
            raise DmiError(grpc.StatusCode.INVALID_ARGUMENT, problem)

    async def _wait_for_model(self, device: pb.Device) -> None:
        """edgecore may send a device before its model: wait (bounded); the device starts when it comes."""
        wanted = model_of(device)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.model_wait_s), self._models_changed:
                await self._models_changed.wait_for(lambda: wanted in self.catalog.models)
        if wanted not in self.catalog.models:
            raise DmiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"DeviceModel {wanted[0]}/{wanted[1]} not received within {self.settings.model_wait_s:g} s; "
                f"device {device_key(device)[0]}/{device.name} is kept and starts when the model arrives",
            )

    # -- DeviceMapperService handlers (mapper.dmi.server.Handler) --------------------------

    async def register_device(self, device: pb.Device) -> None:
        await self._put_device(device)

    async def update_device(self, device: pb.Device) -> None:
        await self._put_device(device)

    async def remove_device(self, namespace: str, name: str) -> None:
        async def remove(arrival: int) -> None:
            if self._journaled(arrival, lambda catalog: catalog.remove_device((namespace or "default", name))) is not None:
                await self._apply()

        await self._change(remove)

    async def put_model(self, model: pb.DeviceModel) -> None:
        if not model.name:
            raise DmiError(grpc.StatusCode.INVALID_ARGUMENT, "model name is required")
        key = model_key(model)
        invalid = None
        try:  # the model alone, as a YAML file's model is checked; kept either way (see below)
            load_objects([(f"dmi:DeviceModel {key[0]}/{key[1]}", model_document(model, self.catalog.protocol))])
        except ValueError as exc:
            invalid = str(exc)

        async def put(arrival: int) -> list[str]:
            running = set(self.service.runners) if self.service is not None else set()
            # ConversionError for an invalid id: not kept
            if not self._journaled(arrival, lambda catalog: catalog.put_model(model)):
                return []
            try:
                await self._apply()
            finally:  # (here, not after the call: a caller past its deadline still wakes the devices waiting)
                async with self._models_changed:
                    self._models_changed.notify_all()
            # Devices of this model that ran before and are refused now: the model is kept (as
            # edgecore has it), but the call says which devices it stopped, and why.
            return [problem for dkey, problem in sorted(self.catalog.problems.items())
                    if model_of(self.catalog.devices[dkey]) == key and DeviceId(*dkey) in running]

        broken = await self._change(put)
        if invalid:
            # Kept, as edgecore has it: its devices are refused with this message until it is fixed.
            raise DmiError(grpc.StatusCode.INVALID_ARGUMENT, invalid)
        if broken:
            raise DmiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"DeviceModel {key[0]}/{key[1]} is kept, but it stops {len(broken)} running device(s): "
                           + "; ".join(broken))

    async def remove_model(self, namespace: str, name: str) -> None:
        async def remove(arrival: int) -> None:
            if self._journaled(arrival, lambda catalog: catalog.remove_model((namespace or "default", name))) is not None:
                await self._apply()

        await self._change(remove)

    async def get_device(self, namespace: str, name: str) -> pb.Device:
        key = (namespace or "default", name)
        device = self.catalog.devices.get(key)
        if device is None:
            raise DmiError(grpc.StatusCode.NOT_FOUND,
                           f"device {clipped(key[0], 80)}/{clipped(name, 80)} is not known to this mapper")
        assert self.service is not None
        device_id = DeviceId(*key)
        definition = self.service.definitions.devices.get(device_id) if self.service.definitions else None
        if definition is None or self._shadowed(device_id):  # (shadowed: that is the local device's)
            raise DmiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"device {device_id} is not running: {self.catalog.problems.get(key, 'unknown reason')}")
        readings = await self._read_now(definition)
        found = await self._read_twin(device_id, running_only=False)
        out = pb.Device()
        out.CopyFrom(device)
        status = fresh_status(definition, found[1] if found else None, readings, self.reporter.left_out)
        status.reportToCloud, status.reportCycle = device.status.reportToCloud, device.status.reportCycle
        out.status.CopyFrom(status)
        return out

    async def _read_now(self, definition: DeviceDefinition) -> dict[str, tuple[object, int]]:
        assert self.service is not None
        runner = self.service.runners.get(definition.id)
        readings = {}
        if runner is None:
            return readings
        for prop in definition.properties:
            # Recorded, failed or not; within loop.on_demand_min_interval_s of the property's last
            # reading, that reading (the sensor's limits hold for edgecore's calls too).
            reading = (await runner.read_on_demand(prop)).reading
            if reading.quality == GOOD:  # not an error, nor out of the model's range
                readings[prop.name] = (reading.value, reading.taken_at_ms)
        return readings

    # -- feeding the reporter --------------------------------------------------------------

    async def _read_twin(
        self, device_id: DeviceId, *, running_only: bool = True
    ) -> tuple[DeviceDefinition, DeviceTwin] | None:
        service = self.service
        if service is None or service.definitions is None:
            return None
        definition = service.definitions.devices.get(device_id)
        if definition is None or (running_only and device_id not in service.runners):
            return None
        if self._shadowed(device_id):  # the local device of that name: its twin is not edgecore's
            return None
        try:
            twin = await service.twin(lambda s: s.device(device_id))
        except UnknownDevice:
            return None
        return definition, twin

    def _on_state(self, definition: DeviceDefinition, state: str, detail: str | None) -> list[OutMessage]:
        if self._shadowed(definition.id):  # the local device's state, not the edgecore device's (offline)
            return []
        self.reporter.state_changed(definition.id, state)
        return []

    async def _on_applied(self, change: DesiredChange, error: str | None) -> None:
        self.reporter.twins_changed({change.device_id})

