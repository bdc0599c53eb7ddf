"""Which readings are published, where, and in what form (the recorder's message factory)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from devices.definitions import Deadband, DeviceDefinition, PropertyDefinition
from devices.drivers.base import load_driver
from devices.errors import DriverNotFound
from devices.ids import DeviceId
from devices.values import PropertyType
from eventbus import payloads
from eventbus.topics import Topics
from twin.records import GOOD, OUT_OF_RANGE, Reading
from twin.store import OutMessage

log = logging.getLogger("mapper.telemetry")


_NOTHING = object()

# A state view left out for the broker's packet limit is said again at most this often while it lasts.
OVERSIZE_LOG_INTERVAL_S = 600.0
# Bytes a PUBLISH packet of the state view has besides its payload and topic, at least (fixed header,
# remaining length, topic length, message id) and at most (up to 4 bytes of remaining length, MQTT 5's
# property length); and what its `seq` adds to the body's JSON, at least (`,"seq":1`) and at most.
_PACKET_LEAST, _PACKET_MOST = 6, 10
_SEQ_LEAST, _SEQ_MOST = 8, 27

# (definition, topic, qos, retain, fed by change events, the body of its messages, published at all,
# the body of its out-of-range readings' messages, its report-on-change deadband or None)
_Route = tuple[PropertyDefinition, str, int, bool, bool, dict[str, Any], bool, dict[str, Any], Deadband | None]


class Telemetry:
    """Builds the outbox messages for a batch of readings.

    A property with `pushMethod.mqtt` is published to that topic whatever `reportToCloud` says
    (KubeEdge pushes so too); one without it is published to its own topic only with
    `reportToCloud: true` (what KubeEdge reports upstream). A property that is not published
    still keeps its device's retained state view fresh, at the same pace; so does a reading out of
    range (`_out_of_range`: not as the property's value). Either is published
    (or counted for the state view) at most once per `reportCycle` (a reading
    a little early, within half a collect cycle, counts as on time), except that for a
    property whose driver reports changes (`Driver.reports_changes`: GPIO inputs and
    outputs) a reading whose value differs from the last one published is published at once,
    so a button press and its release both go out. A property with a deadband (report on change,
    `PropertyDefinition.deadband`: configData `reportDeadband`...) is not paced by `reportCycle`
    but published when it moved by the deadband from the last value published, at once, and at
    least once per its heartbeat (`_banded`); its readings in between are recorded in the twin
    only, and refresh the state view only when another property's sends it, or when a published one's
    view the state_interval_ms held back is owed (`_state_owed`). `pushMethod.mqtt`
    overrides topic, QoS and retain. Each device that published gets one retained state
    message with the latest value of every property, at most once per `state_interval_ms`
    of reading time (a dashboard's view; the property topics carry every reading), and at
    once when a change-driven property published. With readings still coming, the retained
    state is never older than the interval plus one collect cycle. A change of the device's
    state sends it from the event bus (`state_message`; EventBusExtension._on_state): at once,
    then at most once per interval with the latest state, whatever the readings' pace. A view
    larger than the broker's packet limit (`packet_limit`) is left out, said in the log
    (`_over_limit`): it could never be delivered.

    The same report points (a reading published or counted, above) note a value that differs
    from its property's last twin document (`documents`, when the event bus serves KubeEdge's
    twin protocol): the event bus then makes the device's twin/update/document with the batch.

    The state view holds only what was read in this run: each value with the time it was read,
    and `ts` the time of the newest of them (never the time the message was made). A device
    gets its first state message with its first good reading of the run, not before: a value
    kept from an earlier run (the twin's) may no longer be the device's (a GPIO output starts in
    its boot state), and announced at connect it went out with the current time as `ts`.
    """

    def __init__(self, topics: Topics, definitions: dict[DeviceId, DeviceDefinition], *,
                 state_interval_ms: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.topics = topics
        self._clock = clock  # (of the errors of state views left out, _over_limit)
        self.state_interval_ms = state_interval_ms
        self._state_sent: dict[DeviceId, int] = {}  # reading time of each device's last state message
        # Devices whose published reading the state view's pacing held back: the next reading of a
        # report-on-change property counts for the view, published or not (else the view waited for its heartbeat).
        self._state_owed: set[DeviceId] = set()
        self._definitions = definitions
        self._last_sent: dict[tuple[DeviceId, str], int] = {}
        # Last value published, for properties fed by change events only.
        self._last_value: dict[tuple[DeviceId, str], Any] = {}
        # Each device's latest good value of each property read in this run, with its reading time.
        self._latest: dict[DeviceId, dict[str, tuple[Any, int]]] = {}
        self._states: dict[DeviceId, str] = {}
        self.locks: dict[DeviceId, Any] = {}  # AdminLock by device: `locked` in its state view
        # Devices a definition change restarted: readings taken before that time are the old
        # runner's (still on their way through the recorder) and stay out of the state view.
        self._fresh_from: dict[DeviceId, int] = {}
        # (device, property) -> _Route (see above): built once.
        self._routes: dict[tuple[DeviceId, str], _Route] = {}
        # KubeEdge's twin documents of reported values (EventBusExtension._documents_due): None
        # when off; else the properties, by device, whose value at a report point (a reading
        # `_due` lets through: once per reportCycle) differs from the one in their last document.
        # The event bus takes it after each batch. Costs a due reading a lookup, none other.
        self.documents: dict[DeviceId, list[str]] | None = None
        self._documented: dict[tuple[DeviceId, str], Any] = {}
        # The broker's packet limit and what says so (OutboxPublisher.packet_limit), set by the event
        # bus: a state view certainly larger is left out (_over_limit). None: views are not checked.
        self.packet_limit: Callable[[], tuple[int, str]] | None = None
        # device -> (bytes its state view takes at most besides its text values, its text properties):
        # built once per definition (_view_bounds).
        self._view_bounds: dict[DeviceId, tuple[int, tuple[str, ...]]] = {}
        # Devices whose state view is left out, and when that was last said (`clock`).
        self._oversize: dict[DeviceId, float] = {}

    def documented_at_start(self, values: dict[tuple[DeviceId, str], Any]) -> None:
        """The twin's reported values at the start, as the event bus's baselines for `last` are:
        a property's first value at a report point makes a document only if it differs from the
        twin's (it made one after every start, the value unchanged)."""
        self._documented.update(values)

    @property
    def definitions(self) -> dict[DeviceId, DeviceDefinition]:
        return self._definitions

    @definitions.setter
    def definitions(self, value: dict[DeviceId, DeviceDefinition]) -> None:
        """New definitions (a reload, a KubeEdge update). A device whose definition changed (its
        document or its origin: the service restarts it with a new runner) starts its state view
        afresh: its values were read by a device that no longer runs as it did (a temperature whose
        `base` changed, another origin's device taking over the id), and a view kept until its new
        runner's first state change went out with the old values and `"state":"ok"` (55ff823: a
        state message carries only values read by the device as it runs now). Its pacing starts
        again too: its first good reading sends the view at once. Readings its old runner took,
        still on their way through the recorder, are kept out of the view (`_fresh_from`). A
        device no longer defined keeps its view: it is stopped, and its last state message
        (`offline`) still carries what it read (6fb7906)."""
        old = self._definitions
        self._definitions = value
        self._routes.clear()
        self._view_bounds.clear()
        for device in [d for d in self._oversize if d not in value]:
            del self._oversize[device]  # (a removed device's last view, `offline`, is checked again)
        now = time.time_ns() // 1_000_000
        for device, before in old.items():
            definition = value.get(device)
            if definition is None or definition is before:
                continue
            if definition.fingerprint == before.fingerprint and definition.origin == before.origin:
                # The same device (its runner runs on): only a property it no longer has leaves.
                names = {p.name for p in definition.properties}
                values = self._latest.get(device, {})
                for name in [n for n in values if n not in names]:
                    del values[name]
                    self._last_sent.pop((device, name), None)
                    self._last_value.pop((device, name), None)
                    self._documented.pop((device, name), None)
                continue
            self._latest.pop(device, None)
            self._state_sent.pop(device, None)
            self._state_owed.discard(device)
            self._states.pop(device, None)
            for key in [k for k in self._last_sent if k[0] == device]:
                del self._last_sent[key]
            for key in [k for k in self._last_value if k[0] == device]:
                del self._last_value[key]
            for key in [k for k in self._documented if k[0] == device]:
                del self._documented[key]
            self._fresh_from[device] = now

    def _route(self, key: tuple[DeviceId, str]) -> _Route | None:
        definition = self._definitions.get(key[0])
        if definition is None or not definition.has_property(key[1]):
            # A device or a property a reload has just removed: a reading its old runner took is
            # still recorded (the twin), but no longer published, nor put back into the state view.
            return None
        prop = definition.prop(key[1])
        try:
            on_change = load_driver(definition.protocol).reports_changes(prop)
        except DriverNotFound:
            on_change = False
        push = prop.push_mqtt
        # KubeEdge pushes whatever reportToCloud says (that gates the twin's report upstream).
        publish = prop.report_to_cloud or bool(push is not None and push.topic)
        # The body of a message carried by its reading: the store adds value, ts and seq. One
        # dict per route, shared by its messages.
        body = payloads.telemetry_fields(prop.unit)
        out_of_range = payloads.telemetry_fields(prop.unit, OUT_OF_RANGE)
        own = self.topics.telemetry(key[0], prop.name)
        prefix = self.topics.prefix
        if push is not None and push.topic and push.topic != own and (
                push.topic == prefix or push.topic.startswith(prefix + "/")):
            # Under <prefix>/ every topic is a mapper's: readings there would pose as this node's
            # availability, another device's state, answers to its offloads, or another node's
            # telemetry and state. The loader refuses such a device (devices.loader.PushTopics);
            # this guard is for a definition that did not go through it.
            log.error("%s/%s: pushMethod.mqtt.topic %r is inside the mappers' topics (%s/...); its readings "
                      "go to the property's topic %s instead", key[0], prop.name, push.topic, prefix, own)
            push = None  # (still published, as the log says, whatever reportToCloud says)
        if push is not None and push.topic:
            route = (prop, push.topic, push.qos, push.retained, on_change, body, publish, out_of_range, prop.deadband)
        else:
            route = (prop, own, 1, False, on_change, body, publish, out_of_range, prop.deadband)
        self._routes[key] = route
        return route

    def set_state(self, device: DeviceId, state: str) -> None:
        self._states[device] = state

    def _due(self, key: tuple[DeviceId, str], prop: PropertyDefinition, reading: Reading) -> bool:
        """Whether a reading is published (or counted for the state view): its property's first,
        one a report cycle after the last one (less half a collect cycle), or one older than the
        last: the wall clock went back (a Pi without a real-time clock corrected by its time
        sync, an operator setting the time). Pacing starts again from it, as inference windows
        do (mapper.inference.window): waiting for the clock to catch up stopped the property's
        telemetry, and its device's state, for as long as the jump was (an hour, eight days)."""
        last = self._last_sent.get(key)
        taken = reading.taken_at_ms
        # (More than a collect cycle back: a reading recorded a little out of order, an on-demand
        # read's next to a collect's, is not a clock jump and does not restart the pacing.)
        if (last is None or taken < last - prop.collect_cycle_ms
                or taken - last >= prop.report_cycle_ms - prop.collect_cycle_ms // 2):
            self._last_sent[key] = taken
            return True
        return False

    def _banded(self, key: tuple[DeviceId, str], prop: PropertyDefinition, deadband: Deadband,
                reading: Reading) -> bool:
        """Whether a reading of a report-on-change property is published (or counted for the state
        view): its property's first, one that moved by the deadband from the last one published, one
        `max_interval_ms` after it (the heartbeat, less half a collect cycle as in _due), or one
        older than it (the clock went back: pacing starts again from it, as in _due). reportCycle
        does not pace it: a jump goes out at once."""
        last = self._last_sent.get(key)
        taken = reading.taken_at_ms
        previous = self._last_value.get(key, _NOTHING)
        if (last is None or previous is _NOTHING or taken < last - prop.collect_cycle_ms
                or taken - last >= deadband.max_interval_ms - prop.collect_cycle_ms // 2
                or deadband.moved(previous, reading.value)):
            self._last_sent[key] = taken
            self._last_value[key] = reading.value
            return True
        return False

    def __call__(self, readings: list[Reading]) -> Iterable[OutMessage]:
        messages: list[OutMessage] = []
        touched: dict[DeviceId, tuple[int, int]] = {}  # device -> (newest reading time, slack)
        changed_devices: set[DeviceId] = set()  # a change-driven property changed: state goes out at once
        routes = self._routes
        latest = self._latest
        documents = self.documents
        for reading in readings:
            if reading.quality != GOOD:
                if reading.quality == OUT_OF_RANGE and (read := self._out_of_range(reading, messages)) is not None:
                    # The device was read: its view goes on at its pace, with the last good values
                    # (a dashboard's `expire_after` counts from the last view: Home Assistant's).
                    device = reading.device_id
                    if latest.get(device) and (device not in touched or touched[device][0] < reading.taken_at_ms):
                        touched[device] = (reading.taken_at_ms, read.collect_cycle_ms // 2)
                continue
            device = reading.device_id
            key = (device, reading.property)
            route = routes.get(key) or self._route(key)
            if route is None:
                continue
            prop, topic, qos, retain, on_change, body, publish, _, deadband = route
            fresh_from = self._fresh_from.get(device) if self._fresh_from else None
            if fresh_from is not None:
                if reading.taken_at_ms <= fresh_from:
                    # Taken by the runner a definition change replaced: published on its topic as
                    # it was read, but not in the state view of the device as it runs now.
                    if publish and (self._banded(key, prop, deadband, reading) if deadband is not None
                                    else self._due(key, prop, reading)):
                        messages.append(OutMessage(topic, body, qos, retain, reading=reading))
                    continue
                # The recorder keeps the order readings were taken in: all later ones are the new runner's.
                del self._fresh_from[device]
            values = latest.get(device)
            if values is None:
                values = latest[device] = {}
            values[prop.name] = (reading.value, reading.taken_at_ms)
            if deadband is not None:
                if not self._banded(key, prop, deadband, reading):
                    if device in self._state_owed and (device not in touched or touched[device][0] < reading.taken_at_ms):
                        touched[device] = (reading.taken_at_ms, prop.collect_cycle_ms // 2)
                    continue
            elif on_change:
                changed = self._last_value.get(key, _NOTHING) != reading.value
                if not (self._due(key, prop, reading) or changed):
                    continue
                if changed:
                    self._last_sent[key] = reading.taken_at_ms
                    changed_devices.add(device)
                self._last_value[key] = reading.value
            elif not self._due(key, prop, reading):
                continue
            if documents is not None and self._documented.get(key, _NOTHING) != reading.value:
                # A report point with a value the last document did not have.
                self._documented[key] = reading.value
                names = documents.get(device)
                if names is None:
                    documents[device] = [prop.name]
                elif prop.name not in names:
                    names.append(prop.name)
            if publish:
                messages.append(OutMessage(topic, body, qos, retain, reading=reading))
            # (Not published: its reading still refreshes the device's state view below.)
            if device not in touched or touched[device][0] < reading.taken_at_ms:
                touched[device] = (reading.taken_at_ms, prop.collect_cycle_ms // 2)
        interval = self.state_interval_ms
        sent = self._state_sent
        for device, (ts, slack) in touched.items():
            last = sent.get(device)
            # A reading up to half a collect cycle early counts as on time (as in _due): a 1 Hz
            # device whose tick lands at 999 ms still sends its state every second, not every two.
            # One older than the last state message's (the clock went back) sends it too, and the
            # pacing starts again from it (with _due letting such readings through, see there).
            if last is None or ts - last >= interval - slack or device in changed_devices or ts < last:
                sent[device] = ts
                self._state_owed.discard(device)
                message = self.state_message(device)
                if message is not None:  # (always: the device has a value now)
                    messages.append(message)
            else:
                self._state_owed.add(device)
        return messages

    def _out_of_range(self, reading: Reading, messages: list[OutMessage]) -> PropertyDefinition | None:
        """A reading outside the model's minimum/maximum (or the sensor's rated range): published
        on its topic as the good ones are (at most once per reportCycle), marked `"quality":
        "out_of_range"`, so an app sees the boiler at 90 when its model says 80 at most (it was
        left out, and the property's topic and state view went on showing the last good value).
        It is not the property's value: the state view keeps the last good one, and the twin's
        reported value too (the device's quality and its detail show it). Its property when it was
        due (a report point): it then counts for the device's state view as a good reading does, which
        goes out at its pace with its last good values and their `ts` (a device whose readings were
        all out of range sent no view, and Home Assistant's `expire_after` made its entities
        unavailable though the device was read). A reading its device's replaced runner took
        (`_fresh_from`) does not count."""
        key = (reading.device_id, reading.property)
        route = self._routes.get(key) or self._route(key)
        if route is None:
            return None
        prop, topic, qos, retain, _on_change, _body, publish, out_of_range, deadband = route
        if not self._due(key, prop, reading):
            return None
        if publish:
            messages.append(OutMessage(topic, out_of_range, qos, retain, reading=reading))
            if deadband is not None:
                # The topic's last message is this one: the next good reading goes out, moved or not.
                self._last_value.pop(key, None)
        fresh_from = self._fresh_from.get(reading.device_id) if self._fresh_from else None
        return prop if fresh_from is None or reading.taken_at_ms > fresh_from else None

    def state_message(self, device: DeviceId, state: str | None = None) -> OutMessage | None:
        """The device's retained view: the latest value of each property read in this run, `ts`
        the time the newest of them was read, and the device's state (`state` overrides it).
        None before the device's first good reading in this run (see the class docstring).
        Kind "state", retained: queued, it supersedes the device's older state views still in
        the outbox (TwinStore._supersede), so a long outage leaves one per device waiting, never
        dropped by the outbox limits, and they no longer take readings' room there (as telemetry
        they counted against twin.outbox_max_rows next to the readings, every one of an outage
        kept until the limit, only to be replaced by the next at the broker). Its `seq` has gaps
        where one was superseded."""
        latest = self._latest.get(device)
        if not latest:
            return None
        body: dict[str, Any] = {name: value for name, (value, _) in latest.items()}
        body["ts"] = max(taken for _, taken in latest.values())
        body["state"] = state or self._states.get(device, "unknown")
        if (lock := self.locks.get(device)) is not None:  # `mapper lock`: writes refused
            # `$`: no property can have this name (a door sensor's `locked` can)
            body["$locked"] = {"since": lock.since_ms, "by": lock.by, "reason": lock.reason}
        topic = self.topics.device_state(device)
        if self.packet_limit is not None and self._over_limit(device, topic, body):
            return None
        return OutMessage(topic, body, retain=True, kind="state")

    def _over_limit(self, device: DeviceId, topic: str, body: dict[str, Any]) -> bool:
        """Whether a state view is certainly larger than the broker takes (a device of many long
        STRING values: up to 64 KiB each, set over MQTT). Such a view is left out, with an error
        (at once, then every OVERSIZE_LOG_INTERVAL_S while it lasts): it used to be committed to the
        twin's outbox at every state_interval_ms, only for the publisher to drop it as
        undeliverable, megabytes a second written to a Pi's SD card for nothing. A view near the
        limit (within what its `seq` and the packet's header may add) goes on to the publisher,
        which drops it, once, if it is over after all. Costs a view the sum of its text values'
        lengths; it is encoded here only when those could be over the limit and are not surely so."""
        assert self.packet_limit is not None
        limit, source = self.packet_limit()
        bounds = self._view_bounds.get(device) or self._view_bounds_of(device)
        fixed, texts = bounds
        text = 0
        for name in texts:
            value = body.get(name)
            if value.__class__ is str:
                text += len(value)
        # (A JSON string takes at most 6 bytes a character: `\u001f`; a topic's UTF-8 at most 4.)
        most = fixed + 6 * (text + len(body["state"])) + _SEQ_MOST + 4 * len(topic) + _PACKET_MOST
        if (lock := body.get("$locked")) is not None:  # its holder and reason are texts of any length
            text += len(lock["by"]) + len(lock["reason"])
            most += 6 * (len(lock["by"]) + len(lock["reason"])) + len('"$locked":{"since":,"by":"","reason":""},') + 20
        if fixed >= 0 and most <= limit:
            if self._oversize:
                self._fits_again(device)
            return False
        # Each text value takes at least its length: only when that is under the limit is the view encoded.
        exact = text <= limit
        size = len(orjson.dumps(body)) if exact else text
        packet = size + _SEQ_LEAST + len(topic.encode()) + _PACKET_LEAST
        if packet <= limit:
            if self._oversize:
                self._fits_again(device)
            return False
        now = self._clock()
        said = self._oversize.get(device)
        if said is None or now - said >= OVERSIZE_LOG_INTERVAL_S:
            self._oversize[device] = now
            largest = sorted(((-len(v), n) for n, v in body.items() if n not in ("ts", "state") and isinstance(v, str)))
            if (lock := body.get("$locked")) is not None:  # `mapper lock --reason`
                largest = sorted([*largest, (-len(lock["reason"]), "the maintenance lock's reason")])
            shown = ", ".join(f"{n} ({-length} characters)" for length, n in largest[:3])
            more = f" and {len(largest) - 3} more" if len(largest) > 3 else ""
            log.error("%s: its state view is left out: its packet on %s would be %s%d bytes, over the broker's "
                      "packet limit of %d bytes (%s). Its longest values: %s%s. Its readings are still recorded in the "
                      "twin and published on their own topics (those that are published); the broker keeps the last "
                      "state view it took. Shorten those values, or give the device fewer long STRING properties, or "
                      "raise the broker's max_packet_size (and mqtt.max_packet_bytes with it); said again every %d "
                      "minutes while it lasts", device, topic, "" if exact else "at least ", packet, limit,
                      source, shown or "none", more, OVERSIZE_LOG_INTERVAL_S // 60)
        return True

    @property
    def views_over_limit(self) -> int:
        """The devices whose state view is left out now (_over_limit): systemd's status line."""
        return len(self._oversize)

    def _fits_again(self, device: DeviceId) -> None:
        if self._oversize.pop(device, None) is not None:
            log.info("%s: its state view fits the broker's packet limit again and goes out", device)

    def _view_bounds_of(self, device: DeviceId) -> tuple[int, tuple[str, ...]]:
        """(The bytes a device's state view takes at most as JSON besides its text values and its
        state, -1 when its definition is gone; its properties that may hold text.)"""
        definition = self._definitions.get(device)
        if definition is None:
            bounds: tuple[int, tuple[str, ...]] = (-1, tuple(n for n in self._latest.get(device, {})))
        else:
            fixed = 2 + len('"ts":,"state":""') + 20  # braces, the ts and the state's quotes
            texts = []
            for prop in definition.properties:
                fixed += 6 * len(prop.name) + 4  # its name, quoted, a colon and a comma
                if prop.type.numeric or prop.type is PropertyType.BOOLEAN:
                    fixed += 32  # a number (orjson: at most 24 characters) or a boolean
                else:
                    fixed += 2  # the quotes of a text value (counted apart)
                    texts.append(prop.name)
            bounds = (fixed, tuple(texts))
        self._view_bounds[device] = bounds
        return bounds
