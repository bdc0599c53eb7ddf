"""InferenceExtension: early-exit inference inside a running MapperService.

Each batch of readings passes through the recorder's pre-commit hook before its twin
transaction: the windows it closes are cut, the edge graph runs, and what happened is
recorded in that same transaction (one commit and fsync for readings and decisions):

* confident window: a final decision at the edge, published and acted on at once; a random
  `audit_share` of them is offloaded too (the answer is only compared, never replaces it);
* uncertain window: an offload request through the outbox (QoS 1) with a request id, a row
  `pending` in the twin. After `deadline_s` without a result the edge answer stands, marked
  provisional (published, acted on); the request stays pending and is sent again every
  `resend_s` until a result comes or `result_max_age_s` passes. The result's answer then
  replaces the provisional one (published again, `exit: cloud`).

Results are validated strictly; malformed, wrong-node, unknown, duplicated, late or mismatched
ones are counted by reason and dropped. Nothing a worker sends can raise out of the handler.
onnxruntime and numpy are imported only when a pipeline exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from devices.definitions import DeviceDefinition
from devices.errors import Problem
from devices.extras import install_extra
from devices.ids import DeviceId
from mapper.finish import outcome
from mapper.inference import records
from mapper.inference.settings import (InferenceSettings, LocalMap, PipelineSettings, SetDesiredAction, anomaly_key,
                                      from_anomaly_detection, local_maps, missing_ml_packages)
from mapper.logs import Throttle, held_note
from mapper.recorder import Extra
from twin.store import DeviceLocked, OutboxRow, OutMessage

if TYPE_CHECKING:
    from devices.loader import LoadResult
    from mapper.config import MapperConfig
    from mapper.inference.pipeline import Decision, EdgeOutcome, Pipeline
    from mapper.service import MapperService
    from twin.records import Reading
    from twin.store import TwinStore

log = logging.getLogger("mapper.inference")

DONE_MEMORY = 20_000
# Deadlines and resends fall due in the readings' transactions (see _decide); the timer task
# only acts when no batch came by within this long after the due time (no readings flowing).
TIMER_GRACE_S = 1.0
# On a clean stop: how long the actions of the last decisions may take before the tasks go.
STOP_FOLLOW_UPS_S = 5.0
# A restore the twin refused (a lock held too long, a full disk) is tried again this long after.
RESTORE_RETRY_S = 1.0
# How often _watch looks at the derived devices' sources and at the cloud worker's silence.
WATCH_S = 1.0


def _now_ms() -> int:
    """Wall time: a request's `created` (echoed by the result, recorded in the twin), and what a restart
    compares the twin's rows with. Never a due time inside a running process: see _mono_ms."""
    return time.time_ns() // 1_000_000


def _mono_ms() -> int:
    """The clock of deadlines, resends and expiries inside a running process. A Pi without a real-time
    clock starts before timesyncd steps the wall clock, often by hours: on the wall clock a forward step
    expired every request in flight at once (their answers refused as late), a backward one held the
    provisional answers back for as long as the step."""
    return time.monotonic_ns() // 1_000_000


def _due_ms(w: Waiting) -> int:
    """When a waiting request next needs the timer (monotonic): expiry, its deadline (pending), a resend."""
    due = w.expires_ms
    if w.status == "pending":
        due = min(due, w.deadline_ms)
    if w.body is not None:
        due = min(due, w.next_send_ms)
    return due


# What fell due, collected by _collect_due: (row updates, messages, desired values, reports, cloud answers).
_Due = tuple[list[Any], list[OutMessage], list[Any], list[Any], int]


@dataclass
class _Prepared:
    """The decisions on the windows one batch of readings closed, ready for the batch's transaction."""

    outcomes: list[tuple[Pipeline, EdgeOutcome]]
    created: int                                           # wall clock: the requests' `created`
    created_mono: int                                      # the same moment on _mono_ms, for due times
    new: list[Any] = field(default_factory=list)          # records.NewDecision per outcome
    messages: list[OutMessage] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)      # records.Report per edge exit
    desired: list[Any] = field(default_factory=list)      # DesiredSet of closed-loop actions
    requests: list[dict[str, Any] | None] = field(default_factory=list)
    updates: list[Any] = field(default_factory=list)      # records.DecisionUpdate of what fell due
    results: int = 0                                       # cloud answers among the updates
    # What fell due and rode along (updates, messages, desired, reports, results), also in the lists
    # above: kept for the next try if the work is given up (its Waiting entries have moved on already).
    due: _Due | None = None
    due_collected: int = 0                                 # its _collect_due count (the order of kept items)
    new_desired: int = 0                                   # desired[:new_desired] are the new decisions'


@dataclass
class Waiting:
    """An offload (or audit) waiting for its result.

    `created_ms` is wall time (the request's `created`, which its result must echo); the due times and
    `sent_ms` are on _mono_ms, so that a step of the wall clock moves none of them."""

    request_id: str
    pipeline: Pipeline
    row_id: int
    created_ms: int
    sent_ms: int                     # monotonic: created_ms on _mono_ms (round trips)
    deadline_ms: int                 # monotonic
    expires_ms: int                  # monotonic
    next_send_ms: int                # monotonic
    edge_label: str
    edge_confidence: float
    audit: bool
    status: str                      # pending | provisional | final (audits)
    body: dict[str, Any] | None      # the request, for resending; None: do not resend
    window_start: int
    window_end: int


def collect_settings(settings: InferenceSettings | None, definitions: dict[DeviceId, DeviceDefinition]
                     ) -> tuple[list[PipelineSettings], list[str]]:
    """Pipelines of the mapper config plus those of devices' anomalyDetection maps; and problems."""
    found = list(settings.pipelines) if settings else []
    problems: list[str] = []
    if settings is None or settings.from_devices:
        for device_id, definition in definitions.items():
            for prop in definition.properties:
                data = prop.anomaly_detection
                if not data:
                    continue
                data = data.get("data", data) if isinstance(data.get("data"), dict) else data
                try:
                    # Confined: a Device edgecore sent (dmi:), written by whoever may create one there.
                    s = from_anomaly_detection(device_id, prop.name, data, confined=definition.origin == "edgecore")
                    # ... and may set only devices edgecore sent, not the operator's local ones. (A target
                    # not defined at all is refused when the pipeline is built: "does not exist".)
                    for action in s.actions if s.confined else ():
                        target = DeviceId.parse(action.device) if action.type == "set_desired" else None
                        if target in definitions and (why := confined_target_problem(target, definitions)):
                            raise ValueError(f"setDevice {action.device}: {why}")
                    found.append(s)
                except ValueError as exc:
                    problems.append(f"{definition.source}: {device_id}/{prop.name} pushMethod.anomalyDetection: {exc}")
    return found, problems


def start_problems(config: MapperConfig) -> tuple[LoadResult | None, list[Problem], list[object]]:
    """What `mapper run` refuses at its start once it reads the device files, found without starting
    (`mapper validate --config`, install-service's start_checks): (the devices as the start loads
    them, None when their files have errors; those errors, else config_problems against the devices;
    the files' warnings)."""
    from devices.errors import DefinitionError

    try:
        loaded = config.load_devices()
    except DefinitionError as exc:
        return None, list(exc.problems), list(exc.warnings)
    return loaded, config_problems(config, loaded.devices, unrunnable=loaded.unrunnable,
                                   other_node=loaded.other_node), list(loaded.warnings)


def config_problems(config: MapperConfig, definitions: dict[DeviceId, DeviceDefinition],
                    models: dict[Path, Any] | None = None, *, unrunnable: Collection[DeviceId] = (),
                    other_node: Mapping[DeviceId, Problem] | None = None) -> list[Problem]:
    """The config file's pipelines (`inference.pipelines`) and the anomalyDetection maps of the devices
    of local files checked against the devices and the models, each problem at its file, line and field
    (for a map: its key in the device file): `mapper run` refuses to start with any, and a SIGHUP reload
    refuses device files that bring some, as with a bad device file (they used to be logged and the
    pipeline left out, half started). The maps of devices edgecore sent are not checked here: their
    mistakes are logged and the pipeline left out (a cloud object must not stop the node's mapper).

    A device or set_desired target the files do not define is a problem in standalone mode only:
    under `mode: kubeedge` edgecore sends its devices after the start, and the pipeline is built
    when they come. `models`: loaded models by directory, filled (the extension's cache). The maps of
    `unrunnable` devices (LoadResult.unrunnable: another node's, no driver here) get their own keys
    checked only: no pipeline of theirs runs here, and their model may exist on their node alone.
    A set_desired target in `other_node` (LoadResult.other_node: its file names another node) is a
    problem: no desired value is set for another node's device here."""
    settings = config.inference or InferenceSettings()
    other_node = other_node or {}
    maps, problems = local_maps(settings, definitions)
    if not settings.pipelines and not maps or missing_ml_packages():
        # (without numpy and onnxruntime, check_installed refused the config's pipelines already; the
        # maps' pipelines are disabled, logged, and their devices run)
        return problems
    from mapper.inference.model import EDGE_ONLY, ModelError, load_model
    from mapper.inference.pipeline import Pipeline, PipelineError

    models = {} if models is None else models
    kubeedge = config.mode == "kubeedge"
    seen: dict[DeviceId, str] = {}

    def check(s: PipelineSettings, where: Callable[[str], tuple[str, int | None, str]], what: str) -> None:
        model_dir = settings.resolve_model(s.model)
        try:
            model = models.get(model_dir.resolve())
            if model is None:
                model = models[model_dir.resolve()] = load_model(model_dir, parts=EDGE_ONLY)
        except (ModelError, OSError) as exc:
            problems.append(Problem(*where("model"), _model_problem(settings, s.model, model_dir, exc)))
            model = None
        except Exception as exc:  # noqa: BLE001 - model.json without a key, an .onnx onnxruntime refuses, ...
            problems.append(Problem(*where("model"), f"the model in {model_dir} cannot be loaded: "
                                    f"{type(exc).__name__}: {exc} (rebuild it: models/README.md)"))
            model = None
        if s.device_id not in definitions and not kubeedge:
            problems.append(Problem(*where("device"), _device_problem(s.device_id, definitions)))
            return
        targets = [DeviceId.parse(a.device) for a in s.actions if isinstance(a, SetDesiredAction)]
        elsewhere = [(i, a) for i, a in enumerate(s.actions)
                     if isinstance(a, SetDesiredAction) and DeviceId.parse(a.device) in other_node]
        for i, a in elsewhere:
            target = DeviceId.parse(a.device)
            problems.append(Problem(*where(f"actions[{i}].device"), f"set_desired target {target}/{a.property}: "
                                    f"{other_node[target]}; so no desired value is set for it here: choose a "
                                    "device of this node"))
        if elsewhere:
            return
        if model is None or kubeedge and any(d not in definitions for d in (s.device_id, *targets)):
            return  # edgecore's devices: checked when they come (a problem then is logged, the pipeline left out)
        try:
            pipeline = Pipeline(s, model, definitions[s.device_id], definitions=definitions)
        except PipelineError as exc:
            problems.append(Problem(*where(exc.field), str(exc)))
            return
        except ValueError as exc:  # pipeline_id: `<device>-<model>` is no valid name
            problems.append(Problem(*where("name"), f"{exc}; give the pipeline a `name`"))
            return
        if pipeline.id in seen:
            problems.append(Problem(*where("name"), f"pipeline {pipeline.id} is configured twice "
                                    f"(also {seen[pipeline.id]}): give one of them another `name`"))
            return
        seen[pipeline.id] = what

    for i, s in enumerate(settings.pipelines):
        check(s, lambda field, i=i: config.pipeline_at(i, field), f"inference.pipelines[{i}]")
    for m in maps:
        if m.settings is not None and m.device not in unrunnable:
            check(m.settings, lambda field, m=m: _map_where(m, field),
                  f"{m.at.file}:{m.at.line}" if m.at.line else m.at.file)
    return problems


def _map_where(m: LocalMap, field: str) -> tuple[str, int | None, str]:
    """(file, line, field name) in the device file of a pipeline setting of a map's pipeline."""
    return m.at.at(anomaly_key(field, m.settings))


def _model_problem(settings: InferenceSettings, model: str, model_dir: Path, exc: Exception) -> str:
    """Why a pipeline's model cannot be loaded; for a name not found, the models there, the closest first."""
    if (model_dir / "model.json").exists() or "/" in model or Path(model).is_absolute():
        return str(exc)
    where = model_dir.parent
    try:
        there = sorted(p.name for p in where.iterdir() if (p / "model.json").is_file())
    except OSError:
        there = []
    close = difflib.get_close_matches(model, there, n=1)
    hint = (f"; did you mean {close[0]}?" if close else f"; models there: {', '.join(there)}" if there
            else "; that directory holds no model (inference.models_dir)")
    return f"no model {model!r} in {where} (a model is a directory with model.json, edge.onnx, cloud.onnx){hint}"


def _device_problem(device: DeviceId, definitions: dict[DeviceId, DeviceDefinition]) -> str:
    """A pipeline's device that the device files do not define, with the closest one they do."""
    known = sorted(str(d) for d in definitions)
    # By name within the namespace: the shared `default/` alone made `nosuchdev` look like `probe`.
    names = [d.name for d in definitions if d.namespace == device.namespace]
    close = difflib.get_close_matches(device.name, names, n=1)
    if close:
        hint = f"; did you mean {close[0]}?"
    else:
        hint = f"; devices here: {', '.join(known)}" if known else "; the device files define none"
    return f"no device {device} in the device files (`devices:`){hint}"


def confined_target_problem(target: DeviceId, definitions: dict[DeviceId, DeviceDefinition]) -> str | None:
    """Why a confined pipeline (the map of a Device edgecore sent) may not set `target`; None: it may.

    Whoever may create Devices must not decide what the operator's local (YAML) devices, or the
    pipelines' derived devices, are driven to: only devices edgecore sent are targets."""
    definition = definitions.get(target)
    if definition is None:
        return "not a device edgecore sent (a device's map may only set devices edgecore sent)"
    if definition.origin != "edgecore":
        return (f"a local device of the node's operator ({definition.source}); a device's map may only set "
                "devices edgecore sent")
    return None


class InferenceExtension:
    def __init__(self, settings: InferenceSettings | None = None) -> None:
        self.settings = settings or InferenceSettings()
        self.pipelines: dict[DeviceId, Pipeline] = {}
        self.problems: list[str] = []
        self.counts: Counter[str] = Counter()      # results not tied to a pipeline, desired values set
        self._log_throttle = Throttle()            # refused results: counted each, logged a few a minute
        # (device, property) -> the pipelines that read it: the other readings of a batch skip them.
        self._by_source: dict[tuple[DeviceId, str], list[Pipeline]] = {}
        # After a decision's commit, what needs twin calls of its own: desired values to set, and
        # requests given up at max_pending to answer provisionally.
        self._follow_ups: asyncio.Queue[tuple[list[Any], list[tuple[str, Waiting]]]] | None = None
        self._waiting: dict[str, Waiting] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._next_due_ms: int | None = None       # the earliest deadline, resend or expiry (timer task; _mono_ms)
        # Cloud answers accepted but not yet committed: (row update, messages, reports, desired values).
        # They ride in the next batch of readings' transaction, or the timer's after TIMER_GRACE_S.
        self._results: list[tuple[Any, list[OutMessage], list[Any], list[Any]]] = []
        self._results_since_ms: int | None = None  # when the oldest of them arrived (_mono_ms)
        # What fell due but was not committed (a failed timer transaction, a given-up batch), retried
        # first: (when it was collected: a _collect_due count, (updates, messages, desired, reports,
        # results)), in collection order (among themselves: a newer answer committed meanwhile is not
        # held back for them).
        self._unsaved: list[tuple[int, _Due]] = []
        self._collections = 0  # _collect_due calls so far
        self._desired_order: dict[tuple[DeviceId, str], int] = {}  # the DesiredSet.order last set, per property
        self.results_applied = 0                   # cloud answers committed to the twin
        self._service: MapperService | None = None
        self._topics = None
        self._result_topic: str | None = None
        self.idle = asyncio.Event()                # set while no decision's follow-up is waiting
        self._models: dict[Path, Any] = {}         # resolved model directory -> EarlyExitModel (loaded once)
        self._next_definitions: dict[DeviceId, DeviceDefinition] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        # Pipelines built whose requests left from the previous run do not wait again yet (_restore failed):
        # the timer task tries again from _restore_retry_ms (_mono_ms) on.
        self._unrestored: set[DeviceId] = set()
        self._restore_retry_ms = 0
        self._restore_lock = asyncio.Lock()        # one _restore_unrestored at a time (the timer's, _apply's)
        self.restore_tries = 0                     # restores started (a device update's, the timer's retries)
        self.restores_refused = 0                  # of them, refused by the twin (tried again)
        self.reloads = 0                           # device updates applied to the pipelines
        self.report_interval_s = self.settings.log_counters_s
        self._last_report: str | None = None
        # The cloud worker's silence (_watch_cloud): when a result of any kind for this node last came, and
        # since when the bus is connected (_mono_ms); since when no worker answers (wall ms, for people; None:
        # one answers, or nothing was asked long enough).
        self._heard_ms: int | None = None
        self._bus_up_ms: int | None = None
        self.cloud_silent_since_ms: int | None = None
        self._silent_count = 0  # offloads unanswered when the silence was noticed
        self._silent_since_mono: int | None = None  # the silence's start on _mono_ms: how long it lasts
        # What each derived device shows in the twin beyond its decisions: (state, detail) (_watch_sources).
        self._shown: dict[DeviceId, tuple[str, str]] = {}
        self._registered = 0  # _register calls (each resets what the derived devices show)
        self._stopping = False  # the mapper's stop began (stop_requested): _watch leaves the states be

    # -- lifecycle -------------------------------------------------------------------------

    async def setup(self, service: MapperService) -> None:
        self._service = service
        # Hooks first, pipelines or not: in `mode: kubeedge` the devices (and their
        # anomalyDetection maps) arrive from edgecore later, through service.update_devices.
        self._follow_ups = asyncio.Queue()
        recorder = service.recorder
        assert recorder is not None
        # Windows are cut from each batch before its commit, and their decisions commit with it.
        recorder.pre_commit.append(self._decide)
        service.device_listeners.append(self._on_devices)
        if service.bus is not None and service.bus.topics is not None:
            self._topics = service.bus.topics
            self._result_topic = self._topics.offload_result()
            service.bus.subscribe(self._result_topic, 1, self.handle_result)
        definitions = service.definitions.devices if service.definitions else {}
        await self._apply(definitions, first=True)

    def config_problems(self, config: MapperConfig, definitions: dict[DeviceId, DeviceDefinition], *,
                        unrunnable: Collection[DeviceId] = (),
                        other_node: Mapping[DeviceId, Problem] | None = None) -> list[Problem]:
        """Problems of the config's pipelines with these devices (see config_problems): MapperService.run
        refuses to start with any, and a SIGHUP reload refuses device files that bring some."""
        return config_problems(config, definitions, self._models, unrunnable=unrunnable, other_node=other_node)

    async def _apply(self, definitions: dict[DeviceId, DeviceDefinition], *, first: bool = False) -> None:
        """(Re)build the pipelines for this set of devices.

        A pipeline whose settings and devices (source and set_desired targets) did not change is
        kept with its window and counters; the others are built anew; pipelines of removed devices
        are dropped, with the requests still waiting for them.
        """
        wanted, problems = collect_settings(self.settings, definitions)
        for problem in problems:
            if first or problem not in self.problems:
                log.error("inference: %s", problem)
        if not wanted and not self.pipelines:
            self.problems = problems
            if first:
                await self._register({})  # retire the derived devices of a previous run's pipelines
                log.debug("inference: no pipeline configured")
            return
        old = self.pipelines
        self.problems = problems
        built = await asyncio.to_thread(self._build, wanted, definitions, old)
        built = await self._register(built)
        added = [pid for pid, p in built.items() if old.get(pid) is not p]
        if added:  # before the pipelines take live readings, so the history comes first
            await self._seed([built[pid] for pid in added])
        removed = [pid for pid, p in old.items() if built.get(pid) is not p]
        self.pipelines = built
        self._unrestored = {pid for pid in self._unrestored if pid in built} | set(added)
        self._by_source = {}
        for pipeline in built.values():
            for name in dict.fromkeys(pipeline.properties):
                self._by_source.setdefault((pipeline.source, name), []).append(pipeline)
        gone = {id(old[pid]) for pid in removed}
        dropped = [(rid, w) for rid, w in self._waiting.items() if id(w.pipeline) in gone]
        given_up = 0
        for request_id, w in dropped:
            del self._waiting[request_id]
            given_up += self._given_up_with_pipeline(request_id, w.pipeline)
        if not first:
            log.info("inference: pipelines updated: %d built, %d kept, %d dropped%s", len(added),
                     len(built) - len(added), len(set(removed) - set(added)),
                     f" ({given_up} waiting request(s) given up)" if given_up else "")
        if self._unrestored:
            await self._restore_unrestored()
        for pid in added:
            p = built[pid]
            log.info("inference pipeline %s: device %s properties %s, model %s (%s %s %.2f), window %d stride %d,"
                     " audit %.0f%%, deadline %gs", p.id, p.source, ",".join(p.properties), p.model.info.name,
                     p.score, ">=" if p.score == "max_prob" else "<=", p.threshold, p.model.info.window_length,
                     p.settings.stride, 100 * p.settings.audit_share, p.settings.deadline_s)
        if added and self._topics is None:
            log.warning("inference: no event bus: decisions stay in the twin and nothing is offloaded")
        self._wake.set()

    async def _seed(self, pipelines: list[Pipeline]) -> None:
        """Fill new pipelines' windows from the twin's recent history, so that a restarted mapper
        (or a rebuilt pipeline) decides on its next step, not `window` steps later. History older
        than the pipeline's gap limit is not used. Readings of the one batch that may be committing
        while the history is read are missed: a step less, never a step out of order."""
        from twin.records import Reading

        def fetch(store: TwinStore) -> list[list[Reading]]:
            return [sorted((Reading(p.source, name, value, ts, quality)
                            for name in dict.fromkeys(p.properties)
                            for ts, value, quality in store.history(p.source, name, p.seed_readings[name])),
                           key=lambda r: r.taken_at_ms)
                    for p in pipelines]

        try:
            histories = await self._twin(fetch)
        except Exception:  # noqa: BLE001 - the windows then fill from live readings, as on a first start
            log.exception("inference: cannot read the twin's history to fill the windows")
            return
        now = _now_ms()
        for pipeline, readings in zip(pipelines, histories, strict=True):
            steps = pipeline.builder.seed(readings, now)
            if steps:
                log.info("inference pipeline %s: window filled with %d of %d steps from the twin's history",
                         pipeline.id, steps, pipeline.builder.length)

    async def _register(self, built: dict[DeviceId, Pipeline]) -> dict[DeviceId, Pipeline]:
        """Each pipeline's derived device in the twin (active, read-only properties); the derived devices
        of pipelines that are gone become inactive. A pipeline whose name is taken by a device is dropped."""

        devices = [records.derived_device(str(p.id), p.model.info.name, str(p.source)) for p in built.values()]
        try:
            refused = await self._twin(lambda s: records.sync_derived(s, devices))
        except Exception:  # noqa: BLE001 - decisions are still recorded (the table), just not as properties
            log.exception("inference: cannot register the pipelines' derived devices in the twin")
            return built
        for pid in refused:
            problem = f"pipeline {pid}: a device of that name exists in the twin; give the pipeline another `name`"
            self.problems.append(problem)
            log.error("inference: %s; pipeline disabled", problem)
            built.pop(pid, None)
        # (sync_derived made them `ok` with their plain detail: _watch_sources says more when there is more)
        self._shown = {d.id: ("ok", d.detail) for d in devices if d.id in built}
        self._registered += 1
        return built

    def _on_devices(self, definitions: dict[DeviceId, DeviceDefinition]) -> None:
        """service.device_listeners hook (SIGHUP reload, KubeEdge DMI): rebuild pipelines in a task.

        Reloads that come while one is being applied collapse into the latest set of devices.
        """
        self._next_definitions = definitions
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.get_running_loop().create_task(self._reload(), name="inference-reload")

    async def _reload(self) -> None:
        while self._next_definitions is not None:
            definitions, self._next_definitions = self._next_definitions, None
            try:
                await self._apply(definitions)
            except Exception:  # noqa: BLE001 - a bad reload must not stop the pipelines that run
                log.exception("inference: cannot rebuild the pipelines after a device update")
            self.reloads += 1

    @staticmethod
    def _depends(s: PipelineSettings, definitions: dict[DeviceId, DeviceDefinition]) -> tuple[Any, ...]:
        """What a built pipeline depends on besides its settings: its devices' definitions."""
        targets = [DeviceId.parse(a.device) for a in s.actions if getattr(a, "type", None) == "set_desired"]
        # The origin too (local YAML <-> edgecore, equal documents): a pipeline is rebuilt (or refused)
        # when its device or a target changes hands.
        found = [(d, definitions.get(d)) for d in [s.device_id, *targets]]
        return tuple((str(d), getattr(x, "fingerprint", None), getattr(x, "origin", None)) for d, x in found)

    def _build(self, wanted: list[PipelineSettings], definitions: dict[DeviceId, DeviceDefinition],
               old: dict[DeviceId, Pipeline]) -> dict[DeviceId, Pipeline]:
        if wanted and (missing := missing_ml_packages()):
            problem = (f"{len(wanted)} pipeline(s) disabled: {' and '.join(missing)} not installed here "
                       f"(the `ml` extra: {install_extra('ml')})")
            self.problems.append(problem)
            log.error("inference: %s", problem)
            return {}
        from mapper.inference.model import EDGE_ONLY, ModelError, load_model
        from mapper.inference.pipeline import Pipeline, PipelineError

        built: dict[DeviceId, Pipeline] = {}
        reusable = list(old.values())
        for s in wanted:
            depends = self._depends(s, definitions)
            keep = next((p for p in reusable if p.settings == s and p.depends == depends
                         and p.id not in definitions), None)
            if keep is not None:
                reusable.remove(keep)
                pipeline = keep
            else:
                model_dir = self.settings.resolve_model(s.model)
                try:
                    model = self._models.get(model_dir.resolve())
                    if model is None:
                        model = self._models[model_dir.resolve()] = load_model(model_dir, parts=EDGE_ONLY)
                    pipeline = Pipeline(s, model, definitions.get(s.device_id), definitions=definitions)
                except (ModelError, PipelineError, ValueError, OSError) as exc:
                    self.problems.append(str(exc))
                    log.error("inference: pipeline for %s disabled: %s", s.device, exc)
                    continue
                pipeline.depends = depends
            if pipeline.id in built:
                self.problems.append(f"pipeline {pipeline.id} is configured twice; the first one is used")
                log.error("inference: pipeline %s is configured twice; the first one is used", pipeline.id)
                continue
            built[pipeline.id] = pipeline
        return built

    def _given_up_with_pipeline(self, request_id: str, pipeline: Pipeline) -> bool:
        """A request whose pipeline a device update dropped: given up (remembered in _expired), unless a pipeline
        of the same id was built instead and not restored yet: its restore picks the request up again from the
        twin (docs: a rebuilt pipeline's waiting requests are picked up again), and skips those given up."""
        if pipeline.id in self._unrestored:
            return False
        self._remember(self._expired, request_id)
        return True

    async def _restore_unrestored(self) -> None:
        """_restore for the pipelines whose requests do not wait again yet. If the twin refuses (a lock held too
        long, a full disk) the timer task tries again every RESTORE_RETRY_S (logged a few lines a minute), until
        it succeeds or the pipeline goes: the error used to end the device update's rebuild, and those requests
        were never waited for again (no deadline, no resend, no provisional answer) until the mapper restarted."""
        # One at a time: the timer's retry and a device update's _apply may both come here. Each tries the
        # pipelines as they are when it starts; one rebuilt meanwhile (_apply swaps the pipelines while the
        # other's twin calls run) is not restored by it and stays in _unrestored for its own restore: taken
        # off by the attempt for the old pipeline, it was never tried again when its own restore failed.
        async with self._restore_lock:
            attempt = {pid: p for pid in self._unrestored if (p := self.pipelines.get(pid)) is not None}
            if not attempt:
                return
            self.restore_tries += 1
            try:
                await self._restore(attempt)
            except Exception as exc:  # noqa: BLE001 - tried again by the timer task
                self.restores_refused += 1
                # A few lines a minute: a lasting refusal (a full disk) is tried every second, for hours.
                if (held := self._log_throttle("restore_refused")) is not None:
                    log.error("inference: cannot restore the offloads left from the previous run, trying again in"
                              " %g s: %s%s", RESTORE_RETRY_S, exc, held_note(held))
                self._restore_retry_ms = _mono_ms() + int(RESTORE_RETRY_S * 1000)
                self._wake.set()  # the timer task may be waiting up to 60 s: it caps its wait for the retry
                return
            self._unrestored -= {pid for pid, p in attempt.items() if self.pipelines.get(pid) is p}

    async def _restore(self, only: dict[DeviceId, Pipeline]) -> None:
        """Requests still waiting when the mapper last stopped (for these newly built pipelines) wait
        again (and are sent again). A pipeline no longer in self.pipelines when the twin's rows come back
        (rebuilt meanwhile) gets none: the new one is restored on its own."""
        from mapper.inference.window import Window

        # Between runs only the wall clock relates the twin's rows to now; within this run the due
        # times are on the monotonic clock: now_mono plus what remains, clamped (a row "from the
        # future", after the clock went back, waits its whole deadline; never longer).
        now = _now_ms()
        now_mono = _mono_ms()
        cutoffs = {str(pid): now - int(p.settings.result_max_age_s * 1000) for pid, p in only.items()}
        stood = await self._twin(lambda s: records.stand_stale(s, cutoffs))
        if stood:
            log.info("inference: %d offload(s) from the previous run are past result_max_age_s; their edge "
                     "answers stand (provisional, recorded only)", stood)
        rows = await self._twin(lambda s: records.waiting(s, min(cutoffs.values())))
        before = len(self._waiting)
        other_model = 0
        for row in rows:
            pid = DeviceId.parse(row["pipeline"])
            pipeline = only.get(pid)
            # Not in self.pipelines any more: rebuilt (or dropped) while the twin was read, not this attempt's.
            # In _done: answered, the answer maybe not committed yet (it rides with the next batch),
            # so the row still looks open: waiting again would accept the worker's second answer.
            # In _expired: given up by this run (max_pending, expiry, its pipeline dropped), its row with
            # no cloud answer still looks open (a restore retried after a refusal came after them). The
            # requests of a pipeline rebuilt meanwhile are not in it (_given_up_with_pipeline).
            if (pipeline is None or self.pipelines.get(pid) is not pipeline or row["request_id"] in self._waiting
                    or row["request_id"] in self._done or row["request_id"] in self._expired
                    or now - row["created_ts"] > pipeline.settings.result_max_age_s * 1000):
                continue
            outcome_window = Window((), row["window_start_ts"], row["window_end_ts"])
            sent = orjson.loads(row["request"]) if row["request"] else None
            request = sent if self._can_send() else None
            s = pipeline.settings
            deadline, max_age = int(s.deadline_s * 1000), int(s.result_max_age_s * 1000)
            age = min(max(0, now - row["created_ts"]), max_age)
            deadline_ms = now_mono + max(0, deadline - age)
            expires_ms = now_mono + max_age - age
            info = pipeline.model.info
            if sent is not None and (sent.get("model"), sent.get("cloud_sha256")) != (info.name,
                                                                                     info.cloud_sha256[:16]):
                # Cut by another model's edge graph (the pipeline has a new model now): no answer to it
                # can be used. Not sent again; the timer stands its edge answer (pending) at once.
                other_model += 1
                request, expires_ms = None, now_mono
            self._waiting[row["request_id"]] = Waiting(
                row["request_id"], pipeline, row["id"], row["created_ts"], now_mono - age, deadline_ms, expires_ms,
                now_mono,
                row["edge_label"], row["edge_confidence"], bool(row["audit"]), row["status"], request,
                outcome_window.start_ms, outcome_window.end_ms)
        if other_model:
            log.info("inference: %d offload(s) from the previous run were made with another model; their edge "
                     "answers stand (provisional) and no result for them is accepted", other_model)
        if len(self._waiting) - before - other_model > 0:
            log.info("inference: %d offload(s) from the previous run still wait for a result",
                     len(self._waiting) - before - other_model)

    async def run(self, service: MapperService) -> None:
        # Also without pipelines: a device update may bring some (the tasks idle until then).
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow_up(), name="inference-follow-ups")
            tg.create_task(self._timers(), name="inference-timers")
            tg.create_task(self._prune(), name="inference-prune")
            tg.create_task(self._report_loop(), name="inference-report")
            tg.create_task(self._watch(), name="inference-watch")

    async def stop_requested(self, service: MapperService) -> None:
        """Before the event bus drains the outbox: cloud answers still waiting for a batch go in."""
        self._stopping = True  # the devices stop now: their silence is no news for the derived devices
        await self.commit_results()

    async def before_stop(self, service: MapperService) -> None:
        """Devices stopped, their last batch committed: act on the decisions it made (a closed-loop
        desired value, a request given up) before the tasks are cancelled, bounded."""
        try:
            async with asyncio.timeout(STOP_FOLLOW_UPS_S):
                await self.idle.wait()
        except TimeoutError:
            log.warning("inference: stopping with decisions not yet acted on (still busy after %g s)",
                        STOP_FOLLOW_UPS_S)

    async def shutdown(self, service: MapperService) -> None:
        # Answers accepted after stop_requested (the bus took none after it, but one being handled
        # then finished): sent at the next start.
        with contextlib.suppress(Exception):
            await self.commit_results()
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reload_task
        if self.pipelines:
            self.report(final=True)

    def derived_devices(self) -> list[DeviceId]:
        """The derived devices of the pipelines that ran (marked `offline` by a clean stop, see
        MapperService._stopped_offline; _register makes them `ok` again at the next start)."""
        return list(self.pipelines)

    # -- the counters in the log -----------------------------------------------------------

    def summary(self) -> str:
        """One line: every pipeline's counters (zeros left out) and the results that matched no request."""
        status = self.status()
        parts = []
        for pid, s in status["pipelines"].items():
            counts = " ".join(f"{k}={v}" for k, v in s.items()
                              if isinstance(v, int) and not isinstance(v, bool) and v and k != "pending")
            rejected = ",".join(f"{k}:{v}" for k, v in s["results_rejected"].items())
            extra = f" rejected={rejected}" if rejected else ""
            if s.get("edge_latency_us_p50") is not None:
                extra += f" edge_us_p50={s['edge_latency_us_p50']} edge_us_p99={s['edge_latency_us_p99']}"
            if s.get("round_trip_ms_p50") is not None:
                extra += f" round_trip_ms_p50={s['round_trip_ms_p50']} round_trip_ms_p99={s['round_trip_ms_p99']}"
            parts.append(f"{pid}: {counts or 'windows=0'}{extra}")
        other = ",".join(f"{k}:{v}" for k, v in status["results_rejected"].items())
        if other:
            parts.append(f"unmatched results rejected={other}")
        for key in ("desired_set",):
            if status[key]:
                parts.append(f"{key}={status[key]}")
        return "; ".join(parts)

    def report(self, *, final: bool = False) -> bool:
        """Log the counters (INFO) if they changed since the last line, or always when `final`."""
        if not self.pipelines and not self.counts:
            return False
        line = self.summary()
        if not final and line == self._last_report:
            return False
        self._last_report = line
        log.info("inference counters%s: %s", " at shutdown" if final else "", line)
        return True

    async def _report_loop(self) -> None:
        if self.report_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.report_interval_s)
            try:
                self.report()
            except Exception:  # noqa: BLE001 - a log line must not stop inference
                log.exception("inference: cannot log the counters")

    # -- helpers ---------------------------------------------------------------------------

    async def _twin(self, fn):  # noqa: ANN001, ANN202
        assert self._service is not None
        return await self._service.twin(fn)

    def _offer(self, rows: list[OutboxRow]) -> None:
        recorder = self._service.recorder if self._service else None
        if rows and recorder is not None and recorder.on_outbox:
            recorder.on_outbox(rows)

    def _can_send(self) -> bool:
        return self._topics is not None

    # -- windows ---------------------------------------------------------------------------

    def _decide(self, batch: list[Reading]) -> Extra | None:
        """Before a batch of readings commits: the windows it closes, their edge decisions, and
        the twin work that records them in the batch's own transaction (one commit, not two)."""
        outcomes: list[tuple[Pipeline, EdgeOutcome]] = []
        by_source = self._by_source
        # Readings someone asked for (REST, DMI GetDevice) are recorded, but are no steps: a dashboard
        # polling a property would put steps at its own times into windows of the collect cycle's.
        recorder = self._service.recorder if self._service is not None else None
        on_demand = recorder.on_demand if recorder is not None else None
        for reading in batch:
            pipelines = by_source.get((reading.device_id, reading.property))
            if not pipelines or (on_demand and id(reading) in on_demand):
                continue
            for pipeline in pipelines:
                try:
                    window = pipeline.builder.add(reading)
                    if window is not None:
                        outcomes.append((pipeline, pipeline.edge(window)))
                except Exception as exc:  # noqa: BLE001 - one bad window must not stop inference
                    from mapper.inference.pipeline import WindowError

                    pipeline.stats.counts["errors"] += 1
                    if not isinstance(exc, WindowError):
                        log.exception("inference: %s: error on a window", pipeline.id)
                    elif (held := self._log_throttle("window_not_decided")) is not None:
                        # what the window held, a few lines a minute (a sensor may send such values for hours)
                        log.warning("inference: %s%s", exc, held_note(held))
        now = _mono_ms()
        due = (self._next_due_ms is not None and now >= self._next_due_ms) or bool(self._results)
        if not outcomes and not due:
            return None

        prepared = self._prepare(outcomes)
        prepared.new_desired = len(prepared.desired)
        if due:  # deadlines, resends and cloud answers ride along too: no commit (and no wake-up) of their own
            updates, messages, desired, reports, prepared.results = self._collect_due(now, results=True)
            prepared.due = (updates, messages, desired, reports, prepared.results)
            prepared.due_collected = self._collections
            prepared.updates += updates
            prepared.messages += messages
            prepared.desired += desired
            prepared.reports += reports
            self._next_due_ms = None  # the timer task computes the next one after _recorded wakes it

        def work(store: TwinStore) -> tuple[list[int], list[OutboxRow]]:
            if prepared.updates:
                records.update_rows(store, prepared.updates)
            return records.insert_within(store, prepared.new, prepared.messages, prepared.reports)

        return Extra(work, lambda result: self._recorded(prepared, result), lambda exc: self._lost(prepared))

    def _prepare(self, outcomes: list[tuple[Pipeline, EdgeOutcome]]) -> _Prepared:
        from mapper.inference.pipeline import Decision

        assert self._service is not None
        p = _Prepared(outcomes, _now_ms(), _mono_ms())
        for pipeline, o in outcomes:
            request = None
            if not o.exit or (o.audit and self._can_send()):
                request = pipeline.request(o, self._service.config.node, p.created).to_json()
            p.requests.append(request)
            if request is not None and self._can_send():
                p.messages.append(OutMessage(self._topics.offload_request(), request, kind="offload", sequenced=False))
            if o.exit:
                d = Decision(o.label, o.confidence, "edge", False, o.window)
                m, ds = pipeline.act(d, self._topics)
                p.messages += m
                p.desired += ds
                p.reports.append(pipeline.report(d))
            p.new.append(records.NewDecision(
                str(pipeline.id), str(pipeline.source), o.window.start_ms, o.window.end_ms,
                request["id"] if request else None, o.audit, records.FINAL if o.exit else records.PENDING,
                o.label if o.exit else None, o.confidence if o.exit else None, "edge" if o.exit else None,
                o.label, o.confidence, orjson.dumps(request) if request else None, created_ts=p.created))
        return p

    def _lost(self, p: _Prepared) -> None:
        """The recorder gave up this work (it kept failing; it logged why): its windows count as
        errors, and the timer rescans what still waits (its next wake-up was left to _recorded).

        What fell due and rode along (cloud answers accepted, edge answers stood, resends) has been
        moved on in memory already: kept for the timer's next transaction, as _due keeps its own; else
        an accepted answer was never committed (a repeat refused as a duplicate), and a stood row
        stayed pending until a restart. The new decisions' desired values are sent again by the next
        decision that wants them."""
        for pipeline, _ in p.outcomes:
            pipeline.stats.counts["errors"] += 1
        for d in p.desired[:p.new_desired]:
            for pipeline in self.pipelines.values():
                pipeline.forget_desired(d.device, d.property, d.value)
        if p.due is not None:
            self._keep_unsaved(p.due_collected, p.due)
        self._wake.set()

    def _keep_unsaved(self, collected: int, due: _Due) -> None:
        """Keep what fell due but was not committed for the next try, in the order it was collected
        (merged, never replaced: a failed timer transaction and a given-up batch may both keep some,
        and a batch collected before the timer may be given up after the timer's transaction began)."""
        if due[0] or due[1] or due[2]:
            self._unsaved.append((collected, due))
            self._unsaved.sort(key=lambda kept: kept[0])

    def _recorded(self, p: _Prepared, result: tuple[list[int], list[OutboxRow]]) -> None:
        """On the loop, once the decisions are committed: wait for the offloaded ones, publish."""

        row_ids, rows = result
        self.results_applied += p.results
        created, mono = p.created, p.created_mono
        earliest: int | None = None  # of the new entries' due times
        for (pipeline, o), row_id, request in zip(p.outcomes, row_ids, p.requests, strict=True):
            if request is None:
                continue
            if self.pipelines.get(pipeline.id) is not pipeline:  # dropped by a device update meanwhile
                self._given_up_with_pipeline(request["id"], pipeline)
                continue
            s = pipeline.settings
            w = self._waiting[request["id"]] = Waiting(
                request["id"], pipeline, row_id, created, mono, mono + int(s.deadline_s * 1000),
                mono + int(s.result_max_age_s * 1000), mono + int(s.resend_s * 1000),
                o.label, o.confidence, o.audit, records.FINAL if o.exit else records.PENDING,
                request if self._can_send() else None, o.window.start_ms, o.window.end_ms)
            earliest = _due_ms(w) if earliest is None else min(earliest, _due_ms(w))
        self._offer(rows)
        given_up = self._over_limit()  # at once: never more than max_pending waiting
        if p.desired or given_up:
            assert self._follow_ups is not None
            self.idle.clear()
            self._follow_ups.put_nowait((p.desired, given_up))
        # The timer task rescans every waiting request when woken: only when its next wake-up moves,
        # or when what fell due rode along with this batch (_decide left the next one for it to
        # compute). Not for every window decided at the edge with nothing waiting: one wake-up a
        # window, and a rescan, for nothing.
        if p.due is not None or (earliest is not None and (self._next_due_ms is None or earliest < self._next_due_ms)):
            self._wake.set()

    async def _follow_up(self) -> None:
        assert self._follow_ups is not None
        while True:
            if self._follow_ups.empty():
                self.idle.set()
            desired, given_up = await self._follow_ups.get()
            try:
                await self._set_desired(desired)
                if given_up:
                    await self._provisional(given_up)
            except Exception:  # noqa: BLE001 - a full disk: log, keep going with the next decisions
                log.exception("inference: cannot act on %d decision(s)", len(desired) + len(given_up))

    def _over_limit(self) -> list[tuple[str, Waiting]]:
        """Stop waiting for the oldest requests beyond max_pending and return them: _provisional then
        gives a still-pending one its edge answer (as at expiry), so its row is decided and the
        decision published and acted on."""
        given_up: list[tuple[str, Waiting]] = []
        while len(self._waiting) > self.settings.max_pending:
            request_id, w = next(iter(self._waiting.items()))
            del self._waiting[request_id]
            self._remember(self._expired, request_id)
            w.pipeline.stats.counts["expired"] += 1
            given_up.append((request_id, w))
        return given_up

    async def _set_desired(self, desired: list) -> None:  # noqa: ANN001 - list[DesiredSet]
        if not desired:
            return
        assert self._service is not None
        for d in desired:
            key = (d.device, d.property)
            if d.confined:  # the target may have become a local device (a SIGHUP) since the decision
                definitions = self._service.definitions.devices if self._service.definitions else {}
                why = confined_target_problem(d.device, definitions)
                if why:
                    log.error("inference: %s/%s = %r not set: the pipeline comes from a Device edgecore sent and "
                              "%s is %s", d.device, d.property, d.value, d.device, why)
                    self.counts["desired_refused"] += 1
                    continue
            if self._desired_order.get(key, -1) > d.order:
                # Asked for before a value already set (its transaction was retried after the newer one
                # committed): set now, the older decision would win.
                log.info("inference: %s/%s = %r not set: a later decision's value was set already", d.device,
                         d.property, d.value)
                continue
            try:
                await self._twin(lambda s, d=d: s.set_desired(d.device, d.property, d.value))
            except DeviceLocked as exc:  # `mapper lock`: every decision would say it (a few lines a minute)
                self.counts["desired_refused"] += 1
                if (held := self._log_throttle("desired_locked")) is not None:
                    log.warning("inference: %s/%s = %r not set: %s%s", d.device, d.property, d.value, exc,
                                held_note(held))
                for pipeline in self.pipelines.values():  # sent again with the next decision that wants it
                    pipeline.forget_desired(d.device, d.property, d.value)
                continue
            except Exception as exc:  # noqa: BLE001 - a wrong value must not stop inference
                log.error("inference: cannot set %s/%s = %r: %s", d.device, d.property, d.value, exc)
                for pipeline in self.pipelines.values():  # sent again with the next decision that wants it
                    pipeline.forget_desired(d.device, d.property, d.value)
                continue
            self._desired_order[key] = d.order
            log.info("inference: set %s/%s = %r", d.device, d.property, d.value)
            self.counts["desired_set"] += 1
        self._service.desired_changed()

    # -- deadlines, resends, expiry --------------------------------------------------------

    async def _timers(self) -> None:
        """What fell due and no batch of readings took along within TIMER_GRACE_S."""
        timed_out = False
        while True:
            if self._unrestored and _mono_ms() >= self._restore_retry_ms:  # not at every wake-up: a log line each
                await self._restore_unrestored()
            now = _mono_ms()
            # Cloud answers only when the wait ran out: a wake-up from the loop (a new result, a
            # commit) leaves them for the next batch.
            try:
                await self._due(now, results=timed_out)
            except Exception as exc:  # noqa: BLE001 - a full disk, a lock held too long: kept, tried again
                log.error("inference: cannot record what fell due, trying again in 1 s: %s", exc)
                await asyncio.sleep(1.0)
                timed_out = True
                continue
            dues = [_due_ms(w) for w in self._waiting.values()]
            if self._results_since_ms is not None:
                dues.append(self._results_since_ms)
            self._next_due_ms = min(dues, default=None)
            wait_s = (60.0 if self._next_due_ms is None
                      else max(0.01, (self._next_due_ms - _mono_ms()) / 1000 + TIMER_GRACE_S))
            if self._unrestored:
                wait_s = min(wait_s, max(0.01, (self._restore_retry_ms - _mono_ms()) / 1000))
            self._wake.clear()
            timed_out = False
            try:
                async with asyncio.timeout(min(wait_s, 60.0)):
                    await self._wake.wait()
            except TimeoutError:
                timed_out = True

    def _stand(self, request_id: str, w: Waiting) -> tuple[list[OutMessage], list[Any], Any, Any]:
        """The edge answer of a pending request stands, provisional: messages, desired values, row update,
        derived device report."""
        from mapper.inference.pipeline import Decision
        from mapper.inference.window import Window

        w.status = "provisional"
        w.pipeline.stats.counts["provisional"] += 1
        d = Decision(w.edge_label, w.edge_confidence, "edge", True, Window((), w.window_start, w.window_end),
                     request_id)
        m, ds = w.pipeline.act(d, self._topics)
        return m, ds, records.DecisionUpdate(w.row_id, status=records.PROVISIONAL, label=w.edge_label,
                                             confidence=w.edge_confidence, exit="edge"), w.pipeline.report(d)

    async def _provisional(self, given_up: list[tuple[str, Waiting]]) -> None:
        """Requests no longer waited for: those still pending get their edge answer, provisional."""

        updates, messages, desired, reports = [], [], [], []
        for request_id, w in given_up:
            if w.status == "pending":
                m, ds, u, r = self._stand(request_id, w)
                messages += m
                desired += ds
                updates.append(u)
                reports.append(r)
        if updates or messages:
            rows = await self._twin(lambda s: records.update(s, updates, messages, reports))
            self._offer(rows)
        await self._set_desired(desired)

    async def _due(self, now: int, *, results: bool = False) -> None:
        """What fell due and no batch of readings took along (see _decide): in its own transaction."""

        collected = self._collect_due(now, results=results)
        chunks, self._unsaved = [*self._unsaved, (self._collections, collected)], []  # (what failed before: first)
        updates: list[Any] = []
        messages: list[OutMessage] = []
        desired: list[Any] = []
        reports: list[Any] = []
        taken = 0
        for _, (u, m, d, r, t) in chunks:
            updates += u
            messages += m
            desired += d
            reports += r
            taken += t
        if updates or messages:
            commit = asyncio.ensure_future(self._twin(lambda s: records.update(s, updates, messages, reports)))
            # A cancel (the stop, while the transaction waits for the twin's lock): acted on once the
            # outcome is known. Kept as failed, a transaction that did commit was committed again by
            # the stop's commit_results (every message queued twice).
            cancelled = await outcome(commit)
            try:
                rows = commit.result()
            except BaseException:
                # _collect_due has moved these on in memory already: keep them for the next try (with
                # what a batch given up meanwhile kept, in the order of collection).
                for stamp, chunk in chunks:
                    self._keep_unsaved(stamp, chunk)
                if cancelled is not None:
                    raise cancelled from None
                raise
            self.results_applied += taken
            self._offer(rows)
            if cancelled is not None:  # committed: only its desired values are left, for the stop to set
                self._keep_unsaved(chunks[-1][0], ([], [], desired, [], 0))
                raise cancelled
        await self._set_desired(desired)

    def _collect_due(self, now: int, *, results: bool = False) -> _Due:
        """Deadlines passed, resends due, expiries, and (`results`) the cloud answers accepted so far:
        row updates, messages, desired values, reports, and how many cloud answers are among them."""
        self._collections += 1
        updates: list[Any] = []
        messages: list[OutMessage] = []
        desired: list[Any] = []
        reports: list[Any] = []
        taken = len(self._results) if results else 0
        if taken:
            for update, m, r, ds in self._results:
                updates.append(update)
                messages += m
                reports += r
                desired += ds
            self._results = []
            self._results_since_ms = None
        if not self._waiting:
            return updates, messages, desired, reports, taken
        for request_id, w in list(self._waiting.items()):
            if now >= w.expires_ms:
                del self._waiting[request_id]
                self._remember(self._expired, request_id)
                w.pipeline.stats.counts["expired"] += 1
                if w.status == "pending":  # the deadline never ran (restored late): the edge answer stands
                    m, ds, u, r = self._stand(request_id, w)
                    messages += m
                    desired += ds
                    updates.append(u)
                    reports.append(r)
                continue
            if w.status == "pending" and now >= w.deadline_ms:
                m, ds, u, r = self._stand(request_id, w)
                messages += m
                desired += ds
                updates.append(u)
                reports.append(r)
            if w.body is not None and now >= w.next_send_ms:
                w.next_send_ms = now + int(w.pipeline.settings.resend_s * 1000)
                # With the bus down a resend would only pile up in the outbox behind the request
                # itself: it waits for the next resend time (and the timer does not spin on it).
                if self._bus_connected():
                    w.pipeline.stats.counts["resent"] += 1
                    messages.append(OutMessage(self._topics.offload_request(), w.body, kind="offload",
                                               sequenced=False))
        return updates, messages, desired, reports, taken

    def _bus_connected(self) -> bool:
        bus = self._service.bus if self._service else None
        return bool(bus is not None and bus.bus is not None and bus.bus.connected.is_set())

    async def _prune(self) -> None:

        while True:
            await asyncio.sleep(60)
            if not self.pipelines:
                continue
            with contextlib.suppress(Exception):
                await self._twin(lambda s: records.prune(s, self.settings.keep_decisions))

    @staticmethod
    def _remember(memory: OrderedDict[str, None], request_id: str) -> None:
        memory[request_id] = None
        while len(memory) > DONE_MEMORY:
            memory.popitem(last=False)

    # -- results ---------------------------------------------------------------------------

    def _reject(self, reason: str, pipeline: Pipeline | None = None, detail: str = "", hint: str = "",
                level: int = logging.INFO) -> None:
        (pipeline.stats.counts if pipeline else self.counts)[f"rejected_{reason}"] += 1
        held = self._log_throttle(reason)
        if held is not None:
            log.log(level, "inference: result refused (%s)%s%s%s", reason, f": {detail[:200]}" if detail else "",
                    f"; {hint}" if hint else "", held_note(held))

    async def handle_result(self, topic: str, payload: bytes) -> None:
        """A message on our result topic; never raises."""
        try:
            await self._handle_result(topic, payload)
        except Exception:  # noqa: BLE001 - a worker must never crash the mapper
            self.counts["rejected_internal_error"] += 1
            log.exception("inference: error while handling a result")

    async def _handle_result(self, topic: str, payload: bytes) -> None:
        from mapper.inference.codec import CodecError, decode_result
        from mapper.inference.pipeline import Decision
        from mapper.inference.window import Window

        assert self._service is not None
        if topic != self._result_topic:
            return self._reject("wrong_topic", None, topic)
        if not self.pipelines and not self._waiting:  # nothing asked (and numpy may not even be installed)
            return self._reject("unknown", None, "no pipeline")
        try:
            result = decode_result(payload)
        except CodecError as exc:  # a worker (or a client) that speaks another format: someone must look
            return self._reject(exc.reason, None, str(exc), level=logging.WARNING)
        if result.node != self._service.config.node:
            return self._reject("wrong_node", None, result.node)
        self._worker_heard()
        w = self._waiting.get(result.id)
        if w is None:
            reason = "duplicate" if result.id in self._done else "late" if result.id in self._expired else "unknown"
            return self._reject(reason, None, result.id)
        info = w.pipeline.model.info
        if result.model != info.name or result.created != w.created_ms:
            return self._reject("mismatch", w.pipeline, f"answer for model {result.model[:64]!r} created {result.created}, "
                                f"the request was for {info.name!r} created {w.created_ms}", level=logging.WARNING)
        now = _mono_ms()
        if now > w.expires_ms:
            if w.status == "pending":
                # The timer has not stood its edge answer yet (it runs a little after each due
                # time): it does so now, and forgets the request then.
                self._wake.set()
            else:
                del self._waiting[result.id]
                self._remember(self._expired, result.id)
            return self._reject("late", w.pipeline, result.id)
        if result.error is not None:
            w.body = None  # the worker cannot serve it: sending again will not help
            return self._reject(
                "worker_error", w.pipeline, f"worker {result.worker!r} says {result.error!r}",
                f"{w.pipeline.id} keeps its edge answers, provisional, until a worker has model {info.name!r} with "
                f"cloud graph sha256 {info.cloud_sha256[:16]}...: give the worker the same version of the model "
                f"({w.pipeline.model.info.directory.name})", logging.WARNING)
        if result.logits is None or len(result.logits) != len(info.classes):
            return self._reject("mismatch", w.pipeline, f"{len(result.logits or ())} logits, model {info.name!r} has "
                                f"{len(info.classes)} classes", "the worker runs another version of the model: give it "
                                f"the node's ({w.pipeline.model.info.directory.name})", logging.WARNING)
        del self._waiting[result.id]
        self._remember(self._done, result.id)
        label, confidence = w.pipeline.cloud_answer(result.logits)
        stats = w.pipeline.stats
        stats.counts["results_ok"] += 1
        stats.round_trip_ms_total += now - w.sent_ms
        stats.round_trip_ms.append(now - w.sent_ms)
        messages: list[OutMessage] = []
        desired = []
        reports = []
        if w.audit:
            stats.counts["audit_agree" if label == w.edge_label else "audit_disagree"] += 1
            update = records.DecisionUpdate(w.row_id, cloud_label=label, cloud_confidence=confidence)
        else:
            replaces = w.status == "provisional"
            stats.counts["replaced"] += int(replaces)
            d = Decision(label, confidence, "cloud", False, Window((), w.window_start, w.window_end), result.id,
                         replaces_provisional=replaces)
            messages, desired = w.pipeline.act(d, self._topics)
            reports.append(w.pipeline.report(d))
            update = records.DecisionUpdate(w.row_id, status=records.FINAL, label=label, confidence=confidence,
                                            exit="cloud", cloud_label=label, cloud_confidence=confidence)
        # Committed with the next batch of readings (one transaction, one burst of messages), or by
        # the timer task after TIMER_GRACE_S if no batch comes: not a commit and a wake-up of its own.
        self._results.append((update, messages, reports, desired))
        if self._results_since_ms is None:
            self._results_since_ms = now
            if self._next_due_ms is None or now < self._next_due_ms:
                self._next_due_ms = now
                self._wake.set()  # the timer task moves its fallback (on the loop: no wake-up of the process)
        return None

    async def commit_results(self) -> None:
        """Commit the cloud answers accepted so far now (at shutdown), with whatever else fell due and
        what a failed transaction or a given-up batch kept for the next try."""
        if self._results or self._unsaved:
            await self._due(_mono_ms(), results=True)

    # -- what an operator sees: the cloud worker's silence, the sources' ----------------------

    def _worker_heard(self) -> None:
        """A result for this node came (any: an answer, a worker's error, a mismatch): a worker is there."""
        self._heard_ms = _mono_ms()
        if self.cloud_silent_since_ms is not None:
            silent_s = int(self.silent_for_s())
            self.cloud_silent_since_ms = self._silent_since_mono = None
            log.warning("inference: a cloud worker answers again, after %d s without a result", silent_s)
            self._note_health(None)

    async def _watch(self) -> None:
        """Every WATCH_S: is a cloud worker answering, and can each pipeline still build fresh windows?"""
        throttle = Throttle(burst=1, interval_s=600.0)
        while True:
            await asyncio.sleep(WATCH_S)
            if self._stopping:  # (the stop marks the derived devices `offline`, stopped, itself)
                return
            try:
                self._watch_cloud(_mono_ms())
                await self._watch_sources(_mono_ms())
            except Exception:  # noqa: BLE001 - showing the state must never stop inference
                if throttle("watch") is not None:
                    log.exception("inference: cannot update the derived devices' states")

    def _watch_cloud(self, now: int) -> None:
        """No worker answers when an offload sent `resend_s` ago (its pipeline's; counted from when the bus
        was last connected, if later) has no result, and no result of any kind came since it was sent:
        WARNING once, shown in STATUS= and on the derived devices, until a result comes (_worker_heard).
        A worker that is merely slow (past `deadline_s`, within `resend_s`) is not silent."""
        if not self._bus_connected():
            self._bus_up_ms = None  # the requests wait in the outbox meanwhile: not the worker's silence
            return
        if self._bus_up_ms is None:
            self._bus_up_ms = now
        if self.cloud_silent_since_ms is not None or not self._waiting:
            return
        heard, up = self._heard_ms, self._bus_up_ms
        unanswered = [w for w in self._waiting.values()
                      if w.body is not None and (heard is None or w.sent_ms > heard)
                      and now - max(w.sent_ms, up) >= w.pipeline.settings.resend_s * 1000]
        if not unanswered:
            return
        since = max(min(w.sent_ms for w in unanswered), up)
        self.cloud_silent_since_ms = _now_ms() - (now - since)
        self._silent_since_mono = since
        self._silent_count = len(unanswered)
        self._note_health(self.cloud_worker_note())
        log.warning("inference: no cloud worker answers: %d offload(s) on %s have had no result for %g s or more "
                    "(resend_s), and no result of any kind came since; uncertain windows keep their edge answers, "
                    "provisional, and the requests are sent again every resend_s. Is a `mapper cloud-worker` with "
                    "the model running and connected (docs/inference.md, The cloud worker), and does the bridge "
                    "carry requests out and results in?", len(unanswered),
                    self._topics.offload_request() if self._topics else "the request topic",
                    round((now - since) / 1000, 1))

    def _note_health(self, value: dict[str, Any] | None) -> None:
        """The silence on the node's retained health topic (eventbus/health.py), for a fleet that watches MQTT."""
        health = getattr(self._service.bus, "health", None) if self._service is not None else None
        if health is not None:
            health.note("cloud_worker", value)

    def cloud_worker_note(self) -> dict[str, Any] | None:
        """The silence as the health topic says it (None while a cloud worker answers): /healthz too."""
        if self.cloud_silent_since_ms is None:
            return None
        return {"answering": False, "since": self.cloud_silent_since_ms, "unanswered": self._silent_count}

    def silent_for_s(self) -> float:
        """Seconds no cloud worker has answered (0 while one does): /metrics. On _mono_ms: a step of the
        wall clock (timesyncd at a Pi's boot) moved it by hours, or to 0 as if a worker answered."""
        if self._silent_since_mono is None:
            return 0.0
        return max(0.0, (_mono_ms() - self._silent_since_mono) / 1000)

    def cloud_silence(self) -> str | None:
        """`since 2026-12-01 08:20:03Z, 3 offload(s) unanswered`, while no cloud worker answers (STATUS=)."""
        if self.cloud_silent_since_ms is None:
            return None
        since = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.cloud_silent_since_ms / 1000))
        return f"since {since}, {self._silent_count} offload(s) unanswered"

    def _derived_state(self, p: Pipeline, now: int) -> tuple[str, str]:
        """What the derived device of `p` should show: `offline` once its source has given no step for
        longer than the window's gap limit (no fresh window can be built: the label would otherwise
        look current for good), `ok` again at the source's first step; the cloud's silence in the detail."""
        assert self._service is not None
        steps, since = p.fed if p.fed is not None and p.fed[0] == p.builder.steps else (p.builder.steps, now)
        p.fed = (steps, since)
        plain = records.derived_device(str(p.id), p.model.info.name, str(p.source)).detail
        gap_ms = p.builder.max_gap_ms
        if gap_ms is not None and now - since > gap_ms:
            runner = self._service.runners.get(p.source)
            state = f"is {runner.state}" if runner is not None else "does not run"
            return "offline", (f"no fresh window: {p.source} {state} and gave no step (a good reading of "
                               f"{', '.join(dict.fromkeys(p.properties))}) for more than {gap_ms / 1000:g} s "
                               "(max_gap_s); the label is an old window's")
        if (silence := self.cloud_silence()) is not None:
            return "ok", f"{plain}; no cloud worker answers ({silence}): uncertain windows keep the edge answer"
        return "ok", plain

    async def _watch_sources(self, now: int) -> None:
        """Write each derived device's state (_derived_state) to the twin when it changed."""
        for pid, p in list(self.pipelines.items()):
            want = self._derived_state(p, now)
            if self._shown.get(pid) == want:
                continue
            registered = self._registered
            await self._twin(lambda s, pid=pid, want=want: s.set_state(pid, *want))
            if self._registered != registered:
                return  # the pipelines were registered again meanwhile (`ok`): the next round looks again
            if want[0] != (self._shown.get(pid) or ("ok",))[0]:
                log.log(logging.WARNING if want[0] != "ok" else logging.INFO, "inference: derived device %s: %s (%s)",
                        pid, want[0], want[1])
            self._shown[pid] = want

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counters per pipeline, plus results that matched no request (by reason)."""
        pipelines = {}
        for pid, p in self.pipelines.items():
            s = p.stats.as_dict()
            s["pending"] = sum(1 for w in self._waiting.values() if w.pipeline is p and w.status == "pending")
            s["waiting"] = sum(1 for w in self._waiting.values() if w.pipeline is p)
            s["gaps"] = p.builder.gaps
            pipelines[str(pid)] = s
        return {"pipelines": pipelines, "problems": list(self.problems),
                "results_rejected": {k[len("rejected_"):]: v for k, v in self.counts.items()
                                     if k.startswith("rejected_")},
                "desired_set": self.counts["desired_set"],
                # The previous run's offloads of these pipelines do not wait again yet (the twin refused
                # their restore: tried again every RESTORE_RETRY_S); restores started and refused so far.
                "restore": {"unrestored": sorted(map(str, self._unrestored)), "tries": self.restore_tries,
                            "refused": self.restores_refused}}
