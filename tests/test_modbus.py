"""The `modbus` driver against a real Modbus slave: pymodbus's own server on a free port of 127.0.0.1.

Where the fake sits: nowhere above the wire. The slave is pymodbus's server with a datastore (what
a meter or a PLC holds); the driver, the loader, the device loop, the twin and the broker are real.
Device files are in KubeEdge's modbus mapper's shape (register, offset, limit, scale, isSwap,
isRegisterSwap, dataType; communicateMode, ip, port as a string, slaveID)."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

pytest.importorskip("pymodbus")

from pymodbus.server import ModbusSerialServer, ModbusTcpServer  # noqa: E402
from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: E402

from brokers import MosquittoBroker, MqttProbe, free_port  # noqa: E402
from devices.drivers.base import load_driver  # noqa: E402
from devices.drivers.modbus import ModbusDriver  # noqa: E402
from devices.errors import DefinitionError, DriverError, ReadError, WriteError  # noqa: E402
from devices.ids import DeviceId  # noqa: E402
from devices.loader import load  # noqa: E402
from mapper_proc import MapperProcess  # noqa: E402
from test_cli import mapper  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "devices/examples/modbus/energy-meter.yaml"
METER = DeviceId("default", "meter")
SLAVE_ID = 3
# Function codes, as pymodbus's datastore is addressed.
COILS, DISCRETE, HOLDING, INPUT = 1, 2, 3, 4


def words(fmt: str, value: Any) -> list[int]:
    data = struct.pack(fmt, value)
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def byte_swapped(registers: list[int]) -> list[int]:
    return [((r & 0xFF) << 8) | (r >> 8) for r in registers]


# The slave's registers: what each property below reads.
HOLDING_REGISTERS = {
    0: words(">h", -5),                                   # int16
    1: words(">H", 65531),                                # uint16
    2: words(">i", -100000),                              # int32
    4: words(">f", 21.5)[::-1],                           # float32, low word first (isRegisterSwap)
    6: byte_swapped(words(">d", -1234.5678)),             # float64, bytes swapped in each register (isSwap)
    10: [215],                                            # KubeEdge's {dataType: float, limit: 1, scale: 0.1}
    12: words(">4s", b"AB\x00\x00"),                      # string over 2 registers
    14: byte_swapped(words(">I", 3_000_000_000))[::-1],   # uint32, both swaps
    16: words(">H", 1000),                                # int with scale 0.5, ReadWrite
}
INPUT_REGISTERS = {0: [600]}


MODEL = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: meter-model, namespace: default}
spec:
  protocol: modbus
  properties:
    - {name: i16, type: INT}
    - {name: u16, type: INT}
    - {name: i32, type: INT}
    - {name: f32, type: FLOAT}
    - {name: f64, type: DOUBLE}
    - {name: temperature, type: FLOAT, accessMode: ReadWrite, minimum: "-40", maximum: "100"}
    - {name: label, type: STRING}
    - {name: u32, type: INT}
    - {name: setpoint, type: FLOAT, accessMode: ReadWrite}
    - {name: humidity, type: INT}
    - {name: relay, type: BOOLEAN, accessMode: ReadWrite}
    - {name: door, type: BOOLEAN}
---
"""
VISITORS = {
    "i16": "{register: HoldingRegister, offset: 0, limit: 1, dataType: int16}",
    "u16": "{register: HoldingRegister, offset: 1, dataType: uint16}",
    "i32": "{register: HoldingRegister, offset: 2, limit: 2, dataType: int32}",
    "f32": "{register: HoldingRegister, offset: 4, limit: 2, dataType: float32, isRegisterSwap: true}",
    "f64": "{register: HoldingRegister, offset: 6, limit: 4, dataType: float64, isSwap: true}",
    "temperature": "{register: HoldingRegister, offset: 10, limit: 1, dataType: float, scale: 0.1}",
    "label": "{register: HoldingRegister, offset: 12, limit: 2, dataType: string}",
    "u32": "{register: HoldingRegister, offset: 14, limit: 2, dataType: uint32, isSwap: true, isRegisterSwap: true}",
    "setpoint": "{register: HoldingRegister, offset: 16, limit: 1, dataType: int, scale: 0.5}",
    "humidity": "{register: InputRegister, offset: 0, limit: 1, dataType: int}",
    "relay": "{register: CoilRegister, offset: 0, limit: 1}",
    "door": "{register: DiscreteInputRegister, offset: 0, limit: 1, dataType: boolean}",
}


def device_yaml(port: int, *, cycle_ms: int = 5000, visitors: dict[str, str] | None = None,
                config: str | None = None) -> str:
    visitors = visitors or VISITORS
    props = "".join(f"    - name: {name}\n      visitors:\n        protocolName: modbus\n"
                    f"        configData: {visitor}\n      collectCycle: {cycle_ms}\n      reportCycle: {cycle_ms}\n"
                    "      reportToCloud: true\n"
                    for name, visitor in visitors.items())
    config = config or f'{{communicateMode: TCP, ip: 127.0.0.1, port: "{port}", slaveID: {SLAVE_ID}, timeout_s: 1}}'
    return (MODEL + "apiVersion: devices.kubeedge.io/v1beta1\nkind: Device\n"
            "metadata: {name: meter, namespace: default}\nspec:\n  deviceModelRef: {name: meter-model}\n"
            f"  protocol:\n    protocolName: modbus\n    configData: {config}\n  properties:\n{props}")


class Slave:
    """A Modbus slave (pymodbus's TCP or RTU server, its own event loop in a thread) whose datastore
    the test reads and sets as the device's firmware would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None

    @staticmethod
    def device(slave_id: int = SLAVE_ID) -> SimDevice:
        def block(layout: dict[int, list[int]], size: int = 32) -> list[SimData]:
            values = [0] * size
            for address, registers in layout.items():
                values[address:address + len(registers)] = registers
            return [SimData(0, values=values, datatype=DataType.REGISTERS)]

        bits = [SimData(0, values=[True] + [False] * 15, datatype=DataType.BITS)]
        return SimDevice(slave_id, simdata=(bits, list(bits), block(HOLDING_REGISTERS), block(INPUT_REGISTERS)))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start_tcp(self, port: int) -> Slave:
        async def start() -> Any:
            server = ModbusTcpServer(self.device(), address=("127.0.0.1", port))
            await server.listen()
            return server
        self.server = self._run(start())
        return self

    def start_rtu(self, tty_path: str) -> Slave:
        async def start() -> Any:
            server = ModbusSerialServer([self.device(), self.device(SLAVE_ID + 1)], port=tty_path, baudrate=19200, parity="N", timeout=1)
            await server.listen()
            return server
        self.server = self._run(start())
        return self

    def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            self._run(server.shutdown())

    def get(self, table: int, address: int, count: int = 1, *, slave_id: int = SLAVE_ID) -> list[Any]:
        return list(self._run(self.server.context.async_getValues(slave_id, table, address, count)))

    def set(self, table: int, address: int, values: list[Any]) -> None:
        assert self._run(self.server.context.async_setValues(SLAVE_ID, table, address, values)) is None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def slave() -> Iterator[tuple[Slave, int]]:
    port = free_port()
    running = Slave().start_tcp(port)
    try:
        yield running, port
    finally:
        running.close()


def definition(tmp_path: Path, text: str):  # noqa: ANN201
    (tmp_path / "meter.yaml").write_text(text)
    return load([tmp_path / "meter.yaml"], base=tmp_path).devices[METER]


def opened(defn: Any) -> ModbusDriver:
    driver = ModbusDriver(defn)
    driver.open()
    return driver


# -- the driver against the slave ----------------------------------------------------------------


def test_reads_each_register_type_and_data_type_with_swaps_and_scale(tmp_path: Path, slave: tuple[Slave, int]) -> None:
    _, port = slave
    defn = definition(tmp_path, device_yaml(port))
    assert load_driver("modbus") is ModbusDriver
    driver = opened(defn)
    try:
        read = {p.name: driver.read(p) for p in defn.properties}
    finally:
        driver.close()
    assert read.pop("f32") == pytest.approx(21.5)
    assert read.pop("f64") == pytest.approx(-1234.5678)
    assert read.pop("temperature") == pytest.approx(21.5)
    assert read == {"i16": -5, "u16": 65531, "i32": -100000, "label": "AB", "u32": 3_000_000_000,
                    "setpoint": 500, "humidity": 600, "relay": True, "door": True}
    assert driver.health() == "ok"


def test_a_write_lands_in_the_slave_and_reads_back(tmp_path: Path, slave: tuple[Slave, int]) -> None:
    server, port = slave
    defn = definition(tmp_path, device_yaml(port))
    driver = opened(defn)
    try:
        driver.write(defn.prop("temperature"), -12.3)  # scale 0.1: -123 in the register (int16)
        assert server.get(HOLDING, 10) == [(-123) & 0xFFFF]
        assert driver.read(defn.prop("temperature")) == pytest.approx(-12.3)
        driver.write(defn.prop("relay"), False)
        assert server.get(COILS, 0) == [False]
        assert driver.read(defn.prop("relay")) is False
        # What the register cannot hold is refused for good, naming why; the register is left alone.
        with pytest.raises(WriteError, match=r"default/meter/temperature: 4000 / scale 0.1 = 40000 does not fit a"
                                             r" int16") as refused:
            driver.write(defn.prop("temperature"), 4000)
        assert refused.value.retryable is False
        assert server.get(HOLDING, 10) == [(-123) & 0xFFFF]
    finally:
        driver.close()


def test_an_input_register_or_discrete_input_is_never_written(tmp_path: Path, slave: tuple[Slave, int]) -> None:
    server, port = slave
    defn = definition(tmp_path, device_yaml(port))
    driver = opened(defn)
    try:
        for name, register in (("humidity", "InputRegister"), ("door", "DiscreteInputRegister")):
            with pytest.raises(WriteError, match=f"a {register} is read-only in Modbus") as refused:
                driver.write(defn.prop(name), 1)
            assert refused.value.retryable is False
        assert server.get(INPUT, 0) == [600]
    finally:
        driver.close()
    # A ReadWrite property on one runs as ReadOnly, with a warning at its accessMode (as KubeEdge's file loads).
    text = device_yaml(port).replace("{name: humidity, type: INT}", "{name: humidity, type: INT, accessMode: ReadWrite}")
    (tmp_path / "meter.yaml").write_text(text)
    loaded = load([tmp_path / "meter.yaml"], base=tmp_path)
    assert not loaded.devices[METER].prop("humidity").writable
    line = text.splitlines().index("    - {name: humidity, type: INT, accessMode: ReadWrite}") + 1
    assert any(str(w).startswith(f"meter.yaml:{line}: spec.properties[9].accessMode: property 'humidity'"
                                 " is ReadWrite, but the driver for protocol 'modbus'") for w in loaded.warnings), \
        [str(w) for w in loaded.warnings]


def test_a_slave_gone_is_a_retryable_error_and_readings_resume_when_it_is_back(
        tmp_path: Path, slave: tuple[Slave, int], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failed request is one error reading saying what to check, not also an ERROR of pymodbus's
    own in the log (each retry logged twice, once without the device's name)."""
    server, port = slave
    monkeypatch.setattr(logging.getLogger("pymodbus"), "level", logging.NOTSET)  # as in a fresh process
    caplog.set_level(logging.INFO)
    defn = definition(tmp_path, device_yaml(port))
    driver = opened(defn)
    prop = defn.prop("i16")
    try:
        assert driver.read(prop) == -5
        server.stop()
        for _ in range(2):  # the broken connection, then the refused reconnect
            with pytest.raises(ReadError) as failed:
                driver.read(prop)
            assert failed.value.retryable is True
            assert f"127.0.0.1:{port} slaveID {SLAVE_ID}" in str(failed.value)
            assert "check that the slave (or gateway) is on and reachable at ip and port" in str(failed.value)
        assert driver.health().startswith("2 failed request(s) in a row"), driver.health()
        assert [r.getMessage() for r in caplog.records if r.name.startswith("pymodbus")] == []
        server.start_tcp(port)
        assert driver.read(prop) == -5
        assert driver.health() == "ok"
    finally:
        driver.close()


def test_an_exception_response_names_the_exception(tmp_path: Path, slave: tuple[Slave, int]) -> None:
    _, port = slave
    visitors = {"i16": "{register: HoldingRegister, offset: 200, dataType: int16}"}
    defn = definition(tmp_path, device_yaml(port, visitors=visitors))
    driver = opened(defn)
    try:
        with pytest.raises(ReadError, match=r"default/meter/i16: Modbus read of HoldingRegister 200 at 127.0.0.1:\d+"
                                            r" slaveID 3: the slave answered with an exception: illegal data address"
                                            r" \(offset/limit outside") as failed:
            driver.read(defn.prop("i16"))
        assert failed.value.retryable is False
    finally:
        driver.close()


# -- the device files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "field", "message"), [
    ("offset: 2, limit: 2, dataType: int32", "offest: 2, limit: 2, dataType: int32", "visitors.configData.offest",
     "unknown field, did you mean offset?"),
    ("offset: 2, limit: 2, dataType: int32", "offset: 2, limit: 1, dataType: int32", "visitors.configData.limit",
     "dataType int32 spans 2 register(s): limit 2 (or leave it out), not 1"),
    ("offset: 2, limit: 2, dataType: int32", "offset: 2, dataType: int24", "visitors.configData.dataType",
     "must be one of int16, uint16"),
    ("register: HoldingRegister, offset: 2,", "register: Holding, offset: 2,", "visitors.configData.register",
     "'Holding' is not allowed: must be 'HoldingRegister', 'InputRegister', 'CoilRegister' or 'DiscreteInputRegister'"),
])
def test_a_visitor_mistake_is_reported_at_its_file_line_and_field(tmp_path: Path, old: str, new: str, field: str,
                                                                   message: str) -> None:
    text = device_yaml(502).replace(old, new)
    with pytest.raises(DefinitionError) as error:
        definition(tmp_path, text)
    line = text.splitlines().index("    - name: i32") + 4
    assert f"meter.yaml:{line}: spec.properties[2].{field}: {message}" in str(error.value), error.value


def test_kubeedge_settings_are_taken_as_kubeedge_writes_them(tmp_path: Path) -> None:
    """A port as a string, RTU's parity as `even` or `E`, communicateMode in any case."""
    defn = definition(tmp_path, device_yaml(502, config='{communicateMode: tcp, ip: 10.0.0.5, port: "5502", slaveID: "1"}'))
    assert (defn.protocol_config.communicateMode, defn.protocol_config.port, defn.protocol_config.slaveID) == ("TCP", 5502, 1)
    rtu = definition(tmp_path, device_yaml(502, config="{communicateMode: RTU, serialPort: /dev/ttyUSB0, baudRate: 9600,"
                                                       " dataBits: 8, parity: even, stopBits: 1, slaveID: 1}"))
    assert (rtu.protocol_config.parity, rtu.protocol_config.baudRate) == ("E", 9600)
    with pytest.raises(DefinitionError, match=r"meter.yaml:\d+: spec.protocol.configData.ip: Modbus TCP needs the"
                                              r" slave's address"):
        definition(tmp_path, device_yaml(502, config="{communicateMode: TCP, port: 502}"))


def test_a_property_whose_type_does_not_fit_its_register_is_refused(tmp_path: Path) -> None:
    text = device_yaml(502).replace("{name: relay, type: BOOLEAN, accessMode: ReadWrite}",
                                    "{name: relay, type: INT, accessMode: ReadWrite}")
    with pytest.raises(DefinitionError, match=r"spec.properties\[10\].visitors.configData.register: a CoilRegister is"
                                              r" on or off: property 'relay' must be BOOLEAN"):
        definition(tmp_path, text)


def test_the_example_validates() -> None:
    checked = mapper("validate", str(EXAMPLE))
    assert (checked.returncode, checked.stderr) == (0, ""), checked


def test_without_pymodbus_the_error_names_the_extra() -> None:
    """A mapper without the `modbus` extra loads the driver (every other device runs); a Modbus
    device then says what to install, in `mapper validate --config` and when it opens."""
    code = ("import sys; sys.modules['pymodbus'] = None\n"
            "from devices.loader import load; from pathlib import Path\n"
            "from devices.drivers.modbus import ModbusDriver\n"
            f"d = next(iter(load([Path({str(EXAMPLE)!r})]).devices.values()))\n"
            "print(ModbusDriver.not_installed(d))\n"
            "try:\n    ModbusDriver(d).open()\nexcept Exception as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    missing, at_open = result.stdout.splitlines()[:2]
    assert "needs pymodbus (pymodbus, pyserial), not installed here: install the `modbus` extra (" in missing, missing
    assert "-m pip install " in missing and "[modbus]'" in missing, missing
    assert "default/energy-meter: the modbus driver needs pymodbus" in at_open, at_open
    assert "install the `modbus` extra (" in at_open and "[modbus]'" in at_open, at_open


# -- RTU over a pseudo-terminal pair --------------------------------------------------------------------


class NullModem:
    """Two pseudo-terminals wired together as a null-modem cable: what one end's program writes, the
    other's reads (a thread copies between the two controller sides). Each program opens its end by
    name, as it opens /dev/ttyUSB0, with its own line settings."""

    def __init__(self) -> None:
        self._fds: list[int] = []
        self.names: list[str] = []
        for _ in range(2):
            controller, peripheral = os.openpty()
            tty.setraw(peripheral)
            self._fds += [controller, peripheral]
            self.names.append(os.ttyname(peripheral))
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        a, b = self._fds[0], self._fds[2]
        while True:
            ready, _, _ = select.select([a, b, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            for source, target in ((a, b), (b, a)):
                if source in ready:
                    try:
                        os.write(target, os.read(source, 4096))
                    except OSError:
                        pass  # (an end not open at the moment: what a cable does with it)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        for fd in (*self._fds, self._stop_r, self._stop_w):
            os.close(fd)


def test_rtu_reads_and_writes_over_a_serial_line(tmp_path: Path) -> None:
    """pymodbus's RTU server on one end of a serial line (two ptys as a null-modem), the driver on the other.
    (No parity: a Linux pty refuses to change its parity setting, which a real UART takes.)"""
    cable = NullModem()
    slave = Slave().start_rtu(cable.names[0])
    try:
        config = (f"{{communicateMode: RTU, serialPort: {cable.names[1]}, baudRate: 19200, dataBits: 8,"
                  f" parity: none, stopBits: 1, slaveID: {SLAVE_ID}, timeout_s: 1}}")
        defn = definition(tmp_path, device_yaml(0, config=config))
        driver = opened(defn)
        try:
            assert driver.read(defn.prop("i32")) == -100000
            assert driver.read(defn.prop("f32")) == pytest.approx(21.5)
            driver.write(defn.prop("setpoint"), 250)  # scale 0.5: 500 in the register
            assert slave.get(HOLDING, 16) == [500]
            assert driver.read(defn.prop("setpoint")) == 250
            assert driver.read(defn.prop("relay")) is True
            # A second slave on the same line (its own Device, as in KubeEdge) shares the port.
            (tmp_path / "second").mkdir()
            (tmp_path / "second" / "meter.yaml").write_text(device_yaml(0, config=config.replace(
                f"slaveID: {SLAVE_ID}", f"slaveID: {SLAVE_ID + 1}")))
            second = opened(load([tmp_path / "second" / "meter.yaml"], base=tmp_path).devices[METER])
            try:
                second.write(second.device.prop("setpoint"), 100)
                assert slave.get(HOLDING, 16, slave_id=SLAVE_ID + 1) == [200]
                assert (driver.read(defn.prop("setpoint")), second.read(second.device.prop("setpoint"))) == (250, 100)
            finally:
                second.close()
            assert driver.read(defn.prop("i32")) == -100000  # the line stays open for the first
            # One line, one setting: a device asking for another baud rate on it is refused, saying why.
            (tmp_path / "second" / "meter.yaml").write_text(device_yaml(0, config=config.replace(
                "baudRate: 19200", "baudRate: 9600").replace(f"slaveID: {SLAVE_ID}", f"slaveID: {SLAVE_ID + 1}")))
            other = ModbusDriver(load([tmp_path / "second" / "meter.yaml"], base=tmp_path).devices[METER])
            with pytest.raises(DriverError, match=r"is open for device\(s\) default/meter at 19200 8N1, and this device"
                                                  r" asks for 9600 8N1: the slaves of one line share its settings"):
                other.open()
            other.close()
            assert driver.read(defn.prop("i32")) == -100000
        finally:
            driver.close()
    finally:
        slave.close()
        cable.close()


# -- under `python -m mapper run` --------------------------------------------------------------------


def value_reported(app: MqttProbe, topic: str, wanted: Any) -> None:
    """Wait (20 s at most between messages, 100 messages at most) for `wanted` on `topic`."""
    seen, others = [], set()
    for _ in range(100):
        message = app.next_message(20)
        others.add(message.topic)
        if message.topic == topic:
            seen.append(orjson.loads(message.payload)["value"])
            if seen[-1] == wanted:
                return
    raise AssertionError(f"{topic}: {wanted!r} not reported; reported: {seen}; topics: {sorted(others)}")


def test_a_desired_value_over_mqtt_reaches_the_slave_and_comes_back_reported(
        broker: MosquittoBroker, tmp_path: Path, slave: tuple[Slave, int]) -> None:
    server, port = slave
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "meter.yaml").write_text(device_yaml(port, cycle_ms=200))
    prefix = f"mapper/{broker.node}/default/meter"
    with broker.client("app") as app, MapperProcess(tmp_path, devices, broker) as proc:
        app.subscribe(f"{prefix}/#")
        value_reported(app, f"{prefix}/temperature", pytest.approx(21.5))
        app.publish(f"{prefix}/temperature/set", "30.5")
        value_reported(app, f"{prefix}/temperature", pytest.approx(30.5))
        assert server.get(HOLDING, 10) == [305]
        proc.wait_log("default/meter/temperature: applied desired value 30.5")
        # The slave's own change (a local panel) is read and reported too.
        server.set(HOLDING, 0, [(-42) & 0xFFFF])
        value_reported(app, f"{prefix}/i16", -42)
        assert proc.stop() == 0
