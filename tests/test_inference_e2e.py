"""Early-exit inference end to end over the shipped Mosquitto: a simulated sensor with injected
faults -> windows -> uncertain ones offloaded -> `mapper cloud-worker` subprocess(es) -> results
-> the twin, and what an app sees on the decision topic.

The collect cycle is 25 ms so windows of 16 readings fill in well under a second: these tests
check the plumbing, not the model (which was trained at one reading per 16 minutes).
The workers log in as `worker`, on a broker of this module whose ACL is rendered for NODE (the
shipped edge ACL lets `worker` write only the result topic of the node it is rendered for).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from brokers import MosquittoBroker, ensure_mosquitto_installed
from helpers import faulty_probe_yaml, wait_for
from mapper.systemd import SERVICE_TUNING
from mapper_proc import REPO, MapperProcess

NODE = "e2e-node"
PIPELINE = "default/probe-sensor-faults"


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    """The Pi's broker (shipped mosquitto.conf), its ACL rendered for NODE."""
    ensure_mosquitto_installed()
    with MosquittoBroker(node=NODE) as running:
        yield running


def inference_block(deadline_s: float, resend_s: float) -> str:
    return (f"inference:\n  pipelines:\n    - device: probe\n      model: sensor_faults\n"
            f"      deadline_s: {deadline_s}\n      resend_s: {resend_s}\n      audit_share: 0.05\n"
            f"      audit_seed: 1\n")


class Worker:
    """`python -m mapper cloud-worker --config FILE` as a subprocess, logged to a file."""

    def __init__(self, tmp: Path, broker, name: str) -> None:
        secret = tmp / f"{name}.password"
        secret.write_text(broker.users["worker"])
        secret.chmod(0o600)
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(f"mqtt:\n  url: mqtt://{broker.host}:{broker.port}\n  username: worker\n"
                               f"  password_file: {secret}\n  reconnect_min_s: 0.2\n  reconnect_max_s: 1.0\n"
                               f"models: [sensor_faults]\nworker_id: {name}\n")
        self.log_path = tmp / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "mapper", "cloud-worker", "--config",
                                             str(self.config)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                            env=os.environ.copy())
        wait_for(lambda: "subscribed to $share/workers/mapper/+/offload/request" in self.log(), timeout=20,
                 what="the worker's subscription")
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM; returns how many requests the worker says it served."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=20) == 0, self.log()[-2000:]
        self.process = None
        line = next(x for x in self.log().splitlines() if " stopped: " in x)
        return int(line.split(" stopped: ")[1].split(" served")[0])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def rows(twin: Path) -> list[dict]:
    if not twin.exists():
        return []
    with sqlite3.connect(f"file:{twin}?mode=ro", uri=True, timeout=5) as conn:
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM inference_decisions WHERE pipeline=? ORDER BY id",
                                                  (PIPELINE,))]
        except sqlite3.OperationalError:  # not migrated yet
            return []


def assert_derived_device_shows_the_last_decision(twin: Path, table: list[dict]) -> None:
    """The pipeline's derived device in the twin file after the mapper's clean stop: active, `offline` (as
    every device the mapper ran), read-only, showing the newest window's decision."""
    newest = max((r for r in table if r["label"] is not None), key=lambda r: r["window_end_ts"])
    with sqlite3.connect(f"file:{twin}?mode=ro", uri=True, timeout=5) as conn:
        device = conn.execute("SELECT protocol, active, state FROM devices WHERE id=?", (PIPELINE,)).fetchone()
        props = {name: (orjson.loads(value) if value is not None else None, writable)
                 for name, value, writable in conn.execute(
                     "SELECT name, reported, writable FROM properties WHERE device_id=?", (PIPELINE,))}
    assert device == ("derived", 1, "offline")
    assert props == {"label": (newest["label"], 0), "confidence": (newest["confidence"], 0),
                     "exit": (newest["exit"], 0), "provisional": (newest["status"] == "provisional", 0),
                     "window_end": (newest["window_end_ts"], 0)}


def decisions_seen(app, until, timeout: float = 30.0) -> list[dict]:
    """Decision messages the app receives, until `until(seen)` is true."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; saw {len(seen)} decisions, last {seen[-3:]}")
        try:
            message = app.next_message(timeout=remaining)
        except TimeoutError:
            continue
        if message.topic == f"mapper/{NODE}/default/probe-sensor-faults/decision":
            seen.append(orjson.loads(message.payload))
    return seen


@pytest.fixture
def devices(tmp_path):
    d = tmp_path / "devices"
    d.mkdir()
    (d / "probe.yaml").write_text(faulty_probe_yaml(25))
    return d


def test_uncertain_windows_go_to_shared_workers_and_come_back_final(broker, tmp_path, devices):
    """Two workers share the offloads; cloud answers reach the twin and the app; confident windows stay local."""
    app = broker.client("app")
    workers = [Worker(tmp_path, broker, "w1"), Worker(tmp_path, broker, "w2")]
    mapper = MapperProcess(tmp_path, devices, broker, node=NODE, extra=inference_block(5.0, 30.0))
    try:  # started inside: a worker that fails to come up is still killed, with the probe client closed
        app.subscribe(f"mapper/{NODE}/default/+/decision")
        for w in workers:
            w.start()
        with mapper:
            # Both kinds, in numbers: which windows are uncertain depends on the injected faults and
            # on timing, so the share is the model card's business, not this test's.
            seen = decisions_seen(app, lambda s: sum(d["exit"] == "cloud" for d in s) >= 12
                                  and sum(d["exit"] == "edge" and not d["provisional"] for d in s) >= 6)
            assert mapper.stop() == 0, mapper.log()[-2000:]
        served = [w.stop() for w in workers]
    finally:
        for w in workers:
            w.kill()
        app.close()
    cloud = [d for d in seen if d["exit"] == "cloud"]
    assert all(not d["provisional"] and d["request_id"] for d in cloud)
    assert all(d["request_id"] is None for d in seen if d["exit"] == "edge" and not d["provisional"])
    table = rows(mapper.twin_path)
    final_cloud = {r["request_id"] for r in table if r["exit"] == "cloud" and r["status"] == "final"}
    assert {d["request_id"] for d in cloud} <= final_cloud
    edge = [r for r in table if r["exit"] == "edge" and r["status"] == "final"]
    assert len(edge) >= 6, "confident windows are decided at the edge and recorded in the twin"
    assert_derived_device_shows_the_last_decision(mapper.twin_path, table)
    assert min(served) >= 1, f"the shared subscription did not spread the load: {served}"
    assert sum(served) >= len(final_cloud)
    # Shared, not duplicated: together the workers served each request once (a resend may be served
    # again), and no result came back twice.
    requests = {r["request_id"] for r in table if r["request_id"]}
    log = mapper.log()
    summary = next(x for x in log.splitlines() if "inference counters at shutdown: " in x)
    resent = int(summary.split(" resent=")[1].split()[0].rstrip(";")) if " resent=" in summary else 0
    assert sum(served) <= len(requests) + resent, (served, len(requests), resent)
    assert "result refused (duplicate)" not in log
    assert "Traceback" not in log


def test_worker_down_provisional_then_final(broker, tmp_path, devices):
    """With no worker the edge answer stands provisionally; a worker started later answers the pending
    requests (sent again) and its final answers replace the provisional ones."""
    app = broker.client("app")
    mapper = MapperProcess(tmp_path, devices, broker, node=NODE, extra=inference_block(0.3, 0.5))
    worker = Worker(tmp_path, broker, "late-worker")
    try:
        app.subscribe(f"mapper/{NODE}/default/+/decision")
        with mapper:
            first = decisions_seen(app, lambda s: sum(d["provisional"] for d in s) >= 3)
            provisional = {d["request_id"] for d in first if d["provisional"]}
            assert all(d["exit"] == "edge" for d in first if d["provisional"])
            assert not any(d["exit"] == "cloud" for d in first)
            # Unanswered for resend_s: one WARNING, not only the INFO counters line.
            wait_for(lambda: "WARNING mapper.inference: inference: no cloud worker answers" in mapper.log(),
                     timeout=20, what="the worker's silence in the log")
            worker.start()
            later = decisions_seen(app, lambda s: any(d["exit"] == "cloud" and d["request_id"] in provisional
                                                      for d in s))
            wait_for(lambda: "inference: a cloud worker answers again" in mapper.log(), what="its answers noticed")
            assert mapper.stop() == 0, mapper.log()[-2000:]
        worker.stop()
    finally:
        worker.kill()
        app.close()
    replaced = {d["request_id"] for d in later if d["exit"] == "cloud"} & provisional
    table = {r["request_id"]: r for r in rows(mapper.twin_path) if r["request_id"]}
    for request_id in replaced:
        r = table[request_id]
        assert (r["status"], r["exit"], r["label"]) == ("final", "cloud", r["cloud_label"])
    assert_derived_device_shows_the_last_decision(mapper.twin_path, rows(mapper.twin_path))
    assert "Traceback" not in mapper.log()


def test_inference_runs_under_the_service_units_tuning(broker, tmp_path, devices):
    """The installed unit precompiles, then runs the mapper with -OO and two malloc arenas (to stay
    small on a Pi). After the unit's ExecStartPre (`python -m mapper.precompile`) the mapper finds
    all its bytecode compiled and compiles nothing itself (which would keep the compiler's memory);
    windows are decided, published and recorded, and nothing fails on a missing docstring or assert."""
    cache = tmp_path / "pycache"
    env = {**SERVICE_TUNING, "PYTHONPYCACHEPREFIX": str(cache),
           "PYTHONDONTWRITEBYTECODE": ""}  # systemd starts from a clean environment
    app = broker.client("app")
    mapper = MapperProcess(tmp_path, devices, broker, node=NODE, extra=inference_block(0.3, 30.0), env=env)
    pre = subprocess.run([sys.executable, "-m", "mapper.precompile", "--config", str(mapper.config)], cwd=REPO,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert (pre.returncode, pre.stderr) == (0, "")
    compiled = set(cache.rglob("*.opt-2.pyc"))
    assert any(p.name.startswith("onnxruntime_inference_collection.") for p in compiled)
    try:
        app.subscribe(f"mapper/{NODE}/default/+/decision")
        with mapper:
            seen = decisions_seen(app, lambda s: sum(d["exit"] == "edge" for d in s) >= 3, timeout=60)
            assert mapper.stop() == 0
    finally:
        app.close()
    compiled_by_the_mapper = sorted(p.name for p in set(cache.rglob("*.opt-2.pyc")) - compiled)
    assert compiled_by_the_mapper == [], compiled_by_the_mapper
    table = rows(mapper.twin_path)
    assert {d["window_end"] for d in seen if d["exit"] == "edge"} <= {r["window_end_ts"] for r in table}
    assert "Traceback" not in mapper.log()
