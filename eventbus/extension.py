"""Wires the event bus into a running MapperService."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiomqtt
import orjson
from paho.mqtt.client import topic_matches_sub

from devices.definitions import DeviceDefinition
from devices.ids import DeviceId
from eventbus import payloads
from eventbus.bus import MqttBus
from eventbus.health import TwinHealth
from eventbus.instance import InstanceWatch, instance_token
from eventbus.publisher import OutboxPublisher
from eventbus.router import Router
from eventbus.settings import MqttSettings
from eventbus.telemetry import Telemetry
from eventbus.topics import Topics, parse
from mapper.device_loop import OFFLINE, UNKNOWN
from mapper.logs import Throttle, held_note
from mapper.recorder import Extra
from devices.values import Value
from twin.records import Reading
from twin.store import (BROKER_META, BROKER_NOTE_REFRESH_S, DesiredChange, OutboxRow, OutMessage, TwinStore,
                        UnknownDevice, write_private)

if TYPE_CHECKING:
    from mapper.service import MapperService

log = logging.getLogger("mapper.eventbus")

ONLINE_STATES = ("ok", "online")
# A device whose state is not known yet when the connection comes up (the broker answered before
# its driver's first read) is announced once its state is known, or `offline` after this long.
# Announced at once, it went `offline` then `online` at nearly every start: a flap per device
# for anything alerting on availability.
FIRST_STATE_GRACE_S = 5.0
# Topics of retained commands the mapper has cleared whose clear has not come back yet (see
# _clear_retained): at most this many, the oldest forgotten first.
CLEARING_MAX = 4096
# The node's retained availability is the mapper's word: `online` while it runs. Another value
# there while it runs came from another client: over the bridge, any the cloud broker sends
# (Mosquitto 2.0 checks no local ACL and no `topic ... in` pattern for what a bridge receives;
# mosquitto/README.md, "What the bridge lets the cloud do"). The mapper publishes `online` again,
# at most once per this many seconds however often it is overwritten (no loop with a client
# that keeps publishing `offline`: the last word is the mapper's within this time).
REASSERT_INTERVAL_S = 5.0
_VIEW_ENDS = ("/availability", "/state")  # a device's retained views (Topics.device_view)
# A note of the MQTT connection the twin could not take is tried again this often (_note_broker).
RETRY_NOTE_S = 5.0
# The note is written again at least this often, unchanged but for its time (`noted`): an older
# one tells `mapper devices` that the mapper could not write it since (a twin that refuses writes).
REFRESH_NOTE_S = BROKER_NOTE_REFRESH_S
# The random part of the default client id, kept beside the twin: <twin>.mqtt-client-id.
CLIENT_ID_FILE_SUFFIX = ".mqtt-client-id"
CLIENT_ID_SECRET = re.compile(r"[0-9a-f]{16}")


# A batch's twin documents as committed (EventBusExtension._document_rows): their outbox rows, and
# each device's new baselines for the next document's `last` (None: the device is gone).
_Documented = tuple[list[OutboxRow], dict[DeviceId, dict[str, tuple[Value | None, int | None, int]] | None]]


def client_id_file(twin_path: Path) -> Path:
    """Beside the twin file itself (a twin.path through a symlink gives the real path's id, as the
    twin and its lock are the same: mapper.cli._lock_path)."""
    real = Path(os.path.realpath(twin_path))
    return real.with_name(real.name + CLIENT_ID_FILE_SUFFIX)


def mqtt_client_id(settings: MqttSettings, node: str, twin_path: Path, *, renew: bool = False,
                   new_twin: bool = False) -> tuple[str, str]:
    """(the client id, where it comes from, for the log's advice): mqtt.client_id as written, else
    `mapper-<node>-<16 random hex digits>`.

    Any user of the broker who connects with the mapper's client id closes its connection and takes
    its session over (Mosquitto ties no client id to a user), and `mapper-<node>` was easily guessed:
    the node is in every topic. The random part is made at the first start and kept beside the twin,
    owner only: the session is persistent, so the id must be the same at every start. `renew`: the
    twin came from another machine (mapper.machine: a cloned card), and so did the kept part: a new
    one is made, so that clones never share a session. `new_twin`: the twin was made by this start,
    so no earlier mapper ran on it, nor had a session of the old default id to leave behind."""
    if settings.client_id is not None:
        return settings.client_id, "the same mqtt.client_id"
    path = client_id_file(twin_path)
    try:
        secret = "" if renew else path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        secret = ""
    if not CLIENT_ID_SECRET.fullmatch(secret):
        if secret:  # not one this code wrote (a crash cannot leave half of one: write_private)
            log.warning("%s does not hold 16 hex digits: replaced, the MQTT client id and session are new", path)
        secret = secrets.token_hex(8)
        write_private(path, secret + "\n")
        if renew:  # (the start's warning says why: MapperService._record_machine)
            log.info("MQTT client id: mapper-%s-%s, made new and kept in %s: the twin came from another machine",
                     node, secret, path)
        elif new_twin:  # (a first start: "earlier versions" of a mapper that never ran here only puzzled)
            log.info("MQTT client id: mapper-%s-%s, made now and kept in %s (set mqtt.client_id to choose one)",
                     node, secret, path)
        else:
            log.info("MQTT client id: mapper-%s-%s, made now and kept in %s (set mqtt.client_id to choose one). A"
                     " session of the default id of earlier versions, mapper-%s, if the broker has one, is not resumed"
                     " (desired values queued in it are not delivered): it expires on the broker"
                     " (mqtt.session_expiry_s, under MQTT 3.1.1 persistent_client_expiration)", node, secret, path, node)
    origin = f"a copy of {path} (a copied state directory: delete the copy's file and it makes a new id)"
    return f"mapper-{node}-{secret}", origin


class EventBusExtension:
    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.bus: MqttBus | None = None
        self.publisher: OutboxPublisher | None = None
        self.router: Router | None = None
        self.telemetry: Telemetry | None = None
        self.topics: Topics | None = None
        # Extra subscriptions of other extensions (e.g. inference results): (filter, qos, handler).
        self._extra: list[tuple[str, int, Callable[[str, bytes], Awaitable[None]]]] = []
        # _extra indexed for _extra_handler (None: to be built again, after a change).
        self._extra_exact: dict[str, Callable[[str, bytes], Awaitable[None]]] | None = None
        self._extra_wild: list[tuple[str, Callable[[str, bytes], Awaitable[None]]]] = []
        self._connecting = asyncio.Event()  # clear while _on_connect runs
        self._connecting.set()
        self._unknown_later: asyncio.Task[None] | None = None  # see FIRST_STATE_GRACE_S
        self._clearing: dict[str, None] = {}  # topics of retained commands cleared, until the clear comes back
        self._service: MapperService | None = None
        self.instance: InstanceWatch | None = None  # another mapper serving this node (eventbus/instance.py)
        self.health: TwinHealth | None = None  # the twin's health on <node>/health (eventbus/health.py)
        self._stopping = False
        # The node's availability (see REASSERT_INTERVAL_S): whether this connection's own `online`
        # has come back (what the broker sends before it, a retained `offline` of the last run, is
        # superseded by it), the pending re-assertion, and the loop time before which none goes out.
        self._own_online_seen = False
        self._reassert: asyncio.Task[None] | None = None
        self._reassert_next = 0.0
        self._reassert_stopped = False
        self._reassert_wanted = False  # another value came since the re-assertion began
        self._reassert_log = Throttle(burst=3)
        # Devices whose retained availability or state view another client overwrote (_on_device_view),
        # to be published again by _restore_device_views, at most once per REASSERT_INTERVAL_S.
        self._views_overwritten: set[DeviceId] = set()
        self._views_restore: asyncio.Task[None] | None = None
        self._views_next = 0.0
        # Sending the state views of devices whose maintenance lock changed (_on_locks).
        self._lock_views: set[asyncio.Task[None]] = set()
        # Twin documents of reported values (_documents_due): each property as its last document
        # (or the twin at start) had it, for the next one's `last`. Read in the twin thread (the
        # documents' work), changed on the loop once their commit succeeded (_documented_now): the
        # recorder submits a batch's commit only after the previous one's done callbacks ran.
        self._documented: dict[DeviceId, dict[str, tuple[Value | None, int | None, int]]] = {}
        # Each device's last time online (ms), for $hw state/update/result (twin protocol served).
        self._last_online: dict[DeviceId, int | None] = {}
        # Called after every (re)connect, once the node's and devices' announcements are queued
        # (Home Assistant discovery announces its entities again). Must not block: set an event.
        self.connect_listeners: list[Callable[[], None]] = []

    def subscribe(self, topic_filter: str, qos: int, handler: Callable[[str, bytes], Awaitable[None]]) -> None:
        """Route messages matching `topic_filter` to `handler(topic, payload)`; call during setup.

        The handler must not raise for bad input (it gets untrusted payloads); errors are logged.
        """
        self._extra.append((topic_filter, qos, handler))
        self._extra_exact = None
        if self.bus is not None:
            self.bus.subscriptions.append((topic_filter, qos))

    async def setup(self, service: MapperService) -> None:
        self._service = service
        # A device's state changes are paced by the service (MapperService._on_state), the twin's
        # write and these messages together: at most one per mqtt.state_interval_ms.
        service.state_interval_s = self.settings.state_interval_ms / 1000
        config = service.config
        self.topics = Topics(config.node, self.settings.topic_prefix)
        self._extra.insert(0, (self.topics.node_availability(), 1, self._on_node_availability))
        self._extra_exact = None
        definitions = service.definitions.devices if service.definitions else {}
        self.telemetry = Telemetry(self.topics, definitions, state_interval_ms=self.settings.state_interval_ms)
        serve = self.settings.serve_twin_protocol and config.mode == "standalone"
        self.router = Router(service, self.topics, max_payload=self.settings.max_payload_bytes, serve_twin_protocol=serve,
                             shared_broker=self.settings.shared_broker)
        moved = service.machine_before is not None
        client_id, client_id_origin = mqtt_client_id(self.settings, config.node, config.twin.path, renew=moved,
                                                     new_twin=service.twin_new)
        if moved and self.settings.client_id is None:
            service.machine_notes.append(
                f"The MQTT client id is new: {client_id} (kept in {client_id_file(config.twin.path)}, replacing the "
                "one that came with the twin), so that no two clones share a broker session; desired values queued "
                "in the old session are not delivered.")
        elif moved:
            service.machine_notes.append(
                "mqtt.client_id is set in the config and used as written: every clone connects with it, and on one "
                "broker each throws the other off and takes its session; give each Pi its own (or remove it: the "
                "default is made per twin, and made new on a clone).")
        token = instance_token(client_id, config.twin.path if self.settings.client_id is not None else None)
        self.instance = InstanceWatch(self.topics.instance(), config.node, token, self.settings.instance_interval_s)
        # QoS 0: announcements heard while offline are not queued in the persistent session (the
        # retained one comes at every resubscribe). Handled as an extra: before the retained-command logic.
        self._extra.append((self.topics.instance(), 0, self._on_instance))
        # Its own health, as its availability: another client's there is overwritten (TwinHealth.heard).
        self._extra.append((self.topics.health(), 1, self._on_health))
        self._extra_exact = None
        # The devices' retained availability and state views, as published by other clients only (the
        # cloud broker through the bridge): overwritten again (_on_device_view). MQTT 5 only.
        views = self.topics.device_view_filters()
        self.bus = MqttBus(
            self.settings,
            client_id=client_id,
            client_id_origin=client_id_origin,
            will_topic=self.topics.node_availability(),
            subscriptions=self.router.subscriptions() + [(f, q) for f, q, _ in self._extra] + [(f, 1) for f in views],
            on_message=self._on_message,
            on_connect=lambda: self._on_connect(service),
            others_only=frozenset(views),
        )
        assert service.worker is not None and service.recorder is not None
        # Acknowledgements ride with the readings' commits; with twin.commit_interval_ms they wait a
        # little longer than one interval for the next, instead of a commit of their own every 2 s.
        ack_delay_s = max(2.0, config.twin.commit_interval_ms / 1000 + 1.0)
        self.publisher = OutboxPublisher(self.bus, service.worker, max_inflight=self.settings.max_inflight,
                                         ack_delay_s=ack_delay_s)
        service.recorder.message_factory = self.telemetry
        service.lock_listeners.append(self._on_locks)
        # A state view larger than the broker takes is left out before it is queued (Telemetry._over_limit).
        self.telemetry.packet_limit = self.publisher.packet_limit
        service.recorder.on_outbox = self.publisher.offer
        service.recorder.take_acks = self.publisher.take_acked
        service.recorder.return_acks = self.publisher.return_acked
        # While the twin cannot be written, waiting readings' telemetry goes out live through it.
        service.recorder.live_out = self.publisher
        # Straight on the connection, not through the outbox: it says when the twin cannot be written.
        # Outbox messages dropped as undeliverable: the twin's count at the start, and this run's.
        try:
            undeliverable_before = (await service.twin(lambda s: s.losses()))["outbox_undeliverable"]
        except Exception as exc:  # noqa: BLE001 - the health then counts this run's only
            log.warning("cannot read the twin's count of undeliverable outbox messages: %s", exc)
            undeliverable_before = 0
        publisher = self.publisher
        self.health = TwinHealth(self.topics.health(), self.bus, service.recorder, config.twin.path,
                                 config_fingerprint=config.fingerprint(),
                                 undeliverable=lambda: undeliverable_before + publisher.undeliverable)
        service.recorder.on_health = self.health.changed
        publisher.on_undeliverable = self.health.changed
        service.state_listeners.append(self._on_state)
        service.applied_listeners.append(lambda change, error: self._on_applied(service, change, error))
        service.bus_first_attempt = self.bus.first_attempt  # systemd READY waits for it
        service.bus = self
        service.device_listeners.append(self._on_devices)
        service.not_run_listeners.append(self._on_not_run)
        if serve:
            service.membership_listeners.append(self._on_membership)
            try:
                twins = await service.twin(lambda s: [s.device(d) for d in s.device_ids()])
            except Exception as exc:  # noqa: BLE001 - the first documents have no `last`, states no last_online
                log.warning("cannot read the twin for the twin protocol's `last` and `last_online` values: %s", exc)
                twins = []
            self._last_online = {twin.id: twin.last_online for twin in twins}
            if self.settings.reading_documents:
                self._documented = {twin.id: {n: (p.reported, p.reported_ts, p.reported_version)
                                              for n, p in twin.properties.items()} for twin in twins}
                self.telemetry.documents = {}
                # The same values for what is due (Telemetry): a first reading equal to the twin's
                # makes no document after a start.
                self.telemetry.documented_at_start(
                    {(twin.id, n): p.reported for twin in twins for n, p in twin.properties.items()
                     if p.reported is not None})
                service.recorder.after_messages.append(self._documents_due)
        # (Nothing of the twin's is taken into the state views: a device's is announced once it
        # was read in this run, see Telemetry.)
        log.info("event bus: %s as %s, topics under %s/, KubeEdge twin protocol %s", self.settings.url,
                 client_id, self.topics.base, "served" if serve else "left to edgecore")

    def _on_devices(self, definitions: dict[DeviceId, DeviceDefinition]) -> None:
        """New definitions: a device refused (no driver for its protocol) is not run, so for the
        state views it is one removed: it keeps its view until its `offline` state message is made."""
        if self.telemetry is not None:
            current = self._service.definitions if self._service is not None else None
            unrunnable = current.unrunnable if current is not None and current.devices is definitions else {}
            self.telemetry.definitions = {k: v for k, v in definitions.items() if k not in unrunnable}

    async def run(self, service: MapperService) -> None:
        assert self.bus is not None and self.publisher is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.bus.run(), name="mqtt-connection")
            tg.create_task(self.publisher.run(), name="outbox-publisher")
            tg.create_task(self._announce_instance_every_interval(), name="instance-announcements")
            tg.create_task(self._note_broker(service), name="broker-note")
            if self.health is not None:
                tg.create_task(self.health.run(), name="twin-health")
            if self.router is not None and self.router.serve_twin_protocol:
                tg.create_task(self.router.run(), name="membership-replies")

    async def _note_broker(self, service: MapperService) -> None:
        """Note the connection (connected or not, since when, the latest reason why not) in the twin,
        for `mapper devices`: only systemd's STATUS= said it, and a crash lost it. Written at each
        change (a connection made or lost, an attempt failing for another reason than the last one
        noted), and again every REFRESH_NOTE_S. Each note carries this process's pid and when it was
        made, so a note a crashed run left, or one this run could not write again since (a twin that
        refuses writes), is shown as what was last known then, not as the current state. A write that
        fails (the twin locked, a full disk) is tried again every RETRY_NOTE_S until it is written."""
        bus = self.bus
        assert bus is not None
        loop = asyncio.get_running_loop()
        await bus.first_attempt.wait()
        written: tuple[object, ...] | None = None  # what the last note written said, and when (loop.time)
        written_at = 0.0
        while True:
            bus.changed.clear()
            connected = bus.connected.is_set()
            since = bus.connected_since if connected else bus.down_since
            error = None if connected else bus.last_error
            said = (connected, since, error)
            wait_s = REFRESH_NOTE_S - (loop.time() - written_at)
            if said != written or wait_s <= 0:
                now = time.time()
                note = orjson.dumps({
                    "url": _url_without_credentials(self.settings.url), "connected": connected,
                    "since": round((since if since is not None else now) * 1000),
                    "error": error, "pid": os.getpid(), "noted": round(now * 1000),
                }).decode()
                try:
                    await service.twin(lambda s, note=note: s.swap_meta(BROKER_META, note))
                except Exception as exc:  # noqa: BLE001 - only `mapper devices` misses it: tried again
                    log.debug("cannot note the MQTT connection in the twin: %s", exc)
                    wait_s = RETRY_NOTE_S
                else:
                    written, written_at, wait_s = said, loop.time(), REFRESH_NOTE_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await bus.changed.wait()

    async def stop_requested(self, service: MapperService) -> None:
        """First thing on a clean stop: no more incoming messages are handled. What one causes (a
        twin reply, a desired value's result, a cloud answer's decision) would otherwise be
        committed while the outbox drains, or after, and wait in it for the next start; the broker
        keeps a QoS 1 message in the mapper's session and sends it again at the next connection.

        (A device state change the service held back, see _on_state, is queued by the service
        before before_stop: the `offline` a clean stop queues there is the last word.)"""
        self._cancel_unknown_later()
        self._stopping = True  # no more instance announcements
        self._stop_reasserting()  # the `offline` of a clean stop is the mapper's own last word
        if self.bus is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.drain_on_stop_s):
                    await self.bus.hold_incoming()
        if self.router is not None:
            try:
                await self.router.flush_waiting()
            except Exception as exc:  # noqa: BLE001 - stopping goes on
                log.warning("stopping: a waiting membership or twin/get request could not be answered: %s", exc)

    async def before_stop(self, service: MapperService) -> None:
        """On a clean stop (devices stopped, drivers closed): `offline` for every device that ran,
        queued after everything else; send what is queued (bounded), then `offline` for the node.

        A device's retained availability and state used to say `online` and `"state":"ok"` after
        a stop (Home Assistant showed a relay available, and on, while the mapper was down and the
        relay off: GpioDriver.close() switches outputs off). They go through the outbox as every
        availability change does: in order behind what is still queued (an `online` sent after
        them would be the broker's last word), and kept for the next start if the broker does not
        take them in time. The last will covers a crash, for the node only (see README).
        """
        if self.bus is None or self.topics is None or self.publisher is None:
            return
        direct: list[OutMessage] = []
        try:
            async with asyncio.timeout(self.settings.drain_on_stop_s):
                await self._connecting.wait()  # an announcement in progress is queued first
                direct = await self._devices_offline(service)
                await self._connecting.wait()  # (a reconnect's, made meanwhile)
                if self.bus.connected.is_set():
                    await self.publisher.drain()
        except TimeoutError:
            log.warning("stopping with messages still queued in the outbox; they are sent at the next start")
        # Connected now, not when the stop began: a reconnect waiting for its SUBACK then was not yet
        # `connected`, and went on to announce the node `online` with nothing after it (the clean
        # DISCONNECT keeps the will). No await between here and the bus being cancelled but these
        # publishes: a reconnect not done by now never announces.
        if not self.bus.connected.is_set():
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(3):
                for m in direct:  # (the twin could not queue them: after what it had queued)
                    await self.bus.publish(m.topic, m.body, qos=m.qos, retain=m.retain)
                if self.instance is not None and self.instance.retained_is_ours:
                    # Its own announcement only: another mapper's stays (and is this node's news).
                    await self.bus.publish(self.instance.topic, b"", qos=1, retain=True)
                await self.bus.publish(self.topics.node_availability(), b"offline", retain=True)

    async def _devices_offline(self, service: MapperService) -> list[OutMessage]:
        """Queue `offline` on the availability of every device the mapper ran (refused ones were
        never announced online), and its state view with `"state":"offline"`: the values and `ts`
        stay those of its last readings (what a driver's close() did to a device, such as a GPIO
        output switched off, was not read, so it is not reported). Returns the availability
        messages to publish directly if the twin cannot queue them (a full disk)."""
        assert self.telemetry is not None and self.publisher is not None
        definitions = service.definitions.devices if service.definitions else {}
        messages: list[OutMessage] = []
        for device in definitions:
            if device in service.refused:
                continue
            messages.append(self._availability(device, OFFLINE))
            if self._serving():
                messages.append(self._state_result(device, OFFLINE))
            state = self.telemetry.state_message(device, OFFLINE)
            if state is not None:
                messages.append(state)
        if not messages:
            return []
        try:
            rows = await service.twin(lambda s: s.record([], messages))
        except Exception as exc:  # noqa: BLE001 - a full disk: the availability goes out directly
            log.error("stopping: cannot queue the devices' availability in the twin (%s); publishing it directly",
                      exc)
            return [m for m in messages if isinstance(m.body, bytes)]
        if rows:
            self.publisher.offer(rows)
        return []

    async def shutdown(self, service: MapperService) -> None:
        self._cancel_unknown_later()
        self._stop_reasserting()

    def _stop_reasserting(self) -> None:
        self._reassert_stopped = True
        if self._reassert is not None:
            self._reassert.cancel()
            self._reassert = None
        if self._views_restore is not None:
            self._views_restore.cancel()
            self._views_restore = None
        for task in self._lock_views:
            task.cancel()

    async def _on_node_availability(self, topic: str, payload: bytes) -> None:
        """A message on the node's availability topic (the mapper subscribes to it). `online` is the
        mapper's own, or says what it says. Anything else, once this connection's own `online` came
        back, was published by another client while the mapper runs (a forged retained `offline`
        from the cloud over the bridge): the mapper publishes `online` again (REASSERT_INTERVAL_S)."""
        if payload == b"online":
            self._own_online_seen = True
            return
        if not self._own_online_seen or self._reassert_stopped:
            return  # before this connection's `online`, which supersedes it; or stopping
        held = self._reassert_log("availability")
        if held is not None:
            log.warning("another client published %r on the node's availability %r while the mapper runs "
                        "(another mapper serving this node that stopped, or the cloud broker through the bridge?); "
                        "publishing `online` again, at most once "
                        "per %g s%s", payload[:40], topic, REASSERT_INTERVAL_S, held_note(held))
        # Wanted again even while a re-assertion is under way: one that came after the broker took
        # it would otherwise stay the retained value (the task publishes once more, after the interval).
        self._reassert_wanted = True
        if self._reassert is None or self._reassert.done():
            self._reassert = asyncio.create_task(self._reassert_online(), name="reassert-availability")

    async def _reassert_online(self) -> None:
        assert self.bus is not None and self.topics is not None
        loop = asyncio.get_running_loop()
        while self._reassert_wanted and not self._reassert_stopped:
            self._reassert_wanted = False
            # The rate limit itself: nothing to wait for but the time.
            await asyncio.sleep(max(0.0, self._reassert_next - loop.time()))
            self._reassert_next = loop.time() + REASSERT_INTERVAL_S
            try:
                await self.bus.publish(self.topics.node_availability(), b"online", retain=True)
            except (aiomqtt.MqttError, TimeoutError) as exc:  # disconnected: the reconnect announces `online`
                log.debug("could not publish the node's availability again: %s", exc)
                return

    def _extra_handler(self, topic: str) -> Callable[[str, bytes], Awaitable[None]] | None:
        """The handler of the first extra subscription matching `topic`. Filters without wildcards
        (the node's availability, the instance topic) are looked up by the topic itself: every
        incoming message passes here, and paho's topic_matches_sub builds a matcher per call."""
        if self._extra_exact is None:
            self._extra_exact = {}
            for topic_filter, _, handler in reversed(self._extra):  # the first of equal filters wins
                if "+" not in topic_filter and "#" not in topic_filter:
                    self._extra_exact[topic_filter] = handler
            self._extra_wild = [(f, h) for f, _, h in self._extra if "+" in f or "#" in f]
        handler = self._extra_exact.get(topic)
        if handler is not None:
            return handler
        for topic_filter, handler in self._extra_wild:
            if topic_matches_sub(topic_filter, topic):
                return handler
        return None

    async def _on_message(self, message: aiomqtt.Message) -> None:
        assert self.router is not None
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        topic = message.topic.value
        handler = self._extra_handler(topic)
        if handler is not None:
            if self.bus is not None and self.bus.own_will(message):
                log.debug("the broker published this connection's last will on %r: it is closing it", topic[:200])
                return
            try:
                await handler(topic, payload)
            except Exception:  # noqa: BLE001 - a message must never take the connection down
                log.exception("error while handling a message on %r", topic[:200])
            return
        if topic.endswith(_VIEW_ENDS):  # (no command topic ends so: a cheap test for every message)
            device = self.topics.device_view(topic)
            if device is not None:
                self._on_device_view(device, topic, payload)
                return
        if not payload and topic in self._clearing:
            del self._clearing[topic]
            # The mapper's own clear (below) coming back: under MQTT 3.1.1 without the retain flag,
            # where the router would refuse it as an empty command (counted and logged as one).
            self.router.ignore_retained(topic, cleared=True)
            return
        if message.retain:  # a command kept by a broker: it would be applied again at every (re)connect
            clearing = bool(payload) and await self._clear_retained(topic)
            self.router.ignore_retained(topic, cleared=not payload, clearing=clearing)
            return
        await self.router.handle(topic, payload)

    async def _clear_retained(self, topic: str) -> bool:
        """Remove the broker's copy of a retained command on a topic the mapper serves: an empty
        retained message there. Ignored but kept, such copies piled up with the broker (any app
        may publish one to every device and property name its ACL's `+` allows, invented ones
        too), in its memory and on its disk, and all came to the mapper again at every reconnect.
        True if the clear went out (the mapper's ACL grants it: mapper/# and $hw/#)."""
        assert self.bus is not None and self.topics is not None
        if parse(topic, self.topics) is None:  # not a command topic of this mapper's
            return False
        self._clearing.pop(topic, None)
        self._clearing[topic] = None
        while len(self._clearing) > CLEARING_MAX:
            del self._clearing[next(iter(self._clearing))]
        try:
            await self.bus.publish(topic, b"", qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            self._clearing.pop(topic, None)
            log.debug("could not clear the retained message on %r: %s", topic[:200], exc)
            return False
        return True

    async def _on_connect(self, service: MapperService) -> None:
        """After every (re)connect: node online, and every device's availability and state again.

        A clean stop waits for it (before_stop): rows it commits while the outbox drains would
        otherwise stay there until the next start."""
        self._connecting.clear()
        self._own_online_seen = False  # the broker hands out the retained value first, then `online` comes back
        try:
            await self._announce(service)
            # The twin's health, after the devices' availability and state are queued: the timing of
            # those is unchanged. (The recorder's failed commits meanwhile publish it too: TwinHealth.run.)
            if self.health is not None:
                self.health.connected()
                await self.health.publish()
            if self.instance is not None:  # after the devices' availability and state are queued
                self.instance.connected()
                await self._announce_instance()
            for listener in self.connect_listeners:
                listener()
        finally:
            self._connecting.set()

    def _on_device_view(self, device: DeviceId, topic: str, payload: bytes) -> None:
        """Another client published a device's availability or state view (the mapper's own do not come
        back: MQTT 5 No Local; nor do retained ones at the subscribe): the cloud broker through the
        bridge, which Mosquitto lets publish any topic here. Forged, a retained `online` stayed until the
        device's state changed and a state view until its next reading. The mapper's own go out
        again, at most once per REASSERT_INTERVAL_S however many are overwritten how often. Devices it
        does not run, or has not announced yet (state unknown), are left alone."""
        service = self._service
        runner = service.runners.get(device) if service is not None else None
        if runner is None or runner.state == UNKNOWN or self._stopping or self._reassert_stopped:
            return
        if topic.endswith("/availability") and payload == self._availability(device, runner.state).body:
            return  # the same word: nothing to put right
        held = self._reassert_log("device view")
        if held is not None:
            log.warning("another client published %r on %r while the mapper runs the device (the cloud broker "
                        "through the bridge?); publishing the device's own again, at most once per %g s%s",
                        payload[:80], topic[:200], REASSERT_INTERVAL_S, held_note(held))
        self._views_overwritten.add(device)
        if self._views_restore is None or self._views_restore.done():
            self._views_restore = asyncio.create_task(self._restore_device_views(service), name="restore-device-views")

    async def _restore_device_views(self, service: MapperService) -> None:
        """The overwritten devices' availability and state views again, through the outbox as at a connect."""
        assert self.telemetry is not None
        loop = asyncio.get_running_loop()
        while self._views_overwritten and not self._reassert_stopped:
            await asyncio.sleep(max(0.0, self._views_next - loop.time()))  # the rate limit: only the time
            self._views_next = loop.time() + REASSERT_INTERVAL_S
            devices, self._views_overwritten = self._views_overwritten, set()
            messages: list[OutMessage] = []
            for device in sorted(devices):
                runner = service.runners.get(device)
                if runner is None or runner.state == UNKNOWN:
                    continue
                messages.append(self._availability(device, runner.state))
                state = self.telemetry.state_message(device)
                if state is not None:
                    messages.append(state)
            if not messages or self._stopping:
                continue
            try:
                rows = await service.twin(lambda s, m=messages: s.record([], m))
            except Exception as exc:  # noqa: BLE001 - the next reconnect announces them anyway
                log.warning("cannot queue the overwritten devices' availability and state again: %s", exc)
                continue
            if rows and self.publisher:
                self.publisher.offer(rows)

    async def _on_health(self, topic: str, payload: bytes) -> None:
        if self.health is not None:
            self.health.heard(payload)

    async def _on_instance(self, topic: str, payload: bytes) -> None:
        if self.instance is not None:
            self.instance.handle(payload)

    async def _announce_instance(self) -> None:
        """This mapper's announcement (eventbus/instance.py), retained: after the subscription, so the
        broker's retained one (another mapper's, or this state directory's from before a crash) comes first."""
        assert self.bus is not None and self.instance is not None
        await self.bus.publish(self.instance.topic, self.instance.payload(), qos=1, retain=True)

    async def _announce_instance_every_interval(self) -> None:
        """Again every mqtt.instance_interval_s while connected (not in answer to anything): another
        mapper hears it for as long as this one runs, and takes the retained slot back."""
        assert self.bus is not None and self.instance is not None
        while True:
            await asyncio.sleep(self.instance.interval_s)
            if self._stopping or not self.bus.connected.is_set():
                continue
            try:
                await self._announce_instance()
            except (aiomqtt.MqttError, TimeoutError) as exc:
                log.debug("could not announce this mapper on %s: %s", self.instance.topic, exc)

    async def _announce(self, service: MapperService) -> None:
        assert self.bus is not None and self.topics is not None and self.telemetry is not None
        await self.bus.publish(self.topics.node_availability(), b"online", retain=True)
        messages: list[OutMessage] = []
        unknown: list[DeviceId] = []
        for device, runner in service.runners.items():
            if runner.state == UNKNOWN:
                unknown.append(device)  # announced by its first state change (_on_state), or below
            else:
                messages.append(self._availability(device, runner.state))
            # Its latest readings of this run, with the time they were read; none before its first
            # good reading, whose batch sends the state view (a value kept in the twin from an
            # earlier run went out here with the current time, though the device may have another
            # by now: a GPIO output starts in its boot state).
            state = self.telemetry.state_message(device)
            if state is not None:
                messages.append(state)
        messages.extend(self._refused_offline(service))
        self._cancel_unknown_later()
        if unknown:
            self._unknown_later = asyncio.create_task(self._announce_unknown_later(service, unknown),
                                                      name="availability-of-unknown-devices")
        if not messages:
            return
        try:
            rows = await service.twin(lambda s: s.record([], messages))
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the mapper at every (re)connect
            # Nothing committed is at risk: the readings wait in memory and are retried (the
            # recorder says so). The availability goes out directly; the state view follows with
            # the next reading the twin takes.
            log.error("connected, but cannot queue the devices' availability and state in the twin (%s): is the "
                      "disk of %s full or read-only? Publishing the availability directly", exc, service.config.twin.path)
            for m in messages:
                if isinstance(m.body, bytes):
                    await self.bus.publish(m.topic, m.body, qos=m.qos, retain=m.retain)
            return
        if rows and self.publisher:
            self.publisher.offer(rows)

    def _refused_offline(self, service: MapperService) -> list[OutMessage]:
        """`offline` on the availability of every device the mapper refuses (no driver for its
        protocol), and of every device an extension keeps but does not run (`service.not_run`:
        edgecore's Devices that did not validate, or wait for their model or a resource): a
        previous run may have left `online` there, and nothing else would replace it while the
        device is not run. Only ids of the current definitions, or those an extension validated
        (DeviceId; edgecore's, when it kept the Device), and none that a running device or a
        definition holds: a topic is built from nothing else. (Its retained state, if a previous
        run left one, stays: there is no reading of this run to put in it; the availability says
        the device is not there.)"""
        definitions = service.definitions.devices if service.definitions else {}
        refused = [device for device in service.refused
                   if isinstance(device, DeviceId) and device in definitions and device not in service.runners]
        not_run = [device for device in service.not_run
                   if isinstance(device, DeviceId) and device not in definitions and device not in service.runners]
        return [self._availability(device, OFFLINE) for device in refused + not_run]

    async def _on_not_run(self, devices: list[DeviceId]) -> None:
        """Devices an extension keeps and newly does not run, which were not running (see
        MapperService.devices_not_run): `offline` on their availability at once, as for a device a
        reload refuses, not only at the next connect."""
        assert self._service is not None
        service = self._service
        definitions = service.definitions.devices if service.definitions else {}
        messages = [self._availability(device, OFFLINE) for device in devices
                    if isinstance(device, DeviceId) and device not in definitions and device not in service.runners]
        if not messages:
            return
        rows = await service.twin(lambda s: s.record([], messages))
        if rows and self.publisher:
            self.publisher.offer(rows)

    async def _announce_unknown_later(self, service: MapperService, devices: list[DeviceId]) -> None:
        """`offline` for the devices whose state is still unknown after FIRST_STATE_GRACE_S."""
        await asyncio.sleep(FIRST_STATE_GRACE_S)
        still = [d for d in devices if (r := service.runners.get(d)) is not None and r.state == UNKNOWN]
        if not still:
            return
        try:
            rows = await service.twin(lambda s: s.record([], [self._availability(d, OFFLINE) for d in still]))
        except Exception as exc:  # noqa: BLE001 - a full disk: the device's next state change announces it
            log.error("cannot queue the availability of %s in the twin: %s", ", ".join(map(str, still)), exc)
            return
        if rows and self.publisher:
            self.publisher.offer(rows)

    def _cancel_unknown_later(self) -> None:
        if self._unknown_later is not None:
            self._unknown_later.cancel()
            self._unknown_later = None

    def _availability(self, device: DeviceId, state: str) -> OutMessage:
        value = b"online" if state in ONLINE_STATES else b"offline"
        return OutMessage(self.topics.device_availability(device), value, retain=True, kind="state")

    def _on_state(self, definition: DeviceDefinition, state: str, detail: str | None) -> list[OutMessage]:
        """A device's state changed: its availability, and its state view again with the new state
        (not held to the readings' pace: a device whose reads fail sends none, and its retained
        state said `ok` while it was `unhealthy`). No state view before the device's first good
        reading in this run (Telemetry.state_message).

        Called once per change the service writes to the twin, in that transaction: the service
        coalesces a device's changes to one per mqtt.state_interval_ms (MapperService._on_state,
        state_interval_s set in setup): the first at once, the latest once the interval has
        passed, `offline` and everything once a clean stop began at once. A device that flaps
        (`ok`, `unhealthy`, `ok` twice per collect cycle with failure_threshold 1) sent a retained
        state message and an availability message for every change: the availability (kind
        "state") is never dropped by the outbox limits, so in an outage those rows piled up
        without bound and pushed real readings out of the outbox."""
        assert self.telemetry is not None
        device = definition.id
        self.telemetry.set_state(device, state)
        messages = [self._availability(device, state)]
        view = self.telemetry.state_message(device)
        if view is not None:
            messages.append(view)
        if self._serving():
            messages.append(self._state_result(device, state))
        return messages

    def _on_locks(self, locks: dict) -> None:
        """The devices locked for maintenance changed: the state view of each device whose lock changed
        goes out at once (Home Assistant's controls follow its `$locked`). It waited for the device's
        next report: a control stayed usable after `mapper lock`, and unavailable after `mapper unlock`,
        for up to a reportCycle."""
        if self.telemetry is None:
            return
        before, self.telemetry.locks = self.telemetry.locks, locks
        changed = sorted(d for d in before.keys() | locks.keys() if before.get(d) != locks.get(d))
        if changed and self._service is not None and not self._stopping:
            task = asyncio.create_task(self._send_lock_views(self._service, changed), name="lock-state-views")
            self._lock_views.add(task)
            task.add_done_callback(self._lock_views.discard)

    async def _send_lock_views(self, service: MapperService, devices: list[DeviceId]) -> None:
        """The state views of `devices`, through the outbox (none before a device's first reading)."""
        assert self.telemetry is not None
        messages = [view for device in devices if (runner := service.runners.get(device)) is not None
                    and runner.state != UNKNOWN and (view := self.telemetry.state_message(device)) is not None]
        if not messages:
            return
        try:
            rows = await service.twin(lambda s: s.record([], messages))
        except Exception as exc:  # noqa: BLE001 - the device's next report sends it anyway
            log.warning("cannot queue the state views of the devices whose lock changed: %s", exc)
            return
        if rows and self.publisher:
            self.publisher.offer(rows)

    def _serving(self) -> bool:
        return self.router is not None and self.router.serve_twin_protocol

    def _state_result(self, device: DeviceId, state: str) -> OutMessage:
        """edgecore's `$hw/events/device/<ns>/<name>/state/update/result` for a state change: what
        it publishes after a mapper's state/update, here after the mapper's own (its availability
        with it). Kind telemetry: the outbox limits may drop old ones in an outage, oldest first.
        Queued as "state" (never dropped) it doubled the never-dropped rows of each change next to
        the availability: a flapping device in a broker outage reached twin.outbox_max_rows twice
        as fast, the readings were dropped for it, and every stale result of the outage replayed
        at the reconnect. The retained availability (kind "state") carries the current state."""
        if state in ONLINE_STATES:
            self._last_online[device] = payloads.now_ms()
        return OutMessage(Topics.hw(device, "state/update/result"),
                          payloads.state_result(device.name, state, self._last_online.get(device)),
                          kind="telemetry", sequenced=False)

    async def _on_membership(self, added: list[DeviceId], removed: list[DeviceId],
                             before: dict[DeviceId, DeviceDefinition], after: dict[DeviceId, DeviceDefinition]) -> None:
        """A switch of the device set added or removed devices: edgecore's
        `$hw/events/node/<node>/membership/updated`, one message per switch, each device as
        membership/get/result lists it (a removed one as the twin keeps it: offline)."""
        if not self._serving() or self._service is None or self.topics is None or self.router is None:
            return

        def read(store: TwinStore) -> tuple[list[Any], list[Any]]:
            twins: tuple[list[Any], list[Any]] = ([], [])
            for ids, out in ((added, twins[0]), (removed, twins[1])):
                for device in ids:
                    with contextlib.suppress(UnknownDevice):
                        out.append(store.device(device))
            return twins
        joined, left = await self._service.twin(read)
        body = payloads.membership_updated([(t, after.get(t.id)) for t in joined], [(t, before.get(t.id)) for t in left])
        for device in removed:
            self._last_online.pop(device, None)
        await self.router._send([OutMessage(self.topics.membership_updated(), body, kind="twin", sequenced=False)])

    def _documents_due(self, batch: list[Reading]) -> Extra | None:
        """After a batch's messages were made: the devices whose reported values changed at a report
        point (Telemetry.documents) get a twin/update/document each, with those properties, built
        from the twin in the batch's own transaction (no commit of their own), and a delta if one
        remains, as edgecore publishes after each actual value a mapper reports. Kind telemetry:
        the outbox limits may drop old ones in an outage (newer ones supersede them)."""
        assert self.telemetry is not None
        due = self.telemetry.documents
        if not due:
            return None
        self.telemetry.documents = {}
        return Extra(lambda store: self._document_rows(store, due), self._documented_now)

    def _document_rows(self, store: TwinStore, due: dict[DeviceId, list[str]]) -> _Documented:
        """In the twin thread, inside the batch's transaction (after its readings were recorded).

        Leaves `_documented` as it is: the recorder runs this again when the commit failed (a
        full disk, another process's lock) and is retried, and a baseline moved by the failed
        try made the retried document's `last` its `current`, the previous value lost. The new
        baselines go with the rows, applied once committed (_documented_now)."""
        messages: list[OutMessage] = []
        baselines: dict[DeviceId, dict[str, tuple[Value | None, int | None, int]] | None] = {}
        for device, names in due.items():
            try:
                twin = store.device(device)
            except UnknownDevice:  # removed by a reload meanwhile
                baselines[device] = None
                continue
            names = [n for n in names if n in twin.properties]
            if not names:
                continue
            # `last` as edgecore's for an update of actual values: the twin before it, which differs
            # from `current` in the actual value only (the one of the previous document, or of the
            # twin at start; none for a property new in this run).
            messages.append(OutMessage(Topics.hw(device, "twin/update/document"),
                                       payloads.reported_document(twin, names, self._documented.get(device, {})),
                                       kind="telemetry", sequenced=False))
            delta = payloads.delta(twin)
            if delta is not None:
                messages.append(OutMessage(Topics.hw(device, "twin/update/delta"), delta, kind="telemetry",
                                           sequenced=False))
            baselines[device] = {n: (p.reported, p.reported_ts, p.reported_version)
                                 for n in names for p in (twin.properties[n],)}
        return (store.enqueue(messages) if messages else []), baselines

    def _documented_now(self, result: _Documented) -> None:
        """On the loop, once the documents' transaction committed: their values are the baselines."""
        rows, baselines = result
        for device, values in baselines.items():
            if values is None:
                self._documented.pop(device, None)
            else:
                self._documented.setdefault(device, {}).update(values)
        self._offer(rows)

    def _offer(self, rows: list[OutboxRow]) -> None:
        if rows and self.publisher is not None:
            self.publisher.offer(rows)

    async def _on_applied(self, service: MapperService, change: DesiredChange, error: str | None) -> None:
        """After a desired value was written: the twin document (and a delta if one remains)."""
        if self.router is None or not self.router.serve_twin_protocol:
            return
        device = change.device_id
        twin = await service.twin(lambda s: s.device(device))
        # `last`: the property's twin before the change (edgecore's previous twin state), taken
        # by the device loop before it wrote the value; absent only if the twin could not say.
        before = None if change.last is None else dataclasses.replace(twin, properties={change.property: change.last})
        messages = [OutMessage(Topics.hw(device, "twin/update/document"),
                               payloads.update_document("", before, twin, [change.property]), kind="twin",
                               sequenced=False)]
        delta = payloads.delta(twin)
        if delta is not None:
            messages.append(OutMessage(Topics.hw(device, "twin/update/delta"), delta, kind="twin", sequenced=False))
        await self.router._send(messages)


def _url_without_credentials(url: str) -> str:
    """`mqtt://host:port`: the broker's URL with no user or password, whatever the config's says
    (its validation refuses credentials in the URL; a note in the twin must not depend on that)."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}"
