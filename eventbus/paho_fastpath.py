"""A leaner path through paho-mqtt for the outbox's QoS 1 messages, installed per connection.

Why: for each QoS 1 message paho 2.x builds an MQTTMessage, an MQTTMessageInfo with its own
threading.Condition, logs, and writes it with a send() of its own; it reads each PUBACK with
three or four recv() calls and turns it into a ReasonCode and a Properties object. The
outbox needs none of that: it has the bytes and wants the message id back. That bookkeeping
was the largest single cost at full throughput, and on a quiet Pi each PUBACK group meant
a wake-up of its own (on this VM a wake-up costs 100-250 us of CPU).

What it changes, on one paho `Client` instance (instance attributes, nothing global):

- `publish()` builds the PUBLISH packet itself and appends it to paho's queue of outgoing
  packets, with a message id from paho's own counter. Only QoS 1 messages on a plain topic
  take this path; the caller uses paho's publish for anything else.
- `flush()` (the publisher calls it after each burst) has paho write the queue at once,
  instead of registering for "writable" and writing a loop iteration or two later.
- Queued packets are joined before paho writes them: a burst of publishes is one send(), so
  the broker reads the burst at once and its acknowledgements come back together.
- `recv` is buffered: one recv(4 KiB), and paho's small reads are served from it. Before
  paho sees the buffer, plain successful PUBACKs (reason code below 0x80, no properties)
  for messages published here are taken off its head and reported with `on_ack(mid, 0)`.
  Everything else (other packets, errors, properties, publishes aiomqtt awaits) is left
  to paho, which reads it from the same buffer. `loop_read` drains the buffer before it
  returns, because the event loop's reader is woken only by bytes still in the socket.

It relies on paho internals (`_sock`, `_sock_recv`, `_in_packet`, `_handle_pubackcomp`,
`_mid_generate`, `_out_packet`, `_protocol`, `_msgtime_mutex`, `_last_bytes_received`,
`_registered_write`, `loop_read`, `loop_write`); `install()` checks for them and leaves the
client untouched if a paho release renamed any of them. `tests/test_paho_fastpath.py` checks
it is active with the paho version installed (pyproject.toml sets only a lower bound), and that
every part of it is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.client import DISCONNECT, MQTT_ERR_SUCCESS, MQTTv5, PUBLISH, Client

log = logging.getLogger("mapper.mqtt")

READ_SIZE = 4_096
TOPIC_CACHE = 10_000
PUBACK = 0x40
_now = getattr(paho, "time_func", time.monotonic)  # the clock paho's keepalive compares with
_REQUIRED = ("_sock", "_sock_recv", "_in_packet", "_handle_pubackcomp", "_mid_generate", "_out_packet", "_protocol",
             "_msgtime_mutex", "_last_bytes_received", "_registered_write", "loop_read", "loop_write")


def _plain_ack_mid(data: bytes | bytearray, start: int, length: int) -> int | None:
    """The message id of a successful PUBACK body without properties at data[start:start+length]:
    MQTT 3.1.1 is the id alone; MQTT 5 adds a reason code (< 0x80: success) and a property length
    (0). None for anything else."""
    if length == 2 or (length in (3, 4) and data[start + 2] < 0x80 and (length == 3 or data[start + 3] == 0)):
        return data[start] << 8 | data[start + 1]
    return None


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def publish_size(topic_bytes: int, payload_bytes: int, qos: int, v5: bool) -> int:
    """The whole PUBLISH packet's size in bytes, as MQTT 5's Maximum Packet Size counts it (3.1.2.11.4):
    fixed header byte, remaining length field, topic with its length, message id (QoS 1 and 2),
    property length (MQTT 5; the outbox sends no properties) and payload. The same for the packets
    built here and for paho's."""
    remaining = 2 + topic_bytes + (2 if qos else 0) + (1 if v5 else 0) + payload_bytes
    return 1 + len(_remaining_length(remaining)) + remaining


class FastPath:
    """The state of one installed client: the read buffer, its own message ids, counters."""

    def __init__(self, client: Client, on_ack: Callable[[int, int], bool]) -> None:
        self._client = client
        self._on_ack = on_ack
        self._v5 = client._protocol == MQTTv5  # noqa: SLF001
        self._sock: object = None      # the socket the buffered bytes came from
        self._data = b""
        self._pos = 0
        self._mine: set[int] = set()   # ids of messages published here and not yet acknowledged
        self._topics: dict[str, bytes] = {}  # topic -> its length-prefixed UTF-8
        self.fast_publishes = 0        # PUBLISH packets built here
        self.fast_acks = 0             # PUBACKs handled here
        self.slow_acks = 0             # PUBACKs handed to paho's own handler
        self.reads = 0                 # recv() calls on the socket
        self.joined_writes = 0         # sends that carried several queued packets
        self.flushes = 0               # writes started by flush()

    # -- publishing --------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
        """Queue a QoS 1 PUBLISH and return its message id; None: use paho's publish instead.

        QoS 0 has no PUBACK to shortcut, and QoS 2's PUBREC/PUBREL exchange needs paho's own
        record of the message: both stay with paho.
        """
        client = self._client
        if qos != 1 or client._sock is None:  # noqa: SLF001 - paho reports "not connected" its own way
            return None
        head = self._topics.get(topic)
        if head is None:
            raw = topic.encode()
            if not raw or len(raw) > 65_535 or "+" in topic or "#" in topic or "\0" in topic:
                return None  # paho raises its own, clear error for these
            if len(self._topics) >= TOPIC_CACHE:
                self._topics.clear()
            head = self._topics[topic] = len(raw).to_bytes(2, "big") + raw
        mid = client._mid_generate()  # noqa: SLF001
        properties = b"\x00" if self._v5 else b""
        body = head + mid.to_bytes(2, "big") + properties
        packet = b"".join((bytes((PUBLISH | qos << 1 | bool(retain),)),
                           _remaining_length(len(body) + len(payload)), body, payload))
        self._mine.add(mid)
        self.fast_publishes += 1
        # As paho's _packet_queue queues it, minus asking the event loop for a "writable" wake-up:
        # flush() writes it.
        client._out_packet.append({"command": PUBLISH, "mid": mid, "qos": qos, "pos": 0,  # noqa: SLF001
                                   "to_process": len(packet), "packet": packet, "info": None})
        return mid

    def flush(self) -> None:
        """Write what is queued now. What the socket does not take, paho writes when it is writable
        (its loop_write registers for that itself).

        Not while paho has asked for a "writable" wake-up itself (a packet of its own, a reply):
        that wake-up writes our packets too, and writing here first would have paho drop its
        registration while the event loop is still about to add the writer, which would then stay.
        """
        client = self._client
        if client._out_packet and client._sock is not None and not client._registered_write:  # noqa: SLF001
            self.flushes += 1
            client.loop_write()

    def loop_write(self, original: Callable[[], Any]) -> Any:
        """Join the queued packets into one, so a burst of publishes is one send(), not one each.

        Only packets whose completion paho ignores are joined: every packet but a QoS 0
        PUBLISH (completion calls on_publish) and DISCONNECT (completion closes the socket).
        paho then writes the joined packet as it writes any packet, partial writes included.
        """
        queue = self._client._out_packet  # noqa: SLF001
        if len(queue) > 1 and _joinable(queue[0]) and _joinable(queue[1]):
            parts = []
            while queue and _joinable(queue[0]):
                parts.append(queue.popleft()["packet"])
            self.joined_writes += 1
            queue.appendleft(_packet(b"".join(parts)))
        return original()

    # -- reading -----------------------------------------------------------------------------

    def buffered(self) -> int:
        return len(self._data) - self._pos

    def _same_socket(self) -> None:
        sock = self._client._sock  # noqa: SLF001
        if sock is not self._sock:   # a new connection: nothing of the old one may leak into it
            self._sock, self._data, self._pos = sock, b"", 0

    def _fill(self, original_recv: Callable[[int], bytes]) -> bytes:
        """One read into the (empty) buffer; raises BlockingIOError when there is nothing to read."""
        data = original_recv(READ_SIZE)
        self.reads += 1
        self._data, self._pos = data, 0
        return data

    def sock_recv(self, original: Callable[[int], bytes], bufsize: int) -> bytes:
        self._same_socket()
        if self._pos >= len(self._data):
            self._fill(original)
        start = self._pos
        end = min(start + bufsize, len(self._data))
        self._pos = end
        return self._data[start:end]

    def loop_read(self, original_read: Callable[[int], Any], original_recv: Callable[[int], bytes],
                  max_packets: int = 1) -> Any:
        client = self._client
        if client._in_packet["command"] == 0 and client._sock is not None:  # noqa: SLF001 - between packets
            self._same_socket()
            if self._pos >= len(self._data):
                try:
                    data = self._fill(original_recv)
                except BlockingIOError:
                    return MQTT_ERR_SUCCESS  # nothing to read after all
                except OSError:
                    data = b""  # paho reads again and reports the error its own way
                if not data:  # an error, or the broker closed the connection: paho handles it
                    return original_read(max_packets)
            self._take_acks()
            if self._pos >= len(self._data):
                return MQTT_ERR_SUCCESS
        rc = original_read(max_packets)
        while rc == MQTT_ERR_SUCCESS and client._sock is not None and (self.buffered() or _read_unhandled(client)):  # noqa: SLF001
            rc = original_read(max_packets)
        return rc

    def _take_acks(self) -> None:
        """Report the plain PUBACKs of our own messages at the head of the buffer."""
        data, pos, end = self._data, self._pos, len(self._data)
        mine, on_ack = self._mine, self._on_ack
        start = pos
        while pos + 4 <= end and data[pos] == PUBACK:
            length = data[pos + 1]
            if pos + 2 + length > end:
                break  # not all of it here: paho reads the rest
            mid = _plain_ack_mid(data, pos + 2, length)
            if mid is None or mid not in mine:
                break  # an error, properties, or someone else's (aiomqtt awaits it): paho's handler
            mine.discard(mid)
            on_ack(mid, 0)
            self.fast_acks += 1
            pos += 2 + length
        if pos != start:
            self._pos = pos
            client = self._client
            with client._msgtime_mutex:  # noqa: SLF001 - what paho does after each packet it reads
                client._last_bytes_received = _now()  # noqa: SLF001

    def handle_pubackcomp(self, original: Callable[[str], Any], cmd: str) -> Any:
        """Every other PUBACK of our own messages, which paho itself read: split across reads,
        behind another packet, with properties, or an MQTT 5 refusal (reason code 0x80 or more,
        e.g. 0x87 when the broker's ACL denies the topic). paho does not know these messages and
        would drop the PUBACK, and the publisher's window would never get the slot back.
        Everything else is paho's (the bus's on_publish hook reports those)."""
        packet = self._client._in_packet["packet"]  # noqa: SLF001
        if cmd == "PUBACK" and len(packet) >= 2:
            mid = packet[0] << 8 | packet[1]
            if mid in self._mine:
                self._mine.discard(mid)
                self._on_ack(mid, packet[2] if len(packet) > 2 else 0)
                self.fast_acks += 1
                return MQTT_ERR_SUCCESS
        self.slow_acks += 1
        return original(cmd)


def _read_unhandled(client: Client) -> bool:
    """Whether paho holds a packet read in full but not handled. paho 2.2's `_packet_read` returns
    after 100 recv() calls for one packet (to let the loop do other work) before it checks whether
    the packet is complete: when the 100th brought its last bytes, the packet waited, unhandled,
    for more bytes to wake the event loop's reader. Served 4 KiB at a time from the buffer here,
    a packet of about 400 KB or more (above the default mqtt.max_payload_bytes, not above a raised
    one) could end so, and waited for the next message or the keepalive's PINGRESP. Calling
    paho's loop_read again reads nothing and handles it."""
    packet = client._in_packet  # noqa: SLF001
    return bool(packet["command"]) and bool(packet["have_remaining"]) and packet["to_process"] == 0


def _joinable(packet: dict[str, Any]) -> bool:
    kind = packet["command"] & 0xF0
    return packet["pos"] == 0 and kind != DISCONNECT and not (kind == PUBLISH and packet["qos"] == 0)


def _packet(data: bytes) -> dict[str, Any]:
    """A queued packet as paho keeps them; QoS 1 so that its completion is ignored."""
    return {"command": PUBLISH | 0x02, "mid": 0, "qos": 1, "pos": 0, "to_process": len(data), "packet": data,
            "info": None}


def install(client: Client, on_ack: Callable[[int, int], bool]) -> FastPath | None:
    """Give `client` the lean publish, joined writes, buffered reads and PUBACK shortcut.
    `on_ack(mid, reason_code)`: below 0x80 the broker took the message, from 0x80 it refused it.

    None (and paho left as it is) if paho lacks an internal this relies on.
    """
    missing = [name for name in _REQUIRED if not hasattr(client, name)]
    if missing:
        log.warning("paho-mqtt fast path not installed (missing %s); using paho's own paths", ", ".join(missing))
        return None
    fast = FastPath(client, on_ack)
    sock_recv, loop_read, handle = client._sock_recv, client.loop_read, client._handle_pubackcomp  # noqa: SLF001
    loop_write = client.loop_write
    client._sock_recv = lambda bufsize: fast.sock_recv(sock_recv, bufsize)  # noqa: SLF001
    client.loop_read = lambda max_packets=1: fast.loop_read(loop_read, sock_recv, max_packets)
    client._handle_pubackcomp = lambda cmd: fast.handle_pubackcomp(handle, cmd)  # noqa: SLF001
    client.loop_write = lambda: fast.loop_write(loop_write)
    return fast
