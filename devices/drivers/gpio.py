"""The `gpio` protocol: relays, LEDs, buttons, reed switches and PIR sensors on GPIO pins.

Each property is one pin, described by its `visitors.configData`::

    pin: 17              # BCM number, 0-27
    direction: out       # out: a writable property drives the pin; in: the pin is read
    active_low: true     # logical true = electrical low (most relay boards, buttons to ground)
    initial: false       # outputs: the logical state set when the mapper opens the pin; `restore`:
                         #   opened off, then set to the twin's last desired value (see below)
    auto_off_s: 600      # outputs: switch back off this long after being switched on (safety;
                         #   finite, at most threading.TIMEOUT_MAX: about 292 years)
    pull: up             # inputs: up, down or off
    debounce_ms: 30      # inputs: a level counts only once it has been stable this long

Outputs report the level read back from the pin. Inputs are reported on change: every
edge asks the device loop (`Driver.changed`) to read the pin once it has been quiet for
`debounce_ms`, so a 100 ms button press between two collectCycle polls is recorded as
pressed and then released; a bouncing contact is reported only once it has settled. The
collectCycle poll still runs, as a backstop and for the periodic report.

An output with `auto_off_s` (its property ReadWrite) is switched off by a timer that long after it was switched on
(also when `initial: true` switched it on at open); the driver then tells the device loop
(`Driver.reverted`), which makes `false` the new desired value, so the twin shows no delta
and nothing switches the output on again until someone asks for it.

An output with `initial: restore` (its property ReadWrite) comes back as it was asked to be: at
every open (a start, a reload that changed its device, a restart of its device loop) the pin is set
up off, then the device loop writes the twin's last desired value to it (`restore_desired`), as
any desired value is written and read back. Its `auto_off_s` does not start again: it counts from
when that value was set (`time_limit`), so a restarting mapper cannot keep a relay on past it; with
nothing left, the output stays off and off becomes the desired value.
Without it (the default) a restart never switches a relay on by itself: an output starts in its
`initial` state, and that state replaces the desired value.

Only the declared pins are touched, each device claims its pins (two devices on one pin
is a definition error) and `close()` releases every pin, switching every output off (its
logical off, `active_low` applied) first: a relay is never left on when its device stops. The pin backend is passed in
(`GpioDriver(definition, pins=fake_rpi_gpio_pins(wire))` in tests); by default
`configData.pins` picks it: `rpi-gpio` (RPi.GPIO, or rpi-lgpio on a Pi 5) or `fake` (the same
adapter over a modelled RPi.GPIO module and wire, for demos and tests).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.drivers.base import Driver
from devices.errors import FieldError, ReadError, WriteError
from devices.extras import install_extra, missing_modules
from devices.pins import BcmPin, Pins, PinError, Pull, make_pins
from devices.values import PropertyType

log = logging.getLogger("mapper.gpio")

# The longest a threading.Timer can wait (about 292 years on 64-bit Linux): a longer auto_off_s
# (or .inf) would kill the timer's thread with an OverflowError and leave the output on.
AUTO_OFF_MAX_S = threading.TIMEOUT_MAX
_BOOL = TypeAdapter(bool)  # `initial`'s true/false, read as pydantic reads a bool ('on', 1, "true")


class GpioConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pins: Literal["rpi-gpio", "fake"] = "rpi-gpio"


class GpioVisitor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pin: BcmPin
    direction: Literal["in", "out"]
    active_low: bool = False
    # true/false: the state set at open. `restore`: opened off, then the device loop writes the twin's
    # last desired value to it (restore_desired).
    initial: bool | Literal["restore"] | None = None
    auto_off_s: float | None = Field(default=None, gt=0)
    pull: Pull = "off"
    debounce_ms: int = Field(default=0, ge=0, le=60_000)

    @field_validator("initial", mode="before")
    @classmethod
    def _initial_state(cls, value: object) -> object:
        # One message for the three choices (the union said "must be true or false" and "must be 'restore'" apart).
        if value is None or value == "restore":
            return value
        try:
            return _BOOL.validate_python(value)
        except ValidationError:
            raise ValueError(f"must be true, false or restore, got {value!r}") from None

    @field_validator("auto_off_s")
    @classmethod
    def _timer_can_wait(cls, value: float | None) -> float | None:
        if value is not None and not value <= AUTO_OFF_MAX_S:
            raise ValueError(f"must be a finite number of seconds, at most {AUTO_OFF_MAX_S:.0f}"
                             f" (the longest a timer can wait), got {value:g}")
        return value

    @model_validator(mode="after")
    def _fits_direction(self) -> GpioVisitor:
        # (FieldError: reported at the line of the setting that does not fit, not of configData)
        if self.direction == "out":
            if self.pull != "off":
                raise FieldError(("pull",), f"pull {self.pull!r} applies to inputs only: remove it or use direction: in")
            if self.debounce_ms:
                raise FieldError(("debounce_ms",), "debounce_ms applies to inputs only: remove it or use direction: in")
        else:
            if self.initial is not None:
                raise FieldError(("initial",), "initial applies to outputs only: remove it or use direction: out")
            if self.auto_off_s is not None:
                raise FieldError(("auto_off_s",), "auto_off_s applies to outputs only: remove it or use direction: out")
        return self


@dataclass
class _Input:
    stable: bool
    last_edge: float | None = None


@dataclass
class _Output:
    # Bumped on every write, so a pending auto-off never undoes a newer write.
    generation: int = 0
    off_at: float | None = None
    timer: threading.Timer | None = None


class GpioDriver(Driver):
    protocol = "gpio"
    lazy_modules = ("RPi", "lgpio")  # RPi.GPIO, or rpi-lgpio and lgpio on a Pi 5 (devices/pins.py)
    Config = GpioConfig
    Visitor = GpioVisitor

    def __init__(self, device: DeviceDefinition, *, pins: Pins | None = None) -> None:
        super().__init__(device)
        self.config: GpioConfig
        self.pins: Pins = pins if pins is not None else make_pins(self.config.pins)
        self._lock = threading.RLock()
        self._inputs: dict[int, _Input] = {}
        self._outputs: dict[int, _Output] = {}
        self._opened: list[int] = []
        self._props: dict[int, PropertyDefinition] = {p.visitor.pin: p for p in device.properties}

    @classmethod
    def config_problems(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """A pin is high or low: its property must be BOOLEAN (an INT property used to pass, then
        every read of it failed and the device never started). An input cannot be set: its
        property must not be ReadWrite (every desired value used to fail at the device).

        An output with `auto_off_s` must be ReadWrite: on a ReadOnly property (accessMode's
        default) nothing could switch it on again once the timer switched it off, so the timer
        could only ever end `initial: true` (its auto-off once crashed the device loop, whose
        restart re-opened the pin with `initial: true`, on again, forever). A ReadOnly output with
        only `initial` is allowed: a fixed level set at open (a sensor's power or enable line),
        read back and reported; but not `initial: restore`, which writes a desired value a ReadOnly
        property never has (the pin would stay off without a word)."""
        for i, prop in enumerate(device.properties):
            if prop.type is not PropertyType.BOOLEAN:
                yield (f"spec.properties[{i}].visitors",
                       f"a GPIO pin is on or off: property {prop.name!r} must be BOOLEAN in DeviceModel "
                       f"{device.model_name!r}, not {prop.type.value}")

        for i, prop in enumerate(device.properties):
            v = prop.visitor
            if prop.writable and getattr(v, "direction", None) == "in":
                yield (f"spec.properties[{i}].visitors",
                       f"property {prop.name!r} is ReadWrite in DeviceModel {device.model_name!r}, but GPIO{v.pin}"
                       " is an input: use direction: out, or accessMode: ReadOnly")
            if not prop.writable and getattr(v, "direction", None) == "out" and v.initial == "restore":
                yield (f"spec.properties[{i}].visitors.configData.initial",
                       f"property {prop.name!r} is not ReadWrite in DeviceModel {device.model_name!r} (accessMode"
                       f" defaults to ReadOnly), so it never has a desired value for initial: restore to write to"
                       f" GPIO{v.pin}: use accessMode: ReadWrite, or initial: true or false")
            if not prop.writable and getattr(v, "direction", None) == "out" and v.auto_off_s is not None:
                yield (f"spec.properties[{i}].visitors.configData.auto_off_s",
                       f"property {prop.name!r} is not ReadWrite in DeviceModel {device.model_name!r} (accessMode"
                       f" defaults to ReadOnly), so nothing could switch GPIO{v.pin} on again after auto_off_s switched it off:"
                       " use accessMode: ReadWrite, or remove auto_off_s")

    @classmethod
    def not_installed(cls, device: DeviceDefinition) -> str | None:
        if device.protocol_config.pins != "rpi-gpio" or not missing_modules("RPi.GPIO"):
            return None
        return ("pins: rpi-gpio needs RPi.GPIO, not installed here: install the `pi` extra"
                f" ({install_extra('pi')}: rpi-lgpio on a 64-bit Pi OS, RPi.GPIO on a 32-bit one)")

    @classmethod
    def claims(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        for i, prop in enumerate(device.properties):
            yield f"gpio:{prop.visitor.pin}", f"spec.properties[{i}].visitors.configData.pin"

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        try:
            for prop in self.device.properties:
                self._open_pin(prop)
        except PinError:
            self.close()
            raise

    def _open_pin(self, prop: PropertyDefinition) -> None:
        v: GpioVisitor = prop.visitor
        if v.direction == "out":
            on = v.initial is True  # `restore` opens off: the device loop then writes the desired value
            self.pins.setup_output(v.pin, level=on != v.active_low)
            self._opened.append(v.pin)
            out = self._outputs[v.pin] = _Output()
            if on:  # on from the start: the safety timer runs from now
                with self._lock:
                    self._arm_auto_off(prop, out, True, v.auto_off_s)
            return
        self.pins.setup_input(v.pin, pull=v.pull)
        self._opened.append(v.pin)
        self._inputs[v.pin] = _Input(stable=self.pins.read(v.pin) != v.active_low)
        self.pins.watch(v.pin, "both", self._on_edge)

    def close(self) -> None:
        with self._lock:
            for pin, out in self._outputs.items():
                if out.timer is not None:
                    out.timer.cancel()
                self._off_before_release(pin)
            opened, self._opened = self._opened, []
            self._inputs.clear()
            self._outputs.clear()
        for pin in opened:
            try:
                self.pins.release(pin)
            except PinError as exc:
                log.warning("%s: cannot release GPIO%d: %s", self.device.id, pin, exc)

    def _off_before_release(self, pin: int) -> None:
        """Switch an output off before its pin is released: a released line keeps driving its last
        level where the backend leaves it an output (lgpio on a Pi 5), and no auto-off timer is left."""
        v: GpioVisitor = self._props[pin].visitor
        try:
            self.pins.write(pin, v.active_low)
        except PinError as exc:
            log.error("%s/%s: cannot switch GPIO%d off before releasing it: %s",
                      self.device.id, self._props[pin].name, pin, exc)

    # -- inputs ----------------------------------------------------------------------------

    def boot_value(self, prop: PropertyDefinition) -> bool | None:
        v: GpioVisitor = prop.visitor
        return v.initial is True if v.direction == "out" else None

    def restore_desired(self, prop: PropertyDefinition) -> bool:
        """`initial: restore`: the device loop writes the twin's last desired value once the pin is open."""
        v: GpioVisitor = prop.visitor
        return v.direction == "out" and v.initial == "restore"

    def time_limit(self, prop: PropertyDefinition, value: object) -> float | None:
        """An output switched on is switched off by itself after auto_off_s."""
        v: GpioVisitor = prop.visitor
        return v.auto_off_s if v.direction == "out" and value else None

    @classmethod
    def reports_changes(cls, prop: PropertyDefinition) -> bool:
        # Inputs on every edge, outputs on auto-off: every property of this driver.
        return True

    def _on_edge(self, pin: int, level: bool, ticks: float) -> None:
        # Runs on the backend's thread: note when the line moved and ask the device loop to read
        # the pin once it has been quiet for debounce_ms; read() decides the settled level.
        with self._lock:
            line = self._inputs.get(pin)
            if line is None:
                return
            line.last_edge = ticks
        prop = self._props[pin]
        self.changed(prop, prop.visitor.debounce_ms / 1000)

    def _read_input(self, v: GpioVisitor) -> bool:
        level = self.pins.read(v.pin) != v.active_low
        with self._lock:
            line = self._inputs[v.pin]
            settled = line.last_edge is None or self.pins.ticks() - line.last_edge >= v.debounce_ms / 1000
            if settled:
                line.stable = level
            return line.stable

    # -- outputs ---------------------------------------------------------------------------

    def read(self, prop: PropertyDefinition) -> bool:
        v: GpioVisitor = prop.visitor
        try:
            if v.direction == "in":
                return self._read_input(v)
            self._auto_off_due(prop)
            return self.pins.read(v.pin) != v.active_low
        except KeyError:
            raise ReadError(f"{self.device.id}/{prop.name}: GPIO{v.pin} is not open", retryable=True) from None
        except PinError as exc:
            raise ReadError(f"{self.device.id}/{prop.name}: {exc}", retryable=True) from exc

    def write(self, prop: PropertyDefinition, value: object) -> None:
        self._write(prop, value, prop.visitor.auto_off_s)

    def write_for(self, prop: PropertyDefinition, value: object, seconds: float) -> None:
        """An on switched off after `seconds` (what is left of a restored value's auto_off_s), at most auto_off_s."""
        limit = prop.visitor.auto_off_s
        self._write(prop, value, None if limit is None else min(seconds, limit))

    def _write(self, prop: PropertyDefinition, value: object, auto_off_s: float | None) -> None:
        v: GpioVisitor = prop.visitor
        if v.direction != "out":
            raise WriteError(f"{self.device.id}/{prop.name}: GPIO{v.pin} is an input; it cannot be set")
        on = bool(value)
        with self._lock:
            out = self._outputs.get(v.pin)
            if out is None:
                raise WriteError(f"{self.device.id}/{prop.name}: GPIO{v.pin} is not open")
            try:
                self.pins.write(v.pin, on != v.active_low)
            except PinError as exc:
                raise WriteError(f"{self.device.id}/{prop.name}: {exc}") from exc
            self._arm_auto_off(prop, out, on, auto_off_s)

    def _arm_auto_off(self, prop: PropertyDefinition, out: _Output, on: bool, seconds: float | None) -> None:
        out.generation += 1
        if out.timer is not None:
            out.timer.cancel()
        out.timer = out.off_at = None
        if on and seconds is not None:
            out.off_at = self.pins.ticks() + seconds
            # The timer switches off even if nobody reads; read() also checks the deadline,
            # which is what moves a backend with a simulated clock.
            out.timer = threading.Timer(seconds, self._auto_off, (prop, out.generation))
            out.timer.daemon = True
            out.timer.name = f"gpio-auto-off[{self.device.id}/{prop.name}]"
            out.timer.start()

    def _auto_off_due(self, prop: PropertyDefinition) -> None:
        with self._lock:
            out = self._outputs[prop.visitor.pin]
            if out.off_at is not None and self.pins.ticks() >= out.off_at:
                self._switch_off(prop, out)

    def _auto_off(self, prop: PropertyDefinition, generation: int) -> None:
        with self._lock:
            out = self._outputs.get(prop.visitor.pin)
            if out is not None and out.generation == generation and out.off_at is not None:
                self._switch_off(prop, out)

    def _switch_off(self, prop: PropertyDefinition, out: _Output) -> None:
        v: GpioVisitor = prop.visitor
        try:
            self.pins.write(v.pin, v.active_low)
        except PinError as exc:
            log.error("%s/%s: auto-off of GPIO%d failed: %s", self.device.id, prop.name, v.pin, exc)
            return
        if out.timer is not None:
            out.timer.cancel()
        out.generation += 1
        out.off_at = out.timer = None
        log.warning("%s/%s: switched off after auto_off_s=%g", self.device.id, prop.name, v.auto_off_s)
        self.reverted(prop, False, f"auto-off after {v.auto_off_s:g} s")
