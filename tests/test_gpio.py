"""The `gpio` driver against FakePins, a backend that models the wire and keeps each pin's history."""

from __future__ import annotations

import asyncio
from pathlib import Path
from textwrap import dedent

import pytest

from devices.definitions import DeviceDefinition
from devices.drivers.gpio import GpioDriver
from devices.errors import DefinitionError, WriteError
from devices.ids import DeviceId
from devices.loader import load
from devices.pins import FakePins, PinInUse, PinInvalid, RPiGPIOPins
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
def fake() -> FakePins:
    return FakePins()


def opened(defn: DeviceDefinition, fake: FakePins) -> GpioDriver:
    driver = GpioDriver(defn, pins=fake)
    driver.open()
    return driver


def test_output_drives_pin_and_reads_back(tmp_path: Path, fake: FakePins) -> None:
    """A write drives the pin; read returns the level read back from the wire."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}")
    driver = opened(defn, fake)
    relay = defn.prop("relay")
    assert driver.read(relay) is False
    driver.write(relay, True)
    assert driver.read(relay) is True
    driver.write(relay, False)
    assert fake.pin(18).states == [False, True, False]
    assert ("read",) in fake.pin(18).calls


def test_active_low_inverts_logic(tmp_path: Path, fake: FakePins) -> None:
    """active_low: logical on is electrical low, and read-back is inverted too."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, active_low: true}")
    driver = opened(defn, fake)
    relay = defn.prop("relay")
    assert fake.pin(18).level is True  # off = high for an active-low relay board
    driver.write(relay, True)
    assert fake.pin(18).level is False
    assert driver.read(relay) is True
    assert fake.pin(18).states == [True, False]


def test_boot_state_is_applied_at_open(tmp_path: Path, fake: FakePins) -> None:
    """`initial: true` sets the output on when the pin is opened, with no glitch through off."""
    defn = definition(tmp_path, relay="{pin: 23, direction: out, initial: true, active_low: true}")
    driver = opened(defn, fake)
    assert fake.pin(23).calls[0] == ("setup_output", False)
    assert fake.pin(23).states == [False]
    assert driver.read(defn.prop("relay")) is True


def test_auto_off_on_the_backend_clock(tmp_path: Path, fake: FakePins) -> None:
    """An output switched on reverts after auto_off_s; a read after the deadline sees it off."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 60}")
    driver = opened(defn, fake)
    relay = defn.prop("relay")
    driver.write(relay, True)
    fake.advance(59.9)
    assert driver.read(relay) is True
    fake.advance(0.2)
    assert driver.read(relay) is False
    assert fake.pin(18).states == [False, True, False]
    driver.close()


def test_auto_off_fires_without_reads(tmp_path: Path, fake: FakePins) -> None:
    """The safety timer switches the output off even when nothing reads it."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 0.05}")
    driver = opened(defn, fake)
    driver.write(defn.prop("relay"), True)
    assert fake.pin(18).wait_for(False, timeout=5)
    assert fake.pin(18).states == [False, True, False]
    driver.close()


def test_newer_write_cancels_pending_auto_off(tmp_path: Path, fake: FakePins) -> None:
    """Switching off and on again restarts the auto-off deadline from the new write."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, auto_off_s: 60}")
    driver = opened(defn, fake)
    relay = defn.prop("relay")
    driver.write(relay, True)
    fake.advance(50)
    driver.write(relay, False)
    driver.write(relay, True)
    fake.advance(50)
    assert driver.read(relay) is True
    fake.advance(11)
    assert driver.read(relay) is False
    driver.close()


def test_input_pull_up_reads_high_until_pressed(tmp_path: Path, fake: FakePins) -> None:
    """A button to ground on a pulled-up input: released reads false, pressed reads true (active_low)."""
    defn = definition(tmp_path, button="{pin: 27, direction: in, pull: up, active_low: true}")
    driver = opened(defn, fake)
    button = defn.prop("button")
    assert fake.pin(27).level is True  # the pull-up holds the line high
    assert driver.read(button) is False
    fake.pin(27).drive_low()
    assert driver.read(button) is True
    fake.pin(27).disconnect()
    assert driver.read(button) is False


def test_input_debounce_reports_only_settled_level(tmp_path: Path, fake: FakePins) -> None:
    """A bouncing contact is reported only after the line has been stable for debounce_ms."""
    defn = definition(tmp_path, button="{pin: 27, direction: in, pull: up, active_low: true, debounce_ms: 20}")
    driver = opened(defn, fake)
    button = defn.prop("button")
    fake.pin(27).bounce(False, True, False, True, False, every_s=0.002)
    assert driver.read(button) is False  # still bouncing: the last settled level is "released"
    fake.advance(0.010)
    assert driver.read(button) is False
    fake.advance(0.011)
    assert driver.read(button) is True  # 21 ms without an edge: pressed
    fake.pin(27).drive_high()
    fake.advance(0.005)
    assert driver.read(button) is True
    fake.advance(0.020)
    assert driver.read(button) is False


def test_input_cannot_be_written(tmp_path: Path, fake: FakePins) -> None:
    """Writing an input is refused with a message naming the pin."""
    defn = definition(tmp_path, button="{pin: 27, direction: in}")
    driver = opened(defn, fake)
    with pytest.raises(WriteError, match="GPIO27 is an input"):
        driver.write(defn.prop("button"), True)


def test_only_declared_pins_touched_and_released_on_close(tmp_path: Path, fake: FakePins) -> None:
    """open() sets up exactly the declared pins; close() releases all of them, twice is harmless."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}", button="{pin: 27, direction: in, pull: up}")
    driver = opened(defn, fake)
    assert fake.in_use() == [18, 27]
    driver.close()
    driver.close()
    assert fake.in_use() == []
    assert fake.pin(18).calls[-1] == ("release",)
    assert fake.pin(27).callback is None


def test_failed_open_releases_pins_already_set_up(tmp_path: Path, fake: FakePins) -> None:
    """If one pin is busy, the pins set up before it are released again."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}", button="{pin: 27, direction: in}")
    fake.setup_input(27, pull="off")  # someone else holds GPIO27
    driver = GpioDriver(defn, pins=fake)
    with pytest.raises(PinInUse, match="GPIO27"):
        driver.open()
    assert fake.in_use() == [27]
    assert fake.pin(18).calls[-1] == ("release",)


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


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{pin: 28, direction: out}", "pin: GPIO28 is not a BCM pin on the 40-pin header: use 0-27"),
        ("{pin: 5, direction: sideways}", "'sideways' is not allowed"),
        ("{pin: 5, direction: out, pull: up}", "pull 'up' applies to inputs only"),
        ("{pin: 5, direction: in, auto_off_s: 3}", "auto_off_s applies to outputs only"),
        ("{pin: 5, direction: out, colour: red}", "colour: unknown field"),
    ],
)
def test_visitor_validation(tmp_path: Path, config: str, message: str) -> None:
    """Bad pin settings are definition errors that name the field and the fix."""
    (tmp_path / "model.yaml").write_text(MODEL)
    (tmp_path / "io.yaml").write_text(device_yaml("io", RELAY % config))
    with pytest.raises(DefinitionError) as info:
        load([tmp_path], base=tmp_path)
    assert message in str(info.value)
    assert "io.yaml:9:" in str(info.value)


def test_fake_pins_refuse_what_a_pi_refuses(fake: FakePins) -> None:
    """The fake rejects pins outside 0-27, double set-up and writes to inputs, like the hardware."""
    with pytest.raises(PinInvalid):
        fake.pin(40)
    fake.setup_input(5, pull="down")
    assert fake.read(5) is False
    with pytest.raises(PinInUse):
        fake.setup_output(5, level=True)
    with pytest.raises(Exception, match="set up as 'in'"):
        fake.write(5, True)


class _RecordingGPIO:
    """Stand-in for the RPi.GPIO module's API surface (constants and calls), to check the adapter's tables."""

    BCM, OUT, IN, HIGH, LOW = "BCM", "OUT", "IN", 1, 0
    PUD_UP, PUD_DOWN, PUD_OFF = 22, 21, 20
    RISING, FALLING, BOTH = 31, 32, 33

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "setup" and args[0] == 13:
                raise RuntimeError("No access to /dev/mem.  Try running as root!")
            if name == "setup" and args[0] == 14:
                raise ValueError("The channel sent is invalid on a Raspberry Pi")
            return 1

        return record


def test_rpigpio_adapter_translates_and_maps_errors() -> None:
    """RPiGPIOPins translates pulls/levels to RPi.GPIO constants and maps its bare errors to ours."""
    gpio = _RecordingGPIO()
    pins = RPiGPIOPins(gpio)
    pins.setup_input(5, pull="up")
    pins.setup_output(6, level=True)
    assert ("setup", (5, "IN"), {"pull_up_down": 22}) in gpio.calls
    assert ("setup", (6, "OUT"), {"initial": 1}) in gpio.calls
    assert pins.read(5) is True
    with pytest.raises(PinInUse):
        pins.setup_output(5, level=False)
    with pytest.raises(Exception, match="gpio` group") as info:
        pins.setup_output(13, level=False)
    assert type(info.value).__name__ == "PinUnavailable"
    with pytest.raises(PinInvalid, match="invalid on a Raspberry Pi"):
        pins.setup_output(14, level=False)
    with pytest.raises(PinInvalid, match="unknown pull 'sideways'"):
        pins.setup_input(7, pull="sideways")  # type: ignore[arg-type]
    pins.release(5)
    pins.release(99 - 90)  # never set up: nothing is touched
    assert ("cleanup", (5,), {}) in gpio.calls
    assert not any(c[0] == "cleanup" and c[1] == (9,) for c in gpio.calls)


def test_shipped_relay_example_runs_on_fake_pins() -> None:
    """The Pi relay example validates and drives an active-low GPIO17 that starts off."""
    repo = Path(__file__).resolve().parents[1]
    defn = load([repo / "devices/examples/pi/relay-gpio.yaml"]).devices[DeviceId("default", "fan-relay-pi")]
    fake = FakePins()
    driver = opened(defn, fake)
    assert fake.pin(17).states == [True]
    driver.write(defn.prop("power"), True)
    assert fake.pin(17).states == [True, False]
    driver.close()
    assert fake.in_use() == []


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
        driver = service.runners[device].driver
        assert isinstance(driver.pins, FakePins)
        with TwinStore.open(config.twin.path) as store:
            store.set_desired(device, "relay", "true")

        def applied() -> bool:
            with TwinStore.open(config.twin.path) as store:
                prop = store.device(device).properties["relay"]
            return prop.reported is True and not prop.delta

        await async_wait_for(applied, what="relay reported on")
        assert driver.pins.pin(18).level is False  # active low: on = electrical low
    assert driver.pins.in_use() == []  # released on shutdown


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
        assert old.pins.in_use() == [18]
        (devices / "io.yaml").write_text(relay.replace("pin: 18", "pin: 19"))
        assert await reload_devices(service, config)
        await asyncio.wait_for(service.runners[device].first_open_done.wait(), 10)
        new = service.runners[device].driver
        assert new is not old
        assert old.pins.in_use() == []
        assert new.pins.in_use() == [19]
    assert new.pins.in_use() == []


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


def test_edges_ask_the_device_loop_to_read_once_settled(tmp_path: Path, fake: FakePins) -> None:
    """Every edge calls `changed(button, debounce_s)`; outputs never do, and no listener is harmless."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out}",
                      button="{pin: 27, direction: in, pull: up, active_low: true, debounce_ms: 25}")
    driver = opened(defn, fake)
    fake.pin(27).drive_low()  # nobody listens yet: nothing happens
    calls: list[tuple[str, float]] = []
    driver.on_change = lambda prop, settle_s: calls.append((prop.name, settle_s))
    fake.pin(27).bounce(True, False, every_s=0.002)
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
        fake = runner.driver.pins
        await async_wait_for(lambda: history(config, "button") == [False], what="the first poll: released")
        polls = runner.reads
        line = fake.pin(27)
        line.bounce(False, True, False, every_s=0.002)  # pressed (to ground), with contact bounce
        fake.advance(0.021)  # the line has been quiet for debounce_ms on the backend's clock
        await async_wait_for(lambda: history(config, "button") == [False, True], what="pressed in the twin")
        line.bounce(True, False, True, every_s=0.002)  # released
        fake.advance(0.021)
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


def test_boot_state_on_starts_the_auto_off_timer(tmp_path: Path, fake: FakePins) -> None:
    """`initial: true` with auto_off_s: switched off that long after open, and the driver says so."""
    defn = definition(tmp_path, relay="{pin: 18, direction: out, initial: true, auto_off_s: 60}")
    driver = opened(defn, fake)
    reverts: list[tuple[str, object, str]] = []
    driver.on_revert = lambda prop, value, reason: reverts.append((prop.name, value, reason))
    relay = defn.prop("relay")
    assert driver.boot_value(relay) is True
    fake.advance(60.1)
    assert driver.read(relay) is False
    assert reverts == [("relay", False, "auto-off after 60 s")]
    driver.close()


async def test_auto_off_makes_off_the_desired_value(tmp_path: Path) -> None:
    """When auto-off fires, desired becomes false as a new, applied version: no delta, and the relay stays off."""
    relay = "{pin: 18, direction: out, active_low: true, auto_off_s: 0.05}"
    devices = write_io(tmp_path / "dev", cycles(RELAY % relay, 50))
    config = load_config(write_config(tmp_path / "mapper.yaml", devices, tmp_path / "twin.db"))
    async with running_service(config) as service:
        pin = service.runners[IO].driver.pins.pin(18)
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
        assert service.runners[IO].driver.pins.pin(18).states == [True]  # booted off, never switched on

    with TwinStore.open(config.twin.path) as store:
        store.set_desired(IO, "relay", True)  # set while the mapper is down: not applied yet
    async with running_service(config) as service:
        await async_wait_for(applied(True), what="pending desired applied at start")
        assert service.runners[IO].driver.pins.pin(18).states == [True, False]
