"""Home Assistant MQTT discovery, generated from the device definitions (opt-in: `homeassistant:`).

One retained config per published property (reportToCloud: true, or a pushMethod.mqtt topic; not
BYTES or STREAM, which no HA state holds),
per-entity form `<prefix>/<component>/<node>/<ns>_<device>_<property>/config` (DiscoveryTopics):
the node is HA's node_id, so one subscription (`<prefix>/+/<node>/+/config`) holds exactly this
mapper's entities, and the ACL grants the mapper its own node's configs only. (HA's newer
device-based form puts a device's entities in one message: a property removed by a reload, or an
older HA, would then need the whole device rewritten; one topic per entity is cleared alone.)

- state_topic: the device's retained state view (`{"<property>": value, ..., "ts", "state"}`; no
  property is named as those keys: devices.schema.RESERVED_PROPERTY_NAMES), so HA has every value
  again at its restart (the per-property telemetry is not retained);
- availability: the node's availability (the mapper's last will: a crash) and the device's, both
  `online`/`offline`, mode `all`; a control (switch, number, text) also the device's state view,
  `locked` while it carries `$locked` (`mapper lock`: the mapper refuses every write, so HA shows the
  control unavailable instead of one that snaps back), `online` without it (an unlocked device's
  view, or an older mapper's); its sensors stay available, as the device is still read;
- unit, device_class where the unit says it without doubt (°C, °F; % with `humidity` in the
  name; ppm with `co2`), state_class `measurement` for numeric ReadOnly properties, expire_after
  two cycles plus 5 s;
- a ReadWrite BOOLEAN is a `switch`, another writable number a `number` (min/max from the model;
  an INT's step is 1, its |valueScale| when calibrated),
  a writable text a `text` (max 255 characters, HA's limit: an INFO line names those at announce);
  their command_topic is the property's `/set` topic (EventBus router).

Announced at every (re)connect and when HA's birth message (`<prefix>/status` = `online`) comes;
after a reload, changed entities are announced again and those of removed devices or properties
cleared (an empty retained config: HA deletes the entity). A config of this node's that the
broker keeps and no definition makes any more (a device removed while the mapper was stopped)
is cleared when it comes in on the subscription, if it is the mapper's (its unique_id). A config
the broker refuses (MQTT 5's PUBACK: its ACL denies the topic) is not counted as announced: a
WARNING says so, and it is tried again with the next publication (MQTT 3.1.1 cannot say it).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

import aiomqtt
import orjson

from devices.definitions import DeviceDefinition, PropertyDefinition
from devices.ids import DeviceId
from devices.values import PropertyType
from eventbus.settings import HomeAssistantSettings
from eventbus.topics import DiscoveryTopics, Topics

if TYPE_CHECKING:
    from eventbus.extension import EventBusExtension
    from mapper.service import MapperService

log = logging.getLogger("mapper.homeassistant")

MANUFACTURER = "mapper"
# expire_after: this many of the property's cycles, plus EXPIRE_MARGIN_S.
EXPIRE_CYCLES = 2
EXPIRE_MARGIN_S = 5
# A number without a minimum or maximum in its model: HA's own default range is 1-100, and it
# refuses values outside it; these are the values a JSON reader keeps exact.
UNBOUNDED = 2**53 - 1
# Configs of this node larger than this are not read (not the mapper's: its own are a few hundred bytes).
MAX_CONFIG_BYTES = 65_536

_CELSIUS = {"°c", "℃", "celsius", "degc", "degree celsius", "degrees celsius"}
_FAHRENHEIT = {"°f", "℉", "fahrenheit", "degf"}
_PERCENT = {"%", "percent"}


def ha_unit(unit: str) -> str:
    """The model's unit as Home Assistant writes it (its validation is strict: °C, not Celsius)."""
    folded = unit.strip().lower()
    if folded in _CELSIUS:
        return "°C"
    if folded in _FAHRENHEIT:
        return "°F"
    if folded in _PERCENT:
        return "%"
    return unit


def device_class(prop: PropertyDefinition) -> str | None:
    """Only where the unit (and for a bare % or ppm, the name) leaves no doubt."""
    if not prop.type.numeric:
        return None
    unit, name = ha_unit(prop.unit), prop.name.lower()
    if unit in ("°C", "°F"):
        return "temperature"
    if unit == "%" and "humidity" in name:
        return "humidity"
    if unit.lower() == "ppm" and "co2" in name:
        return "carbon_dioxide"
    return None


# Values Home Assistant cannot hold as a state (at most 255 characters): an image, a base64 blob.
NOT_ANNOUNCED = frozenset({PropertyType.BYTES, PropertyType.STREAM})


def announced(prop: PropertyDefinition) -> bool:
    """Whether the property gets an entity: its telemetry is published (as in
    eventbus.telemetry.Telemetry._route) and its value can be a Home Assistant state."""
    published = prop.report_to_cloud or bool(prop.push_mqtt is not None and prop.push_mqtt.topic)
    return published and prop.type not in NOT_ANNOUNCED


def component(prop: PropertyDefinition) -> str:
    if prop.writable:
        if prop.type is PropertyType.BOOLEAN:
            return "switch"
        if prop.type.numeric:
            return "number"
        return "text"
    return "binary_sensor" if prop.type is PropertyType.BOOLEAN else "sensor"


# A Home Assistant state holds at most this many characters: a longer one is refused (the entity
# keeps its old state), so a text sensor's state is cut to it (a STRING's length is not in the model).
MAX_STATE_CHARS = 255


def value_template(name: str, boolean: bool = False, text: bool = False) -> str:
    """The property's value out of the device's state view; nothing (HA ignores it) while the view
    has none yet (its first reading of a slower property). Property names are letters, digits,
    `_`, `-` and `.` (devices.ids): safe in quotes, and `value_json.<name>` would not take `-`.
    `text`: a STRING sensor's, its first MAX_STATE_CHARS characters."""
    key = f"value_json['{name}']"
    value = f"('ON' if {key} else 'OFF')" if boolean else f"{key}[:{MAX_STATE_CHARS}]" if text else key
    return f"{{% if {key} is defined %}}{{{{ {value} }}}}{{% endif %}}"


LOCK_AVAILABLE = "online"
LOCK_NOT_AVAILABLE = "locked"
# `$locked`: the lock ({since, by, reason}) while the device is locked, absent (or false) otherwise.
LOCK_TEMPLATE = f"{{{{ '{LOCK_NOT_AVAILABLE}' if value_json['$locked'] | default(false) else '{LOCK_AVAILABLE}' }}}}"


class Discovery:
    """The configs one set of definitions makes (topic -> payload), for one node."""

    def __init__(self, settings: HomeAssistantSettings, topics: Topics, node: str, *, version: str,
                 state_interval_ms: int) -> None:
        self.topics = topics
        self.ha = DiscoveryTopics(settings.prefix, node)
        self.node = node
        self.version = version
        self.state_interval_ms = state_interval_ms
        self.unique_prefix = f"mapper_{node}_"

    def configs(self, definitions: dict[DeviceId, DeviceDefinition]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for device_id, definition in sorted(definitions.items()):
            for prop in definition.properties:
                if not announced(prop):
                    continue
                kind = component(prop)
                config = self.config(definition, prop, kind)
                out[self.ha.config(kind, device_id, prop.name)] = orjson.dumps(config, option=orjson.OPT_SORT_KEYS)
        return out

    def config(self, definition: DeviceDefinition, prop: PropertyDefinition, kind: str) -> dict[str, Any]:
        device = definition.id
        ident = f"mapper_{self.node}_{device.namespace}_{device.name}"
        config: dict[str, Any] = {
            "name": prop.name,
            "unique_id": f"{ident}_{prop.name}",
            "state_topic": self.topics.device_state(device),
            "value_template": value_template(prop.name, boolean=prop.type is PropertyType.BOOLEAN,
                                             text=kind == "sensor" and prop.type is PropertyType.STRING),
            "availability": [
                {"topic": self.topics.node_availability(), "payload_available": "online",
                 "payload_not_available": "offline"},
                {"topic": self.topics.device_availability(device), "payload_available": "online",
                 "payload_not_available": "offline"}],
            "availability_mode": "all",
            "device": {
                "identifiers": [ident],
                "name": device.name if device.namespace == "default" else f"{device.namespace}/{device.name}",
                "model": definition.model_name,
                "manufacturer": MANUFACTURER,
                "sw_version": self.version,
            },
            "origin": {"name": MANUFACTURER, "sw_version": self.version},
        }
        if prop.unit and kind in ("sensor", "number"):
            config["unit_of_measurement"] = ha_unit(prop.unit)
        if kind in ("sensor", "number") and (guessed := device_class(prop)) is not None:
            config["device_class"] = guessed
        if kind == "sensor" and prop.type.numeric:
            config["state_class"] = "measurement"
        if kind in ("sensor", "binary_sensor"):
            cycle_ms = max(prop.collect_cycle_ms, prop.report_cycle_ms, self.state_interval_ms)
            if prop.deadband is not None:  # (a steady value goes out once per heartbeat only)
                cycle_ms = max(cycle_ms, prop.deadband.max_interval_ms)
            config["expire_after"] = math.ceil(EXPIRE_CYCLES * cycle_ms / 1000) + EXPIRE_MARGIN_S
        if kind in ("binary_sensor", "switch"):
            config["payload_on"], config["payload_off"] = "ON", "OFF"  # the router takes both (devices.values)
        if kind in ("switch", "number", "text"):
            config["command_topic"] = f"{self.topics.telemetry(device, prop.name)}/set"
            # Unavailable while locked for maintenance (its state view's `$locked`): every write is refused then.
            config["availability"].append({"topic": self.topics.device_state(device), "value_template": LOCK_TEMPLATE,
                                           "payload_available": LOCK_AVAILABLE,
                                           "payload_not_available": LOCK_NOT_AVAILABLE})
        if kind == "text":  # as a JSON string: `/set` refuses an empty message and reads a leading `{` as an object
            config["command_template"] = "{{ value | tojson }}"
            # HA's own default and its limit (a larger `max` makes it refuse the config); a STRING's
            # length is not in the model: a longer value is said at announce (long_texts).
            config["max"] = MAX_STATE_CHARS
        if kind == "number":
            bounded = prop.minimum is not None and prop.maximum is not None
            config["min"] = prop.minimum if prop.minimum is not None else -UNBOUNDED
            config["max"] = prop.maximum if prop.maximum is not None else UNBOUNDED
            config["step"] = 1 if prop.type is PropertyType.INT else 0.001
            if prop.type is PropertyType.INT and prop.calibration is not None:
                # a calibrated INT takes only every |valueScale|-th value: `/set` refuses the others
                config["step"] = abs(prop.calibration.scale)
            config["mode"] = "auto" if bounded else "box"
        return config

    def long_texts(self, definitions: dict[DeviceId, DeviceDefinition]) -> list[tuple[DeviceId, str, str]]:
        """The `text` entities, as (device, property, its `/set` topic): Home Assistant holds and sets
        at most MAX_STATE_CHARS characters of them, and a STRING may be longer (64 KiB over `/set`)."""
        return [(device_id, prop.name, f"{self.topics.telemetry(device_id, prop.name)}/set")
                for device_id, definition in sorted(definitions.items()) for prop in definition.properties
                if announced(prop) and component(prop) == "text"]

    def ours(self, payload: bytes) -> bool:
        """Whether a config on this node's topics is one the mapper made (not another program's that
        uses the same node_id, an ESPHome device named as the node)."""
        if not payload or len(payload) > MAX_CONFIG_BYTES:
            return False
        try:
            config = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        unique_id = config.get("unique_id", config.get("uniq_id")) if isinstance(config, dict) else None
        return isinstance(unique_id, str) and unique_id.startswith(self.unique_prefix)


class HomeAssistantExtension:
    """Publishes the configs (Discovery) through the event bus's connection, from one task."""

    def __init__(self, settings: HomeAssistantSettings) -> None:
        self.settings = settings
        self.discovery: Discovery | None = None
        self._service: MapperService | None = None
        self._bus: EventBusExtension | None = None
        self._wanted: dict[str, bytes] = {}
        self._sent: dict[str, bytes] = {}  # what the broker holds from this run, as far as it said (PUBACK)
        self._stale: set[str] = set()  # this node's configs the broker holds that no definition makes
        self._all = False  # announce every entity again (a connect, HA's birth)
        self._due = asyncio.Event()
        self._texts_said: set[tuple[DeviceId, str]] = set()  # text entities whose limit was logged (_say_texts)

    async def setup(self, service: MapperService) -> None:
        from mapper import __version__

        bus = service.bus
        assert bus is not None and bus.topics is not None, "the event bus is set up first (mapper.runtime)"
        self._service, self._bus = service, bus
        self.discovery = Discovery(self.settings, bus.topics, service.config.node, version=__version__,
                                   state_interval_ms=bus.settings.state_interval_ms)
        # QoS 0: nothing heard while the mapper is away is queued in its persistent session (the
        # connect announces everything anyway; the retained configs come at every resubscribe).
        bus.subscribe(self.discovery.ha.status(), 0, self._on_status)
        bus.subscribe(self.discovery.ha.config_filter(), 0, self._on_config)
        bus.connect_listeners.append(self._connected)
        service.device_listeners.append(self._on_devices)
        definitions = service.definitions.devices if service.definitions else {}
        self._wanted = self.discovery.configs(self._runnable(definitions))
        log.info("Home Assistant discovery: %d entities, on %s (announced at every connect and HA birth on %s)",
                 len(self._wanted), self.discovery.ha.config_filter(), self.discovery.ha.status())
        self._say_texts(definitions)

    def _say_texts(self, definitions: dict[DeviceId, DeviceDefinition]) -> None:
        """An INFO line, once per property and process, for the writable STRINGs announced as a `text`:
        Home Assistant neither shows a value longer than its 255 characters (it keeps the one
        before) nor sets one; such a value goes over the property's own `/set` topic. Not a WARNING: it
        is said at every start for a model as it should be written (a STRING's length is not in it)."""
        assert self.discovery is not None
        new = [t for t in self.discovery.long_texts(self._runnable(definitions)) if t[:2] not in self._texts_said]
        if not new:
            return
        self._texts_said.update(t[:2] for t in new)
        shown = ", ".join(f"{device}: {name} ({topic})" for device, name, topic in new[:3])
        log.info("Home Assistant discovery: %d writable STRING propert%s announced as a text entity of at most %d "
                    "characters, Home Assistant's limit: a longer value is not shown there (it keeps the one before) "
                    "and can be set only over the property's own /set topic: %s%s", len(new),
                    "y" if len(new) == 1 else "ies", MAX_STATE_CHARS, shown,
                    f" and {len(new) - 3} more" if len(new) > 3 else "")

    def _runnable(self, definitions: dict[DeviceId, DeviceDefinition]) -> dict[DeviceId, DeviceDefinition]:
        """The devices this mapper runs (not another node's, nor one without a driver), as the state views."""
        current = self._service.definitions if self._service is not None else None
        unrunnable = current.unrunnable if current is not None and current.devices is definitions else {}
        return {k: v for k, v in definitions.items() if k not in unrunnable}

    def _on_devices(self, definitions: dict[DeviceId, DeviceDefinition]) -> None:
        assert self.discovery is not None
        self._wanted = self.discovery.configs(self._runnable(definitions))
        self._say_texts(definitions)
        self._due.set()

    def _connected(self) -> None:
        # Every config again (a broker without persistence lost them); `_sent` stays, so those of a
        # device removed while the connection was down are cleared with it.
        self._all = True
        self._due.set()

    async def _on_status(self, topic: str, payload: bytes) -> None:
        if payload.strip() == b"online":
            log.debug("Home Assistant is online (%s): announcing its entities again", topic)
            self._all = True
            self._due.set()

    async def _on_config(self, topic: str, payload: bytes) -> None:
        assert self.discovery is not None
        if topic not in self._wanted and self.discovery.ours(payload):
            self._stale.add(topic)
            self._due.set()

    async def run(self, service: MapperService) -> None:
        assert self._bus is not None and self._bus.bus is not None
        bus = self._bus.bus
        while True:
            await self._due.wait()
            self._due.clear()
            if not bus.connected.is_set():
                continue  # the connect announces everything
            everything, self._all = self._all, False
            try:
                await self._publish(bus, everything)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                log.debug("Home Assistant discovery not published (the reconnect does): %s", exc)

    async def _publish(self, bus: Any, everything: bool) -> None:
        wanted = self._wanted
        changed = [t for t, body in wanted.items() if everything or self._sent.get(t) != body]
        gone = sorted({t for t in self._sent if t not in wanted} | {t for t in self._stale if t not in wanted})
        announced = removed = 0
        refused: dict[str, object] = {}  # topic -> the broker's reason
        for topic in changed:
            body = wanted[topic]
            if (reason := await bus.publish(topic, body, qos=1, retain=True)) is not None:
                refused[topic] = reason  # not in `_sent`: announced again with the next change or connect
                continue
            self._sent[topic] = body
            announced += 1
        for topic in gone:
            if (reason := await bus.publish(topic, b"", qos=1, retain=True)) is not None:  # HA deletes the entity
                refused[topic] = reason  # the broker still holds it: cleared again with the next change or connect
                continue
            self._sent.pop(topic, None)
            self._stale.discard(topic)
            removed += 1
        if announced or removed:
            log.info("Home Assistant discovery: %d entit%s announced, %d removed", announced,
                     "y" if announced == 1 else "ies", removed)
        if refused:
            assert self.discovery is not None
            shown = ", ".join(sorted(refused)[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
            log.warning("Home Assistant discovery: %d entit%s refused by the broker (%s, on %s): Home Assistant does not "
                        "get %s; the broker's ACL must let the mapper's user write %s (mosquitto/acl; with another prefix "
                        "than homeassistant, change it there too). Tried again at the next reconnect, reload or Home "
                        "Assistant birth", len(refused), "y" if len(refused) == 1 else "ies",
                        next(iter(refused.values())), shown, "it" if len(refused) == 1 else "them",
                        self.discovery.ha.config_filter())

    async def shutdown(self, service: MapperService) -> None:
        """Nothing to undo: the configs stay retained (a stop's availability says `offline`)."""
