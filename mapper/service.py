"""The running mapper: definitions -> drivers -> device loops -> twin (-> event bus).

Owns the task group. A device whose driver is missing is refused with the loader's
message; the others run. A device loop that crashes is logged and restarted, so one
device never takes the mapper down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from devices.definitions import DeviceDefinition
from devices.drivers.base import load_driver
from devices.errors import DefinitionError
from devices.ids import DeviceId
from devices.loader import LoadResult
from mapper.config import MapperConfig, TwinSettings
from mapper.device_loop import OFFLINE, DeviceRunner, StuckCall
from mapper.finish import to_the_end
from mapper.logs import Throttle, held_note
from mapper.machine import Machine, this_machine
from mapper.recorder import Recorder
from mapper.store_worker import StoreWorker
from mapper.ticks import next_tick, sleep_to_tick
from mapper.twin_disk import innermost as _innermost
from mapper.twin_disk import lock_holder, lock_note, twin_disk_problem, twin_write_cause, write_denied
from twin.records import AdminLock
from twin.store import DesiredChange, OutboxLimits, OutMessage, TwinStore, unusable_twin

log = logging.getLogger("mapper.service")
# The twin's detail of a device's `offline` after a clean stop.
STOPPED_DETAIL = "stopped: the mapper stopped"

# Readings deleted per twin transaction when pruning history: about 0.4 ms of the twin thread here.
PRUNE_STEP = 1000
# How often an overloaded mapper says how many reads missed their collect slot.
MISSED_READS_CHECK_S = 60
# Telemetry dropped by the outbox limits is logged at once, then at most a line per this many seconds.
OUTBOX_DROPS_LOG_S = 60.0

Hook = Callable[["MapperService"], Awaitable[None]]

# A twin that cannot be opened or written at start because its disk is full or read-only is
# waited for (MapperService._start_twin): tried again after the first of these many
# seconds, the wait doubling up to the second; the log repeats the error at most once a minute.
# Exiting instead made systemd give up for good (the unit's start limit then, StartLimitBurst=5 in
# StartLimitIntervalSec=300: ~30 s of restarts), and the mapper stayed down after the disk had room again.
TWIN_RETRY_S = (5.0, 30.0)
TWIN_WAIT_LOG_S = 60.0
# A twin another process holds locked at start is tried again this soon, each try (the first one
# too) waiting this long for the lock; a SIGHUP reload waiting for the lock tries again this soon.
# It is free as soon as that process's transaction ends.
TWIN_LOCKED_RETRY_S = 1.0
# While waiting, extensions are told this often (systemd: STATUS=, EXTEND_TIMEOUT_USEC=, WATCHDOG=1).
TWIN_WAIT_TICK_S = 5.0
# Why a device an extension keeps is not run (MapperService.not_run), in the running and STATUS= lines.
NOT_RUN_WHY = "invalid, or waiting for their model or a resource"
# At a stop, how long each twin call waits for another process's lock (an sqlite3 shell, a VACUUM)
# before it fails, not twin.busy_timeout_ms: the stop's few writes then fit systemd's TimeoutStopSec
# after the call waiting when it began (StoreWorker.hurry).
STOP_BUSY_S = 1.0


class OutboxDropLog:
    """Warns about the telemetry the outbox limits (twin.outbox_max_rows, twin.outbox_max_bytes)
    drop, oldest first, while the broker does not take the messages: a line when the dropping
    starts, then at most a line a minute (mapper.logs.Throttle) with the count since the last
    line; the total is in the twin (counters('outbox_dropped'), `mapper devices`, STATUS=).

    `dropped` is the store's on_outbox_dropped: called in the twin thread after each commit
    that dropped (one call a commit, never one a message). `flush` (the event loop, once a
    minute, and at the stop) logs what was dropped since the last line once the throttle lets
    it: the drops of an outage's last minute are logged too. Dropping starts again after no
    drop for `interval_s`; its first line is logged at once.
    """

    def __init__(self, twin: TwinSettings, interval_s: float = OUTBOX_DROPS_LOG_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._twin = twin
        self._interval_s = interval_s
        self._clock = clock
        self._throttle = Throttle(burst=1, interval_s=interval_s, clock=clock)
        self._lock = threading.Lock()  # dropped() runs in the twin thread, flush() in the loop's
        self.total = 0  # dropped since start
        self._unlogged = 0  # ... since the last line
        self._limits: set[str] = set()  # the limits over (rows, bytes) since the last line
        self._last_drop: float | None = None
        self._starting = False  # the next line is the first of a new run of drops

    def dropped(self, count: int, limits: frozenset[str]) -> None:
        with self._lock:
            now = self._clock()
            if self._last_drop is None or now - self._last_drop >= self._interval_s:
                self._starting = True
                self._throttle.reset("dropped")  # the start is logged at once
            self._last_drop = now
            self.total += count
            self._unlogged += count
            self._limits |= limits
            self._log(force=False)

    def flush(self, *, force: bool = False) -> None:
        """Log the drops since the last line, if the throttle lets it (or `force`: at the stop)."""
        with self._lock:
            self._log(force=force)

    def _log(self, *, force: bool) -> None:
        if not self._unlogged or (self._throttle("dropped") is None and not force):
            return
        settings = {"rows": ("twin.outbox_max_rows", f"{self._twin.outbox_max_rows} messages"),
                    "bytes": ("twin.outbox_max_bytes", f"{self._twin.outbox_max_bytes} bytes")}
        hit = [settings[k] for k in ("rows", "bytes") if k in self._limits] or list(settings.values())
        where = " and ".join(f"{name} ({value})" for name, value in hit)
        names = " or ".join(name for name, _ in hit)
        if self._starting:
            log.warning("outbox full at %s: the oldest telemetry is dropped, %d message%s so far. The broker does"
                        " not take the messages (unreachable? see the MQTT connection lines, mapper.mqtt), or not"
                        " as fast as they come; to keep more of them through an outage, raise %s",
                        where, self._unlogged, "" if self._unlogged == 1 else "s", names)
        else:
            log.warning("outbox: %d more telemetry message%s dropped at %s since the last line, %d since the start"
                        " (the broker does not take them: see the mapper.mqtt lines; or raise %s)",
                        self._unlogged, "" if self._unlogged == 1 else "s", where, self.total, names)
        self._starting = False
        self._unlogged = 0
        self._limits = set()


class MapperStopping(RuntimeError):
    """A device set switch asked for once the stop began: refused, it would start again devices the
    stop is stopping (a DMI call or a registration reply arriving during the wind-down)."""


class MapperService:
    def __init__(self, config: MapperConfig, definitions: LoadResult | None = None) -> None:
        self.config = config
        self.definitions = definitions
        self.runners: dict[DeviceId, DeviceRunner] = {}
        # Driver calls stuck after their runner let go (a reload): the device's next runner waits for them.
        self.stuck_calls: dict[DeviceId, StuckCall] = {}
        self.refused: dict[DeviceId, str] = {}
        # Devices an extension keeps but does not run and has no definition of (KubeEdge: an edgecore
        # Device that did not validate, or waits for its DeviceModel or for a resource another device
        # holds), with why; set by `devices_not_run`. Their ids are DeviceIds, validated. The event
        # bus announces them `offline` at every connect, as it does the refused devices.
        self.not_run: dict[DeviceId, str] = {}
        self.ready = asyncio.Event()
        # Readings a stop could not commit (the twin's disk full or read-only): `mapper run` exits 1.
        self.uncommitted_at_stop = 0
        self.worker: StoreWorker | None = None
        self.outbox_drops = OutboxDropLog(config.twin)
        self.recorder: Recorder | None = None
        self._desired_wake = asyncio.Event()
        # Device states the twin could not take (see _on_state): the newest per device, retried.
        self._unsaved_states: dict[DeviceId, tuple[DeviceDefinition, str, str | None]] = {}
        self._states_unsaved = asyncio.Event()
        self._state_calls: dict[DeviceId, int] = {}  # per device: which _on_state call is the newest
        self._state_saves: set[asyncio.Future[None]] = set()  # state writes still running (see _on_state)
        # A device's state changes are written at most once per this many seconds (see _on_state);
        # the event bus sets it to mqtt.state_interval_ms. 0: every change at once.
        self.state_interval_s = 1.0
        self._state_written_at: dict[DeviceId, float] = {}  # per device: when its last write began (loop clock)
        self._state_held: dict[DeviceId, tuple[DeviceDefinition, str, str | None]] = {}  # the latest, held back
        self._state_timers: dict[DeviceId, asyncio.TimerHandle] = {}  # writing what is held, once the interval passed
        self._state_log = Throttle(burst=1, interval_s=60.0)
        self._tasks: dict[DeviceId, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Future[None]] = set()  # device releases still running (see stop_device)
        self._updates: set[asyncio.Future[Any]] = set()  # device set switches still running (see update_devices)
        self._update_lock = asyncio.Lock()
        self._stopping = False  # the wind-down began: no device set switch any more (MapperStopping)
        self._tg: asyncio.TaskGroup | None = None
        # Extensions (event bus, inference, DMI, systemd) hook in here. Each has
        # `async setup(service)` (before devices start), `async run(service)` (a task in the
        # service's task group) and `async shutdown(service)` (after devices stopped); optionally
        # `stop_requested` (first thing on a stop), `before_stop` (devices stopped, tasks running) and
        # `config_problems(config, definitions)` (what of the config the devices make wrong: the start
        # and a SIGHUP reload are refused with them), `twin_waiting(service, why)` (every few seconds
        # while the start waits for the twin, before setup)
        # and `derived_devices()` (the twin devices it ran itself, such as inference pipelines': a clean
        # stop marks them `offline` with the devices).
        self.extensions: list[Any] = []
        # Called once everything is loaded and set up, just before the device loops start (the
        # last moment a pause costs no reading: `mapper run` collects its start-up garbage here).
        self.before_devices: list[Callable[[], Any]] = []
        # Called on every device state change; the messages they return are queued in the same transaction.
        self.state_listeners: list[Callable[[DeviceDefinition, str, str | None], Iterable[OutMessage]]] = []
        self.applied_listeners: list[Callable[[DesiredChange, str | None], Awaitable[None]]] = []
        # The devices locked for maintenance (`mapper lock`, another process), when they change.
        self.lock_listeners: list[Callable[[dict[DeviceId, AdminLock]], None]] = []
        self.locks: dict[DeviceId, AdminLock] = {}
        # Called with the new definitions whenever the running device set changes.
        self.device_listeners: list[Callable[[dict[DeviceId, DeviceDefinition]], None]] = []
        # Called once a switch of the device set (a reload, a KubeEdge update) is done, with the ids
        # of the devices it added to the node's set and removed from it, and the definitions before
        # and after (the event bus's $hw membership/updated).
        self.membership_listeners: list[Callable[[list[DeviceId], list[DeviceId], dict[DeviceId, DeviceDefinition],
                                                  dict[DeviceId, DeviceDefinition]], Awaitable[None]]] = []
        # Called with the devices newly in `not_run` that did not run before (see devices_not_run).
        self.not_run_listeners: list[Callable[[list[DeviceId]], Awaitable[None]]] = []
        # Called before each attempt to open the twin at start (`mapper run`: take the twin's lock
        # if it could not be made before, on a read-only disk); may raise to stop the start.
        self.before_twin_open: list[Callable[[], None]] = []
        # Set by the event bus once its first connection attempt finished (systemd READY waits for it).
        self.bus_first_attempt: asyncio.Event | None = None
        # The EventBusExtension when MQTT is configured (others use it to publish and subscribe).
        self.bus: Any = None
        # Where a SIGHUP reload sends the new YAML devices; an extension that adds devices of its
        # own (KubeEdge: edgecore's) merges them. None: `update_devices` with the YAML alone.
        self.local_devices_handler: Callable[[LoadResult], Awaitable[dict[str, list[DeviceId]]]] | None = None
        # The machine this runs on (mapper.machine; read at start, `machine_source` in tests), and the
        # other machine the twin last ran on when it came from one (a cloned card): extensions see it
        # in their setup (the event bus makes a new client id) and add what they did to `machine_notes`
        # for the start's warning.
        self.machine_source: Callable[[], Machine] = this_machine
        self.machine: Machine | None = None
        self.machine_before: Machine | None = None
        self._machine_recorded: str | None = None  # the twin's record, as read at start
        # Whether this start made the twin file (none, or an empty one, before it): no mapper ran on it.
        self.twin_new = False
        self.machine_notes: list[str] = []

    # -- the twin --------------------------------------------------------------------------

    def _open_store(self, busy_timeout_s: float | None = None) -> TwinStore:
        """`busy_timeout_s`: instead of twin.busy_timeout_ms (a start's tries for a locked twin)."""
        t = self.config.twin
        store = TwinStore.open(
            t.path, synchronous=t.synchronous, check_same_thread=False,
            outbox=OutboxLimits(max_rows=t.outbox_max_rows, max_bytes=t.outbox_max_bytes),
            busy_timeout_s=t.busy_timeout_ms / 1000 if busy_timeout_s is None else busy_timeout_s,
        )
        store.on_outbox_dropped = self.outbox_drops.dropped
        return store

    def _twin_writable_again(self) -> None:
        """The recorder committed after failed commits: each device's twin writes that wait are tried now."""
        for runner in self.runners.values():
            runner.twin_takes_writes()

    async def twin(self, fn):  # noqa: ANN001, ANN201 - thin pass-through to the worker
        assert self.worker is not None
        return await self.worker.call(fn)

    def desired_changed(self) -> None:
        """Tell the service a desired value was stored in this process (apply it now)."""
        self._desired_wake.set()

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if self.definitions is None:
            self.definitions = self.config.load_devices()
        # Mistakes of the config's own settings that only the devices reveal (an inference pipeline
        # naming a property its device lacks): refused, as a bad device file is; nothing starts half-configured.
        problems = [p for ext in self.extensions if (check := getattr(ext, "config_problems", None)) is not None
                    for p in check(self.config, self.definitions.devices, unrunnable=self.definitions.unrunnable,
                                   other_node=self.definitions.other_node)]
        if problems:
            raise DefinitionError(problems)
        for warning in self.definitions.warnings:
            log.warning("%s", warning)
        runnable = {k: v for k, v in self.definitions.devices.items() if k not in self.definitions.unrunnable}
        from devices import w1

        for warning in w1.host_warnings(runnable):  # (a reload warns of the devices it starts only)
            log.warning("%s", warning)
        for device_id, problem in self.definitions.unrunnable.items():
            self.refused[device_id] = str(problem)
            log.error("refusing device %s: %s", device_id, problem)
        try:
            self.twin_new = os.stat(self.config.twin.path).st_size == 0
        except FileNotFoundError:
            self.twin_new = True
        except OSError:  # (said by the twin's open, which names the file)
            pass
        started = await self._start_twin(stop)
        if started is None:
            log.info("mapper %s stopped while waiting for its twin %s", self.config.node, self.config.twin.path)
            return
        async with started as worker:  # (open already: closed at the end)
            self.worker = worker
            t = self.config.twin
            self.recorder = Recorder(worker, batch_max=t.batch_max, batch_delay_s=t.batch_delay_ms / 1000,
                                     max_waiting=t.waiting_max_readings, commit_interval_s=t.commit_interval_ms / 1000)
            self.recorder.on_writable_again.append(self._twin_writable_again)
            for ext in self.extensions:
                await ext.setup(self)
            await self._record_machine(worker)
            for hook in self.before_devices:
                hook()
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    tg.create_task(self.recorder.run(), name="recorder")
                    tg.create_task(self._desired_loop(), name="desired")
                    tg.create_task(self._prune_loop(), name="prune-history")
                    tg.create_task(self._missed_reads_loop(), name="missed-reads")
                    tg.create_task(self._outbox_drops_loop(), name="outbox-drops")
                    tg.create_task(self._state_retry_loop(), name="state-retry")
                    for definition in runnable.values():
                        self.start_device(definition, tg)
                    for ext in self.extensions:
                        tg.create_task(ext.run(self), name=type(ext).__name__)
                    await self._first_opens()
                    if not self.config.node_chosen:
                        log.warning("no `node` in the config: running as node %r, the host name (its topics are under"
                                    " %s/%s/); set `node:` to keep them whatever the host is called (a mapper before"
                                    " this version was `edge-node` without it)", self.config.node,
                                    self.config.push_topics().prefix, self.config.node)
                    log.info(
                        "mapper %s running: %d device(s), %d refused%s, twin %s",
                        self.config.node, len(self.runners), len(self.refused),
                        f", {len(self.not_run)} not run ({NOT_RUN_WHY})" if self.not_run else "", t.path,
                    )
                    self.ready.set()
                    await stop.wait()
                    await self._wind_down()
                    raise _Stop
            except* _Stop:
                pass
            finally:
                await self._shutdown()

    async def _start_up_writes(self, worker: StoreWorker) -> None:
        assert self.definitions is not None
        definitions = self.definitions
        await worker.call(lambda s: s.sync_devices(definitions.devices.values()))
        await worker.call(lambda s: s.deactivate_devices(definitions.devices))
        for device_id, problem in self.refused.items():
            await worker.call(lambda s, d=device_id, p=problem: s.set_state(d, OFFLINE, p))
        if self.machine is None:
            self.machine = await asyncio.to_thread(self.machine_source)
        self._machine_recorded = await worker.call(lambda s: s.meta("machine"))
        before = Machine.from_json(self._machine_recorded) if self._machine_recorded is not None else None
        self.machine_before = before if before is not None and before.differs_from(self.machine) else None
        node = self.config.node
        last = await worker.call(lambda s: s.swap_meta("node", node))
        if last is not None and last != node:
            prefix = self.config.push_topics().prefix
            log.warning("this twin last ran as node %r, now as %r%s: the topics moved from %s/%s/ to %s/%s/, and apps, "
                        "the bridge (rendered for a node) and the cloud still use the old ones; set `node: %s` to "
                        "keep them", last, node, "" if self.config.node_chosen else " (the host name: renamed?)",
                        prefix, last, prefix, node, last)

    async def _record_machine(self, worker: StoreWorker) -> None:
        """After the extensions' setup (the event bus has its client id): the start's warning when
        the twin came from another machine, and this machine recorded in the twin. Recorded last, so
        that a start that dies before the client id is made new finds the other machine again."""
        machine, before = self.machine, self.machine_before
        assert machine is not None
        if before is not None:
            t = self.config.twin
            named = "set in the config" if self.config.node_chosen else "the host name"
            log.warning(
                "this twin (%s) last ran on another machine: %s; now on %s. The twin and the MQTT client id kept "
                "beside it came from that machine: a cloned SD card, or a card moved to a new board?%s%s A clone "
                "runs as node %r like the original (%s, which a clone shares) and publishes on its topics: through "
                "the bridges, every clone's readings mix under %s/%s/ in the cloud. On a clone: give each Pi a "
                "unique `node:` in the config, and render its broker ACL and bridge.conf for that node "
                "(mosquitto/render.sh: a copied bridge.conf also has the original's bridge client ids). A card moved "
                "on purpose: nothing to do; this machine is recorded now, and the next start does not warn",
                t.path, before.describe(), machine.describe(), " " if self.machine_notes else "",
                " ".join(self.machine_notes), self.config.node, named, self.config.push_topics().prefix,
                self.config.node)
        current = machine.to_json()
        if self._machine_recorded == current:
            return
        try:
            await worker.call(lambda s: s.swap_meta("machine", current))
        except Exception as exc:  # noqa: BLE001 - a full disk: the next start compares again
            log.warning("cannot record this machine in the twin %s (%s): the next start compares with the one "
                        "recorded before", self.config.twin.path, exc)

    async def _start_twin(self, stop: asyncio.Event) -> StoreWorker | None:
        """The twin thread with the twin open and the start's writes made (the device list, the
        refused devices' states); None when `stop` came first.

        A twin its disk keeps from being opened or written (twin_disk_problem: full, read-only) is
        waited for: an ERROR naming the twin, the likely cause and what to do, then
        tries again after TWIN_RETRY_S (5 s, doubling up to 30 s), the ERROR again at most once a
        minute; extensions with `twin_waiting(service, why)` hear every TWIN_WAIT_TICK_S (systemd:
        STATUS=, the start timeout extended; READY=1 only once running). A twin another process
        holds locked (a backup, a `mapper twin set`, an sqlite3 shell left in a transaction) is
        waited for likewise, each try waiting TWIN_LOCKED_RETRY_S for the lock, with a WARNING
        naming the holder when the kernel tells it (twin_disk.lock_holder) after the first; it used
        to stop the start. Other errors stop the
        start at once, naming the twin."""
        path = self.config.twin.path
        loop = asyncio.get_running_loop()
        delay, tries, since = TWIN_RETRY_S[0], 0, loop.time()
        locked = False  # the last try met another process's lock
        logged: tuple[float, tuple[str, ...]] | None = None  # when the ERROR was last logged, and its kind
        while True:
            for hook in self.before_twin_open:
                hook()
            tries += 1
            # Each try waits at most TWIN_LOCKED_RETRY_S for another process's lock, the first one too:
            # the WARNING naming the holder comes at once, not after twin.busy_timeout_ms (30 s) of
            # silence, and a stop meanwhile is not held up for 30 s (TimeoutStopSec=30 would kill the
            # mapper). The twin that started waits twin.busy_timeout_ms again.
            busy_ms = self.config.twin.busy_timeout_ms
            opener = functools.partial(self._open_store, min(TWIN_LOCKED_RETRY_S, busy_ms / 1000))
            worker, doing = StoreWorker(opener), "open"
            try:
                await worker.__aenter__()
                doing = "write"
                await self._start_up_writes(worker)
                await worker.call(lambda s: s.conn.execute(f"PRAGMA busy_timeout={busy_ms}"))
            except Exception as exc:
                if doing == "write":
                    with contextlib.suppress(Exception):
                        await worker.__aexit__(None, None, None)
                problem = twin_disk_problem(exc, path)
                locked = problem is None and twin_write_cause(exc, path) == "locked"
                if locked:  # (another process's transaction ends by itself: a backup, a `mapper twin set`)
                    problem = lock_note(path)
                if problem is None:  # someone must act: the start stops, naming the twin (SQLite does not)
                    if (unusable := unusable_twin(path, exc)) is not None:  # a damaged page found by a write
                        raise unusable from exc
                    if isinstance(exc, sqlite3.Error) and str(path) not in str(exc):
                        denied = write_denied(path)  # (SQLite's "attempt to write a readonly database")
                        raise type(exc)(f"cannot {doing} the twin {path} at start: {exc}"
                                        + (f": {denied[0]} (its mode, or an immutable flag: lsattr)" if denied
                                           else "")) from exc
                    raise
                error = f"cannot {doing} the twin {path}: {_innermost(exc)}: {problem}"
                kind = (doing, str(_innermost(exc)), problem.split(" (")[0])  # (not the KiB free, which moves)
            else:
                if tries > 1:
                    log.warning("the twin %s can be opened and written again after %.0f s (%d tries): starting",
                                path, loop.time() - since, tries)
                return worker
            now = loop.time()
            if locked:  # the try waited for the lock itself (its busy timeout): the next one a second later
                if logged is None or logged[1] != kind or now - logged[0] >= TWIN_WAIT_LOG_S:
                    log.warning("%s. The devices start once it is released; waiting %.0f s so far, %d tries; this"
                                " line at most once a minute", error, now - since, tries)
                    logged = (now, kind)
            elif logged is None or logged[1] != kind or now - logged[0] >= TWIN_WAIT_LOG_S:
                log.error("%s. The mapper waits for it, trying again every %g-%g s (no exit: systemd would give up"
                          " restarting it); waiting %.0f s so far, %d tries; this line at most once a minute",
                          error, *TWIN_RETRY_S, now - since, tries)
                logged = (now, kind)
            deadline = now + (TWIN_LOCKED_RETRY_S if locked else delay)
            while (left := deadline - loop.time()) > 0:
                status = f"waiting for the twin since {loop.time() - since:.0f} s ({tries} tries): {error}"
                for ext in self.extensions:
                    waiting = getattr(ext, "twin_waiting", None)
                    if waiting is not None:
                        with contextlib.suppress(Exception):
                            waiting(self, status)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, TWIN_WAIT_TICK_S)):
                        await stop.wait()
                if stop.is_set():
                    return None
            if not locked:
                delay = min(delay * 2, TWIN_RETRY_S[1])

    async def _first_opens(self, limit_s: float = 30.0) -> None:
        """Wait (bounded) until every driver's first open() attempt returned: "running" means started."""
        waits = [r.first_open_done.wait() for r in self.runners.values()]
        if waits:
            try:
                async with asyncio.timeout(limit_s):
                    await asyncio.gather(*waits)
            except TimeoutError:
                slow = [str(d) for d, r in self.runners.items() if not r.first_open_done.is_set()]
                log.warning("still opening after %g s: %s", limit_s, ", ".join(slow))

    async def _wind_down(self) -> None:
        """Before the task group is cancelled: stop devices, commit their last readings, and let
        extensions that need the running tasks (the event bus draining its outbox) finish."""
        self._stopping = True  # a switch asked for from now on (DMI, a registration reply) is refused
        if self.worker is not None:
            self.worker.hurry(STOP_BUSY_S)
        for ext in self.extensions:
            stop_requested = getattr(ext, "stop_requested", None)
            if stop_requested is not None:
                with contextlib.suppress(Exception):
                    await stop_requested(self)
        while self._updates:  # a switch begun before the stop ends first, or it would start devices after this
            await asyncio.gather(*self._updates, return_exceptions=True)
        # The device states held back by the pacing (_on_state) are written now, and every change
        # from here on at once: the twin ends with each device's last state, and the `offline`
        # the event bus queues (before_stop, after the writes below) is the last word.
        for device_id in list(self._state_timers):
            self._write_held_state(device_id)
        await self.stop_devices(list(self._tasks))
        if self._state_saves:  # the last state changes' messages reach the outbox before it drains
            await asyncio.gather(*self._state_saves, return_exceptions=True)
        if self._unsaved_states:
            # Kept for a twin that was locked: written now, their `online` came after the stop's
            # `offline` (the retry loop ran on while the outbox drained) and the broker kept it.
            # The devices are stopped: the event bus says `offline` for each (before_stop).
            dropped = ", ".join(f"{d} ({entry[1]})" for d, entry in self._unsaved_states.items())
            self._unsaved_states.clear()
            log.warning("stopping: device states the twin could not take are not written, the devices are "
                        "stopped: %s", dropped)
        if self.recorder is not None:
            try:
                await self.recorder.flush()
            except Exception as exc:  # noqa: BLE001 - the outbox is still drained and the twin closed
                self.uncommitted_at_stop = self.recorder.waiting()
                recorder = self.recorder
                why = ("another process holds its lock (a backup, a `mapper twin` command, an sqlite3 shell)?"
                       if twin_write_cause(exc, self.config.twin.path) == "locked" else "is its disk full or read-only?")
                log.error("stopping with %d readings not committed to the twin %s (%s): they are lost%s; %s "
                          "Everything committed before is kept%s", self.uncommitted_at_stop,
                          self.config.twin.path, exc,
                          f" ({recorder.waiting_seen_live()} of them went out live)" if recorder.waiting_seen_live() else "",
                          why, f"; {recorder.dropped + recorder.dropped_live} older ones were dropped meanwhile"
                          " (twin.waiting_max_readings)" if recorder.dropped or recorder.dropped_live else "")
        # Last added, first stopped: inference acts on its last decisions and the API servers
        # close before the event bus (added first) drains the outbox they may still add to.
        for ext in reversed(self.extensions):
            before_stop = getattr(ext, "before_stop", None)
            if before_stop is not None:
                try:
                    await before_stop(self)
                except Exception as exc:  # noqa: BLE001 - stopping goes on regardless
                    log.warning("%s: error while stopping: %s", type(ext).__name__, exc)

    async def _stopped_offline(self) -> None:
        """A clean stop leaves every device it ran `offline` in the twin, as the event bus leaves
        its availability and state view (before_stop): `mapper twin get` said `state=ok` for a relay
        the stop had switched off, next to MQTT's `offline`. (A crash leaves the last state.) The
        extensions' derived devices too (an inference pipeline's stayed `ok`); they come back `ok`
        when the pipeline is registered again at the next start."""
        ran = [d for d in (self.definitions.devices if self.definitions else {}) if d not in self.refused]
        for ext in self.extensions:
            derived = getattr(ext, "derived_devices", None)
            if derived is not None:
                with contextlib.suppress(Exception):  # the devices are marked regardless
                    ran.extend(derived())
        if not ran:
            return
        try:
            await self.twin(lambda s: s.set_states(ran, OFFLINE, STOPPED_DETAIL))
        except Exception as exc:  # noqa: BLE001 - a locked twin or a full disk: the stop goes on
            log.warning("stopping: cannot mark the devices offline in the twin (%s); it keeps their last state", exc)

    async def _shutdown(self) -> None:
        for timer in self._state_timers.values():
            timer.cancel()
        self._state_timers.clear()
        # (Runners still here: the task group failed. Closed as a stop closes them, never
        # waiting on the event loop for a stuck bus.)
        runners, self.runners = list(self.runners.values()), {}
        with contextlib.suppress(Exception):
            await asyncio.gather(*(runner.close_when_idle() for runner in runners), *self._closing)
        if self.recorder is not None:
            with contextlib.suppress(Exception):
                await self.recorder.flush()
        for ext in reversed(self.extensions):
            with contextlib.suppress(Exception):
                await ext.shutdown(self)
        # After the task group's end: a twin another process holds locked delays this write only
        # (busy_timeout), not the cancel of the extensions' tasks (the inference timer's) or the drain.
        # A clean stop only (_wind_down ran): a task group that failed leaves the last states, as a crash does.
        if self._stopping:
            await self._stopped_offline()
        self.outbox_drops.flush(force=True)  # the drops since the last line, if any
        if self.uncommitted_at_stop:  # (said at ERROR when it happened, with the cause)
            log.info("mapper %s stopped: drivers closed, %d readings lost (the twin could not take them)", self.config.node,
                     self.uncommitted_at_stop)
        else:
            log.info("mapper %s stopped: drivers closed, twin flushed", self.config.node)

    async def wait_for_twin_lock(self, said: logging.Logger, what: str) -> None:
        """Until the twin takes a write: while another process holds its lock past twin.busy_timeout_ms
        (a backup, a `mapper twin set`, an sqlite3 shell), a WARNING naming the holder (at most once
        a minute) and another try. Any other error is left to the write that follows to say.
        `what`: what waits ("the reload"). MapperStopping once the stop began.

        The try runs in the twin thread behind the device loops' commits, each waiting the busy
        timeout (30 s as shipped) for the lock: a try not done after TWIN_LOCKED_RETRY_S names the
        holder at once when the kernel tells one (twin_disk.lock_holder), not after that silence."""
        path = self.config.twin.path
        loop = asyncio.get_running_loop()
        since, warned_at = loop.time(), None

        def warn(note: str) -> None:
            nonlocal warned_at
            warned_at = loop.time()
            said.warning("%s waits for the twin %s: %s; the devices run as before meanwhile (waiting %.0f s"
                         " so far; this line at most once a minute)", what, path, note, loop.time() - since)

        while True:
            if self._stopping:
                raise MapperStopping(f"the mapper is stopping: {what} is not done")
            attempt = asyncio.ensure_future(self.twin(lambda s: s.take_write_lock()))
            try:
                while not (await asyncio.wait({attempt}, timeout=TWIN_LOCKED_RETRY_S))[0]:
                    if warned_at is None or loop.time() - warned_at >= TWIN_WAIT_LOG_S:
                        if await asyncio.to_thread(lock_holder, path) is not None:  # (not a slow commit of ours)
                            warn(await asyncio.to_thread(lock_note, path))
                await attempt
            except sqlite3.Error as exc:
                if twin_write_cause(exc, path) != "locked":
                    return
                if warned_at is None or loop.time() - warned_at >= TWIN_WAIT_LOG_S:
                    warn(lock_note(path))
                await asyncio.sleep(TWIN_LOCKED_RETRY_S)
                continue
            finally:
                attempt.cancel()  # (a cancelled wait: the try itself runs on in the twin thread)
            if warned_at is not None:
                said.info("the twin's write lock is released after %.0f s: %s goes on", loop.time() - since, what)
            return

    async def update_devices(self, result: LoadResult) -> dict[str, list[DeviceId]]:
        """Switch to a new set of definitions, touching only devices that were added, changed or removed.

        Used by SIGHUP reloads and by KubeEdge DMI updates. Returns what happened to whom.

        Once begun, a switch runs to its end in a task of its own, one switch at a time: a caller
        cancelled meanwhile (a DMI call past edgecore's deadline, while a stop waits for a driver
        call in progress) used to leave the devices it had stopped for the switch stopped, and the
        definitions half switched. The caller still sees its CancelledError; a stop waits for the switch.
        """
        if self._stopping:
            raise MapperStopping("the mapper is stopping: the device set is not switched any more")
        return await to_the_end(self._update_devices(result), self._updates, "a device update")

    async def _update_devices(self, result: LoadResult) -> dict[str, list[DeviceId]]:
        async with self._update_lock:
            if self._stopping:  # it waited for the lock while the stop began
                raise MapperStopping("the mapper is stopping: the device set is not switched any more")
            return await self._switch_devices(result)

    async def _switch_devices(self, result: LoadResult) -> dict[str, list[DeviceId]]:
        assert self._tg is not None and self.definitions is not None
        old = {k: v for k, v in self.runners.items()}
        new = {k: v for k, v in result.devices.items() if k not in result.unrunnable}
        removed = [k for k in old if k not in new]
        added = [k for k in new if k not in old]
        # A new origin (local YAML <-> edgecore) restarts the device even with equal documents.
        changed = [k for k in new if k in old and (old[k].definition.fingerprint != new[k].fingerprint
                                                   or old[k].definition.origin != new[k].origin)]
        await self.stop_devices(removed + changed)
        was_refused, previous = dict(self.refused), self.definitions
        # No await from here to the twin's sync_devices being handed to the twin thread: a $hw
        # request checked against the new definitions queues its twin call behind that write
        # (one thread, calls in order), so it finds the added devices there. If the twin refuses
        # the write, the previous definitions come back and the router answers such a request
        # as one for a device not known (eventbus.router.Router._twin_call).
        self.definitions = result
        try:
            for listener in self.device_listeners:
                listener(result.devices)
            self.refused = {k: str(p) for k, p in result.unrunnable.items()}
            await self.twin(lambda s: s.sync_devices(result.devices.values()))
            await self.twin(lambda s: s.deactivate_devices(result.devices))
        except Exception:
            # The twin refused the new set (a lock held past its timeout, a full disk): the update
            # is not made, and the devices stopped for it run again as they were.
            self.definitions, self.refused = previous, was_refused
            for listener in self.device_listeners:
                with contextlib.suppress(Exception):
                    listener(previous.devices)
            for device_id in removed + changed:
                self.start_device(old[device_id].definition, self._tg)
            raise
        for device_id in added:
            self.start_device(new[device_id], self._tg)
        for device_id in changed:
            self.start_device(new[device_id], self._tg, replaces=old[device_id].state)
        from devices import w1

        # (As at start, for the devices this switch starts: one moved onto the 1-wire pin is told why it fails.)
        for warning in w1.host_warnings({k: new[k] for k in added + changed}):
            log.warning("%s", warning)
        for device_id, runner in old.items():  # kept as it was: a reload retries its failed writes too
            if device_id in new and device_id not in changed:
                runner.retry_failed_desired()
        # What stopped (refused now, or gone) says so, as at start-up: offline in the twin, and to
        # the state listeners (the device's retained availability on MQTT goes offline).
        for device_id, problem in self.refused.items():
            log.error("refusing device %s: %s", device_id, problem)
            if device_id not in was_refused:  # newly refused: said once, not at every reload
                await self._on_state(result.devices[device_id], OFFLINE, problem)
        for device_id in removed:
            if device_id not in result.devices:
                await self._on_state(old[device_id].definition, OFFLINE,
                                     "stopped by a device update: removed, or waiting for a resource another device holds")
        if added or changed:
            self.desired_changed()
        joined = [k for k in result.devices if k not in previous.devices]
        left = [k for k in previous.devices if k not in result.devices]
        if joined or left:
            for membership_listener in self.membership_listeners:
                try:
                    await membership_listener(joined, left, previous.devices, result.devices)
                except Exception as exc:  # noqa: BLE001 - the switch is done: only its announcement failed
                    log.error("devices updated, but %r failed on it: %s", membership_listener, exc)
        # Refused by this switch (no driver, another node's): a reload that adds such a file is not "nothing changed".
        refused = [device_id for device_id in self.refused if device_id not in was_refused]
        log.info("devices updated: %d added, %d changed, %d removed%s", len(added), len(changed), len(removed),
                 f", {len(refused)} refused" if refused else "")
        return {"added": added, "changed": changed, "removed": removed, "refused": refused}

    async def devices_not_run(self, devices: dict[DeviceId, str], ran: Collection[DeviceId] = ()) -> None:
        """An extension's devices it keeps but does not run now, with why (`not_run`). Those new there
        and not in `ran` (the devices running before the switch that left them out, which said
        `offline` as they stopped) go to the not_run_listeners: a previous run may have left
        `online` on their availability, as it may for a refused local device."""
        newly = [d for d in devices if d not in self.not_run and d not in ran]
        if set(devices) != set(self.not_run):  # the running line counted those of the start only
            if devices:
                log.info("%d device(s) kept but not run (%s; announced offline): %s", len(devices), NOT_RUN_WHY,
                         ", ".join(sorted(map(str, devices))))
            else:
                log.info("no device kept but not run any more")
        self.not_run = dict(devices)
        if not newly:
            return
        for listener in self.not_run_listeners:
            try:
                await listener(newly)
            except Exception as exc:  # noqa: BLE001 - the switch is done: only its announcement failed
                log.error("devices not run, but %r failed on them: %s", listener, exc)

    async def stop_devices(self, device_ids: list[DeviceId]) -> None:
        """Stop these devices together: each may wait for a stuck bus, and those waits overlap."""
        await asyncio.gather(*(self.stop_device(device_id) for device_id in device_ids))

    async def stop_device(self, device_id: DeviceId) -> None:
        """Stop one device's loop and release its driver.

        The release runs on in a task of its own if the caller is cancelled meanwhile (a DMI
        call past its deadline, a reload at shutdown): a driver must not stay open, holding its
        pin, with no runner left to close it. Shutdown waits for those too.
        """
        task = self._tasks.pop(device_id, None)
        runner = self.runners.pop(device_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Its last state, if held back by the pacing (_on_state), is written now; a runner started
        # for it again (a reload that changes it) starts afresh: its first state change at once.
        self._write_held_state(device_id)
        self._state_written_at.pop(device_id, None)
        if runner is not None:
            await to_the_end(_release(runner), self._closing, f"{device_id}: releasing its driver")

    def start_device(self, definition: DeviceDefinition, tg: asyncio.TaskGroup, *, replaces: str | None = None) -> None:
        """Run a device; `replaces`: the state of its runner a reload stopped for a new definition."""
        driver_cls = load_driver(definition.protocol)
        runner = DeviceRunner(
            definition, driver_cls(definition), self._record,
            settings=self.config.loop, on_state=self._on_state, on_applied=self._on_applied, twin=self.twin,
            flush=self.recorder.flush if self.recorder is not None else None,
            record_on_demand=self.recorder.add_on_demand if self.recorder is not None else None,
            stuck_calls=self.stuck_calls, replaces=replaces,
        )
        self.runners[definition.id] = runner
        self._tasks[definition.id] = tg.create_task(self._supervise(runner), name=f"device[{definition.id}]")

    def _record(self, reading) -> None:  # noqa: ANN001
        assert self.recorder is not None
        self.recorder.add(reading)

    async def _supervise(self, runner: DeviceRunner) -> None:
        attempt = 0
        while True:
            try:
                await runner.run()
                return
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - keep the other devices running (a driver's BaseException too)
                attempt += 1
                log.exception("%s: device loop crashed (%s); restarting", runner.id, exc)
                await runner.close_when_idle()
                await asyncio.sleep(min(30.0, 2**attempt))
                # A value the crash left pending (its apply not recorded) goes to the restarted loop
                # now, not at the desired poll's backstop (10 s): this process's writes wake no poll.
                self.desired_changed()

    async def _on_state(self, definition: DeviceDefinition, state: str, detail: str | None) -> None:
        """A device's state changed: into the twin, with the messages the listeners make of it.

        When the twin cannot be written (a full disk, another process holding its lock) the
        device goes on reading (its readings wait in the recorder, bounded) instead of its loop
        failing on this write and restarting with a back-off, taking nothing meanwhile: the
        newest state of each device is kept and written, messages and all, once the twin can be.

        Shielded: a device stopped while its state waits for the twin (a stop, a reload) cancels
        the wait, not the write, and the write's messages still reach the publisher (they used to
        be committed with nobody told, and stayed in the outbox until the next start).

        Coalesced per device to one write per state_interval_s (the event bus's
        mqtt.state_interval_ms), the listeners' messages with it: the first change at once; one
        within the interval after a write is held back, and the device's state then (the latest,
        exact) is written once the interval has passed. A device that flaps (`unhealthy` -> `ok`
        twice per collect cycle with failure_threshold 1) made a twin transaction per change, tens
        a second: SD-card wear, and the twin's lock taken from everyone else. `offline` (a device a
        reload removes or refuses) goes at once and supersedes what is held back, as does every
        change once the stop began (_wind_down writes what is held back first).
        """
        device = definition.id
        interval = self.state_interval_s
        loop = asyncio.get_running_loop()
        now = loop.time()
        if interval > 0 and not self._stopping and state != OFFLINE:
            last = self._state_written_at.get(device)
            if device in self._state_timers or (last is not None and now - last < interval):
                self._state_held[device] = (definition, state, detail)
                self._unsaved_states.pop(device, None)  # superseded by this one
                if device not in self._state_timers:
                    assert last is not None
                    self._state_timers[device] = loop.call_later(last + interval - now, self._write_held_state, device)
                return
        timer = self._state_timers.pop(device, None)
        if timer is not None:  # what it held back is superseded by this
            timer.cancel()
        self._state_held.pop(device, None)
        self._state_written_at[device] = now
        await to_the_end(self._save_state(definition, state, detail), self._state_saves,
                         f"{device}: saving its state {state!r}")

    def _write_held_state(self, device_id: DeviceId) -> None:
        """The interval after a device's last state write has passed (or the stop began): its
        latest state is written (in a task of its own, which the stop waits for: _state_saves)."""
        timer = self._state_timers.pop(device_id, None)
        if timer is not None:
            timer.cancel()
        held = self._state_held.pop(device_id, None)
        if held is None:
            return
        self._state_written_at[device_id] = asyncio.get_running_loop().time()
        task = asyncio.ensure_future(self._save_state(*held))
        self._state_saves.add(task)
        task.add_done_callback(self._state_saves.discard)
        task.add_done_callback(functools.partial(self._state_save_failed, device_id, held[1]))

    @staticmethod
    def _state_save_failed(device_id: DeviceId, state: str, task: asyncio.Future[None]) -> None:
        """A state listener's bug in a state's first save: said as the retry says it (the task's
        exception was only asyncio's 'Task exception was never retrieved', with a traceback)."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: state %s could not be saved and is given up: %s", device_id, state, exc,
                      exc_info=exc)

    async def _save_state(self, definition: DeviceDefinition, state: str, detail: str | None) -> None:
        self._unsaved_states.pop(definition.id, None)
        call = self._state_calls[definition.id] = self._state_calls.get(definition.id, 0) + 1
        messages: list[OutMessage] = []
        for listener in self.state_listeners:
            messages.extend(listener(definition, state, detail))
        try:
            rows = await self.twin(lambda s: s.set_state(definition.id, state, detail, messages))
        except sqlite3.Error as exc:
            if self._state_calls[definition.id] == call:  # (an older state failing after a newer one is moot)
                self._unsaved_states[definition.id] = (definition, state, detail)
                self._states_unsaved.set()
            held = self._state_log("unsaved")
            if held is not None:
                log.error("%s: state %s not saved in the twin (%s); the device goes on, the state is written once"
                          " the twin can be%s", definition.id, state, exc, held_note(held))
            return
        if rows and self.recorder is not None and self.recorder.on_outbox:
            self.recorder.on_outbox(rows)

    async def _state_retry_loop(self) -> None:
        """Write the device states the twin could not take, once a second while there are any
        (a round ends at the first that fails again: each waits for the twin's lock timeout).
        Not once the stop began: the devices are stopped, and what they said is dropped (_wind_down)."""
        while not self._stopping:
            await self._states_unsaved.wait()
            await sleep_to_tick(1.0)
            for device_id in list(self._unsaved_states):
                if self._stopping:
                    return
                entry = self._unsaved_states.get(device_id)
                if entry is None:
                    continue  # a newer state was saved meanwhile
                try:  # (not paced: at most once a second, and a newer state held back supersedes it)
                    await to_the_end(self._save_state(*entry), self._state_saves, f"{device_id}: saving its state")
                except Exception as exc:  # noqa: BLE001 - a listener's bug must not end the mapper from here
                    self._unsaved_states.pop(device_id, None)
                    log.error("%s: state %s could not be saved and is given up: %s", device_id, entry[1], exc)
                    continue
                if device_id in self._unsaved_states:
                    break
            if not self._unsaved_states:
                self._states_unsaved.clear()
                log.info("device states saved in the twin again")
                self._state_log.reset("unsaved")

    async def _on_applied(self, change: DesiredChange, error: str | None, *, pending: bool = False) -> None:
        """A device loop's result for a desired value: into the twin, then to the apply listeners.

        `pending`: the write failed; the value stays pending in the twin with its error, and the
        device loop writes it again (mapper.device_loop). The listeners still hear of the failed
        attempt at once (the twin protocol's document and delta, DMI): nobody waits for a retry.
        """
        if self.recorder is not None:
            await self.recorder.flush()  # the read-back reading is in the twin before anyone looks
        await self.twin(lambda s: s.mark_applied(change.device_id, change.property, change.version, error,
                                                 pending=pending))
        for listener in self.applied_listeners:
            await listener(change, error)

    async def _desired_loop(self) -> None:
        """Hand desired values to their devices: at once for this process, by polling for the CLI.

        A poll is two stat() calls: only when the twin files changed since the twin thread's
        last call (another process committed) does it ask SQLite, plus a backstop every 10 s.
        """
        assert self.worker is not None
        loop = asyncio.get_running_loop()
        interval = self.config.loop.desired_poll_ms / 1000
        backstop = max(10.0, interval)
        last_version: int | None = None
        asked_at = loop.time()
        while True:
            # On the clock grid (mapper.ticks): the same wake-up as the devices' reads.
            # asyncio.timeout_at, not wait_for: 3.11's wait_for can swallow a cancel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_tick(loop.time(), interval)):
                    await self._desired_wake.wait()
            woken = self._desired_wake.is_set()
            self._desired_wake.clear()
            version = None if woken or loop.time() - asked_at > backstop else self.worker.known_version()
            if version is None:
                version = await self.worker.data_version()
                asked_at = loop.time()
            if not woken and version == last_version:
                continue
            last_version = version
            locks = await self.twin(lambda s: s.admin_locks())
            if locks != self.locks:
                self.locks = locks
                for listener in self.lock_listeners:
                    listener(locks)
            for change in await self.twin(lambda s: s.pending_desired()):
                runner = self.runners.get(change.device_id)
                if runner is not None:
                    runner.submit_desired(change)

    async def _prune_loop(self) -> None:
        t = self.config.twin
        while True:
            try:
                deleted = await self.prune_history()
            except Exception as exc:  # noqa: BLE001 - a lock held too long, a full disk: pruned at the next tick
                log.warning("cannot prune the twin's history now, trying again in 30 s: %s", exc)
                deleted = 0
            if deleted:
                log.debug("pruned %d old readings", deleted)
            await sleep_to_tick(30)

    async def _missed_reads_loop(self) -> None:
        """Warn when reads missed their collect slot: a mapper that cannot keep up takes fewer
        readings than its devices ask for, and that must not go unnoticed."""
        seen: dict[DeviceId, int] = {}
        while True:
            await sleep_to_tick(MISSED_READS_CHECK_S)
            late = {d: r.missed_reads - seen.get(d, 0) for d, r in self.runners.items()}
            late = {d: n for d, n in late.items() if n > 0}
            seen = {d: r.missed_reads for d, r in self.runners.items()}
            if late:
                worst = max(late, key=lambda d: late[d])
                log.warning("%d reads missed their collect slot in the last %g s, on %d device(s) (most: %s, %d): "
                            "the mapper cannot keep up; fewer devices, a longer collectCycle or a faster machine",
                            sum(late.values()), MISSED_READS_CHECK_S, len(late), worst, late[worst])

    async def _outbox_drops_loop(self) -> None:
        """Log the outbox's drops not logged yet (OutboxDropLog: the last ones of an outage)."""
        while True:
            await sleep_to_tick(OUTBOX_DROPS_LOG_S)
            self.outbox_drops.flush()

    async def prune_history(self) -> int:
        """Prune in steps of PRUNE_STEP rows, each its own twin call: readings committed meanwhile
        wait for one step, not for the whole delete (30,000 rows every 30 s at 1,000 readings/s,
        about 6 ms in one transaction)."""
        t = self.config.twin
        total = 0
        while True:
            deleted = await self.twin(lambda s: s.prune_history(t.history_rows, t.history_age_s * 1000, PRUNE_STEP))
            total += deleted
            if deleted < PRUNE_STEP:
                return total


class _Stop(Exception):
    """Raised inside the task group to cancel every task on shutdown."""


async def _release(runner: DeviceRunner) -> None:
    """A stopped runner's driver closed, then the twin writes that wait for the twin made
    (DeviceRunner.write_what_waits): a stop used to drop them."""
    await runner.close_when_idle()
    await runner.write_what_waits()
