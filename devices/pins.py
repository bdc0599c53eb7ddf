"""The pin backend: the one seam between GPIO drivers and hardware.

Drivers never import RPi.GPIO. They are handed a `Pins` backend:

- `RPiGPIOPins` in production: an adapter over the RPi.GPIO API, imported lazily, so a
  laptop imports this module without Pi extras and rpi-lgpio (the RPi.GPIO drop-in for
  the Pi 5) works unchanged.
- `FakePins` models the wire (levels, pulls, edges, a clock you advance) and keeps each
  pin's history: ``wire.pin(17).drive_low()``, ``assert wire.pin(18).states == [False, True]``.
- `FakeRPiGPIO` is the RPi.GPIO module API on that wire, with RPi.GPIO's rules and errors.
  `fake_rpi_gpio_pins()` puts the production adapter on top of it; that is what tests and
  `pins: fake` use, so the adapter runs everywhere and only the module below it is faked.

Pin numbers are BCM numbers (GPIO0-GPIO27 on the 40-pin header). Levels are electrical
(True = high); drivers apply `active_low` themselves.

Errors (all under devices.errors.DriverError):

    PinError
     ├── PinInvalid (ValueError)     no such pin, pull or edge
     ├── PinInUse                    this backend already set the pin up
     └── PinUnavailable              no GPIO library, no permission, not a Pi
"""

from __future__ import annotations

import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BeforeValidator, Strict

from devices.errors import DriverError
from devices.values import whole_number

Pull = Literal["up", "down", "off"]
Edge = Literal["rising", "falling", "both"]
# Called with (pin, level, ticks) from the backend's own thread when an edge is seen.
EdgeCallback = Callable[[int, bool, float], None]

BCM_PINS = range(0, 28)


class PinError(DriverError):
    """A pin could not be set up, read or written."""


class PinInvalid(PinError, ValueError):
    pass


class PinInUse(PinError):
    pass


class PinUnavailable(PinError):
    pass


def check_pin(pin: int) -> int:
    if isinstance(pin, bool) or not isinstance(pin, int) or pin not in BCM_PINS:
        raise PinInvalid(f"GPIO{pin} is not a BCM pin on the 40-pin header: use 0-27")
    return pin


class Pins(Protocol):
    """What a GPIO driver needs from a backend."""

    def setup_output(self, pin: int, *, level: bool) -> None: ...
    def setup_input(self, pin: int, *, pull: Pull) -> None: ...
    def write(self, pin: int, level: bool) -> None: ...
    def read(self, pin: int) -> bool: ...
    def watch(self, pin: int, edge: Edge, callback: EdgeCallback) -> None: ...
    def release(self, pin: int) -> None: ...
    def ticks(self) -> float: ...


# -- RPi.GPIO (and rpi-lgpio on a Pi 5) ------------------------------------------------------

_INSTALL_HINT = ("install the `pi` extra, or by hand `pip install rpi-lgpio` (64-bit Pi OS, Pi 4 and 5)"
                 " or `pip install RPi.GPIO` (32-bit Pi OS)")
# Trying a Pi's device files on a laptop, installing RPi.GPIO does not help: the modelled wire does.
_NOT_A_PI_HINT = ("on a machine that is not a Raspberry Pi, `pins: fake` in spec.protocol.configData runs the"
                  " device over a simulated wire")


class RPiGPIOPins:
    """Adapter over the RPi.GPIO API. Only the pins set up through this object are touched.

    Args:
        gpio: the RPi.GPIO module; imported on first use when not given.
        clock: what `ticks()` reads (seconds). Edge times and auto-off deadlines use it; a
            fake module passes its wire's clock, so tests move time instead of sleeping.
    """

    def __init__(self, gpio: Any = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._gpio = gpio
        self._clock = clock
        self._pins: set[int] = set()
        self._lock = threading.Lock()

    @property
    def gpio(self) -> Any:
        if self._gpio is None:
            try:
                import RPi.GPIO as gpio  # noqa: N813, PLC0415 - lazy: only a Pi has it
            except ImportError as exc:
                raise PinUnavailable(f"RPi.GPIO is not importable ({exc}); {_INSTALL_HINT}; {_NOT_A_PI_HINT}") from exc
            except RuntimeError as exc:  # RPi.GPIO raises this when not on a Pi
                raise PinUnavailable(f"RPi.GPIO refused to load: {exc}; {_NOT_A_PI_HINT}") from exc
            self._gpio = gpio
        return self._gpio

    def _tables(self) -> tuple[dict[str, Any], dict[str, Any]]:
        g = self.gpio
        pulls = {"up": g.PUD_UP, "down": g.PUD_DOWN, "off": g.PUD_OFF}
        edges = {"rising": g.RISING, "falling": g.FALLING, "both": g.BOTH}
        return pulls, edges

    def _call(self, pin: int, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one RPi.GPIO call; map its bare exceptions to ours (the one boundary)."""
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise PinInvalid(f"GPIO{pin}: cannot {what}: {exc}") from exc
        except RuntimeError as exc:
            text = str(exc)
            if "/dev/mem" in text or "ermission" in text or "root" in text:
                raise PinUnavailable(
                    f"GPIO{pin}: cannot {what}: {text}; run as a user in the `gpio` group"
                ) from exc
            raise PinError(f"GPIO{pin}: cannot {what}: {text}") from exc
        except (TypeError, AttributeError, NotImplementedError):
            raise  # a bug in the call, not the hardware: let it show as one
        except Exception as exc:  # e.g. lgpio.error through rpi-lgpio on a Pi 5: never a bare library error
            raise PinError(f"GPIO{pin}: cannot {what}: {exc}") from exc

    def _claim(self, pin: int) -> None:
        check_pin(pin)
        with self._lock:
            if pin in self._pins:
                raise PinInUse(f"GPIO{pin} is already set up by this mapper")
            self._pins.add(pin)

    def _setup(self, pin: int, what: str, *args: Any, **kwargs: Any) -> None:
        self._claim(pin)
        try:
            self._call(pin, "select BCM numbering", self.gpio.setmode, self.gpio.BCM)
            self._call(pin, what, self.gpio.setup, pin, *args, **kwargs)
        except PinError:
            with self._lock:
                self._pins.discard(pin)
            raise

    def setup_output(self, pin: int, *, level: bool) -> None:
        g = self.gpio
        self._setup(pin, "set up as output", g.OUT, initial=g.HIGH if level else g.LOW)

    def setup_input(self, pin: int, *, pull: Pull) -> None:
        pulls, _ = self._tables()
        try:
            pud = pulls[pull]
        except KeyError:
            raise PinInvalid(f"GPIO{pin}: unknown pull {pull!r}: use up, down or off") from None
        self._setup(pin, "set up as input", self.gpio.IN, pull_up_down=pud)

    def write(self, pin: int, level: bool) -> None:
        g = self.gpio
        self._call(pin, "write", g.output, pin, g.HIGH if level else g.LOW)

    def read(self, pin: int) -> bool:
        return bool(self._call(pin, "read", self.gpio.input, pin))

    def watch(self, pin: int, edge: Edge, callback: EdgeCallback) -> None:
        _, edges = self._tables()
        try:
            gpio_edge = edges[edge]
        except KeyError:
            raise PinInvalid(f"GPIO{pin}: unknown edge {edge!r}: use rising, falling or both") from None

        def on_edge(channel: int) -> None:
            # RPi.GPIO passes only the channel: read the level now, as close to the edge as we can.
            callback(channel, bool(self.gpio.input(channel)), self.ticks())

        # No bouncetime: the driver debounces on edge times, so the settled level is never lost.
        self._call(pin, "watch edges", self.gpio.add_event_detect, pin, gpio_edge, callback=on_edge)

    def release(self, pin: int) -> None:
        with self._lock:
            if pin not in self._pins:
                return
            self._pins.discard(pin)
        g = self.gpio
        try:
            g.remove_event_detect(pin)
        except (TypeError, AttributeError, NotImplementedError):
            raise
        except Exception:  # noqa: BLE001 - none was set up (RPi.GPIO: RuntimeError/ValueError; lgpio: its own)
            pass
        self._call(pin, "release", g.cleanup, pin)

    def ticks(self) -> float:
        return self._clock()


# -- the fake wire -------------------------------------------------------------------------------


@dataclass
class FakePin:
    """One pin on a modelled wire.

    The level is what a voltmeter would show: the output level when the pin drives, else
    what the outside world drives (`drive_high`/`drive_low`), else the pull, else
    `floating_level`. `states` records the level when the pin is set up and every change
    after that; `calls` records the calls that touched the pin (RPi.GPIO's, through
    `FakeRPiGPIO`, or `FakePins`' own).
    """

    number: int
    owner: FakePins
    mode: Literal["unused", "in", "out"] = "unused"
    pull: Pull = "off"
    output_level: bool = False
    external: bool | None = None
    floating_level: bool = False
    states: list[bool] = field(default_factory=list)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    edge: Edge | None = None
    callback: EdgeCallback | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def level(self) -> bool:
        if self.mode == "out":
            return self.output_level
        if self.external is not None:
            return self.external
        if self.mode == "in" and self.pull != "off":
            return self.pull == "up"
        return self.floating_level

    @property
    def in_use(self) -> bool:
        return self.mode != "unused"

    def drive_high(self) -> None:
        """The outside world pulls the line high (a button to 3.3 V, a PIR output)."""
        self._settle(lambda: setattr(self, "external", True))

    def drive_low(self) -> None:
        """The outside world pulls the line low (a button to ground)."""
        self._settle(lambda: setattr(self, "external", False))

    def disconnect(self) -> None:
        """Nothing outside drives the line any more; pulls decide."""
        self._settle(lambda: setattr(self, "external", None))

    def bounce(self, *levels: bool, every_s: float = 0.001) -> None:
        """The outside world drives `levels` one after the other, `every_s` apart (a bouncing contact)."""
        for i, level in enumerate(levels):
            if i:
                self.owner.advance(every_s)
            (self.drive_high if level else self.drive_low)()

    def wait_for(self, level: bool, timeout: float) -> bool:
        """Block until the wire shows `level` (for a change made by another thread)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.level == level, timeout)

    def _settle(self, change: Callable[[], None], *, mark: bool = False) -> None:
        """Apply `change`; record the new level if it changed (or always, with `mark`)."""
        with self._changed:
            before = self.level
            change()
            after = self.level
            if after != before or mark:
                self.states.append(after)
            self._changed.notify_all()
        if after != before and self.callback is not None and self.mode == "in":
            wanted = {"both": True, "rising": after, "falling": not after}[self.edge or "both"]
            if wanted:
                self.callback(self.number, after, self.owner.ticks())


class FakePins:
    """The modelled wire, and the simplest backend on it.

    `FakeRPiGPIO` drives this wire for the adapter. Its own `setup_*`/`write`/`read` methods
    stand for anything else on the wire, e.g. another program holding a line.

    Args:
        start: the clock's first reading (seconds). The clock moves only with `advance`.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._pins: dict[int, FakePin] = {}
        self._lock = threading.Lock()

    def pin(self, number: int) -> FakePin:
        check_pin(number)
        with self._lock:
            if number not in self._pins:
                self._pins[number] = FakePin(number, self)
            return self._pins[number]

    def in_use(self) -> list[int]:
        return sorted(n for n, p in self._pins.items() if p.in_use)

    def ticks(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def _claim(self, pin: int, call: tuple[Any, ...]) -> FakePin:
        fake = self.pin(pin)
        if fake.in_use:
            raise PinInUse(f"GPIO{pin} is already set up (as {fake.mode})")
        fake.calls.append(call)
        return fake

    def setup_output(self, pin: int, *, level: bool) -> None:
        fake = self._claim(pin, ("setup_output", level))
        fake._settle(lambda: (setattr(fake, "output_level", level), setattr(fake, "mode", "out")), mark=True)

    def setup_input(self, pin: int, *, pull: Pull) -> None:
        if pull not in ("up", "down", "off"):
            raise PinInvalid(f"GPIO{pin}: unknown pull {pull!r}: use up, down or off")
        fake = self._claim(pin, ("setup_input", pull))
        fake._settle(lambda: (setattr(fake, "pull", pull), setattr(fake, "mode", "in")), mark=True)

    def _used(self, pin: int, mode: str, what: str) -> FakePin:
        fake = self.pin(pin)
        if fake.mode != mode:
            raise PinError(f"GPIO{pin}: cannot {what}: the pin is set up as {fake.mode!r}")
        return fake

    def write(self, pin: int, level: bool) -> None:
        fake = self._used(pin, "out", "write")
        fake.calls.append(("write", level))
        fake._settle(lambda: setattr(fake, "output_level", level))

    def read(self, pin: int) -> bool:
        fake = self.pin(pin)
        if not fake.in_use:
            raise PinError(f"GPIO{pin}: cannot read: the pin is not set up")
        fake.calls.append(("read",))
        return fake.level

    def watch(self, pin: int, edge: Edge, callback: EdgeCallback) -> None:
        if edge not in ("rising", "falling", "both"):
            raise PinInvalid(f"GPIO{pin}: unknown edge {edge!r}: use rising, falling or both")
        fake = self._used(pin, "in", "watch edges")
        fake.calls.append(("watch", edge))
        fake.edge, fake.callback = edge, callback

    def release(self, pin: int) -> None:
        fake = self.pin(pin)
        if not fake.in_use:
            return
        fake.calls.append(("release",))
        # Released pins go back to inputs without pulls, as after RPi.GPIO's cleanup().
        fake._settle(lambda: (setattr(fake, "mode", "unused"), setattr(fake, "pull", "off")))
        fake.edge = fake.callback = None


# -- the RPi.GPIO module API on the fake wire -----------------------------------------------------

_NO_MODE = "Please set pin numbering mode using GPIO.setmode(GPIO.BOARD) or GPIO.setmode(GPIO.BCM)"


class FakeRPiGPIO:
    """The RPi.GPIO module API on a `FakePins` wire, so `RPiGPIOPins` runs unchanged over it.

    It keeps RPi.GPIO's rules where the adapter relies on them, with RPi.GPIO's bare
    ValueError/RuntimeError and messages: one numbering mode, setup() before input() and
    output(), one edge detection per channel, callback(channel) on each edge. Differences:

    - BCM numbering only (what the adapter uses), and only the header's GPIO0-27.
    - A line something else holds on the wire is refused with "GPIO busy", as lgpio does
      on a Pi 5 (classic RPi.GPIO warns and takes the line over).
    - Edge callbacks run on the thread that changes the wire, not on a thread of their own.

    Every accepted call is recorded on the wire pin, with constants by name:
    ``wire.pin(17).calls[-1] == ("cleanup",)``.

    Args:
        wire: the wire to drive; a new one when not given.
        no_access: act as a user without access to the GPIO registers: setup() fails.
    """

    UNKNOWN = -1
    BOARD, BCM = 10, 11
    OUT, IN = 0, 1
    LOW, HIGH = 0, 1
    PUD_OFF, PUD_DOWN, PUD_UP = 20, 21, 22
    RISING, FALLING, BOTH = 31, 32, 33

    _PULLS: dict[int, Pull] = {PUD_OFF: "off", PUD_DOWN: "down", PUD_UP: "up"}
    _EDGES: dict[int, Edge] = {RISING: "rising", FALLING: "falling", BOTH: "both"}
    _NAMES = {PUD_OFF: "PUD_OFF", PUD_DOWN: "PUD_DOWN", PUD_UP: "PUD_UP",
              RISING: "RISING", FALLING: "FALLING", BOTH: "BOTH"}

    def __init__(self, wire: FakePins | None = None, *, no_access: bool = False) -> None:
        self.wire = wire if wire is not None else FakePins()
        self.no_access = no_access
        self._mode = self.UNKNOWN
        self._directions: dict[int, int] = {}  # the channels this module set up
        self._detecting: set[int] = set()
        self._lock = threading.RLock()

    def setmode(self, mode: int) -> None:
        with self._lock:
            if self._mode != self.UNKNOWN and mode != self._mode:
                raise ValueError("A different mode has already been set!")
            if mode not in (self.BOARD, self.BCM):
                raise ValueError("An invalid mode was passed to setmode()")
            self._mode = mode

    def getmode(self) -> int | None:
        return None if self._mode == self.UNKNOWN else self._mode

    def _channel(self, channel: int) -> FakePin:
        if self._mode == self.UNKNOWN:
            raise RuntimeError(_NO_MODE)
        if self._mode == self.BOARD:
            raise NotImplementedError("FakeRPiGPIO models BCM numbering only")
        if isinstance(channel, bool) or not isinstance(channel, int) or channel not in BCM_PINS:
            raise ValueError("The channel sent is invalid on a Raspberry Pi")
        return self.wire.pin(channel)

    def setup(self, channel: int, direction: int, pull_up_down: int | None = None, initial: int | None = None) -> None:
        if direction not in (self.IN, self.OUT):
            raise ValueError("An invalid direction was passed to setup()")
        if direction == self.OUT and pull_up_down not in (None, self.PUD_OFF):
            raise ValueError("pull_up_down parameter is not valid for outputs")
        if direction == self.IN and initial is not None:
            raise ValueError("initial parameter is not valid for inputs")
        pud = self.PUD_OFF if pull_up_down is None else pull_up_down
        if pud not in self._PULLS:
            raise ValueError("Invalid value for pull_up_down - should be either PUD_OFF, PUD_UP or PUD_DOWN")
        if self.no_access:
            raise RuntimeError("No access to /dev/mem.  Try running as root!")
        with self._lock:
            pin = self._channel(channel)
            if pin.in_use and channel not in self._directions:
                raise RuntimeError("GPIO busy")
            if direction == self.OUT:
                self._stop_detecting(channel, pin)  # an output has no edge detection
                level = pin.level if initial is None else bool(initial)
                pin.calls.append(("setup", "OUT", f"initial={self._level_name(initial)}"))
                pin._settle(lambda: (setattr(pin, "output_level", level), setattr(pin, "mode", "out")), mark=True)
            else:
                pin.calls.append(("setup", "IN", f"pull_up_down={self._NAMES[pud]}"))
                pull = self._PULLS[pud]
                pin._settle(lambda: (setattr(pin, "pull", pull), setattr(pin, "mode", "in")), mark=True)
            self._directions[channel] = direction

    def output(self, channel: int, value: int) -> None:
        with self._lock:
            pin = self._channel(channel)
            if self._directions.get(channel) != self.OUT:
                raise RuntimeError("The GPIO channel has not been set up as an OUTPUT")
            level = bool(value)
            pin.calls.append(("output", self._level_name(value)))
            pin._settle(lambda: setattr(pin, "output_level", level))

    def input(self, channel: int) -> int:
        with self._lock:
            pin = self._channel(channel)
            if channel not in self._directions:
                raise RuntimeError("You must setup() the GPIO channel first")
            pin.calls.append(("input",))
            return self.HIGH if pin.level else self.LOW

    def add_event_detect(
        self, channel: int, edge: int, callback: Callable[[int], None] | None = None, bouncetime: int | None = None
    ) -> None:
        with self._lock:
            pin = self._channel(channel)
            if self._directions.get(channel) != self.IN:
                raise RuntimeError("You must setup() the GPIO channel as an input first")
            if edge not in self._EDGES:
                raise ValueError("The edge must be set to RISING, FALLING or BOTH")
            if bouncetime is not None and bouncetime <= 0:
                raise ValueError("Bouncetime must be greater than 0")
            if channel in self._detecting:
                raise RuntimeError("Conflicting edge detection already enabled for this GPIO channel")
            self._detecting.add(channel)
            pin.calls.append(("add_event_detect", self._NAMES[edge]))
            pin.edge, pin.callback = self._EDGES[edge], self._edge_handler(channel, callback, bouncetime)

    def _edge_handler(
        self, channel: int, callback: Callable[[int], None] | None, bouncetime: int | None
    ) -> EdgeCallback:
        last_passed: float | None = None

        def seen(_pin: int, _level: bool, ticks: float) -> None:
            nonlocal last_passed
            # RPi.GPIO drops edges within bouncetime ms of the last one it passed on.
            if bouncetime is not None and last_passed is not None and ticks - last_passed < bouncetime / 1000:
                return
            last_passed = ticks
            if callback is None:
                return
            try:
                callback(channel)
            except Exception:  # noqa: BLE001 - RPi.GPIO prints a callback's error and goes on
                traceback.print_exc()

        return seen

    def remove_event_detect(self, channel: int) -> None:
        with self._lock:
            pin = self._channel(channel)
            pin.calls.append(("remove_event_detect",))
            self._stop_detecting(channel, pin)

    def _stop_detecting(self, channel: int, pin: FakePin) -> None:
        self._detecting.discard(channel)
        pin.edge = pin.callback = None

    def cleanup(self, channel: int | None = None) -> None:
        """Back to inputs without pulls and edge detection: `channel`, or all set up here."""
        with self._lock:
            if channel is None:
                channels = list(self._directions)
            else:
                self._channel(channel)
                channels = [channel] if channel in self._directions else []
            for number in channels:
                pin = self.wire.pin(number)
                pin.calls.append(("cleanup",))
                self._stop_detecting(number, pin)
                pin._settle(lambda pin=pin: (setattr(pin, "mode", "unused"), setattr(pin, "pull", "off")))
                del self._directions[number]
            if channel is None:
                self._mode = self.UNKNOWN

    def _level_name(self, value: int | None) -> str:
        return "None" if value is None else ("HIGH" if value else "LOW")


def fake_rpi_gpio_pins(wire: FakePins | None = None, *, no_access: bool = False) -> RPiGPIOPins:
    """The production adapter over `FakeRPiGPIO` on `wire` (a new one when not given), on the wire's clock.

    Reach the wire as ``pins.gpio.wire``.
    """
    gpio = FakeRPiGPIO(wire, no_access=no_access)
    return RPiGPIOPins(gpio, clock=gpio.wire.ticks)


def make_pins(name: str) -> Pins:
    """The backend named in a device's configData (`pins: rpi-gpio | fake`).

    `fake` is the production adapter too, over `FakeRPiGPIO` on a wire of its own per driver.
    """
    if name == "rpi-gpio":
        return RPiGPIOPins()
    if name == "fake":
        return fake_rpi_gpio_pins()
    raise PinInvalid(f"unknown pin backend {name!r}: use rpi-gpio or fake")


def _bcm(value: int) -> int:
    check_pin(value)
    return value


_PIN_NAME = re.compile(r"(?:GPIO|BCM|D)\s*(\d{1,2})", re.IGNORECASE)


def _pin_text(value: Any) -> Any:
    """`GPIO17`, `D4` (a pin's name, as `pinout` and Blinka write it) or `"17"`: say the number to
    write, where the strict check would say only `must be an integer, got 'GPIO17'`."""
    if isinstance(value, str):
        if (named := _PIN_NAME.fullmatch(value.strip())) is not None:
            raise ValueError(f"{value!r} is a pin's name: write its BCM number, pin: {int(named.group(1))}")
        if value.strip().isdigit():
            raise ValueError(f"{value!r} is text: write the number without quotes, pin: {int(value)}")
    return value


# A BCM pin number in a pydantic model: `pin: BcmPin`. Strict: `pin: yes` is not GPIO1.
BcmPin = Annotated[int, BeforeValidator(whole_number), BeforeValidator(_pin_text), Strict(), AfterValidator(_bcm)]
