"""Building blocks shared by the scenarios: broker, subscriber, mapper process, /proc figures, stats."""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from brokers import MosquittoBroker, _which, ensure_mosquitto_installed  # noqa: F401 - re-exported
from mapper_proc import mqtt_block

REPO = Path(__file__).resolve().parents[2]
NODE = "bench"
TOPIC_BASE = f"mapper/{NODE}/default"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- the broker -------------------------------------------------------------------------------

def bench_broker() -> MosquittoBroker:
    """The shipped mosquitto.conf on free loopback ports, without the per-message debug log that
    tests/brokers.py turns on (it would make the broker log every PUBLISH and PUBACK)."""
    ensure_mosquitto_installed()
    broker = MosquittoBroker("mosquitto.conf", node=NODE)
    text = broker.conf_path.read_text()
    broker.conf_path.write_text(text.replace("log_type all\n", "", 1))
    return broker


def write_secret(broker: MosquittoBroker, tmp: Path, user: str) -> Path:
    path = tmp / f"{user}.password"
    path.write_text(broker.users[user])
    path.chmod(0o600)
    return path


# -- the subscriber process -------------------------------------------------------------------

@dataclass(slots=True)
class Arrival:
    at: float        # wall-clock seconds when mosquitto_sub received it
    topic: str
    ts: int          # payload `ts`: when the reading was taken (ms)
    seq: int
    t: float | None  # raw publisher only: exact send time (s)
    value: object = None  # the payload's value (a `clock` property's value is its exact read time, s)
    tick: int | None = None  # raw publisher with --ticks only: the index of the tick the reading was taken in


class Subscriber:
    """`mosquitto_sub` (C, so it is never the bottleneck) in its own process, QoS 1, persistent
    session; every message lands in a file as `<arrival unix time in ns> <topic> <payload>`."""

    def __init__(self, broker: MosquittoBroker, topic: str, out: Path) -> None:
        self.broker = broker
        self.topic = topic
        self.out = out
        self.client_id = f"bench-sub-{secrets.token_hex(4)}"
        self.process: subprocess.Popen[bytes] | None = None

    def _args(self) -> list[str]:
        binary = _which("mosquitto_sub")
        assert binary is not None
        return [binary, "-h", self.broker.host, "-p", str(self.broker.port), "-u", "app",
                "-P", self.broker.users["app"], "-V", "mqttv311", "-c", "-i", self.client_id,
                "-q", "1", "-t", self.topic]

    def start(self) -> Subscriber:
        # First make the persistent session and its subscription and wait for the SUBACK (-E),
        # so nothing published after start() returns can be missed; then receive in that session.
        subprocess.run([*self._args(), "-E"], check=True, timeout=20, stdout=subprocess.DEVNULL)
        with self.out.open("wb") as sink:
            self.process = subprocess.Popen([*self._args(), "-F", "%U %t %p"], stdout=sink,
                                            stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
            self._end_session()

    def _end_session(self) -> None:
        """Connect once more with a clean session: the broker drops the durable one. Left behind, it
        queued every later scenario's messages (up to the broker's per-session limits), and a dozen
        such sessions took the broker to its memory_limit: it then refused the next mapper's CONNECT."""
        args = [a for a in self._args() if a != "-c"]
        subprocess.run([*args, "-E"], timeout=20, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def arrivals(self) -> list[Arrival]:
        result = []
        with self.out.open("rb") as f:
            for line in f:
                at, topic, payload = line.rstrip(b"\n").split(b" ", 2)
                try:
                    body = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(body, dict) or "seq" not in body:
                    continue
                result.append(Arrival(float(at), topic.decode(), int(body.get("ts", 0)), int(body["seq"]), body.get("t"),
                                  body.get("value"), body.get("tick")))
        return result

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def count_after(arrivals: Sequence[Arrival], start: float, end: float) -> int:
    return sum(1 for a in arrivals if start <= a.at < end)


def continuity(arrivals: Sequence[Arrival], committed: dict[str, int]) -> dict[str, int]:
    """Per topic, every seq from 1 to the committed one must have arrived: lost, duplicates, received."""
    seen: dict[str, set[int]] = {}
    total = 0
    for a in arrivals:
        seen.setdefault(a.topic, set()).add(a.seq)
        total += 1
    lost = 0
    for topic, last in committed.items():
        got = seen.get(topic, set())
        lost += sum(1 for s in range(1, last + 1) if s not in got)
    distinct = sum(len(s) for s in seen.values())
    return {"lost": lost, "duplicates": total - distinct, "received": distinct,
            "committed": sum(committed.values())}


# -- device files and the mapper process ------------------------------------------------------

MODEL = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {{name: bench-model, namespace: default}}
spec:
  protocol: simulated
  properties:
{props}
"""

DEVICE = """\
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {{name: {name}, namespace: default}}
spec:
  deviceModelRef: {{name: bench-model}}
  protocol: {{protocolName: simulated, configData: {{seed: {seed}}}}}
  properties:
{props}
"""


KINDS = {
    "counter": ("type: INT, accessMode: ReadOnly", "{kind: counter}"),
    "temperature": ("type: FLOAT, accessMode: ReadOnly, minimum: '-40', maximum: '80', unit: Celsius",
                    "{kind: temperature, base: 21, amplitude: 1, noise: 0.1}"),
    "humidity": ("type: FLOAT, accessMode: ReadOnly, minimum: '0', maximum: '100', unit: '%'",
                 "{kind: humidity, base: 45, amplitude: 5, noise: 0.5}"),
    "clock": ("type: FLOAT, accessMode: ReadOnly", "{kind: clock}"),  # value = exact read time (latency probe)
}


def write_devices(directory: Path, devices: int, properties: int | list[tuple[str, str]] = 1, *,
                  cycle_ms: int = 1000, kind: str = "counter") -> Path:
    """One YAML file: a model and `devices` simulated devices (d0, d1, ...) reading every property each
    `cycle_ms` and reporting every reading. `properties`: a count (p0, p1, ... of `kind`) or
    [(name, kind)] with kinds from KINDS."""
    directory.mkdir(parents=True, exist_ok=True)
    props = [(f"p{i}", kind) for i in range(properties)] if isinstance(properties, int) else properties
    model_props = "\n".join(f"    - {{name: {name}, {KINDS[k][0]}}}" for name, k in props)
    device_props = "\n".join(
        f"    - name: {name}\n      visitors: {{protocolName: simulated, configData: {KINDS[k][1]}}}\n"
        f"      collectCycle: {cycle_ms}\n      reportCycle: {cycle_ms}\n      reportToCloud: true"
        for name, k in props)
    parts = [MODEL.format(props=model_props)]
    parts += [DEVICE.format(name=f"d{n}", seed=n, props=device_props) for n in range(devices)]
    (directory / "devices.yaml").write_text("".join(parts))
    return directory


@dataclass
class MapperOptions:
    synchronous: str = "FULL"
    batch_max: int = 500
    batch_delay_ms: int = 20
    outbox_max_rows: int = 200_000
    max_inflight: int = 100
    log_level: str = "info"
    drain_on_stop_s: float = 20.0
    extra: str = ""


def mapper_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a mapper process: ours without MAPPER_* overrides (each run's config
    says everything), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MAPPER_")}, **(extra or {})}


class Mapper:
    """`python -m mapper run` as a user runs it; optionally pinned to CPUs; always stopped."""

    def __init__(self, tmp: Path, devices: Path, broker: MosquittoBroker | None, options: MapperOptions | None = None,
                 *, cpus: set[int] | None = None, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.env = env or {}
        self.options = o = options or MapperOptions()
        self.twin_path = tmp / "twin.db"
        self.log_path = tmp / "mapper.log"
        self.cpus = cpus
        mqtt = ""
        if broker is not None:
            # Its own MQTT session: a persistent session shared by every mapper of a run would hand
            # one scenario's unacknowledged messages to the next one's mapper.
            mqtt = mqtt_block(broker, tmp, extra=f"  max_inflight: {o.max_inflight}\n  drain_on_stop_s: {o.drain_on_stop_s}\n"
                                                 f"  client_id: mapper-bench-{tmp.name}\n")
        self.config = tmp / "mapper.yaml"
        self.config.write_text(
            f"node: {NODE}\ndevices: [{devices}]\n"
            f"twin:\n  path: {self.twin_path}\n  synchronous: {o.synchronous}\n  batch_max: {o.batch_max}\n"
            f"  batch_delay_ms: {o.batch_delay_ms}\n  outbox_max_rows: {o.outbox_max_rows}\n"
            f"log_level: {o.log_level}\n{o.extra}{mqtt}")
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Mapper:
        cpus = self.cpus
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        env = mapper_env(self.env)
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen([sys.executable, "-m", "mapper", "run", "--config", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                            preexec_fn=preexec)  # noqa: PLW1509
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, *texts: str, timeout: float = 60.0, count: int = 1, interval: float = 0.01) -> float:
        """Poll the log until every text occurs `count` times; returns seconds since start()."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if all(log.count(t) >= count for t in texts):
                return time.monotonic() - self.started_at
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the mapper exited with {self.process.returncode}:\n{log[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{texts} not in the mapper log after {timeout} s:\n{log[-2000:]}")
            time.sleep(interval)

    def wait_ready(self, timeout: float = 60.0) -> float:
        return self.wait_log("connected to mqtt://", "running:", timeout=timeout)

    def stop(self, timeout: float = 60.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def __enter__(self) -> Mapper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the twin file, read from outside (WAL: readers never block the mapper) --------------

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.twin_path, timeout=30)
        try:
            yield conn
        finally:
            conn.close()

    def missed_slots(self, cycle_ms: int) -> int:
        """Collect slots without a reading, from the twin's history: per device and property, the
        slots between its first and last reading (on the `cycle_ms` grid) minus the readings taken.
        Readings a device loop never took (it fell behind) are lost before any `seq` exists: the
        seq check after the commit cannot see them; this can."""
        with self.db() as db:
            rows = db.execute("SELECT count(*), min(ts), max(ts) FROM readings GROUP BY device_id, property").fetchall()
        return sum(max(0, round((last - first) / cycle_ms) + 1 - n) for n, first, last in rows)

    def outbox_depth(self) -> int:
        with self.db() as db:
            from twin.store import OUTBOX_DEPTH_SQL
            return db.execute(OUTBOX_DEPTH_SQL).fetchone()[0]

    def committed_seqs(self, prefix: str = TOPIC_BASE) -> dict[str, int]:
        """Telemetry topics and the last seq committed for each."""
        with self.db() as db:
            from twin.store import committed_seqs
            seqs = committed_seqs(db)
        return {t: s for t, s in seqs.items() if t.startswith(prefix + "/") and not t.endswith("/state")}

    def telemetry_left(self) -> int:
        """Telemetry (not state) messages still to publish: in history rows or in the outbox table."""
        with self.db() as db:
            carried = db.execute(
                "SELECT count(*) FROM readings WHERE seq IS NOT NULL"
                " AND id > coalesce((SELECT value FROM counters WHERE name='published_through'), 0)").fetchone()[0]
            table = db.execute("SELECT count(*) FROM outbox WHERE kind='telemetry' AND topic NOT LIKE '%/state'").fetchone()[0]
        return carried + table

    def dropped(self, counter: str = "outbox_dropped") -> int:
        """A drop counter of the twin: the outbox's (`outbox_dropped`), or readings dropped while
        they waited for a commit (`readings_dropped`: twin.waiting_max_readings)."""
        with self.db() as db:
            row = db.execute("SELECT value FROM counters WHERE name=?", (counter,)).fetchone()
        return row[0] if row else 0


def telemetry_topics(devices: int, properties: int = 1) -> list[str]:
    return [f"{TOPIC_BASE}/d{n}/p{i}" for n in range(devices) for i in range(properties)]


# -- figures from /proc -----------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads: the scheduler's nanosecond count when available.

    /proc/<pid>/task/*/schedstat (time on a CPU, in ns) rather than utime + stime from
    /proc/<pid>/stat, whose 10 ms ticks are 1.2 CPU-s/hour over a 30 s window: too coarse for
    a target of 10. (Threads that ended during the window are not counted; the mapper's last
    for the life of the process.) Falls back to /proc/<pid>/stat without schedstats.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    except FileNotFoundError:
        total = 0
    if total:
        return total / 1e9
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def rss_parts_mib(pid: int) -> dict[str, float]:
    """VmRSS's parts in MiB (/proc/<pid>/status): RssAnon (the process's own heap and stacks) and
    RssFile (pages of its shared libraries mapped in). RssFile depends on the page cache, not on the
    process: with onnxruntime's and numpy's libraries just installed (all their pages cached, in
    large folios) a fault maps far more of them than after `echo 1 > /proc/sys/vm/drop_caches`
    (measured 2026-11-30: VmRSS 94.3 MiB, then 80.2 for the same mapper)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            values[key] = round(int(rest.split()[0]) / 1024, 2)
    return values


def sample(every: float, duration: float, fn: Callable[[], Any]) -> list[tuple[float, Any]]:
    """Call fn every `every` seconds for `duration` seconds: [(t, value)]."""
    out = []
    start = time.monotonic()
    while (now := time.monotonic()) - start < duration:
        out.append((now - start, fn()))
        time.sleep(max(0.0, every - (time.monotonic() - now)))
    return out


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mt) ** 2 for p in points)
    return 0.0 if den == 0 else sum((p[0] - mt) * (p[1] - my) for p in points) / den


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- results ----------------------------------------------------------------------------------

@dataclass
class Metric:
    """One figure of a scenario over its repetitions, with its baseline from the same run."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: str = ""
    higher_is_better: bool = True
    note: str = ""

    @staticmethod
    def summary(values: Sequence[float]) -> dict[str, float] | None:
        clean = [v for v in values if v == v]  # noqa: PLR0124 - drop NaN
        if not clean:
            return None
        q = statistics.quantiles(clean, n=4, method="inclusive") if len(clean) > 1 else [clean[0]] * 3
        return {"median": statistics.median(clean), "min": min(clean), "max": max(clean),
                "q1": q[0], "q3": q[2], "n": len(clean)}

    def run_ratios(self) -> list[float]:
        """Each run's figure over the baseline measured with it (values[i] / baseline[i]): every
        scenario appends a run's figure and its baseline together. Empty when they are not paired."""
        if len(self.values) != len(self.baseline):
            return []
        return [v / b for v, b in zip(self.values, self.baseline, strict=True) if v == v and b == b and b != 0]  # noqa: PLR0124

    def ratio(self) -> float | None:
        """The median of the per-run ratios (a run is compared with the baseline run next to it, not
        with another run's); the ratio of the medians where the runs are not paired."""
        paired = self.run_ratios()
        if paired:
            return statistics.median(paired)
        m, b = self.summary(self.values), self.summary(self.baseline)
        if m is None or b is None or b["median"] == 0:
            return None
        return m["median"] / b["median"]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "values": self.values, "summary": self.summary(self.values),
                "baseline_name": self.baseline_name, "baseline": self.baseline,
                "baseline_summary": self.summary(self.baseline), "ratio": self.ratio(),
                "run_ratios": self.run_ratios(), "target": self.target,
                "note": self.note}


@dataclass
class ScenarioResult:
    name: str
    title: str
    how: str
    metrics: list[Metric] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None

    def metric(self, name: str, unit: str, **kw: Any) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        m = Metric(name, unit, **kw)
        self.metrics.append(m)
        return m


def machine_info(broker_version: str | None = None) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for module in ("paho.mqtt", "aiomqtt", "orjson", "pydantic", "onnxruntime"):
        try:
            from importlib.metadata import version
            versions[module] = version({"paho.mqtt": "paho-mqtt"}.get(module, module))
        except Exception:  # noqa: BLE001 - not installed
            versions[module] = None
    mosquitto = None
    binary = _which("mosquitto")
    if binary:
        with contextlib.suppress(Exception):
            out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
            mosquitto = out.splitlines()[0].replace("mosquitto version ", "").strip()
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "kernel": platform.release(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "mosquitto": mosquitto,
            **versions}
