"""The `gpio` driver through the production adapter, `RPiGPIOPins`, over `FakeRPiGPIO`: the RPi.GPIO
module API on a modelled wire (`FakePins`). Assertions read the wire: levels, `states`, `calls`."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from pathlib import Path
from textwrap import dedent

import pytest

from devices.definitions import DeviceDefinition
from devices.drivers.gpio import GpioDriver
from devices.errors import DefinitionError, WriteError
from devices.ids import DeviceId
from devices.loader import load
from devices.pins import (
    FakePins, FakeRPiGPIO, PinError, PinInUse, PinInvalid, PinUnavailable, RPiGPIOPins, fake_rpi_gpio_pins,
)
from eventbus.telemetry import Telemetry
from eventbus.topics import Topics
from helpers import async_wait_for, running_service, write_config
from mapper.config import load_config
from twin.records import Reading
from twin.store import TwinStore

MODEL = """\
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: io-model, namespace: default}
spec:
  protocol: gpio
  properties:
    - {name: relay, type: BOOLEAN, accessMode: ReadWrite}
    - {name: button, type: BOOLEAN, accessMode: ReadOnly}
"""


def device_yaml(name: str, props: str) -> str:
    return dedent("""\
        apiVersion: devices.kubeedge.io/v1beta1
        kind: Device
        metadata: {name: %s, namespace: default}
        spec:
          deviceModelRef: {name: io-model}
          protocol: {protocolName: gpio, configData: {pins: fake}}
          properties:
        """) % name + props


RELAY = """\
  - name: relay
    visitors: {protocolName: gpio, configData: %s}
"""
BUTTON = """\
  - name: button
    visitors: {protocolName: gpio, configData: %s}
"""


def definition(tmp_path: Path, relay: str | None = None, button: str | None = None) -> DeviceDefinition:
    props = (RELAY % relay if relay else "") + (BUTTON % button if button else "")
    (tmp_path / "model.yaml").write_text(MODEL)
    (tmp_path / "io.yaml").write_text(device_yaml("io", props))
    return load([tmp_path]).devices[DeviceId("default", "io")]


@pytest.fixture
def wire() -> FakePins:
    return FakePins()


@pytest.fixture
def pins(wire: FakePins) -> RPiGPIOPins:
    """The production adapter, over the fake RPi.GPIO module on `wire`, on the wire's clock."""
    return fake_rpi_gpio_pins(wire)


def opened(defn: DeviceDefinition, pins: RPiGPIOPins) -> GpioDriver:
    driver = GpioDriver(defn, pins=pins)
    driver.open()
    return driver


def wire_of(driver: GpioDriver) -> FakePins:
    """The wire under a driver whose `pins: fake` backend make_pins built."""
    assert isinstance(driver.pins, RPiGPIOPins)
    assert isinstance(driver.pins.gpio, FakeRPiGPIO)
    return driver.pins.gpio.wire


def test_output_drives_pin_and_reads_back(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """A write drives the pin; read returns the level read back from the wire."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}")
    driver = opened(defn, pins)
    relay = defn.prop("relay")
    assert driver.read(relay) is False
    driver.write(relay, True)
    assert driver.read(relay) is True
    driver.write(relay, False)
    assert wire.pin(18).states == [False, True, False]
    assert ("input",) in wire.pin(18).calls  # read back from the pin, not from memory


def test_active_low_inverts_logic(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """active_low: logical on is electrical low, and read-back is inverted too."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, active_low: true}")
    driver = opened(defn, pins)
    relay = defn.prop("relay")
    assert wire.pin(18).level is True  # off = high for an active-low relay board
    driver.write(relay, True)
    assert wire.pin(18).level is False
    assert driver.read(relay) is True
    assert wire.pin(18).states == [True, False]


def test_boot_state_is_applied_at_open(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """`initial: true` sets the output on when the pin is opened, with no glitch through off."""
    defn = definition(tmp_path, relay="{pin: 23, direction: out, initial: true, active_low: true}")
    driver = opened(defn, pins)
    assert wire.pin(23).calls[0] == ("setup", "OUT", "initial=LOW")
    assert wire.pin(23).states == [False]
    assert driver.read(defn.prop("relay")) is True


def test_auto_off_on_the_backend_clock(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """An output switched on reverts after auto_off_s; a read after the deadline sees it off."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 60}")
    driver = opened(defn, pins)
    relay = defn.prop("relay")
    driver.write(relay, True)
    wire.advance(59.9)
    assert driver.read(relay) is True
    wire.advance(0.2)
    assert driver.read(relay) is False
    assert wire.pin(18).states == [False, True, False]
    driver.close()


def test_auto_off_fires_without_reads(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """The safety timer switches the output off even when nothing reads it."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 0.05}")
    driver = opened(defn, pins)
    driver.write(defn.prop("relay"), True)
    assert wire.pin(18).wait_for(False, timeout=5)
    assert wire.pin(18).states == [False, True, False]
    driver.close()


def test_newer_write_cancels_pending_auto_off(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """Switching off and on again restarts the auto-off deadline from the new write."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 60}")
    driver = opened(defn, pins)
    relay = defn.prop("relay")
    driver.write(relay, True)
    wire.advance(50)
    driver.write(relay, False)
    driver.write(relay, True)
    wire.advance(50)
    assert driver.read(relay) is True
    wire.advance(11)
    assert driver.read(relay) is False
    driver.close()


def test_write_for_cuts_the_auto_off_to_what_is_left(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """The driver's time limit is auto_off_s for an on only; write_for (a restore with time left)
    switches off after the seconds given, never later than auto_off_s."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 60}")
    driver = opened(defn, pins)
    relay = defn.prop("relay")
    assert (driver.time_limit(relay, True), driver.time_limit(relay, False)) == (60, None)
    driver.write_for(relay, True, 10)
    wire.advance(9.9)
    assert driver.read(relay) is True
    wire.advance(0.2)
    assert driver.read(relay) is False
    driver.write_for(relay, True, 1e6)  # more than auto_off_s: auto_off_s
    wire.advance(60.1)
    assert driver.read(relay) is False
    assert wire.pin(18).states == [False, True, False, True, False]
    driver.close()
    plain = opened(definition(tmp_path, relay="{pin: 18, direction: out}"), pins)
    assert plain.time_limit(plain.device.prop("relay"), True) is None
    plain.close()


def test_input_pull_up_reads_high_until_pressed(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """A button to ground on a pulled-up input: released reads false, pressed reads true (active_low)."""
    defn = definition(tmp_path, button="{pin: 27, direction: in, pull: up, active_low: true}")
    driver = opened(defn, pins)
    button = defn.prop("button")
    assert wire.pin(27).level is True  # the pull-up holds the line high
    assert driver.read(button) is False
    wire.pin(27).drive_low()
    assert driver.read(button) is True
    wire.pin(27).disconnect()
    assert driver.read(button) is False


def test_input_debounce_reports_only_settled_level(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """A bouncing contact is reported only after the line has been stable for debounce_ms."""
    defn = definition(tmp_path, button="{pin: 27, direction: in, pull: up, active_low: true, debounce_ms: 20}")
    driver = opened(defn, pins)
    button = defn.prop("button")
    wire.pin(27).bounce(False, True, False, True, False, every_s=0.002)
    assert driver.read(button) is False  # still bouncing: the last settled level is "released"
    wire.advance(0.010)
    assert driver.read(button) is False
    wire.advance(0.011)
    assert driver.read(button) is True  # 21 ms without an edge: pressed
    wire.pin(27).drive_high()
    wire.advance(0.005)
    assert driver.read(button) is True
    wire.advance(0.020)
    assert driver.read(button) is False


def test_input_cannot_be_written(tmp_path: Path, pins: RPiGPIOPins) -> None:
    """Writing an input is refused with a message naming the pin."""
    defn = definition(tmp_path, button="{pin: 27, direction: in}")
    driver = opened(defn, pins)
    with pytest.raises(WriteError, match="GPIO27 is an input"):
        driver.write(defn.prop("button"), True)


def test_only_declared_pins_touched_and_released_on_close(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """open() sets up exactly the declared pins; close() releases all of them, twice is harmless."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}", button="{pin: 27, direction: in, pull: up}")
    driver = opened(defn, pins)
    assert wire.in_use() == [18, 27]
    driver.close()
    driver.close()
    assert wire.in_use() == []
    assert wire.pin(18).calls[-1] == ("cleanup",)
    assert wire.pin(27).calls[-2:] == [("remove_event_detect",), ("cleanup",)]
    assert wire.pin(27).callback is None


def test_failed_open_releases_pins_already_set_up(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """If one pin is busy, the pins set up before it are released again."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}", button="{pin: 27, direction: in}")
    wire.setup_input(27, pull="off")  # another program holds GPIO27
    driver = GpioDriver(defn, pins=pins)
    with pytest.raises(PinError, match="GPIO27: cannot set up as input: GPIO busy"):
        driver.open()
    assert wire.in_use() == [27]
    assert wire.pin(18).calls[-1] == ("cleanup",)
    assert wire.pin(27).calls == [("setup_input", "off")]  # the other program's line is left alone


def test_two_devices_on_one_pin_is_a_definition_error(tmp_path: Path) -> None:
    """Two devices claiming GPIO17 fail validation with FILE:LINE of the second claim."""
    (tmp_path / "model.yaml").write_text(MODEL)
    (tmp_path / "a.yaml").write_text(device_yaml("a", RELAY % "{pin: 17, direction: out}"))
    block = "  - name: relay\n    visitors:\n      protocolName: gpio\n      configData:\n        direction: out\n        pin: 17\n"
    (tmp_path / "b.yaml").write_text(device_yaml("b", block))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    [problem] = info.value.problems
    assert str(problem) == (
        "b.yaml:13: spec.properties[0].visitors.configData.pin: gpio:17 is already used by device"
        " default/a (a.yaml:9)"
    )


def test_dht_and_gpio_on_one_pin_conflict(tmp_path: Path) -> None:
    """The DHT driver claims its pin in the same namespace as gpio, so a relay cannot reuse it."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "model.yaml").write_text(MODEL)
    (tmp_path / "relay.yaml").write_text(device_yaml("relay", RELAY % "{pin: 4, direction: out}"))
    sensor = (repo / "devices/examples/pi/room-sensor-dht.yaml").read_text()
    (tmp_path / "sensor.yaml").write_text(sensor)
    with pytest.raises(DefinitionError, match=r"gpio:4 is already used by device default/relay"):
        load([tmp_path], base=tmp_path)


def definition_error_of_device_io(tmp_path: Path, properties: str) -> DefinitionError:
    """The DefinitionError that loading MODEL and a device `io` with these properties (io.yaml) raises."""
    (tmp_path / "model.yaml").write_text(MODEL)
    (tmp_path / "io.yaml").write_text(device_yaml("io", properties))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    return info.value


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{pin: 28, direction: out}", "pin: GPIO28 is not a BCM pin on the 40-pin header: use 0-27"),
        ("{pin: yes, direction: out}", "pin: must be an integer, got True"),  # not GPIO1
        ("{pin: 4.5, direction: out}", "pin: must be an integer, got 4.5"),
        ("{pin: 5, direction: sideways}", "'sideways' is not allowed"),
        ("{pin: 5, direction: out, pull: up}", "pull 'up' applies to inputs only"),
        ("{pin: 5, direction: in, auto_off_s: 3}", "auto_off_s applies to outputs only"),
        # a timer cannot wait that long: its thread died with an OverflowError and left the output on
        ("{pin: 5, direction: out, auto_off_s: .inf}", "spec.properties[0].visitors.configData.auto_off_s: must be"
         f" a finite number of seconds, at most {threading.TIMEOUT_MAX:.0f} (the longest a timer can wait), got inf"),
        ("{pin: 5, direction: out, auto_off_s: 1e300}", "auto_off_s: must be a finite number of seconds, at most"),
        ("{pin: 5, direction: out, colour: red}", "colour: unknown field"),
        # a pin's name, as `pinout` and Blinka write it: the number meant is in it
        ("{pin: GPIO17, direction: out}", "pin: 'GPIO17' is a pin's name: write its BCM number, pin: 17"),
        ("{pin: D4, direction: out}", "pin: 'D4' is a pin's name: write its BCM number, pin: 4"),
        ("{pin: '17', direction: out}", "pin: '17' is text: write the number without quotes, pin: 17"),
    ],
)
def test_visitor_validation(tmp_path: Path, config: str, message: str) -> None:
    """Bad pin settings are definition errors that name the field and the fix."""
    error = definition_error_of_device_io(tmp_path, RELAY % config)
    assert message in str(error)
    assert "io.yaml:9:" in str(error)


def test_a_setting_that_does_not_fit_the_direction_is_reported_at_its_own_line(tmp_path: Path) -> None:
    """configData written as a block: the error names the line of `pull:`, not of `configData:`."""
    (tmp_path / "model.yaml").write_text(MODEL)
    block = "  - name: relay\n    visitors:\n      protocolName: gpio\n      configData:\n        pin: 5\n" \
            "        direction: out\n        pull: up\n"
    (tmp_path / "io.yaml").write_text(device_yaml("io", block))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert str(info.value) == ("io.yaml:14: spec.properties[0].visitors.configData.pull: pull 'up' applies to inputs"
                               " only: remove it or use direction: in")


def test_a_gpio_property_must_be_boolean(tmp_path: Path) -> None:
    """A pin is on or off: an INT property on a GPIO device is a definition error at the device's
    property (it used to validate, then its every read failed and the device never started)."""
    (tmp_path / "model.yaml").write_text(MODEL.replace("{name: relay, type: BOOLEAN", "{name: relay, type: INT"))
    (tmp_path / "io.yaml").write_text(device_yaml("io", RELAY % "{pin: 5, direction: out}"))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert str(info.value) == ("io.yaml:9: spec.properties[0].visitors: a GPIO pin is on or off: property 'relay' "
                               "must be BOOLEAN in DeviceModel 'io-model', not INT")


def test_a_pin_written_as_a_whole_float_is_that_pin(tmp_path: Path) -> None:
    """`pin: 17.0` (how KubeEdge DMI carries a YAML 17) is GPIO17; `pin: yes` and `pin: 4.5` are not pins."""
    defn = definition(tmp_path, relay="{pin: 17.0, direction: out}")
    pin = defn.prop("relay").visitor.pin
    assert (pin, type(pin)) == (17, int)


def test_fake_pins_refuse_what_a_pi_refuses(wire: FakePins) -> None:
    """The wire's own backend (another program on the wire) rejects pins outside 0-27, double set-up and
    writes to inputs, like the hardware."""
    with pytest.raises(PinInvalid):
        wire.pin(40)
    wire.setup_input(5, pull="down")
    assert wire.read(5) is False
    with pytest.raises(PinInUse):
        wire.setup_output(5, level=True)
    with pytest.raises(PinError, match="set up as 'in'"):
        wire.write(5, True)


# -- FakeRPiGPIO keeps RPi.GPIO's rules -------------------------------------------------------------


def test_fake_rpi_gpio_keeps_the_module_rules(wire: FakePins) -> None:
    """Numbering mode first, setup() before use, one edge detection per channel: RPi.GPIO's bare errors and
    messages, so the adapter's error mapping is tested against what the module really raises."""
    gpio = FakeRPiGPIO(wire)
    constants = [gpio.BCM, gpio.BOARD, gpio.IN, gpio.OUT, gpio.PUD_UP, gpio.PUD_DOWN, gpio.PUD_OFF,
                 gpio.RISING, gpio.FALLING, gpio.BOTH]
    assert (gpio.HIGH, gpio.LOW) == (1, 0)
    assert len(set(constants[4:])) == 6 and gpio.BCM != gpio.BOARD and gpio.IN != gpio.OUT
    with pytest.raises(RuntimeError, match=r"^Please set pin numbering mode using GPIO.setmode\(GPIO.BOARD\) or"):
        gpio.setup(5, gpio.IN)
    gpio.setmode(gpio.BCM)
    gpio.setmode(gpio.BCM)  # the same mode again is fine
    with pytest.raises(ValueError, match="^A different mode has already been set!$"):
        gpio.setmode(gpio.BOARD)
    with pytest.raises(ValueError, match="^The channel sent is invalid on a Raspberry Pi$"):
        gpio.setup(40, gpio.OUT)
    with pytest.raises(RuntimeError, match="^You must setup\\(\\) the GPIO channel first$"):
        gpio.input(5)
    gpio.setup(5, gpio.IN, pull_up_down=gpio.PUD_UP)
    assert gpio.input(5) == 1 and type(gpio.input(5)) is int
    with pytest.raises(RuntimeError, match="^The GPIO channel has not been set up as an OUTPUT$"):
        gpio.output(5, gpio.LOW)
    with pytest.raises(ValueError, match="initial parameter is not valid for inputs"):
        gpio.setup(6, gpio.IN, initial=gpio.HIGH)
    gpio.setup(6, gpio.OUT, initial=gpio.HIGH)
    with pytest.raises(RuntimeError, match="as an input first"):
        gpio.add_event_detect(6, gpio.BOTH)
    channels: list[int] = []
    gpio.add_event_detect(5, gpio.FALLING, callback=channels.append)
    with pytest.raises(RuntimeError, match="^Conflicting edge detection already enabled for this GPIO channel$"):
        gpio.add_event_detect(5, gpio.FALLING, callback=channels.append)
    wire.pin(5).drive_low()
    wire.pin(5).drive_high()  # a rising edge: not asked for
    assert channels == [5]
    gpio.remove_event_detect(5)
    wire.pin(5).drive_low()
    assert channels == [5]
    gpio.add_event_detect(5, gpio.BOTH, callback=channels.append)
    gpio.cleanup(5)  # also ends edge detection
    assert not wire.pin(5).in_use and wire.pin(5).pull == "off"
    wire.pin(5).drive_high()
    assert channels == [5]
    with pytest.raises(RuntimeError, match="setup"):
        gpio.input(5)
    assert wire.pin(6).level is True  # cleanup(5) left GPIO6 alone


def test_fake_rpi_gpio_bouncetime_drops_edges_too_close_together(wire: FakePins) -> None:
    """With bouncetime, edges within that many ms of the last one passed on are dropped (wire clock)."""
    gpio = FakeRPiGPIO(wire)
    gpio.setmode(gpio.BCM)
    gpio.setup(27, gpio.IN, pull_up_down=gpio.PUD_UP)
    channels: list[int] = []
    gpio.add_event_detect(27, gpio.BOTH, callback=channels.append, bouncetime=10)
    wire.pin(27).bounce(False, True, False, every_s=0.004)
    assert channels == [27]
    wire.advance(0.011)
    wire.pin(27).drive_high()
    assert channels == [27, 27]


# -- RPiGPIOPins, the production adapter, over the fake module ---------------------------------------


def test_adapter_levels_written_are_on_the_wire(wire: FakePins, pins: RPiGPIOPins) -> None:
    """setup_output starts at the asked level (no glitch), write changes it, read reads the wire back."""
    pins.setup_output(6, level=True)
    assert wire.pin(6).states == [True]
    pins.write(6, False)
    assert wire.pin(6).level is False
    assert pins.read(6) is False
    pins.write(6, True)
    assert pins.read(6) is True
    assert wire.pin(6).states == [True, False, True]
    assert wire.pin(6).calls[:2] == [("setup", "OUT", "initial=HIGH"), ("output", "LOW")]


def test_adapter_reads_external_drive_and_pulls(wire: FakePins, pins: RPiGPIOPins) -> None:
    """Reads follow what the outside world drives, else the pull, else the floating line."""
    pins.setup_input(5, pull="up")
    pins.setup_input(7, pull="down")
    wire.pin(8).floating_level = True
    pins.setup_input(8, pull="off")
    assert (pins.read(5), pins.read(7), pins.read(8)) == (True, False, True)
    wire.pin(5).drive_low()
    wire.pin(7).drive_high()
    assert (pins.read(5), pins.read(7)) == (False, True)
    wire.pin(5).disconnect()
    assert pins.read(5) is True
    assert wire.pin(5).calls[0] == ("setup", "IN", "pull_up_down=PUD_UP")
    assert wire.pin(8).calls[0] == ("setup", "IN", "pull_up_down=PUD_OFF")


def test_adapter_edges_reach_the_callback_with_the_level_and_wire_time(wire: FakePins, pins: RPiGPIOPins) -> None:
    """RPi.GPIO passes only the channel; the adapter adds the level read at that moment and its clock."""
    seen: list[tuple[int, bool, float]] = []
    pins.setup_input(5, pull="up")
    pins.watch(5, "both", lambda pin, level, ticks: seen.append((pin, level, ticks)))
    pins.setup_input(7, pull="down")
    pins.watch(7, "rising", lambda pin, level, ticks: seen.append((pin, level, ticks)))
    wire.advance(1.5)
    wire.pin(5).drive_low()
    wire.advance(0.25)
    wire.pin(5).drive_high()
    wire.pin(7).drive_high()
    wire.pin(7).drive_low()  # falling: GPIO7 watches rising edges only
    assert seen == [(5, False, 1001.5), (5, True, 1001.75), (7, True, 1001.75)]
    assert pins.ticks() == wire.ticks() == 1001.75
    assert ("add_event_detect", "RISING") in wire.pin(7).calls


def test_adapter_clock_defaults_to_monotonic() -> None:
    """Without a clock, ticks are time.monotonic seconds, as edge times from the real module need."""
    before = time.monotonic()
    assert before <= RPiGPIOPins(FakeRPiGPIO()).ticks() <= time.monotonic()


def test_adapter_maps_module_errors_to_pin_errors(wire: FakePins) -> None:
    """RPi.GPIO's bare errors become PinInvalid (ValueError), PinUnavailable (access) or PinError (the rest),
    each naming the pin, the step and the module's own words."""
    gpio = FakeRPiGPIO(wire)
    pins = RPiGPIOPins(gpio, clock=wire.ticks)
    with pytest.raises(PinError) as info:
        pins.write(6, True)
    assert type(info.value) is PinError
    assert str(info.value) == ("GPIO6: cannot write: Please set pin numbering mode using GPIO.setmode(GPIO.BOARD)"
                               " or GPIO.setmode(GPIO.BCM)")
    pins.setup_output(6, level=False)
    pins.setup_input(5, pull="off")
    with pytest.raises(PinInvalid, match="^GPIO28: cannot read: The channel sent is invalid on a Raspberry Pi$"):
        pins.read(28)
    with pytest.raises(PinInvalid, match="^GPIO7: unknown pull 'sideways': use up, down or off$"):
        pins.setup_input(7, pull="sideways")  # type: ignore[arg-type]
    with pytest.raises(PinInvalid, match="unknown edge 'sometimes'"):
        pins.watch(5, "sometimes", lambda *_: None)  # type: ignore[arg-type]
    with pytest.raises(PinError, match="^GPIO9: cannot read: You must setup\\(\\) the GPIO channel first$"):
        pins.read(9)
    with pytest.raises(PinError, match="^GPIO5: cannot write: The GPIO channel has not been set up as an OUTPUT$"):
        pins.write(5, True)
    with pytest.raises(PinError, match="^GPIO6: cannot watch edges: You must setup\\(\\) the GPIO channel as an input"):
        pins.watch(6, "both", lambda *_: None)
    pins.watch(5, "both", lambda *_: None)
    with pytest.raises(PinError, match="^GPIO5: cannot watch edges: Conflicting edge detection already enabled"):
        pins.watch(5, "falling", lambda *_: None)
    with pytest.raises(PinInUse, match="^GPIO5 is already set up by this mapper$"):
        pins.setup_output(5, level=False)


def test_adapter_reports_no_access_as_unavailable_with_the_fix(wire: FakePins) -> None:
    """No access to the GPIO registers is PinUnavailable and says what to do; the pin is not kept claimed."""
    pins = fake_rpi_gpio_pins(wire, no_access=True)
    with pytest.raises(PinUnavailable) as info:
        pins.setup_output(17, level=False)
    assert str(info.value) == ("GPIO17: cannot set up as output: No access to /dev/mem.  Try running as root!;"
                               " run as a user in the `gpio` group")
    assert wire.in_use() == []
    pins.gpio.no_access = False  # e.g. after adding the user to the gpio group
    pins.setup_output(17, level=False)
    assert wire.in_use() == [17]


def test_adapter_maps_errors_of_other_types_too(wire: FakePins) -> None:
    """A module raising its own exception type (rpi-lgpio can let lgpio.error through) still gives a
    PinError naming the pin and the step, and a failed set-up does not keep the pin claimed."""

    class LgpioError(Exception):  # what lgpio raises: a plain Exception subclass
        pass

    class Pi5Module(FakeRPiGPIO):
        def setup(self, channel, direction, pull_up_down=None, initial=None):  # noqa: ANN001, ANN201
            raise LgpioError("GPIO busy")

    pins = RPiGPIOPins(Pi5Module(wire), clock=wire.ticks)
    with pytest.raises(PinError, match="^GPIO17: cannot set up as output: GPIO busy$") as info:
        pins.setup_output(17, level=False)
    assert isinstance(info.value.__cause__, LgpioError)
    with pytest.raises(PinError) as again:
        pins.setup_output(17, level=False)  # refused by the module again, not as "already set up by this mapper"
    assert not isinstance(again.value, PinInUse)


def test_adapter_numbering_mode_clash_is_invalid(wire: FakePins, pins: RPiGPIOPins) -> None:
    """Other code in the process chose BOARD numbering: setmode(BCM) is refused and nothing is set up."""
    pins.gpio.setmode(pins.gpio.BOARD)
    with pytest.raises(PinInvalid, match="^GPIO5: cannot select BCM numbering: A different mode has already been set"):
        pins.setup_output(5, level=False)
    assert wire.in_use() == []


def test_adapter_release_cleans_up_only_its_own_pins(wire: FakePins, pins: RPiGPIOPins) -> None:
    """release() removes edge detection and cleans the pin up; pins it never set up are not touched."""
    pins.setup_input(5, pull="up")
    pins.watch(5, "both", lambda *_: None)
    wire.setup_output(9, level=True)  # another program's line
    pins.release(5)
    pins.release(5)  # twice is harmless
    pins.release(9)  # never set up here
    assert wire.pin(5).calls[-2:] == [("remove_event_detect",), ("cleanup",)]
    assert (wire.pin(5).in_use, wire.pin(5).pull, wire.pin(5).callback) == (False, "off", None)
    assert wire.pin(9).calls == [("setup_output", True)] and wire.pin(9).level is True
    pins.setup_output(5, level=True)  # released: it can be set up again
    assert wire.pin(5).level is True


def test_adapter_without_rpi_gpio_says_what_to_install() -> None:
    """On a machine without RPi.GPIO the first use fails with PinUnavailable and the pip command."""
    if importlib.util.find_spec("RPi") is not None:
        pytest.skip("RPi.GPIO is installed here")
    with pytest.raises(PinUnavailable, match=r"RPi.GPIO is not importable .*pip install rpi-lgpio"):
        RPiGPIOPins().setup_output(17, level=False)


def test_adapter_without_rpi_gpio_says_how_to_try_the_device_elsewhere() -> None:
    """Not on a Pi (a laptop trying a fleet's device files), installing RPi.GPIO does not help:
    the error also names `pins: fake`, which runs the device over a modelled wire."""
    if importlib.util.find_spec("RPi") is not None:
        pytest.skip("RPi.GPIO is installed here")
    with pytest.raises(PinUnavailable, match=r"not a Raspberry Pi.*`pins: fake` in spec\.protocol\.configData"):
        RPiGPIOPins().setup_output(17, level=False)


def test_shipped_relay_example_runs_on_fake_pins(wire: FakePins, pins: RPiGPIOPins) -> None:
    """The Pi relay example validates and drives an active-low GPIO17 that starts off."""
    repo = Path(__file__).resolve().parents[1]
    defn = load([repo / "devices/examples/pi/relay-gpio.yaml"]).devices[DeviceId("default", "fan-relay-pi")]
    driver = opened(defn, pins)
    assert wire.pin(17).states == [True]
    driver.write(defn.prop("power"), True)
    assert wire.pin(17).states == [True, False]
    driver.close()
    assert wire.in_use() == []


async def test_relay_in_a_running_mapper_follows_desired_value(tmp_path: Path) -> None:
    """In a running service, a desired `power: true` drives the (fake) pin and is reported back as applied."""
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "model.yaml").write_text(MODEL)
    (devices / "io.yaml").write_text(
        device_yaml("io", RELAY % "{pin: 18, direction: out, active_low: true}").replace(
            "visitors:", "collectCycle: 50\n    visitors:"))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    device = DeviceId("default", "io")
    async with running_service(config) as service:
        wire = wire_of(service.runners[device].driver)  # `pins: fake`: the adapter over FakeRPiGPIO
        with TwinStore.open(config.twin.path) as store:
            store.set_desired(device, "relay", "true")

        def applied() -> bool:
            with TwinStore.open(config.twin.path) as store:
                prop = store.device(device).properties["relay"]
            return prop.reported is True and not prop.delta

        await async_wait_for(applied, what="relay reported on")
        assert wire.pin(18).level is False  # active low: on = electrical low
    assert wire.in_use() == []  # released on shutdown
    assert wire.pin(18).calls[-1] == ("cleanup",)


async def test_reload_releases_the_pins_of_a_changed_device(tmp_path: Path) -> None:
    """SIGHUP with the relay moved from pin 18 to 19: the old driver lets go of 18, the new one holds 19."""
    from mapper.cli import reload_devices

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "model.yaml").write_text(MODEL)
    relay = device_yaml("io", RELAY % "{pin: 18, direction: out}").replace("visitors:", "collectCycle: 50\n    visitors:")
    (devices / "io.yaml").write_text(relay)
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    device = DeviceId("default", "io")
    async with running_service(config) as service:
        old = service.runners[device].driver
        assert wire_of(old).in_use() == [18]
        (devices / "io.yaml").write_text(relay.replace("pin: 18", "pin: 19"))
        assert await reload_devices(service, config)
        await asyncio.wait_for(service.runners[device].first_open_done.wait(), 10)
        new = service.runners[device].driver
        assert new is not old
        assert wire_of(old).in_use() == []
        assert wire_of(new).in_use() == [19]
    assert wire_of(new).in_use() == []


# -- reported on change ---------------------------------------------------------------------


def write_io(devices: Path, props: str) -> Path:
    devices.mkdir(exist_ok=True)
    (devices / "model.yaml").write_text(MODEL)
    (devices / "io.yaml").write_text(device_yaml("io", props))
    return devices


def cycles(props: str, collect_ms: int, report_ms: int | None = None) -> str:
    """Put collectCycle/reportCycle/reportToCloud in front of every `visitors:` of `props`."""
    report = report_ms if report_ms is not None else collect_ms
    return props.replace(
        "visitors:", f"collectCycle: {collect_ms}\n    reportCycle: {report}\n    reportToCloud: true\n    visitors:")


IO = DeviceId("default", "io")


def history(config, name: str) -> list:  # noqa: ANN001
    with TwinStore.open(config.twin.path) as store:
        return [value for _, value, _ in store.history(IO, name)]


def twin_prop(config, name: str):  # noqa: ANN001, ANN201
    with TwinStore.open(config.twin.path) as store:
        return store.device(IO).properties[name]


def pending(config):  # noqa: ANN001, ANN201
    with TwinStore.open(config.twin.path) as store:
        return store.pending_desired()


def test_edges_ask_the_device_loop_to_read_once_settled(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """Every edge calls `changed(button, debounce_s)`; outputs never do, and no listener is harmless."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}",
                      button="{pin: 27, direction: in, pull: up, active_low: true, debounce_ms: 25}")
    driver = opened(defn, pins)
    wire.pin(27).drive_low()  # nobody listens yet: nothing happens
    calls: list[tuple[str, float]] = []
    driver.on_change = lambda prop, settle_s: calls.append((prop.name, settle_s))
    wire.pin(27).bounce(True, False, every_s=0.002)
    driver.write(defn.prop("relay"), True)
    assert calls == [("button", 0.025), ("button", 0.025)]
    assert GpioDriver.reports_changes(defn.prop("button"))
    driver.close()


async def test_short_press_between_polls_is_reported_on_change(tmp_path: Path) -> None:
    """A bouncing press and release, both between two polls an hour apart, reach the twin as pressed then released."""
    button = "{pin: 27, direction: in, pull: up, active_low: true, debounce_ms: 20}"
    devices = write_io(tmp_path / "dev", cycles(BUTTON % button, 3_600_000))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    async with running_service(config) as service:
        runner = service.runners[IO]
        wire = wire_of(runner.driver)
        await async_wait_for(lambda: history(config, "button") == [False], what="the first poll: released")
        polls = runner.reads
        line = wire.pin(27)
        line.bounce(False, True, False, every_s=0.002)  # pressed (to ground), with contact bounce
        wire.advance(0.021)  # the line has been quiet for debounce_ms on the backend's clock
        await async_wait_for(lambda: history(config, "button") == [False, True], what="pressed in the twin")
        line.bounce(True, False, True, every_s=0.002)  # released
        wire.advance(0.021)
        await async_wait_for(lambda: history(config, "button") == [False, True, False], what="released in the twin")
        assert runner.reads == polls + 2  # one read per settled change, none per bounce
        assert twin_prop(config, "button").reported is False


def test_changed_values_skip_the_report_cycle_throttle(tmp_path: Path) -> None:
    """Inside one reportCycle a button's press and release are both published; an unchanged value is not."""
    devices = write_io(tmp_path / "dev", cycles(BUTTON % "{pin: 27, direction: in}", 1000, 60_000))
    defn = load([devices]).devices[IO]
    telemetry = Telemetry(Topics("n1"), {IO: defn})
    topic = Topics("n1").telemetry(IO, "button")

    def published(value: bool, ts: int) -> list:
        return [m for m in telemetry([Reading(IO, "button", value, ts)]) if m.topic == topic]

    assert len(published(False, 1_000)) == 1  # the first reading
    assert published(False, 2_000) == []  # unchanged, inside the reportCycle
    assert len(published(True, 2_100)) == 1  # pressed
    assert len(published(False, 2_200)) == 1  # released
    assert published(False, 3_000) == []
    assert len(published(False, 62_200)) == 1  # the reportCycle still reports an unchanged value


def test_a_changed_input_sends_the_device_state_at_once(tmp_path: Path) -> None:
    """The state message's interval does not hold back a button press: its state goes out with it."""
    devices = write_io(tmp_path / "dev", cycles(BUTTON % "{pin: 27, direction: in}", 1000, 60_000))
    defn = load([devices]).devices[IO]
    telemetry = Telemetry(Topics("n1"), {IO: defn}, state_interval_ms=120_000)
    state = Topics("n1").device_state(IO)

    def states(value: bool, ts: int) -> list:
        return [m.body["button"] for m in telemetry([Reading(IO, "button", value, ts)]) if m.topic == state]

    assert states(False, 1_000) == [False]  # the first reading
    assert states(False, 2_000) == []  # unchanged: not published at all
    assert states(True, 2_100) == [True]  # pressed
    assert states(False, 2_200) == [False]  # released
    assert states(False, 62_200) == []  # published for its reportCycle, unchanged: the interval holds the state
    assert states(True, 63_300) == [True]  # pressed again: at once


# -- auto-off and the twin ------------------------------------------------------------------


def test_boot_state_on_starts_the_auto_off_timer(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins) -> None:
    """`initial: true` with auto_off_s: switched off that long after open, and the driver says so."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, initial: true, auto_off_s: 60}")
    driver = opened(defn, pins)
    reverts: list[tuple[str, object, str]] = []
    driver.on_revert = lambda prop, value, reason: reverts.append((prop.name, value, reason))
    relay = defn.prop("relay")
    assert driver.boot_value(relay) is True
    wire.advance(60.1)
    assert driver.read(relay) is False
    assert reverts == [("relay", False, "auto-off after 60 s")]
    driver.close()


async def test_auto_off_makes_off_the_desired_value(tmp_path: Path) -> None:
    """When auto-off fires, desired becomes false as a new, applied version: no delta, and the relay stays off."""
    relay = "{pin: 18, direction: out, active_low: true, auto_off_s: 0.05}"
    devices = write_io(tmp_path / "dev", cycles(RELAY % relay, 50))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    async with running_service(config) as service:
        pin = wire_of(service.runners[IO].driver).pin(18)
        with TwinStore.open(config.twin.path) as store:
            _, version = store.set_desired(IO, "relay", True)

        def reverted():  # noqa: ANN202
            prop = twin_prop(config, "relay")
            return prop.desired_version > version and prop

        prop = await async_wait_for(reverted, what="auto-off stored as the desired value")
        assert (prop.desired, prop.reported, prop.delta) == (False, False, False)
        assert prop.desired_version == version + 1
        assert prop.apply_error is None
        with TwinStore.open(config.twin.path) as store:
            assert store.pending_desired() == []
        assert True in history(config, "relay")  # it was on, and reported on
        # The next polls read it off and nothing writes it on again.
        polls = service.runners[IO].reads
        await async_wait_for(lambda: service.runners[IO].reads >= polls + 3, what="three more polls")
        assert pin.states == [True, False, True]  # active low: off, on, off
        assert twin_prop(config, "relay").desired_version == version + 1


def test_a_value_the_driver_set_back_is_stored_applied_in_one_commit(tmp_path: Path) -> None:
    """The auto-off's `false` (and a boot state's) is stored as a new desired version and marked
    applied in one transaction: in two commits, a reader in between saw it pending (a flaky
    test_auto_off_makes_off_the_desired_value), and a failure of the second (a full disk) left it
    pending for good, to be written again at the next start. A trigger on the real twin file fails it."""
    import contextlib
    import sqlite3

    from mapper.device_loop import _store_applied_desired

    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 60}")
    path = tmp_path / "twin.db"
    with TwinStore.open(path) as store:
        store.sync_devices([defn])
        _, version = store.set_desired(IO, "relay", True)
        store.mark_applied(IO, "relay", version)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("CREATE TRIGGER refuse_applied BEFORE UPDATE OF applied_version ON properties"
                       " BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        with pytest.raises(sqlite3.DatabaseError, match="disk full"):
            _store_applied_desired(store, IO, "relay", False)
        prop = store.device(IO).properties["relay"]
        assert (prop.desired, prop.desired_version, store.pending_desired()) == (True, version, [])


async def test_restart_does_not_reapply_an_applied_on(tmp_path: Path) -> None:
    """After a restart the relay stays in its boot state and desired becomes that state; a value set
    while the mapper was down is still applied."""
    devices = write_io(tmp_path / "dev", cycles(RELAY % "{pin: 18, direction: out, active_low: true}", 50))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))

    def applied(value: bool):  # noqa: ANN202
        def check() -> bool:
            prop = twin_prop(config, "relay")
            return prop.desired is value and prop.reported is value and not prop.delta
        return check

    async with running_service(config):
        with TwinStore.open(config.twin.path) as store:
            _, on_version = store.set_desired(IO, "relay", True)
        await async_wait_for(applied(True), what="relay on")
        # The read-back is committed before the apply is marked; a stop in between would leave
        # the value pending, and a pending value is applied again at the next start.
        await async_wait_for(lambda: not pending(config), what="the apply recorded")

    async with running_service(config) as service:
        await async_wait_for(applied(False), what="desired reset to the boot state")
        prop = twin_prop(config, "relay")
        assert prop.desired_version == on_version + 1
        polls = service.runners[IO].reads
        await async_wait_for(lambda: service.runners[IO].reads >= polls + 3, what="three more polls")
        assert wire_of(service.runners[IO].driver).pin(18).states == [True]  # booted off, never switched on

    with TwinStore.open(config.twin.path) as store:
        store.set_desired(IO, "relay", True)  # set while the mapper is down: not applied yet
    async with running_service(config) as service:
        await async_wait_for(applied(True), what="pending desired applied at start")
        assert wire_of(service.runners[IO].driver).pin(18).states == [True, False]


@pytest.mark.parametrize("active_low", [False, True])
def test_close_switches_outputs_off_before_releasing_them(tmp_path: Path, wire: FakePins, pins: RPiGPIOPins,
                                                          active_low: bool) -> None:
    """A relay that is on when the device stops (mapper stop, reload, crash-restart) is switched off
    before its pin is released: released, it would keep its last level where the line stays an
    output (lgpio on a Pi 5) with no auto-off timer left to end it."""
    defn = definition(tmp_path, relay=f"{{pin: 18, direction: out, active_low: {str(active_low).lower()},"
                                      f" auto_off_s: 600}}")
    driver = opened(defn, pins)
    driver.write(defn.prop("relay"), True)
    driver.close()
    on, off = ("LOW", "HIGH") if active_low else ("HIGH", "LOW")
    calls = [c for c in wire.pin(18).calls if c != ("remove_event_detect",)]
    assert calls[-3:] == [("output", on), ("output", off), ("cleanup",)]
    assert wire.pin(18).states[:3] == [active_low, not active_low, active_low]  # off, on, off: then released
    driver.close()  # twice is harmless: nothing more is written
    assert wire.pin(18).calls[-1] == ("cleanup",)


def test_a_writable_property_on_an_input_pin_is_a_definition_error(tmp_path: Path) -> None:
    """A ReadWrite property on `direction: in` used to validate; then every desired value set on it
    failed at the device ("GPIO27 is an input; it cannot be set") and stayed a delta in the twin."""
    error = definition_error_of_device_io(tmp_path, RELAY % "{pin: 27, direction: in}")
    assert str(error) == ("io.yaml:9: spec.properties[0].visitors: property 'relay' is ReadWrite in DeviceModel"
                          " 'io-model', but GPIO27 is an input: use direction: out, or accessMode: ReadOnly")


def test_auto_off_on_a_read_only_output_is_a_definition_error(tmp_path: Path) -> None:
    """A ReadOnly output (accessMode's default) with auto_off_s used to validate; at its auto-off the
    device loop crashed (NotWritable), and each restart re-opened the pin with `initial: true`, on
    again, forever. Nothing could switch it on again anyway. A fixed level (`initial` alone) loads."""
    (tmp_path / "model.yaml").write_text(MODEL)
    block = ("  - name: button\n    visitors:\n      protocolName: gpio\n      configData:\n"
             "        pin: 17\n        direction: out\n        initial: true\n        auto_off_s: 1\n")
    (tmp_path / "io.yaml").write_text(device_yaml("io", block))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert str(info.value) == (
        "io.yaml:15: spec.properties[0].visitors.configData.auto_off_s: property 'button' is not ReadWrite in"
        " DeviceModel 'io-model' (accessMode defaults to ReadOnly), so nothing could switch GPIO17 on again after auto_off_s"
        " switched it off: use accessMode: ReadWrite, or remove auto_off_s")
    fixed = definition(tmp_path, button="{pin: 17, direction: out, initial: true}")
    assert fixed.prop("button").visitor.initial is True


async def test_a_driver_revert_of_a_read_only_property_is_recorded_not_a_crash(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A ReadOnly property the driver sets back by itself has no desired value to update: the
    read-back is recorded and the loop goes on (storing a desired value raised NotWritable, which
    crashed the device loop; its restart re-opened the pin with `initial: true`)."""
    caplog.set_level(logging.INFO, logger="mapper.device")
    devices = write_io(tmp_path / "dev", cycles(BUTTON % "{pin: 22, direction: out, initial: true}", 3_600_000))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    async with running_service(config) as service:
        runner = service.runners[IO]
        await async_wait_for(lambda: history(config, "button") == [True], what="the first poll: on")
        runner.driver.reverted(runner.definition.prop("button"), True, "set back by the driver")
        await async_wait_for(lambda: history(config, "button") == [True, True], what="the read-back recorded")
        # The revert's handling ends with this line (a crash came before it, where the desired value was stored).
        handled = "set back by the driver; ReadOnly, so only the reading True is recorded"
        await async_wait_for(lambda: handled in caplog.text or "device loop crashed" in caplog.text,
                             what="the revert handled, or the loop crashed")
        assert "device loop crashed" not in caplog.text
        assert handled in caplog.text
        assert service.runners[IO] is runner
        assert wire_of(runner.driver).pin(22).states == [True]  # opened on, never re-opened
        prop = twin_prop(config, "button")
        assert (prop.desired, prop.desired_version) == (None, 0)


# -- initial: restore -------------------------------------------------------------------------


@pytest.mark.parametrize("active_low", [False, True])
def test_restore_opens_the_output_off_and_asks_for_the_desired_value(tmp_path: Path, wire: FakePins,
                                                                     pins: RPiGPIOPins, active_low: bool) -> None:
    """`initial: restore` sets the pin up off (active_low applied: `restore` is no true), with no
    auto-off timer, and asks the device loop for the desired value; plain outputs do not."""
    low = str(active_low).lower()
    defn = definition(tmp_path, relay=f"{{pin: 18, direction: out, active_low: {low}, initial: restore, auto_off_s: 60}}")
    driver = opened(defn, pins)
    relay = defn.prop("relay")
    assert wire.pin(18).calls[0] == ("setup", "OUT", f"initial={'HIGH' if active_low else 'LOW'}")
    assert (driver.restore_desired(relay), driver.boot_value(relay), driver.read(relay)) == (True, False, False)
    wire.advance(61)
    assert driver.read(relay) is False and wire.pin(18).states == [active_low]  # nothing armed, nothing written
    driver.close()
    for initial in ("", ", initial: true", ", initial: false"):
        plain = opened(definition(tmp_path, relay=f"{{pin: 18, direction: out{initial}}}"), pins)
        assert plain.restore_desired(plain.device.prop("relay")) is False
        plain.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{pin: 5, direction: out, initial: maybe}", "initial: must be true, false or restore, got 'maybe'"),
        ("{pin: 5, direction: in, initial: restore}", "initial applies to outputs only"),
    ],
)
def test_initial_takes_true_false_or_restore(tmp_path: Path, config: str, message: str) -> None:
    error = definition_error_of_device_io(tmp_path, RELAY % config)
    assert message in str(error) and "io.yaml:9:" in str(error)


def test_restore_on_a_read_only_output_is_a_definition_error(tmp_path: Path) -> None:
    """A ReadOnly property never has a desired value: `initial: restore` would leave the pin off without a word."""
    error = definition_error_of_device_io(tmp_path, BUTTON % "{pin: 17, direction: out, initial: restore}")
    assert str(error) == (
        "io.yaml:9: spec.properties[0].visitors.configData.initial: property 'button' is not ReadWrite in DeviceModel"
        " 'io-model' (accessMode defaults to ReadOnly), so it never has a desired value for initial: restore to write"
        " to GPIO17: use accessMode: ReadWrite, or initial: true or false")


def _relay_applied(config, value: bool, version: int = 0):  # noqa: ANN001, ANN202
    """A check: the relay's desired value is `value` (at `version` or later), written, and reported so."""
    def check() -> bool:
        prop = twin_prop(config, "relay")
        return (prop.desired is value and prop.desired_version >= version and prop.reported is value
                and not prop.delta and not pending(config))
    return check


async def _relay_switched_on_then_stopped(tmp_path: Path, relay: str):  # noqa: ANN202
    """A mapper of device io, the relay's configData `relay` (read every 50 ms), run until a desired on
    was written and reported, then stopped: (its devices directory, its config, the on's version)."""
    devices = write_io(tmp_path / "dev", cycles(RELAY % relay, 50))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    async with running_service(config):
        with TwinStore.open(config.twin.path) as store:
            _, on_version = store.set_desired(IO, "relay", True)
        await async_wait_for(_relay_applied(config, True), what="relay on")
    return devices, config, on_version


async def test_restore_brings_the_relay_back_on_after_a_restart_and_a_reload(tmp_path: Path) -> None:
    """`initial: restore`, active low: a relay switched on comes back on after a stop and start (the
    pin electrically low, reported true, no delta, nothing pending), and again when a reload changes
    its device. Opened off each time, then written once: no other switching."""
    from mapper.cli import reload_devices

    relay = "{pin: 18, direction: out, active_low: true, initial: restore}"
    devices, config, on_version = await _relay_switched_on_then_stopped(tmp_path, relay)
    before = len(history(config, "relay"))

    async with running_service(config) as service:
        # (the same value as a new version, made pending at the open, then written)
        await async_wait_for(_relay_applied(config, True, on_version + 1), what="relay restored on")
        pin = wire_of(service.runners[IO].driver).pin(18)
        assert pin.level is False  # active low: on
        assert pin.states == [True, False]  # opened off, then switched on once
        prop = twin_prop(config, "relay")
        assert (prop.desired_version, prop.apply_error) == (on_version + 1, None)
        assert False not in history(config, "relay")[before:]  # never reported off: restored before the first read

        (devices / "io.yaml").write_text(device_yaml("io", cycles(RELAY % relay, 60)))
        assert await reload_devices(service, config)
        await asyncio.wait_for(service.runners[IO].first_open_done.wait(), 10)
        await async_wait_for(_relay_applied(config, True, on_version + 2), what="relay restored after the reload")
        assert wire_of(service.runners[IO].driver).pin(18).states == [True, False]
        assert pin.states[:3] == [True, False, True]  # the old driver switched off as it closed, then released


def _switched_on_ago(config, seconds: float) -> int:  # noqa: ANN001
    """Make the relay's desired value one set `seconds` ago (wall clock; negative: in the future), as
    if the mapper had been restarting since; returns its desired_ts (ms)."""
    import contextlib
    import sqlite3

    set_at = time.time_ns() // 1_000_000 - int(seconds * 1000)
    with contextlib.closing(sqlite3.connect(config.twin.path, isolation_level=None)) as db:
        db.execute("UPDATE properties SET desired_ts=? WHERE device_id=? AND name='relay'", (set_at, str(IO)))
    return set_at


async def test_a_restored_relay_with_auto_off_is_switched_off_by_its_timer(tmp_path: Path) -> None:
    """A relay restored on gets its auto-off timer again, with what is left of auto_off_s since it was
    set: when it fires (on the fake wire's clock), off becomes the desired value, and the next start
    leaves it off."""
    relay = "{pin: 18, direction: out, initial: restore, auto_off_s: 600}"
    _, config, on_version = await _relay_switched_on_then_stopped(tmp_path, relay)
    _switched_on_ago(config, 300)

    async with running_service(config) as service:
        await async_wait_for(_relay_applied(config, True, on_version + 1), what="relay restored on")
        restored = on_version + 1
        wire = wire_of(service.runners[IO].driver)
        wire.advance(280)  # (the 20 s to spare: the wall clock this test takes from here)
        polls = service.runners[IO].reads
        await async_wait_for(lambda: service.runners[IO].reads >= polls + 2, what="two more polls")
        assert wire.pin(18).level is True  # not yet
        wire.advance(21)
        await async_wait_for(_relay_applied(config, False, restored + 1), what="switched off by the auto-off timer")
        assert twin_prop(config, "relay").desired_version == restored + 1
        assert wire.pin(18).states == [False, True, False]

    async with running_service(config) as service:
        await async_wait_for(_relay_applied(config, False, restored + 2), what="off restored")
        assert wire_of(service.runners[IO].driver).pin(18).states == [False]  # opened off, written off: never on


async def test_a_restart_gives_a_restored_relay_only_what_is_left_of_its_auto_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """auto_off_s is a safety limit: a relay restored on is switched off auto_off_s after it was set on
    (its desired_ts, wall clock), not auto_off_s after each start: a mapper or device loop restarting
    more often than that kept the relay on for good. The restore's new version keeps the time the
    value was set, so each later start counts from it too."""
    caplog.set_level(logging.INFO, logger="mapper.device")
    relay = "{pin: 18, direction: out, initial: restore, auto_off_s: 600}"
    _, config, on_version = await _relay_switched_on_then_stopped(tmp_path, relay)
    set_at = _switched_on_ago(config, 570)  # 30 s left

    for restart in (1, 2, 3):  # restarting: each start restores it on, none gives it more time
        async with running_service(config) as service:
            await async_wait_for(_relay_applied(config, True, on_version + restart), what="relay restored on")
            assert twin_prop(config, "relay").desired_ts == set_at
            wire = wire_of(service.runners[IO].driver)
            assert wire.pin(18).states == [False, True]
            if restart < 3:
                continue
            wire.advance(15)  # (the other 15 s: the wall clock this test takes)
            polls = service.runners[IO].reads
            await async_wait_for(lambda: service.runners[IO].reads >= polls + 2, what="two more polls")
            assert wire.pin(18).level is True  # not yet
            wire.advance(16)  # the 30 s left are over: it used to stay on 600 s from this start
            await async_wait_for(_relay_applied(config, False, on_version + 4), what="switched off by its auto-off")
            assert wire.pin(18).states == [False, True, False]
    assert "s left of its auto-off" in caplog.text


@pytest.mark.parametrize(
    ("ago", "why"),
    [
        (601, "its 600 s auto-off, counted from when it was set ("),
        (-3600, "the clock is behind (a Pi without a real-time clock before its time sync?), so how long it has"
                " been on cannot be told, and its 600 s auto-off is taken as spent"),
    ],
)
async def test_a_restored_relay_whose_auto_off_is_spent_is_not_switched_on(tmp_path: Path, ago: float, why: str,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A relay whose auto_off_s has run out since it was set on (or whose time cannot be told: the clock
    is behind it) is not switched on at the start: it stays off, and off becomes the desired value, as
    the auto-off itself does; the next start leaves it off."""
    caplog.set_level(logging.WARNING, logger="mapper.device")
    relay = "{pin: 18, direction: out, initial: restore, auto_off_s: 600}"
    _, config, on_version = await _relay_switched_on_then_stopped(tmp_path, relay)
    _switched_on_ago(config, ago)

    async with running_service(config) as service:
        await async_wait_for(_relay_applied(config, False, on_version + 1), what="off made the desired value")
        polls = service.runners[IO].reads
        await async_wait_for(lambda: service.runners[IO].reads >= polls + 2, what="two more polls")
        assert wire_of(service.runners[IO].driver).pin(18).states == [False]  # opened off, never switched on
        version = twin_prop(config, "relay").desired_version
    assert "default/io/relay: the desired value True is not written: " in caplog.text and why in caplog.text
    assert f"desired value is now False (version {version})" in caplog.text

    async with running_service(config) as service:
        await async_wait_for(_relay_applied(config, False, version + 1), what="off restored")
        assert wire_of(service.runners[IO].driver).pin(18).states == [False]


@pytest.mark.parametrize("ago", [570, 601])
async def test_a_relay_restored_while_the_twin_is_locked_gets_only_what_is_left_of_its_auto_off(
        tmp_path: Path, ago: float) -> None:
    """While another process holds the twin's write lock, a restarting device's restore writes the
    twin's desired value to the relay at once: with what is left of auto_off_s (570 s ago: 30 s), or
    not at all (601 s ago: spent, off becomes the desired value once the twin takes writes)."""
    from helpers import TwinLock

    relay = "{pin: 18, direction: out, initial: restore, auto_off_s: 600}"
    _, config, on_version = await _relay_switched_on_then_stopped(tmp_path, relay)
    _switched_on_ago(config, ago)
    async with running_service(config) as service:
        await async_wait_for(_relay_applied(config, ago < 600, on_version + 1), what="the first restore")
        await service.twin(lambda s: s.conn.execute("PRAGMA busy_timeout=0"))  # a failed write fails at once
        with TwinLock(config.twin.path) as lock:
            definition = service.runners[IO].definition
            await service.stop_device(IO)
            service.start_device(definition, service._tg)  # noqa: SLF001 - as a reload restarts it
            runner = service.runners[IO]
            await async_wait_for(lambda: runner.reads >= 3, what="reads under the lock")
            wire = wire_of(runner.driver)
            assert wire.pin(18).states == ([False, True] if ago < 600 else [False])
            lock.release()
        if ago < 600:
            await async_wait_for(_relay_applied(config, True, on_version + 2), what="the restored version applied")
            wire.advance(40)  # 30 s left (and 10 s for this test's wall clock): it used to get 600 s again
        await async_wait_for(_relay_applied(config, False), what="off the desired value")
        assert wire.pin(18).level is False


async def test_restore_after_a_crash_restart_of_the_device_loop(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The device loop crashes (a bug while recording another output's apply, before the twin took
    it; the twin refusing it, as this test had it, no longer crashes the loop: test_twin_lock.py) and is
    restarted: its driver is closed (every output off) and opened again. The `initial: restore`
    relay comes back on, its desired value applied before and not touched by the crash; without
    restore it would have been reset to its boot state."""
    caplog.set_level(logging.ERROR, logger="mapper.service")
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "model.yaml").write_text(MODEL.replace("{name: button, type: BOOLEAN, accessMode: ReadOnly}",
                                                      "{name: lamp, type: BOOLEAN, accessMode: ReadWrite}"))
    props = RELAY % "{pin: 18, direction: out, initial: restore}" + \
        RELAY.replace("relay", "lamp") % "{pin: 19, direction: out}"
    (devices / "io.yaml").write_text(device_yaml("io", cycles(props, 50)))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    async with running_service(config) as service:
        runner = service.runners[IO]
        with TwinStore.open(config.twin.path) as store:
            _, on_version = store.set_desired(IO, "relay", True)
        await async_wait_for(_relay_applied(config, True), what="relay on")
        wire = wire_of(runner.driver)
        crashed: list[str] = []
        on_applied = runner._on_applied

        async def bug_once(change, error, **kwargs) -> None:  # noqa: ANN001, ANN003
            if change.property == "lamp" and not crashed:
                crashed.append(change.property)
                raise RuntimeError("a bug while recording the apply")
            await on_applied(change, error, **kwargs)

        runner._on_applied = bug_once
        with TwinStore.open(config.twin.path) as store:
            store.set_desired(IO, "lamp", True)
        await async_wait_for(lambda: "device loop crashed" in caplog.text, what="the loop crashed")
        await async_wait_for(lambda: twin_prop(config, "relay").desired_version == on_version + 1,
                             timeout=30, what="the relay restored by the restarted loop")
        await async_wait_for(_relay_applied(config, True, on_version + 1), what="relay on again")
        assert service.runners[IO] is runner  # the same runner, its driver opened again
        switching = [c for c in wire.pin(18).calls if c[0] in ("setup", "output", "cleanup")]
        assert switching == [("setup", "OUT", "initial=LOW"), ("output", "HIGH"),  # opened off, restored on
                             ("output", "LOW"), ("cleanup",),  # off as the crashed loop's driver closed
                             ("setup", "OUT", "initial=LOW"), ("output", "HIGH")]  # opened off, restored on again
        await async_wait_for(lambda: not pending(config) and twin_prop(config, "lamp").reported is True,
                             what="the lamp's value applied too")
