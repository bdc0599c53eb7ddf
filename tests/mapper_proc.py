"""Run the mapper as a user would (`python -m mapper run`), connected to a test broker."""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

from brokers import MosquittoBroker
from helpers import wait_for, write_config

REPO = Path(__file__).resolve().parents[1]

# SQLite checkpoints a WAL once a commit leaves it this many frames long (wal_autocheckpoint).
WAL_AUTOCHECKPOINT_FRAMES = 1000


def wal_committed_end(wal: Path) -> tuple[int, int]:
    """(where the last committed frame of a SQLite WAL file ends, its page size): the frames of
    the WAL's current generation (its salts) whose checksums chain from its header, up to the
    last commit frame (https://www.sqlite.org/fileformat.html#the_write_ahead_log). What lies
    past that point is a transaction in progress or one that failed: the next one overwrites it."""
    data = wal.read_bytes()
    if len(data) < 32:  # not even the WAL's header
        return 0, 0
    magic, _, page_size, _, salt1, salt2 = struct.unpack_from(">6I", data)
    order = "<" if magic == 0x377F0682 else ">"  # checksums over little- or big-endian words

    def checksum(s0: int, s1: int, chunk: bytes) -> tuple[int, int]:
        words = struct.unpack(f"{order}{len(chunk) // 4}I", chunk)
        for i in range(0, len(words), 2):
            s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
            s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
        return s0, s1

    s0, s1 = checksum(0, 0, data[:24])
    if (s0, s1) != struct.unpack_from(">2I", data, 24):
        return 0, page_size
    frame = 24 + page_size
    end = offset = 32
    while offset + frame <= len(data):
        _, commit, f1, f2, c0, c1 = struct.unpack_from(">6I", data, offset)
        s0, s1 = checksum(s0, s1, data[offset:offset + 8] + data[offset + 24:offset + frame])
        if (f1, f2) != (salt1, salt2) or (c0, c1) != (s0, s1):
            break
        offset += frame
        if commit:
            end = offset
    return end, page_size


def mqtt_block(broker: MosquittoBroker, tmp: Path, *, user: str = "mapper", extra: str = "") -> str:
    secret = tmp / f"{user}.password"
    secret.write_text(broker.users[user])
    secret.chmod(0o600)
    given = {line.split(":", 1)[0].strip() for line in extra.splitlines() if line.startswith("  ") and ":" in line}
    defaults = "".join(f"  {key}: {value}\n" for key, value in (("reconnect_min_s", 0.2), ("reconnect_max_s", 1.0))
                       if key not in given)  # `extra` may set them: a key twice is a config error
    return (f"mqtt:\n  url: mqtt://{broker.host}:{broker.port}\n  username: {user}\n"
            f"  password_file: {secret}\n{defaults}{extra}")


class MapperProcess:
    """`python -m mapper run --config ...` in a subprocess, log to a file, always stopped."""

    def __init__(self, tmp: Path, devices: Path, broker: MosquittoBroker | None, *, node: str = "test-node",
                 extra: str = "", name: str = "mapper", env: dict[str, str] | None = None,
                 file_size_limit: int | None = None, twin: Path | None = None) -> None:
        self.tmp = tmp
        # RLIMIT_FSIZE of the mapper from its start: its files cannot grow past it (see disk_full).
        self.file_size_limit = file_size_limit
        self.full_at: int | None = None  # the WAL's committed end when disk_full() was called
        self.env = env or {}
        self.twin_path = twin or tmp / f"{name}-twin.db"  # (`twin`: elsewhere, such as on a small disk)
        mqtt = mqtt_block(broker, tmp, extra=extra) if broker else ""
        self.config = write_config(tmp / f"{name}.yaml", devices, self.twin_path, node=node, extra=mqtt)
        self.log_path = tmp / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MapperProcess:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **self.env},
                                            preexec_fn=self._limit if self.file_size_limit else None)
        return self

    def _limit(self) -> None:
        assert self.file_size_limit is not None
        # (The hard limit stays: `disk_freed` can lift the soft one again.)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit, resource.RLIM_INFINITY))

    @property
    def wal_path(self) -> Path:
        return self.twin_path.with_name(self.twin_path.name + "-wal")

    def disk_full(self) -> int:
        """From now on the mapper's disk is full: not one more frame fits in its twin's WAL. Returns
        where the WAL's committed frames end (`full_at`; they stay so while the disk is full).

        A limit that a growing WAL runs into is not a full disk: the commit that fails there leaves
        the WAL's tail free, from the last committed frame to the limit (up to that commit's size
        less a frame), and smaller commits after it still fit (the availability rows queued at a
        reconnect, the last flush at a stop). The limit goes down to where the committed frames
        end, then: SQLite writes new frames after those, and goes back to the WAL's start only
        after a checkpoint, which `file_size_limit` (below the WAL's checkpoint size) rules out,
        so every commit from here on fails. Nothing else the mapper writes comes near it (its log
        is checked)."""
        assert self.process is not None and self.file_size_limit is not None
        end, page_size = wal_committed_end(self.wal_path)
        assert page_size and self.file_size_limit < 32 + WAL_AUTOCHECKPOINT_FRAMES * (24 + page_size), (
            "file_size_limit must keep the WAL from being checkpointed (and started again from its beginning)")
        assert end > self.log_path.stat().st_size + 65536, f"the WAL ends at {end}: the mapper's log would not fit"
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (end, resource.RLIM_INFINITY))
        # A commit may have ended between the read and the new limit: it is part of what the disk holds.
        self.full_at, _ = wal_committed_end(self.wal_path)
        assert self.full_at >= end
        return self.full_at

    def wal_committed_end(self) -> int:
        """Where the committed frames of the twin's WAL end now (equal to `full_at` while the disk is full)."""
        return wal_committed_end(self.wal_path)[0]

    def disk_freed(self) -> None:
        """The mapper's full disk has room again: its twin files may grow (RLIMIT_FSIZE lifted)."""
        assert self.process is not None and self.file_size_limit is not None
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0, count: int = 1) -> None:
        wait_for(lambda: self.log().count(text) >= count, timeout=timeout, what=f"{text!r} in the mapper log")

    def stop(self) -> int:
        """SIGTERM and the exit code; a mapper that does not exit within 20 s is killed and the test fails."""
        if self.process is None:
            return 0
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise AssertionError(f"the mapper did not stop within 20 s of SIGTERM; log tail:\n{self.log()[-2000:]}") from None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> MapperProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
