"""systemd integration for `Type=notify` units: readiness, status, watchdog, stopping.

A `MapperService` extension. With `NOTIFY_SOCKET` set (systemd sets it for Type=notify):

- `READY=1` once the service is ready (twin open, drivers started) and, when the event bus
  is configured, its first broker connection attempt has finished (`service.bus_first_attempt`);
- `STATUS=` a one-line summary (devices ok/unhealthy/refused, outbox depth; when not zero, the
  telemetry dropped by the outbox limits, the readings dropped while the twin could not be written
  and the outbox messages dropped as undeliverable, since the twin was created; the subscriptions
  the broker refused on the current connection; another mapper announcing itself for this node),
  refreshed when it changes;
- `WATCHDOG=1` every `WATCHDOG_USEC / 2` from a task on the event loop, so the pings stop
  when the loop hangs and systemd restarts the service (`WatchdogSec=` in the unit). The pings
  also stop while the twin thread (mapper.store_worker) is stalled: it has had a call waiting
  for more than `systemd.twin_stall_s` (default 60 s) without finishing any (a stuck fsync on a
  dying SD card, a deadlock). The loop would otherwise ping on while readings pile up in memory
  uncommitted. The stall is logged with the thread's stack and shown in `STATUS=`; if the thread
  finishes its calls again before systemd's timeout, the pings resume. The bound is above the 30 s
  a twin call may legitimately wait for another process's lock (TwinStore.open's `timeout`); long
  work such as pruning history is done in short calls (mapper.service.PRUNE_STEP). From the stall
  to the restart: `twin_stall_s` plus up to `WatchdogSec`;
- `STOPPING=1` as soon as shutdown starts;
- while the start waits for a twin whose disk is full or read-only (MapperService._start_twin),
  `STATUS=waiting for the twin ...` and `EXTEND_TIMEOUT_USEC=` every few seconds (`twin_waiting`),
  so the unit's start timeout does not end the wait; READY=1 only once it is over.

`render_unit` / `install_service` write the unit for `mapper install-service`.

The messages use the documented datagram protocol (sd_notify(3)): one AF_UNIX datagram of
`KEY=VALUE` lines to the socket named in `NOTIFY_SOCKET`; a leading `@` names an abstract socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, NamedTuple

from devices.extras import install_extra

if TYPE_CHECKING:
    from mapper.service import MapperService
    from eventbus.settings import MqttSettings
    from mapper.config import MapperConfig, SystemdSettings
    from mapper.dmi.settings import ApiSettings
    from mapper.store_worker import StoreWorker

log = logging.getLogger("mapper.systemd")


class Notifier:
    """Sends sd_notify messages; never raises (a missing systemd must not stop the mapper)."""

    def __init__(self, address: str) -> None:
        if not address or address[0] not in "/@":
            raise ValueError(f"NOTIFY_SOCKET {address!r} is not an absolute path or an @abstract name")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)  # a full socket buffer must not block the event loop

    def notify(self, *lines: str) -> bool:
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", lines, exc)
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Half of WATCHDOG_USEC, if the watchdog is meant for this process (WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2 / 1_000_000


def status_line(states: Iterable[str], refused: int, outbox: Mapping[str, int] | None,
                rejected_messages: int = 0, *, not_run: int = 0, readings_dropped: int = 0, undeliverable: int = 0,
                views_left_out: int = 0, subscriptions_refused: Iterable[str] = (), other_mapper: str | None = None,
                broker_down: str | None = None, cloud_silent: str | None = None) -> str:
    """`5 devices: 2 ok, 1 unhealthy, 2 not run (invalid, or waiting for their model or a resource); outbox 12
    queued, 5 dropped (outbox limits); 120 readings dropped (twin not writable); 3 messages undeliverable; state view
    of 1 device over the broker's packet limit, not sent (see the log); 4 MQTT messages refused; broker refused
    subscription(s) to mapper/n/+/+/+/set (see the log); ANOTHER MAPPER serves this node: host 'pi2', pid 812, ...
    (see the log); MQTT broker not connected since 2026-11-30 21:24:08Z: [code:135] Not authorized (see the log);
    no cloud worker answers since 2026-11-30 21:30:00Z, 3 offload(s) unanswered (see the log)`
    (pure, for STATUS=). `not_run`: the devices an extension keeps but
    does not run (MapperService.not_run, KubeEdge's), announced `offline` as the refused ones."""
    from mapper.service import NOT_RUN_WHY

    counts = Counter(states)
    total = sum(counts.values()) + refused + not_run
    parts = [f"{n} {state}" for state, n in sorted(counts.items())]
    if refused:
        parts.append(f"{refused} refused")
    if not_run:
        parts.append(f"{not_run} not run ({NOT_RUN_WHY})")
    text = f"{total} device{'s' if total != 1 else ''}" + (f": {', '.join(parts)}" if parts else "")
    if outbox is not None:
        text += f"; outbox {outbox.get('depth', 0)} queued"
        if outbox.get("dropped"):
            text += f", {outbox['dropped']} dropped (outbox limits)"  # since the twin was created
    if readings_dropped:  # since the twin was created (twin.waiting_max_readings)
        text += f"; {readings_dropped} reading{'s' if readings_dropped != 1 else ''} dropped (twin not writable)"
    if undeliverable:  # since the twin was created: refused by the broker, or over its packet limit
        text += f"; {undeliverable} message{'s' if undeliverable != 1 else ''} undeliverable"
    if views_left_out:  # now (eventbus.telemetry.Telemetry._over_limit): its error is logged every 10 minutes only
        text += (f"; state view of {views_left_out} device{'s' if views_left_out != 1 else ''} over the broker's "
                 "packet limit, not sent (see the log)")
    if rejected_messages:  # the log shows only a few a minute (mapper.logs.Throttle): the total is here
        text += f"; {rejected_messages} MQTT message{'s' if rejected_messages != 1 else ''} refused"
    if subscriptions_refused := list(subscriptions_refused):  # what is sent there never comes (MqttBus._check_granted)
        text += f"; broker refused subscription(s) to {', '.join(subscriptions_refused)} (see the log)"
    if other_mapper:  # heard on <prefix>/<node>/instance lately (eventbus/instance.py)
        text += f"; ANOTHER MAPPER serves this node: {other_mapper} (see the log)"
    if broker_down:  # MqttBus.down_since/last_error: nothing leaves the Pi meanwhile (the outbox grows)
        text += f"; MQTT broker not connected since {broker_down} (see the log)"
    if cloud_silent:  # InferenceExtension.cloud_silence: uncertain windows keep provisional edge answers meanwhile
        text += f"; no cloud worker answers {cloud_silent} (see the log)"
    return text


class SystemdExtension:
    """Args:
    notifier: where messages go.
    watchdog_s: seconds between WATCHDOG=1 pings (None: no watchdog).
    status_every_s: how often the STATUS= summary is recomputed.
    twin_stall_s: the pings stop while the twin thread has had work waiting this long without
        finishing any (StoreWorker.stalled_for).
    """

    def __init__(self, notifier: Notifier, *, watchdog_s: float | None = None, status_every_s: float = 5.0,
                 twin_stall_s: float = 60.0) -> None:
        self.notifier = notifier
        self.watchdog_s = watchdog_s
        self.status_every_s = status_every_s
        self.twin_stall_s = twin_stall_s
        self.ready_sent = asyncio.Event()
        self.twin_stalled = False  # the pings are held back: the twin thread is stalled
        self.held_pings = 0  # pings not sent because the twin thread was stalled (since start)
        self._stopping_sent = False
        self._status: str | None = None  # the summary last sent (None: send the next one whatever it is)
        self._losses_at_start: dict[str, int] = {}  # TwinStore.losses() when the service started

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None, settings: SystemdSettings | None = None) -> SystemdExtension | None:
        """The extension for this process, or None when not started by systemd with Type=notify."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET")
        if not address:
            return None
        return cls(Notifier(address), watchdog_s=watchdog_interval(env, os.getpid()),
                   status_every_s=settings.status_every_s if settings is not None else 5.0,
                   twin_stall_s=settings.twin_stall_s if settings is not None else 60.0)

    # While the start waits for the twin, each message gives systemd this long before the unit's
    # start timeout (TimeoutStartSec=120) would stop it: the next comes within TWIN_WAIT_TICK_S.
    TWIN_WAIT_EXTEND_S = 60

    def twin_waiting(self, service: MapperService, why: str) -> None:
        """The start waits for the twin (a full disk, a read-only file system: MapperService._start_twin),
        called every few seconds until it opens. STATUS= says what it waits for; EXTEND_TIMEOUT_USEC=
        keeps the start timeout from stopping the wait (systemd 236 on). WATCHDOG=1 too, although
        systemd arms the watchdog only once the start is complete: READY=1 comes only when the twin
        is open and the devices started, as always."""
        lines = [f"EXTEND_TIMEOUT_USEC={self.TWIN_WAIT_EXTEND_S * 1_000_000}", f"STATUS={why}"]
        if self.watchdog_s:
            lines.append("WATCHDOG=1")
        self.notifier.notify(*lines)

    async def setup(self, service: MapperService) -> None:
        self.notifier.notify("STATUS=starting: twin open, starting devices")
        # The losses counted in the twin before this process; this process's own are added from
        # the recorder's and the publisher's counts (they reach the twin only with a commit, and a
        # full disk is when they happen).
        with contextlib.suppress(Exception):
            self._losses_at_start = await service.twin(lambda s: s.losses())

    async def run(self, service: MapperService) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                if self.watchdog_s:
                    tg.create_task(self._watchdog(service), name="systemd-watchdog")
                tg.create_task(self._ready_then_status(service), name="systemd-status")
        except asyncio.CancelledError:
            self._stopping()
            raise

    async def stop_requested(self, service: MapperService) -> None:
        """SIGTERM arrived: tell systemd before the devices are stopped and the outbox drains."""
        self._stopping()

    async def shutdown(self, service: MapperService) -> None:
        self._stopping()
        self.notifier.notify("STATUS=stopped")
        self.notifier.close()

    def _stopping(self) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.notify("STOPPING=1", "STATUS=stopping: closing drivers, flushing the twin")

    async def _watchdog(self, service: MapperService) -> None:
        # Runs on the event loop: if the loop hangs, the pings stop and systemd restarts us. The
        # twin thread is checked before each ping: stalled, it holds the pings back too.
        assert self.watchdog_s is not None
        while True:
            if self._twin_healthy(service.worker):
                self.notifier.notify("WATCHDOG=1")
            else:
                self.held_pings += 1
            await asyncio.sleep(self.watchdog_s)

    def _twin_healthy(self, worker: StoreWorker | None) -> bool:
        stalled_s = worker.stalled_for() if worker is not None else 0.0
        if stalled_s <= self.twin_stall_s:
            if self.twin_stalled:
                self.twin_stalled = False
                self._status = None  # the status loop sends the summary again
                log.warning("the twin thread finishes its calls again: watchdog pings resumed (%d held back so far)",
                            self.held_pings)
            return True
        if not self.twin_stalled:
            assert worker is not None
            self.twin_stalled = True
            why = (f"twin thread stalled: {worker.pending()} call(s) waiting, none finished for {stalled_s:.1f} s;"
                   " watchdog pings stopped")
            self.notifier.notify(f"STATUS={why}")
            log.error("%s (systemd restarts the mapper unless it recovers); the twin thread is at:\n%s",
                      why, worker.thread_stack() or "(unknown)")
        return False

    async def _ready_then_status(self, service: MapperService) -> None:
        await service.ready.wait()
        first_attempt = getattr(service, "bus_first_attempt", None)
        if first_attempt is not None and not first_attempt.is_set():
            self.notifier.notify("STATUS=devices started; waiting for the first broker connection attempt")
            await first_attempt.wait()
        status = self._status = await self._summary(service)
        self.notifier.notify("READY=1", f"STATUS={status}")
        self.ready_sent.set()
        log.info("told systemd we are ready: %s", status)
        while True:
            await asyncio.sleep(self.status_every_s)
            # (Waits for the twin thread: while it is stalled, the watchdog's STATUS= stays.)
            latest = await self._summary(service)
            if latest != self._status:
                self._status = latest
                self.notifier.notify(f"STATUS={latest}")

    async def _summary(self, service: MapperService) -> str:
        outbox = None
        with contextlib.suppress(Exception):  # the summary must never stop the notifications
            outbox = await service.twin(lambda s: s.outbox_stats())
        states = [runner.state for runner in service.runners.values()]
        router = getattr(service.bus, "router", None)
        rejected = sum(n for kind, n in router.counts.items() if kind.startswith("rejected_")) if router else 0
        before = self._losses_at_start
        recorder = getattr(service, "recorder", None)
        publisher = getattr(service.bus, "publisher", None)
        bus = getattr(service.bus, "bus", None)
        instance = getattr(service.bus, "instance", None)
        telemetry = getattr(service.bus, "telemetry", None)
        other = instance.current_other() if instance is not None else None
        # (the inference extension, if any: mapper.inference.extension, imported only with a pipeline)
        inference = next((ext for ext in getattr(service, "extensions", ()) if hasattr(ext, "cloud_silence")), None)
        broker_down = None
        if bus is not None and bus.down_since is not None and not bus.connected.is_set():
            since = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(bus.down_since))
            broker_down = f"{since}: {bus.last_error}" if bus.last_error else since
        return status_line(states, len(service.refused), outbox, rejected, not_run=len(service.not_run),
                           readings_dropped=before.get("readings_dropped", 0) + (recorder.dropped if recorder else 0),
                           undeliverable=before.get("outbox_undeliverable", 0) + (publisher.undeliverable if publisher else 0),
                           views_left_out=telemetry.views_over_limit if telemetry is not None else 0,
                           subscriptions_refused=bus.refused_subscriptions if bus else (),
                           other_mapper=other.describe() if other is not None else None,
                           broker_down=broker_down,
                           cloud_silent=inference.cloud_silence() if inference is not None else None)


# -- the unit file (`mapper install-service`) --------------------------------------------------

UNIT_TEMPLATE = "mapper.service"  # shipped in this package
STATE_DIR = Path("/var/lib/mapper")
# The twin the unit gives the service (`Environment=MAPPER_TWIN__PATH=` in the template), whatever
# the config's twin.path says; install-service refuses a config whose twin.path is another file.
SERVICE_TWIN = STATE_DIR / "twin.db"
UNIT_FILE = Path("/etc/systemd/system/mapper.service")  # install-service's --unit-file default

# What the unit sets to keep the mapper small on a Pi (measured with onnxruntime loaded, VmRSS:
# 82.0 MiB plain, 80.5 with -OO, 78.7 with both; docs/benchmarks.md, Cost). -OO leaves out the
# docstrings of every module loaded (numpy's and pydantic's are most of them) and the mapper's
# type-narrowing asserts; two malloc arenas instead of eight per core stop the worker thread that
# imports numpy and onnxruntime from keeping an arena of its own, mostly free, for good. No debug
# ranges: the code objects of every module loaded keep their line numbers but not the column
# ranges that only a traceback's ^^^ carets use (RssAnon 39.95 -> 39.59 MiB with onnxruntime).
SERVICE_TUNING = {"PYTHONOPTIMIZE": "2", "MALLOC_ARENA_MAX": "2", "PYTHONNODEBUGRANGES": "1"}


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitSettings:
    config: Path
    python: str = sys.executable
    user: str = "mapper"
    groups: tuple[str, ...] = ("gpio",)
    watchdog_sec: int = 30
    stop_timeout_sec: int = 30
    # (field, directory) outside the state directory that the config writes to (`writable_dirs`).
    writable: tuple[tuple[str, Path], ...] = ()
    # (field, path) of the other files and directories the config names that the service reads
    # (`read_paths`): only looked at, for paths it will not see (under /tmp: PrivateTmp=yes).
    reads: tuple[tuple[str, Path], ...] = ()


def writable_dirs(config: MapperConfig) -> list[tuple[str, Path]]:
    """(field, directory) for each directory outside the state directory that the service writes
    to: in kubeedge mode the socket's (bound via a private `.dmi-*` directory made there) and the
    state file's. ProtectSystem=strict leaves every other directory read-only."""
    needs: list[tuple[str, Path]] = []
    if config.mode == "kubeedge" and config.kubeedge is not None:
        needs.append(("kubeedge.socket", config.kubeedge.socket.parent))
        if config.kubeedge.state_file is not None:  # default: beside the unit's twin, in the state dir
            needs.append(("kubeedge.state_file", config.kubeedge.state_file.parent))
    found: dict[Path, str] = {}
    for field, directory in needs:
        directory = Path(os.path.normpath(directory))
        if not directory.is_relative_to(STATE_DIR):
            found.setdefault(directory, field)
    return [(field, directory) for directory, field in found.items()]


def read_paths(config: MapperConfig) -> list[tuple[str, Path]]:
    """(field, path) of the files and directories the config names that the service reads: the
    `devices` entries, the MQTT password and TLS files, the inference models, the REST API's token
    file. (The twin is the unit's MAPPER_TWIN__PATH.)"""
    found: list[tuple[str, Path]] = [(f"devices[{i}]", entry) for i, entry in enumerate(config.devices)]
    if config.inference is not None:
        found.append(("inference.models_dir", config.inference.models_dir))
        # A model named by path (a bare name is looked up in models_dir, or the installed package's).
        found += [(f"inference.pipelines[{i}].model", config.inference.resolve_model(pipeline.model))
                  for i, pipeline in enumerate(config.inference.pipelines)
                  if "/" in pipeline.model or Path(pipeline.model).is_absolute()]
    if config.mqtt is not None:
        found.append(("mqtt.password_file", config.mqtt.password_file))
        if config.mqtt.tls is not None:
            found += [(f"mqtt.tls.{name}", getattr(config.mqtt.tls, name))
                      for name in ("ca_file", "cert_file", "key_file", "key_password_file")]
    if config.api is not None and config.api.enabled:
        found.append(("api.token_file", config.api.token_file))
        if config.api.tls is not None:
            found += [(f"api.tls.{name}", getattr(config.api.tls, name))
                      for name in ("cert_file", "key_file", "key_password_file")]
    return [(field, path) for field, path in found if path is not None]


# The unit's PrivateTmp=yes gives the service an empty /tmp and /var/tmp of its own.
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))


def under_private_tmp(path: Path) -> Path | None:
    """/tmp or /var/tmp when `path`, as written or with its symlinks resolved, lies under it (the
    service will not see it there), else None."""
    for candidate in (Path(os.path.normpath(path)), path.resolve()):
        for tmp in PRIVATE_TMP:
            if candidate.is_relative_to(tmp):
                return tmp
    return None


def systemd_quote(arg: str, *, dollar: bool = True) -> str:
    """One ExecStart= word: `%` and `$` escaped, quoted when it holds spaces or quotes.
    `dollar=False` for settings that expand no variables (a ReadWritePaths= path)."""
    escaped = arg.replace("%", "%%")
    if dollar:
        escaped = escaped.replace("$", "$$")
    if any(c.isspace() or c in "\"'\\;" for c in escaped):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def _one_line(field: str, value: str) -> None:
    """ValueError unless `value` can stand in one line of the unit. A unit file is read line by
    line, quotes or not: a newline in a path (a config's kubeedge.socket) ended the line there, and
    what followed was a directive of its own, such as `ExecStartPre=+...`, run as root."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{field}: {value!r} holds a control character (a newline, a tab, ...), which cannot"
                         " stand in a systemd unit (a newline would start a directive of its own): rename it")


def render_unit(settings: UnitSettings) -> str:
    """The unit for this installation, from the template shipped in the package."""
    for field, value in (("--config", str(settings.config)), ("the interpreter", settings.python),
                         ("--user", settings.user), *(("--groups", g) for g in settings.groups),
                         *((f"{settings.config}: {field}", str(path)) for field, path in settings.writable)):
        _one_line(field, value)
    template = resources.files("mapper").joinpath(UNIT_TEMPLATE).read_text(encoding="utf-8")
    command = [settings.python, "-m", "mapper", "run", "--config", str(settings.config)]
    precompile = [settings.python, "-m", "mapper.precompile", "--config", str(settings.config)]
    reload = [settings.python, "-m", "mapper", "reload", "--config", str(settings.config)]
    return Template(template).substitute(
        exec_start=" ".join(systemd_quote(word) for word in command),
        exec_reload=" ".join(systemd_quote(word) for word in reload),
        exec_start_pre=" ".join(systemd_quote(word) for word in precompile),
        tuning_environment="\n".join(f"Environment={key}={value}" for key, value in SERVICE_TUNING.items()),
        user=settings.user,
        group=primary_group(settings.user),
        groups=" ".join(settings.groups),
        read_write_paths="\n".join(f"ReadWritePaths={systemd_quote(str(path), dollar=False)}"
                                   for path in (STATE_DIR, *(d for _, d in settings.writable))),
        watchdog_sec=settings.watchdog_sec,
        stop_timeout_sec=settings.stop_timeout_sec,
    )


class InstalledService(NamedTuple):
    unit_file: Path
    config: Path  # the --config of its ExecStart=, resolved
    twin: Path    # the twin the service runs on: MAPPER_TWIN__PATH in the unit or a drop-in
    user: str = "root"  # its User= (systemd's default: root)
    groups: tuple[str, ...] = ()  # its SupplementaryGroups=


def installed_service(unit_file: Path | None = None) -> InstalledService | None:
    """The config, twin and user of the installed unit (`install-service`'s), from its ExecStart=,
    Environment=, User= and SupplementaryGroups= lines and those of its drop-ins (`systemctl edit mapper`); None when there is no
    such unit, it cannot be read, or it sets no twin (the service then uses the config's)."""
    import shlex

    unit_file = UNIT_FILE if unit_file is None else unit_file
    texts = []
    try:
        texts.append(unit_file.read_text(encoding="utf-8"))
        with contextlib.suppress(OSError):
            texts += [p.read_text(encoding="utf-8") for p in sorted(Path(f"{unit_file}.d").glob("*.conf"))]
    except (OSError, UnicodeError):
        return None
    config = twin = None
    user, groups = "root", []
    for text in texts:
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            if key == "User":
                user = value.strip() or "root"
            elif key == "SupplementaryGroups":
                groups = groups + value.split() if value.strip() else []  # (an empty one resets the list)
            if key not in ("ExecStart", "Environment"):
                continue
            try:
                words = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value.lstrip("-@:+!"))]
            except ValueError:
                continue
            if key == "ExecStart" and "--config" in words[:-1]:
                config = Path(words[words.index("--config") + 1])
            elif key == "Environment":
                for word in words:
                    name, _, setting = word.partition("=")
                    if name == "MAPPER_TWIN__PATH":
                        twin = Path(setting)
    if config is None or twin is None:
        return None
    return InstalledService(unit_file, config.resolve(), Path(os.path.normpath(twin)), user, tuple(groups))


def existing_groups(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(groups that exist on this system, groups that do not)."""
    found, missing = [], []
    for name in names:
        try:
            grp.getgrnam(name)
            found.append(name)
        except KeyError:
            missing.append(name)
    return found, missing


def primary_group(user: str) -> str:
    """The unit's Group=: an existing user's primary group (`nobody`'s is `nogroup` on Debian: a
    `Group=nobody` made the service fail with 216/GROUP), else the user's name (install-service
    creates the user with `useradd --user-group`)."""
    try:
        gid = pwd.getpwnam(user).pw_gid
    except KeyError:
        return user
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:  # a gid with no group entry: systemd takes the number
        return str(gid)


@dataclass(frozen=True, slots=True)
class ServiceUser:
    """Whom the unit runs as, for permission checks made as root (install-service runs under sudo).

    `uid` is None while the user does not exist yet (install-service creates it): it will then own
    nothing, and its groups are its own group (`Group=` in the unit) and `SupplementaryGroups=`,
    where they exist. Mode bits only: ACLs are not looked at.
    """

    name: str
    uid: int | None
    gids: frozenset[int]
    group: str = ""  # its primary group, the unit's Group= (primary_group)

    @classmethod
    def lookup(cls, name: str, groups: Iterable[str] = ()) -> ServiceUser:
        primary = primary_group(name)
        gids: set[int] = set()
        for group in (primary, *groups):
            with contextlib.suppress(KeyError):
                gids.add(int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            return cls(name, None, frozenset(gids), primary)
        gids.update(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)  # systemd adds them (initgroups)
        return cls(name, uid, frozenset(gids), primary)

    def denied(self, path: Path, want: int) -> Denied | None:
        """Why this user cannot `want` (os.R_OK, os.W_OK | os.X_OK ...) `path`, or None if it can.
        Every directory on the way needs search (x) permission, on the path as written and on the
        path its symlinks resolve to."""
        if self.uid == 0:
            return None
        resolved = path.resolve()
        for directory in (*reversed(path.parents), *reversed(resolved.parents)):
            if (why := self._lacks(directory, os.X_OK)) is not None:
                return why
        return self._lacks(resolved, want)

    def _lacks(self, path: Path, want: int) -> Denied | None:
        try:
            st = path.stat()
        except OSError as exc:
            return Denied(path, f"{path}: {exc.strerror or exc}", by_mode=False)
        if _has_acl(path):  # mode bits do not tell: a POSIX ACL may grant it (setfacl -m u:mapper:r)
            return None
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid in self.gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        if bits & want == want:
            return None
        return Denied(path, f"{path} is {_user_name(st.st_uid)}:{_group_name(st.st_gid)} {st.st_mode & 0o7777:04o}")


class Denied(NamedTuple):
    path: Path    # the file, or the directory on the way, that refuses
    detail: str   # `/etc/x is root:root 0600`, or `/etc/x: No such file or directory`
    by_mode: bool = True


def _has_acl(path: Path) -> bool:
    try:
        return any(name.startswith("system.posix_acl") for name in os.listxattr(path))
    except OSError:
        return False


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_service_secrets(mqtt: MqttSettings, user: ServiceUser, source: str) -> tuple[list[str], list[str]]:
    """The MQTT secrets as the service will meet them: (warnings, problems), every problem found.
    install-service runs as root, which reads any file: the start's own checks first (a missing
    file, a wrong key password), then whether the service user can read each file (a file with a
    POSIX ACL is left to it; the files of a check that failed already are not looked at again).
    The warning: the unit sets no password_env variable, so it must be added to the service's
    environment."""
    warnings: list[str] = []
    problems: list[str] = []
    files: list[tuple[str, Path | None]] = []
    if mqtt.password_env is not None and mqtt.password_file is None:
        # The variable belongs to the service's environment, not to the shell running this.
        warnings.append(f"warning: mqtt.password_env: the unit does not set {mqtt.password_env}: add it with"
                        f" `systemctl edit mapper` ([Service] EnvironmentFile= a root-only file holding"
                        f" {mqtt.password_env}=...), or use mqtt.password_file; without it the service cannot log in")
    elif (problem := _problem_of(mqtt.check_password, source)) is not None:  # as `mapper run` reports it
        problems.append(problem)
    else:
        files.append(("mqtt.password_file", mqtt.password_file))
    # Likewise: a wrong key password is a config error here, not at the service's start.
    if (problem := _problem_of(mqtt.check_tls, source)) is not None:
        problems.append(problem)
    elif mqtt.tls is not None:
        files += [(f"mqtt.tls.{name}", getattr(mqtt.tls, name))
                  for name in ("ca_file", "cert_file", "key_file", "key_password_file")]
    problems += [problem for field, path in files
                 if (problem := _service_cannot_read(field, path, user, source)) is not None]
    return warnings, problems


def _problem_of(check: Callable[[str], None], source: str) -> str | None:
    """What a start check (`check(source)` raising ValueError) finds, or None."""
    try:
        check(source)
    except ValueError as exc:
        return str(exc)
    return None


def _service_cannot_read(field: str, path: Path | None, user: ServiceUser, source: str, *,
                         owner_only: bool = False) -> str | None:
    """The problem, naming the field, with the command that fixes it, when the service user cannot
    read the secret file at `path` (None if it can): a chgrp to its group and g+r, or (`owner_only`,
    for a file the start refuses when its group may read it) a chown to it."""
    if path is None or (denied := user.denied(path, os.R_OK)) is None:
        return None
    where = denied.path
    if not denied.by_mode:
        fix = "fix the path"
    elif where == path.resolve():
        fix = (f"sudo chown {user.name} {where}" if owner_only
               else f"sudo chgrp {user.group or user.name} {where} && sudo chmod g+r {where}")
        if user.uid is None:  # its group comes with it
            fix = (f"{user.name!r} does not exist yet, create it first (sudo useradd --system --user-group"
                   f" --home-dir {STATE_DIR} --no-create-home --shell /usr/sbin/nologin {user.name}), then: {fix}")
    else:
        fix = f"open {where} to it, or move the file (e.g. to /etc/mapper)"
    return f"{source}: {field}: the service user {user.name!r} cannot read {path} ({denied.detail}): {fix}"


def check_service_token(api: ApiSettings, user: ServiceUser, source: str) -> list[str]:
    """api.token_file (and api.tls's files) as the service will meet them, every problem found: the start's checks
    (as root, which reads any file: a missing, empty or group/other-readable file is reported as `mapper run` reports
    it), then whether the service user can read them. The token file must be the service user's own (mode 0600): the
    fix is a chown, not check_service_secrets' chgrp and g+r, which the start would refuse."""
    problems: list[str] = []
    if (problem := _problem_of(api.check_token, source)) is not None:
        problems.append(problem)
    elif (problem := _service_cannot_read("api.token_file", api.token_file, user, source, owner_only=True)) is not None:
        problems.append(problem)
    # As root first: a key that is not the certificate's is said as `mapper run` says it.
    if (problem := _problem_of(api.check_tls, source)) is not None:
        problems.append(problem)
    elif api.tls is not None:
        problems += [problem for name in ("cert_file", "key_file", "key_password_file")
                     if (problem := _service_cannot_read(f"api.tls.{name}", getattr(api.tls, name), user,
                                                         source)) is not None]
    return problems


def check_service_reads(config_path: Path, config: MapperConfig, user: ServiceUser) -> list[str]:
    """The config file and the device files as the service will meet them (install-service runs as
    root, which reads any file): a problem naming each file whose own owner, group and mode keep
    the service user out (`sudo tee` under umask 077, a `chmod 600` for safety). A device directory
    must be listable too; its files are checked one by one, as `mapper run` reads them
    (devices.loader.yaml_files). A closed directory on the way is left to install_service's
    warning (`... is closed to other users`)."""
    from devices.loader import yaml_files

    wanted: list[tuple[str, Path, int]] = [("--config", config_path, os.R_OK)]
    for entry in config.devices:
        if entry.is_dir():
            wanted.append(("devices", entry, os.R_OK | os.X_OK))
    wanted += [("devices", file, os.R_OK) for file in yaml_files(config.devices) if file.exists()]
    problems = []
    for field, path, want in wanted:
        if (denied := user.denied(path, want)) is None:
            continue
        where = denied.path
        if not denied.by_mode or where != path.resolve():
            continue
        fix = f"sudo chmod {'o+rx' if want & os.X_OK else 'o+r'} {where}"  # they hold no secrets
        problems.append(f"{config_path}: {field}: the service user {user.name!r} cannot read {path}"
                        f" ({denied.detail}), so the service cannot start: {fix}")
    return problems


def unreachable_for_others(path: Path) -> Path | None:
    """The first directory above `path` that other users cannot enter (Bookworm homes are 0700)."""
    for parent in reversed(path.parents):
        with contextlib.suppress(OSError):
            if not parent.stat().st_mode & 0o001:
                return parent
    return None


def changeable_by_others(path: Path) -> tuple[Path, str] | None:
    """The first of the directories down to `path`, and `path` itself, that a user other than root
    can change, and how: owned by another user, or writable by a group other than root's or by every
    user (a sticky directory, /tmp, lets each user change only its own entries: passed, its entries
    are looked at in turn). A symbolic link is followed for the directories on the way, and not
    looked at itself (its directory decides who can replace it)."""
    path = Path(os.path.abspath(path))
    for entry in (*reversed(path.parents), path):
        try:
            st = os.lstat(entry) if entry == path else os.stat(entry)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_uid != 0:
            return entry, f"owned by {_user_name(st.st_uid)}"
        if st.st_mode & 0o002 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return entry, "writable by every user"
        if st.st_mode & 0o020 and st.st_gid != 0:
            return entry, f"writable by group {_group_name(st.st_gid)}"
    return None


def _holds_a_home(path: Path) -> bool:
    """`path` is, or lies above, a user's home directory (no `chown -R` advice for it)."""
    homes = {Path(user.pw_dir) for user in pwd.getpwall()} - {Path("/")}
    return any(home == path or home.is_relative_to(path) for home in homes)


def install_service(
    unit: str, settings: UnitSettings, unit_file: Path, *, system: bool = True,
    run: Callable[[list[str]], object] = lambda cmd: subprocess.run(cmd, check=True), dry_run: bool = False,
) -> Iterator[str]:
    """Create the service user, write the unit, reload systemd; yields a line per thing done.

    With `system=False` only the unit file is written (no user, no systemctl). With `dry_run`
    nothing is done and each line says what would be, with its command (`--dry-run`: a missing
    user is created by the install, so a dry run says so rather than leave it unsaid).
    """
    def step(cmd: list[str], done: str, would: str) -> str:
        if dry_run:
            return f"would {would}: {' '.join(cmd)}"
        run(cmd)
        return done

    if system:
        try:
            pwd.getpwnam(settings.user)
        except KeyError:
            yield step(["useradd", "--system", "--user-group", "--home-dir", str(STATE_DIR), "--no-create-home",
                        "--shell", "/usr/sbin/nologin", settings.user], f"created system user {settings.user!r}",
                       f"create system user {settings.user!r}")
        for group in settings.groups:
            yield step(["usermod", "--append", "--groups", group, settings.user],
                       f"added {settings.user!r} to group {group!r}", f"add {settings.user!r} to group {group!r}")
    if dry_run:
        yield f"would write {unit_file}"
    else:
        unit_file.parent.mkdir(parents=True, exist_ok=True)
        unit_file.write_text(unit, encoding="utf-8")
        yield f"wrote {unit_file}"
    if system:
        yield step(["systemctl", "daemon-reload"], "ran systemctl daemon-reload", "reload systemd")
    if not dry_run:
        yield from service_warnings(settings)


def service_warnings(settings: UnitSettings) -> Iterator[str]:
    """Every finding of service_checks as a `warning: ` line (what install_service prints after
    writing the unit: the soft ones, or all with `install-service --force`; `install-service`
    refuses to install while one says the service cannot start)."""
    for _, text in service_checks(settings):
        yield f"warning: {text}"


def service_checks(settings: UnitSettings) -> Iterator[tuple[bool, str]]:
    """What the installed service would meet, as (it cannot start, what and how to fix it).

    It cannot start: the mapper not installed for the unit's interpreter, the interpreter or the
    config behind a directory the service user cannot enter (not for root), a `ReadWritePaths=`
    directory missing or closed to it, any of those or a file the config names under /tmp or
    /var/tmp (PrivateTmp=yes hides them from the service). It can, but should not: what any user
    but root can change among the interpreter, the mapper package, the packages beside it and the
    config (`changeable_by_others`), which would let that user run code as the service. Looks
    only: `install-service --dry-run` prints them too."""
    user = ServiceUser.lookup(settings.user, settings.groups)
    if not _installed():
        yield True, (f"the mapper package is not installed for {settings.python}, so the service cannot"
                     " import it from /var/lib/mapper: run `pip install '.[pi]'` with that interpreter")
    python = Path(settings.python)
    reported: set[Path] = set()
    # A venv's python is a symlink: the interpreter it links to (a pyenv build in a 0700 home) must be
    # reachable too, or the service cannot exec it.
    for path, what, want in ((python, "", os.X_OK), (python.resolve(), f", the interpreter {python} links to", os.X_OK),
                             (settings.config, "", os.R_OK)):
        blocked = unreachable_for_others(path)
        if blocked is not None and user.denied(path, want) is None:
            blocked = None  # the service user gets in all the same: root, or through its groups or an ACL
        if blocked is not None and blocked not in reported:
            reported.add(blocked)
            yield True, (f"{blocked} is closed to other users, so {settings.user!r} cannot reach {path}{what};"
                         " move the installation (e.g. to /opt/mapper) or open that directory")
    # What the service runs (ExecStartPre= and ExecStart=: the interpreter, the mapper package and the
    # packages beside it) and the config must be root's to change: a login user who can write them
    # (docs/raspberry-pi.md once chowned /opt/mapper to it) takes over the service user (its groups,
    # the broker password it reads), and root at the next `sudo .../mapper`.
    shown: set[Path] = set()
    package = Path(__file__).resolve().parent
    runs = (f"the service runs it as {settings.user!r} (with its groups and the broker password it reads), as does"
            " root at a `sudo ... mapper`")
    reads = (f"the service takes from it which broker to give its password to and which devices to drive, as does"
             " root at a `sudo ... mapper`")
    checked = [(python, f"the interpreter {python}", runs),
               (python.resolve(), f"{python.resolve()}, the interpreter {python} links to,", runs),
               (package, f"the mapper package {package}", runs)]
    if python == Path(sys.executable):
        purelib = Path(sysconfig.get_paths()["purelib"])
        checked.append((purelib, f"the interpreter's packages {purelib}", runs))
    checked.append((settings.config, f"--config: {settings.config}", reads))
    for path, what, does in checked:
        found = changeable_by_others(path)
        if found is None or found[0] in shown:
            continue
        where, how = found
        shown.add(where)
        st = os.stat(where)
        recursive = "" if path == settings.config else "-R "
        fix = (f"move the installation out of it (a venv in /opt/mapper made and filled by root: docs/raspberry-pi.md)"
               if _holds_a_home(where) else f"sudo chown {recursive}root {where} && sudo chmod {recursive}go-w {where}")
        yield False, (f"{what} can be changed by a user other than root: {where} is {_user_name(st.st_uid)}:"
                      f"{_group_name(st.st_gid)} {stat.S_IMODE(st.st_mode):04o} ({how}), and {does}: {fix}")
    hidden = "which the service does not see: the unit's PrivateTmp=yes gives it an empty /tmp and /var/tmp of its own, so"
    for path, what in ((python, f"the interpreter {python}"),
                       (python.resolve(), f"{python.resolve()}, the interpreter {python} links to,")):
        if (tmp := under_private_tmp(path)) is not None:
            yield True, (f"{what} is under {tmp}, {hidden} the service cannot start: install the mapper outside"
                         " /tmp and /var/tmp (e.g. a venv in /opt/mapper)")
            break
    for field, path in (("--config", settings.config), *settings.reads):
        if (tmp := under_private_tmp(path)) is not None:
            yield True, (f"{field}: {path} is under {tmp}, {hidden} the service cannot read it: move it out of"
                         " /tmp and /var/tmp (e.g. to /etc/mapper)")
    for field, directory in settings.writable:
        if (tmp := under_private_tmp(directory)) is not None:
            yield True, (f"{field}: {directory} is under {tmp}, {hidden} the service cannot use it (nor would"
                         " what it made there be seen outside it): use a directory outside /tmp and /var/tmp"
                         " (docs/kubeedge.md, As a systemd service)")
    for field, directory in settings.writable:
        if not directory.is_dir():
            yield True, (f"{field}: {directory} does not exist, and the service cannot start without it"
                         f" (ReadWritePaths=): create it, writable by {settings.user!r}")
        elif (denied := user.denied(directory, os.W_OK | os.X_OK)) is not None:
            first = ("" if user.uid is not None else  # (install-service would create it: only after this check)
                     f"; {settings.user!r} does not exist yet, create it first (sudo useradd --system --user-group"
                     f" --home-dir {STATE_DIR} --no-create-home --shell /usr/sbin/nologin {settings.user}), then"
                     f" sudo chown {settings.user}: {directory}")
            yield True, (f"{field}: {settings.user!r} cannot create files in {directory} ({denied.detail}), so the"
                         f" service cannot start: use a directory it owns (docs/kubeedge.md, As a systemd service)"
                         f"{first}")


def start_checks(config: MapperConfig) -> Iterator[tuple[bool, str]]:
    """What `mapper run` refuses at its start once it has the devices, as (it cannot start, what):
    the device files' problems, and the inference pipelines (the config's `inference.pipelines`,
    the device files' anomalyDetection maps) checked against the devices and the models, as the
    start checks them (mapper.inference.extension.config_problems), each FILE:LINE: FIELD: PROBLEM.
    Without numpy and onnxruntime the config's pipelines were refused already (check_installed);
    the maps' pipelines are then only named in a warning: the service runs without them. The devices
    it starts but does not run, or leaves offline (their driver's library not installed here), are
    warnings, as `mapper validate --config` gives them (devices.loader.offline_warnings), and so are
    the 1-wire ones (devices.w1.host_warnings: no bus for a ds18b20, a pin the w1-gpio overlay holds)."""
    from devices.loader import offline_warnings
    from mapper.inference.extension import start_problems
    from mapper.inference.settings import InferenceSettings, local_maps, missing_ml_packages

    loaded, problems, _ = start_problems(config)  # (the files' warnings: `mapper validate --config` says them)
    if loaded is None:
        for problem in problems:
            yield True, f"{problem} (`mapper run` refuses the device files until it is fixed)"
        return
    for problem in problems:
        yield True, str(problem)
    for warning in offline_warnings(loaded):  # (as `mapper validate --config` says them)
        yield False, warning
    from devices import w1

    for warning in w1.host_warnings({k: v for k, v in loaded.devices.items() if k not in loaded.unrunnable}):
        yield False, warning  # (the 1-wire bus and config.txt's overlay pins, as validate and the start say them)
    if missing := missing_ml_packages():
        maps = [m for m in local_maps(config.inference or InferenceSettings(), loaded.devices)[0]
                if m.settings is not None and m.device not in loaded.unrunnable]
        if maps:
            where = ", ".join(f"{m.at.file}:{m.at.line}" if m.at.line else m.at.file for m in maps)
            yield False, (f"the anomalyDetection maps at {where} were not checked against their models, and the"
                          f" service runs without their pipelines: {' and '.join(missing)} not installed here;"
                          f" install the `ml` extra ({install_extra('ml')}) for them")


def _installed() -> bool:
    try:
        metadata.distribution("mapper")
    except metadata.PackageNotFoundError:
        return False
    return True
