"""The `ds18b20` protocol: DS18B20 1-wire temperature sensors, read through Linux's w1-therm driver.

Device `configData`::

    sensor_id: 28-3c01d607e4a1   # the sensor's directory in the w1 devices directory
    w1_dir: /sys/bus/w1/devices  # where the kernel lists the bus's sensors (the default)
    timeout_s: 5                 # a read taking longer than this counts as failed

The property's visitor takes no settings (`configData: {}` or left out): the sensor measures
temperature only. One device is one sensor; several sensors on one bus are several devices,
each with its own `sensor_id` (`mapper discover` lists them and writes their devices:
devices/w1.py).

The kernel measures when the file is read: a read takes about 750 ms (12-bit resolution), so
the device loop calls it in a worker thread (`blocking`), with `timeout_s`. The kernel reads one
sensor of a bus at a time: with more than five sensors on one bus read at the same moment,
raise `timeout_s`.

`w1_slave` is read (every kernel has it, and it carries the kernel's CRC verdict and the raw
scratchpad); a kernel that offers only `temperature` (millidegrees) is read there. Every failure
is a retryable ReadError (`W1ReadError`) with a `kind`, counted in `failures` and, since the
last good reading, in `health()` (the `unhealthy` state's detail):

- `no_bus`: the w1 devices directory does not exist: the 1-wire bus is not enabled;
- `missing`: the sensor's directory is gone (the kernel removes it some searches after the
  sensor stopped answering: unplugged, a loose wire), or the id is not the sensor's;
- `crc`: the kernel's CRC check failed (`crc=.. NO`): noise on a long line, a missing pull-up;
- `no_answer`: every scratchpad byte read 00 (whose CRC passes): the data line is held low;
- `power_on`: 85000, the value the sensor holds from power-on until its first conversion: it
  reset (a weak supply, parasite power without a strong pull-up). A real 85.000 C is refused
  too; the next reading (85.0625) is not;
- `implausible`: outside -55 to 125 C, what the sensor can measure;
- `io`, `garbled`: the kernel's read failed, or returned what is not a w1-therm answer.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import ReadError
from devices.values import PropertyType

DEFAULT_W1_DIR = Path("/sys/bus/w1/devices")
# The families w1-therm reads, with the same files: DS18S20 (10), DS1822 (22), DS18B20 (28),
# DS1825 (3b), DS28EA00 (42). The kernel names the directories in lower case.
_SENSOR_ID = re.compile(r"(10|22|28|3b|42)-[0-9a-f]{12}")
# Every one of them measures -55 to +125 C.
PHYSICAL = (-55.0, 125.0)
POWER_ON_MILLIDEGREES = 85000
# A 12-bit conversion (the sensor's default resolution), which the kernel waits for at each read.
READ_MS = 750
ENABLE_BUS = ("add dtoverlay=w1-gpio to /boot/firmware/config.txt (data line on GPIO4; dtoverlay=w1-gpio,gpiopin=N"
              " for another pin) and reboot")
CHECK_WIRING = ("check the wiring: data to the w1 GPIO (GPIO4 by default), a 4.7 kOhm pull-up from data to 3.3 V,"
                " VDD to 3.3 V, GND to ground")


def _sensor_id(value: Any) -> Any:
    """`28-3C01...` as written from a label: the kernel's directory is lower case. Anything else
    that is no w1-therm id says what one looks like."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if not _SENSOR_ID.fullmatch(text):
        raise ValueError(f"{value!r} is not a 1-wire temperature sensor's id: a DS18B20's is 28- and 12 hex digits,"
                         " such as 28-3c01d607e4a1, as `ls /sys/bus/w1/devices` lists it")
    return text


def _absolute(path: Path) -> Path:
    """A relative directory would be read from wherever the mapper was started: refused."""
    if not path.is_absolute():
        raise ValueError(f"{str(path)!r} is relative: give the absolute path (the kernel's is {DEFAULT_W1_DIR})")
    return path


class Ds18b20Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sensor_id: Annotated[str, BeforeValidator(_sensor_id)]
    w1_dir: Annotated[Path, AfterValidator(_absolute)] = DEFAULT_W1_DIR
    timeout_s: float = Field(default=5.0, gt=0, le=60)


class Ds18b20Visitor(BaseModel):
    """No settings: the sensor measures temperature only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class W1ReadError(ReadError):
    """A read of a 1-wire sensor failed; `kind` is one of the module docstring's."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message, retryable=True)


class Ds18b20Driver(Driver):
    protocol = "ds18b20"
    Config = Ds18b20Config
    Visitor = Ds18b20Visitor
    blocking = True
    # The class's, for `mapper drivers`; each device's is its configData.timeout_s.
    timeout_s = 5.0

    def __init__(self, device: DeviceDefinition) -> None:
        super().__init__(device)
        self.config: Ds18b20Config
        self.timeout_s = self.config.timeout_s
        self._lock = threading.Lock()  # health() runs on the loop while a read runs in its thread
        self.measurements = 0
        self.failures: Counter[str] = Counter()
        self._streak: Counter[str] = Counter()  # failed reads since the last good one, by kind

    @classmethod
    def config_problems(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """The temperature comes in sixteenths of a degree: FLOAT or DOUBLE (an INT property failed
        at run time on every reading with a fraction)."""
        for i, prop in enumerate(device.properties):
            if prop.type not in (PropertyType.FLOAT, PropertyType.DOUBLE):
                yield (f"spec.properties[{i}].visitors",
                       f"a DS18B20 reports its temperature in sixteenths of a degree: property {prop.name!r} must be"
                       f" FLOAT or DOUBLE in DeviceModel {device.model_name!r}, not {prop.type.value}")

    @classmethod
    def config_warnings(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """A collectCycle shorter than a read (~750 ms: the kernel measures at each one): the reads
        follow one another without a pause, and the other sensors of the bus wait for each."""
        for i, prop in enumerate(device.properties):
            if prop.collect_cycle_ms < READ_MS:
                yield (f"spec.properties[{i}].collectCycle",
                       f"a DS18B20 measures at each read, which takes about {READ_MS} ms: at a collectCycle of"
                       f" {prop.collect_cycle_ms} ms the reads of {prop.name!r} follow one another without a pause"
                       f" and hold the 1-wire bus; set collectCycle: 1000 or more")

    @classmethod
    def claims(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        yield f"w1:{device.protocol_config.sensor_id}", "spec.protocol.configData.sensor_id"

    def read(self, prop: PropertyDefinition) -> float:
        try:
            celsius = self._measure()
        except W1ReadError as exc:
            with self._lock:
                self.failures[exc.kind] += 1
                self._streak[exc.kind] += 1
            raise
        with self._lock:
            self.measurements += 1
            self._streak.clear()
        return celsius

    def health(self) -> str:
        """`ok`, or the failed reads since the last good one: `crc 2, missing 1 since ...`."""
        with self._lock:
            if not self._streak:
                return "ok"
            counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self._streak.items()))
            since = "the last good reading" if self.measurements else "the device was opened"
        return f"{counts} since {since}"

    def _measure(self) -> float:
        return read_celsius(self.config.w1_dir, self.config.sensor_id, f"{self.device.id}: {self.config.sensor_id}")


# -- reading (the driver, and `mapper discover`) ---------------------------------------------


def read_celsius(w1_dir: Path, sensor_id: str, name: str) -> float:
    """One measurement of the sensor `sensor_id` listed in `w1_dir`, in degrees; W1ReadError if it
    failed (`name` opens its message)."""
    where = w1_dir / sensor_id
    slave, millidegrees = where / "w1_slave", where / "temperature"
    try:
        try:
            text, path = slave.read_text(errors="replace"), slave
        except FileNotFoundError:
            text, path = millidegrees.read_text(errors="replace"), millidegrees
    except FileNotFoundError:
        raise _missing(w1_dir, sensor_id, name) from None
    except OSError as exc:
        raise W1ReadError("io", f"{name}: cannot read {exc.filename or where}: {exc.strerror or exc}: the kernel"
                                f" could not read the sensor; {CHECK_WIRING}") from exc
    value = _parse_w1_slave(name, text) if path is slave else _parse_temperature(name, text)
    if value == POWER_ON_MILLIDEGREES:
        raise W1ReadError("power_on", f"{name}: read 85.000 C, the value a DS18B20 holds from power-on until it"
                                      " has measured: the sensor reset before this read (a weak 3.3 V supply, or"
                                      " parasite power without a strong pull-up: wire VDD to 3.3 V)")
    celsius = value / 1000
    low, high = PHYSICAL
    if not low <= celsius <= high:
        raise W1ReadError("implausible", f"{name}: {celsius:g} C is not a possible DS18B20 reading (it measures"
                                         f" {low:g} to {high:g} C); {CHECK_WIRING}")
    return celsius


def _missing(w1_dir: Path, sensor_id: str, name: str) -> W1ReadError:
    """The sensor's directory is not there: no bus at all, or not this sensor, naming those that are."""
    if (w1_dir / sensor_id).is_dir():
        return W1ReadError("io", f"{name}: {w1_dir / sensor_id} has neither w1_slave nor temperature:"
                                 " the w1-therm module is not loaded (sudo modprobe w1-therm)")
    try:
        entries = sorted(entry.name for entry in w1_dir.iterdir())
    except FileNotFoundError:
        return W1ReadError("no_bus", f"{name}: no 1-wire bus: {w1_dir} does not exist; to enable it, {ENABLE_BUS}")
    except OSError as exc:
        return W1ReadError("io", f"{name}: cannot list {w1_dir}: {exc.strerror or exc}")
    sensors = [entry for entry in entries if _SENSOR_ID.fullmatch(entry)]
    if not any(entry.startswith("w1_bus_master") for entry in entries):
        found = f" ({w1_dir} lists no bus master); to enable it, {ENABLE_BUS}"
    elif sensors:
        found = f"; on the bus now: {', '.join(sensors)} (is sensor_id one of these?)"
    else:
        found = "; the bus lists no sensor at all"
    return W1ReadError("missing", f"{name}: the sensor is not on the 1-wire bus (unplugged, or a loose wire):"
                                  f" {CHECK_WIRING}{found}")


def _parse_w1_slave(name: str, text: str) -> int:
    """Millidegrees from w1_slave's two lines::

        72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
        72 01 4b 46 7f ff 0e 10 57 t=23125
    """
    lines = text.splitlines()
    first = lines[0].split() if lines else []
    reading = re.search(r"\bt=(-?\d+)\s*$", lines[1]) if len(lines) > 1 else None
    if not first or first[-1] not in ("YES", "NO") or reading is None:
        shown = text.strip()[:120] or "nothing"
        raise W1ReadError("garbled", f"{name}: w1_slave read {shown!r}, not a w1-therm answer: the kernel's read"
                                     f" failed; {CHECK_WIRING}")
    scratchpad = [byte for byte in first if re.fullmatch(r"[0-9a-f]{2}", byte)]
    if first[-1] == "NO":
        crc = first[-2] if len(first) > 1 else "crc"
        raise W1ReadError("crc", f"{name}: CRC check failed ({crc} NO): the sensor's answer was corrupted on"
                                 " the wire: noise or a weak pull-up; check the 4.7 kOhm pull-up from data to 3.3 V"
                                 " and keep the cable short or shielded")
    if scratchpad and all(byte == "00" for byte in scratchpad):
        raise W1ReadError("no_answer", f"{name}: every byte read 00 (a CRC of zeros passes): the sensor did not"
                                       " answer, the data line is held low (a short to ground, a sensor wired"
                                       f" backwards, no supply); {CHECK_WIRING}")
    return int(reading.group(1))



def _parse_temperature(name: str, text: str) -> int:
    """Millidegrees from `temperature` (newer kernels): `23125`; empty when the kernel's read failed."""
    try:
        return int(text.strip())
    except ValueError:
        shown = text.strip()[:120] or "nothing"
        raise W1ReadError("garbled", f"{name}: temperature read {shown!r}, not millidegrees: the kernel's read"
                                     f" failed; {CHECK_WIRING}") from None
