"""`metrics:` (mapper/metrics.py): Prometheus metrics on /metrics and /healthz on a local HTTP port, read
from a real `mapper run` on a real broker with plain HTTP GETs; the listen address's rules."""

from __future__ import annotations

import contextlib
import http.client
import re
import sys
from pathlib import Path

import orjson
import pytest

from devices.errors import DefinitionError
from helpers import wait_for, write_config, write_devices
from mapper.config import load_config
from mapper_proc import MapperProcess
from test_openssl import mapped

prometheus = pytest.importorskip(
    "prometheus_client", reason="the `metrics` extra (prometheus-client) is not installed: scripts/setup.sh installs it")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

LISTEN = "\nmetrics:\n  listen: 127.0.0.1:0\n"  # (after the mqtt block: a section of its own)


def get(port: int, path: str, host: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET on loopback."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, kind, body = get(port, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version="), (status, kind)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def health(port: int) -> tuple[int, dict]:
    status, kind, body = get(port, "/healthz")
    assert kind == "application/json"
    return status, orjson.loads(body)


def assert_documented(samples: dict) -> None:
    """Every mapper_* metric scraped is in the README's table."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    undocumented = {name for name, _ in samples if name.startswith("mapper_") and f"`{name}`" not in readme}
    assert not undocumented, f"metrics missing from the README's table: {sorted(undocumented)}"


def metrics_port(mapper: MapperProcess) -> int:
    mapper.wait_log("metrics on http://")
    return int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", mapper.log()).group(1))


def brokerless_mapper_serving_metrics(tmp_path: Path, *, cycle: int = 100,
                                      env: dict[str, str] | None = None) -> MapperProcess:
    """A `mapper run` (not started) of one good device read every `cycle` ms, no broker, metrics on a free port."""
    devices = write_devices(tmp_path / "dev", ["good"], cycle=cycle)
    mapper = MapperProcess(tmp_path, devices, None, env=env)
    mapper.config.write_text(mapper.config.read_text() + LISTEN)
    return mapper


def port_once_healthy(mapper: MapperProcess) -> int:
    """The started mapper's metrics port, once its /healthz answers 200."""
    port = metrics_port(mapper)
    wait_for(lambda: health(port)[0] == 200, what="/healthz 200 once ready")
    return port


def test_metrics_and_healthz_follow_the_devices_and_the_broker(broker, tmp_path: Path) -> None:
    """A good device and one that never answers, then the broker stopped and started: the states,
    read counts and errors, the MQTT connection and /healthz say what happened, the readings
    queued while the broker was away show in the outbox gauge."""
    devices = write_devices(tmp_path / "dev", ["good", "bad"], cycle=50, configs={"bad": "{broken: true}"})
    with MapperProcess(tmp_path, devices, broker, extra=LISTEN) as mapper:
        port = metrics_port(mapper)
        mapper.wait_log("connected to mqtt://")
        wait_for(lambda: health(port)[0] == 200, what="/healthz 200 once ready")
        status, body = health(port)
        assert body["status"] == "ok" and body["twin"] == "ok" and body["mqtt"] == "connected" and body["ready"]
        assert "reasons" not in body

        samples = wait_for(lambda: (s := scrape(port)) and value(s, "mapper_device_reads_total", device="default/good")
                           >= 10 and value(s, "mapper_device_state", device="default/bad", state="unhealthy") == 1
                           and s, what="10 good reads and the broken device unhealthy")
        assert value(samples, "mapper_device_state", device="default/good", state="ok") == 1
        assert value(samples, "mapper_device_state", device="default/good", state="unhealthy") == 0
        assert value(samples, "mapper_device_reads_total", device="default/bad") == 0
        assert value(samples, "mapper_device_read_errors_total", device="default/bad") >= 3
        assert value(samples, "mapper_device_read_errors_total", device="default/good") == 0
        assert value(samples, "mapper_device_last_good_read_age_seconds", device="default/good") is not None
        assert value(samples, "mapper_device_last_good_read_age_seconds", device="default/bad") is None  # never good
        assert value(samples, "mapper_mqtt_connected") == 1
        assert value(samples, "mapper_mqtt_connects_total") == 1
        assert value(samples, "mapper_twin_writable") == 1
        assert value(samples, "mapper_readings_committed_total") > 0
        assert mapped(mapper.process.pid) == []  # (prometheus_client imported with the ssl stand-in: no OpenSSL)
        assert value(samples, "mapper_build_info", version=mapper_version(), node="test-node",
                     config=fingerprint(mapper.config)) == 1

        assert_documented(samples)

        broker.stop()
        wait_for(lambda: health(port)[0] == 503, what="/healthz 503 with the broker stopped")
        status, body = health(port)
        assert body["status"] == "unhealthy" and body["mqtt"] == "disconnected" and body["twin"] == "ok"
        assert any("MQTT broker is not connected" in reason for reason in body["reasons"]), body
        samples = wait_for(lambda: (s := scrape(port)) and value(s, "mapper_outbox_messages") >= 20 and s,
                           what="readings queued in the outbox while the broker is away")
        assert value(samples, "mapper_mqtt_connected") == 0
        assert value(samples, "mapper_outbox_bytes") > 0

        broker.start()
        mapper.wait_log("connected to mqtt://", count=2, timeout=20)
        wait_for(lambda: health(port)[0] == 200, what="/healthz 200 again")
        samples = wait_for(lambda: (s := scrape(port)) and value(s, "mapper_mqtt_connected") == 1 and s,
                           what="connected again")
        assert value(samples, "mapper_mqtt_connects_total") == 2
        assert mapper.stop() == 0
    assert "Traceback" not in mapper.log()


def mapper_version() -> str:
    from mapper import __version__

    return __version__


def fingerprint(config: Path) -> str:
    return load_config(config).fingerprint()


def test_a_web_page_cannot_read_it_through_dns_rebinding_and_other_paths_are_not_found(tmp_path: Path) -> None:
    """On loopback a request whose Host names another machine is refused (a web page that rebound its
    name to 127.0.0.1); an IP address or localhost, as Prometheus on the Pi sends, is answered.
    No broker configured: /healthz says so and is 200."""
    with brokerless_mapper_serving_metrics(tmp_path) as mapper:
        port = port_once_healthy(mapper)
        assert health(port)[1]["mqtt"] == "not configured"
        assert get(port, "/metrics", host="attacker.example:9108")[0] == 403
        assert get(port, "/metrics", host=f"localhost:{port}")[0] == 200
        assert get(port, "/nothing")[0] == 404
        assert mapper.stop() == 0


def raw_request(port: int, request: bytes) -> bytes:
    """What the server sends for `request`, sent as it is on a plain socket, until it closes (a reset:
    what came before it; a server closing with some of the request unread resets)."""
    import socket

    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # (under its 10 s REQUEST_TIMEOUT_S)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(request)
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def test_a_request_whose_lines_end_with_a_bare_lf_is_answered(tmp_path: Path) -> None:
    """RFC 9112 lets a server take a bare LF as a line's end: the server waited for CRLF CRLF, so such
    a client got nothing until the request timeout. Its headers are read too (the Host check)."""
    from mapper.metrics import MAX_HEAD_BYTES

    with brokerless_mapper_serving_metrics(tmp_path) as mapper:
        port = port_once_healthy(mapper)
        answer = raw_request(port, b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Type: application/json" in answer, answer
        assert raw_request(port, b"GET /metrics HTTP/1.1\nHost: attacker.example\n\n").startswith(b"HTTP/1.1 403 ")
        mixed = raw_request(port, b"GET /nothing HTTP/1.1\r\nHost: localhost\n\r\n")
        assert mixed.startswith(b"HTTP/1.1 404 "), mixed
        # A head longer than MAX_HEAD_BYTES, in short lines, is still closed unanswered.
        assert raw_request(port, b"GET / HTTP/1.1\n" + b"X-Pad: 0123456789\n" * (MAX_HEAD_BYTES // 10) + b"\n") == b""
        assert get(port, "/healthz")[0] == 200
        assert mapper.stop() == 0


@pytest.mark.parametrize(("listen", "address"), [
    ("9108", ("127.0.0.1", 9108)), (9108, ("127.0.0.1", 9108)), (":9108", ("127.0.0.1", 9108)),
    ("localhost:9108", ("127.0.0.1", 9108)), ("[::1]:9108", ("::1", 9108)), ("0.0.0.0:9108", ("0.0.0.0", 9108)),
])
def test_a_port_alone_listens_on_loopback_and_an_address_written_is_kept(tmp_path: Path, listen, address) -> None:
    devices = write_devices(tmp_path / "dev", ["good"])
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "t.db",
                                      extra=f"metrics:\n  listen: {listen!r}\n" if isinstance(listen, str)
                                      else f"metrics:\n  listen: {listen}\n"))
    assert config.metrics.address == address
    warnings = config.metrics.exposure_warnings("c.yaml")
    assert bool(warnings) == (address[0] == "0.0.0.0")
    assert not warnings or "no authentication" in warnings[0]


@pytest.mark.parametrize(("listen", "said"), [
    ("pi.local:9108", "'pi.local' is not an IP address"),
    ("::1:9108", "write an IPv6 address in brackets"),
    ("127.0.0.1:99999", "the port must be a number from 0 to 65535"),
])
def test_a_bad_listen_address_is_a_config_error_at_its_line(tmp_path: Path, listen: str, said: str) -> None:
    devices = write_devices(tmp_path / "dev", ["good"])
    path = write_config(tmp_path / "c.yaml", devices, tmp_path / "t.db", extra=f"metrics:\n  listen: '{listen}'\n")
    line = path.read_text().splitlines().index(f"  listen: '{listen}'") + 1
    with pytest.raises(DefinitionError) as caught:
        load_config(path)
    assert f"{path}:{line}: metrics.listen: " in str(caught.value), str(caught.value)
    assert said in str(caught.value)


def test_without_prometheus_client_the_start_says_which_extra_to_install(tmp_path: Path, monkeypatch) -> None:
    from devices.extras import install_extra

    devices = write_devices(tmp_path / "dev", ["good"])
    config = load_config(write_config(tmp_path / "c.yaml", devices, tmp_path / "t.db", extra="metrics: {}\n"))
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # (find_spec: not importable)
    with pytest.raises(ValueError, match="metrics: needs prometheus-client") as caught:
        config.check_installed("c.yaml")
    assert f"install the `metrics` extra ({install_extra('metrics')})" in str(caught.value)


def test_a_twin_another_process_holds_locked_is_unhealthy_until_it_lets_go(tmp_path: Path) -> None:
    """Another process holds the twin's write lock (a backup, a CLI command) longer than the mapper's
    busy timeout: /healthz 503 `unwritable` (cause `locked`) and the metrics count the failed commits
    and the readings waiting; once it lets go, 200 and writable again."""
    from helpers import TwinLock

    mapper = brokerless_mapper_serving_metrics(tmp_path, cycle=50, env={"MAPPER_TWIN__BUSY_TIMEOUT_MS": "50"})
    with mapper:
        port = metrics_port(mapper)
        # Ready is the devices started, not their first reading: a device's start writes the twin too
        # (its boot values), and a lock taken before that crashes its loop, which then restarts it
        # seconds apart with no reading to commit, so /healthz stays 200 (what a busy machine showed).
        # The device's first good reading (its state ok, after those boot values) comes first here.
        def device_ok() -> bool:
            status, body = health(port)
            return status == 200 and body["devices"] == {"ok": 1}

        wait_for(device_ok, what="/healthz 200 with the device ok")
        lock = TwinLock(mapper.twin_path)
        try:
            wait_for(lambda: health(port)[0] == 503, timeout=15, what="/healthz 503 while the twin is locked")
            status, body = health(port)
            assert body["twin"] == "unwritable" and body["mqtt"] == "not configured", body
            assert any("the twin cannot be written (locked)" in reason for reason in body["reasons"]), body
            samples = scrape(port)
            assert value(samples, "mapper_twin_writable") == 0
            assert value(samples, "mapper_twin_commit_failures_total") >= 2
            assert value(samples, "mapper_readings_waiting") > 0
            assert value(samples, "mapper_outbox_messages") is not None  # (a read: the lock lets it through)
        finally:
            lock.release()
            lock.close()
        wait_for(lambda: health(port)[0] == 200, timeout=15, what="/healthz 200 once the lock is gone")
        samples = scrape(port)
        assert value(samples, "mapper_twin_writable") == 1
        assert mapper.stop() == 0


def test_inference_decisions_are_counted_by_exit(tmp_path: Path) -> None:
    """With an inference pipeline: its windows, and their decisions by exit (edge, offload) adding up
    to them in one scrape. No broker: the offloaded ones stay in the twin."""
    pytest.importorskip("onnxruntime")
    from helpers import faulty_probe_yaml

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "probe.yaml").write_text(faulty_probe_yaml(25))
    mapper = MapperProcess(tmp_path, devices, None)
    mapper.config.write_text(mapper.config.read_text() + LISTEN
                             + "inference:\n  pipelines:\n    - device: probe\n      model: sensor_faults\n")
    with mapper:
        port = metrics_port(mapper)
        pipeline = "default/probe-sensor-faults"
        samples = wait_for(lambda: (s := scrape(port)) and (value(s, "mapper_inference_windows_total",
                                                                  pipeline=pipeline) or 0) >= 3 and s,
                           timeout=60, what="3 windows decided")
        edge = value(samples, "mapper_inference_decisions_total", pipeline=pipeline, exit="edge")
        offload = value(samples, "mapper_inference_decisions_total", pipeline=pipeline, exit="offload")
        assert edge + offload == value(samples, "mapper_inference_windows_total", pipeline=pipeline)
        assert value(samples, "mapper_inference_errors_total", pipeline=pipeline) == 0
        assert_documented(samples)
        assert mapper.stop() == 0



def test_a_silent_cloud_worker_shows_in_the_metrics_and_healthz_without_making_it_unhealthy(broker,
                                                                                          tmp_path: Path) -> None:
    """Offloads that no cloud worker answers (none runs): /metrics counts the seconds of silence and
    /healthz's body says it as the health topic does, still 200 (a restart brings no worker back)."""
    pytest.importorskip("onnxruntime")
    from helpers import faulty_probe_yaml

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "probe.yaml").write_text(faulty_probe_yaml(25))
    pipelines = ("inference:\n  pipelines:\n    - device: probe\n      model: sensor_faults\n"
                 "      deadline_s: 0.1\n      resend_s: 1.0\n")
    mapper = MapperProcess(tmp_path, devices, broker)
    mapper.config.write_text(mapper.config.read_text() + LISTEN + pipelines)
    with mapper:
        port = metrics_port(mapper)
        assert value(scrape(port), "mapper_inference_cloud_worker_silent_seconds") == 0
        mapper.wait_log("no cloud worker answers", timeout=60)
        samples = wait_for(lambda: (s := scrape(port)) and (value(s, "mapper_inference_cloud_worker_silent_seconds")
                                                             or 0) > 0 and s, what="the silence in /metrics")
        assert_documented(samples)
        status, body = health(port)
        assert status == 200 and body["status"] == "ok", body
        assert body["cloud_worker"]["answering"] is False and body["cloud_worker"]["unanswered"] >= 1, body
        assert mapper.stop() == 0


def test_clients_that_hold_connections_open_get_503_beyond_the_limit_not_the_mapper_s_descriptors(
        tmp_path: Path) -> None:
    """MAX_CONNECTIONS clients connected and sending nothing: one more is answered 503 at once (not
    queued, not another descriptor held); once they leave, requests are answered again."""
    import socket

    from mapper.metrics import MAX_CONNECTIONS

    with brokerless_mapper_serving_metrics(tmp_path) as mapper:
        port = port_once_healthy(mapper)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)]
        try:
            status, _, body = wait_for(lambda: (r := get(port, "/healthz")) and r[0] == 503 and r,
                                       what="503 beyond the connection limit")
            assert body == b"too many connections\n"
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: get(port, "/healthz")[0] == 200, what="answered again once the idle clients left")
        assert mapper.stop() == 0
