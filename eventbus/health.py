"""The twin's health, told on MQTT directly: `<prefix>/<node>/health`, retained, QoS 1.

While the twin cannot be written (a full disk, a read-only remount, another process's lock) the
readings wait in memory (mapper.recorder) and their telemetry goes out live, from memory, but
nothing else does (device states, twin documents and replies, offload requests wait for their
commit). The node's availability still says `online` (the mapper runs, and is connected); only
the log and systemd's STATUS= said why the rest stopped. This message says it, published straight
on the connection (the outbox cannot be written):

    {"twin": "unwritable", "since": <ms>, "cause": "disk full", "error": "database or disk is full",
     "readings_waiting": 1234, "readings_dropped": 0, "readings_published_live": 1200,
     "readings_dropped_live": 0, "outbox_undeliverable": 0, "version": "0.1.0", "config": "cb344c8b62e35ab1",
     "at": <ms>}
    {"twin": "ok", "since": <ms>, "readings_dropped": 0, "readings_published_live": 1200,
     "readings_dropped_live": 0, "outbox_undeliverable": 0, "version": "0.1.0", "config": "cb344c8b62e35ab1",
     "at": <ms>}

`unwritable` once a commit has failed and its retry too (the recorder's `outage_failures` > 1: one
lock held a moment too long is not news), `since` the first failed commit of the outage; `cause`
one of "disk full", "read-only", "locked", "error" (mapper.twin_disk.twin_write_cause), `error`
what SQLite said (bounded). `ok` at every (re)connect (a stale `unwritable` retained by a run that
crashed or stopped during an outage is replaced) and once a commit succeeds again, `since` the
start or the end of the last outage. `readings_dropped`: readings dropped since the mapper started
for twin.waiting_max_readings whose telemetry nobody saw; `readings_dropped_live`: those dropped
after their telemetry had gone out live (delivered, but not in the twin's history);
`readings_published_live`: readings whose telemetry went out live since the start.
`outbox_undeliverable`: outbox messages dropped as undeliverable since the twin was created (the broker
refused them, its ACL or its packet limit, or paho did): the total `mapper devices` and STATUS= show. `version`: the mapper's (mapper.__version__, `mapper --version`).
`config`: the fingerprint of the config this run started with (MapperConfig.fingerprint: without the
node and the secrets): a fleet sees which nodes run which version, and whose config differs. `at`:
when the message was made.

Other extensions may add news of their own while it lasts (`note`): the inference's
`"cloud_worker": {"answering": false, "since": <ms>, "unanswered": 3}` while no cloud worker answers
its offloads (docs/inference.md); left out otherwise.

Cheap: nothing per reading. The recorder calls `changed()` after each failed commit (once per
retry, a second) and at the commit that ends an outage, the publisher after each message it drops
as undeliverable; a message goes out on a change of `twin` at once, and otherwise at most every
HEALTH_INTERVAL_S when the counts moved. A clean stop leaves the last one (the node's availability says `offline` next to it).

The mapper subscribes to its own health topic (`heard`): a message there that is none of its own,
once its own came back on this connection, was published by another client while it runs (the
cloud broker through the bridge, which Mosquitto lets publish any topic on the Pi: a forged `ok`
would hide a twin that cannot be written). The mapper's own health then goes out again, at most
once per HEALTH_INTERVAL_S however often it is overwritten, with a WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiomqtt
import orjson

from mapper import __version__
from mapper.logs import Throttle, held_note
from mapper.recorder import UNWRITABLE_AFTER
from mapper.twin_disk import innermost, twin_write_cause

if TYPE_CHECKING:
    from eventbus.bus import MqttBus
    from mapper.recorder import Recorder

log = logging.getLogger("mapper.eventbus")

# While the twin stays unwritable, the message goes out again at most this often (with new counts).
HEALTH_INTERVAL_S = 5.0
ERROR_CHARS = 200
# The mapper's own last payloads, to tell them from another client's when they come back (`heard`):
# each carries the time it was made, so no two are alike.
OWN_KEPT = 8


class TwinHealth:
    """Publishes the twin's health (see the module's doc) on `topic` through `bus`."""

    def __init__(self, topic: str, bus: MqttBus, recorder: Recorder, twin_path: Path, *,
                 interval_s: float = HEALTH_INTERVAL_S, config_fingerprint: str = "",
                 undeliverable: Callable[[], int] = lambda: 0) -> None:
        self.topic = topic
        self._about = {"version": __version__, "config": config_fingerprint}  # (in every message)
        self._bus = bus
        self._recorder = recorder
        self._twin_path = twin_path
        self._undeliverable = undeliverable  # outbox messages dropped as undeliverable since the twin was created
        self.interval_s = interval_s
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()  # one message at a time: the last made is the last sent
        self._sent: tuple[str, int, int, int, int, int, bytes] | None = None  # (_summary) of the last one taken
        # Other news than the twin's (`note`), in every message while set: key -> JSON value.
        self._notes: dict[str, object] = {}
        self._tried_at: float | None = None  # loop time of the last attempt
        self.published = 0  # messages the broker took
        self._own: deque[bytes] = deque(maxlen=OWN_KEPT)  # the last payloads sent (`heard`)
        self._own_seen = False  # one of them came back on this connection
        self._overwritten = False  # another client's message came since the last publish
        self._overwritten_log = Throttle(burst=3)

    def changed(self) -> None:
        """The recorder's on_health: a commit failed, or one succeeded after failures."""
        self._changed.set()

    def note(self, key: str, value: object | None) -> None:
        """Put `key: value` in every message from now on (None: leave it out again); sent as a change
        of the counts are (at most every interval)."""
        if value is None:
            self._notes.pop(key, None)
        else:
            self._notes[key] = value
        self._changed.set()

    def connected(self) -> None:
        """A new connection: what the broker hands out on subscribing comes before the mapper's own."""
        self._own_seen = False

    def heard(self, payload: bytes) -> None:
        """A message on the health topic (the mapper subscribes to it): its own coming back, or another
        client's, published while the mapper runs (see the module's doc): its own goes out again."""
        if payload in self._own:
            self._own_seen = True
            return
        if not self._own_seen:
            return  # the retained one of an earlier run, superseded by this connection's
        held = self._overwritten_log("health")
        if held is not None:
            log.warning("another client published on the node's health %r while the mapper runs (the cloud broker "
                        "through the bridge?): %r; publishing the mapper's own again, at most once per %g s%s",
                        self.topic, payload[:80], self.interval_s, held_note(held))
        self._overwritten = True
        self._changed.set()

    def state(self) -> str:
        return "unwritable" if self._recorder.outage_failures >= UNWRITABLE_AFTER else "ok"

    def _summary(self) -> tuple[str, int, int, int, int, int, bytes]:
        """(twin, readings waiting, dropped, published live, dropped live, outbox undeliverable, notes): what
        a new message would say that matters."""
        state, recorder = self.state(), self._recorder
        return (state, recorder.waiting() if state == "unwritable" else 0, recorder.dropped, recorder.published_live,
                recorder.dropped_live, self._undeliverable(), orjson.dumps(self._notes, option=orjson.OPT_SORT_KEYS))

    def payload(self) -> bytes:
        recorder = self._recorder
        now_ms = time.time_ns() // 1_000_000
        counts = {"readings_dropped": recorder.dropped, "readings_published_live": recorder.published_live,
                  "readings_dropped_live": recorder.dropped_live, "outbox_undeliverable": self._undeliverable()}
        if self.state() == "ok":
            return orjson.dumps({"twin": "ok", "since": recorder.writable_since_ms, **counts, **self._notes,
                                 **self._about, "at": now_ms})
        error = recorder.last_error
        return orjson.dumps({
            "twin": "unwritable", "since": recorder.outage_since_ms,
            "cause": twin_write_cause(error, self._twin_path) if error is not None else "error",
            "error": str(innermost(error))[:ERROR_CHARS] if error is not None else "",
            "readings_waiting": recorder.waiting(), **counts, **self._notes, **self._about, "at": now_ms})

    async def publish(self) -> bool:
        """Publish the health as it is now (at a connect, or on a change); False when the broker
        did not take it (disconnected: the next connect publishes it)."""
        async with self._lock:
            sent, payload = self._summary(), self.payload()
            self._tried_at = asyncio.get_running_loop().time()
            self._overwritten = False
            self._own.append(payload)  # before the publish: it may come back before the PUBACK
            try:
                await self._bus.publish(self.topic, payload, qos=1, retain=True)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                log.debug("could not publish the twin's health on %s: %s", self.topic, exc)
                return False
            if sent[0] != (self._sent[0] if self._sent else "ok"):
                log.info("published on %s: the twin is %s", self.topic, sent[0])
            self._sent = sent
            self.published += 1
            return True

    def _due(self, now: float) -> bool:
        summary = self._summary()
        if self._sent is None or summary[0] != self._sent[0]:
            return True  # a change: at once
        if self._tried_at is not None and now - self._tried_at < self.interval_s:
            return False
        return self._overwritten or summary != self._sent

    async def run(self) -> None:
        """On every change told, and every interval while `unwritable` was the last word (the counts
        move with no change told when the recorder retries less often than that), counts moved
        since the last message (a change told within the interval after it) or another client
        overwrote it (`heard`)."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = None
            if self._sent is not None and self._tried_at is not None and (
                    self._sent[0] == "unwritable" or self._overwritten or self._summary() != self._sent):
                deadline = self._tried_at + self.interval_s
                if deadline <= loop.time():  # passed with nothing new to say: the next interval
                    deadline = loop.time() + self.interval_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._changed.wait()
            self._changed.clear()
            # Not connected: the connect publishes it (EventBusExtension._on_connect).
            if self._bus.connected.is_set() and self._due(loop.time()):
                await self.publish()
