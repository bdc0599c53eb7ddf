"""MqttBus: the mapper's one MQTT connection (aiomqtt), kept up with jittered, capped backoff.

aiomqtt (on paho-mqtt) because the mapper is asyncio end to end: publishes are awaited
until the broker's PUBACK, which is exactly when a queued message is done, and there
is no thread hand-off per message (paho's loop thread measured 18 ms p99 at 5k msg/s).

MQTT 5 is tried first; a broker that refuses it gets 3.1.1 from then on. The session is
persistent (clean start off, session expiry), so desired values sent while the mapper was
away are delivered when it returns. A retained last will marks the node `offline`.

The outbox's QoS 1 messages take a leaner path through paho (eventbus/paho_fastpath.py),
and paho's keepalive check runs on the mapper's clock grid (mapper/ticks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_ERR_SUCCESS, error_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import SecretStr

from eventbus import paho_fastpath
from eventbus.settings import MqttSettings
from mapper.logs import OUTAGE_NOTE_S, Outage, Throttle, held_note
from mapper.ticks import sleep_to_tick

log = logging.getLogger("mapper.mqtt")

T = TypeVar("T")

MessageHandler = Callable[[aiomqtt.Message], Awaitable[None]]

# Incoming messages wait in memory until the handler takes them, one at a time (each may wait for
# the twin): a client flooding the mapper must not take the Pi's memory. QoS 1/2 messages are
# acknowledged once handled, and MQTT 5's Receive Maximum asks the broker to send at most
# RECEIVE_MAXIMUM ahead (3.1.1: the broker's own window, max_inflight_messages in the shipped
# mosquitto.conf) and hold the rest. Not every broker keeps to it (Debian 12's Mosquitto 2.0.11 sends
# on past it once acknowledgements come, and sends a resumed session's whole queue at once), so a
# waiting message keeps only what the handlers read (~300 bytes besides its payload, against ~6 KB
# with paho's Properties object), and a message that finds INCOMING_LIMIT messages or
# INCOMING_BYTES of payload waiting is dropped (a QoS 1/2 one acknowledged: sent again later, it
# would be an old command), counted and logged. At most ~20 MiB, so a backlog the broker kept for
# the mapper while it was away (thousands of commands) is still handled whole.
# Queries and observations (twin/get, state/update, membership/get: QUERY_KINDS) may take only
# half of either limit: a client flooding them finds them dropped once half is waiting, and the
# other half stays for commands (`/set`, twin/update, and whatever else comes: a cloud worker's
# answers), which are dropped only at the full limit. One FIFO still: a command is handled after
# the queries sent before it, as it was (a twin/get after a twin/update sees the update). A flood
# of 10 paho clients on twin/get dropped every twin/update of another app (PUBACKed, never applied).
RECEIVE_MAXIMUM = 100
INCOMING_LIMIT = 10_000
INCOMING_BYTES = 16 * 1024 * 1024
QUERY_KINDS = ("twin/get", "state/update", "membership/get")


def incoming_kind(topic: str) -> str:
    """What an incoming message is, by its topic's end: "set", "twin/update", one of QUERY_KINDS,
    or "other" (for the drop's log line and count, and which half of the queue it may use)."""
    for kind in ("twin/update", *QUERY_KINDS):
        if topic.endswith("/" + kind):
            return kind
    return "set" if topic.endswith("/set") else "other"


class Credentials:
    """The broker password and TLS context, read again at every connection attempt: a rotated
    password (new in mqtt.password_file and in the broker's password file) or renewed certificate
    and key files are used at the next reconnect, no restart. A file that cannot be read or used
    then (not there while the new one is installed, emptied, a key that does not match) is logged
    naming it and what was read before is used meanwhile: the bus retries, never crashes. With
    nothing read before (the start checks both: MqttSettings.check_password, check_tls) the
    attempt fails as a refused connection does (MqttError), and is retried."""

    def __init__(self, settings: MqttSettings, logger: logging.Logger) -> None:
        self.settings = settings
        self._log = logger
        self._last: dict[str, Any] = {}

    def _reread(self, what: str, read: Callable[[], Any]) -> Any:
        try:
            self._last[what] = read()
        except ValueError as exc:
            if what not in self._last:
                raise aiomqtt.MqttError(str(exc)) from None
            self._log.error("MQTT connection to %s: %s; using the %s read before meanwhile (read again at "
                            "every attempt)", self.settings.url, exc, what)
        return self._last[what]

    def password(self) -> str | None:
        secret: SecretStr | None = self._reread("password", self.settings.read_password)
        return secret.get_secret_value() if secret is not None else None

    def tls_context(self) -> ssl.SSLContext | None:
        return self._reread("TLS certificates", self.settings.read_tls)


SESSION_TAKEN_OVER = 0x8E
# What paho reports when its own keepalive check gave up on a broker that stopped answering.
KEEPALIVE_TIMEOUT = 0x8D
# A connection up this long (or twice reconnect_max_s) resets the reconnect backoff (see MqttBus.run).
STABLE_S = 60.0
# Connections in a row lost this soon after they were made, the broker listening still: the log says
# what may cause it (MqttBus.run).
SHORT_WARN = 3
# How long the check whether the broker still listens, after such a loss, may take (still_listening).
LISTEN_CHECK_S = 1.0
# OUTAGE_NOTE_S (mapper/logs.py, imported here): while the broker stays away with the same cause, a
# line says so at most this often (MqttBus._log_lost).


def reason_code(exc: BaseException) -> int | None:
    """The MQTT reason code of a lost or refused connection (aiomqtt puts the broker's DISCONNECT
    reason in the cause of "Disconnected during message iteration"), if there is one."""
    for error in (exc, exc.__cause__):
        if isinstance(error, aiomqtt.MqttCodeError):
            value = getattr(error.rc, "value", error.rc)
            return value if isinstance(value, int) else None
    return None


# CONNACK reason codes of refused credentials: MQTT 5 "Bad user name or password" and "Not authorized"
# (paho gives MQTT 3.1.1's return codes 4 and 5 as these too).
BAD_CREDENTIALS = (0x86, 0x87)


def credentials_refused(exc: BaseException) -> bool:
    """Whether the broker refused the connection for its user name or password."""
    for error in (exc, exc.__cause__):
        if isinstance(error, MqttConnectError):
            value = getattr(error.rc, "value", None)
            if value in BAD_CREDENTIALS or (value is None and error.rc in (4, 5)):  # 3.1.1's own numbers
                return True
    return False


def credentials_hint(settings: MqttSettings) -> str:
    """What to check when the broker refuses the credentials: the user name and where the password
    comes from (never the password)."""
    user = f"mqtt.username ({settings.username!r})" if settings.username else "mqtt.username (not set)"
    if settings.password_file is not None:
        password = f"mqtt.password_file ({settings.password_file})"
    elif settings.password_env is not None:
        password = f"mqtt.password_env (environment variable {settings.password_env})"
    else:
        password = "mqtt.password_file (not set: no password is sent)"
    return (f"the broker did not accept the credentials: check {user} / {password} against the broker's "
            f"password file (mosquitto_passwd) and ACL")


def nothing_listens(exc: BaseException) -> bool:
    """Whether the connection was refused by the host itself: no broker listens at that address
    (aiomqtt raises MqttError from the ConnectionRefusedError, kept as its context)."""
    seen: BaseException | None = exc
    for _ in range(4):  # (the chain is short: aiomqtt's error, the socket's)
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def listen_hint(settings: MqttSettings) -> str:
    """What to do when nothing listens at mqtt.url: the usual first-start slip (the broker not started
    yet, or another port)."""
    return f"no broker listens at {settings.url}: start it (systemctl start mosquitto), or fix mqtt.url"


async def still_listening(host: str, port: int, timeout: float = LISTEN_CHECK_S) -> bool:
    """Whether the broker's address accepts a TCP connection now (closed at once, nothing sent: the
    broker logs a client that connected and closed). A broker going down closes its listener before
    its clients' connections (Mosquitto 2.0), and one unreachable accepts nothing: so, right after a
    connection was lost, False means the broker went away, True that it is up and chose to close it."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return True


def describe(exc: BaseException) -> str:
    """The error, with the broker's reason when aiomqtt keeps it in the cause."""
    cause = exc.__cause__
    if isinstance(cause, aiomqtt.MqttError) and str(cause) not in str(exc):
        return f"{exc} ({cause})"
    return str(exc)


def watch_disconnect(client: aiomqtt.Client, on_lost: Callable[[object], None] | None = None) -> Callable[[], None]:
    """Return a check, to call once `async with client` has entered, that raises MqttError when the
    connection was lost already.

    aiomqtt (2.5) forgets a disconnect that comes between the CONNACK and the end of its
    __aenter__ (it replaces its `_disconnected` future there, and ignores one that comes before the
    CONNACK is handled): a broker that accepts and drops the connection at once (another client
    taking over the client id, a broker going down) left the client "connected" to a closed
    socket, its message iterator waiting for ever and nothing connecting again.

    A disconnect before the CONNACK (a broker stopping just as it accepted the connection: restarted
    again right as the mapper got back in) ends aiomqtt's wait for the CONNACK here, which otherwise
    lasted its 10 s timeout and was logged as "Operation timed out".
    """
    paho_client = client._client  # noqa: SLF001
    theirs = paho_client.on_disconnect
    lost: list[object] = []
    forgotten: list[asyncio.Future[None] | None] = []
    loop = asyncio.get_running_loop()

    def connection_refused(connecting: asyncio.Future[None], reason_code: object) -> None:
        if not connecting.done():
            error = aiomqtt.MqttError("connection lost before the broker's CONNACK")
            if isinstance(reason_code, ReasonCode) and reason_code.value:
                error.__cause__ = aiomqtt.MqttCodeError(reason_code)  # describe() shows it
            connecting.set_exception(error)
            connecting.exception()  # retrieved: raised by __aenter__, if it still waits for it

    def on_disconnect(c: object, userdata: object, flags: object, reason_code: object, properties: object = None) -> None:
        lost.append(reason_code)
        if on_lost is not None:
            on_lost(reason_code)
        connecting = getattr(client, "_connected", None)
        if isinstance(connecting, asyncio.Future) and not connecting.done():
            loop.call_soon_threadsafe(connection_refused, connecting, reason_code)
        theirs(c, userdata, flags, reason_code, properties)
        forgotten.append(getattr(client, "_disconnected", None))  # the future aiomqtt may replace

    paho_client.on_disconnect = on_disconnect

    def check() -> None:
        if not lost:
            return
        for future in forgotten:  # its error is raised here (no "exception was never retrieved" in the log)
            if future is not None and future.done() and not future.cancelled():
                future.exception()
        reason = lost[0]
        error = (aiomqtt.MqttCodeError(reason, "Disconnected right after connecting") if not isinstance(reason, int)
                 or reason else aiomqtt.MqttError("Disconnected right after connecting"))
        disconnected = getattr(client, "_disconnected", None)
        if disconnected is not None and not disconnected.done():
            # So that leaving `async with client` does not try to disconnect a closed connection.
            disconnected.set_exception(error)
            disconnected.exception()  # retrieved: raised here instead
        raise error

    return check


@contextlib.asynccontextmanager
async def connection(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    """`async with client`, whose wait for the CONNACK a cancel always ends.

    aiomqtt waits for the CONNACK with asyncio.wait_for, which under Python 3.11 returns the result
    and drops a cancel that comes in the loop iteration where the CONNACK arrives (CPython gh-86296;
    3.12's wait_for does not). A stop at that moment (SIGTERM: the task group's one cancel) left
    the connection task running, connected: `mapper run` and the cloud worker never ended, and
    systemd killed them after TimeoutStopSec. The wait runs in a task of its own here, which a
    cancel of the caller cancels in turn; a connection it made all the same is closed before the
    caller's CancelledError goes on. Once connected, a cancel goes on whatever the disconnect raises."""
    entering = asyncio.ensure_future(client.__aenter__())
    try:
        await asyncio.wait((entering,))
    except asyncio.CancelledError:
        entering.cancel()
        await asyncio.wait((entering,))  # at once: cancelled, or connected (the cancel dropped), or failed
        if not entering.cancelled() and entering.exception() is None:
            with contextlib.suppress(Exception):  # (an MqttError in the cancel's place: run() would connect again)
                await client.__aexit__(None, None, None)
        raise
    entering.result()  # a refused or failed attempt: its MqttError
    try:
        yield client
    except asyncio.CancelledError as exc:
        # The cancel goes on whatever the disconnect says: a broker that takes nothing (frozen, or the
        # network gone, the socket's buffers full) never gets the DISCONNECT, and aiomqtt's wait for
        # it ended in an MqttError after 10 s, which run() took for a lost connection: it connected
        # again, for ever, and the stop never ended.
        with contextlib.suppress(Exception):
            await client.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    except BaseException as exc:
        await client.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await client.__aexit__(None, None, None)


async def until_lost(client: aiomqtt.Client, operation: Awaitable[T], what: str) -> T:
    """Await one of aiomqtt's acknowledged operations (a publish's PUBACK, a subscribe's SUBACK),
    ending (MqttError, the broker's reason as its cause) as soon as aiomqtt sees the connection lost,
    instead of at its timeout: aiomqtt waits for the acknowledgement only, and a broker that went
    down (restarted for an upgrade) between the CONNACK and the SUBACK held the reconnect 10 s, then
    logged "Operation timed out" in place of the disconnect."""
    done = asyncio.ensure_future(operation)
    lost: asyncio.Future[None] | None = getattr(client, "_disconnected", None)
    if lost is not None:
        try:
            await asyncio.wait((done, lost), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            done.cancel()
            raise
        if not done.done():
            done.cancel()
            raise aiomqtt.MqttError(f"connection lost while {what}") from (
                None if lost.cancelled() else lost.exception())
    return await done


async def publish_until_lost(client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int = 1,
                             retain: bool = False) -> None:
    """client.publish, whose wait for the acknowledgement also ends (MqttError, the broker's reason
    as its cause) as soon as aiomqtt sees the connection lost, instead of at its 30 s timeout."""
    await until_lost(client, client.publish(topic, payload, qos=qos, retain=retain, timeout=30), "publishing")


async def subscribe_until_lost(client: aiomqtt.Client, topic: str, **options: Any) -> object:
    """client.subscribe (what it returns: the SUBACK's reason codes), ending as soon as the connection is lost."""
    return await until_lost(client, client.subscribe(topic, **options), f"subscribing to {topic!r}")


class _IncomingQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's queue of incoming messages, bounded (see INCOMING_LIMIT): a message that does not
    fit goes to `on_drop` instead."""

    def __init__(self, on_drop: Callable[[aiomqtt.Message, _IncomingQueue], None]) -> None:
        super().__init__()
        self._on_drop = on_drop
        self.payload_bytes = 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size = len(item.payload) if isinstance(item.payload, bytes | bytearray) else 0
        # A query may use half of the limits (see QUERY_KINDS): the other half is kept for commands.
        share = 2 if incoming_kind(item.topic.value) in QUERY_KINDS else 1
        if self.qsize() * share >= INCOMING_LIMIT or (self.payload_bytes + size) * share > INCOMING_BYTES:
            self._on_drop(item, self)
            return
        if not _will_marked(item):  # (kept for MqttBus.own_will: a few bytes, once per connection)
            item.properties = None  # no handler reads them, and they are most of a waiting message's memory
        self.payload_bytes += size
        super().put_nowait(item)

    def get_nowait(self) -> aiomqtt.Message:  # get() takes its items through here too
        item = super().get_nowait()
        self.payload_bytes -= len(item.payload) if isinstance(item.payload, bytes | bytearray) else 0
        return item


def _will_marked(message: aiomqtt.Message) -> bool:
    """Whether `message` carries a last will's mark (WILL_MARK): a mapper's will, published by the broker."""
    marks = getattr(message.properties, "UserProperty", None) or ()
    return any(key == WILL_MARK for key, _ in marks)


def refused_reason(granted: object) -> str | None:
    """The broker's reason for refusing a subscription, from what client.subscribe returned (the
    SUBACK's reason code for its one filter: from 0x80, MQTT 5's 0x87 Not authorized from an ACL
    plugin, 3.1.1's 0x80), e.g. "Not authorized (0x87)"; None when it was granted."""
    code = next(iter(granted), None) if isinstance(granted, list | tuple) else None
    value = getattr(code, "value", code)
    if not isinstance(value, int) or value < 0x80:
        return None
    return f"{code} (0x{value:02x})" if code is not value else f"0x{value:02x}"


def watch_refused_publishes(client: aiomqtt.Client, on_refused: Callable[[str, object], None]) -> None:
    """Call `on_refused(topic, reason_code)` for each message of client.publish the broker refuses in
    its PUBACK (MQTT 5, a reason code from 0x80; 3.1.1 has no way to say it): aiomqtt's publish()
    returns as for a success. Called on the event loop, before aiomqtt's own handler."""
    paho_client = client._client  # noqa: SLF001 - aiomqtt keeps paho's client here and has no ack hook
    theirs = paho_client.on_publish

    def on_publish(c: object, userdata: object, mid: int, reason_code: object, properties: object) -> None:
        if getattr(reason_code, "value", 0) >= 0x80:
            message = paho_client._out_messages.get(mid)  # noqa: SLF001 - paho still holds it here
            on_refused(message.topic if message is not None else f"message id {mid}", reason_code)
        theirs(c, userdata, mid, reason_code, properties)

    paho_client.on_publish = on_publish


def log_refused_publish(logger: logging.Logger, throttle: Throttle, what: str, topic: str, reason_code: object,
                        username: str | None) -> None:
    """The ERROR line for a message the broker refused (see watch_refused_publishes), a few times a
    minute: `what` ("the mapper's message") on `topic` was not delivered, and the ACL to check."""
    held = throttle("publish_refused")
    if held is not None:
        logger.error("the broker refused %s on %r: %s (0x%02x); it was not delivered: check the broker's ACL for "
                     "user %r (mosquitto/README.md, \"Who may do what\")%s", what, topic[:200], reason_code,
                     getattr(reason_code, "value", 0), username, held_note(held))


def _carried(topic_filter: str) -> str:
    """What the mapper receives on one of its subscriptions, for the log."""
    for suffix, what in (("/set", "desired values"), ("/twin/update", "desired values (KubeEdge twin updates)"),
                         ("/twin/get", "twin requests"), ("/state/update", "device state updates"),
                         ("/membership/get", "membership requests"),
                         ("/availability", "other clients' messages on the node's availability (to correct them)")):
        if topic_filter.endswith(suffix):
            return what
    return "messages"


WILL_MARK = "mapper-will"  # the user property of the last will (MqttBus.own_will)


class MqttBus:
    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        client_id_origin: str = "the same mqtt.client_id",
        will_topic: str,
        subscriptions: list[tuple[str, int]],
        on_message: MessageHandler,
        on_connect: Callable[[], Awaitable[None]],
        others_only: frozenset[str] = frozenset(),
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        # What another mapper with this client id would share with this one (advice when it is taken over).
        self.client_id_origin = client_id_origin
        self.will_topic = will_topic
        # Carried by the last will of the latest connection (MQTT 5 user property WILL_MARK, new at
        # each): a broker that stops publishes its clients' wills, this one's to the mapper itself
        # too, which is then not "another client". An earlier connection's will is not this one's.
        self.will_mark = ""
        # Whether the broker closed the current (or last) connection: not the mapper's keepalive giving
        # up on a silent broker, nor the mapper ending it (OutboxPublisher._note_loss). Set at a loss.
        self.closed_by_broker = False
        self.subscriptions = subscriptions
        # Filters of `subscriptions` for what other clients publish from now on only (MQTT 5 No Local,
        # and no retained messages at the subscribe); under MQTT 3.1.1, which has neither, left out.
        self.others_only = others_only
        self._on_message = on_message
        self._on_connect = on_connect
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        # Set at each connection made, lost or refused (each failed attempt: last_error may have
        # changed); cleared by whoever waits on it (EventBusExtension._note_broker).
        self.changed = asyncio.Event()
        self.connected_since: float | None = None  # when (time.time) the current connection was made
        self.protocol = aiomqtt.ProtocolVersion.V5 if settings.protocol != "3.1.1" else aiomqtt.ProtocolVersion.V311
        self.connects = 0
        # Since when (epoch s) the mapper has had no connection, and the last attempt's error: set at
        # the first failed attempt or lost connection, cleared on connecting (STATUS=: a broker that
        # refuses the mapper must not look like a healthy node there).
        self.last_error: str | None = None
        # The outage's log (_log_lost): its start (down_since) and the attempts failed since then.
        self.outage = Outage(note_s=OUTAGE_NOTE_S)
        self.messages_in = 0
        self.incoming_dropped = 0       # messages dropped: INCOMING_LIMIT / INCOMING_BYTES were waiting already
        self.incoming_dropped_by: Counter[str] = Counter()  # the same, by incoming_kind() ("twin/get", "set", ...)
        self.refused_subscriptions: dict[str, str] = {}  # topic filter -> the broker's reason, this connection
        self.publishes_refused = 0      # messages of publish() the broker refused in its PUBACK (logged)
        # Topics a publish() awaits the acknowledgement of (how many), and the refusals heard for them.
        self._awaiting: Counter[str] = Counter()
        self._refusals: dict[str, object] = {}
        # Cleared by hold_incoming() (a stop): messages are then left to the broker's session.
        self._taking = True
        self._idle = asyncio.Event()    # set while no message is being handled
        self._idle.set()
        self._log_throttle = Throttle()
        # Fast path for the outbox (see publish_nowait): called on the event loop with the message
        # id of every acknowledged publish of the current connection (returns True for its own
        # messages), and when the connection is lost.
        self.on_ack: Callable[[int, int], bool] | None = None  # (mid, reason code): True if it was the outbox's
        self.on_lost: Callable[[], None] | None = None
        self.fastpath: paho_fastpath.FastPath | None = None  # of the latest connection
        # Largest PUBLISH packet the broker takes on this connection: its CONNACK's Maximum Packet
        # Size (MQTT 5), else mqtt.max_packet_bytes. The outbox never sends a larger one (the
        # broker would disconnect the mapper for it). Set before `connected` is.
        self.packet_limit = settings.max_packet_bytes
        self.packet_limit_announced = False
        self._check_connected: Callable[[], None] = lambda: None  # of the latest connection (watch_disconnect)
        self._credentials = Credentials(settings, log)

    def _will_properties(self) -> Properties:
        self.will_mark = secrets.token_hex(8)
        properties = Properties(PacketTypes.WILLMESSAGE)
        properties.UserProperty = [(WILL_MARK, self.will_mark)]
        return properties

    def own_will(self, message: aiomqtt.Message) -> bool:
        """Whether `message` is this bus's own last will, published by a broker closing the connection."""
        marks = getattr(message.properties, "UserProperty", None) or []
        return bool(self.will_mark) and (WILL_MARK, self.will_mark) in marks

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        password = self._credentials.password()
        v5 = self.protocol == aiomqtt.ProtocolVersion.V5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            s.host, s.port,
            identifier=self.client_id,
            username=s.username,
            password=password,
            protocol=self.protocol,
            will=aiomqtt.Will(self.will_topic, b"offline", qos=1, retain=True,
                              properties=self._will_properties() if v5 else None),
            clean_session=None if v5 else False,
            clean_start=False if v5 else 3,
            properties=properties,
            keepalive=s.keepalive_s,
            # The outbox publisher keeps the window (max_inflight - 1, leaving one for the awaited
            # availability messages); paho's own window rescans every queued message on each PUBACK.
            max_inflight_messages=0,
            max_concurrent_outgoing_calls=None,
            tls_context=self._credentials.tls_context(),
            tls_insecure=(s.tls.insecure_skip_hostname_check or None) if s.uses_tls and s.tls else None,
            timeout=10,
            logger=logging.getLogger("mapper.mqtt.client"),
            queue_type=lambda maxsize: _IncomingQueue(  # noqa: ARG005
                lambda message, queue: self._drop_incoming(paho_client, message, queue)),
        )
        paho_client = client._client  # noqa: SLF001
        paho_client.manual_ack_set(True)  # acknowledged once handled (see RECEIVE_MAXIMUM)
        # aiomqtt logs a WARNING per publish while more than 10 of its calls are pending.
        client.pending_calls_threshold = s.max_inflight + 10
        self._hook_acks(client)
        self._check_connected = watch_disconnect(client, self._note_lost)
        return client

    def _note_lost(self, reason: object) -> None:
        # Neither a keepalive timeout (the broker went silent: frozen, a stalled disk, the network) nor
        # a disconnect of the mapper's own (0) says anything about the messages in flight.
        self.closed_by_broker = not (isinstance(reason, ReasonCode) and reason.value in (0, KEEPALIVE_TIMEOUT))

    def _hook_acks(self, client: aiomqtt.Client) -> None:
        """Also report every PUBACK to `on_ack`, so the outbox can publish without awaiting each message.

        aiomqtt's own publish creates an event, a timeout task and a pending-call entry per message and
        wakes one coroutine per PUBACK; the outbox needs only the message id. paho calls this on the event
        loop (aiomqtt reads the socket from an asyncio reader callback): no thread hop.
        """
        paho_client = client._client  # noqa: SLF001 - aiomqtt keeps paho's client here and has no ack hook
        watch_refused_publishes(client, self._publish_refused)  # those of publish(): the outbox's are not seen
        original = paho_client.on_publish

        def on_publish(c: object, userdata: object, mid: int, reason_code: object, properties: object) -> None:
            on_ack = self.on_ack
            if on_ack is not None and self.client is client and on_ack(mid, getattr(reason_code, "value", 0)):
                return  # an outbox message: nobody awaits it in aiomqtt
            original(c, userdata, mid, reason_code, properties)

        paho_client.on_publish = on_publish
        self.packet_limit, self.packet_limit_announced = self.settings.max_packet_bytes, False
        their_on_connect = paho_client.on_connect

        def on_connect(c: object, userdata: object, flags: object, reason_code: object, properties: object) -> None:
            # CONNACK, on the event loop: before aiomqtt's handler lets run() go on to `connected`.
            announced = getattr(properties, "MaximumPacketSize", None)
            if isinstance(announced, int) and announced > 0:
                self.packet_limit, self.packet_limit_announced = announced, True
            else:
                self.packet_limit, self.packet_limit_announced = self.settings.max_packet_bytes, False
            their_on_connect(c, userdata, flags, reason_code, properties)

        paho_client.on_connect = on_connect
        self.fastpath = paho_fastpath.install(
            paho_client, lambda mid, reason: self.on_ack is not None and self.client is client and self.on_ack(mid, reason))

    @contextlib.asynccontextmanager
    async def _keepalive_on_grid(self, client: aiomqtt.Client) -> AsyncIterator[None]:
        """Run paho's keepalive check (`loop_misc`) on the clock grid instead of aiomqtt's own loop.

        aiomqtt calls it every second counted from the moment it connected; on the grid of
        mapper.ticks it shares the wake-up of the devices' reads instead of adding its own.
        If aiomqtt no longer has its `_misc_task`, its loop is left to run.
        """
        theirs = getattr(client, "_misc_task", None)
        if theirs is None:
            yield
            return
        theirs.cancel()
        paho_client = client._client  # noqa: SLF001

        async def keepalive() -> None:
            while paho_client.loop_misc() == MQTT_ERR_SUCCESS:
                await sleep_to_tick(1.0)

        task = asyncio.create_task(keepalive(), name="mqtt-keepalive")
        try:
            yield
        finally:
            task.cancel()

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        """MQTT 5: retain as published, so that a message reaches the mapper with the retain flag its
        sender gave it. A command with the flag is then known to be one, also when a bridge hands
        the cloud broker's copy on at every reconnect (as a live message to those already
        subscribed here), and the extension can ignore it (see EventBusExtension._on_message)."""
        self.refused_subscriptions = {}
        for topic, qos in self.subscriptions:
            if self.protocol == aiomqtt.ProtocolVersion.V5:
                others = topic in self.others_only
                options = SubscribeOptions(qos=qos, retainAsPublished=True, noLocal=others,
                                           retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND if others
                                           else SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
                granted = await subscribe_until_lost(client, topic, options=options)
            elif topic in self.others_only:
                continue
            else:
                granted = await subscribe_until_lost(client, topic, qos=qos)
            self._check_granted(topic, granted)

    def _check_granted(self, topic_filter: str, granted: object) -> None:
        """A subscription the broker refused in its SUBACK (see refused_reason): logged once per
        connection and kept in `refused_subscriptions` (STATUS=). Ignored, the mapper looked connected
        while what is sent there never came: an operator's wrong ACL line gave silence. The other
        subscriptions go on."""
        reason = refused_reason(granted)
        if reason is None:
            return
        self.refused_subscriptions[topic_filter] = reason
        log.error("the broker refused the subscription to %r: %s; %s sent to %s will not reach this mapper: check "
                  "the broker's ACL for user %r (mosquitto/README.md, \"Who may do what\")", topic_filter, reason,
                  _carried(topic_filter), topic_filter, self.settings.username)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        short = 0  # connections in a row lost within stable_s of being made, the broker listening still
        # A connection that lasted this long resets the backoff; one lost sooner does not (see below).
        stable_s = max(STABLE_S, 2 * self.settings.reconnect_max_s)
        while True:
            connected_at: float | None = None
            delay = 0.0
            try:
                async with connection(self._client()) as client, self._keepalive_on_grid(client):
                    self._check_connected()
                    connected_at = loop.time()
                    self.client = client
                    self.connects += 1
                    await self._subscribe(client)
                    log.info("connected to %s as %s (MQTT %s); packets up to %d bytes (%s)", self.settings.url,
                             self.client_id, "5" if self.protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1",
                             self.packet_limit, "the broker's limit" if self.packet_limit_announced
                             else "mqtt.max_packet_bytes: the broker announced none")
                    if (back := self.outage.back()) is not None:
                        log.info("MQTT connection to %s back %s", self.settings.url, back)
                    self.disconnected.clear()
                    self.last_error = None
                    self.connected_since = time.time()
                    self.closed_by_broker = False
                    self.connected.set()
                    self.first_attempt.set()
                    self.changed.set()
                    await self._on_connect()
                    async for message in client.messages:
                        if not self._taking:  # stopping: not handled, not acknowledged (see hold_incoming)
                            continue
                        self.messages_in += 1
                        self._idle.clear()
                        try:
                            await self._on_message(message)
                        finally:
                            self._idle.set()
                        if message.qos:  # handled: the broker may send the next (offline: it sends this again)
                            client._client.ack(message.mid, message.qos)  # noqa: SLF001
            except aiomqtt.MqttError as exc:
                # Only a connection that lasted resets the backoff. One the broker drops soon after
                # accepting it (another client connecting with the same client id: two mappers with
                # the same client id take each other's connection over, and Mosquitto 2.0 just closes
                # the old one; a broker limit the mapper trips at once) made the mapper reconnect
                # every second or so for ever, each time resubscribing and sending everything
                # unacknowledged again.
                #
                # `short` counts the losses that look like a takeover of the client id, to say so
                # (MQTT 3.1.1 has no reason code for it, and Mosquitto 2.0 gives none over MQTT 5
                # either): the broker, up and accepting connections, closes each connection soon
                # after making it, and each next attempt connects. A broker restarting (a package
                # upgrade, a host that flaps) also ends connections soon after they were made, but
                # it is not listening right after the loss (still_listening: its listener is
                # closed before its clients' connections, and one unreachable accepts nothing), or
                # an attempt fails before the next connection: either ends the count. The broker's
                # own takeover reason (SESSION_TAKEN_OVER) counts with no check. A loss to the
                # mapper's own keepalive (KEEPALIVE_TIMEOUT) ends it too: the broker closed nothing,
                # it stopped answering (frozen, or the network to it gone) while the kernel still
                # accepts connections at its address.
                if connected_at is None:
                    short = 0
                elif loop.time() - connected_at >= stable_s:
                    attempt, short = 0, 0
                elif reason_code(exc) == KEEPALIVE_TIMEOUT:
                    short = 0
                elif reason_code(exc) == SESSION_TAKEN_OVER or await still_listening(
                        self.settings.host, self.settings.port):
                    short += 1
                else:
                    short = 0
                attempt += 1
                if connected_at is None:
                    self.outage.failed()
                if self._should_downgrade(exc):
                    log.warning("broker refused MQTT 5 (%s); using 3.1.1", exc)
                    self.protocol = aiomqtt.ProtocolVersion.V311
                    continue
                delay = self._backoff(attempt)
                self.last_error = describe(exc)[:200]
                if reason_code(exc) == SESSION_TAKEN_OVER:
                    self.outage.told(self.last_error)
                    log.error("MQTT connection to %s taken over: another client connected with client id %r (%s); "
                              "is another mapper using %s? Give each mapper its own id; else the broker's log "
                              "tells which user connected with it. Retrying in %.1f s",
                              self.settings.url, self.client_id, describe(exc), self.client_id_origin, delay)
                elif connected_at is not None and short >= SHORT_WARN:
                    self.outage.told(self.last_error)
                    log.error("MQTT connection to %s lost again soon after it was made (%d times in a row): %s; "
                              "is another client (another mapper using %s?) connecting with client id %r? "
                              "Else see the broker's log. Retrying in %.1f s", self.settings.url, short,
                              describe(exc), self.client_id_origin, self.client_id, delay)
                else:
                    self._log_lost(exc, delay)
            finally:
                was_connected = self.connected.is_set()
                self.connected.clear()
                self.connected_since = None
                self.outage.down()
                self.refused_subscriptions = {}  # "on the current connection" (STATUS=): there is none
                self.disconnected.set()
                self.client = None
                self.first_attempt.set()
                self.changed.set()
                if self.on_lost is not None:
                    self.on_lost()
            if was_connected and not delay:
                attempt += 1
                delay = self._backoff(attempt)
            await asyncio.sleep(delay)

    def _log_lost(self, exc: aiomqtt.MqttError, delay: float) -> None:
        """A connection lost or refused: the outage's first failure, and each change of its cause, at
        WARNING; then, while the cause stays the same, the attempts at DEBUG and a WARNING at most
        every OUTAGE_NOTE_S that it still lasts (mapper.logs.Outage). The connection, when it comes,
        says at INFO how long it was down (run())."""
        cause = describe(exc)
        hint = (f"; {credentials_hint(self.settings)}" if credentials_refused(exc)
                else f"; {listen_hint(self.settings)}" if nothing_listens(exc) else "")
        verdict = self.outage.tell(self.last_error or cause)
        if verdict == Outage.FIRST:
            log.warning("MQTT connection to %s lost or refused: %s%s; retrying in %.1f s", self.settings.url, cause,
                        hint, delay)
        elif verdict == Outage.STILL:
            log.warning("MQTT connection to %s: still not connected %s: %s%s; %d attempts (the next in %.1f s)",
                        self.settings.url, self.outage.note(), cause, hint, self.outage.attempts, delay)
        else:
            log.debug("MQTT connection to %s lost or refused: %s; retrying in %.1f s", self.settings.url, cause, delay)

    @property
    def down_since(self) -> float | None:
        """When the connection went away (time.time), None while connected (and before the first attempt)."""
        return self.outage.since

    @property
    def failed_attempts(self) -> int:
        """Connection attempts failed since down_since."""
        return self.outage.attempts

    async def hold_incoming(self) -> None:
        """Handle no more incoming messages, and return once the one being handled is done.

        For a clean stop, before the outbox is drained: what a message causes (a twin reply, a
        desired value's result) is then committed before the drain and sent with it, never left
        in the outbox for the next start. Messages arriving from now on are neither handled nor
        acknowledged: the broker keeps a QoS 1 one in the mapper's session (session_expiry_s) and
        sends it again at the next connection; a QoS 0 one is gone, as QoS 0 allows.
        """
        self._taking = False
        await self._idle.wait()

    def _publish_refused(self, topic: str, reason_code: object) -> None:
        """A message of publish() (the node's availability, a reply sent directly) the broker refused
        in its PUBACK: logged naming its topic, and counted. The outbox's own refusals are the publisher's."""
        self.publishes_refused += 1
        if topic in self._awaiting:  # (seen before aiomqtt's own handler ends the publish() waiting for it)
            self._refusals[topic] = reason_code
        log_refused_publish(log, self._log_throttle, "the mapper's message", topic, reason_code, self.settings.username)

    def _drop_incoming(self, paho_client: object, message: aiomqtt.Message, queue: _IncomingQueue) -> None:
        if message.qos:
            paho_client.ack(message.mid, message.qos)  # type: ignore[attr-defined]
        kind = incoming_kind(message.topic.value)
        query = kind in QUERY_KINDS
        self.incoming_dropped += 1
        self.incoming_dropped_by[kind] += 1
        held = self._log_throttle(("dropped", query))  # commands' drops are not hidden behind a flood's
        if held is not None:
            log.warning("dropped an incoming message on %r (%s, %s): %d messages (%d payload bytes) are waiting to "
                        "be handled already, %s (is a client flooding the mapper?)%s", message.topic.value[:200],
                        kind, "a query" if query else "not a query", queue.qsize(), queue.payload_bytes,
                        "half the limit, all a query may take" if query else "the limit", held_note(held))

    def _should_downgrade(self, exc: aiomqtt.MqttError) -> bool:
        return (self.settings.protocol == "auto" and self.protocol == aiomqtt.ProtocolVersion.V5
                and "protocol" in str(exc).lower() and "unsupported" in str(exc).lower())

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        cap = min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(attempt, 16))
        return random.uniform(s.reconnect_min_s, max(s.reconnect_min_s, cap))

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> object | None:
        """Publish and wait for the broker's acknowledgement (QoS 1). Raises MqttError when offline,
        or as soon as the connection is lost while waiting. Returns the broker's reason code when
        its PUBACK refused the message (MQTT 5, from 0x80: its ACL denies the topic; logged by
        _publish_refused), None when it took it (or, on MQTT 3.1.1, could not say otherwise).

        aiomqtt's publish waits for the acknowledgement or its timeout, not for the connection: a
        connection lost before the ack (a broker frozen right after the CONNACK, noticed by the
        keepalive check) would hold the caller, e.g. the `online` message of run(), for the whole
        30 s, and the reconnect with it. So the wait also ends when aiomqtt sees the disconnect,
        as its own message iterator does.
        """
        client = self.client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        self._awaiting[topic] += 1
        try:
            await publish_until_lost(client, topic, payload, qos=qos, retain=retain)
        finally:
            self._awaiting[topic] -= 1
            if not self._awaiting[topic]:
                del self._awaiting[topic]
            refused = self._refusals.pop(topic, None)
        return refused

    def flush(self) -> None:
        """Write the messages handed over by publish_nowait now (call it before awaiting their acks)."""
        fast = self.fastpath
        if fast is not None and self.client is not None:
            fast.flush()

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Hand a message to the connection and return its message id; `on_ack(mid)` follows.

        Raises MqttError when offline. The caller keeps the number in flight within `max_inflight`,
        and calls flush() after a burst (the fast path queues without writing).
        """
        client = self.client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        fast = self.fastpath
        if fast is not None:
            mid = fast.publish(topic, payload, qos, retain)
            if mid is not None:
                return mid
        info = client._client.publish(topic, payload, qos, retain)  # noqa: SLF001 - see _hook_acks
        if info.rc != MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttError(f"could not publish: {error_string(info.rc)}")
        return info.mid
