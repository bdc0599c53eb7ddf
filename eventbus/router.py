"""Handles what clients send: KubeEdge's twin protocol and plain `.../set` topics.

Nothing a client sends reaches a driver unvalidated: the device must exist, the property must
be declared and writable, the value must have the property's type and range. Every twin
request with a valid device topic gets edgecore's reply (`code` + `reason` on errors), except, on
a broker shared by several mappers (`mqtt.shared_broker`), one for a device this mapper does not
have; topics with invalid segments are ignored, since no reply topic may be built from them. A
state/update is refused: the mapper reports the state of its devices itself (_state_update).

Each reply is a commit of the twin (it goes through the outbox), so what a client may make the
mapper answer is bounded: membership/get and twin/get (per device) are answered at once at most
once per interval, the requests within it together at its end (_coalesce), and refused queries
(twin/get, state/update) at most REFUSED_REPLIES_PER_S a second. A flood beyond that gets no
reply (counted, logged); commands (twin/update, `/set`) are never held back by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from devices.ids import DeviceId, clipped, shown
from devices.values import TWIN_VALUE
from eventbus import payloads
from eventbus.payloads import BadRequest
from eventbus.topics import Incoming, Topics, parse
from mapper.logs import Throttle, held_note
from twin.store import DeviceLocked, NotWritable, OutMessage, UnknownDevice, UnknownProperty, VersionConflict

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
# twin/get: the same rule per device (one mechanism, Router._coalesce): answered at once at most once
# per this many seconds; requests for the device within the interval wait for its end, then each of
# the newest WAITING_MAX (MEMBERSHIP_WAITING_MAX) distinct event_ids gets its reply, built from one
# read of the twin (so never older than the request). A reply goes through the outbox, one commit
# (an fsync) per reply batch: a client flooding twin/get cost one commit per request, and with 10
# of them every other request waited behind those commits (commands were dropped, reads missed).
TWIN_GET_INTERVAL_S = 1.0
# Refusals of queries (twin/get, state/update: an unknown device, a malformed request) are answered
# at most this many a second (a burst of as many); beyond that they are refused without a reply,
# counted and logged. Each reply is a commit, and an app may name any device (`+` in its ACL), so
# coalescing per device bounds nothing. A refused command (twin/update) is always answered.
REFUSED_REPLIES_PER_S = 20.0


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
                 membership_interval_s: float = MEMBERSHIP_INTERVAL_S, twin_get_interval_s: float = TWIN_GET_INTERVAL_S,
                 shared_broker: bool = False) -> None:
        self.service = service
        self.shared_broker = shared_broker
        self.topics = topics
        self.max_payload = max_payload
        self.serve_twin_protocol = serve_twin_protocol
        self.counts: Counter[str] = Counter()
        self._log_throttle = Throttle()  # refusals: the counts keep every one, the log a few a minute
        self.membership_interval_s = membership_interval_s
        self.twin_get_interval_s = twin_get_interval_s
        # Rate-limited requests (see _coalesce), by key: ("membership/get", None), ("twin/get", device).
        self._next: dict[tuple[str, DeviceId | None], float] = {}  # the loop's time before which no reply goes out
        self._waiting: dict[tuple[str, DeviceId | None], dict[str, None]] = {}  # event_ids, oldest first
        self._answer: dict[tuple[str, DeviceId | None], Callable[[list[str]], Awaitable[None]]] = {}
        self._wake = asyncio.Event()
        self._refusal_tokens = REFUSED_REPLIES_PER_S  # token bucket of query refusals' replies
        self._refusal_time = 0.0

    async def run(self) -> None:
        """Answers the requests that came too soon after a reply to the same key (see MEMBERSHIP_INTERVAL_S,
        TWIN_GET_INTERVAL_S), together, when the key's interval ends. Runs as long as the event bus does."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                await self._wake.wait()
            self._wake.clear()
            due = min(self._next.get(key, 0.0) for key in self._waiting) if self._waiting else loop.time()
            if due > loop.time():
                # Waiting out the rate limit's interval (it is the limit itself), or a new key.
                # asyncio.timeout_at, not wait_for: 3.11's wait_for drops a cancel (the stop) that
                # comes as the wake does, and run() went on.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(due):
                        await self._wake.wait()
                continue
            now = loop.time()
            for key in [k for k in self._waiting if self._next.get(k, 0.0) <= now]:
                # (Popped one at a time across the awaits below: a stop's flush_waiting may have
                # answered and emptied them meanwhile.)
                waiting, answer = self._waiting.pop(key, None), self._answer.pop(key, None)
                if waiting is None or answer is None:
                    continue
                event_ids = list(waiting)
                self._next[key] = now + self._interval(key[0])
                try:
                    await answer(event_ids)
                except Exception:  # noqa: BLE001 - the next request is answered all the same
                    self.counts["internal_error"] += 1
                    held = self._log_throttle("internal_error")
                    if held is not None:
                        log.exception("error while answering %s%s", key[0], held_note(held))

    def _interval(self, kind: str) -> float:
        return self.membership_interval_s if kind == "membership/get" else self.twin_get_interval_s

    async def _coalesce(self, kind: str, device: DeviceId | None, event_id: str,
                        answer: Callable[[list[str]], Awaitable[None]]) -> None:
        """A request of a rate-limited kind: answered at once (`answer([event_id])`) if the key (kind,
        device) had no reply within its interval and none is waiting; else it waits for the interval's
        end, when run() answers each of the newest MEMBERSHIP_WAITING_MAX distinct event_ids together
        (a repeated one once, as the newest); older ones get no reply (counted, logged)."""
        key = (kind, device)
        now = asyncio.get_running_loop().time()
        if key not in self._waiting and now >= self._next.get(key, 0.0):
            if len(self._next) > 1024:  # keys of devices a reload removed: forget the expired ones
                self._next = {k: t for k, t in self._next.items() if t > now or k in self._waiting}
            self._next[key] = now + self._interval(kind)
            await answer([event_id])
            return
        if key not in self._waiting:  # run() learns of a new key (a flood of one key wakes it once)
            self._wake.set()
        waiting = self._waiting.setdefault(key, {})
        self._answer[key] = answer
        waiting.pop(event_id, None)
        waiting[event_id] = None
        if len(waiting) > MEMBERSHIP_WAITING_MAX:
            del waiting[next(iter(waiting))]
            self.counts[f"{kind.replace('/', '_')}_collapsed"] += 1
            held = self._log_throttle((kind, "collapsed"))
            if held is not None:
                log.info("%s%s: more than %d requests within %g s; the oldest of them get no reply%s", kind,
                         "" if device is None else f" for {device}", MEMBERSHIP_WAITING_MAX, self._interval(kind),
                         held_note(held))

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
            if incoming.kind != "twin/update" and not self._refusal_reply_allowed():
                self.counts["refused_unanswered"] += 1
                held = self._log_throttle("refused_unanswered")
                if held is not None:
                    log.info("refused %s for %s: no reply (more than %g refused queries a second)%s", incoming.kind,
                             incoming.device, REFUSED_REPLIES_PER_S, held_note(held))
                return
            reply = payloads.error_reply(payloads.event_id_of(payload, self.max_payload), exc.code, exc.reason)
            await self._send([OutMessage(Topics.hw(incoming.device, f"{incoming.kind}/result"), reply,
                                         kind="twin", sequenced=False)])

    def _refusal_reply_allowed(self) -> bool:
        """Whether a refused query may be answered now: a token bucket, REFUSED_REPLIES_PER_S a
        second, a burst of as many. Nothing waits: a later reply never goes out before it."""
        now = asyncio.get_running_loop().time()
        self._refusal_tokens = min(REFUSED_REPLIES_PER_S,
                                   self._refusal_tokens + (now - self._refusal_time) * REFUSED_REPLIES_PER_S)
        self._refusal_time = now
        if self._refusal_tokens < 1.0:
            return False
        self._refusal_tokens -= 1.0
        return True

    async def _send(self, messages: list[OutMessage]) -> None:
        rows = await self.service.twin(lambda s: s.record([], messages))
        if rows and self.service.recorder and self.service.recorder.on_outbox:
            self.service.recorder.on_outbox(rows)

    def _definition(self, device: DeviceId | None):  # noqa: ANN202
        """The definition of a device of this node. A device whose file names another node
        (spec.nodeName) is not: this mapper does not run it, and on a shared broker that node's
        mapper answers for it. Taken here, its desired values were stored and answered 200, and
        applied once the file moved the device to this node."""
        loaded = self.service.definitions
        definitions = loaded.devices if loaded else {}
        if device is None or device not in definitions or device in loaded.other_node:
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
        except DeviceLocked as exc:  # `mapper lock`: refused, not kept to write at the unlock
            raise BadRequest(423, str(exc)) from None

    def _validated(self, device: DeviceId, name: str, raw: Any) -> Any:
        definition = self._definition(device)
        if raw is None and definition.has_property(name) and definition.prop(name).writable:
            raise BadRequest(400, f"property {name!r}: no expected value")
        if definition.has_property(name) and definition.prop(name).writable:
            try:
                payloads.check_text_value(raw, definition.prop(name).type)
            except BadRequest as exc:
                raise BadRequest(400, f"property {name!r}: {exc.reason}") from None
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
            # edgecore refuses only a missing or null `twin` (a 400 from the model here): an empty
            # one changes nothing, is answered with an empty `twin` and no document, and the
            # delta goes out as after any update, when one is pending.
            now = await self._twin_call(device, lambda s: s.device(device))
            result = payloads.update_result(request.event_id, now, [])
            messages = [OutMessage(Topics.hw(device, "twin/update/result"), result, kind="twin", sequenced=False)]
            if (pending := payloads.delta(now)) is not None:
                messages.append(OutMessage(Topics.hw(device, "twin/update/delta"), pending, kind="twin",
                                           sequenced=False))
            await self._send(messages)
            return
        wanted: dict[str, tuple[Any, int | None]] = {}
        for name, twin in request.twin.items():
            if twin is None:
                if not definition.has_property(name):
                    raise BadRequest(400, f"device {device} has no property {shown(name)}")
                raise BadRequest(400, f"property {shown(name)} cannot be deleted: it is declared in the device model")
            if twin.expected is None:
                if twin.actual is not None:  # a legacy mapper or twin client reporting a value
                    raise BadRequest(400, f"property {shown(name)}: actual values are reported by the device, not set")
                raise BadRequest(400, f"property {shown(name)}: no expected value")
            # With `expected`, its `actual` (and `optional`, `metadata`) is ignored, as edgecore
            # applies the entry: an app sends back what twin/get or a document gave it (which carry
            # `actual`) with a new expected value. Only the device's own reads are actual values.
            raw = twin.expected.value
            if isinstance(raw, str) and raw and not TWIN_VALUE.fullmatch(raw):
                # edgecore refuses the whole update so (ValidateTwinValue); `/set` takes such a value.
                raise BadRequest(400, f"property {shown(name)}: expected value {shown(raw, 40)} is not a KubeEdge twin "
                                      "value: only letters, digits and - _ . , : / @ #, at most 512 characters, as "
                                      "edgecore takes (the property's /set topic takes it)")
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
        # Rate-limited per device (TWIN_GET_INTERVAL_S): a reply is a commit.
        await self._coalesce("twin/get", device, request.event_id, lambda ids: self._answer_twin_get(device, ids))

    async def _answer_twin_get(self, device: DeviceId, event_ids: list[str]) -> None:
        """One read of the twin, a reply for each event_id, one commit. A device gone meanwhile (a
        reload, between the request and the interval's end) gets edgecore's 404 for each."""
        try:
            twin = await self._twin_call(device, lambda s: s.device(device))
        except BadRequest as exc:
            self.counts[f"rejected_{exc.code}"] += len(event_ids)
            held = self._log_throttle(("twin/get", exc.code, True))
            if held is not None:
                log.info("refused twin/get for %s: %s %s%s", device, exc.code, clipped(exc.reason, 300),
                         held_note(held))
            await self._send([OutMessage(Topics.hw(device, "twin/get/result"),
                                         payloads.error_reply(event_id, exc.code, exc.reason), kind="twin",
                                         sequenced=False) for event_id in event_ids])
            return
        await self._send([OutMessage(Topics.hw(device, "twin/get/result"), payloads.get_result(event_id, twin),
                                     kind="twin", sequenced=False) for event_id in event_ids])

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
        await self._coalesce("membership/get", None, request.event_id, self._answer_membership)

    async def flush_waiting(self) -> None:
        """A clean stop: answer the requests still waiting for a rate limit's interval (membership/get,
        twin/get) now, so that their replies are committed before the outbox drains (run() would send
        them after, or never)."""
        waiting, answers, self._waiting, self._answer = self._waiting, self._answer, {}, {}
        for key, event_ids in waiting.items():
            try:
                await answers[key](list(event_ids))
            except Exception as exc:  # noqa: BLE001 - the other keys are answered all the same
                log.warning("stopping: waiting %s requests%s could not be answered: %s", key[0],
                            "" if key[1] is None else f" for {key[1]}", exc)

    async def _answer_membership(self, event_ids: list[str]) -> None:
        loaded = self.service.definitions
        definitions = loaded.devices if loaded else {}
        # Not the devices whose file names another node: they are that node's members (_definition).
        other_node = loaded.other_node if loaded else {}
        twins = await self.service.twin(lambda s: [s.device(d) for d in s.device_ids() if d not in other_node])
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
        try:
            await self.service.twin(lambda s: s.set_desired(incoming.device, incoming.prop, value))
        except DeviceLocked as exc:  # `mapper lock`: refused (logged), not kept to write at the unlock
            raise BadRequest(423, str(exc)) from None
        self.service.desired_changed()
