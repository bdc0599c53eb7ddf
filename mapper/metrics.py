"""Prometheus metrics on `/metrics` and a health check on `/healthz`: the `metrics:` section (README, Metrics).

A small HTTP/1.1 server on the service's event loop (asyncio), one request per connection, at most
MAX_CONNECTIONS at once (one more is answered 503 and closed), each request whole within
REQUEST_TIMEOUT_S. Plain HTTP without authentication: it listens on loopback unless metrics.listen
writes another address (mapper.config.parse_listen), and on loopback a request whose `Host` names
another machine is refused (403: a web page reaching it through DNS rebinding).

Every value is read when scraped, from what the mapper keeps anyway: the device runners' counts and
states (what STATUS= and `mapper devices` show), the recorder's, the MQTT connection's and the
outbox publisher's counts, the twin's outbox stats and loss counters (the numbers of the node's
health topic, eventbus/health.py), the inference pipelines' counters. Nothing is counted for the
metrics on the readings' path. On the loop: no lock, and a scrape sees one consistent moment.

prometheus_client is imported here only: mapper.runtime imports this module only when `metrics:` is
set (mapper.config.check_installed says how to install it when it is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson

from mapper import __version__
from mapper.device_loop import OFFLINE, OK, UNHEALTHY, UNKNOWN
from mapper.host_header import names_this_machine
from mapper.openssl import import_time_names
from mapper.recorder import UNWRITABLE_AFTER
from mapper.twin_disk import twin_write_cause

with import_time_names():  # (a mapper without TLS runs without OpenSSL: mapper/openssl.py)
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

if TYPE_CHECKING:
    from mapper.config import MetricsSettings
    from mapper.service import MapperService

log = logging.getLogger("mapper.metrics")

MAX_CONNECTIONS = 8
REQUEST_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 8192
# A scrape waits this long at most for the twin thread (the outbox's depth); the outbox metrics are
# left out of a scrape it did not answer in time (a stalled twin thread: /healthz says so).
TWIN_TIMEOUT_S = 2.0
# The twin thread has had work waiting this long without finishing any: /healthz says `stalled`
# (systemd.twin_stall_s, the watchdog's, when that section is set).
TWIN_STALL_S = 60.0
# A device's states as mapper_device_state labels: one series each, 1 for the current one.
STATES = (UNKNOWN, OK, UNHEALTHY, OFFLINE, "refused", "not_run")


class _Families:
    """The registry's one collector: the families made for the scrape being answered."""

    def __init__(self) -> None:
        self.families: list[Any] = []

    def collect(self) -> list[Any]:
        return self.families


class MetricsExtension:
    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        self.server: asyncio.Server | None = None
        self.port: int | None = None
        self._service: MapperService | None = None
        self._losses_at_start: dict[str, int] = {}
        self._build: dict[str, str] = {}
        self._stopping = False
        self._open: set[asyncio.StreamWriter] = set()
        self._collector = _Families()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ... (from /proc at the scrape)
        self._registry.register(ProcessCollector(registry=None))
        self.scrapes = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def setup(self, service: MapperService) -> None:
        self._service = service
        self._build = {"version": __version__, "node": service.config.node, "config": service.config.fingerprint()}
        # What was lost before this process (the twin's counters), as STATUS= adds it (mapper.systemd).
        with contextlib.suppress(Exception):
            self._losses_at_start = await service.twin(lambda s: s.losses())
        host, port = self.settings.address
        try:
            self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)
        except OSError as exc:
            raise OSError(f"metrics: cannot listen on {self.settings.listen} (metrics.listen): "
                          f"{exc.strerror or exc}") from None
        self.port = self.server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics, health on /healthz (plain HTTP, no authentication)", shown, self.port)
        for warning in self.settings.exposure_warnings("metrics"):
            log.warning("%s", warning.removeprefix("warning: "))

    async def run(self, service: MapperService) -> None:
        return None  # the server serves on the loop by itself

    async def stop_requested(self, service: MapperService) -> None:
        self._stopping = True  # /healthz: 503 `stopping` while the mapper winds down

    async def shutdown(self, service: MapperService) -> None:
        self._stopping = True
        if self.server is not None:
            server, self.server = self.server, None
            server.close()
            for writer in list(self._open):
                writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    # -- what is reported ------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /healthz: 200 when the mapper runs (its devices started, not stopping),
        its twin takes commits and its twin thread is not stalled, and (with `mqtt:`) it is connected
        to the broker; else 503 with the reasons. Devices that fail do not make it unhealthy (a sensor
        unplugged is no reason to restart the mapper): their states are in the body and the metrics."""
        service = self._service
        assert service is not None
        reasons = []
        if self._stopping:
            reasons.append("stopping")
        elif not service.ready.is_set():
            reasons.append("starting: the devices are not started yet")
        twin = "ok"
        recorder = service.recorder
        if recorder is not None and recorder.outage_failures >= UNWRITABLE_AFTER:
            twin = "unwritable"
            cause = twin_write_cause(recorder.last_error, service.config.twin.path) if recorder.last_error else "error"
            reasons.append(f"the twin cannot be written ({cause}): readings wait in memory")
        stall_s = service.config.systemd.twin_stall_s if service.config.systemd is not None else TWIN_STALL_S
        stalled = service.worker.stalled_for() if service.worker is not None else 0.0
        if stalled > stall_s:
            twin = "stalled"
            reasons.append(f"the twin thread has finished no call for {stalled:.0f} s")
        mqtt = "not configured"
        bus = getattr(service.bus, "bus", None)
        if service.config.mqtt is not None:
            mqtt = "connected" if bus is not None and bus.connected.is_set() else "disconnected"
            if mqtt == "disconnected":
                why = "the MQTT broker is not connected"
                if bus is not None and bus.down_since is not None:
                    why += " since " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bus.down_since))
                if bus is not None and bus.last_error:
                    why += f": {bus.last_error}"
                reasons.append(why)
        devices = Counter(runner.state for runner in service.runners.values())
        if service.refused:
            devices["refused"] = len(service.refused)
        if service.not_run:
            devices["not_run"] = len(service.not_run)
        body = {"status": "unhealthy" if reasons else "ok", "ready": service.ready.is_set(), "twin": twin,
                "mqtt": mqtt, "devices": dict(sorted(devices.items())), "version": __version__}
        silences = [ext.cloud_worker_note() for ext in self._inference_extensions()]
        if any(silences):  # not a reason: a restart brings no cloud worker back
            body["cloud_worker"] = next(note for note in silences if note)
        if reasons:
            body["reasons"] = reasons
        return (503 if reasons else 200), body

    async def _outbox(self) -> dict[str, int] | None:
        service = self._service
        assert service is not None
        if service.worker is None:
            return None
        try:
            async with asyncio.timeout(TWIN_TIMEOUT_S):
                return await service.twin(lambda s: s.outbox_stats())
        except Exception:  # noqa: BLE001 - a stalled or failing twin: the scrape goes on without the outbox
            return None

    async def metrics(self) -> bytes:
        """The exposition text of a scrape, made now."""
        outbox = await self._outbox()
        self._collector.families = self.families(outbox)
        try:
            return generate_latest(self._registry)
        finally:
            self._collector.families = []

    def families(self, outbox: dict[str, int] | None) -> list[Any]:  # noqa: PLR0915 - one list, read top to bottom
        service = self._service
        assert service is not None
        now = time.monotonic()
        out: list[Any] = []

        def gauge(name: str, doc: str, value: float) -> None:
            out.append(GaugeMetricFamily(name, doc, value=value))

        def counter(name: str, doc: str, value: float) -> None:
            out.append(CounterMetricFamily(name, doc, value=value))

        out.append(InfoMetricFamily("mapper_build", "The mapper's version, its node, and its config's fingerprint"
                                    " (as on the node's health topic)",
                                    value=self._build))
        gauge("mapper_ready", "1 once the mapper runs (its devices started), 0 while it starts or stops",
              int(service.ready.is_set() and not self._stopping))

        state = GaugeMetricFamily("mapper_device_state", "1 for the device's current state (ok, unhealthy,"
                                  " offline, unknown; refused, not_run: not run by this mapper)",
                                  labels=["device", "state"])
        current = {str(d): r.state for d, r in service.runners.items()}
        current.update({str(d): "refused" for d in service.refused})
        current.update({str(d): "not_run" for d in service.not_run})
        for device, now_in in sorted(current.items()):
            for name in STATES:
                state.add_metric([device, name], int(now_in == name))
        out.append(state)
        reads = CounterMetricFamily("mapper_device_reads", "Reads that returned a value, since the device"
                                    " started (a reload of its definition starts it again)", labels=["device"])
        errors = CounterMetricFamily("mapper_device_read_errors", "Reads that failed, since the device started",
                                     labels=["device"])
        missed = CounterMetricFamily("mapper_device_missed_reads", "Reads whose collect slot passed untaken"
                                     " (the mapper could not keep up), since the device started", labels=["device"])
        failing = GaugeMetricFamily("mapper_device_failures_in_a_row", "Failed reads since the device's last"
                                    " good one (loop.failure_threshold of them: unhealthy)", labels=["device"])
        age = GaugeMetricFamily("mapper_device_last_good_read_age_seconds", "Seconds since the device's last"
                                " reading of good quality (no series before its first)", labels=["device"])
        for device_id, runner in sorted(service.runners.items(), key=lambda item: str(item[0])):
            device = [str(device_id)]
            reads.add_metric(device, runner.reads)
            errors.add_metric(device, runner.read_errors)
            missed.add_metric(device, runner.missed_reads)
            failing.add_metric(device, runner.failures)
            if runner.last_good_at is not None:
                age.add_metric(device, max(0.0, now - runner.last_good_at))
        out += [reads, errors, missed, failing, age]

        before = self._losses_at_start
        recorder = service.recorder
        if recorder is not None:
            counter("mapper_readings_committed", "Readings committed to the twin since the start", recorder.committed)
            gauge("mapper_readings_waiting", "Readings in memory waiting for their commit", recorder.waiting())
            counter("mapper_readings_dropped", "Readings dropped while the twin could not be written"
                    " (twin.waiting_max_readings) whose telemetry nobody saw, since the twin was created",
                    before.get("readings_dropped", 0) + recorder.dropped)
            counter("mapper_readings_dropped_live", "Readings dropped while the twin could not be written after"
                    " their telemetry had gone out live, since the twin was created",
                    before.get("readings_dropped_live", 0) + recorder.dropped_live)
            counter("mapper_readings_published_live", "Readings whose telemetry went out from memory while the"
                    " twin could not be written, since the start", recorder.published_live)
            gauge("mapper_twin_writable", "1 while the twin takes commits, 0 once a commit and its retry failed",
                  int(recorder.outage_failures < UNWRITABLE_AFTER))
            counter("mapper_twin_commit_failures", "Failed twin commits since the start", recorder.commit_failures)
        if service.worker is not None:
            gauge("mapper_twin_thread_stalled_seconds", "Seconds the twin thread has had work waiting without"
                  " finishing any (0: none waiting)", service.worker.stalled_for())
        if outbox is not None:
            gauge("mapper_outbox_messages", "Messages waiting in the outbox for the broker", outbox["depth"])
            gauge("mapper_outbox_bytes", "Payload bytes waiting in the outbox", outbox["bytes"])
            counter("mapper_outbox_dropped", "Telemetry dropped by the outbox limits (twin.outbox_max_rows,"
                    " twin.outbox_max_bytes), since the twin was created", outbox["dropped"])
        bus_ext = service.bus
        publisher = getattr(bus_ext, "publisher", None)
        counter("mapper_outbox_undeliverable", "Outbox messages dropped as undeliverable (refused by the broker,"
                " or over its packet limit), since the twin was created",
                before.get("outbox_undeliverable", 0) + (publisher.undeliverable if publisher is not None else 0))
        bus = getattr(bus_ext, "bus", None)
        if service.config.mqtt is not None:
            gauge("mapper_mqtt_connected", "1 while connected to the MQTT broker",
                  int(bus is not None and bus.connected.is_set()))
            counter("mapper_mqtt_connects", "Connections made to the MQTT broker since the start (the first and"
                    " every reconnect)", bus.connects if bus is not None else 0)
            counter("mapper_mqtt_messages_received", "MQTT messages received since the start",
                    bus.messages_in if bus is not None else 0)
        if publisher is not None:
            counter("mapper_mqtt_outbox_published", "Outbox messages the broker took since the start",
                    publisher.published)
        out += self._inference_families()
        return out

    def _inference_families(self) -> list[Any]:
        """Each pipeline's windows and decisions by exit (edge: the early exit decided; offload: sent
        to the cloud worker), errors and alerts, when inference runs."""
        pipelines = {str(pid): p for ext in self._inference_extensions() for pid, p in ext.pipelines.items()}
        if not pipelines:
            return []
        windows = CounterMetricFamily("mapper_inference_windows", "Windows an inference pipeline ran on",
                                      labels=["pipeline"])
        decisions = CounterMetricFamily("mapper_inference_decisions", "Windows decided at the edge's early exit"
                                        " (exit=edge) or offloaded to the cloud worker (exit=offload)",
                                        labels=["pipeline", "exit"])
        errors = CounterMetricFamily("mapper_inference_errors", "Inference errors", labels=["pipeline"])
        alerts = CounterMetricFamily("mapper_inference_alerts", "Alerts raised", labels=["pipeline"])
        silent = GaugeMetricFamily("mapper_inference_cloud_worker_silent_seconds", "Seconds since offloads began"
                                   " to go unanswered with no result of any kind (no cloud worker answers;"
                                   " 0 while one does or nothing waits)",
                                   value=max((ext.silent_for_s() for ext in self._inference_extensions()),
                                             default=0.0))
        for pid, pipeline in sorted(pipelines.items()):
            counts = pipeline.stats.counts
            windows.add_metric([pid], counts["windows"])
            decisions.add_metric([pid, "edge"], counts["edge_exits"])
            decisions.add_metric([pid, "offload"], counts["offloads"])
            errors.add_metric([pid], counts["errors"])
            alerts.add_metric([pid], counts["alerts"])
        return [windows, decisions, errors, alerts, silent]

    def _inference_extensions(self) -> list[Any]:
        module = sys.modules.get("mapper.inference.extension")  # (imported when a pipeline may run, only)
        service = self._service
        assert service is not None
        return [] if module is None else [ext for ext in service.extensions
                                          if isinstance(ext, module.InferenceExtension)]

    # -- HTTP ------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= MAX_CONNECTIONS:
            writer.write(_response(503, "text/plain; charset=utf-8", b"too many connections\n", {"Retry-After": "1"}))
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        self._open.add(writer)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await _read_head(reader)
                method, status, kind, body, headers = await self._answer(head)
                writer.write(_response(status, kind, body, headers, head_only=method == "HEAD"))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sent no whole request in time, or went away: closed
        except Exception:  # noqa: BLE001 - a bug here must not end the mapper
            log.exception("metrics: a request failed")
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, int, str, bytes, dict[str, str]]:
        """(method, status, content type, body, headers) for the request whose head is `head`."""
        text = "text/plain; charset=utf-8"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "", 400, text, b"bad request\n", {}
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return method, 405, text, b"only GET\n", {"Allow": "GET, HEAD"}
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if self.settings.loopback and (host := headers.get("host")) and not names_this_machine(host):
            return method, 403, text, b"the Host header names another machine\n", {}
        if target == "/metrics":
            self.scrapes += 1
            return method, 200, CONTENT_TYPE_LATEST, await self.metrics(), {}
        if target == "/healthz":
            status, body = self.health()
            return method, status, "application/json", orjson.dumps(body) + b"\n", {}
        if target == "/":
            return method, 200, text, b"mapper: /metrics (Prometheus), /healthz\n", {}
        return method, 404, text, b"not found: /metrics, /healthz\n", {}


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and header lines, up to the empty line, joined by CRLF. A line may end
    with a bare LF (RFC 9112 2.2 lets a server take it): a client sending those waited for the
    timeout when only CRLF CRLF ended the head. LimitOverrunError past MAX_HEAD_BYTES."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\n")
        size += len(line)
        if size > MAX_HEAD_BYTES:
            raise asyncio.LimitOverrunError("request head over MAX_HEAD_BYTES", size)
        line = line[:-1].removesuffix(b"\r")
        if not line:
            return b"\r\n".join(lines)
        lines.append(line)


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def _response(status: int, kind: str, body: bytes, headers: dict[str, str], *, head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {kind}", f"Content-Length: {len(body)}",
             "Cache-Control: no-store", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
