"""Small helpers shared by tests: YAML documents and waiting for conditions with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from textwrap import dedent
from typing import TypeVar

T = TypeVar("T")

MODEL = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: {model}
  namespace: default
spec:
  protocol: simulated
  properties:
    - name: temperature
      type: FLOAT
      accessMode: ReadOnly
      minimum: "0"
      maximum: "50"
      unit: Celsius
    - name: power
      type: BOOLEAN
      accessMode: ReadWrite
    - name: count
      type: INT
      accessMode: ReadWrite
      minimum: "0"
      maximum: "100000000"
"""

DEVICE = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: {name}
  namespace: default
spec:
  deviceModelRef:
    name: {model}
  protocol:
    protocolName: simulated
    configData: {config}
  properties:
    - name: temperature
      visitors:
        protocolName: simulated
        configData: {{kind: temperature, base: 21, amplitude: 1, noise: 0.1}}
      collectCycle: {cycle}
      reportCycle: {cycle}
      reportToCloud: true
    - name: power
      visitors:
        protocolName: simulated
        configData: {{kind: switch}}
      collectCycle: {cycle}
      reportToCloud: true
    - name: count
      visitors:
        protocolName: simulated
        configData: {{kind: counter}}
      collectCycle: {cycle}
      reportCycle: {cycle}
      reportToCloud: true
"""


# A DHT-like probe with injected faults (models/faults.py), the input of the sensor_faults pipeline.
FAULTY_PROBE = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: dht-model, namespace: default}
spec:
  protocol: simulated
  properties:
    - {name: temperature, type: FLOAT, accessMode: ReadOnly, unit: Celsius}
    - {name: humidity, type: FLOAT, accessMode: ReadOnly, unit: Percent}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: probe, namespace: default}
spec:
  deviceModelRef: {name: dht-model}
  protocol:
    protocolName: simulated
    configData: {seed: 3, faults: {rate: 0.05, seed: 5}}
  properties:
    - name: temperature
      visitors: {protocolName: simulated, configData: {kind: temperature, base: 21.5, noise: 0.05, resolution: 0.1}}
      collectCycle: {cycle}
    - name: humidity
      visitors: {protocolName: simulated, configData: {kind: humidity, base: 48, noise: 0.1, resolution: 0.1}}
      collectCycle: {cycle}
"""


def dist_info(site: Path, name: str, version: str, **files: str) -> Path:
    """An installed distribution's `.dist-info` in `site`, as pip leaves one: its METADATA, and each
    of `files` by name (`entry_points_txt=...` is entry_points.txt, `direct_url_json=...`
    direct_url.json, `RECORD=...`)."""
    meta = site / f"{name.replace('-', '_')}-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for key, text in files.items():
        (meta / (key if key == "RECORD" else key.replace("_txt", ".txt").replace("_json", ".json"))).write_text(text)
    return meta


def faulty_probe_yaml(cycle: int) -> str:
    """The faulty probe read every `cycle` ms (the inference tests and benchmark)."""
    return FAULTY_PROBE.replace("{cycle}", str(cycle))


def one_property_device(name: str, prop: str, visitor: str, *, settings: str, config: str = "{}") -> str:
    """A simulated device `name` with a model of its own (`<name>-model`) and one property: `prop` is
    the model's property as a flow mapping (`{name: label, type: STRING, accessMode: ReadWrite}`),
    `visitor` its simulated configData, `settings` the device property's other lines
    (collectCycle, reportToCloud, pushMethod, ...) and `config` the device's protocol configData."""
    prop_name = re.search(r"name: *([\w-]+)", prop).group(1)
    lines = "".join(f"      {line}\n" for line in dedent(settings).strip().splitlines())
    return dedent(f"""\
        apiVersion: devices.kubeedge.io/v1beta1
        kind: DeviceModel
        metadata: {{name: {name}-model, namespace: default}}
        spec:
          protocol: simulated
          properties:
            - {prop}
        ---
        apiVersion: devices.kubeedge.io/v1beta1
        kind: Device
        metadata: {{name: {name}, namespace: default}}
        spec:
          deviceModelRef: {{name: {name}-model}}
          protocol: {{protocolName: simulated, configData: {config}}}
          properties:
            - name: {prop_name}
              visitors: {{protocolName: simulated, configData: {visitor}}}
        """) + lines


def the_problem_at_its_line(directory: Path, file_name: str, field: str) -> str:
    """Loading `directory` fails; the one problem naming `field` (a visitors.configData key) is said
    at its line of `file_name`. Its text, for what it says."""
    import pytest

    from devices.errors import DefinitionError
    from devices.loader import load

    with pytest.raises(DefinitionError) as caught:
        load([directory])
    [problem] = [p for p in caught.value.problems if field in str(p)]
    text = str(problem)
    assert text.startswith(f"{directory / file_name}:") and f"visitors.configData.{field}:" in text, text
    assert problem.line is not None and problem.line > 1
    return text


def device_yaml(name: str, *, model: str = "thing-model", cycle: int = 50, config: str = "{}") -> str:
    return DEVICE.format(name=name, model=model, cycle=cycle, config=config)


def write_devices(directory: Path, names: list[str], *, cycle: int = 50, configs: dict[str, str] | None = None) -> Path:
    """A device directory with one model and a simulated device per name."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.yaml").write_text(MODEL.format(model="thing-model"))
    for name in names:
        config = (configs or {}).get(name, "{}")
        (directory / f"{name}.yaml").write_text(device_yaml(name, cycle=cycle, config=config))
    return directory


def write_several_mistakes(directory: Path, shown_as: str = "", *, anomaly_map: bool = False) -> list[str]:
    """A device directory with independent mistakes in six files: a YAML syntax error; a schema error
    in a Device whose DeviceModel does not exist either; a Device of a missing DeviceModel; a name
    taken twice, the second with a misspelt driver setting; a misspelt driver setting; with
    `anomaly_map`, a seventh: a misspelt key in a pushMethod.anomalyDetection map (checked by the
    mapper, not the loader: `mapper validate`, `mapper run`, a reload). Returns what
    loading it says, in order, each "FILE:LINE: FIELD: PROBLEM" (first line only), FILE the file's
    name after `shown_as` (how the directory is named in messages): every one of them, in one run."""
    directory.mkdir(parents=True, exist_ok=True)

    def line_of(text: str, part: str) -> int:
        return next(n for n, line in enumerate(text.splitlines(), 1) if part in line)

    files = {
        "model.yaml": MODEL.format(model="thing-model"),
        "a_syntax.yaml": device_yaml("a").replace("  namespace: default", "   namespace: default"),
        "b_schema.yaml": device_yaml("b", model="b-model").replace("collectCycle: 50", "collectCycle: fast", 1),
        "c_no_model.yaml": device_yaml("c", model="gone-model"),
        "d_driver.yaml": device_yaml("d").replace("{kind: switch}", "{knd: switch}"),
        "dup1.yaml": device_yaml("same"),
        "dup2.yaml": device_yaml("same", config="{sede: 7}"),
    }
    if anomaly_map:
        files["e_map.yaml"] = device_yaml("e").replace("collectCycle: 50\n", "collectCycle: 50\n      pushMethod:\n"
                                                       "        anomalyDetection:\n          data:\n"
                                                       "            model: sensor_faults\n            treshold: 0.5\n", 1)
    for name, text in files.items():
        (directory / name).write_text(text)
    known = "known: default/thing-model"
    said = [
        "a_syntax.yaml:5: invalid YAML: line 5 is indented deeper than line 4 (3 spaces, not 2), so YAML reads it"
        " as the rest of line 4's value: indent it 2 spaces, as 'name' on line 4, if it is a key beside it"
        " (mapping values are not allowed in this context)",
        f"b_schema.yaml:{line_of(files['b_schema.yaml'], 'fast')}: spec.properties[0].collectCycle: must be an"
        " integer, got 'fast'",
        f"b_schema.yaml:8: spec.deviceModelRef.name: DeviceModel default/b-model not found ({known})",
        "dup2.yaml:4: metadata.name: duplicate Device default/same (first defined at {dir}dup1.yaml:4)",
        "dup2.yaml:11: spec.protocol.configData.sede: unknown field, did you mean seed?",
        f"c_no_model.yaml:8: spec.deviceModelRef.name: DeviceModel default/gone-model not found ({known})",
        f"d_driver.yaml:{line_of(files['d_driver.yaml'], 'knd')}: spec.properties[1].visitors.configData.knd: unknown"
        " field, did you mean kind?",
    ]
    if anomaly_map:
        said.append(f"e_map.yaml:{line_of(files['e_map.yaml'], 'treshold')}: spec.properties[0].pushMethod."
                    "anomalyDetection.data.treshold: default/e/temperature: unknown key(s) treshold (did you mean"
                    " threshold?); known: model, name, properties, window, stride, threshold, score, auditShare,"
                    " auditSeed, deadlineS, resendS, resultMaxAgeS, maxGapS, minStepS, encoding, publish, onlyChanges,"
                    " alert, alertOn, setDevice, setProperty, setValue, setOn, setOtherwise")
    return [shown_as + text.replace("{dir}", shown_as) for text in said]


def write_config(path: Path, devices: Path, twin: Path, *, node: str = "test-node", extra: str = "") -> Path:
    path.write_text(dedent(f"""\
        node: {node}
        devices: [{devices}]
        twin:
          path: {twin}
          batch_delay_ms: 5
        loop:
          failure_threshold: 3
          max_backoff_s: 0.2
          desired_poll_ms: 50
        log_level: info
        """) + extra)
    return path


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    """Each file in `directory` with its mtime and size (a command that only reads left them as they were)."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.iterdir())}


def wait_for(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds.

    Used where the event happens in another process (the mapper writing its twin file),
    so there is nothing in this process to await.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def async_wait_for(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def async_wait_until(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], object], timeout: float = 10.0,
                           interval: float = 0.02, what: str = "condition") -> T:
    """async_wait_for for a check that awaits (a twin call, a flush): poll `fetch()` until `ok` of it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_service(config, *, prepare: Callable | None = None, build: Callable | None = None,  # noqa: ANN001
                          timeout: float = 10.0) -> AsyncIterator:
    """A MapperService (or `build(config)`) running in this event loop until the block ends.

    `prepare(service)` runs before it starts (to add listeners). Ready within `timeout`, and
    stopped and awaited on the way out.
    """
    from mapper.service import MapperService

    service = (build or MapperService)(config)
    if prepare is not None:
        prepare(service)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async with asyncio.timeout(timeout):
            await service.ready.wait()
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


class TwinLock:
    """Another connection holding the twin file's write lock (BEGIN IMMEDIATE), as a backup or a
    CLI command would: every write of the mapper waits for it (its busy timeout, then "database is
    locked"). `release_on_log(text)` lets go from inside the first log call whose message holds
    `text` (in the thread that logs it, before that call returns), so what the mapper does next
    finds the twin free, without the test polling for that line."""

    def __init__(self, path: Path) -> None:
        import sqlite3

        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")
        self.released_by: list[str] = []  # the log message that released it
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def release_on_log(self, text: str, logger: str = "mapper") -> None:
        lock = self

        class Release(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                if text in message and not lock.released_by:
                    lock.release()
                    lock.released_by.append(message)

        handler = Release(logging.DEBUG)
        target = logging.getLogger(logger)
        target.addHandler(handler)
        self._handlers.append((target, handler))

    def close(self) -> None:
        for target, handler in self._handlers:
            target.removeHandler(handler)
        self._handlers = []
        self.release()
        self.conn.close()

    def __enter__(self) -> TwinLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/<pid>/status)."""
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False
