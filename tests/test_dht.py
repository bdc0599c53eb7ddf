"""The `dht` driver running the real adafruit_dht code against a modelled data line.

Where the fake sits: adafruit_dht talks to hardware through three names only, all
imported at the top of its module: `digitalio.DigitalInOut` (the bit-banged path: it drives
the start signal, then samples `.value` in a loop and stamps each transition with
`time.monotonic()`), `pulseio.PulseIn` (the pulseio path: a helper that hands back pulse
widths) and `time`. Each test loads a private copy of the installed adafruit_dht module
(`importlib` + `exec_module`) whose imports of `digitalio`, `pulseio` and `microcontroller`
resolve to this file's `DhtWire` (through the copy's own `__import__`), and whose `time` is a
virtual clock. Nothing global is patched, and everything above that layer (the start signal,
the transition loop, pulse-to-bit decoding, the checksum, the 2 s cache) is the library's
own code. `measure()` is never faked.

The wire answers a start signal at least 18 ms long (DHT11; 1 ms for DHT22) with the
datasheet frame: 80 us low, 80 us high, then per bit 50 us low and 26-28 us (0) or 70 us (1)
high, then 50 us low and release; 40 bits = humidity, humidity decimal, temperature,
temperature decimal, checksum. Every sample of `.value` costs 1 us of virtual time while
the frame is on the line (a fast host), and 100 us once the sensor has released it, when
the level can no longer change; that keeps the library's 0.25 s listening loop fast.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib.util
import re
from collections import deque
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from devices.definitions import DeviceDefinition
from devices.drivers.dht import RATED, DhtDriver, DhtReadError
from devices.errors import DefinitionError, DriverError, ReadError
from devices.ids import DeviceId
from devices.loader import load
from mapper.config import DeviceLoopSettings
from mapper.device_loop import DeviceRunner
from twin.records import GOOD, OUT_OF_RANGE

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "devices/examples/pi/room-sensor-dht.yaml"
SENSOR_ID = DeviceId("default", "room-sensor-pi")

# Datasheet timings, microseconds.
HOST_RELEASE_US = 30
RESPONSE_LOW_US = RESPONSE_HIGH_US = 80
BIT_LOW_US = 50
ZERO_HIGH_US, ONE_HIGH_US = 27, 70
START_MIN_US = {"DHT11": 18_000, "DHT22": 1_000}


def checksum(data: list[int]) -> int:
    return sum(data) & 0xFF


def dht11_frame(humidity: int, temperature: int, tenths: int = 0) -> list[int]:
    data = [humidity, 0, temperature, tenths]
    return [*data, checksum(data)]


def dht22_frame(humidity: float, temperature: float) -> list[int]:
    h, t = round(humidity * 10), round(abs(temperature) * 10)
    data = [h >> 8, h & 0xFF, (t >> 8) | (0x80 if temperature < 0 else 0), t & 0xFF]
    return [*data, checksum(data)]


def pulse_train(frame: list[int], bits: int = 40) -> list[tuple[bool, int]]:
    """(level, microseconds) segments the sensor puts on the line after the host releases it."""
    segments = [(True, HOST_RELEASE_US), (False, RESPONSE_LOW_US), (True, RESPONSE_HIGH_US)]
    stream = [(byte >> (7 - i)) & 1 for byte in frame for i in range(8)][:bits]
    for bit in stream:
        segments += [(False, BIT_LOW_US), (True, ONE_HIGH_US if bit else ZERO_HIGH_US)]
    if bits == 40:
        segments.append((False, BIT_LOW_US))  # the closing low, then the sensor lets go
    return segments


class VirtualClock:
    def __init__(self) -> None:
        self.now = 500.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DhtWire:
    """A DHT sensor on one data line with a pull-up, seen through Blinka's digitalio/pulseio API."""

    PIN = ("GPIO", 4)

    def __init__(self, clock: VirtualClock, sensor: str = "DHT11") -> None:
        self.clock = clock
        self.sensor = sensor
        self.frame: list[int] | None = dht11_frame(45, 23)
        self.bits = 40
        self.starts = 0  # start signals the sensor answered
        self.pulsein_deinit = False
        self._answer: tuple[float, list[tuple[bool, int]]] | None = None

    def pin_for(self, bcm: int) -> tuple[str, int]:
        return ("GPIO", bcm)

    # -- the sensor's side -------------------------------------------------------------------

    def host_released(self, pin: Any, low_us: float) -> None:
        """The host ends its start signal; a connected, powered sensor answers if it was long enough."""
        self._answer = None
        if pin == self.PIN and self.frame is not None and low_us >= START_MIN_US[self.sensor] - 1:
            self.starts += 1
            self._answer = (self.clock.now, pulse_train(self.frame, self.bits))

    def level_at(self, t: float) -> tuple[bool, bool]:
        """(level, frame still on the line) at virtual time `t`."""
        if self._answer is None:
            return True, False  # the pull-up holds an idle line high
        elapsed_us = (t - self._answer[0]) * 1e6
        for level, length in self._answer[1]:
            if elapsed_us < length:
                return level, True
            elapsed_us -= length
        return True, False

    # -- what adafruit_dht imports -------------------------------------------------------------

    def modules(self) -> dict[str, Any]:
        wire = self

        class DigitalInOut:
            def __init__(self, pin: Any) -> None:
                self.pin, self.output, self._value, self._low_since = pin, False, True, None

            def __enter__(self) -> DigitalInOut:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            @property
            def direction(self) -> str:
                return "output" if self.output else "input"

            @direction.setter
            def direction(self, direction: str) -> None:
                if self.output and direction == "input" and self._low_since is not None:
                    wire.host_released(self.pin, (wire.clock.now - self._low_since) * 1e6)
                self.output = direction == "output"

            @property
            def value(self) -> bool:
                level, busy = wire.level_at(wire.clock.now)
                wire.clock.advance(1e-6 if busy else 1e-4)  # the cost of one sample
                return level

            @value.setter
            def value(self, level: bool) -> None:
                self._low_since = None if level else wire.clock.now

            pull = None

        class PulseIn:
            def __init__(self, pin: Any, maxlen: int, idle_state: bool) -> None:
                self.pin, self.pulses = pin, deque(maxlen=maxlen)

            def pause(self) -> None:
                pass

            def clear(self) -> None:
                self.pulses.clear()

            def resume(self, trigger_us: int) -> None:
                wire.host_released(self.pin, trigger_us)
                if wire._answer is not None:
                    self.pulses.extend(length for _, length in wire._answer[1][1:])

            def popleft(self) -> int:
                return self.pulses.popleft()

            def __len__(self) -> int:
                return len(self.pulses)

            def deinit(self) -> None:
                wire.pulsein_deinit = True

        return {
            "digitalio": SimpleNamespace(
                DigitalInOut=DigitalInOut,
                Direction=SimpleNamespace(OUTPUT="output", INPUT="input"),
                Pull=SimpleNamespace(UP="up", DOWN="down"),
            ),
            "pulseio": SimpleNamespace(PulseIn=PulseIn),
            "microcontroller": SimpleNamespace(Pin=object),
        }


def adafruit_dht_on(wire: DhtWire) -> ModuleType:
    """A private copy of the installed adafruit_dht whose hardware imports and clock are the wire's."""
    spec = importlib.util.find_spec("adafruit_dht")
    assert spec is not None and spec.loader is not None, "adafruit-circuitpython-dht is not installed"
    module = importlib.util.module_from_spec(spec)
    fakes = wire.modules()

    def _import(name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if name in fakes:
            return fakes[name]
        return builtins.__import__(name, globals_, locals_, fromlist, level)

    module.__builtins__ = {**vars(builtins), "__import__": _import}
    spec.loader.exec_module(module)
    module.time = SimpleNamespace(monotonic=wire.clock.monotonic, sleep=wire.clock.sleep)
    return module


def sensor_definition(tmp_path: Path, *, model_range: bool = True, **config: Any) -> DeviceDefinition:
    """The shipped example device, with `configData` keys overridden (written to tmp_path/sensor.yaml).

    `model_range=False` drops the model's minimum/maximum.
    """
    text = EXAMPLE.read_text()
    if not model_range:
        text = re.sub(r"\n +(minimum|maximum): .*", "", text)
    block = re.search(r"\n    configData:\n((?:      .*\n)+)", text)
    assert block is not None
    lines = [line for line in block.group(1).splitlines(keepends=True) if line.split(":")[0].strip() not in config]
    lines += [f"      {key}: {value}\n" for key, value in config.items()]
    (tmp_path / "sensor.yaml").write_text(text[: block.start(1)] + "".join(lines) + text[block.end(1):])
    return load([tmp_path], base=tmp_path).devices[SENSOR_ID]


def line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(f"{key}:"))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def wire(clock: VirtualClock) -> DhtWire:
    return DhtWire(clock)


def open_driver(defn: DeviceDefinition, wire: DhtWire) -> DhtDriver:
    driver = DhtDriver(defn, library=adafruit_dht_on(wire), pin_factory=wire.pin_for, clock=wire.clock.monotonic)
    driver.open()
    return driver


def read_both(driver: DhtDriver, defn: DeviceDefinition) -> tuple[float, float]:
    return driver.read(defn.prop("temperature")), driver.read(defn.prop("humidity"))


def test_dht11_known_values_one_measurement_fills_both(tmp_path: Path, wire: DhtWire) -> None:
    """23 C / 45 %RH on the wire decode to exactly that, from a single start signal."""
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    assert read_both(driver, defn) == (23.0, 45.0)
    assert wire.starts == 1
    assert driver.measurements == 1
    assert driver.health() == "ok"


def test_dht11_tenths_and_next_measurement_after_interval(tmp_path: Path, wire: DhtWire, clock: VirtualClock) -> None:
    """Within min_interval_s the cached measurement is served; after it, the sensor is measured again."""
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    read_both(driver, defn)
    wire.frame = dht11_frame(52, 24, tenths=6)
    clock.advance(1.0)
    assert read_both(driver, defn) == (23.0, 45.0)
    clock.advance(2.0)
    assert read_both(driver, defn) == (24.6, 52.0)
    assert wire.starts == 2


def test_dht22_negative_temperature(tmp_path: Path, clock: VirtualClock) -> None:
    """A DHT22 frame with the sign bit set decodes to -3.5 C / 61.2 %RH."""
    wire = DhtWire(clock, sensor="DHT22")
    wire.frame = dht22_frame(61.2, -3.5)
    defn = sensor_definition(tmp_path, sensor="DHT22")
    driver = open_driver(defn, wire)
    assert read_both(driver, defn) == (-3.5, 61.2)


def test_dht11_below_zero_keeps_its_sign(tmp_path: Path, wire: DhtWire, clock: VirtualClock) -> None:
    """Newer DHT11s (rated -20-60 C) send a temperature below zero with bit 7 of the tenths byte
    set: 2 C and 0x85 is -2.5 C. adafruit_dht 4.0 reads that DHT11 frame as +2.5 C; the driver
    keeps the sign, flips a served measurement only once, and leaves a positive one alone."""
    wire.frame = dht11_frame(71, 2, tenths=0x85)
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    assert read_both(driver, defn) == (-2.5, 71.0)
    clock.advance(1.0)  # served from the same measurement: still negative, not flipped twice
    assert read_both(driver, defn) == (-2.5, 71.0)
    wire.frame = dht11_frame(70, 0, tenths=0x83)
    clock.advance(2.0)
    assert read_both(driver, defn) == (-0.3, 70.0)
    wire.frame = dht11_frame(69, 1, tenths=2)
    clock.advance(3.0)
    assert read_both(driver, defn) == (1.2, 69.0)


def test_pulseio_path_decodes_and_exit_releases_helper(tmp_path: Path, wire: DhtWire) -> None:
    """use_pulseio: the same frame arrives as PulseIn widths; close() calls exit(), which deinits PulseIn."""
    defn = sensor_definition(tmp_path, use_pulseio="true")
    driver = open_driver(defn, wire)
    assert read_both(driver, defn) == (23.0, 45.0)
    assert not wire.pulsein_deinit
    driver.close()
    assert wire.pulsein_deinit
    with pytest.raises(ReadError, match="not open"):
        driver.read(defn.prop("temperature"))


def test_corrupted_checksum_is_a_counted_retryable_error(tmp_path: Path, wire: DhtWire, clock: VirtualClock) -> None:
    """A frame whose checksum does not match is refused; neither property gets a value from it."""
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    frame = dht11_frame(45, 23)
    frame[4] ^= 0x01
    wire.frame = frame
    with pytest.raises(DhtReadError, match="Checksum did not validate") as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == "checksum"
    assert info.value.retryable
    with pytest.raises(ReadError, match="next attempt in"):
        driver.read(defn.prop("humidity"))
    assert driver.failures == {"checksum": 1}
    assert "checksum" in driver.health()


def test_a_failed_attempt_never_serves_the_older_value(tmp_path: Path, wire: DhtWire, clock: VirtualClock) -> None:
    """Good read, then a failure: reads before the next attempt fail instead of repeating the old value.

    adafruit_dht itself would return the old 23 C here without error (its 2 s cache).
    """
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    assert read_both(driver, defn) == (23.0, 45.0)
    clock.advance(3.0)
    wire.bits = 30
    with pytest.raises(DhtReadError):
        driver.read(defn.prop("temperature"))
    clock.advance(1.9)
    with pytest.raises(ReadError, match="A full buffer was not returned"):
        driver.read(defn.prop("temperature"))
    wire.bits = 40
    clock.advance(1.0)
    assert read_both(driver, defn) == (23.0, 45.0)
    assert driver.health() == "ok"


def test_one_failed_measurement_does_not_make_the_sensor_unhealthy(tmp_path: Path, wire: DhtWire,
                                                                    clock: VirtualClock) -> None:
    """A DHT read every second (faster than it may measure) and one checksum error: the reads until
    the next measurement is allowed say so, but only the failed measurement counts. The device
    stays `ok` and the next measurement is read on time. Those waiting reads used to count as
    failures too: one checksum error made the sensor unhealthy and backed its reads off."""
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    prop = defn.prop("temperature")
    states: list[str] = []

    async def on_state(_: Any, state: str, detail: str | None) -> None:
        states.append(state)

    async def scenario() -> list:
        runner = DeviceRunner(defn, driver, lambda _: None, settings=DeviceLoopSettings(failure_threshold=3),
                              on_state=on_state, on_applied=_nothing)
        readings = [await runner.read_once(prop)]
        bad = dht11_frame(45, 23)
        bad[4] ^= 0x01
        for frame in (bad, bad, bad, dht11_frame(45, 23)):  # one per second: 3, 4, 5, 6 s
            clock.advance(1.0 if readings[1:] else 3.0)
            wire.frame = frame
            readings.append(await runner.read_once(prop))
        assert runner.state == "ok" and runner.failures == 0
        return readings

    readings = asyncio.run(scenario())
    assert [r.quality for r in readings] == [GOOD, "error", "error", "error", GOOD]
    assert "Checksum did not validate" in readings[1].detail
    assert readings[2].detail.startswith("no measurement since the last attempt failed (") and \
        "next attempt in 1.5 s" in readings[2].detail
    assert driver.failures == {"checksum": 1}
    assert "unhealthy" not in states


def test_missing_pulses_and_missing_sensor(tmp_path: Path, wire: DhtWire, clock: VirtualClock) -> None:
    """A frame cut short is `incomplete`; no answer at all is `not_found`; both are counted."""
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    wire.bits = 24
    with pytest.raises(DhtReadError, match="full buffer") as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == "incomplete"
    clock.advance(3.0)
    wire.frame = None
    with pytest.raises(DhtReadError, match="check wiring") as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == "not_found"
    assert driver.failures == {"incomplete": 1, "not_found": 1}


def test_wrong_pin_finds_no_sensor(tmp_path: Path, wire: DhtWire) -> None:
    """The driver hands the library the configured BCM pin: on GPIO17 nothing answers."""
    defn = sensor_definition(tmp_path, pin=17)
    driver = open_driver(defn, wire)
    with pytest.raises(DhtReadError) as info:
        driver.read(defn.prop("humidity"))
    assert info.value.kind == "not_found"
    assert wire.starts == 0


def test_impossible_values_are_refused(tmp_path: Path, wire: DhtWire) -> None:
    """A frame with a valid checksum but 200 C is refused as implausible, not published."""
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    wire.frame = dht11_frame(45, 200)
    with pytest.raises(DhtReadError, match="not a possible DHT reading") as info:
        driver.read(defn.prop("temperature"))
    assert info.value.kind == "implausible"


def test_max_age_limits_how_long_a_measurement_is_served(tmp_path: Path, wire: DhtWire, clock: VirtualClock) -> None:
    """With min_interval_s 60 and max_age_s 5, a measurement is served for 5 s, then refused until the next one."""
    defn = sensor_definition(tmp_path, min_interval_s=60, max_age_s=5)
    driver = open_driver(defn, wire)
    assert driver.read(defn.prop("temperature")) == 23.0
    clock.advance(4.0)
    assert driver.read(defn.prop("temperature")) == 23.0
    clock.advance(2.0)
    with pytest.raises(ReadError, match=r"old \(max_age_s 5\)"):
        driver.read(defn.prop("temperature"))
    clock.advance(60.0)
    assert driver.read(defn.prop("temperature")) == 23.0
    assert wire.starts == 2


def test_out_of_rated_range_is_flagged_by_the_device_loop(tmp_path: Path, wire: DhtWire) -> None:
    """55 C is possible but beyond the DHT11's rating: the loop records it out_of_range, 45 %RH stays good."""
    defn = sensor_definition(tmp_path)
    wire.frame = dht11_frame(45, 55)
    driver = open_driver(defn, wire)

    async def collect() -> list[Any]:
        async def nothing(*_: Any) -> None:
            return None

        runner = DeviceRunner(defn, driver, lambda _: None, settings=DeviceLoopSettings(),
                              on_state=nothing, on_applied=nothing)
        return [await runner.read_once(defn.prop("temperature")), await runner.read_once(defn.prop("humidity"))]

    temperature, humidity = asyncio.run(collect())
    assert (temperature.value, temperature.quality) == (55.0, OUT_OF_RANGE)
    assert (humidity.value, humidity.quality) == (45.0, GOOD)


def test_shipped_example_matches_the_sensor(tmp_path: Path) -> None:
    """The Pi example validates against the driver, defaults to bit-banging, and its model ranges are the DHT11's."""
    defn = load([EXAMPLE]).devices[SENSOR_ID]
    assert (defn.protocol_config.sensor, defn.protocol_config.pin, defn.protocol_config.use_pulseio) == ("DHT11", 4, False)
    rated = RATED["DHT11"]
    assert (defn.prop("temperature").minimum, defn.prop("temperature").maximum) == rated.temperature
    assert (defn.prop("humidity").minimum, defn.prop("humidity").maximum) == rated.humidity
    assert list(DhtDriver.claims(defn)) == [("gpio:4", "spec.protocol.configData.pin")]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"pin": 30}, "configData.pin: GPIO30 is not a BCM pin"),
        ({"min_interval_s": 1}, "configData.min_interval_s: must be > 2.0"),
        ({"sensor": "DHT99"}, "configData.sensor: 'DHT99' is not allowed"),
        # sold as both; mqtt-io takes am2302
        ({"sensor": "AM2302"}, "configData.sensor: an AM2302 is a DHT22 (the same sensor, wired): write sensor: DHT22"),
    ],
)
def test_config_errors_name_file_line_and_fix(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    """Invalid sensor settings are FILE:LINE definition errors."""
    with pytest.raises(DefinitionError) as info:
        sensor_definition(tmp_path, **config)
    [key] = config
    assert f"sensor.yaml:{line_of(tmp_path / 'sensor.yaml', key)}: spec.protocol.{message}" in str(info.value)


def test_dht_properties_must_hold_their_tenths(tmp_path: Path) -> None:
    """Temperature comes in tenths: an INT property is a definition error (its readings with a
    fraction used to fail, one by one, at run time). A DHT11's humidity is whole percent: INT
    is fine there, not on a DHT22."""
    text = EXAMPLE.read_text()
    (tmp_path / "sensor.yaml").write_text(text.replace("type: FLOAT", "type: INT", 1))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert "spec.properties[0].visitors: a DHT11 reports its temperature in tenths: property 'temperature' must be " \
        "FLOAT or DOUBLE" in str(info.value)
    assert str(info.value).startswith("sensor.yaml:")
    humidity_int = text.replace("type: FLOAT", "type: INT").replace("type: INT", "type: FLOAT", 1)
    (tmp_path / "sensor.yaml").write_text(humidity_int)
    assert load([tmp_path], base=tmp_path).devices[SENSOR_ID].prop("humidity").type.value == "INT"
    (tmp_path / "sensor.yaml").write_text(humidity_int.replace("sensor: DHT11", "sensor: DHT22"))
    with pytest.raises(DefinitionError, match="a DHT22 reports its humidity in tenths: property 'humidity'"):
        load([tmp_path], base=tmp_path)


def test_open_without_board_support_is_a_driver_error(tmp_path: Path, wire: DhtWire) -> None:
    """A pin the board cannot provide fails open() with a readable DriverError, which the loop retries."""
    defn = sensor_definition(tmp_path)

    def no_such_pin(bcm: int) -> Any:
        raise DriverError(f"this board has no pin D{bcm}")

    driver = DhtDriver(defn, library=adafruit_dht_on(wire), pin_factory=no_such_pin)
    with pytest.raises(DriverError, match="no pin D4"):
        driver.open()



async def _nothing(*_: Any) -> None:
    return None


def read_in_loop(defn: DeviceDefinition, driver: DhtDriver) -> list[Any]:
    """Both properties through DeviceRunner.read_once, as the device loop reads them."""
    async def collect() -> list[Any]:
        runner = DeviceRunner(defn, driver, lambda _: None, settings=DeviceLoopSettings(),
                              on_state=_nothing, on_applied=_nothing)
        return [await runner.read_once(defn.prop("temperature")), await runner.read_once(defn.prop("humidity"))]

    return asyncio.run(collect())


def test_rated_range_is_flagged_without_a_model_range(tmp_path: Path, wire: DhtWire) -> None:
    """A model with no minimum/maximum: 55 C and 95 %RH from a DHT11 are out_of_range by its rating."""
    defn = sensor_definition(tmp_path, model_range=False)
    assert defn.prop("temperature").maximum is None and defn.prop("humidity").maximum is None
    wire.frame = dht11_frame(95, 55)
    driver = open_driver(defn, wire)
    assert driver.rated_range(defn.prop("temperature")) == (0.0, 50.0)
    temperature, humidity = read_in_loop(defn, driver)
    assert (temperature.value, temperature.quality) == (55.0, OUT_OF_RANGE)
    assert temperature.detail == "55.0 is outside the sensor's rated range 0 to 50"
    assert (humidity.value, humidity.quality) == (95.0, OUT_OF_RANGE)
    assert humidity.detail == "95.0 is outside the sensor's rated range 20 to 90"


def test_rated_range_follows_the_sensor_type(tmp_path: Path, clock: VirtualClock) -> None:
    """The same 55 C is within a DHT22's rating (-40 to 80 C): good."""
    wire = DhtWire(clock, sensor="DHT22")
    wire.frame = dht22_frame(45.0, 55.0)
    defn = sensor_definition(tmp_path, model_range=False, sensor="DHT22")
    temperature, humidity = read_in_loop(defn, open_driver(defn, wire))
    assert (temperature.value, temperature.quality) == (55.0, GOOD)
    assert (humidity.value, humidity.quality) == (45.0, GOOD)


def test_unhealthy_detail_summarises_the_failed_measurements(tmp_path: Path, wire: DhtWire, clock: VirtualClock) -> None:
    """Three failed measurements in a row: the unhealthy detail counts them by kind; a good read clears it."""
    defn = sensor_definition(tmp_path)
    driver = open_driver(defn, wire)
    prop = defn.prop("temperature")
    states: list[tuple[str, str | None]] = []

    async def on_state(_: Any, state: str, detail: str | None) -> None:
        states.append((state, detail))

    async def scenario() -> None:
        runner = DeviceRunner(defn, driver, lambda _: None, settings=DeviceLoopSettings(failure_threshold=3),
                              on_state=on_state, on_applied=_nothing)
        assert (await runner.read_once(prop)).quality == GOOD
        bad = dht11_frame(45, 23)
        bad[4] ^= 0x01
        for frame, bits in ((bad, 40), (bad, 40), (dht11_frame(45, 23), 24)):
            clock.advance(3.0)
            wire.frame, wire.bits = frame, bits
            await runner.read_once(prop)
        clock.advance(3.0)
        wire.bits = 40
        assert (await runner.read_once(prop)).quality == GOOD

    asyncio.run(scenario())
    assert [state for state, _ in states] == ["ok", "unhealthy", "ok"]
    detail = states[1][1]
    assert detail is not None
    assert detail.startswith("3 failures in a row (checksum 2, incomplete 1 since the last good measurement); last: ")
    assert "A full buffer was not returned" in detail
    assert driver.health() == "ok"
    assert driver.failures == {"checksum": 2, "incomplete": 1}


def test_open_on_a_machine_blinka_knows_no_pins_of_says_what_to_do() -> None:
    """On a laptop Blinka's `board` has no D pins at all: the error says this is no Raspberry Pi
    (Blinka's board id) and how to try the device here (the simulated driver), not only 'no pin D4'."""
    board = pytest.importorskip("board", reason="Blinka is not installed")
    if hasattr(board, "D4"):
        pytest.skip(f"Blinka knows this board's pins ({board.board_id})")
    from devices.drivers.dht import board_pin

    with pytest.raises(DriverError) as info:
        board_pin(4)
    message = str(info.value)
    assert board.board_id in message and "not a Raspberry Pi" in message
    assert "protocolName: simulated" in message


def test_a_collect_cycle_below_the_measurement_interval_is_a_warning_at_its_line(tmp_path: Path) -> None:
    """`collectCycle: 1000`, the README's, on a DHT (measured at most every 2.5 s): two readings in
    three repeat the last measurement, each recorded as new. The file runs as written, with a
    warning at the cycle's line saying what to write; the shipped example's 3000 draws none; a cycle
    left out (1000) is warned about at the property."""
    assert load([EXAMPLE]).warnings == []
    text = EXAMPLE.read_text().replace("collectCycle: 3000", "collectCycle: 1000", 1)
    (tmp_path / "sensor.yaml").write_text(text.replace("      collectCycle: 3000\n", "", 1))
    result = load([tmp_path], base=tmp_path)
    assert SENSOR_ID in result.devices
    lines = text.splitlines()
    cycle_line = next(i for i, line in enumerate(lines, 1) if "collectCycle: 1000" in line)
    humidity_line = next(i for i, line in enumerate(lines, 1) if "- name: humidity" in line and i > cycle_line)
    assert [str(p) for p in result.warnings] == [
        f"sensor.yaml:{cycle_line}: spec.properties[0].collectCycle: a DHT is measured at most every 2.5 s"
        " (configData.min_interval_s), so at a collectCycle of 1000 ms 2 of every 3 readings of 'temperature'"
        " repeat the last measurement as a new reading; set collectCycle: 3000 or more",
        f"sensor.yaml:{humidity_line}: spec.properties[1].collectCycle: a DHT is measured at most every 2.5 s"
        " (configData.min_interval_s), so at a collectCycle of 1000 ms (0 or left out: 1000) 2 of every 3 readings of"
        " 'humidity' repeat the last measurement as a new reading; set collectCycle: 3000 or more",
    ]


def test_blinkas_import_time_warning_goes_into_the_log_not_to_stdout() -> None:
    """Blinka prints `WARNING: GENERIC_X86 is not fully supported. Some features may not work.` (twice)
    to stdout as the driver imports it on a machine that is not a Pi, outside the mapper's log (no
    time, no logger, the journal's stdout). It is one WARNING of the mapper.dht logger now."""
    import subprocess
    import sys

    pytest.importorskip("adafruit_dht")
    from adafruit_platformdetect import Detector

    if Detector().chip.id != "GENERIC_X86":
        pytest.skip("Blinka prints that warning on a PC only")
    script = ("import logging, sys\n"
              "logging.basicConfig(stream=sys.stderr, format='%(levelname)s %(name)s: %(message)s')\n"
              "from devices.drivers.dht import _import_library, board_pin\n"
              "_import_library()\n"
              "try:\n    board_pin(4)\nexcept Exception as exc:\n    print('refused:', type(exc).__name__, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0 and done.stdout == "", done
    said = ("WARNING mapper.dht: Blinka (adafruit_dht's library), as it was imported: GENERIC_X86 is not fully"
            " supported. Some features may not work.")
    assert done.stderr.count(said) == 1 and "refused: DriverError" in done.stderr, done.stderr
