"""Topic names, built only from validated ids (never from raw input), and parsed from incoming topics.

Default scheme (prefix `mapper`, configurable):

    mapper/<node>/availability                          online|offline, retained, last will
    mapper/<node>/instance                              retained JSON: which mapper serves the node (mapper only)
    mapper/<node>/health                                retained JSON: can the twin be written (eventbus/health.py)
    mapper/<node>/<namespace>/<device>/state            retained JSON: every property's latest value + state
    mapper/<node>/<namespace>/<device>/availability     online|offline, retained
    mapper/<node>/<namespace>/<device>/<property>       telemetry JSON {value, unit, ts, seq, quality}
    mapper/<node>/<namespace>/<device>/<property>/set   apps publish a desired value here

KubeEdge's twin protocol: `$hw/events/device/<namespace>/<device>/...` and `$hw/events/node/<node>/...`.

Home Assistant discovery (opt-in, eventbus/homeassistant.py; prefix `homeassistant`, configurable):

    homeassistant/<component>/<node>/<namespace>_<device>_<property>/config   retained entity config
    homeassistant/status                                                     HA's birth/will: online|offline
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from devices import ids
from devices.ids import DeviceId

HW = "$hw/events/device"


class Topics:
    def __init__(self, node: str, prefix: str = "mapper") -> None:
        self.node = ids.check_name(node)
        self.prefix = prefix
        self.base = f"{prefix}/{node}"

    # -- our scheme ------------------------------------------------------------------------
    def node_availability(self) -> str:
        return f"{self.base}/availability"

    def instance(self) -> str:
        """Where the mapper serving the node announces itself (eventbus/instance.py). Three levels: no
        app's ACL line (mapper/+/availability, mapper/+/<ns>/+/+) and no bridge topic line covers it."""
        return f"{self.base}/instance"

    def health(self) -> str:
        """Where the mapper says whether its twin can be written (eventbus/health.py). Three levels, as
        the node's availability: apps read it by a line of its own (mosquitto/acl: mapper/+/health),
        the bridge carries it by one (bridge.conf); no app line lets anyone but `mapper` write it."""
        return f"{self.base}/health"

    def device_base(self, device: DeviceId) -> str:
        assert isinstance(device, DeviceId)
        return f"{self.base}/{device.namespace}/{device.name}"

    def device_state(self, device: DeviceId) -> str:
        return f"{self.device_base(device)}/state"

    def device_availability(self, device: DeviceId) -> str:
        return f"{self.device_base(device)}/availability"

    def telemetry(self, device: DeviceId, prop: str) -> str:
        return f"{self.device_base(device)}/{ids.check_property_name(prop)}"

    def device_view_filters(self) -> tuple[str, str]:
        """Every device's availability and state view."""
        return f"{self.base}/+/+/availability", f"{self.base}/+/+/state"

    def device_view(self, topic: str) -> DeviceId | None:
        """The device whose availability or state view `topic` is; None for any other topic."""
        if not topic.startswith(self.base) or topic[len(self.base):len(self.base) + 1] != "/":
            return None
        parts = topic[len(self.base) + 1:].split("/")
        if len(parts) != 3 or parts[2] not in ("availability", "state"):  # noqa: PLR2004
            return None
        ns, name = parts[0], parts[1]
        return DeviceId(ns, name) if ids.is_namespace(ns) and ids.is_name(name) else None

    def set_filter(self) -> str:
        return f"{self.base}/+/+/+/set"

    def offload_request(self) -> str:
        return f"{self.base}/offload/request"

    def offload_result(self) -> str:
        return f"{self.base}/offload/result"

    # -- KubeEdge --------------------------------------------------------------------------
    @staticmethod
    def hw(device: DeviceId, suffix: str) -> str:
        assert isinstance(device, DeviceId)
        return f"{HW}/{device.namespace}/{device.name}/{suffix}"

    def membership_get(self) -> str:
        return f"$hw/events/node/{self.node}/membership/get"

    def membership_result(self) -> str:
        return f"$hw/events/node/{self.node}/membership/get/result"

    def membership_updated(self) -> str:
        return f"$hw/events/node/{self.node}/membership/updated"

    HW_FILTERS = (f"{HW}/+/+/twin/update", f"{HW}/+/+/twin/get", f"{HW}/+/+/state/update")


# What Home Assistant takes as a discovery topic's node_id and object_id.
_HA_ID = re.compile(r"[A-Za-z0-9_-]+")
HA_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
HA_COMPONENTS = frozenset({"sensor", "binary_sensor", "switch", "number", "text"})


def ha_id(text: str) -> str:
    """`text` as a discovery topic's node_id or object_id (only letters, digits, `_` and `-`): as it
    is when it is one; else each other character (a `.` of a device name) as `_`, and 8 hex digits
    of its sha256 after, so that `a.b` and `a_b` stay two ids. mosquitto/render.sh makes the same
    of the node name for the ACL (@HA_NODE@)."""
    if _HA_ID.fullmatch(text):
        return text
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) + "_" + hashlib.sha256(text.encode()).hexdigest()[:8]


class DiscoveryTopics:
    """Home Assistant's discovery topics of one node, per-entity form: the node is the node_id, so
    one filter (`config_filter`) holds exactly this node's entities, and the ACL grants the mapper
    this node's configs only. Namespace and device name have no `_`, so `<ns>_<device>_<property>`
    names one property of one device."""

    def __init__(self, prefix: str, node: str) -> None:
        if not HA_PREFIX.fullmatch(prefix):
            raise ValueError(f"{prefix!r} is not a valid discovery prefix (letters, digits, '_' and '-')")
        self.prefix = prefix
        self.node = ids.check_name(node)
        self.node_id = ha_id(node)

    def status(self) -> str:
        return f"{self.prefix}/status"

    def config(self, component: str, device: DeviceId, prop: str) -> str:
        assert component in HA_COMPONENTS and isinstance(device, DeviceId)
        object_id = ha_id(f"{device.namespace}_{device.name}_{ids.check_property_name(prop)}")
        return f"{self.prefix}/{component}/{self.node_id}/{object_id}/config"

    def config_filter(self) -> str:
        return f"{self.prefix}/+/{self.node_id}/+/config"


@dataclass(frozen=True, slots=True)
class Incoming:
    """What an incoming topic addresses; only built when every segment is a valid id."""

    kind: str  # twin/update | twin/get | state/update | membership/get | set
    device: DeviceId | None = None
    prop: str | None = None


def parse(topic: str, topics: Topics) -> Incoming | None:
    """Classify an incoming topic; None for anything we do not serve or with invalid segments."""
    parts = topic.split("/")
    if topic.startswith(HW + "/") and len(parts) in (7, 8):
        ns, name = parts[3], parts[4]
        kind = "/".join(parts[5:])
        if kind in ("twin/update", "twin/get", "state/update") and ids.is_namespace(ns) and ids.is_name(name):
            return Incoming(kind, DeviceId(ns, name))
        return None
    if topic == topics.membership_get():
        return Incoming("membership/get")
    base = topics.base.split("/")
    if len(parts) == len(base) + 4 and parts[: len(base)] == base and parts[-1] == "set":
        ns, name, prop = parts[len(base)], parts[len(base) + 1], parts[len(base) + 2]
        if ids.is_namespace(ns) and ids.is_name(name) and ids.is_property_name(prop):
            return Incoming("set", DeviceId(ns, name), prop)
    return None
