"""The `modbus` protocol: Modbus TCP and RTU slaves, in the shape of KubeEdge's modbus mapper.

The same Device and DeviceModel files run under KubeEdge's modbus mapper and here. Device
`spec.protocol.configData`::

    communicateMode: TCP     # TCP or RTU (left out: TCP when `ip` is given, RTU when `serialPort` is)
    ip: 10.0.0.5             # TCP: the slave's (or gateway's) address
    port: "502"              # TCP: a number or a string of one, as KubeEdge writes it (502)
    slaveID: 1               # the unit id, 0-247 (1)
    serialPort: /dev/ttyUSB0 # RTU: the serial device
    baudRate: 9600           # RTU (19200)
    dataBits: 8              # RTU: 5-8 (8)
    parity: none             # RTU: none/even/odd or N/E/O (none)
    stopBits: 1              # RTU: 1 or 2 (1)
    timeout_s: 3             # the mapper's own: how long one request may take (3)

Each property's `visitors.configData`::

    register: HoldingRegister  # HoldingRegister, InputRegister, CoilRegister or DiscreteInputRegister
    offset: 0                  # the first register's (coil's) address, 0-based as on the wire
    limit: 1                   # how many registers the value spans (the dataType's width by default)
    dataType: int16            # how the registers are decoded (below; by default from the property's type)
    scale: 0.1                 # reading = decoded value * scale; a written value is divided by it
    isSwap: false              # swap the two bytes of each register
    isRegisterSwap: false      # reverse the order of the registers (the low word first)

dataType: `int16`, `uint16` (1 register), `int32`, `uint32`, `float32` (2), `int64`, `uint64`,
`float64` (4), `boolean` (a coil or discrete input; on a register: not 0), `string` (`limit`
registers of ASCII, two characters each, trailing NULs and spaces dropped). KubeEdge's names work
too: `int` is a signed integer of `limit` registers (1, 2 or 4), `float` and `double` are an
IEEE float over 2 or 4 registers, and over 1 register the register's signed integer (which
`scale` makes a fraction: KubeEdge's temperature example, `{dataType: float, limit: 1, scale: 0.1}`).
`scale: 0` (KubeEdge's "not set") means no scaling. The mapper's own valueScale/valueOffset apply
after the driver's `scale`.

Coils and discrete inputs are BOOLEAN properties. Only HoldingRegister and CoilRegister can be
written: a ReadWrite property on an input register or a discrete input runs as ReadOnly (a warning
at its accessMode, as for any property its driver cannot write), and a write to one is refused (not
retryable). A written number is divided by `scale`, rounded to the
nearest integer for integer types, and refused (not retryable) when it does not fit them.

One connection per device, opened in `open()` and shared by its properties' reads (the device loop
calls them one at a time, in a worker thread: `blocking`); after a failed request it is closed and
the next request connects again. Devices on one serial port (several slaves on one RS-485 line, one
Device each as in KubeEdge) share its connection, one request at a time; they must give it the same
line settings. No answer, a broken connection or a garbled frame is a retryable
ReadError naming what to check; a Modbus exception response names the exception (an illegal data
address: `offset`/`limit` outside what the slave has).
"""

from __future__ import annotations

import inspect
import logging
import math
import struct
import threading
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import DriverError, FieldError, ReadError, WriteError
from devices.values import PropertyType

REGISTERS = ("HoldingRegister", "InputRegister", "CoilRegister", "DiscreteInputRegister")
WRITABLE_REGISTERS = ("HoldingRegister", "CoilRegister")
BIT_REGISTERS = ("CoilRegister", "DiscreteInputRegister")

# dataType -> (struct format of one value, registers it spans); None: decided by `limit`.
_FIXED = {"int16": (">h", 1), "uint16": (">H", 1), "int32": (">i", 2), "uint32": (">I", 2),
          "float32": (">f", 2), "int64": (">q", 4), "uint64": (">Q", 4), "float64": (">d", 4)}
# KubeEdge's names: by the number of registers.
_BY_LIMIT = {"int": {1: "int16", 2: "int32", 4: "int64"},
             "float": {1: "int16", 2: "float32", 4: "float64"},
             "double": {1: "int16", 2: "float32", 4: "float64"}}
DATA_TYPES = (*_FIXED, *_BY_LIMIT, "boolean", "string")
_ALIASES = {"bool": "boolean"}
_PARITY = {"none": "N", "n": "N", "even": "E", "e": "E", "odd": "O", "o": "O"}
# Modbus exception codes (the spec's names), for a slave's exception response.
_EXCEPTIONS = {
    1: "illegal function (the slave does not support this register type)",
    2: "illegal data address (offset/limit outside the registers the slave has)",
    3: "illegal data value (the slave refused the value or the register count)",
    4: "slave device failure",
    5: "acknowledge (the slave is still processing a long request)",
    6: "slave device busy",
    8: "memory parity error",
    10: "gateway path unavailable (the gateway has no route to slaveID)",
    11: "gateway target failed to respond (the slave behind the gateway did not answer)",
}
_RETRYABLE_EXCEPTIONS = {5, 6, 10, 11}


def install_hint() -> str:
    """The command for this installation (devices/extras.py: `pip install 'mapper[modbus]'` would install
    whatever PyPI has under that name, into whichever environment that pip belongs to)."""
    from devices.extras import install_extra

    return f"install the `modbus` extra ({install_extra('modbus')})"


def _mode(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _parity(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in _PARITY:
        return _PARITY[value.strip().lower()]
    raise ValueError(f"must be none, even or odd (or N, E, O), got {value!r}")


def _data_type(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    name = value.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in DATA_TYPES:
        raise ValueError(f"must be one of {', '.join(DATA_TYPES)}, got {value!r}")
    return name


class ModbusConfig(BaseModel):
    """`spec.protocol.configData`, with KubeEdge's modbus mapper's keys (numbers may be strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    communicateMode: Annotated[Literal["TCP", "RTU"] | None, BeforeValidator(_mode)] = None
    ip: str | None = None
    port: int = Field(default=502, ge=1, le=65535)
    slaveID: int = Field(default=1, ge=0, le=247)
    serialPort: str | None = None
    baudRate: int = Field(default=19200, gt=0)
    dataBits: Literal[5, 6, 7, 8] = 8
    parity: Annotated[Literal["N", "E", "O"], BeforeValidator(_parity)] = "N"
    stopBits: Literal[1, 2] = 1
    timeout_s: float = Field(default=3.0, gt=0, le=60)

    @model_validator(mode="after")
    def _has_an_address(self) -> ModbusConfig:
        mode = self.communicateMode or ("RTU" if self.serialPort and not self.ip else "TCP")
        if mode == "TCP" and not self.ip:
            raise FieldError(("ip",) if self.communicateMode else (),
                             "Modbus TCP needs the slave's address: add ip (and port, 502 by default), or"
                             " communicateMode: RTU with serialPort for a serial line")
        if mode == "RTU" and not self.serialPort:
            raise FieldError(("serialPort",), "Modbus RTU needs the serial device: add serialPort (/dev/ttyUSB0, say)")
        object.__setattr__(self, "communicateMode", mode)
        return self

    @property
    def where(self) -> str:
        if self.communicateMode == "TCP":
            return f"{self.ip}:{self.port} slaveID {self.slaveID}"
        return f"{self.serialPort} ({self.baudRate} {self.dataBits}{self.parity}{self.stopBits}) slaveID {self.slaveID}"


class ModbusVisitor(BaseModel):
    """A property's `visitors.configData`, with KubeEdge's modbus mapper's keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # (a field named `register` shadows BaseModel.register: stored as `register_type`, read as `register`)
    register_type: Literal["HoldingRegister", "InputRegister", "CoilRegister", "DiscreteInputRegister"] = Field(
        alias="register")
    offset: int = Field(default=0, ge=0, le=65535)
    limit: int | None = Field(default=None, ge=1, le=125)
    dataType: Annotated[str | None, BeforeValidator(_data_type)] = None
    scale: float | None = None
    isSwap: bool = False
    isRegisterSwap: bool = False

    @model_validator(mode="after")
    def _fits(self) -> ModbusVisitor:
        if self.scale is not None and not math.isfinite(self.scale):
            raise FieldError(("scale",), f"must be a finite number, got {self.scale}")
        bits = self.register_type in BIT_REGISTERS
        if bits and self.dataType not in (None, "boolean"):
            raise FieldError(("dataType",), f"a {self.register_type} holds one bit: dataType boolean (or leave it"
                                            f" out), not {self.dataType}")
        if (bits or self.dataType == "boolean") and self.limit not in (None, 1):
            raise FieldError(("limit",), f"a boolean is one {'bit' if bits else 'register'}: limit 1 (or leave it out),"
                                         f" not {self.limit}")
        if self.dataType in _FIXED and self.limit not in (None, _FIXED[self.dataType][1]):
            raise FieldError(("limit",), f"dataType {self.dataType} spans {_FIXED[self.dataType][1]} register(s): limit"
                                         f" {_FIXED[self.dataType][1]} (or leave it out), not {self.limit}")
        if self.dataType in _BY_LIMIT and self.limit not in (None, *_BY_LIMIT[self.dataType]):
            raise FieldError(("limit",), f"dataType {self.dataType} is read from 1, 2 or 4 registers, not {self.limit}")
        if self.offset + (self.limit or 1) > 65536:
            raise FieldError(("limit",), f"offset {self.offset} + limit {self.limit} runs past the last address (65535)")
        return self


def _default_type(prop: PropertyDefinition) -> str:
    return {PropertyType.BOOLEAN: "boolean", PropertyType.STRING: "string",
            PropertyType.INT: "int", PropertyType.FLOAT: "float", PropertyType.DOUBLE: "float"}.get(prop.type, "int")


def _encoding(prop: PropertyDefinition) -> tuple[str, int]:
    """(the encoding the registers hold: a _FIXED name, boolean or string; registers) of a property."""
    v: ModbusVisitor = prop.visitor
    data_type = v.dataType or ("boolean" if v.register_type in BIT_REGISTERS else _default_type(prop))
    if data_type in _FIXED:
        return data_type, _FIXED[data_type][1]
    if data_type in _BY_LIMIT:
        limit = v.limit or 1
        return _BY_LIMIT[data_type][limit], limit
    return data_type, v.limit or 1


def _swapped(registers: list[int], visitor: ModbusVisitor) -> list[int]:
    """The registers in big-endian word and byte order, as isRegisterSwap/isSwap describe the
    slave's (both are their own inverse, so writing uses the same)."""
    if visitor.isRegisterSwap:
        registers = registers[::-1]
    if visitor.isSwap:
        registers = [((r & 0xFF) << 8) | (r >> 8) for r in registers]
    return registers


def _scale(visitor: ModbusVisitor) -> float:
    return visitor.scale if visitor.scale else 1.0  # (0 or left out: KubeEdge's "no scaling")


def decode(prop: PropertyDefinition, registers: list[int]) -> Any:
    """The property's value from the registers read (16-bit ints, as the slave sent them)."""
    v: ModbusVisitor = prop.visitor
    encoding, _ = _encoding(prop)
    words = _swapped(list(registers), v)
    raw = b"".join(w.to_bytes(2, "big") for w in words)
    if encoding == "boolean":
        return any(words)
    if encoding == "string":
        return raw.rstrip(b"\x00 ").decode("ascii", errors="replace")
    (number,) = struct.unpack(_FIXED[encoding][0], raw)
    scale = _scale(v)
    if scale != 1.0:
        number = number * scale
    if prop.type is PropertyType.INT and isinstance(number, float) and math.isfinite(number):
        number = round(number)
    return number


def encode(prop: PropertyDefinition, value: Any) -> list[int]:
    """The registers that hold `value` (the inverse of decode); ValueError when it does not fit."""
    v: ModbusVisitor = prop.visitor
    encoding, count = _encoding(prop)
    if encoding == "boolean":
        return _swapped([1 if value else 0], v)
    if encoding == "string":
        data = str(value).encode("ascii")
        if len(data) > 2 * count:
            raise ValueError(f"{value!r} is {len(data)} characters; limit {count} registers hold {2 * count}")
        data = data.ljust(2 * count, b"\x00")
    else:
        number = float(value) / _scale(v)
        fmt = _FIXED[encoding][0]
        if not encoding.startswith("float"):
            if not math.isfinite(number):
                raise ValueError(f"{value} cannot be written as {encoding}")
            number = round(number)
        try:
            data = struct.pack(fmt, number)
        except (struct.error, OverflowError):
            shown = f"{value} / scale {_scale(v):g} = {number:g}" if _scale(v) != 1.0 else f"{value}"
            raise ValueError(f"{shown} does not fit a {encoding}") from None
    words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    return _swapped(words, v)


class ModbusError(ReadError):
    """A Modbus request failed: no answer, a broken connection, or the slave's exception response."""


class ModbusDriver(Driver):
    protocol = "modbus"
    Config = ModbusConfig
    Visitor = ModbusVisitor
    blocking = True
    lazy_modules = ("pymodbus", "serial")
    # The class's, for `mapper drivers`; each device's follows its configData.timeout_s.
    timeout_s = 7.0

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.config: ModbusConfig
        # A request, then one connect and one more try: the device loop's limit on one call.
        self.timeout_s = 2 * self.config.timeout_s + 1.0
        self._lock = threading.Lock()  # one request at a time on the connection (a serial line's: shared)
        self._line: _Line | None = None
        self._client: Any = None
        self._exceptions: Any = None
        self._unit: dict[str, int] = {}
        self.failures = 0
        self.last_error = ""

    @classmethod
    def can_write(cls, prop: PropertyDefinition) -> bool:
        return getattr(prop.visitor, "register_type", None) in WRITABLE_REGISTERS

    @classmethod
    def config_problems(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """What the models cannot see: the property's type against its register and dataType. (A
        ReadWrite property on an input register runs as ReadOnly, with a warning: can_write.)"""
        for i, prop in enumerate(device.properties):
            v: ModbusVisitor = prop.visitor
            encoding, _ = _encoding(prop)
            where = f"spec.properties[{i}].visitors.configData"
            if encoding == "boolean" and prop.type is not PropertyType.BOOLEAN:
                what = f"a {v.register_type}" if v.register_type in BIT_REGISTERS else "dataType boolean"
                yield (f"{where}.{'register' if v.register_type in BIT_REGISTERS else 'dataType'}",
                       f"{what} is on or off: property {prop.name!r} must be BOOLEAN in DeviceModel"
                       f" {device.model_name!r}, not {prop.type.value}")
            elif encoding == "string" and prop.type is not PropertyType.STRING:
                yield (f"{where}.dataType", f"dataType string reads text: property {prop.name!r} must be STRING in"
                                            f" DeviceModel {device.model_name!r}, not {prop.type.value}")
            elif encoding not in ("boolean", "string") and not prop.type.numeric:
                yield (f"{where}.dataType", f"dataType {v.dataType or encoding} is a number: property {prop.name!r} must"
                                            f" be INT, FLOAT or DOUBLE in DeviceModel {device.model_name!r}, not"
                                            f" {prop.type.value} (or set dataType to match it)")

    @classmethod
    def not_installed(cls, device: DeviceDefinition) -> str | None:
        from devices.extras import missing_modules

        missing = missing_modules("pymodbus", *(["serial"] if device.protocol_config.communicateMode == "RTU" else []))
        if not missing:
            return None
        return f"needs {' and '.join(missing)} (pymodbus, pyserial), not installed here: {install_hint()}"

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        from mapper.openssl import import_time_names

        try:
            with import_time_names():  # (a mapper without TLS runs without OpenSSL: mapper/openssl.py)
                import pymodbus.client  # noqa: PLC0415 - lazy: the mapper runs without the modbus extra
                import pymodbus.exceptions  # noqa: PLC0415
        except ImportError as exc:
            raise DriverError(f"{self.device.id}: the modbus driver needs pymodbus ({exc}): {install_hint()}") from exc
        self._exceptions = pymodbus.exceptions
        _quiet_library_log()
        c = self.config
        if c.communicateMode == "TCP":
            client = pymodbus.client.ModbusTcpClient(c.ip, port=c.port, timeout=c.timeout_s, retries=0)
        else:
            try:
                import serial  # noqa: F401, PLC0415 - pymodbus's serial client needs pyserial
            except ImportError as exc:
                raise DriverError(f"{self.device.id}: Modbus RTU needs pyserial ({exc}): {install_hint()}") from exc
            client = None
        # pymodbus 3.10 renamed the requests' `slave=` to `device_id=`.
        requests = pymodbus.client.ModbusTcpClient.read_coils
        unit = "device_id" if "device_id" in inspect.signature(requests).parameters else "slave"
        self._unit = {unit: c.slaveID}
        self.close()  # (an open() after one that failed)
        if client is not None:
            self._client = client
        else:
            self._line = _Line.join(self, c, pymodbus.client.ModbusSerialClient)
            self._client, self._lock = self._line.client, self._line.lock
        try:
            with self._lock:
                self._connect()
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            self._client = None
            line.leave(self)
            return
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def health(self) -> str:
        return "ok" if not self.failures else f"{self.failures} failed request(s) in a row; last: {self.last_error}"

    # -- reading and writing -------------------------------------------------------------------

    def read(self, prop: PropertyDefinition) -> Any:
        v: ModbusVisitor = prop.visitor
        _, count = _encoding(prop)
        call = {"HoldingRegister": "read_holding_registers", "InputRegister": "read_input_registers",
                "CoilRegister": "read_coils", "DiscreteInputRegister": "read_discrete_inputs"}[v.register_type]
        response = self._request(prop, "read", call, v.offset, count=count)
        if v.register_type in BIT_REGISTERS:
            return bool(response.bits[0])
        if len(response.registers) != count:
            raise self._failed(prop, "read", f"the slave sent {len(response.registers)} register(s) for {count}")
        return decode(prop, response.registers)

    def write(self, prop: PropertyDefinition, value: Any) -> None:
        v: ModbusVisitor = prop.visitor
        if v.register_type not in WRITABLE_REGISTERS:
            raise WriteError(f"{self.device.id}/{prop.name}: a {v.register_type} is read-only in Modbus (only"
                             " HoldingRegister and CoilRegister can be written)", retryable=False)
        if v.register_type == "CoilRegister":
            self._request(prop, "write", "write_coil", v.offset, bool(value))
            return
        try:
            words = encode(prop, value)
        except ValueError as exc:
            raise WriteError(f"{self.device.id}/{prop.name}: {exc}", retryable=False) from None
        if len(words) == 1:
            self._request(prop, "write", "write_register", v.offset, words[0])
        else:
            self._request(prop, "write", "write_registers", v.offset, words)

    # -- the connection ------------------------------------------------------------------------

    def _connect(self) -> None:
        """Connect if not connected (the lock held); a failure is a retryable error saying what to check."""
        if self._client is None:
            raise ModbusError(f"{self.device.id}: the Modbus connection is closed")
        if self._client.connected:
            return
        if not self._client.connect():
            self._note(f"cannot connect to {self.config.where}")
            raise ModbusError(f"{self.device.id}: cannot connect to {self.config.where}: {self._check()}")

    def _check(self) -> str:
        if self.config.communicateMode == "TCP":
            return ("check that the slave (or gateway) is on and reachable at ip and port, that nothing else holds its"
                    " only connection, and slaveID")
        return ("check serialPort (and that the mapper's user may open it: group dialout), the wiring (A/B, ground,"
                " termination), baudRate, parity, dataBits, stopBits and slaveID")

    def _note(self, error: str) -> None:
        self.failures += 1
        self.last_error = error

    def _failed(self, prop: PropertyDefinition, action: str, why: str, *, retryable: bool = True) -> Exception:
        self._note(why)
        message = f"{self.device.id}/{prop.name}: Modbus {action} of {self._what(prop)} at {self.config.where}: {why}"
        return (ModbusError if action == "read" else WriteError)(message, retryable=retryable)

    @staticmethod
    def _what(prop: PropertyDefinition) -> str:
        v: ModbusVisitor = prop.visitor
        _, count = _encoding(prop)
        span = f"{v.offset}" if count == 1 else f"{v.offset}-{v.offset + count - 1}"
        return f"{v.register_type} {span}"

    def _request(self, prop: PropertyDefinition, action: str, call: str, *args: Any, **kwargs: Any) -> Any:
        exceptions = self._exceptions
        with self._lock:
            try:
                self._connect()
                response = getattr(self._client, call)(*args, **self._unit, **kwargs)
            except ModbusError as exc:
                raise (exc if action == "read" else WriteError(str(exc))) from None
            except (exceptions.ModbusException, OSError) as exc:
                if self._client is not None:
                    self._client.close()  # the next request connects again
                raise self._failed(prop, action, f"no valid answer ({_short(exc)}): {self._check()}") from exc
        if response.isError():
            code = getattr(response, "exception_code", None)
            named = _EXCEPTIONS.get(code, f"exception code {code}")
            raise self._failed(prop, action, f"the slave answered with an exception: {named}",
                               retryable=code in _RETRYABLE_EXCEPTIONS)
        self.failures, self.last_error = 0, ""
        return response


def _quiet_library_log() -> None:
    """pymodbus logs each failed connect and request as an ERROR: every retry of a slave that is off
    would log twice, once without the device's name. The driver's errors say it all (state detail,
    error readings); a level set on the `pymodbus` logger (to debug a bus) is kept."""
    library = logging.getLogger("pymodbus")
    if library.level == logging.NOTSET:
        library.setLevel(logging.CRITICAL)


class _Line:
    """One serial port's client, shared by the devices (slaves) on it, with its lock: a line has one
    master, and two requests at once would garble each other's frames."""

    _open: ClassVar[dict[str, _Line]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, port: str, config: ModbusConfig, client: Any) -> None:
        self.port = port
        self.settings = (config.baudRate, config.dataBits, config.parity, config.stopBits)
        self.client = client
        self.lock = threading.Lock()
        self.users: set[Any] = set()

    @classmethod
    def join(cls, driver: ModbusDriver, config: ModbusConfig, client_class: Any) -> _Line:
        port = str(config.serialPort)
        with cls._registry_lock:
            line = cls._open.get(port)
            if line is None:
                line = cls._open[port] = cls(port, config, client_class(
                    port, baudrate=config.baudRate, bytesize=config.dataBits, parity=config.parity,
                    stopbits=config.stopBits, timeout=config.timeout_s, retries=0))
            elif line.settings != (config.baudRate, config.dataBits, config.parity, config.stopBits):
                b, d, p, s = line.settings
                users = ", ".join(sorted({str(user.device.id) for user in line.users}))
                raise DriverError(f"{driver.device.id}: {port} is open for device(s) {users}"
                                  f" at {b} {d}{p}{s}, and this device asks for {config.baudRate} {config.dataBits}"
                                  f"{config.parity}{config.stopBits}: the slaves of one line share its settings; make"
                                  " baudRate, dataBits, parity and stopBits the same in each")
            line.users.add(driver)
            return line

    def leave(self, driver: ModbusDriver) -> None:
        with self._registry_lock:
            self.users.discard(driver)
            if self.users:
                return
            if self._open.get(self.port) is self:
                del self._open[self.port]
        with self.lock:
            self.client.close()


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
