"""The pin backend: the one seam between GPIO drivers and hardware.

Drivers never import RPi.GPIO. They are handed a `Pins` backend:

- `RPiGPIOPins` in production: an adapter over the RPi.GPIO API, imported lazily, so a
  laptop imports this module without Pi extras and rpi-lgpio (the RPi.GPIO drop-in for
  the Pi 5) works unchanged.
- `FakePins` in tests and demos: it models the wire (levels, pulls, edges, a clock you
  advance) and keeps each pin's history: ``fake.pin(17).drive_low()``,
  ``assert fake.pin(18).states == [False, True]``.

Pin numbers are BCM numbers (GPIO0-GPIO27 on the 40-pin header). Levels are electrical
(True = high); drivers apply `active_low` themselves.

Errors (all under devices.errors.DriverError):

    PinError
     ├── PinInvalid (ValueError)     no such pin, pull or edge
     ├── PinInUse                    this backend already set the pin up
     └── PinUnavailable              no GPIO library, no permission, not a Pi
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator

from devices.errors import DriverError

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

_INSTALL_HINT = "install it with `pip install RPi.GPIO` (Pi 1-4) or `pip install rpi-lgpio` (Pi 5)"


class RPiGPIOPins:
    """Adapter over the RPi.GPIO API. Only the pins set up through this object are touched.

    Args:
        gpio: the RPi.GPIO module; imported on first use when not given.
    """

    def __init__(self, gpio: Any = None) -> None:
        self._gpio = gpio
        self._pins: set[int] = set()
        self._lock = threading.Lock()

    @property
    def gpio(self) -> Any:
        if self._gpio is None:
            try:
                import RPi.GPIO as gpio  # noqa: N813, PLC0415 - lazy: only a Pi has it
            except ImportError as exc:
                raise PinUnavailable(f"RPi.GPIO is not importable ({exc}); {_INSTALL_HINT}") from exc
            except RuntimeError as exc:  # RPi.GPIO raises this when not on a Pi
                raise PinUnavailable(f"RPi.GPIO refused to load: {exc}") from exc
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
        except (RuntimeError, ValueError):
            pass  # no edge detection was set up on this pin
        self._call(pin, "release", g.cleanup, pin)

    def ticks(self) -> float:
        return time.monotonic()


# -- the fake wire -------------------------------------------------------------------------------


@dataclass
class FakePin:
    """One pin on a modelled wire.

    The level is what a voltmeter would show: the output level when the pin drives, else
    what the outside world drives (`drive_high`/`drive_low`), else the pull, else
    `floating_level`. `states` records the level when the pin is set up and every change
    after that.
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
    """A backend that models the wire and records what drivers did.

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


def make_pins(name: str) -> Pins:
    """The backend named in a device's configData (`pins: rpi-gpio | fake`)."""
    if name == "rpi-gpio":
        return RPiGPIOPins()
    if name == "fake":
        return FakePins()
    raise PinInvalid(f"unknown pin backend {name!r}: use rpi-gpio or fake")


def _bcm(value: int) -> int:
    check_pin(value)
    return value


# A BCM pin number in a pydantic model: `pin: BcmPin`.
BcmPin = Annotated[int, AfterValidator(_bcm)]
