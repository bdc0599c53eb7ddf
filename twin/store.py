"""TwinStore: the device twin in one SQLite file (WAL), plain sqlite3 on the hot path.

One reading, or one batch of readings, is one transaction writing the reported value,
the history row and any outbox rows together: either all of it survives a crash or none.
With `synchronous=FULL` (the default) a committed transaction also survives power loss.

A running mapper uses one TwinStore from one thread (see mapper.store_worker); other
processes (the CLI) open their own and see committed data thanks to WAL.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from devices.definitions import DeviceDefinition
from devices.ids import DeviceId
from devices.values import PropertyType, Value, coerce
from twin import migrations
from twin.records import GOOD, DeviceTwin, PropertyTwin, Reading


class TwinError(Exception):
    """Base of twin errors."""


class UnknownDevice(TwinError, LookupError):
    def __init__(self, device_id: DeviceId | str) -> None:
        self.device_id = device_id
        super().__init__(f"unknown device {device_id}")


class UnknownProperty(TwinError, LookupError):
    def __init__(self, device_id: DeviceId, name: str, known: Iterable[str]) -> None:
        super().__init__(f"device {device_id} has no property {name!r} (properties: {', '.join(sorted(known))})")


class NotWritable(TwinError, PermissionError):
    def __init__(self, device_id: DeviceId, name: str) -> None:
        super().__init__(f"property {name!r} of {device_id} is ReadOnly: desired values are refused")


class VersionConflict(TwinError):
    def __init__(self, device_id: DeviceId, name: str, given: int, stored: int) -> None:
        self.stored = stored
        super().__init__(f"{device_id}/{name}: version {given} is older than the stored version {stored}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dump(value: Value | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _load(text: str | None) -> Value | None:
    return None if text is None else orjson.loads(text)


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A message to publish, queued in the outbox in the same transaction as its cause.

    `body` gets a `seq` (per topic, +1 per message, surviving restarts) when `sequenced`.
    `kind` is telemetry (may be dropped when the outbox is full, oldest first) or
    anything else (twin replies, state: never dropped).
    """

    topic: str
    body: dict[str, Any] | bytes
    qos: int = 1
    retain: bool = False
    kind: str = "telemetry"
    sequenced: bool = True


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str


@dataclass(frozen=True, slots=True)
class DesiredChange:
    device_id: DeviceId
    property: str
    value: Value
    version: int


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


class TwinStore:
    def __init__(self, conn: sqlite3.Connection, path: Path, limits: OutboxLimits) -> None:
        self.conn = conn
        self.path = path
        self.limits = limits
        self._seq: dict[str, int] = {}
        self._outbox_rows = 0
        self._outbox_bytes = 0
        self._next_outbox_id = 1

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        outbox: OutboxLimits | None = None,
        check_same_thread: bool = True,
    ) -> TwinStore:
        """Open (creating and migrating) the twin file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"twin.synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
        migrations.apply(conn)
        store = cls(conn, path, outbox or OutboxLimits())
        store._seq = dict(conn.execute("SELECT topic, seq FROM topic_seq"))
        rows, size = conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        store._outbox_rows, store._outbox_bytes = rows, size
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        top = conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
        store._next_outbox_id = max(seq[0] if seq else 0, top) + 1
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> TwinStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    # -- devices ---------------------------------------------------------------------------

    def sync_devices(self, definitions: Iterable[DeviceDefinition]) -> list[DeviceId]:
        """Register devices and properties; keep stored values. Returns devices whose spec changed.

        A desired value from YAML becomes the twin's desired value when the device is new
        or its definition changed (so an edited file wins over an old desired value).
        """
        changed = []
        self._begin()
        try:
            for d in definitions:
                key = str(d.id)
                row = self.conn.execute("SELECT fingerprint FROM devices WHERE id=?", (key,)).fetchone()
                fingerprint = d.fingerprint
                if row is None:
                    self.conn.execute(
                        "INSERT INTO devices (id, namespace, name, model, protocol, fingerprint) VALUES (?,?,?,?,?,?)",
                        (key, d.id.namespace, d.id.name, d.model_name, d.protocol, fingerprint),
                    )
                else:
                    self.conn.execute(
                        "UPDATE devices SET model=?, protocol=?, fingerprint=?, active=1 WHERE id=?",
                        (d.model_name, d.protocol, fingerprint, key),
                    )
                is_changed = row is None or row[0] != fingerprint
                if is_changed:
                    changed.append(d.id)
                for p in d.properties:
                    self.conn.execute(
                        "INSERT INTO properties (device_id, name, type, writable, unit) VALUES (?,?,?,?,?)"
                        " ON CONFLICT (device_id, name) DO UPDATE SET type=excluded.type,"
                        " writable=excluded.writable, unit=excluded.unit",
                        (key, p.name, p.type.value, int(p.writable), p.unit),
                    )
                    if is_changed and p.desired is not None and p.writable:
                        self._set_desired(d.id, p.name, p.desired, now_ms())
        except BaseException:
            self._rollback()
            raise
        self.conn.execute("COMMIT")
        return changed

    def deactivate_devices(self, keep: Iterable[DeviceId]) -> None:
        keep_ids = {str(k) for k in keep}
        for (key,) in self.conn.execute("SELECT id FROM devices WHERE active=1").fetchall():
            if key not in keep_ids:
                self.conn.execute("UPDATE devices SET active=0, state='offline' WHERE id=?", (key,))

    def set_state(self, device_id: DeviceId, state: str, detail: str | None = None, messages: Sequence[OutMessage] = ()) -> list[OutboxRow]:
        ts = now_ms()
        self._begin()
        try:
            cur = self.conn.execute(
                "UPDATE devices SET state=?, state_detail=?, state_ts=?,"
                " last_online=CASE WHEN ? IN ('ok','online') THEN ? ELSE last_online END WHERE id=?",
                (state, detail, ts, state, ts, str(device_id)),
            )
            if cur.rowcount == 0:
                raise UnknownDevice(device_id)
            rows = self._enqueue(messages, ts)
        except BaseException:
            self._rollback()
            raise
        self.conn.execute("COMMIT")
        return rows

    # -- the hot path ----------------------------------------------------------------------

    def record(self, readings: Sequence[Reading], messages: Sequence[OutMessage] = ()) -> list[OutboxRow]:
        """Commit a batch of readings and the messages they cause, in one transaction."""
        ts = now_ms()
        good = []
        bad = []
        history = []
        last: dict[str, int] = {}
        keys: dict[DeviceId, str] = {}  # str(DeviceId) once per device, not per reading
        dumps = orjson.dumps
        for r in readings:
            device = keys.get(r.device_id)
            if device is None:
                device = keys[r.device_id] = str(r.device_id)
            value = None if r.value is None else dumps(r.value).decode()
            taken = r.taken_at_ms
            if r.quality == GOOD:
                good.append((value, taken, device, r.property))
            else:
                bad.append((r.quality, r.detail, device, r.property))
            history.append((device, r.property, value, taken, r.quality))
            if last.get(device, 0) < taken:
                last[device] = taken
            else:
                last.setdefault(device, 0)
        self._begin()
        try:
            if good:
                self.conn.executemany(
                    "UPDATE properties SET reported=?, reported_version=reported_version+1, reported_ts=?,"
                    " quality='good', quality_detail=NULL WHERE device_id=? AND name=?",
                    good,
                )
            if bad:
                self.conn.executemany(
                    "UPDATE properties SET quality=?, quality_detail=? WHERE device_id=? AND name=?", bad
                )
            self.conn.executemany(
                "INSERT INTO readings (device_id, property, value, ts, quality) VALUES (?,?,?,?,?)", history
            )
            self.conn.executemany(
                "UPDATE devices SET last_reading_ts=max(coalesce(last_reading_ts, 0), ?) WHERE id=?",
                [(t, k) for k, t in last.items()],
            )
            rows = self._enqueue(messages, ts)
        except BaseException:
            self._rollback()
            raise
        self.conn.execute("COMMIT")
        return rows

    def _rollback(self) -> None:
        """Undo the transaction, and the sequence numbers and outbox counts handed out in it."""
        self.conn.execute("ROLLBACK")
        self._seq = dict(self.conn.execute("SELECT topic, seq FROM topic_seq"))
        rows, size = self.conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        self._outbox_rows, self._outbox_bytes = rows, size

    def _enqueue(self, messages: Sequence[OutMessage], ts: int) -> list[OutboxRow]:
        if not messages:
            return []
        params = []
        rows = []
        seq_updates = {}
        seqs = self._seq
        dumps = orjson.dumps
        row_id = self._next_outbox_id
        size = 0
        for m in messages:  # one encode per message, here, with its seq
            topic = m.topic
            if isinstance(m.body, bytes):
                payload = m.body
            elif m.sequenced:
                seq = seqs.get(topic, 0) + 1
                seqs[topic] = seq_updates[topic] = seq
                payload = dumps({**m.body, "seq": seq})
            else:
                payload = dumps(m.body)
            params.append((row_id, topic, payload, m.qos, int(m.retain), m.kind, ts))
            rows.append(OutboxRow(row_id, topic, payload, m.qos, bool(m.retain), m.kind))
            size += len(payload)
            row_id += 1
        if seq_updates:
            self.conn.executemany(
                "INSERT INTO topic_seq (topic, seq) VALUES (?,?) ON CONFLICT (topic) DO UPDATE SET seq=excluded.seq",
                list(seq_updates.items()),
            )
        self.conn.executemany(
            "INSERT INTO outbox (id, topic, payload, qos, retain, kind, created_ts) VALUES (?,?,?,?,?,?,?)", params
        )
        self._next_outbox_id = row_id
        self._outbox_rows += len(params)
        self._outbox_bytes += size
        self._enforce_outbox_limits()
        return rows

    def _enforce_outbox_limits(self) -> None:
        """Over the limit, the oldest telemetry goes first; twin replies and state are never dropped."""
        if self._outbox_rows <= self.limits.max_rows and self._outbox_bytes <= self.limits.max_bytes:
            return
        excess_rows = max(0, self._outbox_rows - self.limits.max_rows)
        excess_bytes = max(0, self._outbox_bytes - self.limits.max_bytes)
        victims = []
        freed_rows = freed_bytes = 0
        for row_id, size in self.conn.execute(
            "SELECT id, length(payload) FROM outbox WHERE kind='telemetry' ORDER BY id"
        ):
            if freed_rows >= excess_rows and freed_bytes >= excess_bytes:
                break
            victims.append((row_id,))
            freed_rows += 1
            freed_bytes += size
        if victims:
            self.conn.executemany("DELETE FROM outbox WHERE id=?", victims)
            self._outbox_rows -= freed_rows
            self._outbox_bytes -= freed_bytes
            self._bump("outbox_dropped", freed_rows)

    def _bump(self, name: str, by: int) -> None:
        self.conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value=value+excluded.value",
            (name, by),
        )

    # -- outbox ----------------------------------------------------------------------------

    def outbox_pending(self, after_id: int = 0, limit: int = 500) -> list[OutboxRow]:
        return [
            OutboxRow(i, t, bytes(p), q, bool(r), k)
            for i, t, p, q, r, k in self.conn.execute(
                "SELECT id, topic, payload, qos, retain, kind FROM outbox WHERE id>? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
        ]

    def outbox_sent(self, ids: Sequence[int]) -> None:
        """Delete rows the broker acknowledged."""
        if not ids:
            return
        self._begin()
        try:
            deleted_bytes = 0
            for chunk_start in range(0, len(ids), 500):
                chunk = ids[chunk_start : chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                row = self.conn.execute(
                    f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE id IN ({marks})", chunk
                ).fetchone()
                self.conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                self._outbox_rows -= row[0]
                deleted_bytes += row[1]
            self._outbox_bytes -= deleted_bytes
        except BaseException:
            self._rollback()
            raise
        self.conn.execute("COMMIT")

    def outbox_stats(self) -> dict[str, int]:
        rows, size = self.conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        dropped = self.conn.execute("SELECT value FROM counters WHERE name='outbox_dropped'").fetchone()
        return {"depth": rows, "bytes": size, "dropped": dropped[0] if dropped else 0}

    # -- desired values --------------------------------------------------------------------

    def set_desired(
        self, device_id: DeviceId, name: str, raw: Any, *, expected_version: int | None = None,
        messages: Sequence[OutMessage] = (),
    ) -> tuple[Value, int]:
        """Validate and store a desired value; returns (typed value, new version).

        Raises UnknownDevice, UnknownProperty, NotWritable, ValueError (type or range)
        or VersionConflict (when `expected_version` is older than the stored version).
        """
        prop = self._property_row(device_id, name)
        ptype, writable, version = prop
        if not writable:
            raise NotWritable(device_id, name)
        value = coerce(PropertyType(ptype), raw)
        if expected_version is not None and expected_version < version:
            raise VersionConflict(device_id, name, expected_version, version)
        self._begin()
        try:
            new_version = self._set_desired(device_id, name, value, now_ms())
            self._enqueue(messages, now_ms())
        except BaseException:
            self._rollback()
            raise
        self.conn.execute("COMMIT")
        return value, new_version

    def _property_row(self, device_id: DeviceId, name: str) -> tuple[str, int, int]:
        row = self.conn.execute(
            "SELECT type, writable, desired_version FROM properties WHERE device_id=? AND name=?",
            (str(device_id), name),
        ).fetchone()
        if row is None:
            known = [r[0] for r in self.conn.execute("SELECT name FROM properties WHERE device_id=?", (str(device_id),))]
            if not known:
                raise UnknownDevice(device_id)
            raise UnknownProperty(device_id, name, known)
        return row

    def _set_desired(self, device_id: DeviceId, name: str, value: Value, ts: int) -> int:
        self.conn.execute(
            "UPDATE properties SET desired=?, desired_version=desired_version+1, desired_ts=?, apply_error=NULL"
            " WHERE device_id=? AND name=?",
            (_dump(value), ts, str(device_id), name),
        )
        return self.conn.execute(
            "SELECT desired_version FROM properties WHERE device_id=? AND name=?", (str(device_id), name)
        ).fetchone()[0]

    def pending_desired(self) -> list[DesiredChange]:
        """Desired values not yet applied to the device (newer than the last applied version)."""
        return [
            DesiredChange(DeviceId.parse(d), n, _load(v), ver)
            for d, n, v, ver in self.conn.execute(
                "SELECT p.device_id, p.name, p.desired, p.desired_version FROM properties p"
                " JOIN devices d ON d.id = p.device_id"
                " WHERE d.active=1 AND p.desired IS NOT NULL AND p.desired_version > p.applied_version"
            )
        ]

    def mark_applied(self, device_id: DeviceId, name: str, version: int, error: str | None = None) -> None:
        self.conn.execute(
            "UPDATE properties SET applied_version=max(applied_version, ?), apply_error=? WHERE device_id=? AND name=?",
            (version, error, str(device_id), name),
        )

    # -- reading the twin ------------------------------------------------------------------

    def device(self, device_id: DeviceId) -> DeviceTwin:
        row = self.conn.execute(
            "SELECT model, protocol, state, state_detail, state_ts, last_online, last_reading_ts FROM devices WHERE id=?",
            (str(device_id),),
        ).fetchone()
        if row is None:
            raise UnknownDevice(device_id)
        props = {}
        for r in self.conn.execute(
            "SELECT name, type, writable, unit, desired, desired_version, desired_ts, reported, reported_version,"
            " reported_ts, quality, quality_detail, apply_error FROM properties WHERE device_id=? ORDER BY name",
            (str(device_id),),
        ):
            props[r[0]] = PropertyTwin(
                name=r[0], type=r[1], writable=bool(r[2]), unit=r[3], desired=_load(r[4]), desired_version=r[5],
                desired_ts=r[6], reported=_load(r[7]), reported_version=r[8], reported_ts=r[9], quality=r[10],
                quality_detail=r[11], apply_error=r[12],
            )
        return DeviceTwin(device_id, row[0], row[1], row[2], row[3], row[4], row[5], row[6], props)

    def device_ids(self, *, active_only: bool = True) -> list[DeviceId]:
        where = " WHERE active=1" if active_only else ""
        return [DeviceId.parse(r[0]) for r in self.conn.execute(f"SELECT id FROM devices{where} ORDER BY id")]

    def history(self, device_id: DeviceId, name: str, limit: int = 100) -> list[tuple[int, Value | None, str]]:
        """The newest `limit` readings of a property, oldest first: (ts, value, quality)."""
        rows = self.conn.execute(
            "SELECT ts, value, quality FROM readings WHERE device_id=? AND property=? ORDER BY id DESC LIMIT ?",
            (str(device_id), name, limit),
        ).fetchall()
        return [(ts, _load(v), q) for ts, v, q in reversed(rows)]

    def prune_history(self, max_rows: int, max_age_ms: int) -> int:
        """Keep at most `max_rows` readings, none older than `max_age_ms`. Returns rows deleted."""
        self._begin()
        try:
            cutoff = now_ms() - max_age_ms
            deleted = self.conn.execute("DELETE FROM readings WHERE ts < ?", (cutoff,)).rowcount
            top = self.conn.execute("SELECT max(id) FROM readings").fetchone()[0]
            if top is not None:
                deleted += self.conn.execute("DELETE FROM readings WHERE id <= ?", (top - max_rows,)).rowcount
        except BaseException:
            self._rollback()
            raise
        self.conn.execute("COMMIT")
        return deleted

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
