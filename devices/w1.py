"""The host's 1-wire bus, as `mapper discover` and `mapper validate --config` see it.

- `discover(root)`: the w1-therm sensors the kernel lists in `root` (/sys/bus/w1/devices), each
  read once, and the Device documents that run them (`device_documents`).
- `bus_warnings(devices)`: a configured `ds18b20` device whose `w1_dir` does not exist (the
  overlay not enabled) or whose `sensor_id` the bus does not list (a typo in the id).
- `pin_conflicts(devices, config_txt)`: a device claiming the GPIO pin that the w1-gpio overlay
  of the Pi's config.txt gives the 1-wire bus: the kernel holds that pin, so a DHT or a GPIO
  input or output there fails, or disturbs the bus.
- `host_warnings(devices)`: both, as `mapper validate --config`, `mapper run`'s start and
  `mapper install-service`'s start checks give them (one list, the same in all three).

Both paths are the hardware boundary and can be pointed elsewhere: `MAPPER_W1_ROOT` (or
`mapper discover --w1-root`) for the w1 devices directory, `MAPPER_BOOT_CONFIG` for config.txt.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devices.definitions import DeviceDefinition
from devices.drivers.ds18b20 import _SENSOR_ID, CHECK_WIRING, DEFAULT_W1_DIR, W1ReadError, read_celsius
from devices.ids import DeviceId

W1_ROOT_ENV = "MAPPER_W1_ROOT"
BOOT_CONFIG_ENV = "MAPPER_BOOT_CONFIG"
# Bookworm's and later images; older ones had it in /boot (Bookworm leaves a stub there pointing on).
BOOT_CONFIGS = (Path("/boot/firmware/config.txt"), Path("/boot/config.txt"))
W1_DEFAULT_PIN = 4  # `dtoverlay=w1-gpio` without gpiopin=
# The pins each w1-gpio overlay holds, by parameter, with their defaults (the overlays' README).
OVERLAY_PINS = {"w1-gpio": {"gpiopin": W1_DEFAULT_PIN}, "w1-gpio-pullup": {"gpiopin": W1_DEFAULT_PIN, "extpullup": 5}}
PIN_ROLES = {"gpiopin": "data line", "extpullup": "pull-up drive (extpullup)"}
ENABLE_OVERLAY = ("add `dtoverlay=w1-gpio,gpiopin=N` (N: the BCM number of the GPIO the sensors' data line is"
                  " wired to; without gpiopin, GPIO4) to /boot/firmware/config.txt (/boot/config.txt on images"
                  " older than Bookworm), then reboot")
# The w1-therm families (as _SENSOR_ID), each chip's name: the Device names discover writes use it.
CHIPS = {"10": "DS18S20", "22": "DS1822", "28": "DS18B20", "3b": "DS1825", "42": "DS28EA00"}
# The DeviceModel `mapper discover --yaml` writes out with the devices: the sensor's whole range, so that
# it fits air and water alike (the example's model, ds18b20-pi-model, narrows it to water's 0..60 C).
MODEL = "ds18b20-model"
READ_TIMEOUT_S = 5.0  # a sensor's read, at most (the ds18b20 driver's default timeout_s)


def w1_root(given: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """--w1-root, else MAPPER_W1_ROOT, else the kernel's /sys/bus/w1/devices."""
    env = os.environ if env is None else env
    return Path(given or env.get(W1_ROOT_ENV) or DEFAULT_W1_DIR)


def boot_config(env: Mapping[str, str] | None = None) -> Path | None:
    """The config.txt the Pi boots with (MAPPER_BOOT_CONFIG, else the first of BOOT_CONFIGS that
    exists), or None: not a Pi, or a Pi whose overlays this cannot see."""
    env = os.environ if env is None else env
    if given := env.get(BOOT_CONFIG_ENV):
        return Path(given)
    return next((path for path in BOOT_CONFIGS if path.is_file()), None)


def w1_overlay_pins(config_txt: Path) -> list[tuple[int, int, str]]:
    """(BCM pin, line, what the bus uses it for) of each pin a w1-gpio overlay in config.txt holds:
    `dtoverlay=w1-gpio` (data on GPIO4), `dtoverlay=w1-gpio,gpiopin=22`, or a `dtparam=gpiopin=22`
    line after it; w1-gpio-pullup holds a second pin, which drives the external pull-up (extpullup,
    GPIO5 by default). Conditional sections ([pi4], [cm4] ...) are not told apart: an overlay in
    any of them counts. The files config.txt includes are read by pin_conflicts (_held_pins)."""
    try:
        lines = config_txt.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found: list[tuple[dict[str, int], int]] = []  # (its pin parameters, its line)
    current: dict[str, int] | None = None  # the w1-gpio overlay that a dtparam= line sets a parameter of
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        key, _, value = line.partition("=")
        key = key.strip()
        if key == "dtoverlay":
            name, *params = [part.strip() for part in value.split(",")]
            current = None
            if name in OVERLAY_PINS:
                current = dict(OVERLAY_PINS[name])
                found.append((current, number))
                _apply_params(current, params)
        elif key == "dtparam" and current is not None:
            _apply_params(current, [part.strip() for part in value.split(",")])
    return [(pin, number, PIN_ROLES[param]) for pins, number in found for param, pin in pins.items()]



def _held_pins(config_txt: Path, seen: frozenset[Path] = frozenset()) -> list[tuple[int, Path, int, str]]:
    """(BCM pin, file, line, what the bus uses it for) of config.txt's w1-gpio overlays and those of the
    files it includes (`include extra.txt`: a file beside it, as the firmware reads it)."""
    held = [(pin, config_txt, line, role) for pin, line, role in w1_overlay_pins(config_txt)]
    try:
        lines = config_txt.read_text(errors="replace").splitlines()
    except OSError:
        return held
    for raw in lines:
        command, _, name = raw.split("#", 1)[0].strip().partition(" ")
        if command == "include" and name.strip():
            included = config_txt.parent / name.strip()
            if included not in seen and included != config_txt:
                held += _held_pins(included, seen | {config_txt})
    return held


def _apply_params(overlay: dict[str, int], params: list[str]) -> None:
    for param in params:
        name, _, value = (part.strip() for part in param.partition("="))
        if name in overlay and value.isdigit():
            overlay[name] = int(value)


def pin_conflicts(devices: Mapping[DeviceId, DeviceDefinition], config_txt: Path | None) -> list[str]:
    """A warning for each device claiming a GPIO pin (Driver.claims: `gpio:N`, a DHT's data pin, a
    GPIO property's pin) that config.txt gives the 1-wire bus."""
    if config_txt is None:
        return []
    held = {pin: (where, number, role) for pin, where, number, role in _held_pins(config_txt)}
    if not held:
        return []
    from devices.drivers.base import load_driver

    found = []
    for device_id, definition in sorted(devices.items()):
        try:
            claims = list(load_driver(definition.protocol).claims(definition))
        except Exception:  # noqa: BLE001 - no driver here, or a driver's bug: said by the loader's own checks
            continue
        for resource, where in claims:
            kind, _, pin = resource.partition(":")
            if kind == "gpio" and pin.isdigit() and int(pin) in held:
                loaded_in, number, role = held[int(pin)]
                found.append(f"{definition.source}: device {device_id}: {where}: GPIO{pin} is the 1-wire bus's {role}"
                             f" ({loaded_in}:{number} loads the w1-gpio overlay on it): the kernel holds the pin, so"
                             f" this {definition.protocol} device's reads fail or disturb the bus; wire one of them to"
                             " another GPIO (the overlay's: dtoverlay=w1-gpio,gpiopin=N, then reboot)")
    return found


def host_warnings(devices: Mapping[DeviceId, DeviceDefinition]) -> list[str]:
    """The 1-wire warnings about the devices a mapper runs here (bus_warnings, then pin_conflicts
    against the config.txt this host boots with): said by `mapper validate --config`, by `mapper
    run` at its start and by `mapper install-service`'s start checks alike."""
    return bus_warnings(devices) + pin_conflicts(devices, boot_config())


def bus_warnings(devices: Mapping[DeviceId, DeviceDefinition]) -> list[str]:
    """A warning for each `ds18b20` device whose w1 directory does not exist (the bus not enabled)
    or does not list its sensor_id (a typo, or a sensor not connected): looked at, nothing read."""
    found = []
    for device_id, definition in sorted(devices.items()):
        if definition.protocol != "ds18b20" or not hasattr(definition.protocol_config, "sensor_id"):
            continue
        w1_dir, sensor_id = definition.protocol_config.w1_dir, definition.protocol_config.sensor_id
        where = f"{definition.source}: device {device_id}"
        try:
            entries = sorted(entry.name for entry in w1_dir.iterdir())
        except FileNotFoundError:
            found.append(f"{where}: no 1-wire bus here: {w1_dir} does not exist, so the device cannot be read; to"
                         f" enable the bus, {ENABLE_OVERLAY}")
            continue
        except OSError as exc:
            found.append(f"{where}: cannot list {w1_dir}: {exc.strerror or exc}")
            continue
        if sensor_id in entries:
            continue
        sensors = [entry for entry in entries if _SENSOR_ID.fullmatch(entry)]
        close = difflib.get_close_matches(sensor_id, sensors, n=1, cutoff=0.6)
        listed = (f"; the bus lists {', '.join(sensors)}" + (f" (did you mean {close[0]}?)" if close else "")
                  if sensors else "; the bus lists no sensor at all")
        found.append(f"{where}: spec.protocol.configData.sensor_id: {sensor_id} is not on the 1-wire bus ({w1_dir}):"
                     f" a typo in the id, or the sensor is not connected{listed} (`mapper discover` lists them)")
    return found


# -- discovery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sensor:
    id: str
    celsius: float | None = None
    error: W1ReadError | None = None

    @property
    def chip(self) -> str:
        return CHIPS[self.id.split("-", 1)[0]]

    @property
    def device_name(self) -> str:
        """`ds18b20-0316a2795bff`: the chip and the serial, a valid Device name (DNS-1123)."""
        return f"{self.chip.lower()}-{self.id.split('-', 1)[1]}"


@dataclass(frozen=True)
class Bus:
    root: Path
    exists: bool
    masters: list[str] = field(default_factory=list)
    sensors: list[Sensor] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # other 1-wire devices: not w1-therm sensors

    def problem(self) -> str | None:
        """Why nothing was found, with what to do; None when there are sensors."""
        if not self.exists:
            return f"no 1-wire bus: {self.root} does not exist (the w1-gpio overlay is not enabled); {ENABLE_OVERLAY}"
        if not self.masters:
            return f"no 1-wire bus: {self.root} lists no bus master (w1_bus_master1); {ENABLE_OVERLAY}"
        if not self.sensors:
            ghosts = [entry for entry in self.others if entry.startswith("00-")]
            ghost = (f" ({', '.join(ghosts)}: ids such as these are what a bus without its pull-up reads)"
                     if ghosts else "")
            return (f"the 1-wire bus ({', '.join(self.masters)} in {self.root}) lists no temperature sensor{ghost}:"
                    f" {CHECK_WIRING}; the sensor appears within a few seconds of being connected")
        return None


def discover(root: Path) -> Bus:
    """The w1-therm sensors in `root`, each read once (~0.75 s each: the kernel measures at each read,
    one sensor of a bus at a time), each read given up after READ_TIMEOUT_S."""
    try:
        entries = sorted(entry.name for entry in root.iterdir())
    except FileNotFoundError:
        return Bus(root, exists=False)
    except OSError as exc:  # (a file, a directory this user may not list)
        raise ValueError(f"cannot list the w1 devices directory {root}: {exc.strerror or exc}") from None
    masters = [entry for entry in entries if entry.startswith("w1_bus_master")]
    sensors, others = [], []
    for entry in entries:
        if _SENSOR_ID.fullmatch(entry):
            sensors.append(_read_bounded(root, entry))
        elif entry not in masters and re.fullmatch(r"[0-9a-f]{2}-[0-9a-f]{12}", entry):
            others.append(entry)
    return Bus(root, exists=True, masters=masters, sensors=sensors, others=others)


def _read_bounded(root: Path, sensor_id: str, timeout_s: float = READ_TIMEOUT_S) -> Sensor:
    """One read of a sensor, given up after `timeout_s` (the driver's default timeout_s): a read the
    kernel never returns (a hung bus) left `mapper discover` waiting for ever, with nothing shown.
    The read goes on in a daemon thread, which the command's exit ends."""
    outcome: list[Sensor] = []

    def read() -> None:
        try:
            outcome.append(Sensor(sensor_id, celsius=read_celsius(root, sensor_id, sensor_id)))
        except W1ReadError as exc:
            outcome.append(Sensor(sensor_id, error=exc))
        except Exception as exc:  # noqa: BLE001 - shown as the sensor's failed read, not a traceback
            outcome.append(Sensor(sensor_id, error=W1ReadError("io", f"{sensor_id}: {exc}")))

    reader = threading.Thread(target=read, name=f"w1-read-{sensor_id}", daemon=True)
    reader.start()
    reader.join(timeout_s)
    if outcome:
        return outcome[0]
    return Sensor(sensor_id, error=W1ReadError("timeout", f"{sensor_id}: no answer within {timeout_s:g} s: the"
                                                          f" kernel's read did not return; {CHECK_WIRING}"))


def model_document() -> str:
    """The DeviceModel the discovered devices use (MODEL): one FLOAT temperature, read-only, in Celsius,
    over the DS18B20's range (-55..125 C); narrow minimum/maximum to what it measures and readings
    outside are flagged out_of_range."""
    return f"""apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata:
  name: {MODEL}
  namespace: default
spec:
  protocol: ds18b20
  properties:
    - name: temperature
      description: Temperature (1-wire)
      type: FLOAT
      accessMode: ReadOnly
      minimum: "-55"
      maximum: "125"
      unit: Celsius
"""


def device_documents(bus: Bus) -> str:
    """A Device document for each sensor, on the DeviceModel MODEL."""
    w1_dir = "" if bus.root == DEFAULT_W1_DIR else f"\n      w1_dir: {bus.root.absolute()}"
    documents = []
    for sensor in bus.sensors:
        seen = (f"{sensor.celsius:g} C when discovered" if sensor.error is None
                else f"its read failed when discovered ({sensor.error.kind}): check it before running")
        documents.append(f"""# {sensor.chip} {sensor.id}: {seen}
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata:
  name: {sensor.device_name}
  namespace: default
spec:
  deviceModelRef:
    name: {MODEL}
  protocol:
    protocolName: ds18b20
    configData:
      sensor_id: {sensor.id}{w1_dir}
  properties:
    - name: temperature
      visitors:
        protocolName: ds18b20
        configData: {{}}
      collectCycle: 5000
      reportCycle: 10000
      reportToCloud: true
""")
    return "---\n".join(documents)
