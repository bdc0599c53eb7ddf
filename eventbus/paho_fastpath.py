"""A leaner receive path for paho-mqtt's client, installed per connection by the bus.

Why: paho 2.x reads every incoming packet with three or four `recv()` calls (the command
byte, each length byte, then the body), and turns every PUBACK into a ReasonCode and a
Properties object, a debug log call and a Condition wake-up for a waiter nobody has. For
the outbox, which only needs the message id, that was about a third of the mapper's CPU on
the Pi workload (py-spy, 20 readings/s) and the largest single cost at full throughput.

What it changes, on one paho `Client` instance (instance attributes, nothing global):

- `recv` is buffered: one `recv(4 KiB)` and paho's small reads are served from it.
  `loop_read` drains the buffer before it returns, because the event loop's reader is woken
  only by bytes still in the socket, not by bytes already in our buffer.
- Queued packets are joined before paho writes them: a burst of publishes is one `send()`,
  so the broker reads the burst at once and its acknowledgements come back together,
  instead of one wake-up of the mapper per PUBACK.
- A plain successful PUBACK (reason code below 0x80, no properties) for a message that
  `on_ack(mid)` claims is handled in a few lines: paho's record of the message is removed
  and its in-flight count lowered, exactly as paho's own handler does. Everything else
  (other packets, errors, properties, publishes that aiomqtt awaits) goes through paho.

It relies on paho internals (`_sock`, `_sock_recv`, `_in_packet`, `_out_messages`,
`_out_message_mutex`, `_inflight_messages`, `_handle_pubackcomp`, `loop_read`, `_out_packet`,
`loop_write`); `install()`
checks for them and leaves the client untouched if a paho release renamed any of them.
`tests/test_paho_fastpath.py` checks it is active with the paho version we pin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from paho.mqtt.client import DISCONNECT, MQTT_ERR_SUCCESS, PUBLISH, Client

log = logging.getLogger("mapper.mqtt")

READ_SIZE = 4_096
_REQUIRED = ("_sock", "_sock_recv", "_in_packet", "_out_messages", "_out_message_mutex", "_inflight_messages",
             "_handle_pubackcomp", "loop_read", "_out_packet", "loop_write")


class FastPath:
    """The state of one installed client: the read buffer and counters."""

    def __init__(self, client: Client, on_ack: Callable[[int], bool]) -> None:
        self._client = client
        self._on_ack = on_ack
        self._sock: object = None      # the socket the buffered bytes came from
        self._data = b""
        self._pos = 0
        self.fast_acks = 0             # PUBACKs handled here
        self.slow_acks = 0             # PUBACKs handed to paho's own handler
        self.reads = 0                 # recv() calls on the socket
        self.joined_writes = 0         # sends that carried several queued packets

    def buffered(self) -> int:
        return len(self._data) - self._pos

    def sock_recv(self, original: Callable[[int], bytes], bufsize: int) -> bytes:
        sock = self._client._sock  # noqa: SLF001
        if sock is not self._sock:   # a new connection: nothing of the old one may leak into it
            self._sock, self._data, self._pos = sock, b"", 0
        if self._pos >= len(self._data):
            data = original(READ_SIZE)  # raises BlockingIOError when there is nothing to read
            self.reads += 1
            if len(data) <= bufsize:
                self._data, self._pos = b"", 0
                return data
            self._data, self._pos = data, 0
        start = self._pos
        end = min(start + bufsize, len(self._data))
        self._pos = end
        return self._data[start:end]

    def loop_read(self, original: Callable[[int], Any], max_packets: int = 1) -> Any:
        rc = original(max_packets)
        while rc == MQTT_ERR_SUCCESS and self.buffered() and self._client._sock is not None:  # noqa: SLF001
            rc = original(max_packets)
        return rc

    def loop_write(self, original: Callable[[], Any]) -> Any:
        """Join the queued packets into one, so a burst of publishes is one send(), not one each.

        Only packets whose completion paho ignores are joined: every packet but a QoS 0
        PUBLISH (completion calls on_publish) and DISCONNECT (completion closes the socket).
        paho then writes the joined packet as it writes any packet, partial writes included.
        """
        queue = self._client._out_packet  # noqa: SLF001
        if len(queue) > 1 and queue[0]["pos"] == 0:
            parts = []
            while queue and _joinable(queue[0]):
                parts.append(queue.popleft()["packet"])
            if len(parts) == 1:
                queue.appendleft(_packet(parts[0]))
            elif parts:
                self.joined_writes += 1
                queue.appendleft(_packet(b"".join(parts)))
        return original()

    def handle_pubackcomp(self, original: Callable[[str], Any], cmd: str) -> Any:
        client = self._client
        packet = client._in_packet["packet"]  # noqa: SLF001
        n = len(packet)
        # MQTT 3.1.1: the id only. MQTT 5: the id, a reason code, then a property length (0: none).
        plain = n == 2 or (packet[2] < 0x80 and (n == 3 or (n == 4 and packet[3] == 0)))
        if cmd != "PUBACK" or not plain:
            self.slow_acks += 1
            return original(cmd)
        mid = (packet[0] << 8) | packet[1]
        with client._out_message_mutex:  # noqa: SLF001
            messages = client._out_messages  # noqa: SLF001
            message = messages.get(mid)
            if message is None:
                return MQTT_ERR_SUCCESS  # not ours, or acknowledged twice: paho ignores it too
            if not self._on_ack(mid):
                self.slow_acks += 1
                return original(cmd)  # somebody awaits this one (aiomqtt's own publish)
            del messages[mid]
            if message.qos > 0:
                client._inflight_messages -= 1  # noqa: SLF001
        self.fast_acks += 1
        return MQTT_ERR_SUCCESS


def _joinable(packet: dict[str, Any]) -> bool:
    kind = packet["command"] & 0xF0
    return packet["pos"] == 0 and kind != DISCONNECT and not (kind == PUBLISH and packet["qos"] == 0)


def _packet(data: bytes) -> dict[str, Any]:
    """A queued packet as paho keeps them; QoS 1 so that its completion is ignored."""
    return {"command": PUBLISH | 0x02, "mid": 0, "qos": 1, "pos": 0, "to_process": len(data), "packet": data,
            "info": None}


def install(client: Client, on_ack: Callable[[int], bool]) -> FastPath | None:
    """Give `client` the buffered reads and the PUBACK shortcut; None (and paho as it is) if it cannot."""
    missing = [name for name in _REQUIRED if not hasattr(client, name)]
    if missing or getattr(client, "_max_inflight_messages", 1) != 0:
        # paho's own in-flight window would need _update_inflight() after each ack: leave it to paho.
        log.warning("paho-mqtt fast path not installed (missing %s); using paho's own receive path",
                    ", ".join(missing) or "an unlimited in-flight window")
        return None
    fast = FastPath(client, on_ack)
    sock_recv, loop_read, handle = client._sock_recv, client.loop_read, client._handle_pubackcomp  # noqa: SLF001
    loop_write = client.loop_write
    client._sock_recv = lambda bufsize: fast.sock_recv(sock_recv, bufsize)  # noqa: SLF001
    client.loop_read = lambda max_packets=1: fast.loop_read(loop_read, max_packets)
    client._handle_pubackcomp = lambda cmd: fast.handle_pubackcomp(handle, cmd)  # noqa: SLF001
    client.loop_write = lambda: fast.loop_write(loop_write)
    return fast
