"""The driver contract and the registry of drivers by protocol name.

A driver is a class with a `protocol` name, optional pydantic `Config` (the device's
`spec.protocol.configData`) and `Visitor` (each property's `visitors.configData`) models,
and five methods: `open`, `read`, `write`, `close`, `health`. Optional extras the device
loop uses when a driver has them:

- `changed(prop)`: a driver whose hardware reports changes (GPIO edges, an output switched
  off by a timer) calls it from any thread; the loop then reads that property at once
  (after `settle_s`) instead of waiting for the next collectCycle. Such drivers say so in
  `reports_changes(prop)`, which also exempts changed values from the reportCycle throttle.
- `reverted(prop, value, reason)`: the driver itself set a writable property back (a timed
  auto-off); the loop stores `value` as the new desired value so the twin shows no delta.
- `boot_value(prop)`: the value a writable property has right after `open()` (the pin's
  configured initial state); see the device loop for what happens to a stored desired value.
- `restore_desired(prop)`: True when the device loop should write the twin's last desired value
  of a writable property once `open()` has returned (the hardware lost the setting on open, or the
  user asked for it: a GPIO output's `initial: restore`); it then takes the place of `boot_value`.
- `time_limit(prop, value)` and `write_for(prop, value, seconds)`: a driver that sets a written value
  back by itself after a while (a GPIO output's `auto_off_s`) says how long; a restored value then
  gets only what is left of it, counted from when it was set (`write_for`), or none.
- `rated_range(prop)`: the range the hardware is rated for; readings outside it are
  recorded `out_of_range` even when the device model declares no minimum/maximum.
- `can_write(prop)` (a classmethod): whether `write` can set `prop`; by default, whether the
  class overrides `write`. The loader refuses a ReadWrite property its driver cannot write.
- `config_problems(device)` (a classmethod): what the schema cannot see, such as the contents
  of a file the configuration names; the loader reports each as `FILE:LINE: FIELD: PROBLEM`,
  so `mapper validate` finds it and the device does not start.
- `not_installed(device)` (a classmethod): the library the device needs and this Python lacks
  (imported only when it opens), with how to install it; `mapper validate --config` warns with it.

Third parties register a driver without touching this package::

    [project.entry-points."mapper.drivers"]
    modbus = "mapper_modbus:ModbusDriver"

A built-in protocol name (simulated, replay, dht, gpio, ds18b20, modbus) always means the built-in driver: an
entry point of another package with such a name is logged as a warning and not used. The class's
`protocol` should be the entry point's name, and its `Config` and `Visitor` models should refuse
keys they do not know (`model_config = ConfigDict(extra="forbid")`), so that a misspelt key in a
device file is an error at its line: a driver that does not is warned about once when it is
loaded, and `mapper drivers` lists it with the fix (contract_warnings).

Drivers with `blocking = True` (a DHT11 read sleeps ~250 ms) are called from a worker
thread with a timeout by the device loop, so one slow sensor never stalls the others.
"""

from __future__ import annotations

import importlib
import logging
import site
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import Distribution, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from devices.errors import DriverBroken, DriverNotFound, WriteError

if TYPE_CHECKING:
    from devices.definitions import DeviceDefinition, PropertyDefinition

ENTRY_POINT_GROUP = "mapper.drivers"

log = logging.getLogger("mapper.drivers")

# (property, seconds to wait before reading it): called from any thread.
ChangeCallback = Callable[["PropertyDefinition", float], None]
# (property, the value the driver set, why): called from any thread.
RevertCallback = Callable[["PropertyDefinition", Any, str], None]

# Built-ins are listed here too so a source checkout works without `pip install`.
_BUILTIN = {
    "simulated": "devices.drivers.simulated:SimulatedDriver",
    "replay": "devices.drivers.replay:ReplayDriver",
    "dht": "devices.drivers.dht:DhtDriver",
    "gpio": "devices.drivers.gpio:GpioDriver",
    "ds18b20": "devices.drivers.ds18b20:Ds18b20Driver",
    "modbus": "devices.drivers.modbus:ModbusDriver",
}


class AnyConfig(BaseModel):
    """Default config model: accepts any keys (for drivers that take no configuration)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Driver:
    """Base class for drivers. Override what the device supports."""

    protocol: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = AnyConfig
    Visitor: ClassVar[type[BaseModel]] = AnyConfig
    # True when read/write block (sleep, bus I/O): the loop then calls them in a thread.
    blocking: ClassVar[bool] = False
    # Seconds a blocking read may take before it counts as failed.
    timeout_s: ClassVar[float] = 5.0
    # Top-level modules the driver imports only when a device opens (hardware libraries that may
    # probe the board on import): `python -m mapper.precompile` compiles them without importing.
    lazy_modules: ClassVar[tuple[str, ...]] = ()
    # Set on the instance by the device loop (thread-safe callables); None when nobody listens.
    on_change: ChangeCallback | None = None
    on_revert: RevertCallback | None = None

    def __init__(self, device: DeviceDefinition) -> None:
        self.device = device
        self.config: Any = device.protocol_config

    def open(self) -> None:
        """Acquire the hardware. Called once before the first read."""

    def read(self, prop: PropertyDefinition) -> Any:
        """Return the property's current raw value; raise ReadError on failure."""
        raise NotImplementedError

    def write(self, prop: PropertyDefinition, value: Any) -> None:
        """Apply a (validated, typed) desired value. Not overridden: the driver cannot write (can_write)."""
        raise WriteError(f"driver {self.protocol!r} cannot write {self.device.id}/{prop.name}")

    @classmethod
    def can_write(cls, prop: PropertyDefinition) -> bool:
        """Whether this driver can write `prop`: by default, whether the class overrides `write`.

        A ReadWrite property for which it is False runs as ReadOnly, with a warning at the model's
        accessMode: a desired value for it would be taken (the twin, MQTT, REST) and then fail at
        the device on every attempt.
        Override it for a driver that writes some properties only.
        """
        return cls.write is not Driver.write

    def close(self) -> None:
        """Release the hardware. Must be safe to call more than once."""

    def health(self) -> str:
        """`ok`, or a short summary of what went wrong (added to the `unhealthy` state's detail)."""
        return "ok"

    def rated_range(self, prop: PropertyDefinition) -> tuple[float, float] | None:
        """(low, high) the hardware is rated for, or None; checked besides the model's min/max."""
        return None

    def boot_value(self, prop: PropertyDefinition) -> Any:
        """The value a writable property has right after open(), or None if the hardware keeps its state."""
        return None

    def restore_desired(self, prop: PropertyDefinition) -> bool:
        """True when the device loop writes the twin's last desired value of writable `prop` after
        every open() (applied before or not: a setting the hardware forgets when opened, such as a
        sensor's oversampling), instead of starting it at boot_value. Off by default: an output then
        starts in its boot state, and never switches itself on after a restart."""
        return False

    def time_limit(self, prop: PropertyDefinition, value: Any) -> float | None:
        """Seconds after which the driver sets `value`, once written to `prop`, back to its boot_value
        by itself (a safety limit: a GPIO output's auto_off_s when on), or None.

        The device loop counts it across restarts for a restored value (restore_desired): from when
        that value was set (its desired_ts), it writes it with what is left (write_for), or, with
        nothing left, not at all: the property stays at its boot_value, which becomes the desired value."""
        return None

    def write_for(self, prop: PropertyDefinition, value: Any, seconds: float) -> None:
        """Write `value` as `write` does, to be set back after `seconds` instead of the whole time_limit.
        Override it with time_limit."""
        self.write(prop, value)

    @classmethod
    def reports_changes(cls, prop: PropertyDefinition) -> bool:
        """True when this driver calls `changed()` for `prop`: its changed values skip the reportCycle throttle."""
        return False

    # -- for drivers: pushing to the device loop ------------------------------------------------

    def changed(self, prop: PropertyDefinition, settle_s: float = 0.0) -> None:
        """Ask the device loop to read `prop` once it has been quiet for `settle_s`. Any thread."""
        callback = self.on_change
        if callback is not None:
            callback(prop, settle_s)

    def reverted(self, prop: PropertyDefinition, value: Any, reason: str) -> None:
        """Tell the device loop the driver set `prop` to `value` by itself. Any thread."""
        callback = self.on_revert
        if callback is not None:
            callback(prop, value, reason)

    @classmethod
    def config_problems(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """(YAML field, problem) for each mistake `Config`/`Visitor` cannot see (a data file's contents).

        The loader reports each at the field's line, like a schema error: the device is not loaded.
        """
        return ()

    @classmethod
    def config_warnings(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """(YAML field, warning) for settings that run but are most likely not what was meant.

        The loader reports each at the field's line as a warning: the device is loaded as written.
        """
        return ()

    @classmethod
    def not_installed(cls, device: DeviceDefinition) -> str | None:
        """What `device` needs installed that this Python lacks, with how to install it, or None.

        `mapper validate --config` warns with it: `mapper run` starts such a device, and its open()
        fails on the import, so it stays offline.
        """
        return None

    @classmethod
    def claims(cls, device: DeviceDefinition) -> Iterable[tuple[str, str]]:
        """Exclusive resources (e.g. `gpio:17`) with the YAML field that claims each.

        The loader rejects two devices that claim the same resource.
        """
        return ()


_registered: dict[str, str] | None = None
# The distribution (package) that registers each entry point, for messages about it.
_packages: dict[str, str] = {}
# The distribution itself, for the .pth files of one installed while the mapper runs (_add_pth_paths).
_distributions: dict[str, Distribution] = {}
# The .pth files already added that way: each is read at most once per process.
_pth_added: set[Path] = set()
# (protocol, target) of third-party entry points named like a built-in, and (protocol, targets) of
# protocols two packages register, already warned about.
_clashes_logged: set[tuple[str, Any]] = set()
# (protocol, target) of drivers whose contract_warnings were logged: once per process.
_contract_logged: set[tuple[str, str]] = set()


def _entry_points(refresh: bool = False) -> dict[str, str]:
    """Drivers registered under ENTRY_POINT_GROUP, read once per process.

    Reading them scans every installed distribution's metadata (about 5 ms here), and the
    loader, the device runners and the telemetry routes each ask per device: 1,000 devices
    spent seconds of their start-up on it. A protocol not found rereads them once, so a
    driver installed while the mapper runs is still found by the next device that names it.
    """
    global _registered, _packages, _distributions
    if _registered is None or refresh:
        found = entry_points(group=ENTRY_POINT_GROUP)
        _registered = {ep.name: ep.value for ep in found}
        _packages = {ep.name: getattr(ep.dist, "name", None) or "" for ep in found}
        _distributions = {ep.name: ep.dist for ep in found if ep.dist is not None}
        _warn_registered_twice(found)
        for ep in found:
            builtin = _BUILTIN.get(ep.name)
            if builtin is not None and ep.value != builtin and (ep.name, ep.value) not in _clashes_logged:
                _clashes_logged.add((ep.name, ep.value))
                package = getattr(ep.dist, "name", None) or "a package"
                log.warning("%s registers a driver for protocol %r (%s); %r is a built-in protocol, so the"
                            " built-in driver is used: register the driver under another name", package,
                            ep.name, ep.value, ep.name)
    return _registered


def _warn_registered_twice(found: Iterable[Any]) -> None:
    """Log, once per clash, a protocol two packages register: only one of them runs its devices
    (the one read last), which no message said."""
    by_name: dict[str, list[Any]] = {}
    for ep in found:
        if ep.name not in _BUILTIN:
            by_name.setdefault(ep.name, []).append(ep)
    for name, eps in by_name.items():
        targets = {ep.value for ep in eps}
        if len(targets) < 2 or (name, tuple(sorted(targets))) in _clashes_logged:
            continue
        _clashes_logged.add((name, tuple(sorted(targets))))

        def shown(ep: Any) -> str:
            return f"{getattr(ep.dist, 'name', None) or 'a package'} ({ep.value})"
        listed = sorted(shown(ep) for ep in eps)
        log.warning("protocol %r is registered twice, by %s; %s is used: uninstall the other package, or register"
                    " one under another name", name, " and by ".join(listed), shown(eps[-1]))


def available_protocols() -> list[str]:
    """Protocols whose driver loads (imports, and is a Driver): what is installed. A registered one
    that cannot be loaded is not among them (broken_protocols)."""
    return _protocols()[0]


def broken_protocols() -> dict[str, DriverBroken]:
    """Registered protocols whose driver cannot be loaded, each with the DriverBroken saying why."""
    return _protocols()[1]


def _protocols() -> tuple[list[str], dict[str, DriverBroken]]:
    """(loadable protocols, broken ones with why), each driver imported to tell (a module that is there
    can still fail to import: a dependency missing, a library refusing to load off its board). Only
    messages about a missing driver ask, so the imports cost nothing to a mapper whose drivers load."""
    registered = _entry_points(refresh=True)
    loadable: list[str] = []
    broken: dict[str, DriverBroken] = {}
    for protocol in sorted({*_BUILTIN, *registered}):
        target = _BUILTIN.get(protocol) or registered[protocol]
        try:
            _import_driver(protocol, target)
        except DriverBroken as exc:
            broken[protocol] = exc
        else:
            loadable.append(protocol)
    return loadable, broken


@dataclass(frozen=True, slots=True)
class Listed:
    """One protocol as `mapper drivers` shows it: the entry point that runs it and where it comes from."""

    protocol: str
    target: str  # `module:Class`
    builtin: bool
    package: str | None  # the distribution registering it (None for a built-in)
    version: str | None
    driver: type[Driver] | None  # None when it cannot be loaded ...
    error: str | None  # ... and why
    warnings: tuple[str, ...] = ()  # what its author should fix (contract_warnings)


@dataclass(frozen=True, slots=True)
class Unused:
    """An entry point that is not used: named like a built-in, or a second one for a protocol."""

    protocol: str
    target: str
    package: str
    why: str


def listing() -> tuple[list[Listed], list[Unused]]:
    """Every protocol (built in or registered), each driver imported to tell whether it loads, and
    the entry points not used, for a driver's author to see theirs is found (`mapper drivers`)."""
    registered = _entry_points(refresh=True)
    listed: list[Listed] = []
    for protocol in sorted({*_BUILTIN, *registered}):
        builtin = protocol in _BUILTIN
        target = _BUILTIN.get(protocol) or registered[protocol]
        dist = None if builtin else _distributions.get(protocol)
        package = None if builtin else (_packages.get(protocol) or None)
        version = getattr(dist, "version", None)
        try:
            driver, error = _import_driver(protocol, target), None
        except DriverBroken as exc:
            driver, error = None, exc.error
        warnings = tuple(contract_warnings(protocol, target, driver)) if driver is not None else ()
        listed.append(Listed(protocol, target, builtin, package, version, driver, error, warnings))
    unused: list[Unused] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        package = getattr(ep.dist, "name", None) or "a package"
        if ep.name in _BUILTIN and ep.value != _BUILTIN[ep.name]:
            unused.append(Unused(ep.name, ep.value, package, "a built-in name"))
        elif ep.name not in _BUILTIN and ep.value != registered.get(ep.name):
            unused.append(Unused(ep.name, ep.value, package,
                                 f"{_packages.get(ep.name) or 'another package'} registers it too, and that one is used"))
    return listed, unused


def load_driver(protocol: str) -> type[Driver]:
    """The driver class for `protocol`; raises DriverNotFound naming what is installed, or
    DriverBroken naming the entry point that names it and why it cannot be loaded."""
    # A built-in first: a package installed for something else never takes over its devices (the
    # registry is still read, once, so such a package is warned about).
    registered = _entry_points()
    target = _BUILTIN.get(protocol) or registered.get(protocol) or _entry_points(refresh=True).get(protocol)
    if target is None:
        loadable, broken = _protocols()
        raise DriverNotFound(protocol, loadable, broken)
    driver = _import_driver(protocol, target)
    if (protocol, target) not in _contract_logged:
        _contract_logged.add((protocol, target))
        for warning in contract_warnings(protocol, target, driver):
            log.warning("%s", warning)
    return driver


# Where a device file gives each model its keys, for the warnings about a model that takes any key.
_MODEL_PLACES = {"Config": "its spec.protocol.configData", "Visitor": "each property's visitors.configData"}


def contract_warnings(protocol: str, target: str, driver: type[Driver]) -> list[str]:
    """What is wrong with a driver that loads, for its author (logged once when it is loaded, and in
    `mapper drivers`): its class's `protocol` not the name it is registered under (its messages then
    name another protocol than the devices' protocolName), and each of its `Config`/`Visitor` models,
    or a model within them, that does not forbid unknown keys: a misspelt key (`adress: 0x77`) is then
    taken without a word, and the device runs with the default. The base class's AnyConfig, which a
    driver that takes no configuration keeps, is not one."""
    package = None if protocol in _BUILTIN else _packages.get(protocol)
    found: list[str] = []
    if driver.protocol != protocol:
        found.append(f"{package or 'a package'} registers {target} as protocol {protocol!r}, but its class says"
                     f" protocol = {driver.protocol!r}: devices of protocolName {protocol!r} run it, and its messages"
                     f" name {driver.protocol!r}; set protocol = {protocol!r} in the class (or register it under"
                     f" {driver.protocol!r})")
    seen: set[type[BaseModel]] = {AnyConfig}
    for attr in ("Config", "Visitor"):
        for model, within in _models_taking_any_key(getattr(driver, attr), seen):
            inside = f" (within {within.__name__})" if within is not None else ""
            found.append(f"driver {target} (protocol {protocol!r}): its {attr} model {model.__name__}{inside} takes keys it does not know, so a"
                         f" misspelt key in {_MODEL_PLACES[attr]} is accepted without a word and its setting left at"
                         f" the default: add `model_config = ConfigDict(extra=\"forbid\")` to {model.__name__}"
                         " (from pydantic import ConfigDict)")
    found += _mapper_key_fields(protocol, target, driver.Visitor)
    return found


def _mapper_key_fields(protocol: str, target: str, visitor: Any) -> list[str]:
    """A Visitor field named as one of the mapper's own configData keys (calibration, report on
    change: devices.definitions.MAPPER_KEYS): the loader takes such a key out before the driver
    reads the rest, so the driver would never be given it."""
    from devices.definitions import MAPPER_KEYS

    if not (isinstance(visitor, type) and issubclass(visitor, BaseModel)):
        return []
    return [f"driver {target} (protocol {protocol!r}): its Visitor field {name!r} has the name of the mapper's own"
            f" visitors.configData key {key!r}, which the mapper takes out before the driver reads the rest:"
            f" the driver never gets it; rename the field"
            for name, info in visitor.model_fields.items()
            for key in {name, info.alias} & set(MAPPER_KEYS)]


def _models_taking_any_key(model: Any, seen: set[type[BaseModel]],
                           within: type[BaseModel] | None = None) -> list[tuple[type[BaseModel], type[BaseModel] | None]]:
    """(model, the model holding it or None) for `model` and the models its fields hold (`list[Pin]`,
    `Faults | None`) whose extra keys are not forbidden; each model looked at once (`seen`)."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or model in seen:
        return []
    seen.add(model)
    found = [] if model.model_config.get("extra") == "forbid" else [(model, within)]
    for info in model.model_fields.values():
        for inner in _annotation_types(info.annotation):
            found += _models_taking_any_key(inner, seen, model)
    return found


def _annotation_types(annotation: Any) -> list[Any]:
    """The classes an annotation names, its arguments' too (`dict[str, list[Pin]] | None`: str, Pin)."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [t for arg in args for t in _annotation_types(arg)]


def _add_pth_paths(protocol: str) -> bool:
    """Whether the .pth files of the package registering `protocol` added something to look in.

    A package installed while the mapper runs is found by its entry point, but a path its .pth
    adds (`pip install -e`, a src layout) is added only when Python starts: the reload that
    named its protocol refused the device with "No module named ...", though the next restart
    loads it. Its own .pth files are read as the start would have read them, each once."""
    distribution = _distributions.get(protocol)
    if distribution is None:
        return False
    added = False
    for file in distribution.files or ():
        path = Path(str(distribution.locate_file(file)))
        if file.suffix != ".pth" or path in _pth_added or not path.is_file():
            continue
        _pth_added.add(path)
        site.addpackage(str(path.parent), path.name, None)
        added = True
    if added:
        importlib.invalidate_caches()
    return added


def _import_driver(protocol: str, target: str) -> type[Driver]:
    """The Driver class entry point `target` (`module:Class`) names; DriverBroken if it cannot be loaded."""
    package = None if protocol in _BUILTIN else _packages.get(protocol)
    module_name, _, attr = target.partition(":")
    try:
        # (a module of the entry point that is gone, its package half removed, is broken too: it
        # is registered, and "not installed" would contradict the list of installed protocols)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            if not _add_pth_paths(protocol):
                raise
            module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a third-party package failing to import refuses its devices
        # only, also when it exits (a hardware library off its board calling sys.exit)
        raise DriverBroken(protocol, target, exc, package) from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise DriverBroken(protocol, target, TypeError(f"{attr!r} is not a devices.drivers.Driver"), package)
    return cls
