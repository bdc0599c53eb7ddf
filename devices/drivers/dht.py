"""The `dht` protocol: DHT11 / DHT22 temperature and humidity sensors, via adafruit-circuitpython-dht.

Device `configData`::

    sensor: DHT11          # or DHT22 (AM2302)
    pin: 4                 # BCM number (physical pin 7)
    use_pulseio: false     # false = bit-banged reads: what works on a Pi 5
    min_interval_s: 2.5    # never measure more often than this
    max_age_s: 10          # a measurement older than this is never served

Each property's visitor names its half of the measurement: `{measurement: temperature}`
or `{measurement: humidity}`.

One sensor object lives as long as the device (`exit()` on close). One measurement fills
both properties: a read within `min_interval_s` of the last measurement is served from it,
if that measurement succeeded and is younger than `max_age_s`; after a failed attempt
nothing is served until the next measurement (those reads raise NotReady: recorded as error
readings, but only the failed attempt counts towards `unhealthy`). This matters because adafruit_dht silently
returns its *previous* values when asked again within 2 s, even if the last attempt failed;
the driver never asks within 2 s, so a stale value is never reported as fresh.

adafruit_dht raises bare RuntimeErrors; they are mapped in one place to `DhtReadError`
(a retryable ReadError) with a `kind` (checksum, incomplete, not_found, implausible, io)
that is counted in `failures` (all time) and in the current run of failures, which
`health()` summarises for the `unhealthy` state's detail. Readings no DHT can produce (below
-40 or above 80 C, outside 0-100 %RH) are refused; readings outside the sensor's rated range
(DHT11 0-50 C, 20-90 %RH; DHT22 -40-80 C, 0-100 %RH) are returned, and the device loop
records them out_of_range through `rated_range()`, whatever the model's minimum/maximum say.
A DHT11's temperature below zero keeps its sign (`signed_dht11`: adafruit_dht 4.0 drops it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import DriverError, NotReady, ReadError
from devices.pins import BcmPin
from devices.values import PropertyType

log = logging.getLogger("mapper.dht")

# adafruit_dht re-measures only if more than this has passed since its previous call.
LIBRARY_INTERVAL_S = 2.0


@dataclass(frozen=True, slots=True)
class SensorRange:
    temperature: tuple[float, float]
    humidity: tuple[float, float]


# Datasheet operating ranges.
RATED = {"DHT11": SensorRange((0.0, 50.0), (20.0, 90.0)), "DHT22": SensorRange((-40.0, 80.0), (0.0, 100.0))}
# What any DHT can report at all; beyond this a reading is corruption that passed the checksum.
PHYSICAL = SensorRange((-40.0, 80.0), (0.0, 100.0))

# adafruit_dht's messages -> our failure kinds.
_KINDS = (
    ("checksum", "checksum"),
    ("full buffer", "incomplete"),
    ("not found", "not_found"),
    ("unplausible", "implausible"),
)


class DhtReadError(ReadError):
    """A DHT read failed; `kind` is checksum, incomplete, not_found, implausible, io or other."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message, retryable=True)


def _sensor_sold_as(value: Any) -> Any:
    """An AM2302 is a DHT22 in a case with its wires (mqtt-io takes `am2302`): say what to write."""
    if isinstance(value, str) and value.strip().upper() == "AM2302":
        raise ValueError(f"an {value} is a DHT22 (the same sensor, wired): write sensor: DHT22")
    return value


class DhtConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sensor: Annotated[Literal["DHT11", "DHT22"], BeforeValidator(_sensor_sold_as)] = "DHT11"
    pin: BcmPin
    use_pulseio: bool = False
    min_interval_s: float = Field(default=2.5, gt=LIBRARY_INTERVAL_S)
    max_age_s: float = Field(default=10.0, gt=0)


class DhtVisitor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    measurement: Literal["temperature", "humidity"]


@dataclass(frozen=True, slots=True)
class Measurement:
    temperature: float
    humidity: float
    taken_at: float


# One import with stdout redirected at a time (_prints_logged): stdout is the process's.
_IMPORTING = threading.Lock()


@contextlib.contextmanager
def _prints_logged() -> Iterator[None]:
    """Blinka prints its warnings to stdout as it is imported (`WARNING: GENERIC_X86 is not fully
    supported. ...` on a machine that is not a Pi, twice), outside the mapper's log: each line goes
    into the log instead, once. A line another thread prints meanwhile is logged too, not lost."""
    captured = io.StringIO()
    with _IMPORTING:
        try:
            with contextlib.redirect_stdout(captured):
                yield
        finally:
            for line in dict.fromkeys(text.strip() for text in captured.getvalue().splitlines()):
                if line:
                    log.warning("Blinka (adafruit_dht's library), as it was imported: %s", line.removeprefix("WARNING: "))


def board_pin(bcm: int) -> Any:
    """The Blinka pin object for a BCM number (`board.D4` for 4)."""
    try:
        with _prints_logged():
            import board  # noqa: PLC0415 - lazy: Blinka detects the board on import
    except (ImportError, NotImplementedError, RuntimeError) as exc:
        raise DriverError(f"cannot load Blinka's `board` ({exc}); install the `pi` extra on a Raspberry Pi") from exc
    try:
        return getattr(board, f"D{bcm}")
    except AttributeError:
        board_id = getattr(board, "board_id", "?")
        if not any(name[:1] == "D" and name[1:].isdigit() for name in dir(board)):
            # A laptop or a PC (GENERIC_LINUX_PC): Blinka knows no GPIO pins here at all.
            raise DriverError(
                f"this machine is not a Raspberry Pi (Blinka detects board {board_id}, which has no GPIO pins),"
                " so no DHT can be read here; to try the device on it, run it on the simulated driver"
                " (protocolName: simulated, visitors configData {kind: temperature} and {kind: humidity},"
                " as devices/examples/room-sensor.yaml)") from None
        raise DriverError(f"this board ({board_id}) has no pin D{bcm}") from None


def _import_library() -> Any:
    try:
        with _prints_logged():
            import adafruit_dht  # noqa: PLC0415 - lazy: a laptop runs without the Pi extra
    except ImportError as exc:
        from devices.extras import install_extra

        raise DriverError(f"adafruit_dht is not installed ({exc}): install the `pi` extra ({install_extra('pi')})") from exc
    return adafruit_dht


_SIGNED_DHT11: weakref.WeakKeyDictionary[Any, type] = weakref.WeakKeyDictionary()  # library module -> subclass


def signed_dht11(library: Any) -> type:
    """`library.DHT11`, keeping the sign of a temperature below zero.

    Newer DHT11s (rated -20-60 C) send one with bit 7 of the tenths byte set; adafruit_dht 4.0
    decodes a DHT11 as integral + (tenths & 0x0F) / 10 and drops it, so -2.5 C reads +2.5 C
    and looks good. The subclass notes the five bytes as the library decodes them and applies
    the sign after the library's own checks; a library that keeps the sign itself is left alone.
    """
    cls = _SIGNED_DHT11.get(library)
    if cls is not None:
        return cls

    class SignedDHT11(library.DHT11):  # type: ignore[misc,name-defined]
        def measure(self) -> None:
            self._frame_bytes: list[int] = []
            super().measure()
            frame = self._frame_bytes
            # Five bytes: this call decoded a new frame (within 2 s the library serves its last one).
            if len(frame) == 5 and frame[3] & 0x80 and self._temperature is not None and self._temperature > 0:
                self._temperature = -self._temperature

        def _pulses_to_binary(self, pulses: Any, start: int, stop: int) -> int:
            value = super()._pulses_to_binary(pulses, start, stop)
            getattr(self, "_frame_bytes", []).append(value)
            return value

    _SIGNED_DHT11[library] = SignedDHT11
    return SignedDHT11


@contextlib.contextmanager
def adafruit_errors(where: str) -> Iterator[None]:
    """Map adafruit_dht's bare exceptions to DhtReadError (the one boundary)."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        kind = next((k for needle, k in _KINDS if needle in text.lower()), "other")
        raise DhtReadError(kind, f"{where}: {text}") from exc
    except OSError as exc:
        raise DhtReadError("io", f"{where}: {exc}") from exc


class DhtDriver(Driver):
    protocol = "dht"
    # Blinka and what it loads for a Pi's pins (adafruit_dht reads pulses through them).
    lazy_modules = ("adafruit_dht", "board", "digitalio", "microcontroller", "pulseio", "adafruit_blinka",
                    "adafruit_platformdetect", "RPi", "lgpio", "gpiod")
    Config = DhtConfig
    Visitor = DhtVisitor
    blocking = True
    # A bit-banged read takes ~0.4 s (0.1 s wake-up, 18 ms start, 0.25 s listening).
    timeout_s = 3.0

    def __init__(
        self,
        device: DeviceDefinition,
        *,
        library: Any = None,
        pin_factory: Callable[[int], Any] = board_pin,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        library: the adafruit_dht module (imported on open when not given); tests pass a
            copy whose lowest hardware layer is fake.
        pin_factory: BCM number -> the pin object the library takes.
        clock: must be the clock the library uses (time.monotonic), see LIBRARY_INTERVAL_S.
        """
        super().__init__(device)
        self.config: DhtConfig
        self._library = library
        self._pin_factory = pin_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._sensor: Any = None
        self._measurement: Measurement | None = None
        self._last_attempt: float | None = None
        self._last_error: DhtReadError | None = None
        self.measurements = 0
        self.failures: Counter[str] = Counter()
        # Failed measurements since the last good one, by kind.
        self._streak: Counter[str] = Counter()

    @classmethod
    def config_problems(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """Temperature comes in tenths: FLOAT or DOUBLE. A DHT11's humidity is whole percent, so
        INT works for it too; a DHT22's has tenths. (An INT property failed at run time on every
        reading with a fraction.)"""
        sensor = getattr(device.protocol_config, "sensor", "DHT11")
        for i, prop in enumerate(device.properties):
            allowed = [PropertyType.FLOAT, PropertyType.DOUBLE]
            if sensor == "DHT11" and getattr(prop.visitor, "measurement", None) == "humidity":
                allowed.append(PropertyType.INT)
            if prop.type not in allowed:
                yield (f"spec.properties[{i}].visitors",
                       f"a {sensor} reports its {getattr(prop.visitor, 'measurement', 'value')} in tenths: property "
                       f"{prop.name!r} must be FLOAT or DOUBLE in DeviceModel {device.model_name!r}, "
                       f"not {prop.type.value}")

    @classmethod
    def config_warnings(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """A collectCycle below `min_interval_s` (the README's 1000, or a cycle left out): the
        reads in between are served from the last measurement, each recorded as a new reading
        with its own time, so most of the readings repeat an older measurement."""
        interval_s = getattr(device.protocol_config, "min_interval_s", 2.5)
        written = device.device.spec.properties
        for i, prop in enumerate(device.properties):
            reads = math.ceil(interval_s * 1000 / prop.collect_cycle_ms)
            if reads < 2:
                continue
            note = "" if i < len(written) and written[i].collect_cycle else " (0 or left out: 1000)"
            yield (f"spec.properties[{i}].collectCycle",  # (left out: the loader gives the property's line)
                   f"a DHT is measured at most every {interval_s:g} s (configData.min_interval_s), so at a"
                   f" collectCycle of {prop.collect_cycle_ms} ms{note} {reads - 1} of"
                   f" every {reads} readings of {prop.name!r} repeat the last measurement as a new reading;"
                   f" set collectCycle: {math.ceil(interval_s) * 1000} or more")

    @classmethod
    def not_installed(cls, device: DeviceDefinition) -> str | None:
        from devices.extras import install_extra, missing_modules

        if not (missing := missing_modules("adafruit_dht", "board")):
            return None
        return (f"needs {' and '.join(missing)} (adafruit-circuitpython-dht, Blinka), not installed here: install the"
                f" `pi` extra ({install_extra('pi')})")

    @classmethod
    def claims(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        yield f"gpio:{device.protocol_config.pin}", "spec.protocol.configData.pin"

    def open(self) -> None:
        library = self._library if self._library is not None else _import_library()
        pin = self._pin_factory(self.config.pin)
        sensor_cls = signed_dht11(library) if self.config.sensor == "DHT11" else getattr(library, self.config.sensor)
        with adafruit_errors(f"{self.device.id}: cannot open {self.config.sensor} on GPIO{self.config.pin}"):
            self._sensor = sensor_cls(pin, use_pulseio=self.config.use_pulseio)

    def close(self) -> None:
        with self._lock:
            sensor, self._sensor = self._sensor, None
        if sensor is not None:
            sensor.exit()

    def read(self, prop: PropertyDefinition) -> float:
        measurement = self._current()
        return measurement.temperature if prop.visitor.measurement == "temperature" else measurement.humidity

    def health(self) -> str:
        """`ok`, or the failed measurements since the last good one: `checksum 2, incomplete 1 since ...`."""
        if self._last_error is None:
            return "ok"
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self._streak.items()))
        since = "the last good measurement" if self.measurements else "the sensor was opened"
        return f"{counts} since {since}"

    def rated_range(self, prop: PropertyDefinition) -> tuple[float, float]:
        return getattr(RATED[self.config.sensor], prop.visitor.measurement)

    # -- measuring -------------------------------------------------------------------------

    def _current(self) -> Measurement:
        with self._lock:
            if self._sensor is None:
                raise ReadError(f"{self.device.id}: sensor is not open", retryable=True)
            now = self._clock()
            if self._last_attempt is None or now - self._last_attempt >= self.config.min_interval_s:
                return self._measure()
            wait = self.config.min_interval_s - (now - self._last_attempt)
            if self._last_error is not None or self._measurement is None:
                raise NotReady(f"no measurement since the last attempt failed ({self._last_error}); "
                               f"next attempt in {wait:.1f} s")
            age = now - self._measurement.taken_at
            if age > self.config.max_age_s:
                raise ReadError(
                    f"{self.device.id}: last measurement is {age:.1f} s old (max_age_s {self.config.max_age_s:g});"
                    f" next attempt in {wait:.1f} s", retryable=True)
            return self._measurement

    def _measure(self) -> Measurement:
        try:
            with adafruit_errors(f"{self.device.id}: {self.config.sensor} on GPIO{self.config.pin}"):
                # The first property starts a measurement; the second is the library's cache of it.
                temperature = self._sensor.temperature
                humidity = self._sensor.humidity
            measurement = Measurement(float(temperature), float(humidity), self._clock())
            self._check_physical(measurement)
        except DhtReadError as exc:
            self._last_error = exc
            self.failures[exc.kind] += 1
            self._streak[exc.kind] += 1
            raise
        finally:
            # Taken after the call: the library stamps its own start earlier, so "more than
            # min_interval_s since this" is always more than 2 s for the library too.
            self._last_attempt = self._clock()
        self._measurement, self._last_error = measurement, None
        self._streak.clear()
        self.measurements += 1
        return measurement

    def _check_physical(self, m: Measurement) -> None:
        (t_lo, t_hi), (h_lo, h_hi) = PHYSICAL.temperature, PHYSICAL.humidity
        if not (t_lo <= m.temperature <= t_hi and h_lo <= m.humidity <= h_hi):
            raise DhtReadError(
                "implausible",
                f"{self.device.id}: {m.temperature:g} C / {m.humidity:g} %RH is not a possible DHT reading"
                f" (limits {t_lo:g}-{t_hi:g} C, {h_lo:g}-{h_hi:g} %RH): check the wiring and the pull-up",
            )
