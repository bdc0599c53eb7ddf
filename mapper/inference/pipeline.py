"""One inference pipeline: a device's readings -> windows -> edge exit or offload -> actions.

The I/O (twin, outbox, timers, results) is the extension's; this module holds what one
pipeline knows and decides: its window builder, its model and rule, the edge outcome of a
window, and what a decision does (the messages and desired values of its actions).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devices.definitions import DeviceDefinition
from devices.ids import DeviceId
from eventbus.topics import Topics
from mapper.inference import policy
from mapper.inference.codec import OffloadRequest
from mapper.inference.model import EarlyExitModel, EdgeRunner
from mapper.inference.records import Report
from mapper.inference.settings import AlertAction, PipelineSettings, PublishAction, SetDesiredAction
from mapper.inference.window import Window, WindowBuilder
from twin.store import OutMessage

log = logging.getLogger("mapper.inference")

F32_MAX = float(np.finfo(np.float32).max)


class PipelineError(ValueError):
    """A pipeline's settings do not fit its device or its model. `field`: the pipeline setting at
    fault (`device`, `properties`, `actions[1]` ...), for an error at its line in the config file."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class WindowError(ValueError):
    """A window the model cannot decide (its output is not finite): counted and skipped."""


@dataclass(frozen=True, slots=True)
class EdgeOutcome:
    window: Window
    label: str
    confidence: float          # max softmax probability of the first exit
    score: float               # what the threshold was compared with
    exit: bool                 # decided at the edge
    audit: bool                # offloaded although decided at the edge
    cut: np.ndarray
    latency_us: float


@dataclass(frozen=True, slots=True)
class Decision:
    """What gets published and acted on."""

    label: str
    confidence: float
    exit: str                  # edge | cloud
    provisional: bool
    window: Window
    request_id: str | None = None
    replaces_provisional: bool = False


# The order in which decisions asked for desired values (DesiredSet.order).
_DESIRED_ORDER = itertools.count()


@dataclass
class DesiredSet:
    device: DeviceId
    property: str
    value: Any
    # When the decision asked for it: of two values for one property, the later asked for wins, also
    # when the earlier one is set later (kept for a retry after the twin refused its transaction).
    order: int = field(default_factory=lambda: next(_DESIRED_ORDER), compare=False)
    # Asked for by a confined pipeline (a Device edgecore sent): set only on a device edgecore sent.
    confined: bool = field(default=False, compare=False)


# Per-window edge times and round trips kept for the percentiles (the most recent ones).
LATENCY_RING = 4096


def percentile(values: Any, q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return float(ordered[int(min(rank, len(ordered))) - 1])


@dataclass
class Stats:
    counts: Counter[str] = field(default_factory=Counter)
    edge_us_total: float = 0.0
    round_trip_ms_total: float = 0.0
    # The last LATENCY_RING edge times (graph + rule, us) and round trips (request to result, ms).
    edge_us: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_RING))
    round_trip_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_RING))

    def latency(self) -> dict[str, float | None]:
        edge, rt = list(self.edge_us), list(self.round_trip_ms)
        r = lambda v: None if v is None else round(v, 1)  # noqa: E731
        return {"edge_latency_us_p50": r(percentile(edge, 50)), "edge_latency_us_p99": r(percentile(edge, 99)),
                "round_trip_ms_p50": r(percentile(rt, 50)), "round_trip_ms_p99": r(percentile(rt, 99))}

    def as_dict(self) -> dict[str, Any]:
        c = self.counts
        out: dict[str, Any] = {k: c[k] for k in ("windows", "edge_exits", "offloads", "audits", "results_ok",
                                                   "provisional", "replaced", "resent", "expired", "published",
                                                   "alerts", "errors", "audit_agree", "audit_disagree")}
        out["results_rejected"] = {k[len("rejected_"):]: v for k, v in sorted(c.items()) if k.startswith("rejected_")}
        out["mean_edge_latency_us"] = round(self.edge_us_total / c["windows"], 1) if c["windows"] else None
        out["mean_round_trip_ms"] = (round(self.round_trip_ms_total / c["results_ok"], 1)
                                     if c["results_ok"] else None)
        out.update(self.latency())
        return out


class Pipeline:
    def __init__(self, settings: PipelineSettings, model: EarlyExitModel, definition: DeviceDefinition | None,
                 *, definitions: dict[DeviceId, DeviceDefinition], rng: random.Random | None = None) -> None:
        self.settings = settings
        self.model = model
        info = model.info
        self.source = settings.device_id
        self.id = settings.pipeline_id(info.directory)
        self.properties = tuple(settings.properties or info.properties)
        if len(self.properties) != len(info.properties):
            raise PipelineError(f"pipeline {self.id}: model {info.name} takes {len(info.properties)} properties "
                                f"({', '.join(info.properties)}), got {', '.join(self.properties)}", "properties")
        if settings.window is not None and settings.window != info.window_length:
            raise PipelineError(f"pipeline {self.id}: window {settings.window} but model {info.name} was built "
                                f"for {info.window_length} steps", "window")
        self.score: policy.Score = settings.score or info.score  # type: ignore[assignment]
        if settings.score == "entropy" and info.score != "entropy" and settings.threshold is None:
            raise PipelineError(f"pipeline {self.id}: score entropy needs its own threshold "
                                f"(model.json's {info.threshold} is a {info.score} threshold)", "score")
        self.threshold = settings.threshold if settings.threshold is not None else info.threshold
        if definition is None:
            raise PipelineError(f"pipeline {self.id}: device {self.source} is not defined on this node", "device")
        if self.id in definitions:
            raise PipelineError(f"pipeline {self.id}: its derived device would have the name of a device "
                                "on this node; give the pipeline another `name`", "name")
        cycles = []
        for name in self.properties:
            if not definition.has_property(name):
                raise PipelineError(
                    f"pipeline {self.id}: device {self.source} has no property {name!r} (the model {info.name} reads "
                    f"{', '.join(info.properties)}; its properties: {', '.join(p.name for p in definition.properties)})"
                    + ("" if settings.properties else "; list the device's properties that stand for them in "
                                                    "`properties:`, or choose a device that has them"),
                    "properties" if settings.properties else "device")
            cycles.append(definition.prop(name).collect_cycle_ms)
        gap_ms = int(settings.max_gap_s * 1000) if settings.max_gap_s else 3 * max(cycles) + 1000
        # Readings per property that fill a window from the twin's history (a restart): a step
        # comes at most every slowest cycle (or min_step_s), and a faster property has that many
        # more readings per step; twice over, for bad readings.
        step_ms = max(max(cycles), int(settings.min_step_s * 1000))
        self.seed_readings = {name: min(10_000, 2 * info.window_length * -(-step_ms // max(1, cycle)))
                              for name, cycle in zip(self.properties, cycles, strict=True)}
        self.builder = WindowBuilder(self.properties, length=info.window_length, stride=settings.stride,
                                     max_gap_ms=gap_ms, min_step_ms=int(settings.min_step_s * 1000))
        self.rng = rng or random.Random(settings.audit_seed)
        self.stats = Stats()
        self.actions = self._check_actions(definitions)
        # What the pipeline was built from besides its settings (set by the extension; a device
        # update that leaves it unchanged keeps the pipeline, its window and its counters).
        self.depends: tuple[Any, ...] = ()
        self._last_label: str | None = None
        self._acted_until: int | None = None  # window_end of the newest decision acted on
        self._clock_back = 0                  # the builder's clock_back count this pipeline has seen
        # After the clock went back, the derived device shows a window_end "from the future": the
        # newest decision (in this pipeline's order) replaces it regardless.
        self._replace_shown = False
        self._last_desired: dict[tuple[DeviceId, str], Any] = {}
        self._edge_runner: EdgeRunner | None = None
        # (the builder's step count, when it last changed on _mono_ms): whether the source still feeds it
        self.fed: tuple[int, int] | None = None

    def _check_actions(self, definitions: dict[DeviceId, DeviceDefinition]) -> list[Any]:
        classes = set(self.model.info.classes)
        actions = []
        for i, action in enumerate(self.settings.actions):
            where = f"actions[{i}]"
            when = getattr(action, "when", None)
            if when is not None and not set(when) <= classes:
                raise PipelineError(f"pipeline {self.id}: {action.type} `when` names unknown classes "
                                    f"{sorted(set(when) - classes)}; the model's are {sorted(classes)}",
                                    f"{where}.when")
            if isinstance(action, SetDesiredAction):
                target = DeviceId.parse(action.device)
                d = definitions.get(target)
                if d is None:
                    raise PipelineError(f"pipeline {self.id}: set_desired target {target}/{action.property} "
                                        "does not exist", where)
                for field, raw in (("value", action.value), ("otherwise", action.otherwise)):
                    if raw is None:
                        continue
                    try:  # found now, not at the first decision that would set it
                        d.desired_value(action.property, raw)
                    except ValueError as exc:
                        # At the value's own line; a property that is not there or not writable, at `property`.
                        at = "property" if not d.has_property(action.property) or not d.prop(
                            action.property).writable else field
                        raise PipelineError(f"pipeline {self.id}: set_desired {field} for {target}/{action.property}: "
                                            f"{exc}", f"{where}.{at}") from None
            actions.append(action)
        return actions

    def forget_desired(self, target: DeviceId, prop: str, value: Any) -> None:
        """That value was not set after all (the twin refused it for now): the next decision sends it again."""
        if self._last_desired.get((target, prop)) == value:
            del self._last_desired[(target, prop)]

    def _when(self, when: list[str] | None) -> set[str]:
        return set(when) if when is not None else set(self.model.info.classes[1:])

    # -- the edge --------------------------------------------------------------------------

    def edge(self, window: Window) -> EdgeOutcome:
        t0 = time.perf_counter_ns()
        if self.builder.clock_back != self._clock_back:
            # The clock went back: windows from before the jump end "later" than this one, but this
            # one is the newest; it must be acted on and shown (not only once the clock caught up).
            self._clock_back = self.builder.clock_back
            self._acted_until = None
            self._replace_shown = True
        values = window.values
        # Readings good for the device may be beyond what the graph computes with (float32), or make
        # it overflow: a NaN passes no threshold, and no cut of it can be offloaded. Checked in plain
        # Python on the few values there are (numpy's errstate and isfinite cost more than the window
        # is worth at one a second), and before the cast, which would warn.
        if max(values) > F32_MAX or min(values) < -F32_MAX:
            raise self._not_decided(window)
        run = self._edge_runner
        if run is None:  # made at the first window: a pipeline built to check a config runs none
            run = self._edge_runner = self.model.edge_runner()
        logits, cut = run(values)
        if not all(map(math.isfinite, logits)) or not all(map(math.isfinite, cut.tolist())):
            raise self._not_decided(window)
        probs = policy.softmax(logits)
        value = policy.score_value(probs, self.score)
        decided = policy.passes(value, self.threshold, self.score)
        elapsed = (time.perf_counter_ns() - t0) / 1000
        audit = decided and policy.should_audit(self.rng, self.settings.audit_share)
        index = policy.argmax(probs)
        c = self.stats.counts
        c["windows"] += 1
        c["edge_exits" if decided else "offloads"] += 1
        c["audits"] += int(audit)
        self.stats.edge_us_total += elapsed
        self.stats.edge_us.append(elapsed)
        return EdgeOutcome(window, self.model.info.classes[index], probs[index], value, decided, audit, cut,
                           elapsed)

    def _not_decided(self, window: Window) -> WindowError:
        peak = max(map(abs, window.values), default=0.0)
        return WindowError(f"{self.id}: the window ending at {window.end_ms} is not decided: the model's output "
                           f"is not finite (the window's values reach {peak:g}; the model computes in float32)")

    def request(self, outcome: EdgeOutcome, node: str, created_ms: int) -> OffloadRequest:
        info = self.model.info
        return OffloadRequest(secrets.token_hex(8), node, str(self.source), str(self.id), info.name,
                              info.cloud_sha256[:16], created_ms, outcome.audit, self.settings.encoding, outcome.cut)

    def cloud_answer(self, logits: tuple[float, ...]) -> tuple[str, float]:
        probs = policy.softmax(logits)
        index = policy.argmax(probs)
        return self.model.info.classes[index], probs[index]

    # -- actions ---------------------------------------------------------------------------

    def report(self, decision: Decision) -> Report:
        """The decision as the derived device's properties (recorded with the decision)."""
        return Report(str(self.id), decision.label, decision.confidence, decision.exit, decision.provisional,
                      decision.window.end_ms,
                      replace=self._replace_shown and decision.window.end_ms == self._acted_until)

    def act(self, decision: Decision, topics: Topics | None) -> tuple[list[OutMessage], list[DesiredSet]]:
        """Messages (publish, alert) and desired values (closed loop) for one decision."""
        messages: list[OutMessage] = []
        desired: list[DesiredSet] = []
        changed = decision.label != self._last_label
        # A cloud answer can come after later windows were decided: it is published (and alerts),
        # but the newest window wins for what is acted on and for what "changed" compares with.
        newest = self._acted_until is None or decision.window.end_ms >= self._acted_until
        if newest:
            self._acted_until = decision.window.end_ms
            self._last_label = decision.label
        body = decision_body(self, decision)
        for action in self.actions:
            if isinstance(action, PublishAction):
                if topics is not None and (changed or decision.replaces_provisional or not action.only_changes):
                    messages.append(OutMessage(f"{topics.device_base(self.id)}/decision", body))
                    self.stats.counts["published"] += 1
            elif isinstance(action, AlertAction):
                if decision.label in self._when(action.when):
                    self.stats.counts["alerts"] += 1
                    log.warning("inference alert: %s says %s (confidence %.2f, %s exit%s) for %s", self.id,
                                decision.label, decision.confidence, decision.exit,
                                ", provisional" if decision.provisional else "", self.source)
                    if topics is not None:
                        messages.append(OutMessage(f"{topics.device_base(self.id)}/alert", body, kind="alert"))
            elif isinstance(action, SetDesiredAction) and newest:
                value = action.value if decision.label in self._when(action.when) else action.otherwise
                target = DeviceId.parse(action.device)
                key = (target, action.property)
                if value is not None and self._last_desired.get(key) != value:
                    self._last_desired[key] = value
                    desired.append(DesiredSet(target, action.property, value, confined=self.settings.confined))
        return messages, desired


def decision_body(pipeline: Pipeline, d: Decision) -> dict[str, Any]:
    """Telemetry-shaped: `value` is the label, so a telemetry consumer shows something useful."""
    return {"value": d.label, "label": d.label, "confidence": round(d.confidence, 4), "exit": d.exit,
            "provisional": d.provisional, "request_id": d.request_id, "device": str(pipeline.source),
            "model": pipeline.model.info.name, "window_start": d.window.start_ms, "window_end": d.window.end_ms,
            "ts": int(time.time() * 1000), "quality": "good"}
