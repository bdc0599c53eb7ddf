"""The `mapper` command line."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import gc
import itertools
import logging
import os
import re
import shlex
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from devices.errors import DefinitionError
from devices.ids import DeviceId
from devices.loader import LoadResult, load, offline_warnings
from mapper import __version__, early_signals, logs, openssl
from eventbus.settings import MqttSettings
from mapper.config import MapperConfig, load_config
from twin.migrations import MIGRATIONS
from twin.store import (BROKER_NOTE_REFRESH_S, TWIN_DIR_MODE, NewerTwin, OlderTwin, TwinError, TwinStore,
                        UnknownDevice, check_owned, missing_schema, unusable_twin, write_private)


def _config(path: str) -> MapperConfig:
    return load_config(path)


# `twin history -n`'s maximum: well above any history twin.history_rows keeps in practice (200,000
# by default), and below SQLite's 64-bit LIMIT (a larger number was its "datatype mismatch").
HISTORY_MAX_LIMIT = 10_000_000


def _history_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    if value > HISTORY_MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be at most {HISTORY_MAX_LIMIT:,} (the history keeps"
                                         f" twin.history_rows readings, 200,000 by default), got {value:,}")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
WHEN_FORMS = ("an ISO 8601 time (2026-12-01T08:00, 2026-12-01 08:00:00Z, 2026-12-01T09:00+01:00, 2026-12-01;"
              " UTC unless it has Z or an offset) or a duration back from now (90s, 15m, 2h, 7d)")


def _history_when(text: str) -> int:
    """--since/--until: the epoch ms of an ISO 8601 time, UTC when it names no zone (a Pi without a
    real-time clock keeps UTC, and its local zone may be unset), or of now minus a duration."""
    duration = _DURATION.fullmatch(text.strip())
    if duration:
        return round(time.time() * 1000 - float(duration[1]) * _DURATION_MS[duration[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time nor a duration: {text!r}; give {WHEN_FORMS}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


def _fmt_ts(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def cmd_validate(args: argparse.Namespace) -> int:
    from mapper.config import with_map_problems
    from mapper.inference.settings import local_maps

    if args.config is not None:
        if args.paths:
            print("error: give device files or --config, not both (--config checks the device files it names)",
                  file=sys.stderr)
            return 2
        return _validate_config(args.config)
    if not args.paths:
        print("error: give device files or directories, or --config FILE", file=sys.stderr)
        return 2
    try:
        result = load(args.paths)
        # The keys of the devices' anomalyDetection maps too (whether their models exist: `mapper run`).
        if problems := local_maps(None, result.devices)[1]:
            raise DefinitionError(problems, result.warnings)
    except DefinitionError as caught:
        exc = with_map_problems(caught, None)
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        for warning in exc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        also = f", {len(exc.warnings)} warning(s)" if exc.warnings else ""
        print(f"{len(exc.problems)} error(s){also}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # A device no mapper here could run (its protocol has no driver) is only a warning, as the files
    # may be meant for a node that has it; a bare "ok" after them read as if all would run.
    refused = (f"; {len(result.unrunnable)} of the devices would not run here: see the warnings"
               if result.unrunnable else "")
    print(f"ok: {len(result.devices)} device(s), {len(result.models)} model(s){_warned(result.warnings)}{refused}")
    _print_mapper_options(result.devices)
    return 0


def _print_mapper_options(devices: dict) -> None:
    """The properties published on change (visitors.configData reportDeadband...) or calibrated
    (valueScale...), one line each: the mapper's own keys in a driver's configData, shown so a typo'd
    or forgotten one is seen."""
    for device_id, definition in sorted(devices.items(), key=lambda item: str(item[0])):
        for prop in definition.properties:
            for option in (prop.calibration, prop.deadband):
                if option is not None:
                    print(f"  {device_id} {prop.name}: {option.describe()}")


def _validate_config(path: str) -> int:
    """`mapper validate --config`: what `mapper run` checks before it starts (the config with the
    environment's MAPPER_* overrides, what it needs installed, the broker password and TLS files, the
    API token and certificate, where its twin is (_twin_place_problems), the device files it names, its
    inference pipelines against them; warnings about the host's 1-wire bus: devices.w1), so that a
    config can be checked before it is pushed to a node, without opening a twin, taking a lock or
    reaching a broker."""
    from mapper.inference.extension import start_problems

    config = _config(path)  # (its own problems: DefinitionError, printed by main)
    problems: list[object] = list(_settings_problems(config, path))
    warnings: list[object] = []
    if config.mqtt is not None:
        warnings += [w.removeprefix("warning: ") for w in config.mqtt.exposed_secrets(path)]  # (said once below)
    if config.api is not None and config.api.enabled:
        warnings += [w.removeprefix("warning: ") for w in config.api.exposure_warnings(path)]  # as the API's start
    if config.metrics is not None:
        warnings += [w.removeprefix("warning: ") for w in config.metrics.exposure_warnings(path)]  # as at its start
    twin_problems, twin_warnings = _twin_place_problems(Path(config.twin.path), Path(path))
    problems += [f"{path}: twin.path: {text}" for text in twin_problems]
    warnings += [f"{path}: twin.path: {text}" for text in twin_warnings]
    result, found, said = start_problems(config)
    problems += found
    warnings += said
    if result is not None:
        warnings += offline_warnings(result)
        from devices import w1

        runnable = {k: v for k, v in result.devices.items() if k not in result.unrunnable}
        warnings += w1.host_warnings(runnable)  # (as the start and install-service say them)
    for problem in problems:
        print(problem, file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        also = f", {len(warnings)} warning(s)" if warnings else ""
        print(f"{len(problems)} error(s){also}: `mapper run` refuses to start with {path}", file=sys.stderr)
        return 1
    assert result is not None
    refused = f" ({len(result.unrunnable)} not run here: see the warnings)" if result.unrunnable else ""
    print(f"ok: {path}: {len(result.devices)} device(s){refused}, {len(result.models)} model(s){_warned(warnings)}")
    _print_mapper_options(result.devices)
    return 0


def _settings_problems(config: MapperConfig, path: str) -> list[ValueError]:
    """What the config's settings need at start and lack (a package not installed, the broker's
    password or TLS files, the API's token and certificate): every one, not the first alone."""
    checks = [config.check_installed]
    if config.mqtt is not None:
        checks += [config.mqtt.check_password, config.mqtt.check_tls]
    if config.api is not None and config.api.enabled:
        checks += [config.api.check_token, config.api.check_tls]
    problems = []
    for check in checks:
        try:
            check(path)
        except ValueError as exc:
            problems.append(exc)
    return problems


def _twin_place_problems(path: Path, config_file: Path | None = None) -> tuple[list[str], list[str]]:
    """(what `mapper run` refuses, what it waits for) about where the twin is, as this user: a twin
    others could write (twin.store.check_owned: /tmp, a group-writable directory, a file another user
    owns), a lock file it does not follow (a symbolic link, not a regular file), a directory it cannot
    make or write, a twin file it cannot write; a read-only file system is waited for (a warning).
    As root, who may write anywhere, the installed service's user instead when it runs `config_file`
    on this twin (_service_runner). Found by looking only: nothing is made, and the twin is not opened."""
    problems: list[str] = []
    warnings: list[str] = []
    runner, user, cannot_tell = _service_runner(path, config_file)
    if cannot_tell is not None:
        warnings.append(cannot_tell)

    def allowed(target: Path, want: int) -> bool:
        return os.access(target, want) and (runner is None or runner.denied(target, want) is None)

    try:
        check_owned(path, None if runner is None else runner.uid)
    except TwinError as exc:
        problems.append(str(exc))
    except OSError:  # (a directory this user cannot look into: said below, as run's open would fail)
        pass
    if (why := _lock_file_problem(_lock_path(path))) is not None:
        problems.append(why)
    real = Path(os.path.realpath(path))
    made = real.parent  # the twin's directory, or the nearest one above it (`mapper run` makes the rest)
    while not made.exists() and made != made.parent:
        made = made.parent
    try:
        read_only = bool(os.statvfs(made).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        warnings.append(f"the file system of {made} is read-only: `mapper run` waits for its twin {path} (it runs"
                        " no device) until it is remounted read-write (mount -o remount,rw)")
        return problems, warnings
    denied = f"which {user} may not write (its mode, or an immutable flag: lsattr)"
    run = "`mapper run`" if runner is None else "the service"
    from mapper.systemd import STATE_DIR

    if real.parent.is_relative_to(STATE_DIR) and STATE_DIR.is_relative_to(made) and STATE_DIR != made:
        # The service's state directory, not made yet: systemd makes it for the service (StateDirectory=).
        if runner is None and not os.access(made, os.W_OK | os.X_OK):
            warnings.append(f"{STATE_DIR} is not there yet: the service's systemd unit makes it (StateDirectory=),"
                            f" but a `mapper run` by hand as {user} could not ({_described_or(made)}, {denied})")
    elif not allowed(made, os.W_OK | os.X_OK):
        doing = (f"cannot make the twin's directory {real.parent}" if made != real.parent
                 else "cannot make the twin, nor its -wal and -shm files, in it" if not real.exists()
                 else "cannot make the twin's -wal and -shm files beside it")
        problems.append(f"{_described_or(made)}, {denied}: {run} {doing}")
    elif real.exists() and not allowed(real, os.R_OK | os.W_OK):
        problems.append(f"{_described_or(real)}, {denied}: {run} cannot write the twin")
    return problems, warnings


def _service_runner(twin: Path, config_file: Path | None) -> tuple[Any, str, str | None]:
    """Whom to check the twin's place as: (None, `this user (NAME)`, None) for this process; as root,
    for whom any place passes, the installed service's User= when it runs `config_file` on `twin`
    (a mapper.systemd.ServiceUser, `the service's user (NAME, User= in UNIT)`, None). When that user
    does not exist here, (None, `this user (root)`, the warning that it cannot be told)."""
    here = f"this user ({_user_name()})"
    if os.geteuid() != 0 or config_file is None:
        return None, here, None
    from mapper.systemd import ServiceUser, installed_service

    service = installed_service()
    if (service is None or service.config != config_file.resolve()
            or service.twin != Path(os.path.normpath(os.path.abspath(twin))) or service.user in ("root", "0")):
        return None, here, None
    runner = ServiceUser.lookup(service.user, service.groups)
    if runner.uid is None:
        return None, here, (f"the mapper service ({service.unit_file}) runs this config as {service.user!r} (User=),"
                            f" which does not exist here: whether it can write its twin {twin} cannot be told (checked"
                            " as root, who can write anywhere); create the user, or run install-service again")
    return runner, f"the service's user ({service.user}, User= in {service.unit_file})", None


def _described_or(path: Path) -> str:
    from twin.store import described

    try:
        return described(path)
    except OSError:
        return str(path)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _lock_file_problem(lock_path: Path) -> str | None:
    """Why `mapper run` refuses the twin's lock file as it is (None: it takes it, or makes it): a
    symbolic link (the pid written into it would land where the link points) or anything but a
    regular file."""
    try:
        st = os.lstat(lock_path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return _lock_link_problem(lock_path)
    if not stat.S_ISREG(st.st_mode):
        return _lock_not_regular_problem(lock_path)
    return None


def _lock_link_problem(lock_path: Path) -> str:
    target = "?"
    with contextlib.suppress(OSError):
        target = os.readlink(lock_path)
    return (f"the twin's lock file {lock_path} is a symbolic link (to {target}), which the mapper does not follow:"
            f" remove it (rm {lock_path}); `mapper run` makes the lock file itself")


def _lock_not_regular_problem(lock_path: Path) -> str:
    return (f"the twin's lock file {lock_path} is not a regular file: remove it (rm {lock_path}); `mapper run` makes"
            " the lock file itself")


def _warned(warnings: Sequence[object]) -> str:
    """`, 3 warning(s)` for validate's closing `ok:` line: a bare ok after a screen of warnings read as
    if there were none (the error line counts them too)."""
    return f", {len(warnings)} warning(s)" if warnings else ""


def _lock_path(twin: Path) -> Path:
    """`<twin>.lock` beside the twin file itself: a twin.path through a symlink (to the file or to a
    directory above it) names the same lock as the real path, so two mappers, one configured with
    each, cannot both run on one twin (SQLite follows the symlink to the same file: they did, and
    wrote two different values under the same (property, seq))."""
    return Path(f"{os.path.realpath(twin)}.lock")


def _lock_twin(path: Path):  # noqa: ANN202 - the open lock file, kept open (and locked) while it lives
    """Take `<twin>.lock` for this `mapper run`, or refuse when another mapper process holds it.

    Two mappers on one twin interleave their readings, seqs and folds in the same history (a
    `mapper run --config examples/demo.yaml` next to the running demo did): the second is refused.
    The lock goes with the process (also on SIGKILL). When the lock file cannot be made, the twin
    cannot be opened either: `mapper run` goes on, and the twin's own error names the cause.

    The lock file is opened without following a symbolic link (O_NOFOLLOW), and made owner-only:
    the pid written into it must not land in a file a link points to. A link, or anything but a
    regular file, is refused (its directory passed `check_owned`: only this user or root made it).
    """
    lock_path = _lock_path(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(_lock_link_problem(lock_path)) from None
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(_lock_not_regular_problem(lock_path))
    lock = os.fdopen(fd, "r+")
    try:
        _flock_soon(lock)
    except BlockingIOError:
        lock.seek(0)
        owner = (lock.read().split() or ["?"])[0]
        lock.close()
        raise ValueError(f"another mapper (pid {owner}) is running on the twin {path}: stop it first, or give this"
                         " one a twin of its own (twin.path, MAPPER_TWIN__PATH)") from None
    except OSError:
        return lock  # a file system without flock: run unguarded, as before
    _write_lock_owner(lock, starting=True)
    return lock


LOCK_STARTING = "starting"  # after the pid in `<twin>.lock` until the mapper runs (and hears SIGHUP)


def _write_lock_owner(lock, *, starting: bool) -> None:  # noqa: ANN001
    """`<pid> starting` (taken) or `<pid>` (running: its SIGHUP reloads) in the lock file, for the
    messages and `mapper reload`. Written over what is there before cutting it short: a full disk
    keeps the page a previous run wrote (truncated first, the pid was lost there)."""
    text = f"{os.getpid()}{' ' + LOCK_STARTING if starting else ''}\n".encode()
    with contextlib.suppress(OSError):
        os.pwrite(lock.fileno(), text, 0)
        os.ftruncate(lock.fileno(), len(text))


def _flock_soon(file, *, within_s: float = 0.5) -> None:  # noqa: ANN001
    """An exclusive flock without blocking, tried again for `within_s` while it is held: a `mapper
    devices` asking whether a mapper runs holds the lock for an instant, and must not refuse a starting one."""
    import fcntl

    deadline = time.monotonic() + within_s
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _running_mapper(path: Path) -> tuple[bool | None, int | None]:
    """(running, pid) of the `mapper run` holding `<twin>.lock`; running None when it cannot be told."""
    return _lock_state(path)[:2]


class LockState(NamedTuple):
    """What `<twin>.lock` says of the mapper on a twin. `running` None: it cannot be told, and `why`
    says so (the file and the error); `starting`: that mapper has not finished starting
    (LOCK_STARTING: a mapper from before it was written says nothing, and counts as started)."""

    running: bool | None
    pid: int | None = None
    starting: bool = False
    why: str | None = None


def _lock_state(path: Path) -> LockState:
    """Whether a mapper holds `<twin>.lock`. A lock nobody holds means no mapper runs only where a
    mapper could have taken it: `mapper run` goes on without the lock when it cannot open the file
    for writing (a read-only disk: it waits for its twin meanwhile; a lock file its user may not
    write), so a lock that cannot be opened for writing here, or made where it is missing, cannot
    tell (`why`), rather than "no mapper runs"."""
    import fcntl

    lock_path = _lock_path(path)
    try:  # (not through a symbolic link, nor blocking on a FIFO someone left in its place)
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if (why := _lock_cannot_be_made(lock_path)) is not None:
            return LockState(None, why=why)
        return LockState(False)
    except OSError as exc:
        return LockState(None, why=f"{lock_path} cannot be opened here ({exc.strerror})")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return LockState(None, why=f"{lock_path} is not a regular file")
    with os.fdopen(fd, "r") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner, *rest = lock.read().split() or [""]
            return LockState(True, int(owner) if owner.isdigit() else None, rest == [LOCK_STARTING])
        except OSError as exc:
            return LockState(None, why=f"{lock_path} cannot be locked here ({exc.strerror})")
        fcntl.flock(lock, fcntl.LOCK_UN)
    try:  # (nobody holds it: could a mapper have taken it? Opened for writing as `mapper run` opens it)
        os.close(os.open(lock_path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)))
    except OSError as exc:
        return LockState(None, why=f"nobody holds {lock_path}, but it cannot be opened for writing ({exc.strerror}):"
                                   " a mapper that cannot open it either runs without holding it")
    return LockState(False)


def _lock_cannot_be_made(lock_path: Path) -> str | None:
    """Why `<twin>.lock`, missing, could not be made where it belongs (None: it could): its directory,
    or the nearest one above it that exists (`mapper run` makes the twin's directory), is on a
    read-only file system or not writable here."""
    directory = lock_path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return None
    if read_only:
        cause = f"{directory} is on a read-only file system"
    elif not os.access(directory, os.W_OK):
        cause = f"{directory} is not writable here"
    else:
        return None
    return f"{lock_path} is not there, and cannot be made ({cause}): a mapper that cannot make it either runs without it"


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args.config)
    if problems := _settings_problems(config, args.config):
        # With the device files' own (as `mapper validate --config` lists them): every mistake in one run.
        from mapper.inference.extension import start_problems

        _, found, warnings = start_problems(config)
        raise DefinitionError([*(f"error: {p}" for p in problems), *found], warnings)  # type: ignore[list-item]
    if config.mqtt is not None:
        for warning in config.mqtt.exposed_secrets(args.config):
            print(warning, file=sys.stderr)
    if not config.load_openssl and (config.mqtt is None or not config.mqtt.uses_tls) and (
            config.api is None or not config.api.uses_tls):
        # Before asyncio, paho and aiomqtt import `ssl`: keeps OpenSSL out (-4.5 MiB RSS; mapper/openssl.py).
        openssl.ssl_placeholder()
    # A twin another local user could write is refused before anything is made beside it (twin.store.check_owned).
    with contextlib.suppress(OSError):  # (cannot be made: the twin's open says why, with its hints)
        Path(config.twin.path).parent.mkdir(mode=TWIN_DIR_MODE, parents=True, exist_ok=True)
    check_owned(Path(config.twin.path))
    twin_lock = _lock_twin(config.twin.path)  # noqa: F841 - held until the process exits (after the config's checks)
    import asyncio  # here, not at the top: after the placeholder

    from mapper.runtime import build_service

    logs.setup(config.log_level)
    if _stopped_while_starting():  # (the models and drivers not loaded for nothing)
        return 0
    service = build_service(config)
    if twin_lock is None:
        # The lock file could not be made (a read-only or full disk): the start now waits for such
        # a twin (MapperService._start_twin), and takes the lock before each try to open it.
        def lock_again() -> None:
            nonlocal twin_lock
            if twin_lock is None:
                # (Its directory first: on a read-only disk the mkdir above failed too, and the lock
                # file cannot be made in a directory that is not there; the open would make it after.)
                with contextlib.suppress(OSError):
                    Path(config.twin.path).parent.mkdir(mode=TWIN_DIR_MODE, parents=True, exist_ok=True)
                twin_lock = _lock_twin(config.twin.path)

        service.before_twin_open.append(lock_again)

    async def main() -> None:
        stop = asyncio.Event()
        hup = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        if _stopped_while_starting():  # (asked after the handlers above: no SIGTERM falls between the two)
            return
        if early_signals.heard():  # (asked after the handler above: no SIGHUP falls between the two)
            logging.getLogger("mapper.reload").info("SIGHUP while starting: the config and device files are read"
                                                    " again once the mapper runs")
            hup.set()
        reloader = asyncio.create_task(_reload_on_sighup(service, args.config, hup, stop, lambda: twin_lock),
                                       name="sighup-reload")
        service.before_devices.append(gc.collect)  # here, not once running: a full collection stops the loop ~20 ms
        freezer = asyncio.create_task(freeze_heap_when_ready(service), name="gc-freeze")
        try:
            await service.run(stop)
        finally:
            for task in (reloader, freezer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    asyncio.run(main())
    return 1 if service.uncommitted_at_stop else 0


def _stopped_while_starting() -> bool:
    """Whether a SIGTERM came before `mapper run` listened for it (early_signals): the stop it asks
    for is then made at once, before anything is opened (the twin, the broker, the devices), exit 0."""
    if (name := early_signals.stop_heard()) is None:
        return False
    logging.getLogger("mapper.service").info("%s while starting: stopped before opening the twin or any device", name)
    return True


async def freeze_heap_when_ready(service) -> None:  # noqa: ANN001
    """Once running, take the start-up heap out of the garbage collector's walks.

    Modules, pydantic schemas and device definitions are ~39,000 tracked objects that never
    become garbage; every full collection walked them all, a ~15 ms stop of the event loop
    (and of every reading waiting on it) at unpredictable times. gc.freeze() moves them to a
    permanent generation: collections then see only what was allocated since. Objects are
    still freed by reference counting; only a cycle among them would stay.

    The start-up garbage is collected before the device loops start (`before_devices`): done
    here, once running, that full collection held up the first readings (10 devices on a 10 ms
    cycle lost 12-15 slots at every start). The freeze itself is cheap.
    """
    await service.ready.wait()
    gc.freeze()


async def _reload_on_sighup(service, config_path: str, hup: asyncio.Event, stop: asyncio.Event,  # noqa: ANN001
                            twin_lock=lambda: None) -> None:  # noqa: ANN001
    """SIGHUP: read the config file again, reload the device files it names; restart only devices
    whose definition changed. Each reload's outcome goes to `<twin>.reload` for `mapper reload`.
    Once running, the twin's lock (`twin_lock()`) no longer says "starting": `mapper reload` sends
    its SIGHUP from then on."""
    import asyncio

    from mapper.service import MapperStopping  # (here: the module imports asyncio, after openssl's placeholder)

    reload_log = logging.getLogger("mapper.reload")
    await service.ready.wait()
    if (lock := twin_lock()) is not None:
        _write_lock_owner(lock, starting=False)
    running = service.config  # whose device list runs now
    while True:
        await hup.wait()
        hup.clear()
        if not stop.is_set():
            began = time.monotonic()
            noted = _ReloadNotes()
            reload_log.addHandler(noted)
            try:
                running = await reload_config(service, config_path, running)
            except MapperStopping:  # the stop began while the files were read: nothing to switch to
                reload_log.info("SIGHUP: not reloaded, the mapper is stopping")
                noted.errors.append("not reloaded: the mapper is stopping")
            except Exception:  # noqa: BLE001 - the next SIGHUP must still be heard
                reload_log.exception("reload failed; still running the previous devices")
            finally:
                reload_log.removeHandler(noted)
            await asyncio.to_thread(_write_reload_outcome, Path(service.config.twin.path), began, noted)


# `mapper reload`: where `mapper run` leaves each reload's outcome (beside the twin, owner only), and
# how long the command waits for it (a reload may restart devices and load models; the unit's
# TimeoutStartSec=, which bounds ExecReload=, is 120 s).
RELOAD_OUTCOME_SUFFIX = ".reload"
RELOAD_WAIT_S = 90.0
RELOAD_NOTES_MAX = 100


def _reload_outcome_path(twin: Path) -> Path:
    return Path(f"{os.path.realpath(twin)}{RELOAD_OUTCOME_SUFFIX}")


class _ReloadNotes(logging.Handler):
    """The warnings and errors `mapper.reload` logs during one reload: an error means it was refused
    (or the next start would refuse what it read), and `mapper reload` exits 1 with them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.pending: list[str] = []  # settings changed in the config file that wait for the next start
        self.refused: list[str] = []  # devices the reload refused to run (a protocol without a driver ...)

    def emit(self, record: logging.LogRecord) -> None:
        self.pending += getattr(record, "pending", ())
        self.refused += getattr(record, "refused", ())
        notes = self.errors if record.levelno >= logging.ERROR else self.warnings
        if len(notes) < RELOAD_NOTES_MAX:
            notes.append(record.getMessage()[:4000])


def _write_reload_outcome(twin: Path, began: float, noted: _ReloadNotes) -> None:
    """`began`: time.monotonic() when the reload began (one clock for every process: `mapper reload`
    takes the outcome of a reload that began after its SIGHUP only)."""
    outcome = {"pid": os.getpid(), "began": began, "errors": noted.errors, "warnings": noted.warnings,
               "pending": noted.pending, "refused": noted.refused}
    try:
        write_private(_reload_outcome_path(twin), _json_text(outcome) + "\n")
    except OSError as exc:
        logging.getLogger("mapper.reload").warning("cannot write the reload's outcome for `mapper reload` (%s): %s",
                                                   _reload_outcome_path(twin), exc)


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to the mapper running on the config's twin, then its outcome: exit 1 with the reload's
    errors when it was refused. The unit's ExecReload=, so `systemctl reload mapper` fails when the
    mapper refused the reload (it used to send the signal and succeed at once, whatever came of it)."""
    try:
        config = _config(args.config)
    except DefinitionError:
        print(f"error: not reloaded: {args.config} has errors (below), which the mapper would refuse too; it"
              " runs on with the files it has", file=sys.stderr)
        raise
    twin = Path(config.twin.path)
    running, pid, starting, why = _lock_state(twin)
    if running is None:  # (its lock could not be opened or locked: not "no mapper", which may be wrong)
        print(f"error: cannot tell whether a mapper runs on the twin {twin} (twin.path of {args.config}): {why};"
              " run this as the service's user or root (or `sudo systemctl reload mapper`), or send the mapper a"
              " SIGHUP yourself (`sudo systemctl kill -s HUP mapper` for the service) and see its log", file=sys.stderr)
        return 1
    if not running:
        print(f"error: no mapper runs on the twin {twin} (twin.path of {args.config}): nothing to reload;"
              " start it (systemctl start mapper, or mapper run)", file=sys.stderr)
        return 1
    if pid is None:
        print(f"error: a mapper runs on the twin {twin}, but {_lock_path(twin)} names no pid to signal: send"
              " it a SIGHUP yourself (`sudo systemctl kill -s HUP mapper` for the service), and see its log for the"
              " outcome", file=sys.stderr)
        return 1
    if starting:  # (not signalled: it would reload only once running, which may be long after --timeout)
        print(f"error: the mapper (pid {pid}) on the twin {twin} has not finished starting ({_lock_path(twin)} says"
              " so; waiting for its twin, perhaps): not reloaded. It runs the files as they were when it started;"
              " see its log (journalctl -u mapper) and run `mapper reload` again once it logs \"running\"",
              file=sys.stderr)
        return 1
    outcome_path = _reload_outcome_path(twin)
    sent = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    deadline = sent + args.timeout
    outcome = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            found = orjson.loads(outcome_path.read_bytes())
            if found.get("pid") == pid and found.get("began", 0) >= sent:
                outcome = found
                break
        time.sleep(0.1)
    if outcome is None:
        print(f"error: the mapper (pid {pid}) got the SIGHUP but wrote no outcome to {outcome_path} within"
              f" {args.timeout:g} s: the reload may still be running, the file may not be writable there (a full or"
              " read-only disk), or the mapper was started before `mapper reload` existed (it writes none: restart"
              " it after an upgrade). See its log for what came of the reload (journalctl -u mapper)",
              file=sys.stderr)
        return 1
    for line in outcome.get("errors", []):
        print(line, file=sys.stderr)
    for line in outcome.get("warnings", []):
        print(f"warning: {line}", file=sys.stderr)
    if outcome.get("errors"):
        print(f"error: the mapper (pid {pid}) refused the reload, or the next start would refuse what it read"
              f" (above; `mapper validate --config {shlex.quote(str(args.config))}` lists the problems)", file=sys.stderr)
        return 1
    pending, refused = outcome.get("pending"), outcome.get("refused")
    print(f"reloaded: the mapper (pid {pid}) runs the new files" if not pending
          else f"reloaded: the mapper (pid {pid}) runs the new device files; {_pending_text(pending)}",
          end=f", but not the device(s) it refused: {', '.join(refused)} (why: above)\n" if refused else "\n")
    return 0


# What a reload takes from the config file; every other setting needs a restart.
RELOADED_SETTINGS = ("devices", "log_level")


async def reload_config(service, config_path: str | Path, running: MapperConfig) -> MapperConfig:  # noqa: ANN001
    """Read the config file again (with the environment's overrides, as at start) and reload the
    device files it names now; `log_level` is applied at once, every other setting that changed is
    named in a warning (it takes effect at the next start). A config file that no longer validates
    refuses the reload. Returns the config whose device list runs after it (`running` if refused)."""
    import asyncio

    reload_log = logging.getLogger("mapper.reload")
    reload_log.info("SIGHUP: reading the config file %s again", config_path)
    if service.config.api is not None and service.config.api.enabled:
        from mapper.dmi.rest import RestApiExtension

        for extension in service.extensions:  # the token and certificate files it started with, read
            if isinstance(extension, RestApiExtension):  # again: a rotated token, a renewed certificate
                await asyncio.to_thread(extension.reread_token)
                await asyncio.to_thread(extension.reread_tls)
    try:
        new = await asyncio.to_thread(load_config, config_path)
    except DefinitionError as exc:
        for problem in exc.problems:
            reload_log.error("reload refused: %s", problem)
        for warning in exc.warnings:
            reload_log.warning("%s", warning)
        reload_log.error("reload refused: %s: %d error(s); still running the previous config and devices; fix it"
                         " before the next start: `mapper run` refuses to start with it (`mapper validate --config %s`)",
                         config_path, len(exc.problems), shlex.quote(str(config_path)))
        return running
    started = service.config  # what the service was built with: only a restart changes it
    later = [name for name in MapperConfig.model_fields
             if name not in RELOADED_SETTINGS and getattr(new, name) != getattr(started, name)]
    if later:
        reload_log.warning("%s: %s changed: %s effect at the next start (systemctl restart mapper); until then the"
                           " mapper runs with the previous ones", config_path, ", ".join(later),
                           "they take" if len(later) > 1 else "it takes", extra={"pending": later})
    if "mqtt" in later and new.mqtt is not None:
        _check_next_start(new.mqtt, str(config_path), reload_log)
    if "api" in later and new.api is not None and new.api.enabled:
        try:  # a token file the next start would refuse, said now (as for the mqtt password file)
            new.api.check_token(str(config_path))
        except ValueError as exc:
            reload_log.error("%s; the next start refuses it (fix it before a restart or a reboot)", exc)  # noqa: TRY400
        if new.api.uses_tls and openssl.placeholder_active():  # this process cannot load them
            reload_log.warning("%s: api now uses TLS: its files are checked at the next start (`mapper"
                               " install-service --dry-run` checks them now)", config_path)
        elif new.api.uses_tls:
            try:
                new.api.check_tls(str(config_path))
            except ValueError as exc:
                reload_log.error("%s; the next start refuses it (fix it before a restart or a reboot)", exc)  # noqa: TRY400
    root = logging.getLogger()
    if root.level != logging.getLevelName(new.log_level.upper()):
        was = logging.getLevelName(root.level).lower()
        root.setLevel(new.log_level.upper())
        reload_log.info("%s: log_level %s (was %s)", config_path, new.log_level, was)
    # The new device list, checked against the running mapper's topic tree (node, mqtt.topic_prefix).
    wanted = started.model_copy(update={"devices": new.devices, "log_level": new.log_level})
    wanted._devices_named_at = dict(new._devices_named_at)
    return (wanted if await reload_devices(service, wanted, pipelines_of=new, config_path=config_path, pending=later)
            else running)


def _check_next_start(mqtt: MqttSettings, source: str, reload_log: logging.Logger) -> None:
    """The start's checks of a changed `mqtt` section (its password, its TLS files), made at the
    reload: a password file that is missing, or a key it cannot decrypt, would stop the next start
    (a reboot, the watchdog's restart) with nothing running. Said now, while the mapper still runs."""
    problems = []
    try:
        mqtt.check_password(source)
    except ValueError as exc:
        problems.append(str(exc))
    if mqtt.uses_tls:
        if openssl.placeholder_active():  # this process runs without OpenSSL: it cannot load them
            reload_log.warning("%s: mqtt now uses TLS: its files are checked at the next start (`mapper validate`"
                               " does not check them; `mapper install-service --dry-run` does)", source)
        else:
            try:
                mqtt.check_tls(source)
            except ValueError as exc:
                problems.append(str(exc))
    for problem in problems:
        reload_log.error("%s; the next start refuses it (fix it before a restart or a reboot)", problem)


async def reload_devices(service, config: MapperConfig, *,  # noqa: ANN001
                         pipelines_of: MapperConfig | None = None, config_path: str | Path | None = None,
                         pending: Sequence[str] = ()) -> bool:
    """Load the device files again and switch to them; an invalid set keeps the running one.

    A set that the config's inference pipelines do not fit (`pipelines_of`: the config file as read
    now, else `config`; a device removed, or a property a model reads) is refused too, as the next
    start would refuse it. `pending`: the settings that changed in the config file but take effect
    at the next start only, named in the closing line (not "nothing changed" after a new `node`)."""
    import asyncio

    from mapper.twin_disk import twin_write_cause

    reload_log = logging.getLogger("mapper.reload")
    reload_log.info("SIGHUP: reloading device files %s", ", ".join(map(str, config.devices)) or "(none)")
    checks = [check for ext in service.extensions if (check := getattr(ext, "config_problems", None)) is not None]

    def load_and_check() -> LoadResult:
        result = config.load_devices()
        if problems := [p for check in checks
                        for p in check(pipelines_of or config, result.devices, unrunnable=result.unrunnable,
                                       other_node=result.other_node)]:
            raise DefinitionError(problems, result.warnings)
        return result

    try:
        result = await asyncio.to_thread(load_and_check)
    except DefinitionError as exc:
        for problem in exc.problems:
            reload_log.error("reload refused: %s", problem)
        for warning in exc.warnings:
            reload_log.warning("%s", warning)  # (a warning: not why it is refused)
        # A restart (a reboot, the watchdog) does not fall back to the previous devices: it refuses them.
        # The command that lists them all: with the config, also what its pipelines make of the files.
        check = (f"--config {shlex.quote(str(config_path))}" if config_path is not None
                 else " ".join(shlex.quote(str(d)) for d in config.devices))
        reload_log.error("reload refused: %d error(s); still running the previous devices; fix them before the next"
                         " start: `mapper run` refuses to start with them (`mapper validate %s`)", len(exc.problems),
                         check)
        return False
    for warning in result.warnings:
        reload_log.warning("%s", warning)
    apply = service.local_devices_handler or service.update_devices
    while True:
        # Another process holding the twin's lock (a backup, `mapper twin set`) is waited for before
        # any device stops for the switch; the reload used to fail on it and be lost.
        await service.wait_for_twin_lock(reload_log, "the reload")
        try:
            changes = await apply(result)
            break
        except sqlite3.Error as exc:  # locked again in between: the switch was undone, the previous devices run
            if twin_write_cause(exc, service.config.twin.path) != "locked":
                raise
    if refused := [str(device_id) for device_id in changes.get("refused", ())]:
        reload_log.warning("not run, refused at this reload: %s (the warnings above say why; `mapper devices` shows"
                           " it offline until its file is fixed and reloaded)", ", ".join(refused),
                           extra={"refused": refused})
    done = "; ".join(f"{what} {', '.join(map(str, ids))}" for what, ids in changes.items() if ids)
    if pending:
        reload_log.info("reload done: %s; %s", done or "no device changed", _pending_text(pending))
    else:
        reload_log.info("reload done: %s", done or "nothing changed")
    return True


def _pending_text(pending: Sequence[str]) -> str:
    return (f"{', '.join(pending)} changed in the config file: {'they take' if len(pending) > 1 else 'it takes'}"
            " effect at the next start (systemctl restart mapper)")


def cmd_install_service(args: argparse.Namespace) -> int:
    from mapper.systemd import (SERVICE_TWIN, ServiceUser, UnitSettings, check_service_reads, check_service_secrets,
                                check_service_token, existing_groups, install_service, read_paths, render_unit,
                                service_checks, service_warnings, start_checks, writable_dirs)

    config_path = Path(args.config).resolve()
    # The config as the file says it: the unit sets the service's own MAPPER_TWIN__PATH, and the
    # CLI commands a user runs later do not have this shell's.
    config = load_config(config_path, env={k: v for k, v in os.environ.items() if k != "MAPPER_TWIN__PATH"})
    # What refuses the install whatever --force says, every one found (not one a run): a service
    # that cannot start (what it needs not installed, files its user cannot read, secrets the start
    # refuses) or whose twin is not the config's.
    refused: list[str] = []
    try:
        config.check_installed(str(config_path))
    except ValueError as exc:
        refused.append(str(exc))
    groups, missing = existing_groups(args.groups)
    service_user = ServiceUser.lookup(args.user, groups)
    # The service reads its config and device files as its own user, not as root.
    refused += check_service_reads(config_path, config, service_user)
    if config.mqtt is not None:
        # As the service user (or what it will be once created), not as root: sudo reads anything.
        warnings, problems = check_service_secrets(config.mqtt, service_user, str(config_path))
        refused += problems
        for warning in (*warnings, *config.mqtt.exposed_secrets(str(config_path))):
            print(warning, file=sys.stderr)
    if config.api is not None and config.api.enabled:
        refused += check_service_token(config.api, service_user, str(config_path))
        for warning in config.api.exposure_warnings(str(config_path)):
            print(warning, file=sys.stderr)
    if config.metrics is not None:
        for warning in config.metrics.exposure_warnings(str(config_path)):
            print(warning, file=sys.stderr)
    for group in missing:
        print(f"warning: group {group!r} does not exist here (not Raspberry Pi OS?); left out of the unit",
              file=sys.stderr)
    twin = Path(os.path.normpath(config.twin.path))
    if twin != SERVICE_TWIN and not args.other_twin:
        # The unit's MAPPER_TWIN__PATH wins for the service; `mapper devices` and `mapper twin ...
        # --config` given this file would read and set another twin than the one the service writes.
        refused.append(
            f"{config_path}: twin.path is {twin}, but the service keeps its twin in {SERVICE_TWIN}"
            f" (MAPPER_TWIN__PATH in the unit): `mapper devices` and `mapper twin get/set --config {config_path}`"
            f" would read and set another twin than the service's. Set twin.path in {config_path}:"
            f" `twin: {{path: {SERVICE_TWIN}}}` (or `path: {SERVICE_TWIN}` in its `twin:` section), then run"
            " this again; or pass --other-twin to install anyway")
    settings = UnitSettings(config=config_path, user=args.user, groups=tuple(groups),
                            watchdog_sec=args.watchdog_sec, stop_timeout_sec=args.stop_timeout_sec,
                            writable=tuple(writable_dirs(config)), reads=tuple(read_paths(config)))
    started = list(start_checks(config))  # (not in service_warnings: those look at the unit's paths only)
    checks = [*service_checks(settings), *started]
    cannot_start = [text for fatal, text in checks if fatal]
    try:
        unit = render_unit(settings)
    except ValueError as exc:  # (a path the unit cannot hold: a newline in it)
        refused.append(str(exc))
    for text in refused:  # with what else keeps the service from starting (below): all in one run
        print(f"error: {text}", file=sys.stderr)
    if args.dry_run and not refused:
        print(unit, end="")
        # What the install would change (stderr: stdout is the unit), a missing user first: the
        # install creates it, so a dry run must not leave that unsaid.
        for line in install_service(unit, settings, Path(args.unit_file), system=not args.unit_only, dry_run=True):
            print(line, file=sys.stderr)
    if (cannot_start and not args.force) or refused:
        # Refused before anything is made (user, unit, daemon-reload): a unit that cannot start
        # would only fail at `systemctl enable --now`, or at the next boot.
        for fatal, text in checks if not refused else ():  # (the warnings: once the errors are fixed)
            if not fatal:
                print(f"warning: {text}", file=sys.stderr)
        done = "a real install refuses it" if args.dry_run else "nothing was installed"
        if cannot_start and not args.force:
            # (--force overrides these, not `refused`: offered plainly, it only led to a second refusal)
            force = " (--force installs past these, not past the errors above)" if refused else \
                " (or pass --force to install anyway)"
            print(f"error: the service could not start with this installation, so {done}: fix these"
                  f"{' and the errors above' if refused else ''}, then run this again{force}:", file=sys.stderr)
            for text in cannot_start:
                print(f"  - {text}", file=sys.stderr)
        return 1
    if args.dry_run:
        # The checks a real install makes after writing the unit, without writing anything.
        for warning in (*service_warnings(settings), *(f"warning: {text}" for _, text in started)):
            print(warning, file=sys.stderr)
        return 0
    for line in install_service(unit, settings, Path(args.unit_file), system=not args.unit_only):
        print(line)
    for _, text in started:
        print(f"warning: {text}")
    if cannot_start:  # --force: installed all the same
        print("next: fix the problems in the warnings above: the service cannot start until then")
    elif not args.unit_only:
        print("next: sudo systemctl enable --now mapper; then: systemctl status mapper; journalctl -u mapper -f")
    return 0


def _twin_config(args: argparse.Namespace) -> tuple[MapperConfig, bool]:
    """The config of a command that reads or sets the twin, and whether the installed service
    (`mapper install-service`) runs this same config on another twin than its twin.path (the
    unit's MAPPER_TWIN__PATH wins for the service): then a warning on stderr says so, and how to
    make them one."""
    config = _config(args.config)
    from mapper.systemd import installed_service

    service = installed_service()
    twin = Path(os.path.normpath(config.twin.path))
    if service is None or service.config != Path(args.config).resolve() or service.twin == twin:
        return config, False
    print(f"warning: the mapper service ({service.unit_file}) runs {service.config} on the twin {service.twin}"
          f" (MAPPER_TWIN__PATH in the unit), but twin.path here is {twin}: this command reads and sets {twin},"
          f" not the service's twin. Set `twin: {{path: {service.twin}}}` in {service.config}"
          f" (or run this with MAPPER_TWIN__PATH={service.twin})", file=sys.stderr)
    return config, True


SCHEMA_VERSION = len(MIGRATIONS)  # of the twin files this mapper writes (twin/migrations.py)


def _existing_twin(config: MapperConfig) -> Path:
    """The twin file the commands read, which they must not create (a wrong twin.path would
    otherwise leave an empty twin behind and answer "unknown device")."""
    path = Path(config.twin.path)
    if not path.is_file():
        raise ValueError(f"no twin at {path}: `mapper run` creates it on its first start (is twin.path right?)")
    return path


@contextlib.contextmanager
def _open_twin(config: MapperConfig, *, sets: bool = False, note: bool = True,
              writer: str = "`mapper twin set`") -> Iterator[TwinStore]:
    """The twin of a command that reads it or (`sets`) sets a desired value, open while the `with` lasts.

    Not `owned`: these commands publish nothing and drive no device (root reads the service's twin,
    owned by `mapper`); `mapper run` refuses a twin others can write (twin.store.check_owned).
    Never migrated (TwinStore.open: `migrate`): a twin an older mapper left is read as it is, said
    on stderr once the `with` body has read it (the commands print what they read after it), and
    `twin set` refuses it; only `mapper run` migrates it."""
    path = _existing_twin(config)
    with _naming_the_twin(path), TwinStore.open(path, synchronous=config.twin.synchronous, owned=False,
                                                migrate=False, read_only=not sets) as store:
        found = store.schema_version
        if found < SCHEMA_VERSION:
            if sets:
                raise OlderTwin(path, found, f"{writer} writes nothing to it before it is migrated (migrated"
                                " now, the older mapper that may still run on it could not start on it again): "
                                + ("set the value" if writer == "`mapper twin set`" else "run it again")
                                + " once the new mapper runs")
        try:
            yield store
        except sqlite3.OperationalError as exc:
            if found < SCHEMA_VERSION and missing_schema(exc):
                raise OlderTwin(path, found, "this command cannot read it before it is migrated") from exc
            raise
        except UnknownDevice as exc:
            known = sorted(store.device_ids(active_only=False), key=str)
            meant = _device_meant(DeviceId.parse(str(exc.device_id)), known)
            if meant:
                raise ValueError(f"{exc}; did you mean {' or '.join(map(str, meant))}?") from None
            raise ValueError(f"{exc} in the twin {path}: {_devices_listed(known)}") from None
        if found < SCHEMA_VERSION and note:  # once read: not before an error saying it cannot be read
            _note_older_twin(path, found)


def _devices_listed(known: list[DeviceId], at_most: int = 8) -> str:
    """The devices a twin has, for an unknown device's error: the name asked for close to none of
    them, the person needs the names (`mapper devices` shows them all)."""
    if not known:
        return "it has no devices (has `mapper run` run with this config?)"
    shown = ", ".join(map(str, known[:at_most]))
    more = f" and {len(known) - at_most} more (`mapper devices` lists them)" if len(known) > at_most else ""
    return f"its devices are {shown}{more}"


def _device_meant(wanted: DeviceId, known: Iterable[DeviceId]) -> list[DeviceId]:
    """The devices an unknown id most likely meant: the same name in another namespace (`other/soil-1`,
    or a bare `soil-1` for `farm/soil-1`: looking only within the namespace found none), else a
    close name in its namespace (`soil` for `soil-1`), else a close name in another (names
    compared, not ids: a shared `default/` makes any two ids close)."""
    known = list(known)
    if same_name := [d for d in known if d.name == wanted.name]:
        return same_name
    for ids in ([d for d in known if d.namespace == wanted.namespace], known):
        if close := difflib.get_close_matches(wanted.name, [d.name for d in ids], n=1):
            return [d for d in ids if d.name == close[0]]
    return []


def _note_older_twin(path: Path, found: int) -> None:
    print(f"note: {OlderTwin(path, found, 'shown as it is, not migrated (this command writes nothing)')}",
          file=sys.stderr)


@contextlib.contextmanager
def _naming_the_twin(path: Path) -> Iterator[None]:
    """A twin file SQLite cannot read ("file is not a database", "database disk image is malformed",
    at the open or at a damaged page found later) is named, with what to do, as `mapper run` says
    it (twin.store.unusable_twin): SQLite's own message names no file."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if (unusable := unusable_twin(path, exc)) is not None:
            raise unusable from exc
        raise


def _latest_reads(store: TwinStore, twin) -> dict[str, int]:  # noqa: ANN001
    """When each property's newest reading was taken, for the properties whose newest reading was
    not good: `reported` and `reportedTs` are the last good reading's, `quality` and its detail the
    newest reading's, a later one. From the history (absent once pruned away). Call it inside the
    `store.snapshot()` that read `twin`: a reading committed in between is not the one
    `twin`'s quality describes."""
    taken: dict[str, int] = {}
    for name, p in twin.properties.items():
        if p.quality not in (None, "good"):
            newest = store.history(twin.id, name, limit=1)
            if newest and newest[-1][2] == p.quality:
                taken[name] = newest[-1][0]
    return taken


def _twin_json(twin, latest: dict[str, int], lock: LockState) -> dict:  # noqa: ANN001
    """`live` false when the reported values are the last known ones, `notLive` why (as `twin get`'s
    rows say it: `device offline`, `mapper not running`, `mapper starting`), else true and null."""
    not_live = _not_live(twin.state, lock)
    return {
        "id": str(twin.id), "model": twin.model, "protocol": twin.protocol, "state": twin.state,
        "stateDetail": twin.state_detail, "lastOnline": twin.last_online, "lastReading": twin.last_reading_ts,
        "live": not_live is None, "notLive": not_live,
        "locked": None if twin.lock is None else {"since": twin.lock.since_ms, "by": twin.lock.by,
                                                  "reason": twin.lock.reason},
        "properties": {
            name: {
                "type": p.type, "writable": p.writable, "unit": p.unit,
                "desired": p.desired, "desiredVersion": p.desired_version, "desiredTs": p.desired_ts,
                "reported": p.reported, "reportedVersion": p.reported_version, "reportedTs": p.reported_ts,
                # quality and qualityDetail are the newest reading's, taken at qualityTs; reported and
                # reportedTs the last good one's (a failed read leaves them as they were)
                "quality": p.quality, "qualityDetail": p.quality_detail,
                "qualityTs": p.reported_ts if p.quality == "good" else latest.get(name),
                "applyError": p.apply_error,
                "delta": p.delta,
            }
            for name, p in twin.properties.items()
        },
        "delta": twin.delta(),
    }


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


def cmd_twin_get(args: argparse.Namespace) -> int:
    config, _ = _twin_config(args)
    with _open_twin(config) as store:
        with store.snapshot():
            twin = store.device(DeviceId.parse(args.device))
            latest = _latest_reads(store, twin)
    lock = _lock_state(config.twin.path)
    if args.json:
        print(orjson.dumps(_twin_json(twin, latest, lock), option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"{twin.id}  model={twin.model}  protocol={twin.protocol}  state={twin.state}"
          + (f" ({twin.state_detail})" if twin.state_detail else ""))
    if twin.lock is not None:
        print(f"LOCKED: {twin.lock.describe(twin.id)}")
    stale = _not_live(twin.state, lock)
    # The reported value is the last good reading's, shown with its time; a later reading that was
    # not good (an error, out of range) is shown apart, with its own time, not next to that value.
    rows = []
    for p in twin.properties.values():
        # Values as JSON, as `twin set` takes them and `twin history` shows them (true, not True)
        reported = "-" if p.reported is None else f"{_json_text(p.reported)}{(' ' + p.unit) if p.unit else ''}"
        desired = "-" if p.desired is None else _json_text(p.desired)
        if p.quality in (None, "good"):
            newest = p.quality or "-"
        else:
            newest = (f"{p.quality} at {_fmt_ts(latest.get(p.name)) if p.name in latest else '(no longer in the history)'}"
                      + (f" [{p.quality_detail}]" if p.quality_detail else ""))
        if stale and p.reported is not None:
            newest += f"; last known: {stale}"
        rows.append((p, reported, desired, newest))
    # Columns as wide as their longest value (a decision's `confidence 0.6307235560375336` pushed
    # its row out of line with the header), at least as wide as before.
    name_w = max([16, *(len(p.name) for p, *_ in rows)])
    reported_w = max([12, *(len(reported) for _, reported, _, _ in rows)])
    desired_w = max([10, *(len(desired) for _, _, desired, _ in rows)])
    print(f"{'property':<{name_w}} {'reported':>{reported_w}} {'desired':>{desired_w}} {'delta':>6}  "
          f"{'last good read':<24}  latest read")
    for p, reported, desired, newest in rows:
        print(f"{p.name:<{name_w}} {reported:>{reported_w}} {desired:>{desired_w}} {('yes' if p.delta else ''):>6}  "
              f"{_fmt_ts(p.reported_ts):<24}  {newest}"
              + (f"  [apply error: {p.apply_error}]" if p.apply_error else ""))
    return 0


def _not_live(state: str, lock: LockState) -> str | None:
    """Why a device's reported values are not its live ones (`mapper not running`, `device offline`), or
    None. `twin get` says it on each value's row: `true ... good` read as the relay's state, after a
    restart that left the device offline (its output switched off at the stop) or with no mapper
    running at all (a crash leaves the state `ok`)."""
    if lock.running is False:
        return "mapper not running"
    if lock.starting:
        return "mapper starting"
    return None if state == "ok" else f"device {state}"


def cmd_twin_set(args: argparse.Namespace) -> int:
    config, not_the_services = _twin_config(args)
    device = DeviceId.parse(args.device)
    try:
        with _open_twin(config, sets=True) as store:
            running, pid, starting, why = _lock_state(config.twin.path)
            raw = _check_desired(config, store, device, args.property, args.value, running=running, pid=pid)
            value, version = store.set_desired(device, args.property, raw)
    except (sqlite3.Error, OSError) as exc:
        if (unwritable := _unwritable_twin(Path(config.twin.path), exc)) is None:
            raise
        raise ValueError(unwritable) from exc
    if not_the_services:  # not "the next `mapper run` applies it": the service never reads this twin
        print(f"{device}/{args.property}: desired = {_json_text(value)} (version {version}) in {config.twin.path},"
              " which the mapper service does not read (see the warning)"
              + (": a mapper runs on it and applies it" if running else ""))
        return 0
    if running is None:
        applies = "a running mapper applies it, or the next to start"
    elif not running:
        applies = "no mapper is running on this twin: the next `mapper run` applies it"
    elif starting:
        applies = f"the mapper (pid {pid if pid is not None else '?'}) is still starting: it applies it once it runs"
    else:
        applies = "the running mapper applies it"
    print(f"{device}/{args.property}: desired = {_json_text(value)} (version {version}); {applies}")
    if running is None:
        print(f"warning: cannot tell whether a mapper runs on {config.twin.path}: {why}", file=sys.stderr)
    return 0


def _lock_holder() -> str:
    """Who locks a device, as the lock shows it: the person behind `sudo -u mapper` too."""
    import getpass

    user = getpass.getuser()
    sudo_user = os.environ.get("SUDO_USER")
    return f"{sudo_user} (as {user})" if sudo_user and sudo_user != user else user


def _defined_devices(config: MapperConfig) -> tuple[list[DeviceId] | None, bool]:
    """(The devices the config's device files define, whether all of them could be read.) A file
    with a mistake leaves its own devices out, not the others': a device can be locked while another
    file is being fixed. None when none can be read. In `mode: kubeedge` edgecore's devices are not
    among them: the twin has those."""
    try:
        return sorted(config.load_devices().devices, key=str), True
    except DefinitionError as exc:
        loaded = exc.result.devices if isinstance(exc.result, LoadResult) else {}
        return (sorted(loaded, key=str) or None), False
    except (OSError, ValueError):
        return None, False


def _not_defined(device: DeviceId, config_file: str, defined: list[DeviceId] | None,
                 in_twin: list[DeviceId], twin: Path, all_read: bool = True) -> ValueError:
    """`mapper lock`/`unlock` of a device neither the config nor the twin has: the names it could have meant."""
    known = sorted({*(defined or []), *in_twin}, key=str)
    if meant := _device_meant(device, known):
        return ValueError(f"unknown device {device}; did you mean {' or '.join(map(str, meant))}?")
    unread = f"`mapper validate --config {config_file}` says why"
    if defined is None:
        files = f"{config_file}'s device files cannot be read ({unread})"
    elif not defined:
        files = f"{config_file} defines no device"
    else:
        files = f"{config_file} defines {', '.join(map(str, defined[:8]))}" + (
            f" and {len(defined) - 8} more" if len(defined) > 8 else "")
        if not all_read:
            files += f" (some of its device files cannot be read: {unread})"
    return ValueError(f"unknown device {device}: {files}, and the twin {twin} "
                      + (f"has {', '.join(map(str, in_twin[:8]))}" if in_twin else "has no device"))


def _make_twin_to_lock(config: MapperConfig, config_file: str) -> None:
    """The twin for a `mapper lock` before the first `mapper run`, made as `mapper run` makes it (its
    directory 0700, the file 0600, refused where others could write it, migrated) and by the user
    who will run the mapper: made as root for a service that runs as another user, it would be
    root's, which the service refuses (twin.store.check_owned) and may not even open."""
    path = Path(config.twin.path)
    if os.geteuid() == 0:
        runner, user, _ = _service_runner(path, Path(config_file))
        if runner is not None:
            raise ValueError(f"no twin at {path} yet (the service has not run): made by root, it would be root's,"
                             f" which {user} cannot use; lock it as that user: sudo -u {runner.name} mapper lock"
                             f" ... --config {config_file}")
    problems, _ = _twin_place_problems(path, Path(config_file))
    if problems:
        raise ValueError(f"no twin at {path} yet, and `mapper lock` cannot make it there: {'; '.join(problems)}")
    with TwinStore.open(path, synchronous=config.twin.synchronous):
        pass


def cmd_lock(args: argparse.Namespace) -> int:
    """Lock a device for maintenance: a local command only (no MQTT or REST way to lock or unlock it).
    Also before the first `mapper run`, or before the first since the device was added: the lock
    then holds from the device's first start (its file's `desired:` is refused, as any other)."""
    config, _ = _twin_config(args)
    device = DeviceId.parse(args.device)
    defined, all_read = _defined_devices(config)
    path = Path(config.twin.path)
    made = False
    try:
        if not path.is_file():
            if device not in (defined or []):  # (before anything is made for a misspelt name)
                raise _not_defined(device, args.config, defined, [], path, all_read)
            _make_twin_to_lock(config, args.config)
            made = True
        with _open_twin(config, sets=True, writer="`mapper lock`") as store:
            in_twin = store.device_ids(active_only=False)
            if device not in in_twin and device not in (defined or []):
                raise _not_defined(device, args.config, defined, in_twin, path, all_read)
            lock, dropped, before = store.lock_device(device, _lock_holder(), args.reason or "", defined=True)
            twin = store.device(device) if device in in_twin else None
            # Removed from the config since a run (the twin keeps it, inactive): locked all the same.
            gone = defined is not None and device not in defined and twin is not None and device not in (
                store.device_ids())
    except (sqlite3.Error, OSError) as exc:
        if (unwritable := _unwritable_twin(Path(config.twin.path), exc)) is None:
            raise
        raise ValueError(unwritable) from exc
    if gone:
        source = (f"neither {args.config} nor edgecore (at the last run) defines {device}" if config.mode == "kubeedge"
                  else f"{args.config} does not define {device}")
        print(f"warning: {source}: the twin {path} keeps it from an earlier run, inactive, and no mapper runs it; the"
              f" lock holds if the device comes back (`mapper unlock {device}` releases it)", file=sys.stderr)
    if before is not None:  # its time and holder stay the first lock's: the maintenance it stands for
        if lock.reason == before.reason:
            print(f"already locked, left as it was: {lock.describe(device)}")
        else:
            was = repr(before.reason) if before.reason else "none"
            print(f"already locked: its reason is now {lock.reason!r} (was {was}), its time and holder left as"
                  f" they were: {lock.describe(device)}")
        return 0
    print(lock.describe(device))
    if made:
        print(f"made the twin {path} (no `mapper run` had made it yet): the lock holds from the mapper's first start")
    elif twin is None:
        print(f"{device} is not in the twin yet (no `mapper run` since it was added): the lock holds from its first"
              " start")
    if twin is None:
        return 0
    if dropped:
        print(f"dropped the desired values not yet written ({', '.join(dropped)}): not written at the unlock either")
    on = [f"{p.name}={_json_text(p.reported)}" for p in twin.properties.values() if p.writable and p.reported is True]
    if on:  # the lock stops writes; it switches nothing off
        prop = next(p.name for p in twin.properties.values() if p.writable and p.reported is True)
        print(f"note: the lock writes nothing: {', '.join(on)} as last reported. If it must be off, unlock,"
              f" switch it off and lock again: `mapper unlock {device}`, `mapper twin set {device} {prop} false`,"
              f" then `mapper lock {device}`")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    config, _ = _twin_config(args)
    device = DeviceId.parse(args.device)
    defined, all_read = _defined_devices(config)
    path = Path(config.twin.path)
    if not path.is_file():
        if device not in (defined or []):
            raise _not_defined(device, args.config, defined, [], path, all_read)
        print(f"{device} was not locked (no twin at {path} yet: no `mapper run` or `mapper lock` has made it)")
        return 0  # (idempotent: nothing to release)
    try:
        with _open_twin(config, sets=True, writer="`mapper unlock`") as store:
            in_twin = store.device_ids(active_only=False)
            if device not in in_twin and device not in (defined or []) and store.admin_lock(device) is None:
                raise _not_defined(device, args.config, defined, in_twin, path, all_read)
            lock = store.unlock_device(device, defined=True)
    except (sqlite3.Error, OSError) as exc:
        if (unwritable := _unwritable_twin(Path(config.twin.path), exc)) is None:
            raise
        raise ValueError(unwritable) from exc
    if lock is None:
        print(f"{device} was not locked")
        return 0
    print(f"{device} unlocked (locked since {lock.since_text} by {lock.by}"
          + (f": {lock.reason}" if lock.reason else "") + "); the values refused meanwhile are not written: set them"
          " again (mapper twin set, MQTT)")
    return 0


def _unwritable_twin(path: Path, exc: BaseException) -> str | None:
    """Why `twin set` could not write the twin, naming it and what to do; None for other errors.
    SQLite says `attempt to write a readonly database` or `unable to open database file`, naming
    no file: a read-only file system (an SD card remounted read-only), or a twin this user may
    not write (the service's, owned by `mapper`, set without `sudo -u mapper`)."""
    from mapper.twin_disk import innermost, twin_disk_problem, write_denied

    if (problem := twin_disk_problem(exc, path)) is not None:
        return f"cannot write the twin {path}: {innermost(exc)}: {problem}"
    code = getattr(innermost(exc), "sqlite_errorcode", None)
    if code is None or code & 0xFF not in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        return None
    if (denied := write_denied(path)) is None:
        return None
    said, owner = denied
    return (f"cannot write the twin {path}: {innermost(exc)}: {said}"
            + (f": set the value as its owner (sudo -u {_user(owner)} mapper twin set ...)" if owner != os.geteuid()
               else " (its mode, or an immutable flag: lsattr)"))


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _set_value(text: str, kind: PropertyType | None, name: str) -> object:
    """The value of `twin set`'s argument, read as the router reads a `.../<property>/set` payload
    (eventbus.payloads.set_value): `{"value": "x"}` is x, `"ON"` is ON, a malformed JSON object is refused."""
    from eventbus.payloads import BadRequest, set_value

    try:
        raw = set_value(os.fsencode(text), kind)
    except BadRequest as exc:
        raise ValueError(exc.reason) from None
    if raw is None:
        raise ValueError(f"property {name!r}: no expected value")
    return raw


def _check_desired(config: MapperConfig, store, device: DeviceId, name: str, text: str, *,  # noqa: ANN001
                   running: bool | None, pid: int | None) -> object:
    """The value `text` carries (_set_value), checked as the MQTT router checks it, against the
    device files: the device is defined, the property declared and writable, the value of its
    type and within its model's range (the twin itself knows the type and writability only). A
    device not in the files is left to the twin when it is unknown there, a pipeline's derived
    device, or (in `mode: kubeedge`) maybe edgecore's.

    A running mapper (`running`, `pid`: _running_mapper) applies the value under the definition
    it loaded at its start or last reload, not under the files as they are now: a device whose
    file differs from it (_check_loaded) is refused until the mapper is reloaded."""
    from devices.values import PropertyType
    from twin.store import DERIVED_PROTOCOL, origin_changes

    definitions, skipped, unrunnable, other_node = _valid_definitions(config)
    definition = definitions.get(device)
    recorded = store.recorded_origin(device)
    if device in other_node:
        # Not this node's device: the mapper does not run it, and would apply the value once the
        # file moved the device here.
        raise ValueError(f"{other_node[device]}; so no desired value is set for it here")
    if definition is not None:
        if origin_changes(recorded, definition.origin):
            # Written now, the value is the twin row's, whose origin differs: the mapper drops it
            # when it takes up this definition (sync_devices), and a running one applies it to
            # the other origin's device until then.
            raise ValueError(
                f"device {device} is {_origin_text(recorded)} in the twin until the mapper takes up the local"
                f" file ({definition.source}): a value set now would go to that device and be dropped then."
                " Reload the mapper (SIGHUP) or start it first, then set it again")
        if recorded is None:  # (else the twin's "unknown device", which does not say the file defines it)
            raise ValueError(f"device {device} is defined in {definition.source}, but not in the twin yet: "
                             + (f"the running mapper (pid {pid if pid is not None else '?'}) has not loaded it."
                                f" If the file is newer than the mapper's start or last reload: {_reload_hint(pid)},"
                                f" then set the value again. {_refused_hint()}"
                                if running else "`mapper run` takes it up when it starts: start it, then set the"
                                " value again"))
        if running:
            _check_loaded(store, definition, pid, unrunnable.get(device))
        if skipped:
            files = list(dict.fromkeys(p.file for p in skipped))
            print(f"warning: {device} is valid; other device files have problems and were left out of this check:"
                  f" {', '.join(files)} (`mapper validate` lists them; `mapper run` and a reload refuse the files"
                  " until they are fixed)", file=sys.stderr)
        raw = _set_value(text, definition.prop(name).type if definition.has_property(name) else None, name)
        definition.desired_value(name, raw)
        return raw
    try:
        twin = store.device(device)
    except UnknownDevice:
        twin, protocol = None, None
    else:
        protocol = twin.protocol
    if skipped and protocol != DERIVED_PROTOCOL:
        # It may be defined in one of the files left out: refused, with their problems.
        for problem in skipped:
            print(problem, file=sys.stderr)
        raise ValueError(f"device {device} is not defined in the device files without problems; the files above"
                         " have problems (`mapper validate` lists them): fix them first")
    if protocol is not None and protocol != DERIVED_PROTOCOL and config.mode == "standalone":
        raise ValueError(f"device {device} is no longer in the device files "
                         f"({', '.join(map(str, config.devices))})")
    if config.mode == "kubeedge" and recorded is not None and recorded[0] == "local":
        # Not edgecore's device in the twin (yet): the local file's, which is gone.
        raise ValueError(f"device {device} is no longer in the device files ({', '.join(map(str, config.devices))});"
                         " in the twin it is still the local file's device: if edgecore now defines it, reload the"
                         " mapper (SIGHUP) or start it first, then set it again")
    prop = twin.properties.get(name) if twin is not None else None
    return _set_value(text, PropertyType(prop.type) if prop is not None and prop.type in PropertyType.__members__
                      else None, name)


def _reload_hint(pid: int | None, verb: str = "reload") -> str:
    return (f"{verb} it (`sudo systemctl reload mapper` for the service, or"
            f" `kill -HUP {pid if pid is not None else '<its pid>'}`: both send it SIGHUP)")


def _check_loaded(store, definition, pid: int | None, unrunnable: object | None = None) -> None:  # noqa: ANN001
    """Refuse a desired value for a device whose definition in the files is not the one the running
    mapper loaded: it checks and applies the value under its own (the range or type it runs may
    differ, and it would refuse a value the files allow: an apply error, after `twin set` said it
    applies it). The twin has no ranges, but records each active device's fingerprint as the
    mapper synced it (at its start and at every reload): a different one means the files changed
    since. `unrunnable`: why the files make the device one no mapper runs here (then refused too)."""
    loaded = store.loaded_fingerprint(definition.id)
    if loaded is None:
        raise ValueError(f"device {definition.id} is defined in {definition.source}, but the running mapper"
                         f" (pid {pid if pid is not None else '?'}) does not run it. If the file is newer than the"
                         f" mapper's start or last reload: {_reload_hint(pid)}, then set the value again."
                         f" {_refused_hint()}")
    if loaded == definition.fingerprint and unrunnable is not None:
        # Loaded and refused, as these files load here (no driver for its protocol, another node's:
        # LoadResult.unrunnable, what the mapper refuses to run). Not the twin's `offline`: a device
        # the mapper runs is offline too while its driver cannot open it, and takes the value then.
        raise ValueError(f"device {definition.id}: the running mapper (pid {pid if pid is not None else '?'}) does"
                         f" not run it: {unrunnable}. Fix that, then {_reload_hint(pid)}, and set the value again")
    if loaded != definition.fingerprint:
        raise ValueError(f"device {definition.id} in the device files ({definition.source}, or its model) differs"
                         f" from the definition the running mapper (pid {pid if pid is not None else '?'}) loaded at its"
                         " start or last reload: it would check and apply the value under that one (its range and"
                         f" type, which the twin does not record), not under the files. {_reload_hint(pid, 'Reload')}"
                         " so that it runs the files, then set the value again")


def _refused_hint() -> str:
    """For a device the running mapper does not run although its file is older than the mapper's
    last (re)load: a reload would not help (`twin set` cannot tell which case it is)."""
    return ("If not, the mapper refused the device (no driver for its protocol, a problem in its file): its log"
            " says why (`journalctl -u mapper`), as does `mapper validate` on the device files")


def _origin_text(recorded: tuple[str | None, bool] | None) -> str:
    """How `twin set` names whose device a twin row is (TwinStore.recorded_origin)."""
    origin = None if recorded is None else recorded[0]
    if origin is None:
        return "an inactive device whose origin the twin does not know (recorded before it kept origins)"
    return {"edgecore": "edgecore's device", "local": "a local file's device"}.get(origin, f"a {origin} device")


def _valid_definitions(config: MapperConfig) -> tuple[dict, list, dict, dict]:
    """(the devices of the device files, the problems of the files left out to get them, the
    devices among them a mapper does not run here with why: LoadResult.unrunnable, no driver for
    its protocol, another node's; and of those, another node's: LoadResult.other_node).

    `twin set` needs only the named device's definition: a problem in another device's file must
    not stop it. The files with an error are left out and the rest loaded again, until they load
    (a device whose model was in a file left out then has an error of its own, and goes too). A
    problem of the config itself (a `devices:` entry that does not exist) is raised."""
    try:
        result = config.load_devices()
        return result.devices, [], result.unrunnable, result.other_node
    except DefinitionError as exc:
        failed = exc
    from devices.loader import yaml_files

    files = yaml_files(config.devices)
    skipped: list = []
    while True:
        bad = {Path(p.file).resolve() for p in failed.problems}
        if not bad or not bad <= {f.resolve() for f in files}:  # a problem of the config itself: no file to leave out
            raise failed
        skipped += failed.problems
        files = [f for f in files if f.resolve() not in bad]
        if not files:
            return {}, skipped, {}, {}
        try:
            result = load(files, push_topics=config.push_topics(), node=config.node, node_chosen=config.node_chosen)
            return result.devices, skipped, result.unrunnable, result.other_node
        except DefinitionError as exc:
            failed = exc


def cmd_twin_history(args: argparse.Namespace) -> int:
    """Readings of one property or (`--all`) every property of a device, read with its own query,
    not through TwinStore.open: a twin too old for the other read commands still shows its history.
    A column it lacks is said as they say it (OlderTwin), not as SQLite's "no such column".

    Opened so that nothing is written, not even to the `-shm` (twin.store.connect_untouched): an
    export beside the running mapper takes no write lock. A time window is read with a scan of the
    history (there is no index on it but the id: one would cost the insert hot path a write per
    reading), its rows streamed from the cursor in time order; with --limit, only its newest N."""
    if args.property is not None and args.all:
        print("error: give PROPERTY or --all, not both (--all: every property of the device)", file=sys.stderr)
        return 2
    since, until = args.since, args.until
    if since is not None and until is not None and since >= until:
        print(f"error: --since ({_fmt_ts(since)}) must be before --until ({_fmt_ts(until)})", file=sys.stderr)
        return 2
    window = since is not None or until is not None
    limit = args.limit if args.limit is not None else (None if window else HISTORY_DEFAULT_LIMIT)
    config, _ = _twin_config(args)
    device = DeviceId.parse(args.device)
    path = _existing_twin(config)
    from twin.store import cannot_open, connect_untouched

    with _naming_the_twin(path):
        try:
            conn = connect_untouched(path)  # read as it is: never migrated here (see _open_twin)
        except sqlite3.OperationalError as exc:
            raise cannot_open(path, exc) from exc
    with _naming_the_twin(path), contextlib.closing(conn):
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:  # refused as TwinStore.open refuses it for the other commands
            raise NewerTwin(path, found)
        try:
            conn.execute("BEGIN")  # one snapshot for the whole export, however long its output takes
            rows = _history_rows(conn, str(device), args.property, since, until, limit)
            first = next(rows, None)
        except sqlite3.OperationalError as exc:
            if found < SCHEMA_VERSION and missing_schema(exc):
                raise OlderTwin(path, found, "this command cannot read it before it is migrated") from exc
            raise
        if first is None:
            conn.close()
            return _no_history(config, path, found, device, args.property, window)
        if found < SCHEMA_VERSION:  # said once something is shown, not before an error saying it cannot be read
            _note_older_twin(path, found)
        _print_history(itertools.chain((first,), rows), str(device), args)
    return 0


HISTORY_DEFAULT_LIMIT = 20  # `twin history` without --limit nor a time window


def _history_rows(conn: sqlite3.Connection, device: str, prop: str | None, since: int | None, until: int | None,
                  limit: int | None) -> Iterator[tuple[int, str, str | None, str, str | None]]:
    """(ts, property, value as stored (JSON), quality, detail) in time order, from the cursor.

    Without a window, the last `limit` readings recorded, found scanning backwards by id and
    stopping at `limit` matches (m004: no index but the id). With one, a scan of the history
    filtered on ts: rows ordered by ts (an SQLite sort, which spills to a temporary file rather
    than grow), all of them, or (limit) the newest `limit`, kept in a bounded top-N sort."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(readings)")}
    detail = "detail" if "detail" in columns else "NULL"  # (m005 added it)
    where, params = ["device_id = ?"], [device]
    if prop is not None:
        where.append("property = ?")
        params.append(prop)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    select = f"SELECT ts, property, value, quality, {detail} FROM readings WHERE {' AND '.join(where)}"
    if since is None and until is None:
        newest = conn.execute(f"{select} ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        newest.reverse()
        newest.sort(key=lambda r: r[0])  # (stable: readings of the same ms in the order recorded)
        return iter(newest)
    if limit is not None:
        newest = conn.execute(f"{select} ORDER BY ts DESC, id DESC LIMIT ?", (*params, limit)).fetchall()
        return reversed(newest)
    return conn.execute(f"{select} ORDER BY ts, id", params)


def _no_history(config: MapperConfig, path: Path, found: int, device: DeviceId, prop: str | None,
                window: bool) -> int:
    """Exit 1 with why nothing was shown: a typo in the device or property is said as such (raises),
    not as a property with no readings."""
    with _open_twin(config, note=False) as store:  # (said below: not before an error saying it cannot be read)
        known = store.device(device).properties
        if prop is not None and prop not in known:
            from twin.store import UnknownProperty

            raise UnknownProperty(device, prop, known)
    if found < SCHEMA_VERSION:
        _note_older_twin(path, found)
    what = f"{device}/{prop}" if prop is not None else str(device)
    print(f"no readings of {what}{' in that time window' if window else ''} in {config.twin.path}", file=sys.stderr)
    return 1


def _csv_value(stored: str | None) -> str:
    """A value for a CSV cell: a string as itself (commas, quotes and newlines are the csv module's
    to quote), any other value as its JSON (21.5, true), none (an error reading) as an empty cell."""
    if stored is None:
        return ""
    return orjson.loads(stored) if stored.startswith('"') else stored


def _print_history(rows: Iterable[tuple[int, str, str | None, str, str | None]], device: str,
                   args: argparse.Namespace) -> None:
    out = sys.stdout
    every = args.property is None
    if args.csv:
        import csv

        writer, iso = csv.writer(out, lineterminator="\n"), _ts_formatter("T")
        writer.writerow(HISTORY_CSV_COLUMNS)
        for ts, prop, value, quality, detail in rows:
            writer.writerow((iso(ts), ts, device, prop, _csv_value(value), quality, detail or ""))
        return
    if args.json:
        out.write("[")
        for n, (ts, prop, value, quality, _) in enumerate(rows):
            shown = {"ts": ts, "property": prop} if every else {"ts": ts}
            shown |= {"value": orjson.loads(value) if value else None, "quality": quality}
            out.write(("," if n else "") + orjson.dumps(shown).decode())
        out.write("]\n")
        return
    shown_ts = _ts_formatter(" ")  # (as _fmt_ts)
    for ts, prop, value, quality, _ in rows:
        named = f"{prop:<14} " if every else ""
        out.write(f"{shown_ts(ts)}  {named}{value if value is not None else '-':>12}  {quality}\n")


# `twin history --csv`: ts in ISO 8601 UTC with milliseconds, ts_ms the same as epoch milliseconds.
HISTORY_CSV_COLUMNS = ("ts", "ts_ms", "device", "property", "value", "quality", "detail")


def _ts_formatter(separator: str) -> Callable[[int], str]:
    """Epoch ms as ISO 8601 UTC with milliseconds (2026-12-01T08:00:00.123Z with "T"), for many
    rows: the date formatted once a day (datetime's formatting of each row was most of the time
    a 200,000-row export took)."""
    last: list = [None, ""]

    def formatted(ms: int) -> str:
        second, milli = divmod(ms, 1000)
        day, into = divmod(second, 86_400)
        if day != last[0]:
            last[0], last[1] = day, time.strftime(f"%Y-%m-%d{separator}", time.gmtime(day * 86_400))
        hour, into = divmod(into, 3600)
        return f"{last[1]}{hour:02d}:{into // 60:02d}:{into % 60:02d}.{milli:03d}Z"
    return formatted


def _driver_traits(driver: Any) -> dict[str, Any]:
    """What the device loop does with a driver class: threads and timeout, whether it writes."""
    from devices.drivers import Driver

    return {"blocking": bool(driver.blocking), "timeoutS": float(driver.timeout_s),
            "writes": driver.write is not Driver.write}  # (can_write may still leave some properties ReadOnly)


def cmd_drivers(args: argparse.Namespace) -> int:
    """Every protocol with the entry point that runs it: a driver's author sees theirs is found."""
    from devices.drivers.base import listing

    listed, unused = listing()
    if args.json:
        print(orjson.dumps({
            "drivers": [{"protocol": d.protocol, "driver": d.target, "package": d.package, "version": d.version,
                         "builtin": d.builtin, "error": d.error, "warnings": list(d.warnings),
                         **(_driver_traits(d.driver) if d.driver is not None else {})} for d in listed],
            # (the table's "not used: ..." lines: "ignored" here read as another kind of entry point)
            "notUsed": [{"protocol": u.protocol, "driver": u.target, "package": u.package, "why": u.why}
                        for u in unused]}).decode())
        return 1 if any(d.error for d in listed) else 0
    protocol_width = max(len("protocol"), *(len(d.protocol) for d in listed))
    target_width = max(len("driver"), *(len(d.target) for d in listed))
    print(f"{'protocol':<{protocol_width}}  {'driver':<{target_width}}  from")
    for d in listed:
        source = "built in" if d.builtin else " ".join(filter(None, (d.package or "an unnamed package", d.version)))
        if d.error is not None:
            source += f": cannot be loaded: {d.error}"
        else:
            traits = _driver_traits(d.driver)
            notes = [f"blocking, timeout {traits['timeoutS']:g} s" if traits["blocking"] else "",
                     "writes" if traits["writes"] else ""]
            if any(notes):
                source += f" ({', '.join(filter(None, notes))})"
        print(f"{d.protocol:<{protocol_width}}  {d.target:<{target_width}}  {source}")
    for u in unused:
        print(f"not used: {u.package} registers protocol {u.protocol!r} ({u.target}), {u.why}:"
              " register the driver under another name")
    for d in listed:  # (it runs: after the table, as the entry points not used)
        for warning in d.warnings:
            print(f"warning: {warning}")
    return 1 if any(d.error for d in listed) else 0


def cmd_discover(args: argparse.Namespace) -> int:
    """The 1-wire temperature sensors on this host's bus, each read once: listed, as JSON, or as
    the Device documents that run them (exit 1: no bus, or no sensor on it)."""
    from devices import w1

    bus = w1.discover(w1.w1_root(args.w1_root))
    problem = bus.problem()
    if args.json:
        print(orjson.dumps({
            "w1Root": str(bus.root), "bus": bool(bus.masters), "busMasters": bus.masters, "problem": problem,
            "sensors": [{"id": s.id, "chip": s.chip, "celsius": s.celsius, "device": s.device_name,
                         "error": None if s.error is None else str(s.error),
                         "errorKind": None if s.error is None else s.error.kind} for s in bus.sensors],
            "otherDevices": bus.others}).decode())
        return 1 if problem else 0
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if args.yaml:
        print(f"# {len(bus.sensors)} 1-wire temperature sensor(s) found by `mapper discover` in {bus.root}: one Device"
              f" each,\n# on the DeviceModel {w1.MODEL} (the sensor's whole range, -55..125 C): leave it out where it"
              " is defined\n# already (in another file of the same directory, a model defined twice is refused).\n"
              + w1.model_document() + "---\n" + w1.device_documents(bus), end="")
        return 0
    print(f"1-wire bus {bus.root} ({', '.join(bus.masters)}): {len(bus.sensors)} temperature sensor(s)")
    width = max(len(s.device_name) for s in bus.sensors)
    for s in bus.sensors:
        reading = f"{s.celsius:g} C" if s.error is None else f"read failed ({s.error.kind}): {s.error}"
        print(f"  {s.id}  {s.chip:<8}  {s.device_name:<{width}}  {reading}")
    if bus.others:
        print(f"  not temperature sensors (no driver here reads them): {', '.join(bus.others)}")
    print("`mapper discover --yaml > FILE` writes a device for each (the third column: its name), for `mapper"
          " validate FILE` and your devices directory")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    config, _ = _twin_config(args)
    with _open_twin(config) as store:
        with store.snapshot():
            rows = [store.device(d) for d in store.device_ids()]
            latest = {t.id: _latest_reads(store, t) for t in rows}
        outbox = store.outbox_stats()
        losses = store.losses()  # as committed: a mapper whose twin cannot be written has more
        broker = _broker_note(store)
    outbox["undeliverable"] = losses["outbox_undeliverable"]
    lock = _lock_state(config.twin.path)
    running, pid, starting, why = lock
    if broker is not None:  # current only when noted by the mapper that runs now (else a crashed run's last word)
        now_ms = time.time() * 1000
        broker["current"] = running is True and pid is not None and _noted_by_this_run(
            broker, pid, _running_since_ms(config.twin.path), now_ms=now_ms, stale_s=BROKER_NOTE_STALE_S)
        # ... and fresh only when noted lately: it is noted again every BROKER_NOTE_REFRESH_S
        broker["fresh"] = now_ms - broker["noted"] <= BROKER_NOTE_STALE_S * 1000
    if args.json:
        print(orjson.dumps({"mapper": {"running": running, "pid": pid, "starting": starting, "cannotTell": why},
                            "broker": broker,
                            "devices": [_twin_json(t, latest[t.id], lock) for t in rows], "outbox": outbox,
                            "readings_dropped": losses["readings_dropped"],
                            "readings_dropped_live": losses["readings_dropped_live"]},
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    if running is False:  # the states would otherwise read as live ("ok") long after the stop
        print(f"mapper: not running on {config.twin.path}: the states below are as its last run left them")
    elif starting:  # (its lock says `<pid> starting` until it runs: not "running", its states may be the last run's)
        print(f"mapper: starting (pid {pid}), not running yet: waiting for its twin or its devices' first opens,"
              f" perhaps (its log says what); the states below may still be as its last run left them")
    elif running:
        print(f"mapper: running (pid {pid if pid is not None else '?'})")
    else:  # (not "not running": a mapper that cannot take its lock runs without it)
        print(f"mapper: cannot tell whether a mapper runs on {config.twin.path}: {why}")
    if (line := _broker_line(broker, running, pid, config.mqtt is not None)) is not None:
        print(line)
    # As wide as the longest id (a pipeline's derived device, `default/room-sensor-faulty-sensor-faults`,
    # pushed its row's columns out of line).
    wide = max([32, *(len(str(t.id)) for t in rows)])
    print(f"{'device':<{wide}} {'state':<10} {'last reading':<24} detail")
    for t in rows:
        locked = "" if t.lock is None else (f"LOCKED since {t.lock.since_text} by {t.lock.by}"
                                             + (f": {t.lock.reason}" if t.lock.reason else "")
                                             + ("; " if t.state_detail else ""))
        print(f"{str(t.id):<{wide}} {t.state:<10} {_fmt_ts(t.last_reading_ts):<24} {locked}{t.state_detail or ''}")
    print(f"outbox: {outbox['depth']} message(s), {outbox['bytes']} bytes queued; {outbox['dropped']} dropped by policy"
          f" (twin.outbox_max_rows, outbox_max_bytes); {outbox['undeliverable']} undeliverable"
          " (refused by the broker or over its packet limit)")
    if losses["readings_dropped"] or losses["readings_dropped_live"]:
        # (Those whose telemetry had gone out live reached the subscribers: only the history lacks them.)
        print(f"readings: {losses['readings_dropped']} dropped while the twin could not be written"
              f" (twin.waiting_max_readings); {losses['readings_dropped_live']} more dropped after their telemetry"
              " had gone out live (delivered, not in the history)")
    return 0


# A note of the MQTT connection older than this is not shown as current: the running mapper writes it
# again every BROKER_NOTE_REFRESH_S, so it could not since (its twin refuses writes, or it is stuck).
BROKER_NOTE_STALE_S = 3 * BROKER_NOTE_REFRESH_S


def _running_since_ms(twin: Path) -> float | None:
    """When the mapper holding `<twin>.lock` ran (its lock says `<pid>` from then: the file's mtime);
    None when it cannot be told."""
    try:
        return _lock_path(twin).stat().st_mtime * 1000
    except OSError:
        return None


def _noted_by_this_run(note: dict | None, pid: int | None, running_ms: float | None, *, now_ms: float,
                       stale_s: float) -> bool:
    """Whether the broker note is the running mapper's (`pid`, running since `running_ms`): its pid, and
    not one older than `stale_s` from before it ran. A container's mapper is pid 1 at every start: the
    previous run's last note has its pid too."""
    return note is not None and note["pid"] == pid and not (
        running_ms is not None and note["noted"] < running_ms and now_ms - note["noted"] > stale_s * 1000)


def _broker_note(store) -> dict | None:  # noqa: ANN001 - TwinStore
    """The MQTT connection as a mapper last noted it in the twin (EventBusExtension._note_broker), or None."""
    from twin.store import BROKER_META

    try:
        text = store.meta(BROKER_META)
    except sqlite3.Error:
        return None
    return _parsed_broker_note(text)


def _parsed_broker_note(text: str | None) -> dict | None:
    try:
        note = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(note, dict) or not {"url", "connected", "since", "pid", "noted"} <= note.keys():
        return None
    return note if all(isinstance(note[key], int) for key in ("since", "noted")) else None


def _broker_line(note: dict | None, running: bool | None, pid: int | None, configured: bool) -> str | None:
    """`broker: connected to mqtt://host:1883 since ...` for `mapper devices`: as the running mapper noted
    it lately; a note no running mapper made (a crash leaves its last one), or one the running mapper has
    not written again for BROKER_NOTE_STALE_S (its twin refuses writes), says when it was last known,
    and how long ago."""
    if note is None:
        if configured and running:
            return "broker: not noted yet by this run (it notes each connection and its loss in the twin)"
        return None
    state = (f"connected to {note['url']} since {_fmt_ts(note['since'])}" if note["connected"] else
             f"disconnected from {note['url']} since {_fmt_ts(note['since'])}"
             + (f", latest reason: {note['error']}" if note.get("error") else ""))
    if note.get("current") and note.get("fresh", True):
        return f"broker: {state}"
    if note.get("current"):
        whose = (f"by this mapper, pid {note['pid']}, which notes it every {BROKER_NOTE_REFRESH_S:g} s but has not"
                 " since: its twin may refuse writes (its log says why), and this may no longer be so")
    elif running is False:
        whose = f"by pid {note['pid']}, which no longer runs: the mapper stopped or crashed then"
    elif running:
        whose = f"by pid {note['pid']}, an earlier run; this one (pid {pid if pid is not None else '?'}) has noted nothing yet"
    else:
        whose = f"by pid {note['pid']}; whether it still runs cannot be told"
    age = _age_text(time.time() * 1000 - note["noted"])
    return f"broker: last known {_fmt_ts(note['noted'])}, {age} ago ({whose}): {state}"


# `mapper health`: how long the broker may stay unreachable before the mapper counts as unhealthy. A
# restart brings no broker back (the mapper reconnects on its own): a probe acts only past this.
HEALTH_BROKER_DOWN_S = 300.0


def _health_stale_s(text: str) -> float:
    value = _health_seconds(text)
    if value <= BROKER_NOTE_REFRESH_S:
        raise argparse.ArgumentTypeError(f"must be more than {BROKER_NOTE_REFRESH_S:g} (the running mapper notes"
                                         f" its broker connection in the twin every {BROKER_NOTE_REFRESH_S:g} s),"
                                         f" got {text}")
    return value


def _health_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):  # (also NaN)
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the mapper running on the config's twin is healthy, else 1; one line says why (a
    liveness or readiness probe's, a Docker HEALTHCHECK's). Told from what the running mapper leaves:
    `<twin>.lock` (held: it runs; `<pid> starting`: not yet) and, with `mqtt:`, the note of its
    broker connection it writes in the twin at each change and every BROKER_NOTE_REFRESH_S (not
    written again for `--stale-s`: its twin refuses writes, or it is stuck). No broker is reached,
    nothing is written or made (_read_broker_note)."""
    config = _config(args.config)
    healthy, reason, shown = _health(config, broker_down_s=args.broker_down_s, stale_s=args.stale_s)
    if args.json:
        print(orjson.dumps({"healthy": healthy, "reason": reason, **shown}).decode())
    else:
        print(f"{'healthy' if healthy else 'unhealthy'}: {reason}")
    return 0 if healthy else 1


_TWIN_NOT_WRITTEN = "its twin may refuse writes (a full or read-only disk; its log says why), or it is stuck"


def _health(config: MapperConfig, *, broker_down_s: float, stale_s: float) -> tuple[bool, str, dict]:
    """(healthy, why in one line, what it was told from) for `mapper health`."""
    twin = Path(config.twin.path)
    running, pid, starting, why = _lock_state(twin)
    shown: dict[str, Any] = {"twin": str(twin), "mapper": {"running": running, "pid": pid, "starting": starting,
                                                           "cannotTell": why}, "broker": None}
    if running is None:
        return False, f"cannot tell whether a mapper runs on the twin {twin}: {why}", shown
    if not running:
        return False, f"no mapper runs on the twin {twin} (nobody holds {_lock_path(twin)})", shown
    who = f"the mapper (pid {pid if pid is not None else '?'})"
    if starting:
        return False, f"{who} is starting, not running yet (its log says what it waits for)", shown
    if config.mqtt is None:
        return True, f"{who} runs on the twin {twin} (no mqtt section: no broker to check)", shown
    try:
        note = _read_broker_note(twin)
    except (OSError, sqlite3.Error) as exc:
        return False, f"{who} runs, but its twin {twin} cannot be read here: {exc}", shown
    shown["broker"] = note
    now_ms = time.time() * 1000
    running_ms = _running_since_ms(twin)
    if not _noted_by_this_run(note, pid, running_ms, now_ms=now_ms, stale_s=stale_s):
        # Not noted yet by this run: it notes it once it has tried the broker, and every minute.
        if running_ms is not None and now_ms - running_ms > stale_s * 1000:
            return False, (f"twin not written: {who} has run for {_age_text(now_ms - running_ms)} without"
                           f" noting its broker connection in {twin} (it notes it every"
                           f" {BROKER_NOTE_REFRESH_S:g} s): {_TWIN_NOT_WRITTEN}"), shown
        return True, f"{who} runs; it has not noted its broker connection yet", shown
    if now_ms - note["noted"] > stale_s * 1000:
        return False, (f"twin not written for {_age_text(now_ms - note['noted'])}: {who} notes its broker"
                       f" connection in {twin} every {BROKER_NOTE_REFRESH_S:g} s, last at {_fmt_ts(note['noted'])}:"
                       f" {_TWIN_NOT_WRITTEN}"), shown
    if note["connected"]:
        return True, f"{who} runs, connected to {note['url']} since {_fmt_ts(note['since'])}", shown
    down = f"{note['url']} unreachable for {_age_text(now_ms - note['since'])}, since {_fmt_ts(note['since'])}"
    reason = f": {note['error']}" if note.get("error") else ""
    if now_ms - note["since"] > broker_down_s * 1000:
        return False, f"broker {down} (more than {broker_down_s:g} s){reason}", shown
    return True, f"{who} runs; broker {down} (unhealthy after {broker_down_s:g} s){reason}", shown


def _read_broker_note(twin: Path) -> dict | None:
    """The broker note in the twin of a running mapper, read without writing or making anything: the
    file opened read-only (`mode=ro`), its `-shm` too (`readonly_shm`: a reader marks what it reads
    there, which changed the file every probe), and only with its `-wal` and `-shm` there (the
    running mapper has it open): a reader of a twin nobody has open makes them (a clean stop removes
    them)."""
    real = os.path.realpath(twin)
    for beside in (f"{real}-wal", f"{real}-shm"):
        if not os.path.exists(beside):
            raise OSError(f"{beside} is not there: the mapper does not have its twin open")
    from twin.store import BROKER_META

    conn = sqlite3.connect(f"{Path(real).as_uri()}?mode=ro&readonly_shm=1", uri=True, isolation_level=None, timeout=0.5)
    try:
        conn.execute("PRAGMA query_only=ON")
        row = conn.execute("SELECT value FROM meta WHERE key=?", (BROKER_META,)).fetchone()
    finally:
        conn.close()
    return _parsed_broker_note(row[0] if row else None)


def _age_text(ms: float) -> str:
    """`45 s`, `12 min`, `5 h`, `3 days`: how long ago, to a person's measure."""
    seconds = max(0, round(ms / 1000))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 120 * 60:
        return f"{seconds // 60} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def cmd_cloud_worker(args: argparse.Namespace) -> int:
    """Run the cloud half of early-exit inference (needs the `ml` extra)."""
    from mapper.inference.settings import missing_ml_packages

    if missing := missing_ml_packages():  # as `mapper run` says it for a pipeline, not a traceback
        from devices.extras import install_extra

        raise ValueError(f"mapper cloud-worker needs {' and '.join(missing)}, not installed here: install the"
                         f" `ml` extra ({install_extra('ml')})")
    from mapper.inference.worker import main as worker_main

    return worker_main(args.config)


# --config of the commands that read or set the twin of a mapper: the same file `mapper run` is given.
HISTORY_EPILOG = """\
Times: ts is when the reading was taken (the mapper's clock); --since is inclusive, --until
exclusive, so windows follow each other without overlap. A bare time is UTC.
A time window is printed whole, streamed as it is read (no row cap: add --limit to keep
its newest N). Its rows are found by a scan of the history (twin.history_rows: 200,000
by default), run on a snapshot taken at the start; the mapper goes on recording meanwhile.

examples:
  mapper twin history room-sensor temperature -c mapper.yaml               the last 20
  mapper twin history room-sensor --all --since 24h --csv -c mapper.yaml > day.csv
  mapper twin history room-sensor temperature --since 2026-12-01T08:00 --until 2026-12-01T09:00 --json -c mapper.yaml
"""
CONFIG_HELP = "the config file the mapper runs with (README, Config file): its twin.path is the twin this reads or sets"
DEVICE_HELP = "namespace/name, or name for a device in namespace default"
JSON_HELP = "print JSON instead of the table"
FIRST_STEPS = """\
first steps:
  mapper validate devices/             check device files: each problem as FILE:LINE: FIELD: PROBLEM
  mapper validate --config mapper.yaml check a config as `mapper run` would, running nothing
  mapper run --config mapper.yaml      run it (Ctrl-C stops it)
  mapper devices --config mapper.yaml  what it runs, from another terminal
README.md has the device YAML, the config keys and the MQTT topics."""


def _command(sub: Any, name: str, summary: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose own --help opens with what it does (argparse shows `help` only in the
    parent's list, and `mapper run --help` said nothing about running)."""
    return sub.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".", **kwargs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mapper", description="KubeEdge-compatible device mapper and edge gateway",
                                epilog=FIRST_STEPS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mapper {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                         help="`mapper COMMAND --help` says more about each")

    v = _command(sub, "validate", "check device YAML files or directories, or a config file and its device files")
    v.add_argument("paths", nargs="*", metavar="PATH",
                   help="device YAML files, or directories of them (their own *.yaml and *.yml files)")
    v.add_argument("--config", "-c", help="check this config file as `mapper run` would before it starts (its"
                   " device files, pipelines, password and TLS files, its twin's place), without running anything")
    v.set_defaults(fn=cmd_validate)

    r = _command(sub, "run", "run the mapper until SIGINT/SIGTERM; SIGHUP reloads its device files")
    r.add_argument("--config", "-c", required=True,
                   help="the config file (YAML: node, devices, twin, mqtt ...; README, Config file)")
    r.set_defaults(fn=cmd_run)

    rl = _command(sub, "reload", "make the running mapper reload its config and device files (SIGHUP) and"
                  " wait for the outcome: exit 1 when it refused them (the unit's ExecReload=)")
    rl.add_argument("--config", "-c", required=True, help="the config the mapper runs with (for its twin.path)")
    rl.add_argument("--timeout", type=float, default=RELOAD_WAIT_S,
                    help=f"seconds to wait for the outcome (default {RELOAD_WAIT_S:g})")
    rl.set_defaults(fn=cmd_reload)

    t = _command(sub, "twin", "read or set a device twin")
    tsub = t.add_subparsers(dest="twin_command", required=True, metavar="COMMAND", title="commands",
                            help="`mapper twin COMMAND --help` says more about each")
    g = _command(tsub, "get", "show a device's twin: each property's reported and desired value, and its last reading")
    g.add_argument("device", help=DEVICE_HELP)
    g.add_argument("--config", "-c", required=True, help=CONFIG_HELP)
    g.add_argument("--json", action="store_true", help=JSON_HELP)
    g.set_defaults(fn=cmd_twin_get)
    s = _command(tsub, "set", "set a desired value; the running mapper applies it (none running: the next `mapper"
                 " run`)")
    s.add_argument("device", help=DEVICE_HELP)
    s.add_argument("property", help="a ReadWrite property of the device")
    s.add_argument("value", help='read as an MQTT .../set payload is: true, 21.5, ON, plain text, or {"value": ...}')
    s.add_argument("--config", "-c", required=True, help=CONFIG_HELP)
    s.set_defaults(fn=cmd_twin_set)

    lk = _command(sub, "lock", "lock a device for maintenance: its values are still read, but nothing is written to"
                  " it (MQTT, the twin protocol, REST, `mapper twin set`) until `mapper unlock`; survives restarts")
    lk.add_argument("device", help=DEVICE_HELP)
    lk.add_argument("--reason", "-r", help="why, shown with every refusal (\"pump rewiring, call Ann\")")
    lk.add_argument("--config", "-c", required=True, help=CONFIG_HELP)
    lk.set_defaults(fn=cmd_lock)
    ul = _command(sub, "unlock", "release a device's maintenance lock; nothing refused meanwhile is written")
    ul.add_argument("device", help=DEVICE_HELP)
    ul.add_argument("--config", "-c", required=True, help=CONFIG_HELP)
    ul.set_defaults(fn=cmd_unlock)

    i = _command(sub, "install-service", "write a systemd unit for this installation (run with sudo)")
    i.add_argument("--config", "-c", required=True, help="the config file the service runs with")
    i.add_argument("--dry-run", action="store_true", help="print the unit and change nothing")
    i.add_argument("--user", default="mapper", help="the service user, created if missing (default: mapper)")
    i.add_argument("--groups", nargs="*", default=["gpio"], help="extra groups for the user (default: gpio)")
    i.add_argument("--unit-file", default="/etc/systemd/system/mapper.service",
                   help="where the unit goes (default: /etc/systemd/system/mapper.service)")
    i.add_argument("--other-twin", action="store_true",
                   help="install although the config's twin.path is not the service's twin (/var/lib/mapper/twin.db):"
                        " the CLI commands given this config then read and set another twin than the service's")
    i.add_argument("--watchdog-sec", type=int, default=30,
                   help="the unit's WatchdogSec: systemd restarts a mapper whose pings stop this long (default 30)")
    i.add_argument("--stop-timeout-sec", type=int, default=30,
                   help="the unit's TimeoutStopSec: how long a stop may take before systemd kills it (default 30)")
    i.add_argument("--unit-only", action="store_true", help="only write the unit file (no user, no systemctl)")
    i.add_argument("--force", action="store_true",
                   help="install although the checks find that the service cannot start (printed as warnings)")
    i.set_defaults(fn=cmd_install_service)

    h = _command(tsub, "history", "readings of a property or of every property of a device, the last N or a time"
                 " window, oldest first, as a table, JSON or CSV; writes nothing to the twin",
                 epilog=HISTORY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("device", help=DEVICE_HELP)
    h.add_argument("property", nargs="?", help="a property of the device; none (or --all): every property")
    h.add_argument("--all", "-a", action="store_true", help="every property of the device, in time order")
    h.add_argument("--since", type=_history_when, metavar="WHEN",
                   help=f"readings taken at or after WHEN: {WHEN_FORMS}")
    h.add_argument("--until", type=_history_when, metavar="WHEN", help="readings taken before WHEN (as --since)")
    h.add_argument("--limit", "-n", type=_history_count,
                   help=f"the newest N readings (of the time window, if given), 1 to {HISTORY_MAX_LIMIT:,}; default"
                        f" {HISTORY_DEFAULT_LIMIT} without --since/--until, every reading of the window with them")
    h.add_argument("--config", "-c", required=True, help=CONFIG_HELP)
    shown = h.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help=JSON_HELP)
    shown.add_argument("--csv", action="store_true",
                       help=f"print CSV ({','.join(HISTORY_CSV_COLUMNS)}): ts in ISO 8601 UTC with milliseconds,"
                            " ts_ms in epoch milliseconds; a string value as it is, quoted as CSV needs, others as JSON"
                            " (21.5, true); an error reading's value empty, its detail in detail")
    h.set_defaults(fn=cmd_twin_history)

    d = _command(sub, "devices", "whether a mapper runs; each device, its state and last reading; the outbox")
    d.add_argument("--config", "-c", required=True, help=CONFIG_HELP)
    d.add_argument("--json", action="store_true", help=JSON_HELP)
    d.set_defaults(fn=cmd_devices)

    he = _command(sub, "health", "exit 0 when the mapper running on this config's twin is healthy, else 1 with one"
                  " line saying why (a probe's: reads its lock file and twin, writes nothing, reaches no broker)")
    he.add_argument("--config", "-c", required=True, help="the config the mapper runs with (for its twin.path)")
    he.add_argument("--json", action="store_true", help="print JSON instead of the line")
    he.add_argument("--broker-down-s", type=_health_seconds, default=HEALTH_BROKER_DOWN_S, metavar="SECONDS",
                    help=f"unhealthy once the broker has been unreachable this long (default {HEALTH_BROKER_DOWN_S:g})")
    he.add_argument("--stale-s", type=_health_stale_s, default=BROKER_NOTE_STALE_S, metavar="SECONDS",
                    help=f"unhealthy once the mapper has not noted its broker connection in the twin this long (it"
                         f" does every {BROKER_NOTE_REFRESH_S:g} s; default {BROKER_NOTE_STALE_S:g})")
    he.set_defaults(fn=cmd_health)

    dr = _command(sub, "drivers", "list the drivers installed, built in and from packages (the mapper.drivers entry"
                  " points), and any that cannot be loaded: exit 1 then")
    dr.add_argument("--json", action="store_true", help=JSON_HELP)
    dr.set_defaults(fn=cmd_drivers)

    di = _command(sub, "discover", "list the 1-wire temperature sensors (DS18B20 ...) on this host's bus with a"
                  " reading each, or write a Device for each (--yaml); exit 1 when there is no bus or no sensor")
    di.add_argument("--w1-root", metavar="PATH", help="the kernel's w1 devices directory (default: $MAPPER_W1_ROOT,"
                    " else /sys/bus/w1/devices)")
    shown = di.add_mutually_exclusive_group()
    shown.add_argument("--yaml", action="store_true", help="print a DeviceModel and one Device per sensor, ready to"
                       " save in the devices directory")
    shown.add_argument("--json", action="store_true", help=JSON_HELP)
    di.set_defaults(fn=cmd_discover)

    w = _command(sub, "cloud-worker", "answer offloaded inference requests with cloud.onnx (MQTT 5 shared"
                 " subscription)")
    w.add_argument("--config", "-c", required=True, help="worker config: mqtt section + models_dir (docs/inference.md)")
    w.set_defaults(fn=cmd_cloud_worker)
    return p


class _StderrWarnings(logging.Handler):
    """What a command that sets up no logging (all but `run`) logs, on stderr as its own warnings are
    written (`warning: ...`): the registry's warnings about a driver, printed bare by Python's default."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"{record.levelname.lower()}: {self.format(record)}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - as logging's own handlers do
            self.handleError(record)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.lastResort = _StderrWarnings(logging.WARNING)  # (used only while no handler is set up)
    try:
        return args.fn(args)
    except DefinitionError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        for warning in exc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `mapper devices | head`: the reader has gone, as for any Unix tool that is no error. Its
        # stdout goes nowhere from now on, so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (TwinError, ValueError, OSError, sqlite3.Error, subprocess.CalledProcessError) as exc:
        # (OSError: PermissionError, a missing file ...; sqlite3.Error: a locked or broken twin file)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
