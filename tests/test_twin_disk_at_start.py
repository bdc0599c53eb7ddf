"""A twin whose disk is full or read-only when `mapper run` starts: the start waits for it.

`mapper run` exited 1 (`cannot open the twin ...: disk I/O error`, or `attempt to write a readonly
database` naming no file), and the unit's restart policy (StartLimitBurst=5 in 300 s, RestartSec=5)
gave up for good after ~30 s: the mapper stayed down after logrotate or journald had freed space.
Now it logs what it waits for (the twin, the cause, what to do), tells systemd (STATUS=, the start
timeout extended; no READY=1) and starts once the disk has room; SIGTERM stops the wait at once.

Real processes on a real 2 MB tmpfs (root only: skipped otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import wait_for, write_config, write_devices
from mapper.service import TWIN_RETRY_S
from test_systemd import NotifyListener

REPO = Path(__file__).resolve().parents[1]
RUNNING = "running: 1 device(s)"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted on a directory of tmp_path, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    directory = tempfile.mkdtemp(prefix="sdn-")  # (AF_UNIX paths are short: not under tmp_path)
    listening = NotifyListener(os.path.join(directory, f"notify-{uuid.uuid4().hex[:6]}"))
    try:
        yield listening
    finally:
        listening.close()
        shutil.rmtree(directory)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


class Mapper:
    """`mapper run` in a subprocess, its output in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        with log.open("w") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(config)],
                                         stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        wait_for(lambda: text in self.log() or self.proc.poll() is not None, timeout=timeout, what=repr(text))
        assert text in self.log(), f"exited {self.proc.returncode} without {text!r}:\n{self.log()}"

    def stop(self, within_s: float = 15.0) -> tuple[int | None, float]:
        """SIGTERM: (exit code, seconds it took); killed (None) when not within `within_s`."""
        begun = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            code = None
        return code, time.monotonic() - begun

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def setup(tmp_path: Path, disk: Path) -> tuple[Path, Path]:
    """(config, twin): one simulated device, the twin on the small disk, made by a first short run."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    twin = disk / "state" / "twin.db"
    config = write_config(tmp_path / "mapper.yaml", devices, twin)
    return config, twin


def first_run(config: Path, log: Path, *, clean: bool) -> None:
    with Mapper(config, log) as first:
        first.wait_log(RUNNING)
        time.sleep(0.5)
        if clean:
            assert first.stop()[0] == 0, first.log()
        else:
            first.proc.kill()
            first.proc.wait(timeout=10)


def test_a_start_on_a_full_disk_waits_and_starts_once_there_is_room(tmp_path: Path, small_disk: Path,
                                                                      listener: NotifyListener) -> None:
    config, twin = setup(tmp_path, small_disk)
    first_run(config, tmp_path / "first.log", clean=True)
    assert not twin.with_name("twin.db-wal").exists() and not twin.with_name("twin.db-shm").exists()
    filler = fill(small_disk)
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "2000000"}
    with Mapper(config, tmp_path / "mapper.log", env) as mapper:
        mapper.wait_log("The mapper waits for it")
        time.sleep(1.0)
        assert mapper.proc.poll() is None, mapper.log()  # it exited 1 here
        error = next(line for line in mapper.log().splitlines() if "The mapper waits for it" in line)
        assert " ERROR " in error and f"the twin {twin}" in error and "is full" in error, error
        waiting = listener.wait_for(re.compile(rf"STATUS=waiting for the twin .*{re.escape(str(twin))}.*"))
        assert re.compile(r"EXTEND_TIMEOUT_USEC=\d+").fullmatch(
            next(item for item in listener.messages[waiting] if item.startswith("EXTEND"))), listener.messages[waiting]
        assert not listener.positions("READY=1")
        filler.unlink()
        mapper.wait_log(RUNNING, timeout=40)
        assert listener.wait_for("READY=1") > waiting
        code, _ = mapper.stop()
        assert code == 0, mapper.log()
    assert "can be opened and written again" in mapper.log()


def test_sigterm_while_waiting_for_a_full_disk_stops_at_once(tmp_path: Path, small_disk: Path) -> None:
    config, _ = setup(tmp_path, small_disk)
    first_run(config, tmp_path / "first.log", clean=True)
    fill(small_disk)
    with Mapper(config, tmp_path / "mapper.log") as mapper:
        mapper.wait_log("The mapper waits for it")
        time.sleep(0.5)
        assert mapper.proc.poll() is None, mapper.log()
        code, took = mapper.stop()
    # Before the next try (TWIN_RETRY_S: 5 s after the first): the stop did not wait for it.
    assert code == 0 and took < TWIN_RETRY_S[0], (code, took, mapper.log())
    assert "stopped while waiting for its twin" in mapper.log()


def test_a_start_on_a_read_only_file_system_names_the_twin_and_waits(tmp_path: Path, small_disk: Path) -> None:
    """The -wal and -shm a crash left: SQLite opens the twin read-only and the first write (the
    device list) failed with `attempt to write a readonly database`, naming no file."""
    config, twin = setup(tmp_path, small_disk)
    first_run(config, tmp_path / "first.log", clean=False)
    assert twin.with_name("twin.db-wal").exists()
    remount(small_disk, "ro")
    try:
        with Mapper(config, tmp_path / "mapper.log") as mapper:
            mapper.wait_log("The mapper waits for it")
            time.sleep(1.0)
            assert mapper.proc.poll() is None, mapper.log()
            error = next(line for line in mapper.log().splitlines() if "The mapper waits for it" in line)
            assert f"the twin {twin}" in error and "read-only" in error, error
            remount(small_disk, "rw")
            mapper.wait_log(RUNNING, timeout=40)
            assert mapper.stop()[0] == 0, mapper.log()
    finally:
        remount(small_disk, "rw")


def test_a_twin_that_is_not_a_database_still_stops_the_start_naming_it(tmp_path: Path) -> None:
    """Only the disk's state is waited for: what someone must fix exits 1 at once, naming the file."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    twin = tmp_path / "twin.db"
    twin.write_bytes(b"not a database, " * 512)
    config = write_config(tmp_path / "mapper.yaml", devices, twin)
    done = subprocess.run([sys.executable, "-m", "mapper", "run", "--config", str(config)], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert f"error: the twin {twin} cannot be read as a database (file is not a database)" in done.stderr, done.stderr


@pytest.mark.parametrize("directory", ["made", "not made yet"])
def test_two_mappers_waiting_for_a_read_only_disk_do_not_both_run(tmp_path: Path, small_disk: Path,
                                                                  directory: str) -> None:
    """On a read-only disk `<twin>.lock` cannot be opened for writing: `mapper run` went on unguarded,
    as the twin could not be opened either. Now that the start waits for such a twin, the lock is
    taken before each try: of two mappers waiting, one runs once the disk is writable, the other
    is refused with the usual message. Also when the twin's directory is not there yet (a first
    start): the lock file's directory is made before the lock is tried (the twin's open made it
    after, and both ran)."""
    config, twin = setup(tmp_path, small_disk)
    if directory == "made":
        first_run(config, tmp_path / "first.log", clean=True)
    remount(small_disk, "ro")
    try:
        with Mapper(config, tmp_path / "a.log") as a, Mapper(config, tmp_path / "b.log") as b:
            a.wait_log("The mapper waits for it")
            b.wait_log("The mapper waits for it")
            remount(small_disk, "rw")
            wait_for(lambda: a.proc.poll() is not None or b.proc.poll() is not None, timeout=40,
                     what="one of the two mappers refused")
            refused, running = (a, b) if a.proc.poll() is not None else (b, a)
            assert refused.proc.returncode == 1, refused.log()
            assert f"is running on the twin {twin}" in refused.log(), refused.log()
            running.wait_log(RUNNING, timeout=40)
            assert running.stop()[0] == 0, running.log()
    finally:
        remount(small_disk, "rw")


def test_mapper_reload_while_the_start_waits_for_the_twin_says_so_at_once(tmp_path: Path, small_disk: Path) -> None:
    """`mapper reload` on a mapper still waiting for its twin (its SIGHUP handler listens only once it
    runs) waited its 90 s and then said "a mapper started before `mapper reload` existed tells none".
    The lock now says `<pid> starting` until the mapper runs: `mapper reload` says at once that it has
    not finished starting, and sends no SIGHUP. Once it runs, the reload goes through."""
    config, twin = setup(tmp_path, small_disk)
    first_run(config, tmp_path / "first.log", clean=True)
    filler = fill(small_disk)
    lock = Path(f"{twin}.lock")

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mapper", "reload", "--config", str(config), "--timeout", "30"],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=45)

    with Mapper(config, tmp_path / "mapper.log") as mapper:
        mapper.wait_log("The mapper waits for it")
        begun = time.monotonic()
        early = reload()
        assert early.returncode == 1, early
        assert time.monotonic() - begun < 15, early  # (it waited for its --timeout, 30 s)
        assert (f"error: the mapper (pid {mapper.proc.pid}) on the twin {twin} has not finished starting ({lock} says"
                " so") in early.stderr, early.stderr
        assert "reload done" not in mapper.log() and mapper.proc.poll() is None, mapper.log()
        filler.unlink()
        mapper.wait_log(RUNNING, timeout=40)
        wait_for(lambda: lock.read_text() == f"{mapper.proc.pid}\n", what="the lock no longer saying starting")
        done = reload()
        assert done.returncode == 0 and f"reloaded: the mapper (pid {mapper.proc.pid})" in done.stdout, done
        assert mapper.stop()[0] == 0, mapper.log()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mapper ARGS --config CONFIG`, its output captured."""
    return subprocess.run([sys.executable, "-m", "mapper", *args, "--config", str(config)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("lock_file", ["left by the last run", "not there"])
def test_the_commands_cannot_tell_whether_a_mapper_runs_on_a_read_only_disk(tmp_path: Path, small_disk: Path,
                                                                            lock_file: str) -> None:
    """On a read-only disk `mapper run` cannot open `<twin>.lock` for writing (nor make it): it runs
    without holding it, waiting for its twin. `mapper devices` and `mapper reload` took the lock
    nobody held (or its absence) for "no mapper runs", while one ran. They now say they cannot
    tell, naming the lock file and the error; `mapper devices` still shows the twin's states."""
    config, twin = setup(tmp_path, small_disk)
    first_run(config, tmp_path / "first.log", clean=False)  # (its -wal and -shm let the commands read the twin)
    lock = Path(f"{twin}.lock")
    if lock_file == "not there":
        lock.unlink()
    cause = (f"nobody holds {lock}, but it cannot be opened for writing (Read-only file system)"
             if lock_file == "left by the last run"
             else f"{lock} is not there, and cannot be made ({twin.parent} is on a read-only file system)")
    remount(small_disk, "ro")
    try:
        with Mapper(config, tmp_path / "mapper.log") as mapper:
            mapper.wait_log("The mapper waits for it")
            devices = cli(config, "devices")
            assert devices.returncode == 0, devices
            first = devices.stdout.splitlines()[0]
            assert first.startswith(f"mapper: cannot tell whether a mapper runs on {twin}: {cause}"), devices.stdout
            assert "default/lamp" in devices.stdout, devices.stdout
            shown = json.loads(cli(config, "devices", "--json").stdout)["mapper"]
            assert shown["running"] is None and shown["cannotTell"] in first, shown
            reload = cli(config, "reload", "--timeout", "1")
            assert reload.returncode == 1 and "no mapper runs" not in reload.stderr, reload
            assert f"error: cannot tell whether a mapper runs on the twin {twin}" in reload.stderr, reload.stderr
            assert cause in reload.stderr, reload.stderr
            assert mapper.proc.poll() is None, mapper.log()
    finally:
        remount(small_disk, "rw")


def test_the_commands_read_a_cleanly_stopped_twin_on_a_read_only_disk_and_twin_set_says_why_not(
        tmp_path: Path, small_disk: Path) -> None:
    """A clean stop leaves no `-wal` and `-shm` beside the twin. On a read-only disk (an SD card the
    kernel remounted read-only) SQLite cannot make them, so `mapper devices`, `twin get` and `twin
    history` said `cannot open the twin ...: unable to open database file` (history without naming
    the twin), when only they could show what the twin held. They read it now; `twin set`, which must
    write, names the twin and the read-only file system and what to do."""
    config, twin = setup(tmp_path, small_disk)
    first_run(config, tmp_path / "first.log", clean=True)
    assert not twin.with_name("twin.db-wal").exists() and not twin.with_name("twin.db-shm").exists()
    remount(small_disk, "ro")
    try:
        devices = cli(config, "devices")
        assert devices.returncode == 0 and "default/lamp" in devices.stdout, devices
        got = cli(config, "twin", "get", "lamp", "--json")
        assert got.returncode == 0 and json.loads(got.stdout)["id"] == "default/lamp", got
        history = cli(config, "twin", "history", "lamp", "count", "-n", "2", "--json")
        assert history.returncode == 0 and len(json.loads(history.stdout)) == 2, history  # noqa: PLR2004
        refused = cli(config, "twin", "set", "lamp", "power", "true")
        assert refused.returncode == 1, refused
        assert f"the twin {twin}" in refused.stderr and "read-only" in refused.stderr, refused.stderr
        assert "mount -o remount,rw" in refused.stderr, refused.stderr
        assert not twin.with_name("twin.db-wal").exists()
    finally:
        remount(small_disk, "rw")
