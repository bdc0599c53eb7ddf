"""Handles what clients send: KubeEdge's twin protocol and plain `.../set` topics.

Nothing a client sends reaches a driver unvalidated: the device must exist, the property must
be declared and writable, the value must have the property's type and range. Every twin
request with a valid device topic gets edgecore's reply (`code` + `reason` on errors), except, on
a broker shared by several mappers (`mqtt.shared_broker`), one for a device this mapper does not
have; topics with invalid segments are ignored, since no reply topic may be built from them. A
state/update is refused: the mapper reports the state of its devices itself (_state_update).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from devices.ids import DeviceId, clipped, shown
from eventbus import payloads
from eventbus.payloads import BadRequest
from eventbus.topics import Incoming, Topics, parse
from mapper.logs import Throttle, held_note
from twin.store import NotWritable, OutMessage, UnknownDevice, UnknownProperty, VersionConflict

if TYPE_CHECKING:
    from mapper.service import MapperService

log = logging.getLogger("mapper.router")

# membership/get: answered at once at most once per this many seconds. A reply lists every device
# of the node (about 300 bytes each) for a request of about 20: unlimited, any client could make the
# mapper send (and its broker fan out) thousands of them a second. Requests within the interval wait
# for its end; then each of the newest MEMBERSHIP_WAITING_MAX distinct event_ids gets its reply (as
# edgecore answers each request), built from one read of the twin; older ones are dropped, counted.
MEMBERSHIP_INTERVAL_S = 1.0
MEMBERSHIP_WAITING_MAX = 8


# The reason for refusing an empty request. An empty payload is what clears a retained message:
# under MQTT 3.1.1 a broker forwards the clear live, without the retain flag, and so comes a mapper's
# own clear back when it is not recognised (another mapper's on a shared broker, or one beyond
# extension.CLEARING_MAX). Like an empty `/set`, it is refused, logged and counted, but never
# answered: apps read `.../result`, and a 400 (or 404) there would answer a request nobody made.
EMPTY_REQUEST = "an empty message is no request (it clears a retained one)"


class NotOnNode(BadRequest):
    """A request for a device this mapper does not have (edgecore's 404). On a broker shared by
    several mappers (`mqtt.shared_broker`) it is another mapper's to answer: no reply from here."""

    def __init__(self, device: DeviceId | None, node: str) -> None:
        super().__init__(404, f"device {device} is not on node {node}")


class StateReportedHere(BadRequest):
    """A state/update for a device of this mapper: it reports the device's state itself. 400, the
    code edgecore uses for a request it does not take (it knows no other 4xx but 404 and 409), and
    answered on `.../state/update/result` with the reason, though edgecore answers no refused
    state/update: a client that reports a state would otherwise not learn it was not taken."""

    def __init__(self, device: DeviceId | None, refused: str | None) -> None:
        how = "runs it" if refused is None else f"does not run it ({clipped(refused, 200)}): it is offline"
        super().__init__(400, f"state/update refused: the mapper reports this device's state itself (it {how})")


class Router:
    def __init__(self, service: MapperService, topics: Topics, *, max_payload: int, serve_twin_protocol: bool,
                 membership_interval_s: float = MEMBERSHIP_INTERVAL_S, shared_broker: bool = False) -> None:
        self.service = service
        self.shared_broker = shared_broker
        self.topics = topics
        self.max_payload = max_payload
        self.serve_twin_protocol = serve_twin_protocol
        self.counts: Counter[str] = Counter()
        self._log_throttle = Throttle()  # refusals: the counts keep every one, the log a few a minute
        self.membership_interval_s = membership_interval_s
        self._membership_next = 0.0  # the event loop's time before which no membership reply goes out
        self._membership_waiting: dict[str, None] = {}  # event_ids not answered yet, oldest first
        self._membership_wake = asyncio.Event()

    async def run(self) -> None:
        """Answers the membership requests that came too soon after a reply (see MEMBERSHIP_INTERVAL_S),
        together, when the interval ends. Runs as long as the event bus does."""
        loop = asyncio.get_running_loop()
        while True:
            await self._membership_wake.wait()
            self._membership_wake.clear()
            # Waiting out the rate limit's interval (nothing to await: it is the limit itself).
            await asyncio.sleep(max(0.0, self._membership_next - loop.time()))
            event_ids, self._membership_waiting = list(self._membership_waiting), {}
            if not event_ids:
                continue
            self._membership_next = loop.time() + self.membership_interval_s
            try:
                await self._answer_membership(event_ids)
            except Exception:  # noqa: BLE001 - the next request is answered all the same
                self.counts["internal_error"] += 1
                held = self._log_throttle("internal_error")
                if held is not None:
                    log.exception("error while answering membership/get%s", held_note(held))

    def subscriptions(self) -> list[tuple[str, int]]:
        subs = [(self.topics.set_filter(), 1)]
        if self.serve_twin_protocol:
            subs += [(f, 1) for f in Topics.HW_FILTERS] + [(self.topics.membership_get(), 1)]
        return subs

    async def handle(self, topic: str, payload: bytes) -> None:
        """Entry point for every incoming message; never raises."""
        try:
            incoming = parse(topic, self.topics)
            if incoming is None:
                self.counts["ignored"] += 1
                return
            if incoming.kind != "set" and not self.serve_twin_protocol:
                return
            await self._dispatch(incoming, payload)
        except Exception:  # noqa: BLE001 - a client must never crash the mapper
            self.counts["internal_error"] += 1
            held = self._log_throttle("internal_error")  # a client repeating it must not fill the log
            if held is not None:
                log.exception("error while handling a message on %r%s", topic[:200], held_note(held))

    def ignore_retained(self, topic: str, *, cleared: bool = False, clearing: bool = False) -> None:
        """A message with the retain flag on a command topic. A broker hands its copy out again at
        every (re)connect and to every new subscriber (through a bridge, as a live message), so
        applying it would set an old value again each time, over newer ones: it is ignored,
        counted and logged. Under MQTT 5 the mapper subscribes with retain-as-published, so a
        command published with the flag is never applied, not even the first time; under 3.1.1
        one sent live arrives without the flag and is applied once. `cleared`: the empty
        retained message that removes a broker's copy. `clearing`: the mapper has cleared this
        one (EventBusExtension._clear_retained), so that it does not stay with the broker."""
        if cleared:
            self.counts["cleared_retained"] += 1
            held = self._log_throttle("retained_cleared")
            if held is not None:
                log.info("a retained message on %r was cleared (no value: nothing to apply)%s", topic[:200],
                         held_note(held))
            return
        self.counts["ignored_retained"] += 1
        held = self._log_throttle("retained")
        if held is not None and clearing:
            log.warning("ignored a retained message on %r and cleared it (an empty retained message on that topic): "
                        "publish commands without retain%s", topic[:200], held_note(held))
        elif held is not None:
            log.warning("ignored a retained message on %r: publish commands without retain, and clear this one "
                        "(an empty retained message on that topic)%s", topic[:200], held_note(held))

    async def _dispatch(self, incoming: Incoming, payload: bytes) -> None:
        handler = {
            "twin/update": self._twin_update, "twin/get": self._twin_get, "state/update": self._state_update,
            "membership/get": self._membership, "set": self._set,
        }[incoming.kind]
        try:
            await handler(incoming, payload)
            self.counts[incoming.kind] += 1
        except NotOnNode as exc:
            if not self.shared_broker or incoming.kind == "set":  # (a /set topic names this node)
                await self._refused(incoming, payload, exc)
                return
            # Another mapper's device, most likely: its answer is the one that counts. Not a refusal
            # (systemd's "refused" total would count the other mappers' traffic): counted apart.
            self.counts["not_on_node"] += 1
            log.debug("no reply to %s for %s: not a device of this mapper (mqtt.shared_broker)", incoming.kind,
                      incoming.device)
        except BadRequest as exc:
            await self._refused(incoming, payload, exc)

    async def _refused(self, incoming: Incoming, payload: bytes, exc: BadRequest) -> None:
        self.counts[f"rejected_{exc.code}"] += 1
        # Empty requests (clears, see EMPTY_REQUEST) apart: thousands of them at a reconnect must
        # not hold back the log lines of other refusals.
        held = self._log_throttle((incoming.kind, exc.code, not payload))
        if held is not None:
            # Clipped: a reason may quote what the client sent (a name), and the throttle
            # limits lines, not their length.
            log.info("refused %s for %s: %s %s%s", incoming.kind, incoming.device, exc.code,
                     clipped(exc.reason, 300), held_note(held))
        # No reply to an empty request: it is a clear, not a request (EMPTY_REQUEST).
        answered = incoming.kind in ("twin/update", "twin/get") or isinstance(exc, StateReportedHere)
        if answered and incoming.device is not None and payload:
            reply = payloads.error_reply(payloads.event_id_of(payload, self.max_payload), exc.code, exc.reason)
            await self._send([OutMessage(Topics.hw(incoming.device, f"{incoming.kind}/result"), reply,
                                         kind="twin", sequenced=False)])

    async def _send(self, messages: list[OutMessage]) -> None:
        rows = await self.service.twin(lambda s: s.record([], messages))
        if rows and self.service.recorder and self.service.recorder.on_outbox:
            self.service.recorder.on_outbox(rows)

    def _definition(self, device: DeviceId | None):  # noqa: ANN202
        definitions = self.service.definitions.devices if self.service.definitions else {}
        if device is None or device not in definitions:
            raise NotOnNode(device, self.topics.node)
        return definitions[device]

    async def _twin_call(self, device: DeviceId, fn):  # noqa: ANN001, ANN202
        """A twin call for a request checked against `service.definitions`.

        The twin may not agree with the definitions the request was checked against: a reload
        swaps the definitions, then the twin takes the new set; if the twin refuses it (a lock
        held past its timeout, a full disk), the previous definitions come back, and a request
        checked in between reaches a twin without the added device or property. Such a request
        is answered as one for a device or property not known yet (404, 400), never left as an
        internal error without a reply."""
        try:
            return await self.service.twin(fn)
        except UnknownDevice:
            raise NotOnNode(device, self.topics.node) from None
        except (UnknownProperty, NotWritable) as exc:
            raise BadRequest(400, str(exc)) from None

    def _validated(self, device: DeviceId, name: str, raw: Any) -> Any:
        definition = self._definition(device)
        if raw is None and definition.has_property(name) and definition.prop(name).writable:
            raise BadRequest(400, f"property {name!r}: no expected value")
        try:
            return definition.desired_value(name, raw)
        except ValueError as exc:
            raise BadRequest(400, str(exc)) from None

    def _decode(self, payload: bytes, model: type) -> Any:
        if not payload:
            raise BadRequest(400, EMPTY_REQUEST)  # no reply: see _refused
        return payloads.decode(payload, model, self.max_payload)

    async def _twin_update(self, incoming: Incoming, payload: bytes) -> None:
        device = incoming.device
        definition = self._definition(device)
        request = self._decode(payload, payloads.TwinUpdateIn)
        if not request.twin:
            raise BadRequest(400, "twin is empty")
        wanted: dict[str, tuple[Any, int | None]] = {}
        for name, twin in request.twin.items():
            if twin is None:
                if not definition.has_property(name):
                    raise BadRequest(400, f"device {device} has no property {shown(name)}")
                raise BadRequest(400, f"property {shown(name)} cannot be deleted: it is declared in the device model")
            if twin.actual is not None:
                raise BadRequest(400, f"property {shown(name)}: actual values are reported by the device, not set")
            if twin.expected is None:
                raise BadRequest(400, f"property {shown(name)}: no expected value")
            version = twin.expected_version.edge if twin.expected_version else None
            wanted[name] = (self._validated(device, name, twin.expected.value), version)
        names = sorted(wanted)

        def apply(store):  # noqa: ANN001, ANN202 - runs in the twin thread, all or nothing
            # The versions are checked under the write lock: a value `mapper twin set` (another
            # process) commits meanwhile is seen, not overwritten.
            with store.transaction():
                before = store.device(device)
                for name, (value, version) in wanted.items():
                    if name not in before.properties:  # the definitions and the twin disagree: see _twin_call
                        raise UnknownProperty(device, name, before.properties)
                    stored = before.properties[name].desired_version
                    if version is not None and version < stored:
                        raise VersionConflict(device, name, version, stored)
                for name, (value, _) in wanted.items():
                    store.set_desired(device, name, value)
            return before, store.device(device)
        try:
            before, after = await self._twin_call(device, apply)
        except VersionConflict as exc:
            raise BadRequest(409, str(exc)) from None
        messages = [
            OutMessage(Topics.hw(device, "twin/update/result"), payloads.update_result(request.event_id, after, names),
                       kind="twin", sequenced=False),
            OutMessage(Topics.hw(device, "twin/update/document"),
                       payloads.update_document(request.event_id, before, after, names), kind="twin", sequenced=False),
        ]
        delta = payloads.delta(after)
        if delta is not None:
            messages.append(OutMessage(Topics.hw(device, "twin/update/delta"), delta, kind="twin", sequenced=False))
        await self._send(messages)
        self.service.desired_changed()

    async def _twin_get(self, incoming: Incoming, payload: bytes) -> None:
        device = incoming.device
        self._definition(device)
        request = self._decode(payload, payloads.EventIn)
        twin = await self._twin_call(device, lambda s: s.device(device))
        await self._send([OutMessage(Topics.hw(device, "twin/get/result"), payloads.get_result(request.event_id, twin),
                                     kind="twin", sequenced=False)])

    async def _state_update(self, incoming: Incoming, payload: bytes) -> None:
        """Refused for every device of this mapper, with a reply: in standalone mode the mapper
        observes the state of the devices it runs (their reads) and of those it refuses (offline),
        and its availability topics say so. A client's state/update overwrote that state in the
        twin, so `mapper devices` and membership contradicted the availability topics. Other
        devices get edgecore's 404, as before; a malformed request a 400, without a reply."""
        device = incoming.device
        self._definition(device)
        self._decode(payload, payloads.StateIn)
        raise StateReportedHere(device, self.service.refused.get(device))

    async def _membership(self, incoming: Incoming, payload: bytes) -> None:
        request = self._decode(payload, payloads.EventIn)
        now = asyncio.get_running_loop().time()
        if not self._membership_waiting and now >= self._membership_next:
            self._membership_next = now + self.membership_interval_s
            await self._answer_membership([request.event_id])
            return
        # Too soon after the last reply: answered by run() when the interval ends, each of the
        # newest MEMBERSHIP_WAITING_MAX event_ids (a repeated one once).
        self._membership_waiting.pop(request.event_id, None)
        self._membership_waiting[request.event_id] = None
        if len(self._membership_waiting) > MEMBERSHIP_WAITING_MAX:
            del self._membership_waiting[next(iter(self._membership_waiting))]
            self.counts["membership_collapsed"] += 1
            held = self._log_throttle("membership_collapsed")
            if held is not None:
                log.info("membership/get: more than %d requests within %g s; the oldest of them get no reply%s",
                         MEMBERSHIP_WAITING_MAX, self.membership_interval_s, held_note(held))
        self._membership_wake.set()

    async def flush_membership(self) -> None:
        """A clean stop: answer a request still waiting for the rate limit's interval now, so that
        its reply is committed before the outbox drains (run() would send it after, or never)."""
        event_ids, self._membership_waiting = list(self._membership_waiting), {}
        if event_ids:
            await self._answer_membership(event_ids)

    async def _answer_membership(self, event_ids: list[str]) -> None:
        definitions = self.service.definitions.devices if self.service.definitions else {}
        twins = await self.service.twin(lambda s: [s.device(d) for d in s.device_ids()])
        body = payloads.membership(event_ids[0], twins, definitions)  # built once, for each event_id
        await self._send([OutMessage(self.topics.membership_result(), {**body, "event_id": event_id},
                                     kind="twin", sequenced=False) for event_id in event_ids])

    async def _set(self, incoming: Incoming, payload: bytes) -> None:
        """`.../<property>/set`: the payload is the value, as JSON (`true`, `21.5`, `"ON"`) or plain text,
        or `{"value": ...}`; read by payloads.set_value, as `mapper twin set` reads its argument."""
        if len(payload) > self.max_payload:
            raise BadRequest(400, "payload too large")
        if not payload.strip():
            # Under MQTT 3.1.1 what clears a retained command (the README's advice) arrives so: a
            # broker forwards it live without the retain flag. Taken as text it would set a STRING to "".
            raise BadRequest(400, 'an empty message is no value (it clears a retained one); send "" for an empty string')
        definition = self._definition(incoming.device)
        kind = definition.prop(incoming.prop).type if definition.has_property(incoming.prop) else None
        raw = payloads.set_value(payload, kind)
        value = self._validated(incoming.device, incoming.prop, raw)
        await self.service.twin(lambda s: s.set_desired(incoming.device, incoming.prop, value))
        self.service.desired_changed()
