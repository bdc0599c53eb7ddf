"""TwinStore: the device twin in one SQLite file (WAL), plain sqlite3 on the hot path.

One reading, or one batch of readings, is one transaction writing the reported value,
the history row and any outbox rows together: either all of it survives a crash or none.
With `synchronous=FULL` (the default) a committed transaction also survives power loss.

A running mapper uses one TwinStore from one thread (see mapper.store_worker); other
processes (the CLI) open their own and see committed data thanks to WAL.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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


class OutboxRow(NamedTuple):
    """One queued message, as the publisher sends it (a named tuple: cheap to build per message)."""

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


_GOOD_QUALITY = (GOOD, None)

# Rows are inserted with multi-row VALUES statements of these sizes (a batch of 110 rows is
# 64 + 32 + 8 + 4 + 2): per row that is ~2x cheaper in SQLite than one executemany step,
# and the handful of statement texts stays in the connection's statement cache.
_CHUNKS = (128, 64, 32, 16, 8, 4, 2, 1)

# Outbox ids are reserved on disk this many at a time (see m004 in twin/migrations.py).
OUTBOX_ID_BLOCK = 4096

# The protocol of devices the mapper derives itself (an inference pipeline's decisions, see
# docs/inference.md): no driver, no YAML, read-only properties. Their owner registers and
# retires them (sync_derived); deactivate_devices() leaves them alone.
DERIVED_PROTOCOL = "derived"


@dataclass(frozen=True, slots=True)
class DerivedDevice:
    """A device the mapper derives itself: its properties are (name, type, unit), all read-only."""

    id: DeviceId
    model: str
    properties: tuple[tuple[str, PropertyType, str], ...]
    detail: str | None = None


class TwinStore:
    def __init__(self, conn: sqlite3.Connection, path: Path, limits: OutboxLimits) -> None:
        self.conn = conn
        self.path = path
        self.limits = limits
        self._seq: dict[str, int] = {}
        self._outbox_rows = 0
        self._outbox_bytes = 0
        self._next_outbox_id = 1
        self._outbox_reserved = 0  # ids up to this one may have been used: never hand them out again
        self._statements: dict[tuple[str, int], str] = {}
        self._synchronous = "FULL"

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
        store._synchronous = synchronous.upper()
        store._seq = dict(conn.execute("SELECT topic, seq FROM topic_seq"))
        rows, size = conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        store._outbox_rows, store._outbox_bytes = rows, size
        store._outbox_reserved = store._reserved_outbox_id()
        top = conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
        store._next_outbox_id = max(store._outbox_reserved, top) + 1
        return store

    def _insert_rows(self, head: str, width: int, flat: list[Any], tail: str = "") -> None:
        """`head` VALUES (row), (row), ... `tail`, for rows given as one flat list of `width` values each."""
        n = len(flat) // width
        done = 0
        texts = self._statements
        execute = self.conn.execute
        for size in _CHUNKS:
            while n - done >= size:
                sql = texts.get((head, size))
                if sql is None:
                    row = "(" + ",".join("?" * width) + ")"
                    sql = texts[(head, size)] = f"{head} VALUES {','.join([row] * size)}{tail}"
                execute(sql, flat[done * width:(done + size) * width])
                done += size

    def _reserved_outbox_id(self) -> int:
        row = self.conn.execute("SELECT value FROM counters WHERE name='outbox_id_reserved'").fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> TwinStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[TwinStore]:
        """One write transaction: your own statements on `conn` plus `enqueue(...)`, all or nothing.

            with store.transaction():
                store.conn.execute("INSERT INTO my_table ...")
                rows = store.enqueue(messages)

        Committed on a normal exit. On an exception it is rolled back, and so are the per-topic
        sequence numbers and outbox counts handed out inside it. Not re-entrant.
        """
        self._begin()
        try:
            yield self
        except BaseException:
            self._rollback()
            raise
        self._commit()

    def enqueue(self, messages: Sequence[OutMessage], ts: int | None = None) -> list[OutboxRow]:
        """Queue messages in the outbox (with their seq) inside the current `transaction()`.

        The returned rows are committed only when the transaction is: hand them to the
        publisher after it ends. Outbox limits apply (the oldest telemetry may be dropped).
        """
        if not self.conn.in_transaction:
            raise TwinError("enqueue() must run inside transaction()")
        return self._enqueue(messages, now_ms() if ts is None else ts)

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
        self._commit()
        return changed

    def deactivate_devices(self, keep: Iterable[DeviceId]) -> None:
        """Devices not in `keep` become inactive (offline); derived devices are left to sync_derived()."""
        keep_ids = {str(k) for k in keep}
        for (key,) in self.conn.execute(
                "SELECT id FROM devices WHERE active=1 AND protocol!=?", (DERIVED_PROTOCOL,)).fetchall():
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
        self._commit()
        return rows

    # -- derived devices -------------------------------------------------------------------

    def sync_derived(self, devices: Iterable[DerivedDevice]) -> list[DeviceId]:
        """Register these derived devices (active, state ok; stored values kept) and retire the
        other derived devices (inactive, offline), in one transaction.

        Returns the ids refused because an active device of the YAML has that name.
        """
        refused = []
        ts = now_ms()
        keep: set[str] = set()
        self._begin()
        try:
            for d in devices:
                key = str(d.id)
                row = self.conn.execute("SELECT protocol, active FROM devices WHERE id=?", (key,)).fetchone()
                if row is not None and row[0] != DERIVED_PROTOCOL and row[1]:
                    refused.append(d.id)
                    continue
                keep.add(key)
                self.conn.execute(
                    "INSERT INTO devices (id, namespace, name, model, protocol, fingerprint, state, state_detail,"
                    " state_ts, last_online) VALUES (?,?,?,?,?,NULL,'ok',?,?,?) ON CONFLICT (id) DO UPDATE SET"
                    " model=excluded.model, protocol=excluded.protocol, fingerprint=NULL, active=1, state='ok',"
                    " state_detail=excluded.state_detail, state_ts=excluded.state_ts, last_online=excluded.last_online",
                    (key, d.id.namespace, d.id.name, d.model, DERIVED_PROTOCOL, d.detail, ts, ts),
                )
                for name, ptype, unit in d.properties:
                    self.conn.execute(
                        "INSERT INTO properties (device_id, name, type, writable, unit) VALUES (?,?,?,0,?)"
                        " ON CONFLICT (device_id, name) DO UPDATE SET type=excluded.type, writable=0,"
                        " unit=excluded.unit",
                        (key, name, ptype.value, unit),
                    )
            for (key,) in self.conn.execute(
                    "SELECT id FROM devices WHERE active=1 AND protocol=?", (DERIVED_PROTOCOL,)).fetchall():
                if key not in keep:
                    self.conn.execute(
                        "UPDATE devices SET active=0, state='offline', state_detail='no longer derived', state_ts=?"
                        " WHERE id=?", (ts, key))
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return refused

    def report_derived(self, device_id: DeviceId, values: dict[str, Value], *, ts: int | None = None,
                       newer: str | None = None) -> bool:
        """Report values of a derived device inside the current `transaction()`, like readings
        (record(): reported value, version + 1, timestamp, good quality, a history row each).

        With `newer` (one of the names), nothing is reported when the stored value of that
        property is greater than the new one (an older answer arriving late). Returns whether
        the values were reported; False also when the device is not a derived device.
        """
        if not self.conn.in_transaction:
            raise TwinError("report_derived() must run inside transaction()")
        key = str(device_id)
        row = self.conn.execute(
            "SELECT d.protocol, p.reported FROM devices d LEFT JOIN properties p ON p.device_id=d.id AND p.name=?"
            " WHERE d.id=?", (newer or "", key)).fetchone()
        if row is None or row[0] != DERIVED_PROTOCOL:
            return False
        if newer is not None and row[1] is not None:
            stored = _load(row[1])
            if isinstance(stored, int | float) and stored > values[newer]:
                return False
        taken = now_ms() if ts is None else ts
        self.record([Reading(device_id, name, value, taken) for name, value in values.items()])
        return True

    # -- the hot path ----------------------------------------------------------------------

    def record(self, readings: Sequence[Reading], messages: Sequence[OutMessage] = (),
               sent: Sequence[int] = ()) -> list[OutboxRow]:
        """Commit a batch of readings and the messages they cause, in one transaction.

        Every reading is a history row. Per property, the batch is folded into one UPDATE:
        the last good reading is the reported value, `reported_version` grows by the number
        of good readings (as if each had been applied in turn), and the quality is that of
        the property's last reading. Each device's `last_reading_ts` becomes the newest
        reading time seen.

        Inside `transaction()` it joins that transaction (committed or rolled back with it).
        `sent`: outbox rows the broker acknowledged meanwhile, deleted in the same transaction
        (one commit a second instead of two on a quiet Pi).
        """
        ts = now_ms()
        history: list[Any] = []  # flat: 5 values per reading
        good: dict[tuple[str, str], list[Any]] = {}  # (device, property) -> [value, taken, count]
        bad: dict[tuple[str, str], tuple[str, str | None]] = {}  # -> (quality, detail) of a last bad reading
        last: dict[str, int] = {}
        keys: dict[DeviceId, str] = {}  # str(DeviceId) once per device, not per reading
        dumps = orjson.dumps
        for r in readings:
            device = keys.get(r.device_id)
            if device is None:
                device = keys[r.device_id] = str(r.device_id)
                last[device] = 0
            value = r.value
            if value is not None:
                value = dumps(value).decode()
            taken = r.taken_at_ms
            quality = r.quality
            name = r.property
            history += (device, name, value, taken, quality)
            if last[device] < taken:
                last[device] = taken
            if quality == GOOD:
                key = (device, name)
                g = good.get(key)
                if g is None:
                    good[key] = [value, taken, 1]
                else:
                    g[0] = value
                    g[1] = taken
                    g[2] += 1
                if bad:
                    bad.pop(key, None)
            else:
                bad[(device, name)] = (quality, r.detail)
        joined = self.conn.in_transaction
        if not joined:
            self._begin()
        try:
            execmany = self.conn.executemany
            if good:
                execmany(
                    "UPDATE properties SET reported=?, reported_version=reported_version+?, reported_ts=?,"
                    " quality=?, quality_detail=? WHERE device_id=? AND name=?",
                    [
                        (g[0], g[2], g[1], *bad.pop(key, _GOOD_QUALITY), *key) if bad else
                        (g[0], g[2], g[1], GOOD, None, *key)
                        for key, g in good.items()
                    ],
                )
            if bad:
                execmany(
                    "UPDATE properties SET quality=?, quality_detail=? WHERE device_id=? AND name=?",
                    [(*q, *key) for key, q in bad.items()],
                )
            if history:
                self._insert_rows("INSERT INTO readings (device_id, property, value, ts, quality)", 5, history)
            execmany(
                "UPDATE devices SET last_reading_ts=max(coalesce(last_reading_ts, 0), ?) WHERE id=?",
                [(t, k) for k, t in last.items()],
            )
            if sent:
                self._delete_rows(sent)
            rows = self._enqueue(messages, ts) if messages else []
        except BaseException:
            if not joined:
                self._rollback()
            raise
        if not joined:
            self._commit()
        return rows

    def _rollback(self) -> None:
        """Undo the transaction, and the sequence numbers and outbox counts handed out in it."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self._seq = dict(self.conn.execute("SELECT topic, seq FROM topic_seq"))
        rows, size = self.conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        self._outbox_rows, self._outbox_bytes = rows, size
        # Ids handed out in the failed transaction are simply skipped (_next_outbox_id only grows).
        self._outbox_reserved = self._reserved_outbox_id()

    def _enqueue(self, messages: Sequence[OutMessage], ts: int) -> list[OutboxRow]:
        if not messages:
            return []
        params: list[Any] = []  # flat: 7 values per row
        rows = []
        seq_updates: dict[str, int] = {}
        seqs = self._seq
        dumps = orjson.dumps
        row_id = self._next_outbox_id
        size = 0
        new_row = tuple.__new__  # OutboxRow(...) without the Python-level __new__ per message
        for m in messages:  # one encode per message, here, with its seq
            topic = m.topic
            body = m.body
            if isinstance(body, bytes):
                payload = body
            elif m.sequenced:
                seq = seqs.get(topic, 0) + 1
                seqs[topic] = seq_updates[topic] = seq
                payload = dumps({**body, "seq": seq})
            else:
                payload = dumps(body)
            retain = bool(m.retain)
            params += (row_id, topic, payload, m.qos, retain, m.kind, ts)
            rows.append(new_row(OutboxRow, (row_id, topic, payload, m.qos, retain, m.kind)))
            size += len(payload)
            row_id += 1
        if seq_updates:
            self._insert_rows("INSERT INTO topic_seq (topic, seq)", 2, [x for item in seq_updates.items() for x in item],
                              " ON CONFLICT (topic) DO UPDATE SET seq=excluded.seq")
        self._insert_rows("INSERT INTO outbox (id, topic, payload, qos, retain, kind, created_ts)", 7, params)
        if row_id - 1 > self._outbox_reserved:
            # Ids are never reused, not even after the outbox emptied and the mapper restarted:
            # the mark on disk moves ahead of the ids in use, once per OUTBOX_ID_BLOCK ids.
            self._outbox_reserved = row_id - 1 + OUTBOX_ID_BLOCK
            self.conn.execute(
                "INSERT INTO counters (name, value) VALUES ('outbox_id_reserved', ?)"
                " ON CONFLICT (name) DO UPDATE SET value=excluded.value",
                (self._outbox_reserved,),
            )
        self._next_outbox_id = row_id
        self._outbox_rows += len(rows)
        self._outbox_bytes += size
        self._enforce_outbox_limits()
        return rows

    def _enforce_outbox_limits(self) -> None:
        """Over the limit, the oldest telemetry goes first; twin replies and state are never dropped."""
        if self._outbox_rows <= self.limits.max_rows and self._outbox_bytes <= self.limits.max_bytes:
            return
        excess_rows = max(0, self._outbox_rows - self.limits.max_rows)
        excess_bytes = max(0, self._outbox_bytes - self.limits.max_bytes)
        last_victim = None
        freed_rows = freed_bytes = 0
        for row_id, size in self.conn.execute(
            "SELECT id, length(payload) FROM outbox WHERE kind='telemetry' ORDER BY id"
        ):
            if freed_rows >= excess_rows and freed_bytes >= excess_bytes:
                break
            last_victim = row_id
            freed_rows += 1
            freed_bytes += size
        if last_victim is not None:
            # The victims are exactly the telemetry rows up to the last one: one range delete.
            self.conn.execute("DELETE FROM outbox WHERE kind='telemetry' AND id <= ?", (last_victim,))
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
        """Delete rows the broker acknowledged.

        Committed without an fsync of its own (WAL + synchronous=NORMAL for this transaction):
        the next durable commit syncs it along, and if power fails first, the rows come back
        and are sent again, a duplicate that QoS 1 allows and `seq` reveals, never a loss.
        """
        if not ids:
            return
        relaxed = self._synchronous != "NORMAL"
        if relaxed:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self._delete_sent(ids)
        finally:
            if relaxed:
                self.conn.execute(f"PRAGMA synchronous={self._synchronous}")

    def _delete_sent(self, ids: Sequence[int]) -> None:
        self._begin()
        try:
            self._delete_rows(ids)
        except BaseException:
            self._rollback()
            raise
        self._commit()

    def _delete_rows(self, ids: Sequence[int]) -> None:
        """Delete outbox rows inside the current transaction (the caller rolls back on error)."""
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
        self._commit()
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

    def prune_history(self, max_rows: int, max_age_ms: int, step: int | None = None) -> int:
        """Keep at most `max_rows` readings, none older than `max_age_ms`. Returns rows deleted.

        History is in arrival order (id), and age is judged from its old end: everything before
        the first reading younger than the limit goes. Only the old rows are read, not the whole
        table (there is no index on ts, and a full scan of 200,000 rows every 30 s was 14 ms of
        CPU, ~2 CPU-s/hour on a Pi's steady state). A reading that arrived with an older
        timestamp than one before it goes when it reaches the old end.

        `step`: delete at most this many of the oldest rows in this call (one transaction);
        a caller sharing the twin thread with readings calls again while it returns `step`,
        so readings' commits run in between instead of waiting for one large delete.
        """
        self._begin()
        try:
            # Two queries: SQLite answers a lone min() or max() from the end of the B-tree, both
            # together by scanning the table.
            oldest = self.conn.execute("SELECT min(id) FROM readings").fetchone()[0]
            top = self.conn.execute("SELECT max(id) FROM readings").fetchone()[0]
            if top is None:
                self._commit()
                return 0
            cutoff = now_ms() - max_age_ms
            young = self.conn.execute("SELECT id FROM readings WHERE ts >= ? ORDER BY id LIMIT 1", (cutoff,)).fetchone()
            last = top if young is None else young[0] - 1  # the last too-old row
            last = max(last, top - max_rows)  # ... or the last row over the count
            if step is not None:
                last = min(last, oldest + step - 1)  # at most `step` rows
            deleted = self.conn.execute("DELETE FROM readings WHERE id <= ?", (last,)).rowcount if last >= oldest else 0
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return deleted

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
