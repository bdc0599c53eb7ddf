"""Another mapper serving the same node: detected and said loudly.

Two mappers for one node (the systemd service and a stray manual `mapper run` on another twin, two
Pis given the same node name on one broker) both read and drive the same devices and publish on the
same topics: a subscriber sees two sequences interleaved. When both had the client id
`mapper-<node>`, the broker threw one off whenever the other connected, and the log said so. The
default client id now ends in a random part kept beside the twin (eventbus/extension.py), so they no
longer collide, and nothing else would tell.

So each mapper announces itself on `<prefix>/<node>/instance` (retained, QoS 1): an instance token,
its host name, pid and start time, at every (re)connect and then every mqtt.instance_interval_s. It
subscribes there too; an announcement with another token is logged at ERROR (at most once per
interval, for as long as the other keeps announcing) and shown in systemd's STATUS=. It never
publishes in answer to one (no ping-pong with the other mapper or with anyone else publishing
there). A clean stop clears the retained announcement when it is the mapper's own.

The token is not the client id (that is the session's secret: mosquitto/README.md), but a hash of
it (and, for an mqtt.client_id set in the config, of the twin's path): the same state directory,
restarted after a crash, finds its own retained announcement and says nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from mapper.logs import Throttle, held_note

log = logging.getLogger("mapper.eventbus")

# An announcement larger than this is not read (it is only ever a few hundred bytes).
MAX_ANNOUNCEMENT_BYTES = 2048
TOKEN_HEX = 16


def instance_token(client_id: str, twin_path: Path | None) -> str:
    """16 hex digits naming this mapper's state: a hash of its client id (the default id's random part
    is the state directory's), and of its twin's path when the id was set in the config (two mappers
    given the same mqtt.client_id on other twins then still differ). Not the client id itself."""
    material = b"mapper instance\0" + client_id.encode()
    if twin_path is not None:
        material += b"\0" + os.fsencode(os.path.realpath(twin_path))  # (as the lock: mapper.cli._lock_path)
    return hashlib.sha256(material).hexdigest()[:TOKEN_HEX]


def _ms_text(ms: object) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 < ms < 2**53:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _text(value: object, limit: int = 64) -> str:
    """A field of someone else's announcement, fit for the log: printable, bounded, repr'd."""
    if not isinstance(value, str):
        return "?"
    return repr("".join(c if c.isprintable() else "?" for c in value[:limit]))


@dataclass(frozen=True, slots=True)
class Announcement:
    token: str
    host: str      # as shown in the log (repr'd, bounded)
    pid: str
    started: str   # UTC text
    at: str

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started} (instance {self.token})"


def parse_announcement(payload: bytes) -> Announcement | None:
    """An announcement of a mapper (any version of this one), or None for anything else."""
    if len(payload) > MAX_ANNOUNCEMENT_BYTES:
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    token = data.get("token")
    if not isinstance(token, str) or not 1 <= len(token) <= 64 or not token.isascii() or not token.isalnum():
        return None
    pid = data.get("pid")
    return Announcement(token=token, host=_text(data.get("host")),
                        pid=str(pid) if isinstance(pid, int) and not isinstance(pid, bool) else "?",
                        started=_ms_text(data.get("started")), at=_ms_text(data.get("at")))


class InstanceWatch:
    """This mapper's announcement, and what it hears on the instance topic."""

    def __init__(self, topic: str, node: str, token: str, interval_s: float, *,
                 clock=time.monotonic) -> None:  # noqa: ANN001
        self.topic = topic
        self.node = node
        self.token = token
        self.interval_s = interval_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_ms = time.time_ns() // 1_000_000
        self._clock = clock
        # At most one ERROR per (most of an) interval: the other announces once per its interval.
        self._throttle = Throttle(burst=1, interval_s=0.9 * interval_s, clock=clock)
        self.other: Announcement | None = None  # the latest other mapper heard
        self._other_at: float | None = None     # when (monotonic)
        self.others_heard = 0                   # announcements of another mapper heard, since the start
        # The last announcement heard on the topic was this mapper's own: a clean stop clears it.
        self.retained_is_ours = False
        self._echoed = False                    # this connection's own announcement came back

    def payload(self) -> bytes:
        return orjson.dumps({"token": self.token, "host": self.host, "pid": self.pid, "started": self.started_ms,
                             "at": time.time_ns() // 1_000_000})

    def connected(self) -> None:
        self._echoed = False

    def current_other(self) -> Announcement | None:
        """Another mapper heard within the last three intervals (for STATUS=), else None."""
        if self.other is None or self._other_at is None:
            return None
        if self._clock() - self._other_at > 3 * self.interval_s:
            return None
        return self.other

    def handle(self, payload: bytes) -> None:
        """A message on the instance topic (this mapper's own too). Never answered."""
        if not payload:  # cleared: by a mapper stopping cleanly
            self.retained_is_ours = False
            if self.current_other() is not None:
                log.warning("the announcement on %s was cleared (a clean stop): the other mapper for node %r (%s) is "
                            "not heard any more", self.topic, self.node, self.other.describe() if self.other else "?")
                self.other, self._other_at = None, None
            return
        heard = parse_announcement(payload)
        if heard is None:
            self.retained_is_ours = False
            held = self._throttle("malformed")
            if held is not None:
                log.warning("a message on %s is not a mapper's announcement (%d bytes): ignored%s", self.topic,
                            len(payload), held_note(held))
            return
        if heard.token == self.token:
            self.retained_is_ours = True
            if not self._echoed:
                self._echoed = True
                log.info("announced on %s: host %r, pid %d, instance %s", self.topic, self.host, self.pid, self.token)
            return
        self.retained_is_ours = False
        self.other, self._other_at = heard, self._clock()
        self.others_heard += 1
        held = self._throttle("other")
        if held is not None:
            log.error("ANOTHER MAPPER serves node %r on this broker: it announced itself on %s (%s, last at %s); this "
                      "one is host %r, pid %d, started %s (instance %s). Both read and drive the same devices and "
                      "publish on the same topics (a subscriber sees two interleaved sequences). Stop one (a manual "
                      "`mapper run` beside the service? `systemctl status mapper`), or give each Pi its own node "
                      "name. If that mapper is gone (killed, crashed: its retained announcement stays until this "
                      "one's next), this is not logged again; else it is, at most once every %.0f s%s",
                      self.node, self.topic, heard.describe(), heard.at, self.host, self.pid,
                      _ms_text(self.started_ms), self.token, self.interval_s, held_note(held))
