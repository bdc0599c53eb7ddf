"""Decisions in the twin file (table `inference_decisions`, migration m003 in twin/migrations.py),
and the latest one as read-only properties of the pipeline's derived device.

Every function takes the TwinStore and runs on the twin thread (`service.twin(fn)`). A change
to a decision, the derived device's properties and the messages it causes are one transaction,
like a reading and its telemetry: `TwinStore.transaction()` around the decision rows,
`TwinStore.report_derived(...)` and `TwinStore.enqueue(...)`.

The derived device (`<ns>/<pipeline name>`, protocol `derived`) shows the decision of the newest
window: a decision for an older window than the one shown (a final cloud answer arriving after
later windows were decided) updates its row but not the properties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from devices.ids import DeviceId
from devices.values import PropertyType, Value
from twin.store import DerivedDevice, OutboxRow, OutMessage, TwinStore, now_ms

PENDING, PROVISIONAL, FINAL = "pending", "provisional", "final"

# The derived device's properties (all read-only): the latest decision.
DERIVED_PROPERTIES: tuple[tuple[str, PropertyType, str], ...] = (
    ("label", PropertyType.STRING, ""),
    ("confidence", PropertyType.FLOAT, ""),
    ("exit", PropertyType.STRING, ""),            # edge | cloud
    ("provisional", PropertyType.BOOLEAN, ""),
    ("window_end", PropertyType.INT, "ms"),       # the window's last step: newer windows win
)
ORDER_BY = "window_end"


def derived_device(pipeline: str, model: str, source: str) -> DerivedDevice:
    return DerivedDevice(DeviceId.parse(pipeline), model, DERIVED_PROPERTIES, f"inference pipeline on {source}")


@dataclass(frozen=True, slots=True)
class Report:
    """A decision as the derived device's properties."""

    pipeline: str
    label: str
    confidence: float
    exit: str
    provisional: bool
    window_end: int
    # The newest decision although an older window_end may be shown (the clock went back).
    replace: bool = False

    def values(self) -> dict[str, Value]:
        return {"label": self.label, "confidence": self.confidence, "exit": self.exit,
                "provisional": self.provisional, "window_end": self.window_end}


@dataclass(frozen=True, slots=True)
class NewDecision:
    pipeline: str
    device_id: str
    window_start_ts: int
    window_end_ts: int
    request_id: str | None
    audit: bool
    status: str
    label: str | None
    confidence: float | None
    exit: str | None
    edge_label: str
    edge_confidence: float
    request: bytes | None = None     # the request as sent, so it can be sent again after a restart
    # The request's `created` (the worker echoes it, and a restarted mapper matches answers by it).
    created_ts: int | None = None


@dataclass(frozen=True, slots=True)
class DecisionUpdate:
    row_id: int
    status: str | None = None
    label: str | None = None
    confidence: float | None = None
    exit: str | None = None
    cloud_label: str | None = None
    cloud_confidence: float | None = None


def _transaction(store: TwinStore, work, messages: Sequence[OutMessage], reports: Sequence[Report] = ()  # noqa: ANN001
                 ) -> tuple[Any, list[OutboxRow]]:
    with store.transaction():
        return _within(store, work, messages, reports)


def _within(store: TwinStore, work, messages: Sequence[OutMessage], reports: Sequence[Report]  # noqa: ANN001
            ) -> tuple[Any, list[OutboxRow]]:
    """The decision rows (`work`), the derived devices' properties and the messages, in the
    transaction the caller holds."""
    result = work()
    report(store, reports)
    return result, store.enqueue(messages)


def report(store: TwinStore, reports: Sequence[Report]) -> int:
    """Inside a transaction: decisions as their derived devices' properties (unless a newer window's
    decision is shown already). Returns how many were applied."""
    ts = now_ms()
    return sum(store.report_derived(DeviceId.parse(r.pipeline), r.values(), ts=ts,
                                    newer=None if r.replace else ORDER_BY) for r in reports)


def sync_derived(store: TwinStore, devices: Sequence[DerivedDevice]) -> list[DeviceId]:
    """Register the pipelines' derived devices, retire the others; returns names refused (a device's)."""
    return store.sync_derived(devices)


def insert(store: TwinStore, decisions: Sequence[NewDecision], messages: Sequence[OutMessage],
           reports: Sequence[Report] = ()) -> tuple[list[int], list[OutboxRow]]:
    """Insert decisions (report them, queue their messages); returns the new row ids and outbox rows."""
    return _transaction(store, lambda: _insert_rows(store, decisions), messages, reports)


def _insert_rows(store: TwinStore, decisions: Sequence[NewDecision]) -> list[int]:
    ts = now_ms()
    ids = []
    for d in decisions:
        cur = store.conn.execute(
            "INSERT INTO inference_decisions (pipeline, device_id, window_start_ts, window_end_ts, request_id,"
            " audit, status, label, confidence, exit, edge_label, edge_confidence, created_ts, decided_ts,"
            " final_ts, request) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (d.pipeline, d.device_id, d.window_start_ts, d.window_end_ts, d.request_id, int(d.audit), d.status,
             d.label, d.confidence, d.exit, d.edge_label, d.edge_confidence,
             d.created_ts if d.created_ts is not None else ts,
             ts if d.label is not None else None, ts if d.status == FINAL else None, d.request))
        ids.append(int(cur.lastrowid))
    return ids


def insert_within(store: TwinStore, decisions: Sequence[NewDecision], messages: Sequence[OutMessage],
                  reports: Sequence[Report] = ()) -> tuple[list[int], list[OutboxRow]]:
    """`insert` inside a transaction the caller holds (the readings' own, see Recorder.pre_commit)."""
    return _within(store, lambda: _insert_rows(store, decisions), messages, reports)


def update(store: TwinStore, updates: Sequence[DecisionUpdate], messages: Sequence[OutMessage],
           reports: Sequence[Report] = ()) -> list[OutboxRow]:
    return _transaction(store, lambda: update_rows(store, updates), messages, reports)[1]


def update_rows(store: TwinStore, updates: Sequence[DecisionUpdate]) -> None:
    """The decision rows' updates alone, inside a transaction the caller holds."""
    ts = now_ms()
    for u in updates:
        store.conn.execute(
            "UPDATE inference_decisions SET status=coalesce(?, status), label=coalesce(?, label),"
            " confidence=coalesce(?, confidence), exit=coalesce(?, exit), cloud_label=coalesce(?, cloud_label),"
            " cloud_confidence=coalesce(?, cloud_confidence),"
            " request=CASE WHEN ? IS NOT NULL THEN NULL ELSE request END,"
            " decided_ts=CASE WHEN ? IS NOT NULL THEN ? ELSE decided_ts END,"
            " final_ts=CASE WHEN ?='final' THEN ? ELSE final_ts END WHERE id=?",
            (u.status, u.label, u.confidence, u.exit, u.cloud_label, u.cloud_confidence, u.cloud_label,
             u.label, ts, u.status, ts, u.row_id))


def enqueue(store: TwinStore, messages: Sequence[OutMessage]) -> list[OutboxRow]:
    return _transaction(store, lambda: None, messages)[1] if messages else []


def waiting(store: TwinStore, since_ms: int) -> list[dict[str, Any]]:
    """Offloads (and audits) created after `since_ms` whose result has not come yet."""
    cur = store.conn.execute(
        "SELECT * FROM inference_decisions WHERE request_id IS NOT NULL AND cloud_label IS NULL"
        " AND created_ts >= ? ORDER BY id", (since_ms,))
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def stand_stale(store: TwinStore, cutoffs: dict[str, int]) -> int:
    """Pending offloads created before their pipeline's cutoff (ms) (no answer can be accepted for
    them any more: the mapper was down longer than result_max_age_s): their edge answer stands,
    provisional, as it would have at their deadline. Recorded only: a window that old is neither
    published nor acted on. Returns how many."""
    ts = now_ms()
    stood = 0
    with store.transaction():
        for pipeline, cutoff in cutoffs.items():
            stood += store.conn.execute(
                "UPDATE inference_decisions SET status=?, label=edge_label, confidence=edge_confidence,"
                " exit='edge', decided_ts=? WHERE pipeline=? AND status=? AND created_ts < ?",
                (PROVISIONAL, ts, pipeline, PENDING, cutoff)).rowcount
    return stood


def recent(store: TwinStore, pipeline: str, limit: int = 100) -> list[dict[str, Any]]:
    """The newest decisions of a pipeline, oldest first."""
    cur = store.conn.execute(
        "SELECT * FROM inference_decisions WHERE pipeline=? ORDER BY id DESC LIMIT ?", (pipeline, limit))
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in reversed(cur.fetchall())]


def prune(store: TwinStore, keep: int) -> int:
    """Keep the newest `keep` decisions of each pipeline."""
    deleted = 0
    for (pipeline, top) in store.conn.execute(
            "SELECT pipeline, max(id) FROM inference_decisions GROUP BY pipeline").fetchall():
        count = store.conn.execute("SELECT count(*) FROM inference_decisions WHERE pipeline=?", (pipeline,)).fetchone()[0]
        if count > keep:
            cutoff = store.conn.execute(
                "SELECT id FROM inference_decisions WHERE pipeline=? ORDER BY id DESC LIMIT 1 OFFSET ?",
                (pipeline, keep)).fetchone()[0]
            deleted += store.conn.execute(
                "DELETE FROM inference_decisions WHERE pipeline=? AND id<=?", (pipeline, cutoff)).rowcount
    return deleted
