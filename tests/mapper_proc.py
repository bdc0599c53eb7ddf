"""Run the mapper as a user would (`python -m mapper run`), connected to a test broker."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from brokers import MosquittoBroker
from helpers import wait_for, write_config

REPO = Path(__file__).resolve().parents[1]


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
                 file_size_limit: int | None = None) -> None:
        self.tmp = tmp
        # RLIMIT_FSIZE of the mapper: its twin files cannot grow past it, a full disk of its own.
        self.file_size_limit = file_size_limit
        self.env = env or {}
        self.twin_path = tmp / f"{name}-twin.db"
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
