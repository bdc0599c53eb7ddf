"""`mapper cloud-worker --config FILE`: the cloud half of early-exit inference.

Subscribes (MQTT 5 shared subscription) to `$share/<group>/<prefix>/+/offload/request`, so
several workers share the requests of every node; runs `cloud.onnx` on each decoded cut and
publishes the result (QoS 1) to `<prefix>/<node>/offload/result`, the node taken from the
request's topic and checked against the request body. See mapper/inference/codec.py for the
message formats.

Config file (YAML)::

    mqtt:                      # the mapper's MqttSettings (eventbus/settings.py)
      url: mqtts://cloud.example:8883
      username: worker
      password_file: /etc/mapper/worker.password
    models_dir: /opt/mapper/models   # default: the shipped models/ directory
    models: [sensor_faults]          # default: every sub-directory with a model.json
    group: workers                   # shared-subscription group
    worker_id: w-1                   # reported in results (default: host-pid)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from devices import ids
from eventbus.bus import (Credentials, connection, credentials_hint, credentials_refused, describe, log_refused_publish,
                          publish_until_lost, refused_reason, subscribe_until_lost, watch_disconnect,
                          watch_refused_publishes)
from eventbus.settings import MqttSettings
from mapper.inference.codec import CodecError, OffloadResult, decode_request
from mapper.inference.settings import default_models_dir
from mapper.logs import OUTAGE_NOTE_S, Outage, Throttle, held_note

log = logging.getLogger("mapper.worker")


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mqtt: MqttSettings = MqttSettings()
    models_dir: Path | None = None
    models: list[str] | None = None
    group: str = Field(default="workers", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    worker_id: str | None = Field(default=None, max_length=64)
    log_level: str = "info"


# Keys of the mapper's own config (mapper.config) that a worker config never has.
MAPPER_CONFIG_KEYS = ("node", "devices", "twin", "inference", "mode", "loop", "kubeedge", "api", "systemd")


def load_worker_config(path: str | Path) -> WorkerSettings:
    """Read and validate a worker config; raises DefinitionError (FILE:LINE: FIELD: PROBLEM), as
    the mapper's own config does."""
    return _read_worker_config(path)[0]


def _read_worker_config(path: str | Path) -> tuple[WorkerSettings, Any]:
    """The settings, and the YAML document they came from (None for an empty file), for the lines
    of the problems found later (load_worker_models)."""
    from devices.errors import DefinitionError, Problem
    from devices.loader import device_file_problem, read_documents, validation_problems

    path = Path(path)
    label = str(path)
    if not path.exists():
        raise DefinitionError([Problem(label, None, "", "config file not found")])
    problems: list[Problem] = []
    docs = list(read_documents(path, label, problems))
    if problems:
        raise DefinitionError(problems)
    if (device_file := device_file_problem(docs, "a worker config")) is not None:
        raise DefinitionError([device_file])
    if len(docs) > 1 or (docs and not isinstance(docs[0].data, dict)):
        raise DefinitionError([Problem(label, 1, "", "the config file must hold one YAML mapping")])
    if docs and (mapper_keys := [k for k in docs[0].data if k in MAPPER_CONFIG_KEYS]):
        # The mapper's config given to the worker: one line saying so, not a did-you-mean per key.
        raise DefinitionError([Problem(
            label, docs[0].line_of((mapper_keys[0],)), mapper_keys[0],
            f"this looks like a mapper config ({', '.join(mapper_keys)}: `mapper run --config` reads it), not a cloud"
            " worker's: the worker's holds mqtt (its own broker login, e.g. user worker), models_dir, models and"
            " group (docs/inference.md)")])
    try:
        settings = WorkerSettings.model_validate(docs[0].data if docs else {})
    except ValidationError as exc:
        from mapper.config import explain_unknown_fields

        raise DefinitionError(explain_unknown_fields(exc, validation_problems(exc, docs[0]), WorkerSettings)) from None
    base = path.parent
    changes: dict = {}
    if settings.models_dir is not None and not settings.models_dir.is_absolute():
        changes["models_dir"] = base / settings.models_dir
    changes["mqtt"] = settings.mqtt.relative_to(base)
    return settings.model_copy(update=changes), (docs[0] if docs else None)


def load_worker_models(settings: WorkerSettings, source: str = "worker config", doc: Any = None) -> dict[str, Any]:
    """The models the worker serves, by name; raises DefinitionError (FILE:LINE: FIELD: PROBLEM) for
    a model that cannot be loaded (a typo in `models`) and when there are none: a worker without
    models would join the shared subscription and refuse every request it took from healthy workers.
    `doc` (the config's YAML document) gives the lines; without it the problems have none."""
    from devices.errors import DefinitionError, Problem
    from devices.loader import field_name
    from mapper.inference.model import ModelError, load_model

    def problem(path: tuple[str | int, ...], message: str) -> DefinitionError:
        given = doc is not None and (path[0] in doc.data if isinstance(doc.data, dict) else False)
        line = doc.line_of(path) if given else None
        return DefinitionError([Problem(source, line, field_name(path), message)])

    models_dir = settings.models_dir or default_models_dir()
    try:
        found = sorted(p.name for p in models_dir.iterdir() if (p / "model.json").exists())
    except OSError as exc:
        raise problem(("models_dir",), f"cannot read the models directory {models_dir}: "
                                       f"{exc.strerror or exc}") from None
    if settings.models is None:
        names = found
        if not names:
            raise problem(("models_dir",), f"no models in {models_dir} (no sub-directory with a model.json): a "
                                           "worker needs at least one; set models_dir to where they are")
    else:
        names = settings.models
        if not names:
            raise problem(("models",), f"an empty list: name at least one model of {models_dir}"
                                       f" ({', '.join(found) or 'none there'}), or leave models out for all")
    models: dict[str, Any] = {}
    for i, name in enumerate(names):
        if not (models_dir / name / "model.json").exists():
            raise problem(("models", i), f"no model {name!r} in {models_dir} (models there: "
                                         f"{', '.join(found) or 'none'})")
        try:
            model = load_model(models_dir / name)
        except (ModelError, ValueError, OSError) as exc:
            raise problem(("models", i), f"cannot load model {name!r}: {exc}") from None
        models[model.info.name] = model
    return models


class CloudWorker:
    def __init__(self, settings: WorkerSettings, models: dict[str, Any] | None = None) -> None:
        """`models` as load_worker_models returns them (loaded by it when not given)."""
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        # Not `worker-<worker_id>` alone: any user of the broker who guessed it could close the
        # worker's connection by connecting with it. The session is not kept (clean start), so the
        # random part may change at every start.
        self.client_id = settings.mqtt.client_id or f"worker-{self.worker_id}-{secrets.token_hex(8)}"
        self.models = models if models is not None else load_worker_models(settings)
        for model in self.models.values():
            log.info("worker %s: model %s from %s (cloud sha256 %s)", self.worker_id, model.info.name,
                     model.info.directory, model.info.cloud_sha256[:16])
        prefix = settings.mqtt.topic_prefix
        self.prefix = prefix
        self.subscription = f"$share/{settings.group}/{prefix}/+/offload/request"
        self.served = 0
        self.refused = 0
        self.answers_refused = 0  # answers the broker refused in its PUBACK (logged): never delivered
        self._log_throttle = Throttle()
        self.ready = asyncio.Event()
        # Answers owed across a lost connection (see run): (topic, payload), and requests not yet answered.
        self.owed: collections.deque[tuple[str, bytes]] = collections.deque()
        self.unanswered: collections.deque[aiomqtt.Message] = collections.deque()
        self._credentials = Credentials(settings.mqtt, log)  # read again at every connection attempt (rotation)
        # A broker outage is logged at its start, each change of cause and every OUTAGE_NOTE_S, as the
        # mapper's own connection (eventbus/bus.py) does: not a WARNING per reconnect attempt.
        self.outage = Outage(note_s=OUTAGE_NOTE_S)

    def _drop(self, reason: str, message: str, *args: object) -> None:
        """A request that gets no answer: counted each, logged a few times a minute per reason (a
        client sending thousands must not turn the worker's log into its echo)."""
        self.refused += 1
        held = self._log_throttle(reason)
        if held is not None:
            log.info(message + "%s", *args, held_note(held))

    def answer(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """The result topic and payload for one request; None when it must be dropped."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != self.prefix or parts[2:] != ["offload", "request"] \
                or not ids.is_name(parts[1]):
            return self._drop("topic", "dropped a request on an unexpected topic %r", topic[:200])
        node = parts[1]
        try:
            request = decode_request(payload)
        except CodecError as exc:
            return self._drop("malformed", "dropped a request from %s: %s", node, exc)
        if request.node != node:
            return self._drop("node", "dropped a request on %s's topic that claims node %r", node, request.node[:64])
        result_topic = f"{self.prefix}/{node}/offload/result"
        model = self.models.get(request.model)
        base = {"id": request.id, "node": node, "model": request.model, "created": request.created,
                "worker": self.worker_id, "ts": time.time_ns() // 1_000_000}
        if (model is None or len(request.cloud_sha256) < 16  # a prefix of 16 hex digits, as the mapper sends
                or not model.info.cloud_sha256.startswith(request.cloud_sha256)):
            self.refused += 1
            why = "unknown model" if model is None else "different cloud graph (sha256)"
            self._model_refused(node, request.model, request.cloud_sha256, model)
            return result_topic, orjson.dumps(OffloadResult(**base, error=why).to_json())
        try:
            logits = model.cloud(request.cut)[0]
        except ValueError as exc:
            self.refused += 1
            return result_topic, orjson.dumps(OffloadResult(**base, error=str(exc)[:200]).to_json())
        if not all(map(math.isfinite, logits.tolist())):
            # Finite cut values the graph overflows on (int8 with a huge scale): JSON would carry them
            # as null, which every mapper refuses as malformed.
            self.refused += 1
            return result_topic, orjson.dumps(OffloadResult(
                **base, error="the cloud graph's output is not finite for this cut").to_json())
        self.served += 1
        result = OffloadResult(**base, logits=tuple(float(v) for v in logits))
        return result_topic, orjson.dumps(result.to_json())

    def _model_refused(self, node: str, name: str, sha: str, model: Any) -> None:
        """A node asks for a model (or cloud graph) this worker does not have: its windows keep their
        provisional edge answers until the worker gets the same model version. Logged a few times a minute."""
        held = self._log_throttle("model")
        if held is None:
            return
        if model is None:
            log.warning("worker %s: node %s asks for model %r, which this worker does not have (it has: %s); put "
                        "the node's model directory into models_dir (%s) and restart the worker%s", self.worker_id,
                        node, name[:64], ", ".join(sorted(self.models)) or "none", self.settings.models_dir or default_models_dir(),
                        held_note(held))
        else:
            log.warning("worker %s: node %s asks for model %r with cloud graph sha256 %s..., this worker has %s... "
                        "(%s): give the node and the worker the same version of the model%s", self.worker_id, node,
                        name[:64], sha[:16], model.info.cloud_sha256[:16], model.info.directory, held_note(held))

    def _client(self) -> aiomqtt.Client:
        s = self.settings.mqtt
        client = aiomqtt.Client(
            s.host, s.port, identifier=self.client_id,
            username=s.username, password=self._credentials.password(),
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, keepalive=s.keepalive_s,
            tls_context=self._credentials.tls_context(),
            tls_insecure=(s.tls.insecure_skip_hostname_check or None) if s.uses_tls and s.tls else None,
            timeout=10, logger=logging.getLogger("mapper.worker.client"))
        watch_refused_publishes(client, self._answer_refused)
        return client

    def _answer_refused(self, topic: str, reason_code: object) -> None:
        """An answer the broker refused in its PUBACK (its ACL does not let the worker's user write the
        node's result topic): publish() returned as for a success, and the node never got it. Counted,
        and logged a few times a minute; the answer is not sent again (it would be refused again)."""
        self.answers_refused += 1
        log_refused_publish(log, self._log_throttle, f"worker {self.worker_id}'s answer", topic, reason_code,
                            self.settings.mqtt.username)

    def _take(self, message: aiomqtt.Message) -> None:
        """Answer one request: the answer is owed (self.owed) until the broker has acknowledged it."""
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if len(payload) > self.settings.mqtt.max_payload_bytes:
            self._drop("too_large", "dropped a request of %d bytes on %r (mqtt.max_payload_bytes)",
                       len(payload), message.topic.value[:200])
            return
        answer = self.answer(message.topic.value, payload)
        if answer is not None:
            self.owed.append(answer)

    async def _pay(self, client: aiomqtt.Client) -> None:
        """Publish the owed answers, oldest first; each stays owed until its PUBACK. A lost connection
        ends the wait at once (MqttError), not at aiomqtt's 30 s timeout."""
        while self.owed:
            topic, payload = self.owed[0]
            await publish_until_lost(client, topic, payload, qos=1)
            self.owed.popleft()

    async def run(self) -> None:
        """Answer requests until cancelled, reconnecting with backoff.

        A request is acknowledged to the broker when it arrives (the session is a clean one: a
        worker restarted under another id must not leave a queue behind), so the worker owes its
        answer from then on: an answer whose publish the lost connection cut short (self.owed),
        and the requests received but not yet answered (self.unanswered), are sent once connected
        again, before any new request. They are kept in memory only: a worker that stops (or
        dies) with answers owed loses them (logged at a clean stop), and the mapper's resend
        (inference `resend_s`) asks again.
        """
        attempt = 0
        while True:
            client: aiomqtt.Client | None = None
            connected = False
            try:
                client = self._client()
                check_connected = watch_disconnect(client)
                async with connection(client):
                    check_connected()
                    connected = True
                    if (back := self.outage.back()) is not None:
                        log.info("worker: connection to %s back %s", self.settings.mqtt.url, back)
                    refused = refused_reason(await subscribe_until_lost(client, self.subscription, qos=1))
                    attempt = 0
                    if refused is None:
                        log.info("worker %s: connected to %s as %s, subscribed to %s", self.worker_id,
                                 self.settings.mqtt.url, self.client_id, self.subscription)
                        self.ready.set()
                    else:
                        # Connected (owed answers still go out) but taking no request: not `ready`.
                        log.error("worker %s: connected to %s, but the broker refused the subscription to %r: %s; "
                                  "no request will reach this worker: check the broker's ACL for user %r "
                                  "(mosquitto/README.md, \"Who may do what\")", self.worker_id,
                                  self.settings.mqtt.url, self.subscription, refused, self.settings.mqtt.username)
                    if self.owed or self.unanswered:
                        log.info("worker %s: sending %d answer(s) owed from the lost connection", self.worker_id,
                                 len(self.owed) + len(self.unanswered))
                    await self._pay(client)
                    while self.unanswered:
                        self._take(self.unanswered[0])
                        self.unanswered.popleft()
                        await self._pay(client)
                    async for message in client.messages:
                        self._take(message)
                        await self._pay(client)
            except aiomqtt.MqttError as exc:
                self.ready.clear()
                self._keep_unanswered(client)
                attempt += 1
                s = self.settings.mqtt
                delay = random.uniform(s.reconnect_min_s, min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(attempt, 16)))
                self._log_lost(exc, delay, connected)
                await asyncio.sleep(delay)

    def _log_lost(self, exc: aiomqtt.MqttError, delay: float, connected: bool) -> None:
        """A connection lost (`connected`) or an attempt refused: logged as mapper.logs.Outage says."""
        s = self.settings.mqtt
        if not connected:
            self.outage.failed()
        cause = describe(exc)
        hint = f"; {credentials_hint(s)}" if credentials_refused(exc) else ""
        owed = len(self.owed) + len(self.unanswered)
        owed_note = f" ({owed} answer(s) owed, sent once connected)" if owed else ""
        verdict = self.outage.tell(cause[:200])
        if verdict == Outage.FIRST:
            log.warning("worker: connection to %s lost or refused: %s%s; retrying in %.1f s%s", s.url, cause, hint,
                        delay, owed_note)
        elif verdict == Outage.STILL:
            log.warning("worker: connection to %s: still not connected %s: %s%s; %d attempts (the next in %.1f s)%s",
                        s.url, self.outage.note(), cause, hint, self.outage.attempts, delay, owed_note)
        else:
            log.debug("worker: connection to %s lost or refused: %s; retrying in %.1f s%s", s.url, cause, delay,
                      owed_note)

    def _keep_unanswered(self, client: aiomqtt.Client | None) -> None:
        """The requests a lost connection left in aiomqtt's queue (received and acknowledged, not yet
        handled): kept, to be answered on the next connection (the next client has a queue of its own)."""
        queue = getattr(client, "_queue", None)
        while queue is not None and not queue.empty():
            self.unanswered.append(queue.get_nowait())


def main(config_path: str) -> int:
    from mapper import logs

    settings, doc = _read_worker_config(config_path)
    settings.mqtt.check_password(config_path)
    settings.mqtt.check_tls(config_path)
    for warning in settings.mqtt.exposed_secrets(config_path):  # as `mapper run` warns
        print(warning, file=sys.stderr)
    models = load_worker_models(settings, config_path, doc)
    logs.setup(settings.log_level)
    worker = CloudWorker(settings, models)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP's default action ended the worker without a word (and lost the answers it owed): an
        # operator used to the mapper's reload sends it here too. The worker has nothing to reload.
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
            "worker %s: SIGHUP ignored: the worker reads its config and models at start only; restart it to "
            "load changed ones", worker.worker_id))
        task = asyncio.create_task(worker.run(), name="cloud-worker")
        # A worker whose connection task died (anything but a lost connection) stops, saying why,
        # instead of running on doing nothing.
        await asyncio.wait([task, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        log.info("worker %s stopped: %d served, %d refused", worker.worker_id, worker.served, worker.refused)
        if owed := len(worker.owed) + len(worker.unanswered):
            log.warning("worker %s: %d answer(s) owed were not sent (kept in memory only); the nodes ask again "
                        "after their resend_s", worker.worker_id, owed)

    asyncio.run(run())
    return 0
