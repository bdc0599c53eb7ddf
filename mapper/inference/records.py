"""Decisions in the twin file (table `inference_decisions`, migration m003 in twin/migrations.py).

Every function takes the TwinStore and runs on the twin thread (`service.twin(fn)`). A change
to a decision and the messages it causes are one transaction, like a reading and its
telemetry: `TwinStore.transaction()` around the decision rows and `TwinStore.enqueue(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twin.store import OutboxRow, OutMessage, TwinStore, now_ms

PENDING, PROVISIONAL, FINAL = "pending", "provisional", "final"


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


@dataclass(frozen=True, slots=True)
class DecisionUpdate:
    row_id: int
    status: str | None = None
    label: str | None = None
    confidence: float | None = None
    exit: str | None = None
    cloud_label: str | None = None
    cloud_confidence: float | None = None


def _transaction(store: TwinStore, work, messages: Sequence[OutMessage]) -> tuple[Any, list[OutboxRow]]:  # noqa: ANN001
    with store.transaction():
        result = work()
        rows = store.enqueue(messages)
    return result, rows


def insert(store: TwinStore, decisions: Sequence[NewDecision], messages: Sequence[OutMessage]
           ) -> tuple[list[int], list[OutboxRow]]:
    """Insert decisions (and queue their messages); returns the new row ids and outbox rows."""
    ts = now_ms()

    def work() -> list[int]:
        ids = []
        for d in decisions:
            cur = store.conn.execute(
                "INSERT INTO inference_decisions (pipeline, device_id, window_start_ts, window_end_ts, request_id,"
                " audit, status, label, confidence, exit, edge_label, edge_confidence, created_ts, decided_ts,"
                " final_ts, request) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (d.pipeline, d.device_id, d.window_start_ts, d.window_end_ts, d.request_id, int(d.audit), d.status,
                 d.label, d.confidence, d.exit, d.edge_label, d.edge_confidence, ts,
                 ts if d.label is not None else None, ts if d.status == FINAL else None, d.request))
            ids.append(int(cur.lastrowid))
        return ids

    return _transaction(store, work, messages)


def update(store: TwinStore, updates: Sequence[DecisionUpdate], messages: Sequence[OutMessage]) -> list[OutboxRow]:
    ts = now_ms()

    def work() -> None:
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

    return _transaction(store, work, messages)[1]


def enqueue(store: TwinStore, messages: Sequence[OutMessage]) -> list[OutboxRow]:
    return _transaction(store, lambda: None, messages)[1] if messages else []


def waiting(store: TwinStore, since_ms: int) -> list[dict[str, Any]]:
    """Offloads (and audits) created after `since_ms` whose result has not come yet."""
    cur = store.conn.execute(
        "SELECT * FROM inference_decisions WHERE request_id IS NOT NULL AND cloud_label IS NULL"
        " AND created_ts >= ? ORDER BY id", (since_ms,))
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


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
