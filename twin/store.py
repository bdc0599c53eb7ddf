"""TwinStore: the device twin in one SQLite file (WAL), plain sqlite3 on the hot path.

One reading, or one batch of readings, is one transaction writing the history rows and any
outbox messages together: either all of it survives a crash or none. With
`synchronous=FULL` (the default) a committed transaction also survives power loss.

The history is the log the rest is derived from, so that a batch is little more than its
history rows (README, "How it fits together"):

- A reading's telemetry message rides in the reading's own history row (`route`, `seq`; the
  payload is rebuilt from the row when it has to be sent again) instead of a copy in the
  outbox table; the `outbox` table keeps the other messages (state, twin replies,
  offloads). Acknowledged telemetry moves a cursor, counters('published_through'), instead
  of deleting rows.
- The reported values in `properties` (and each device's `last_reading_ts`) are folded from
  the history at most once per CHECKPOINT_MS, and up to counters('folded_through');
  `device()` adds the readings after that point, so every reader sees every committed
  reading, in this process or another.
- Per-topic `seq` of those messages is saved to `topic_seq` when history is pruned and at
  close(); on open it is recovered from the rows after counters('seq_saved_through').

A running mapper uses one TwinStore from one thread (see mapper.store_worker); other
processes (the CLI) open their own and see committed data thanks to WAL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from devices.definitions import DeviceDefinition
from devices.ids import DeviceId, shown
from devices.values import PropertyType, Value, coerce, range_problem
from twin import migrations
from twin.records import GOOD, AdminLock, DeviceTwin, PropertyTwin, Reading


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


class DeviceLocked(TwinError, PermissionError):
    """A desired value for a device locked for maintenance (`mapper lock`): refused, not kept for later."""

    def __init__(self, device_id: DeviceId, lock: AdminLock) -> None:
        self.lock = lock
        super().__init__(f"refused: {lock.describe(device_id)}")


class VersionConflict(TwinError):
    def __init__(self, device_id: DeviceId, name: str, given: int, stored: int) -> None:
        self.stored = stored
        super().__init__(f"{device_id}/{name}: version {given} is older than the stored version {stored}")


def now_ms() -> int:
    """The wall clock (readings' and desired values' times). It can jump either way (a Pi
    without a real-time clock and its time sync, an operator setting the time): an interval is
    measured on `monotonic_ms`, and the history's age on `TwinStore._age_clock_ms`."""
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _dump(value: Value | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _load(text: str | None) -> Value | None:
    return None if text is None else orjson.loads(text)


def _file_desired(p: Any) -> str:
    """properties.file_desired for a property definition: its `desired:` as the file gives it
    (the text, before it is read as the property's type: a model's type change alone is no
    change of the file's value), or `null` when it gives none that applies."""
    if p.desired is None or not p.writable:
        return "null"
    return orjson.dumps(p.desired_text if p.desired_text is not None else {"value": p.desired}).decode()


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A message to publish, queued in the same transaction as its cause.

    `body` gets a `seq` (per topic, +1 per message, surviving restarts) when `sequenced`.
    `kind` is telemetry (may be dropped when the outbox is full, oldest first) or
    anything else (twin replies, state: never dropped). A retained message of kind `state`
    (a device's availability, its state view) supersedes the older ones of its topic still
    in the outbox: they are deleted when it is queued (TwinStore._supersede), so that those
    never-dropped rows stay at about one per retained topic however long the broker is away.

    `reading`: this message publishes that reading, as `{"value": reading.value, "ts":
    reading.taken_at_ms, **body, "seq": seq}` (`body` holds only the other fields, e.g.
    the unit). Recorded in the same batch, it is kept in the reading's history row and
    rebuilt from it when it has to be sent again, instead of a copy in the outbox.
    """

    topic: str
    body: dict[str, Any] | bytes
    qos: int = 1
    retain: bool = False
    kind: str = "telemetry"
    sequenced: bool = True
    reading: Reading | None = None


class OutboxRow(NamedTuple):
    """One queued message, as the publisher sends it (a named tuple: cheap to build per message)."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str


class SentIds(list):  # list[int]
    """Outbox ids done with (TwinStore.outbox_sent, record's `sent`), of which the last `refused`
    were not delivered but dropped as undeliverable (the broker refused them, or they were larger
    than it takes): counted in counters('outbox_undeliverable') in the same transaction."""

    __slots__ = ("refused",)

    def __init__(self, ids: Iterable[int] = (), refused: int = 0) -> None:
        super().__init__(ids)
        self.refused = refused


@dataclass(frozen=True, slots=True)
class DesiredChange:
    device_id: DeviceId
    property: str
    value: Value
    version: int
    # Once applied (DeviceRunner): the property's twin before the change, for the twin document's `last`.
    last: PropertyTwin | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


_GOOD_QUALITY = (GOOD, None)

# Rows are inserted with multi-row VALUES statements of these sizes (a batch of 110 rows is
# 64 + 32 + 8 + 4 + 2): per row that is ~2x cheaper in SQLite than one executemany step,
# and the handful of statement texts stays in the connection's statement cache. A statement
# holds at most 999 values (SQLite before 3.32).
_CHUNKS = (128, 64, 32, 16, 8, 4, 2, 1)
_MAX_VARIABLES = 999

# History rows and outbox rows take their ids from one sequence, so that the publisher sends
# both in commit order. Ids are reserved on disk this many at a time (see m004 in
# twin/migrations.py): one write per block, never an id used twice.
OUTBOX_ID_BLOCK = 65_536

# Reported values are folded from the history into `properties` at most this often (and at
# close() and before pruning); readers add the readings after the last fold themselves.
CHECKPOINT_MS = 1000  # (monotonic: a wall clock set back must not stop the folds until it caught up)

# The -wal file, once a checkpoint has emptied it, is cut back to this size. SQLite checkpoints
# at ~4 MB (1000 pages) and then reuses the file without shrinking it; a reader that keeps a
# snapshot open meanwhile (a long `mapper history` export, a stuck tool) lets it grow with every
# commit, and without a limit it stays that large for good. Above the normal 4 MB, so a Pi's
# usual cycle rewrites the same blocks and never truncates (no extra metadata writes).
WAL_SIZE_LIMIT = 8 * 1024 * 1024

# The age rule of prune_history (twin.history_age_s) says how many readings it deleted, at
# INFO, when a pass deleted readings taken more than this long before the limit the previous
# pass applied: more than a prune period's worth at once (the mapper was stopped a while, a
# broker outage ended, history_age_s was lowered, the clock went wrong before the twin opened).
AGE_PRUNE_NOTE_MS = 60_000

# The count rule of prune_history shares twin.history_rows fairly among the properties, on rows
# per property counted once (one GROUP BY) and then kept up to date in memory: at the first prune
# when the history holds at most this many rows (cheap: a fresh twin), else at the first prune
# whose count rule deletes (~130 ms for 200,000 rows on a desktop, once per start).
COUNT_AT_ONCE_ROWS = 10_000


def fair_cuts(rows: dict[Any, int], limit: int) -> dict[Any, int]:
    """How many rows each holder loses so that at most `limit` stay, shared fairly (water-filling):
    a holder under its share (`limit` / holders, plus what the smaller holders leave unused)
    loses nothing; the others are cut to that share. {} when the rows fit."""
    if sum(rows.values()) <= limit:
        return {}
    holders = sorted(rows.items(), key=lambda item: item[1])
    left = max(0, limit)
    for i, (_, count) in enumerate(holders):
        share = left // (len(holders) - i)
        if count > share:
            break  # this one and every bigger one get `share`
        left -= count
    cut = holders[i:]
    extra = left - share * len(cut)  # one more row each for that many of the biggest
    cuts = {key: count - share - (j >= len(cut) - extra) for j, (key, count) in enumerate(cut)}
    return {key: n for key, n in cuts.items() if n > 0}

def _take_off(props: dict[tuple[str, str], list[int]], rows: Iterable[tuple[str, str, int]]) -> bool:
    """Take (device, property, rows) off the rows per property; False if those do not hold
    them (counts gone wrong: counted again rather than pruning on them)."""
    for device, name, n in rows:
        held = props.get((device, name))
        if held is None or held[0] < n:
            return False
        held[0] -= n
    return True


# The protocol of devices the mapper derives itself (an inference pipeline's decisions, see
# docs/inference.md): no driver, no YAML, read-only properties. Their owner registers and
# retires them (sync_derived); deactivate_devices() leaves them alone.
# The meta key under which a running mapper notes its MQTT connection (EventBusExtension._note_broker):
# JSON {"url", "connected", "since" (ms), "error", "pid", "noted" (ms)}, read by `mapper devices`.
BROKER_META = "broker"
# ... written again at least this often while the mapper runs, unchanged but for `noted`: an older
# note is one the mapper could not write since (a twin that refuses writes), not one still true.
BROKER_NOTE_REFRESH_S = 60.0

DERIVED_PROTOCOL = "derived"

# devices.origin (m006): where a device id's definition came from; a change drops its desired
# values (sync_devices). Derived devices are "derived" (they never hold desired values).
_ORIGINS = {"local": "a local YAML file", "edgecore": "an edgecore Device", "derived": "a derived device"}


def origin_changes(recorded: tuple[str | None, bool] | None, origin: str) -> bool:
    """Whether a definition of `origin` taking up a device id whose twin row records `recorded`
    ((origin, active), TwinStore.recorded_origin; None: no row) is an origin change, which drops
    the row's desired values (sync_devices).

    A row of origin NULL (from before m006) is not known. Active, it ran in the last run, under
    the code before m006, as this definition's device in all likelihood (a takeover at the
    upgrade itself is not told apart): its origin is recorded, nothing dropped. Inactive, it may
    be a device removed long ago (edgecore's, before the upgrade) whose name is taken up now by
    the other origin: counted as a change, so its old desired values drive nothing."""
    if recorded is None:
        return False
    was, active = recorded
    return (not active) if was is None else was != origin

log = logging.getLogger("mapper.twin")

# What is still to publish, for readers in any process: the outbox table plus the telemetry
# in history rows after the published cursor.
OUTBOX_DEPTH_SQL = (
    "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM readings WHERE seq IS NOT NULL"
    " AND id > coalesce((SELECT value FROM counters WHERE name='published_through'), 0))")


_SQLITE_CORRUPT, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 11, 14, 26


def connect_to_read(path: Path, *, timeout: float = 30.0, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection to the twin for a command that only reads it: no statement may write (PRAGMA
    query_only). A reader of a WAL file makes its `-shm` beside it when a clean stop left none,
    which a read-only file system (an SD card the kernel remounted read-only after write errors)
    does not allow: SQLite then cannot open the twin at all. Nothing can change the file there, so
    it is opened immutable instead (read as it is, without the `-shm`)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread, timeout=timeout)
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA user_version").fetchone()  # (what opens the file)
    except sqlite3.OperationalError as exc:
        conn.close()
        if (exc.sqlite_errorcode or 0) & 0xFF != _SQLITE_CANTOPEN or not _on_read_only_file_system(path):
            raise
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?immutable=1", uri=True, isolation_level=None,
                               check_same_thread=check_same_thread, timeout=timeout)
        conn.execute("PRAGMA query_only=ON")
    return conn


def connect_untouched(path: Path, *, timeout: float = 30.0) -> sqlite3.Connection:
    """connect_to_read for a read that must leave the twin's files as they are (`mapper twin history`:
    an export while the mapper runs). With the `-wal` and `-shm` there (a mapper has the twin open,
    or one was killed) the file is opened read-only, its `-shm` too (`mode=ro`, `readonly_shm`, as
    `mapper health` reads): no read mark is written to the `-shm`, and the WAL a killed mapper left
    is not checkpointed into the twin at the close (connect_to_read's connection, the last one,
    does that). Without them (a clean stop: the twin file holds everything) connect_to_read, which
    makes them and removes them at its close, the twin file unchanged: read-only, SQLite cannot
    open a WAL twin without its `-shm` (and leaves an empty `-wal` behind)."""
    real = os.path.realpath(path)
    if os.path.exists(f"{real}-wal") and os.path.exists(f"{real}-shm"):
        conn = sqlite3.connect(f"{Path(real).as_uri()}?mode=ro&readonly_shm=1", uri=True, isolation_level=None,
                               timeout=timeout)
        try:
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA user_version").fetchone()  # (what opens the file)
            return conn
        except sqlite3.OperationalError:  # the mapper stopped meanwhile, and removed them
            conn.close()
    return connect_to_read(path, timeout=timeout)


def _on_read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(Path(path).parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def cannot_open(path: Path, exc: sqlite3.OperationalError) -> sqlite3.OperationalError:
    """SQLite names neither the file nor the usual causes ("unable to open database file")."""
    return sqlite3.OperationalError(
        f"cannot open the twin {path}: {exc} (its directory must be writable, for the -wal and -shm files"
        " next to it, and its disk not full)")


def unusable_twin(path: str | Path, exc: BaseException) -> sqlite3.DatabaseError | None:
    """The error to raise for a twin file SQLite cannot read as a database (SQLITE_NOTADB: "file is
    not a database"; SQLITE_CORRUPT: "database disk image is malformed"), naming the file and what
    to do (SQLite says neither); None for any other error. Every command says the same: `mapper
    run` (at open) and the commands that read the twin (TwinStore.open, and mapper.cli while
    they read, where a damaged page may be found only then)."""
    if not isinstance(exc, sqlite3.DatabaseError) or str(path) in str(exc):
        return None
    if getattr(exc, "sqlite_errorcode", None) is None or exc.sqlite_errorcode & 0xFF not in (_SQLITE_CORRUPT,
                                                                                             _SQLITE_NOTADB):
        return None
    return sqlite3.DatabaseError(
        f"the twin {path} cannot be read as a database ({exc}): it is damaged, or twin.path names another file."
        f" If twin.path is right, stop the mapper and move the twin aside (mv {path} {path}.broken, and likewise"
        f" {path}-wal and {path}-shm if they are there): the next `mapper run` starts an empty twin (the old"
        " history, desired values and unsent messages stay in the file moved; `sqlite3 FILE .recover` may save"
        " part of them)")


def committed_seqs(conn: sqlite3.Connection) -> dict[str, int]:
    """The last committed `seq` of every topic (saved ones, and those only in history rows yet)."""
    seqs = dict(conn.execute("SELECT topic, seq FROM topic_seq"))
    saved = _counter(conn, "seq_saved_through")
    for topic, seq in conn.execute(
            "SELECT r.topic, max(h.seq) FROM readings h JOIN routes r ON r.id = h.route"
            " WHERE h.id > ? AND h.seq IS NOT NULL GROUP BY h.route", (saved,)):
        if seq > seqs.get(topic, 0):
            seqs[topic] = seq
    return seqs


def _carried_payload(value: str | None, ts: int, fields: bytes, seq: int) -> bytes:
    """The payload of a message carried by its reading (OutMessage.reading): the same bytes as
    orjson.dumps({"value": value, "ts": ts, **fields, "seq": seq}), built from the history row."""
    return b'{"value":%b,"ts":%d%b,"seq":%d}' % (b"null" if value is None else value.encode(), ts, fields, seq)


def _counter(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
    return row[0] if row else 0


def _expanded(m: OutMessage) -> OutMessage:
    """A message carried by its reading, as a message of its own (whole body, no reading)."""
    r = m.reading
    if r is None or not isinstance(m.body, dict):
        return m
    return OutMessage(m.topic, {"value": r.value, "ts": r.taken_at_ms, **m.body}, m.qos, m.retain, m.kind, m.sequenced)


@dataclass(frozen=True, slots=True)
class DerivedDevice:
    """A device the mapper derives itself: its properties are (name, type, unit), all read-only."""

    id: DeviceId
    model: str
    properties: tuple[tuple[str, PropertyType, str], ...]
    detail: str | None = None


class _Fold:
    """Readings folded per property: what an UPDATE of `properties` would write.

    good: (device, property) -> [value JSON, taken, good readings]; bad: (device, property) ->
    (quality, detail) when the last reading was not good; failed: (device, property) -> readings
    not good; last: device -> newest reading time; since: the history id its readings come after.
    """

    __slots__ = ("good", "bad", "failed", "last", "since")

    def __init__(self, since: int = 0) -> None:
        self.good: dict[tuple[str, str], list[Any]] = {}
        self.bad: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.failed: dict[tuple[str, str], int] = {}
        self.last: dict[str, int] = {}
        self.since = since

    def __bool__(self) -> bool:
        return bool(self.good or self.bad or self.last)

    def add(self, device: str, name: str, value: str | None, taken: int, quality: str, detail: str | None) -> None:
        key = (device, name)
        if quality == GOOD:
            g = self.good.get(key)
            if g is None:
                self.good[key] = [value, taken, 1]
            else:
                g[0] = value
                g[1] = taken
                g[2] += 1
            if self.bad:
                self.bad.pop(key, None)
        else:
            self.bad[key] = (quality, detail)
            self.failed[key] = self.failed.get(key, 0) + 1
        if self.last.get(device, 0) < taken:
            self.last[device] = taken


TWIN_FILE_MODE = 0o600
TWIN_DIR_MODE = 0o700  # a directory the twin's opening makes (the systemd unit's StateDirectory is 0750)


class OlderTwin(TwinError):
    """The twin file is an older mapper's (its schema version is behind this code's), and what was
    asked of it needs the schema this code migrates it to: only `mapper run` migrates a twin."""

    def __init__(self, path: Path, found: int, what: str) -> None:
        self.found = found
        super().__init__(
            f"the twin {path} is from an older mapper (schema version {found}; this mapper's is"
            f" {len(migrations.MIGRATIONS)}): {what}. The next `mapper run` (`sudo systemctl restart mapper` for the"
            " service) migrates it; to be able to go back to the older mapper, stop it and copy the twin aside"
            " first (docs/raspberry-pi.md, upgrading)")


class NewerTwin(TwinError):
    """The twin file is a newer mapper's (its schema version is beyond this code's): nothing here
    can read or write it."""

    def __init__(self, path: Path, found: int) -> None:
        self.found = found
        super().__init__(
            f"the twin {path} is from a newer mapper (schema version {found}; this mapper's is"
            f" {len(migrations.MIGRATIONS)}): this mapper cannot use it. Upgrade the mapper again, or, to go back"
            " to this one, stop it and put back the copy of the twin made before the upgrade (docs/raspberry-pi.md,"
            " upgrading)")


def missing_schema(exc: sqlite3.Error) -> bool:
    """An error of a statement that needs a table or column a later migration adds."""
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(("no such table", "no such column"))


class ForeignTwin(TwinError):
    """The twin file, its -wal or -shm file or its directory could be written by another local user."""


def _who(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _writable_by_others(st: os.stat_result, euid: int) -> bool:
    """Writable by every user, or by a group other than this user's private one (Debian and Ubuntu
    give each user a group of its own, and a umask of 002 makes directories group-writable there:
    `mkdir` in a checkout gives 0775, and only this user is in that group)."""
    if st.st_mode & 0o002:
        return True
    return bool(st.st_mode & 0o020) and not _private_group(st.st_gid, euid)


def _private_group(gid: int, uid: int) -> bool:
    """Whether `gid` is `uid`'s user private group: its primary group, no member listed but it, and
    the primary group of no other user."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid)
        if user.pw_gid != gid or any(name != user.pw_name for name in grp.getgrgid(gid).gr_mem):
            return False
    except KeyError:
        return False
    return all(other.pw_gid != gid or other.pw_uid == uid for other in pwd.getpwall())


def _group(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _described(path: Path, st: os.stat_result) -> str:
    return f"{path} is {_who(st.st_uid)}:{_group(st.st_gid)} {stat.S_IMODE(st.st_mode):04o}"


def described(path: Path) -> str:
    """`PATH is owner:group mode`, as the refusals of a twin say a file."""
    return _described(path, os.stat(path))


def check_owned(path: Path, uid: int | None = None) -> None:
    """Refuse (ForeignTwin) a twin that a local user other than this process's (or `uid`'s: the user
    a service runs as, checked by root) could write.

    What is in the twin is what `mapper run` acts on: it publishes the outbox's rows with its
    broker login and applies the desired values to the devices. A user who can write the file (or
    its -wal or -shm file, whose pages SQLite takes as the database's) could queue any message,
    to any topic, for the mapper to publish, or switch a relay. So, for `mapper run`:

    - the database file and its -wal and -shm files (and a rollback -journal, which SQLite would
      play back), where they exist, must be regular files owned by the effective uid, writable
      by their owner only, or its user private group (a -wal or -shm that is a link is refused);
    - their directory must be owned by the effective uid or root and writable by its owner only
      (or that user's private group: `_private_group`).
      Not even a sticky one (/tmp): there another user cannot replace our files, but can create
      the names SQLite opens next, `<twin>-wal` and `<twin>-shm`, before the mapper does.
    - a twin.path that is a symbolic link (the twin moved to another disk) is followed, as SQLite
      follows it (its -wal and -shm are beside the real file): the link's directory passes the
      directory rule (so only this user or root made the link), and the real file the rules above.

    The commands that only read the twin, or set a desired value in it (`mapper twin get`, `mapper
    devices`...), do not check: they publish nothing and drive no device, and root reads the
    service's twin (owned by `mapper`, 0600) with them. The directory is not made here (one that is
    not there, or cannot be looked at, is left to the open, which reports it)."""
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    euid = os.geteuid() if uid is None else uid
    if real != given:
        _check_twin_directory(path, given.parent, euid)
    _check_twin_directory(path, real.parent, euid)
    for name in (real, Path(f"{real}-wal"), Path(f"{real}-shm"), Path(f"{real}-journal")):
        _check_twin_file(path, name, euid)


def _check_twin_directory(path: Path, directory: Path, euid: int) -> None:
    try:
        st = os.stat(directory)
    except OSError:  # not there (not made yet), or not reachable: nothing in it can be opened either
        return
    if st.st_uid not in (euid, 0) or _writable_by_others(st, euid):
        if st.st_mode & 0o002:
            who = "every user can create files in it"
            if st.st_mode & stat.S_ISVTX:
                who += (" (its sticky bit keeps them from replacing the twin, not from creating its -wal and -shm"
                        " files before the mapper does)")
        elif st.st_mode & 0o020:
            who = f"the users of group {_group(st.st_gid)} can create and replace files in it"
        else:
            who = f"{_who(st.st_uid)} can create and replace files in it"
        # A sticky directory every user may write (/tmp, /var/tmp) is shared by design: `chmod go-w`
        # on it would break every other program that uses it.
        own = ("" if st.st_mode & stat.S_ISVTX and st.st_mode & 0o002
               else f", or `chmod go-w {directory}` if it is {_who(euid)}'s own")
        raise ForeignTwin(
            f"refusing the twin {path}: {_described(directory, st)}: {who}. A database (or -wal file) put there"
            f" would be what the mapper publishes from, with its broker login. Keep the twin in a"
            f" directory only {_who(euid)} can write (the service's is /var/lib/mapper; for a run by hand:"
            f" `mkdir -m 700` one and name it in twin.path{own})")


def _check_twin_file(path: Path, name: Path, euid: int) -> None:
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return
    real = name.with_name(name.name.removesuffix("-wal").removesuffix("-shm").removesuffix("-journal"))
    rm = f"rm {real} {real}-wal {real}-shm"
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ForeignTwin(f"refusing the twin {path}: {name} is {kind}; remove it ({rm}): the mapper"
                          " creates its twin files itself")
    if st.st_uid != euid:
        raise ForeignTwin(
            f"refusing the twin {path}: {_described(name, st)}, not {_who(euid)}'s, who runs this mapper: its"
            f" owner could queue messages the mapper would publish with its broker login, or desired values it"
            f" would apply. If the file is meant for {_who(euid)}: `chown {_who(euid)} {name} && chmod 600 {name}`;"
            f" otherwise remove it ({rm}), or run the mapper as {_who(st.st_uid)} or on a twin of its own"
            f" (twin.path, MAPPER_TWIN__PATH)")
    if _writable_by_others(st, euid):
        others = "every user" if st.st_mode & 0o002 else f"group {_group(st.st_gid)}"
        raise ForeignTwin(
            f"refusing the twin {path}: {_described(name, st)}, writable by {others}, who could queue"
            f" messages the mapper would publish with its broker login, or desired values it would apply:"
            f" `chmod 600 {name}` (or remove it: {rm})")


def create_private(path: Path) -> None:
    """Create the twin file, if it does not exist yet, readable and writable by its owner only.

    SQLite would create it under the process's umask (0644 with the usual 022): every local user
    could read the readings, the desired values and the outbox. SQLite gives the -wal and -shm
    files the mode of the database file, so they stay private too. An existing file keeps its mode
    (a deployment may share it on purpose, readable by a group; under systemd its directory is
    0750); `check_owned` refuses one that others can write."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     TWIN_FILE_MODE)
    except OSError:  # it exists; or it cannot be made, which sqlite3.connect then reports with the usual hints
        return
    os.close(fd)


def write_private(path: Path, text: str) -> None:
    """Write `path` atomically (a crash leaves the old file or the new one, never half of one),
    readable and writable by its owner only whatever the umask, also when it replaces one that was
    not. fchmod too: a .tmp a crash left behind keeps its mode through O_TRUNC."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), TWIN_FILE_MODE)
    os.fchmod(fd, TWIN_FILE_MODE)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TwinStore:
    def __init__(self, conn: sqlite3.Connection, path: Path, limits: OutboxLimits) -> None:
        self.conn = conn
        self.path = path
        self.schema_version = len(migrations.MIGRATIONS)  # the file's (see open(): `migrate`)
        self.limits = limits
        self._seq: dict[str, int] = {}
        self._seq_undo: dict[str, int | None] = {}  # seqs before the open transaction touched them: carried
        self._seq_undo_table: dict[str, int | None] = {}  # ... and outbox-table messages' (saved as they go)
        self._seq_unsaved: set[str] = set()  # topics whose last seq is only in history rows
        self._seqs_saving: dict[str, int] = {}  # what the open transaction writes to topic_seq
        self._route_undo: list[tuple[str, int, bool]] = []  # routes added by the open transaction
        self._outbox_rows = 0  # the outbox table's
        self._outbox_bytes = 0
        # Retained `state` rows in the outbox table not yet acknowledged (see _supersede): id ->
        # (topic, payload size), and topic -> those ids (one per topic, but for rows an older
        # version left, or queued by another process). Read at open(), and again after a
        # rollback of a transaction that changed them (`_tx_retained`).
        self._retained: dict[int, tuple[str, int]] = {}
        self._retained_ids: dict[str, list[int]] = {}
        self._tx_retained = False
        self._next_id = 1  # of history and outbox rows alike
        self._reserved = 0  # ids up to this one may have been used: never hand them out again
        self._tx_first_id = 1  # ids from this one on were handed out in the open transaction
        self._statements: dict[tuple[str, int], str] = {}
        self._synchronous = "FULL"
        # Routes of telemetry carried in history rows: (topic, qos, retain, fields) <-> id, where
        # fields is the payload between ts and seq (b',"unit":"C"'), and the fields of each
        # message body seen, by identity (the telemetry factory shares one body per route).
        self._route_ids: dict[tuple[str, int, bool, bytes], int] = {}
        self._routes: dict[int, tuple[str, int, bool, bytes]] = {}
        self._route_cache: dict[int, tuple[Any, ...]] = {}  # see _route_for
        # History rows whose telemetry is not yet acknowledged: ids in order (acknowledged ones
        # leave `_carried_size` at once, the deque from its front), and their payload sizes.
        self._carried: deque[int] = deque()
        self._carried_size: dict[int, int] = {}
        self._carried_bytes = 0
        self._published_through = 0  # every carried message up to this history id is done
        self._tx_dropped: list[tuple[int, int]] = []  # (id, size) of carried messages dropped by this transaction
        self._published_saved = 0    # ... as saved in counters
        # Telemetry the outbox limits dropped in the open transaction (carried and table rows), and
        # which limits were over ("rows", "bytes"): told to `on_outbox_dropped` once it commits.
        self._tx_limit_dropped = 0
        self._tx_limits_hit: set[str] = set()
        # Called (in the thread that commits) after each commit whose transaction dropped telemetry
        # for the outbox limits: (how many, the limits that were over: "rows" and/or "bytes"). The
        # running mapper logs them (mapper.service); the count is in counters('outbox_dropped').
        self.on_outbox_dropped: Callable[[int, frozenset[str]], None] | None = None
        # Readings not yet folded into `properties`, the open transaction's included (None until
        # read back from the history, see _load_fold; after a rollback it is read back again).
        self._fold: _Fold | None = None
        # Ids of the derived devices (protocol `derived`), for report_derived: read once, then again
        # after sync_devices or sync_derived (the only writers of a device's protocol) or a rollback.
        self._derived_ids: set[str] | None = None
        self._tx_checkpointed = False
        self._last_checkpoint_ms: int | None = None  # monotonic_ms() of the last fold (None: none yet)
        # The history's age is judged on the wall clock as it was when the twin was opened plus
        # the time elapsed since on the monotonic clock, when that is earlier than the wall clock
        # (see _age_clock_ms): a wall clock that jumps forward does not age the history at once.
        # (Monotonic first: the elapsed time read later is then never behind the wall clock.)
        self._opened_mono_ns = time.monotonic_ns()
        self._opened_wall_ns = time.time_ns()
        self._clock_ahead_told = False
        # The age rule's work in the current prune pass (calls of prune_history while they return
        # `step`): readings it deleted, and the oldest one's time; and its limit in the last pass.
        self._age_pass_deleted = 0
        self._age_pass_oldest: int | None = None
        self._age_last_cutoff: int | None = None
        self._history_count: int | None = None  # rows in history, once counted (prune_history)
        # Rows per property ((device id, property) -> [rows, an id at or before its oldest row]),
        # for the count rule's fair shares: counted with one GROUP BY (prune_history), then kept
        # up to date from the folds (a fold counts its readings per property anyway) and the
        # prunes, never per reading.
        self._prop_rows: dict[tuple[str, str], list[int]] | None = None
        self._tx_folds: list[_Fold] = []  # folds the open transaction checkpointed
        self._tx_history = 0  # rows the open transaction added to history

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        outbox: OutboxLimits | None = None,
        check_same_thread: bool = True,
        busy_timeout_s: float = 30.0,
        owned: bool = True,
        migrate: bool = True,
        read_only: bool = False,
    ) -> TwinStore:
        """Open (creating and migrating) the twin file.

        `owned`: refuse a twin another local user could write (`check_owned`), as `mapper run` must.
        False for the commands that read it or set a desired value (root reading the service's twin).

        `migrate`: False for the commands other than `mapper run`. Upgraded before the service is
        restarted, they would migrate the file under the older mapper still running on it, which
        then no longer starts on it, and the copy to go back to would be made too late.
        `schema_version` is the file's then, perhaps older than this code's: a read that needs what
        a migration adds raises OlderTwin. `read_only`: an existing file, not migrated, and no
        statement may write to it (PRAGMA query_only)."""
        path = Path(path)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"twin.synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        migrate = migrate and not read_only
        if not read_only:
            path.parent.mkdir(mode=TWIN_DIR_MODE, parents=True, exist_ok=True)
        if owned:
            check_owned(path)
        if not read_only:
            create_private(path)
        conn = None
        found = len(migrations.MIGRATIONS)
        try:
            if read_only:
                conn = connect_to_read(path, timeout=busy_timeout_s, check_same_thread=check_same_thread)
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread,
                                       timeout=busy_timeout_s)
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            conn.execute("PRAGMA foreign_keys=ON")
            found = migrations.apply(conn) if migrate else migrations.version(conn)
            store = cls(conn, path, outbox or OutboxLimits())
            store.schema_version = found
            store._synchronous = synchronous.upper()
            conn.execute("BEGIN")  # one snapshot: a process recording meanwhile adds routes and rows
            try:
                store._load_state()
            finally:
                conn.execute("COMMIT")
        except migrations.NewerSchema as exc:
            if conn is not None:
                conn.close()
            raise NewerTwin(path, exc.found) from None
        except sqlite3.OperationalError as exc:
            if found < len(migrations.MIGRATIONS) and missing_schema(exc):
                conn.close()
                raise OlderTwin(path, found, "this command cannot read it before it is migrated") from exc
            if conn is not None:
                conn.close()
            raise cannot_open(path, exc) from exc
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if (unusable := unusable_twin(path, exc)) is not None:
                raise unusable from exc
            raise
        return store

    def _load_state(self) -> None:
        """Seqs, routes, outbox counts, the messages waiting in history rows and the next id, as
        committed (open())."""
        store, conn = self, self.conn
        store._seq = committed_seqs(conn)
        # Seqs found only in history rows (after a crash) must reach topic_seq before those rows go.
        saved = dict(conn.execute("SELECT topic, seq FROM topic_seq"))
        store._seq_unsaved = {t for t, seq in store._seq.items() if seq > saved.get(t, 0)}
        for route_id, topic, qos, retain, fields in conn.execute("SELECT id, topic, qos, retain, fields FROM routes"):
            route = (topic, qos, bool(retain), fields.encode())
            store._routes[route_id] = route
            store._route_ids[route] = route_id
        store._count_outbox_table()
        store._load_retained()
        store._published_through = store._published_saved = _counter(conn, "published_through")
        for row_id, route_id, value, ts, seq in conn.execute(
                "SELECT id, route, value, ts, seq FROM readings WHERE id > ? AND seq IS NOT NULL ORDER BY id",
                (store._published_through,)):
            size = len(_carried_payload(value, ts, store._routes[route_id][3], seq))
            store._carried.append(row_id)
            store._carried_size[row_id] = size
            store._carried_bytes += size
        store._reserved = _counter(conn, "outbox_id_reserved")
        top = max(conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0],
                  conn.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0])
        store._next_id = max(store._reserved, top) + 1

    def _count_outbox_table(self) -> None:
        rows, size = self.conn.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        self._outbox_rows, self._outbox_bytes = rows, size

    def _load_retained(self) -> None:
        """The retained `state` rows waiting in the outbox table, as committed (see _supersede)."""
        retained: dict[int, tuple[str, int]] = {}
        by_topic: dict[str, list[int]] = {}
        for row_id, topic, size in self.conn.execute(
                "SELECT id, topic, length(payload) FROM outbox WHERE kind='state' AND retain=1 ORDER BY id"):
            retained[row_id] = (topic, size)
            by_topic.setdefault(topic, []).append(row_id)
        self._retained, self._retained_ids = retained, by_topic
        self._tx_retained = False

    def _insert_rows(self, head: str, width: int, flat: list[Any], tail: str = "") -> None:
        """`head` VALUES (row), (row), ... `tail`, for rows given as one flat list of `width` values each."""
        n = len(flat) // width
        done = 0
        texts = self._statements
        execute = self.conn.execute
        for size in _CHUNKS:
            if size * width > _MAX_VARIABLES and size > 1:
                continue
            while n - done >= size:
                sql = texts.get((head, size))
                if sql is None:
                    row = "(" + ",".join("?" * width) + ")"
                    sql = texts[(head, size)] = f"{head} VALUES {','.join([row] * size)}{tail}"
                execute(sql, flat[done * width:(done + size) * width])
                done += size

    def _set_counter(self, name: str, value: int) -> None:
        self.conn.execute("INSERT INTO counters (name, value) VALUES (?, ?)"
                          " ON CONFLICT (name) DO UPDATE SET value=excluded.value", (name, value))

    def close(self) -> None:
        """Fold the history into `properties` and save the seqs (so that the next open has
        nothing to recover), then close. Skipped when it cannot be written: nothing is lost,
        the next open recovers it from the history."""
        try:
            # Only a store that recorded readings holds a fold (a reader's would fold the recording
            # process's readings a second time) and unsaved seqs.
            if self._fold is not None and (self._fold or self._seq_unsaved):
                self._begin()
                try:
                    self._checkpoint()
                    self._save_seqs()
                except BaseException:
                    self._rollback()
                    raise
                self._commit()
        except sqlite3.Error:
            pass
        finally:
            self.conn.close()

    def __enter__(self) -> TwinStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------

    def take_write_lock(self) -> None:
        """Take the write lock and let it go at once: waits the busy timeout for another process's
        lock, then raises "database is locked" as a write would (a reload waits for it before it
        stops a device)."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self._tx_first_id = self._next_id
        self._seq_undo = {}
        self._seq_undo_table = {}
        self._route_undo = []
        self._tx_dropped = []
        self._tx_limit_dropped = 0
        self._tx_limits_hit = set()
        self._tx_checkpointed = False
        self._tx_history = 0
        self._tx_retained = False
        self._tx_folds = []

    def _commit(self) -> None:
        try:
            if self._fold and not self._tx_checkpointed and (
                    self._last_checkpoint_ms is None or monotonic_ms() - self._last_checkpoint_ms >= CHECKPOINT_MS):
                self._checkpoint()
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        if self._tx_checkpointed:
            self._last_checkpoint_ms = monotonic_ms()
        self._tx_checkpointed = False
        self._tx_retained = False
        self._tx_dropped = []
        self._seq_unsaved.update(self._seq_undo)
        self._seq_undo = {}
        self._seq_undo_table = {}
        if self._history_count is not None:
            self._history_count += self._tx_history
        self._tx_history = 0
        if self._tx_folds:
            self._count_folded(self._prop_rows, self._tx_folds)
            self._tx_folds = []
        if self._seqs_saving:
            self._seq_unsaved = {t for t in self._seq_unsaved if self._seq.get(t) != self._seqs_saving.get(t)}
            self._seqs_saving = {}
        if self._tx_limit_dropped:
            dropped, limits = self._tx_limit_dropped, frozenset(self._tx_limits_hit)
            self._tx_limit_dropped = 0
            self._tx_limits_hit = set()
            if self.on_outbox_dropped is not None:
                try:
                    self.on_outbox_dropped(dropped, limits)
                except Exception:  # noqa: BLE001 - committed: the caller must not take it for a failed commit
                    log.exception("on_outbox_dropped failed")

    def _rollback(self) -> None:
        """Undo the transaction, and what it changed in memory: seqs, carried messages, counts."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        for undo in (self._seq_undo_table, self._seq_undo):  # a topic in both: the carried one has the older value
            for topic, seq in undo.items():
                if seq is None:
                    self._seq.pop(topic, None)
                else:
                    self._seq[topic] = seq
        self._seq_undo = {}
        self._seq_undo_table = {}
        self._seqs_saving = {}
        for route in self._route_undo:
            self._routes.pop(self._route_ids.pop(route), None)
        if self._route_undo:
            self._route_cache.clear()
        self._route_undo = []
        carried, sizes = self._carried, self._carried_size
        while carried and carried[-1] >= self._tx_first_id:
            self._carried_bytes -= sizes.pop(carried.pop(), 0)
        # Carried messages dropped by the limits come back (the drop and its count are undone);
        # they were the oldest, so they go back in front, in order.
        dropped = [(i, size) for i, size in self._tx_dropped if i < self._tx_first_id]
        carried.extendleft(i for i, _ in reversed(dropped))
        for i, size in dropped:
            sizes[i] = size
            self._carried_bytes += size
        self._tx_dropped = []
        self._tx_limit_dropped = 0  # not dropped after all: undone with the transaction
        self._tx_limits_hit = set()
        if self._tx_history or self._tx_checkpointed:
            self._fold = None  # it holds rolled-back readings: read it back from what was committed
        self._tx_checkpointed = False
        self._tx_history = 0
        self._tx_folds = []  # (the fold is read back from history, with their readings)
        self._derived_ids = None
        self._count_outbox_table()
        if self._tx_retained:  # rows it superseded or acknowledged are back, the ones it queued gone
            self._load_retained()
        # Ids handed out in the failed transaction are simply skipped (_next_id only grows).
        self._reserved = _counter(self.conn, "outbox_id_reserved")
        # The cursor in memory may have moved past messages now back in the queue: the saved one
        # did not (_save_published moves it up again from the queue's front).
        self._published_through = self._published_saved = _counter(self.conn, "published_through")

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

    # -- the fold of history into properties ----------------------------------------------

    def _load_fold(self) -> _Fold:
        """The committed readings not yet in `properties`, read back from history once (after a
        crash they are in the history only). Read lazily, by the store that records: a CLI
        process that only looks never takes over the fold."""
        if self._fold is None:
            fold = _Fold(_counter(self.conn, "folded_through"))
            for device, name, value, taken, quality, detail in self.conn.execute(
                    "SELECT device_id, property, value, ts, quality, detail FROM readings WHERE id > ? ORDER BY id",
                    (fold.since,)):
                fold.add(device, name, value, taken, quality, detail)
            self._fold = fold
        return self._fold

    def _checkpoint(self) -> None:
        """Inside a transaction: write every reading so far into `properties` and `devices`."""
        fold = self._load_fold()
        execmany = self.conn.executemany
        good, bad = fold.good, fold.bad
        if good:
            # An apply error of a value the device was done with (the read-back differed: a relay
            # that settles after the read-back gave up) goes once a later good reading equals the
            # desired value: the error would stay next to `reported == desired` until the next
            # set. Per property folded (once per CHECKPOINT_MS), never per reading. A value still
            # pending (its write failed, it is written again) keeps its error until it is applied.
            execmany(
                "UPDATE properties SET reported=?1, reported_version=reported_version+?2, reported_ts=?3,"
                " quality=?4, quality_detail=?5, apply_error=CASE WHEN apply_error IS NULL OR desired IS NOT ?1"
                " OR applied_version < desired_version THEN apply_error END WHERE device_id=?6 AND name=?7",
                [(g[0], g[2], g[1], *bad.get(key, _GOOD_QUALITY), *key) for key, g in good.items()],
            )
        if bad:
            execmany(
                "UPDATE properties SET quality=?, quality_detail=? WHERE device_id=? AND name=?",
                [(*q, *key) for key, q in bad.items() if key not in good],
            )
        if fold.last:
            execmany(
                "UPDATE devices SET last_reading_ts=max(coalesce(last_reading_ts, 0), ?) WHERE id=?",
                [(t, k) for k, t in fold.last.items()],
            )
        self._set_counter("folded_through", self._next_id - 1)
        if self._prop_rows is not None:
            self._tx_folds.append(fold)  # its rows per property, counted once committed
        self._fold = _Fold(self._next_id - 1)  # readings from here on (a rollback reads them back from history)
        self._tx_checkpointed = True

    def _save_seqs(self) -> None:
        """Inside a transaction: the seqs kept only in history rows go to `topic_seq` (before
        those rows may be pruned)."""
        topics = sorted(self._seq_unsaved.union(self._seq_undo))
        if not topics:
            return
        self._insert_rows("INSERT INTO topic_seq (topic, seq)", 2, [x for t in topics for x in (t, self._seq[t])],
                          " ON CONFLICT (topic) DO UPDATE SET seq=max(seq, excluded.seq)")
        self._set_counter("seq_saved_through", self._next_id - 1)
        self._seqs_saving = {t: self._seq[t] for t in topics}  # no longer unsaved once committed

    # -- devices ---------------------------------------------------------------------------

    def sync_devices(self, definitions: Iterable[DeviceDefinition]) -> list[DeviceId]:
        """Register devices and properties; keep stored values. Returns devices whose spec changed.

        A property no longer in a device's definition is removed from the twin (not from the history).

        A property's `desired:` from its definition (the YAML file, or edgecore's Device) becomes
        the twin's desired value when the device or the property is new, when the device id's
        origin changed (below), or when that `desired:` itself differs from the one the twin
        took up last (properties.file_desired: kept across restarts). Not when anything else
        about the device or its model changed: a value the operator set later (`mapper twin
        set`, MQTT, the twin protocol) stays until the file's own desired value changes. Before,
        any change of the definition's fingerprint (a model's description) applied the file's
        value again over the operator's. A row from before file_desired was kept (NULL) records
        the file's value without applying it, unless the twin has no desired value (logged when
        the definition changed since the last run and the file's value differs from the twin's).

        When the origin of a device id changes (DeviceDefinition.origin: the operator's local
        YAML <-> an edgecore Device of the same namespace/name), its stored desired values are
        dropped (a new version each, so nothing stale is applied; the new definition's own
        `desired` is then set): whoever set them for one origin's device must not decide what
        the other's is driven to. Logged once, at the change. An inactive row whose origin was
        never recorded (a twin file from before m006) counts as a change too (origin_changes).
        """
        self._derived_ids = None  # a device of the files may take a derived device's name
        changed = []
        said: list[str] = []  # logged once committed
        self._begin()
        try:
            for d in definitions:
                key = str(d.id)
                row = self.conn.execute("SELECT fingerprint, origin, active FROM devices WHERE id=?", (key,)).fetchone()
                fingerprint, origin = d.fingerprint, d.origin
                if row is None:
                    self.conn.execute(
                        "INSERT INTO devices (id, namespace, name, model, protocol, fingerprint, origin)"
                        " VALUES (?,?,?,?,?,?,?)",
                        (key, d.id.namespace, d.id.name, d.model_name, d.protocol, fingerprint, origin),
                    )
                else:
                    self.conn.execute(
                        "UPDATE devices SET model=?, protocol=?, fingerprint=?, origin=?, active=1 WHERE id=?",
                        (d.model_name, d.protocol, fingerprint, origin, key),
                    )
                new_origin = origin_changes(None if row is None else (row[1], bool(row[2])), origin)
                if new_origin:
                    said.extend(self._drop_desired(d, row[1]))
                is_changed = row is None or row[0] != fingerprint or new_origin
                if is_changed:
                    changed.append(d.id)
                for p in d.properties:
                    before = self.conn.execute(
                        "SELECT type, writable, desired, file_desired FROM properties WHERE device_id=? AND name=?",
                        (key, p.name)).fetchone()
                    self.conn.execute(
                        "INSERT INTO properties (device_id, name, type, writable, unit) VALUES (?,?,?,?,?)"
                        " ON CONFLICT (device_id, name) DO UPDATE SET type=excluded.type,"
                        " writable=excluded.writable, unit=excluded.unit",
                        (key, p.name, p.type.value, int(p.writable), p.unit),
                    )
                    # A changed definition (a new type, access mode or range) may no longer take the
                    # stored desired value (the operator's, kept over the file's): cleared then.
                    cleared = before is not None and before[2] is not None and (is_changed or (
                        before[0], bool(before[1])) != (p.type.value, p.writable)) and not self._keep_desired_if_valid(
                        d.id, p, _load(before[2]))
                    file_desired = _file_desired(p)
                    if row is None or new_origin or before is None or cleared:
                        # A new device or property, the other origin's values dropped, or the stored
                        # value that stood for the file's cleared: the file's (if it gives one).
                        take = True
                    elif before[3] is None:  # recorded before m007: what the file said is not known
                        take = self._file_desired_unknown(d, p, row[0] != fingerprint, said)
                    else:
                        take = before[3] != file_desired  # the file's own desired value changed
                    if take and p.desired is not None and p.writable:
                        self._set_desired(d.id, p.name, p.desired, now_ms())
                    if before is None or before[3] != file_desired:
                        self.conn.execute("UPDATE properties SET file_desired=? WHERE device_id=? AND name=?",
                                          (file_desired, key, p.name))
                # A property the definition no longer has leaves the twin (its readings stay in
                # the history): kept, it showed its last value as current, quality good, for good.
                names = [p.name for p in d.properties]
                self.conn.execute(
                    f"DELETE FROM properties WHERE device_id=? AND name NOT IN ({','.join('?' * len(names))})",
                    (key, *names))
        except BaseException:
            self._rollback()
            raise
        self._commit()
        for message in said:
            log.warning("%s", message)
        return changed

    def _file_desired_unknown(self, d: DeviceDefinition, p: Any, edited: bool, said: list[str]) -> bool:
        """Inside sync_devices: a property row from before file_desired was kept (m007), so what
        its file said last is not known. Its `desired:` is applied only when the twin has no
        desired value; one that differs from the twin's stays unapplied (it may be the value
        the operator set over it). When the definition changed since the last run (`edited`:
        its fingerprint differs), the file's value may be new: that is said once in the log
        (appended to `said`). Unchanged, the file says what it said then."""
        if p.desired is None or not p.writable:
            return False
        row = self.conn.execute("SELECT desired FROM properties WHERE device_id=? AND name=?",
                                (str(d.id), p.name)).fetchone()
        twin = None if row is None else _load(row[0])
        if twin is None:
            return True
        if edited and (twin != p.desired or type(twin) is not type(p.desired)):
            said.append(f"device {d.id} property {p.name!r}: the twin file is from before the mapper kept the"
                        f" desired value of each device file, so it cannot tell whether {d.source}'s desired value"
                        f" {shown(p.desired)} is new; it is recorded, not applied, and the twin's desired value"
                        f" {shown(twin)} stays (edit the file's desired value or use `mapper twin set` to change it)")
        return False

    def recorded_origin(self, device_id: DeviceId) -> tuple[str | None, bool] | None:
        """(origin, active) of a device id's twin row (origin None: a row from before m006); None
        when the twin has no such device. What sync_devices compares a definition's origin with
        (origin_changes)."""
        row = self.conn.execute("SELECT origin, active FROM devices WHERE id=?", (str(device_id),)).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def loaded_fingerprint(self, device_id: DeviceId) -> str | None:
        """The fingerprint (DeviceDefinition.fingerprint) of the definition the mapper last synced
        for an active device id; None when the twin has no such device or it is inactive. A running
        mapper synced what it runs, at its start or last reload: `mapper twin set` compares it with
        the device files to tell whether they changed since."""
        row = self.conn.execute("SELECT fingerprint FROM devices WHERE id=? AND active=1",
                                (str(device_id),)).fetchone()
        return None if row is None else row[0]

    def _drop_desired(self, d: DeviceDefinition, was: str | None) -> list[str]:
        """Inside sync_devices: the device id's origin changed from `was` (None: not known, an
        inactive row from before m006) to d.origin. Every
        stored desired value of it goes (a new version, its apply error too). Returns what to log."""
        key = str(d.id)
        dropped = [(n, _load(v)) for n, v in self.conn.execute(
            "SELECT name, desired FROM properties WHERE device_id=? AND desired IS NOT NULL ORDER BY name", (key,))]
        self.conn.execute(
            "UPDATE properties SET desired=NULL, desired_version=desired_version+1, desired_ts=?, apply_error=NULL"
            " WHERE device_id=? AND desired IS NOT NULL", (now_ms(), key))
        if not dropped:
            return []
        before = (_ORIGINS.get(was, was) if was is not None else
                  "the inactive device of that name, whose origin the twin does not know (recorded before it kept origins)")
        return [f"device {d.id} is now defined by {_ORIGINS.get(d.origin, d.origin)} ({d.source}), not by"
                f" {before}: the desired values set for that device are dropped, not applied"
                f" ({', '.join(f'{n}={shown(v)}' for n, v in dropped)})"]

    def _keep_desired_if_valid(self, device_id: DeviceId, p: Any, desired: Value) -> bool:
        """A property's definition changed (its type, access mode, range): its stored desired
        value stays only if the property still takes it (writable, of its type, in range); else it
        is cleared (a new version), as a ReadOnly property has none and a wrong type or a value out
        of the new range could never be applied. Kept, it was a delta for good that nothing would
        apply. Returns whether it stayed."""
        try:
            if not p.writable:
                raise ValueError("read-only")
            value = coerce(p.type, desired)
            if range_problem(value, p.minimum, p.maximum):
                raise ValueError("out of range")
        except ValueError:
            self.conn.execute(
                "UPDATE properties SET desired=NULL, desired_version=desired_version+1, desired_ts=?, apply_error=NULL"
                " WHERE device_id=? AND name=?", (now_ms(), str(device_id), p.name))
            return False
        if value != desired or type(value) is not type(desired):
            self._set_desired(device_id, p.name, value, now_ms())
        return True

    def meta(self, key: str) -> str | None:
        """What is recorded under `key` (table `meta`), if anything."""
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def swap_meta(self, key: str, value: str) -> str | None:
        """Record `value` under `key` (table `meta`); returns what was recorded before, if anything."""
        self._begin()
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            self.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
                              " value=excluded.value", (key, value))
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return None if row is None else row[0]

    def deactivate_devices(self, keep: Iterable[DeviceId]) -> None:
        """Devices not in `keep` become inactive (offline); derived devices are left to sync_derived()."""
        keep_ids = {str(k) for k in keep}
        for (key,) in self.conn.execute(
                "SELECT id FROM devices WHERE active=1 AND protocol!=?", (DERIVED_PROTOCOL,)).fetchall():
            if key not in keep_ids:
                self.conn.execute("UPDATE devices SET active=0, state='offline' WHERE id=?", (key,))

    _SET_STATE = ("UPDATE devices SET state=?, state_detail=?, state_ts=?,"
                  " last_online=CASE WHEN ? IN ('ok','online') THEN ? ELSE last_online END WHERE id=?")

    def set_state(self, device_id: DeviceId, state: str, detail: str | None = None, messages: Sequence[OutMessage] = ()) -> list[OutboxRow]:
        ts = now_ms()
        self._begin()
        try:
            cur = self.conn.execute(self._SET_STATE, (state, detail, ts, state, ts, str(device_id)))
            if cur.rowcount == 0:
                raise UnknownDevice(device_id)
            rows = self._enqueue(messages, ts)
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return rows

    def set_states(self, device_ids: Iterable[DeviceId], state: str, detail: str | None = None) -> None:
        """set_state for several devices in one transaction (a clean stop's `offline`); devices
        the twin does not know are left out."""
        ts = now_ms()
        with self.transaction():
            self.conn.executemany(self._SET_STATE, [(state, detail, ts, state, ts, str(d)) for d in device_ids])

    # -- derived devices -------------------------------------------------------------------

    def sync_derived(self, devices: Iterable[DerivedDevice]) -> list[DeviceId]:
        """Register these derived devices (active, state ok; stored values kept) and retire the
        other derived devices (inactive, offline), in one transaction.

        Returns the ids refused because an active device of the YAML has that name.
        """
        self._derived_ids = None
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
                    "INSERT INTO devices (id, namespace, name, model, protocol, fingerprint, origin, state, state_detail,"
                    " state_ts, last_online) VALUES (?,?,?,?,?,NULL,'derived','ok',?,?,?) ON CONFLICT (id) DO UPDATE SET"
                    " model=excluded.model, protocol=excluded.protocol, fingerprint=NULL, origin='derived', active=1,"
                    " state='ok',"
                    " state_detail=excluded.state_detail, state_ts=excluded.state_ts, last_online=excluded.last_online",
                    (key, d.id.namespace, d.id.name, d.model, DERIVED_PROTOCOL, d.detail, ts, ts),
                )
                for name, ptype, unit in d.properties:
                    self.conn.execute(
                        "INSERT INTO properties (device_id, name, type, writable, unit) VALUES (?,?,?,0,?)"
                        " ON CONFLICT (device_id, name) DO UPDATE SET type=excluded.type, writable=0,"
                        " unit=excluded.unit, desired=NULL, desired_ts=NULL, apply_error=NULL",
                        (key, name, ptype.value, unit),
                    )
                # Only these properties: a removed device whose name the pipeline took, or a derived
                # device of an older version, leaves no property behind (shown as current, for good).
                names = [name for name, _, _ in d.properties]
                self.conn.execute(
                    f"DELETE FROM properties WHERE device_id=? AND name NOT IN ({','.join('?' * len(names))})",
                    (key, *names))
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
        derived = self._derived_ids
        if derived is None:  # not a query a window: at one a second it cost ~15-25 us, on cold caches
            derived = self._derived_ids = {k for (k,) in self.conn.execute(
                "SELECT id FROM devices WHERE protocol=?", (DERIVED_PROTOCOL,))}
        if key not in derived:
            return False
        if newer is not None:
            # The newest value is that of the last readings not yet in `properties`, if any.
            shown = self._load_fold().good.get((key, newer))
            if shown:
                stored_text = shown[0]
            else:
                row = self.conn.execute("SELECT reported FROM properties WHERE device_id=? AND name=?",
                                        (key, newer)).fetchone()
                stored_text = row[0] if row else None
            if stored_text is not None:
                stored = _load(stored_text)
                if isinstance(stored, int | float) and stored > values[newer]:
                    return False
        taken = now_ms() if ts is None else ts
        self.record([Reading(device_id, name, value, taken) for name, value in values.items()])
        return True

    # -- the hot path ----------------------------------------------------------------------

    def record(self, readings: Sequence[Reading], messages: Sequence[OutMessage] = (),
               sent: Sequence[int] = (), *, dropped: int = 0, dropped_live: int = 0) -> list[OutboxRow]:
        """Commit a batch of readings and the messages they cause, in one transaction.

        Every reading is a history row; a telemetry message of one of these readings
        (`OutMessage.reading`) is stored in that row, the other messages in the outbox table.
        Per property the readings fold into the reported value: the last good reading is the
        reported value, `reported_version` grows by the number of good readings (as if each
        had been applied in turn), and the quality is that of the property's last reading;
        each device's `last_reading_ts` becomes the newest reading time seen. `device()` shows
        that at once; `properties` itself is written at most once per CHECKPOINT_MS (and that
        write clears the apply error of a value no longer pending once the reported value equals
        the desired one: see _checkpoint).

        Inside `transaction()` it joins that transaction (committed or rolled back with it).
        `sent`: outbox rows the broker acknowledged meanwhile, done in the same transaction
        (one commit a second instead of two on a quiet Pi). `dropped`: readings the recorder
        dropped before they could be recorded (the twin could not be written for long), added
        to counters('readings_dropped') in the same transaction; `dropped_live` those of them whose
        telemetry had gone out live (mapper.recorder), to counters('readings_dropped_live').

        Returns the messages to publish, in id order, once the transaction is committed.
        """
        ts = now_ms()
        carried: list[OutMessage] = []  # in the order of their readings (as the telemetry factory makes them)
        others: list[OutMessage] = []
        for m in messages:
            if m.reading is None:
                others.append(m)
            elif m.kind == "telemetry" and m.sequenced and isinstance(m.body, dict):
                carried.append(m)
            else:
                others.append(_expanded(m))
        joined = self.conn.in_transaction
        if not joined:
            self._begin()
        try:
            self._load_fold()
            rows = self._record(readings, carried, others) if readings else []
            if carried and not readings:
                others += map(_expanded, carried)
            if sent:
                self._ack(sent)
            if dropped:
                self._bump("readings_dropped", dropped)
            if dropped_live:
                self._bump("readings_dropped_live", dropped_live)
            if others:
                rows += self._enqueue(others, ts)
            else:
                self._reserve_ids()
                if rows:
                    self._enforce_outbox_limits()
        except BaseException:
            if not joined:
                self._rollback()
            raise
        if not joined:
            self._commit()
        return rows

    def _record(self, readings: Sequence[Reading], carried: list[OutMessage], others: list[OutMessage]) -> list[OutboxRow]:
        """The history rows of a batch (with the telemetry they carry) and its fold, in the open
        transaction. Messages are matched to readings in order (as the telemetry factory makes
        them): one whose reading is not in the batch, and any left after one out of order, go
        to `others` instead, whole."""
        history: list[Any] = []  # flat: 9 values per reading
        fold = self._load_fold()
        good, bad, last, failed = fold.good, fold.bad, fold.last, fold.failed
        keys: dict[int, str] = {}  # id(DeviceId) -> str(DeviceId), once per device and batch
        dumps = orjson.dumps
        row_id = self._next_id
        out: list[OutboxRow] = []
        seqs, undo = self._seq, self._seq_undo
        queue, sizes = self._carried, self._carried_size
        new_row = tuple.__new__  # OutboxRow(...) without the Python-level __new__ per message
        routes = self._route_cache
        # Marked before the fold is touched: a failure half way makes the rollback read it back.
        self._tx_history += len(readings)
        pending = iter(carried)
        m = next(pending, None)
        batch = {id(r) for r in readings} if carried else set()
        for r in readings:
            device_id = r.device_id
            device = keys.get(id(device_id))
            if device is None:
                device = keys[id(device_id)] = str(device_id)
            value = r.value
            if value is not None:
                encoded = dumps(value)
                value = encoded.decode()
            else:
                encoded = b"null"
            taken = r.taken_at_ms
            quality = r.quality
            name = r.property
            while m is not None and m.reading is not r and id(m.reading) not in batch:
                others.append(_expanded(m))  # its reading is not in this batch
                m = next(pending, None)
            if m is None or m.reading is not r:
                history += (row_id, device, name, value, taken, quality, r.detail, None, None)
            else:
                topic = m.topic
                if topic not in undo:  # its value before the transaction (outbox rows may have moved it on)
                    undo[topic] = self._seq_undo_table.get(topic, seqs.get(topic))
                seq = seqs[topic] = seqs.get(topic, 0) + 1
                body = m.body
                route = routes.get(id(body))
                if route is None or route[0] is not body or route[1] != topic or route[2] != m.qos or route[3] != m.retain:
                    route = self._route_for(m)
                payload = b'{"value":%b,"ts":%d%b,"seq":%d}' % (encoded, taken, route[4], seq)  # = _carried_payload()
                history += (row_id, device, name, value, taken, quality, r.detail, route[5], seq)
                out.append(new_row(OutboxRow, (row_id, topic, payload, m.qos, route[3], "telemetry")))
                queue.append(row_id)
                sizes[row_id] = size = len(payload)
                self._carried_bytes += size
                m = next(pending, None)
            row_id += 1
            # _Fold.add, inlined: a method call per reading is measurable here.
            if last.get(device, 0) < taken:
                last[device] = taken
            key = (device, name)
            if quality == GOOD:
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
                bad[key] = (quality, r.detail)
                failed[key] = failed.get(key, 0) + 1
        while m is not None:  # out of order: sent as messages of their own
            others.append(_expanded(m))
            m = next(pending, None)
        self._insert_rows("INSERT INTO readings (id, device_id, property, value, ts, quality, detail, route, seq)",
                          9, history)
        self._next_id = row_id
        return out

    def _route_for(self, m: OutMessage) -> tuple[Any, ...]:
        """(body, topic, qos, retain, fields, route id) of a carried message; remembered by the
        body's identity (the telemetry factory shares one body per route)."""
        encoded = orjson.dumps(m.body)[1:-1]
        fields = b"," + encoded if encoded else b""
        retain = bool(m.retain)
        key = (m.topic, m.qos, retain, fields)
        route_id = self._route_ids.get(key) or self._new_route(key)
        if len(self._route_cache) > 10_000:  # bodies built per message, not shared: do not keep them all
            self._route_cache.clear()
        route = self._route_cache[id(m.body)] = (m.body, m.topic, m.qos, retain, fields, route_id)
        return route

    def _new_route(self, route: tuple[str, int, bool, bytes]) -> int:
        topic, qos, retain, fields = route
        route_id = self.conn.execute("INSERT INTO routes (topic, qos, retain, fields) VALUES (?,?,?,?)",
                                     (topic, qos, int(retain), fields.decode())).lastrowid
        self._route_ids[route] = route_id
        self._routes[route_id] = route
        # A rolled-back route is simply inserted again: forget it with the transaction.
        self._route_undo.append(route)
        self._route_cache.clear()
        return route_id

    def _enqueue(self, messages: Sequence[OutMessage], ts: int) -> list[OutboxRow]:
        if not messages:
            return []
        params: list[Any] = []  # flat: 7 values per row
        rows = []
        seq_updates: dict[str, int] = {}
        seqs, undo = self._seq, self._seq_undo_table
        dumps = orjson.dumps
        row_id = self._next_id
        size = 0
        new_row = tuple.__new__  # OutboxRow(...) without the Python-level __new__ per message
        latest: dict[str, tuple[int, int]] | None = None  # retained state: topic -> (id, size) of its last
        states = 0
        for m in messages:  # one encode per message, here, with its seq
            topic = m.topic
            body = m.body
            if isinstance(body, bytes):
                payload = body
            elif m.sequenced:
                if topic not in undo:
                    undo[topic] = seqs.get(topic)
                seq = seqs.get(topic, 0) + 1
                seqs[topic] = seq_updates[topic] = seq
                payload = dumps({**body, "seq": seq})
            else:
                payload = dumps(body)
            retain = bool(m.retain)
            if retain and m.kind == "state":
                if latest is None:
                    latest = {}
                latest[topic] = (row_id, len(payload))
                states += 1
            params += (row_id, topic, payload, m.qos, retain, m.kind, ts)
            rows.append(new_row(OutboxRow, (row_id, topic, payload, m.qos, retain, m.kind)))
            size += len(payload)
            row_id += 1
        if latest is not None and states > len(latest):
            # Two of one retained topic in this batch: only its last is queued.
            last = {i for i, _ in latest.values()}
            rows = [r for r in rows if r.kind != "state" or not r.retain or r.id in last]
            params = [x for r in rows for x in (*r, ts)]
            size = sum(len(r.payload) for r in rows)
        if seq_updates:
            self._insert_rows("INSERT INTO topic_seq (topic, seq)", 2, [x for item in seq_updates.items() for x in item],
                              " ON CONFLICT (topic) DO UPDATE SET seq=excluded.seq")
        self._insert_rows("INSERT INTO outbox (id, topic, payload, qos, retain, kind, created_ts)", 7, params)
        self._next_id = row_id
        self._reserve_ids()
        self._outbox_rows += len(rows)
        self._outbox_bytes += size
        if latest is not None:
            self._supersede(latest)
        self._enforce_outbox_limits()
        return rows

    def _supersede(self, latest: dict[str, tuple[int, int]]) -> None:
        """Inside a transaction: retained `state` rows just queued (topic -> (id, payload size))
        supersede the older rows of their topics still waiting in the outbox table, deleted here.

        Such a row (a device's availability, its state view) is never dropped by the outbox
        limits: in a long broker outage a device whose state changes often (flapping between
        `ok` and `unhealthy`, one availability and one state view per mqtt.state_interval_ms)
        piled them up without bound, until they alone were over twin.outbox_max_rows and every
        reading was dropped as soon as it was queued; and at the reconnect each stale one was
        published, where the broker keeps only the last of a retained topic anyway. Now each
        retained topic has about one row waiting.

        The waiting rows are known in memory (`_retained`, read at open(); acknowledged ones
        leave it in _ack): nothing per reading, and per state message a dict lookup, plus a
        delete by id when an older row of its topic is still waiting (usually none while the
        broker takes the messages as they come; one acknowledged whose delete is still to come
        is deleted here instead, its acknowledgement then finds nothing). There is no index on
        outbox.topic: a delete by topic would scan the outbox. A row deleted here may be in flight already (the
        publisher took it from memory): it is simply sent, and its acknowledgement finds no row
        (as for one the limits dropped). The superseding row has the higher id, so it is
        published after it: the broker keeps the newest. A superseded row is not counted as
        dropped (nothing is lost: a retained topic's last message is what it tells); a
        sequenced one (the state view) leaves its `seq` unused."""
        retained, by_topic = self._retained, self._retained_ids
        older: list[int] = []
        for topic, (row_id, size) in latest.items():
            ids = by_topic.get(topic)
            if ids:
                older += ids
            by_topic[topic] = [row_id]
            retained[row_id] = (topic, size)
        self._tx_retained = True
        if not older:
            return
        known = [retained.pop(i, None) for i in older]
        freed = sum(k[1] for k in known if k is not None)
        deleted = 0
        for start in range(0, len(older), 500):
            chunk = older[start:start + 500]
            deleted += self.conn.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})",
                                         chunk).rowcount
        if deleted == len(older) and None not in known:
            self._outbox_rows -= deleted
            self._outbox_bytes -= freed
        else:  # (some were gone already: another process's acknowledgement) counted again
            self._count_outbox_table()

    def _reserve_ids(self) -> None:
        if self._next_id - 1 > self._reserved:
            # Ids are never reused, not even after the outbox emptied and the mapper restarted:
            # the mark on disk moves ahead of the ids in use, once per OUTBOX_ID_BLOCK ids.
            # (One process hands out ids: the mapper. The mark only ever grows.)
            self._reserved = self._next_id - 1 + OUTBOX_ID_BLOCK
            self.conn.execute("INSERT INTO counters (name, value) VALUES ('outbox_id_reserved', ?)"
                              " ON CONFLICT (name) DO UPDATE SET value=max(value, excluded.value)", (self._reserved,))

    def _enforce_outbox_limits(self) -> None:
        """Over the limit, the oldest telemetry goes first (outbox rows and history-carried
        messages alike, by id); twin replies and state are never dropped."""
        rows = self._outbox_rows + len(self._carried_size)
        size = self._outbox_bytes + self._carried_bytes
        if rows <= self.limits.max_rows and size <= self.limits.max_bytes:
            return
        excess_rows = max(0, rows - self.limits.max_rows)
        excess_bytes = max(0, size - self.limits.max_bytes)
        queue, sizes = self._carried, self._carried_size
        table = self.conn.execute("SELECT id, length(payload) FROM outbox WHERE kind='telemetry' ORDER BY id")
        next_table = table.fetchone()
        last_table_victim = None
        freed_rows = freed_bytes = table_rows = table_bytes = 0
        while freed_rows < excess_rows or freed_bytes < excess_bytes:
            oldest = self._oldest_waiting()
            if oldest is not None and (next_table is None or oldest < next_table[0]):
                victim = queue.popleft()
                victim_size = sizes.pop(victim)
                self._carried_bytes -= victim_size
                self._published_through = max(self._published_through, victim)
                self._tx_dropped.append((victim, victim_size))  # back in the queue on a rollback
            elif next_table is not None:
                last_table_victim, victim_size = next_table
                table_rows += 1
                table_bytes += victim_size
                next_table = table.fetchone()
            else:
                break
            freed_rows += 1
            freed_bytes += victim_size
        table.close()
        if last_table_victim is not None:
            # The victims are exactly the telemetry rows up to the last one: one range delete.
            self.conn.execute("DELETE FROM outbox WHERE kind='telemetry' AND id <= ?", (last_table_victim,))
            self._outbox_rows -= table_rows
            self._outbox_bytes -= table_bytes
        if freed_rows:
            self._bump("outbox_dropped", freed_rows)
            self._save_published()
            self._tx_limit_dropped += freed_rows
            if excess_rows:
                self._tx_limits_hit.add("rows")
            if excess_bytes:
                self._tx_limits_hit.add("bytes")

    def _bump(self, name: str, by: int) -> None:
        self.conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value=value+excluded.value",
            (name, by),
        )

    # -- outbox ----------------------------------------------------------------------------

    def outbox_pending(self, after_id: int = 0, limit: int = 500) -> list[OutboxRow]:
        """Up to `limit` messages not yet acknowledged with ids above `after_id`, in id order."""
        rows = [
            OutboxRow(i, t, bytes(p), q, bool(r), k)
            for i, t, p, q, r, k in self.conn.execute(
                "SELECT id, topic, payload, qos, retain, kind FROM outbox WHERE id>? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
        ]
        sizes, routes = self._carried_size, self._routes
        carried: list[OutboxRow] = []
        start = max(after_id, self._published_through)
        while sizes and len(carried) < limit:
            page = self.conn.execute(
                "SELECT id, route, value, ts, seq FROM readings WHERE id > ? AND seq IS NOT NULL ORDER BY id LIMIT ?",
                (start, limit)).fetchall()
            for row_id, route, value, ts, seq in page:
                if row_id in sizes:  # not acknowledged (out of order) or dropped meanwhile
                    topic, qos, retain, fields = routes[route]
                    payload = _carried_payload(value, ts, fields, seq)
                    carried.append(OutboxRow(row_id, topic, payload, qos, retain, "telemetry"))
            if len(page) < limit:
                break
            start = page[-1][0]
        if not carried:
            return rows
        return sorted(rows + carried)[:limit]

    def outbox_sent(self, ids: Sequence[int]) -> None:
        """Mark messages the broker acknowledged as done.

        Committed without an fsync of its own (WAL + synchronous=NORMAL for this transaction):
        the next durable commit syncs it along, and if power fails first, the messages come
        back and are sent again, a duplicate that QoS 1 allows and `seq` reveals, never a loss.
        """
        if not ids:
            return
        relaxed = self._synchronous != "NORMAL"
        if relaxed:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self._begin()
            try:
                self._ack(ids)
            except BaseException:
                self._rollback()
                raise
            self._commit()
        finally:
            if relaxed:
                self.conn.execute(f"PRAGMA synchronous={self._synchronous}")

    def _ack(self, ids: Sequence[int]) -> None:
        """Inside a transaction: acknowledged messages are done (the caller rolls back on error).

        One carried in a history row leaves the in-memory queue, and the cursor
        counters('published_through') moves up to the oldest one still waiting; an outbox
        table row is deleted. An id that is neither (dropped by policy meanwhile) is ignored.
        Undeliverable ones among them (SentIds.refused) are counted.
        """
        refused = getattr(ids, "refused", 0)
        if refused:
            self._bump("outbox_undeliverable", refused)
        sizes = self._carried_size
        table_ids = []
        for row_id in ids:
            size = sizes.pop(row_id, None)
            if size is None:
                table_ids.append(row_id)
            else:
                self._carried_bytes -= size
        retained = self._retained
        if retained and table_ids:
            by_topic = self._retained_ids
            for row_id in table_ids:
                done = retained.pop(row_id, None)
                if done is not None:
                    self._tx_retained = True
                    waiting = by_topic.get(done[0])
                    if waiting is not None and row_id in waiting:
                        waiting.remove(row_id)
                        if not waiting:
                            del by_topic[done[0]]
        if len(table_ids) < len(ids):
            self._save_published()
        deleted_bytes = 0
        for chunk_start in range(0, len(table_ids), 500):
            chunk = table_ids[chunk_start : chunk_start + 500]
            marks = ",".join("?" * len(chunk))
            row = self.conn.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE id IN ({marks})", chunk
            ).fetchone()
            if row[0]:
                self.conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
            self._outbox_rows -= row[0]
            deleted_bytes += row[1]
        self._outbox_bytes -= deleted_bytes

    def _oldest_waiting(self) -> int | None:
        """The id of the oldest carried message still waiting (acknowledged ones leave the
        queue's front here), or None."""
        queue, sizes = self._carried, self._carried_size
        while queue and queue[0] not in sizes:
            queue.popleft()
        return queue[0] if queue else None

    def _save_published(self) -> None:
        """Move the published cursor up to just before the oldest carried message still waiting."""
        queue, sizes = self._carried, self._carried_size
        through = self._published_through
        while queue and queue[0] not in sizes:
            through = queue.popleft()
        if queue:
            through = queue[0] - 1
        self._published_through = max(through, self._published_through)
        if self._published_through > self._published_saved:
            self._set_counter("published_through", self._published_through)
            self._published_saved = self._published_through

    def readings_dropped(self) -> int:
        """Readings the mapper dropped before it could record them: more were waiting for a
        commit than twin.waiting_max_readings while the twin could not be written."""
        return _counter(self.conn, "readings_dropped")

    def losses(self) -> dict[str, int]:
        """What was lost since the twin was created, as committed: readings dropped before they
        could be recorded (twin.waiting_max_readings), telemetry dropped by the outbox limits, and
        outbox messages dropped as undeliverable (refused by the broker, or over its packet limit)."""
        return {"readings_dropped": _counter(self.conn, "readings_dropped"),
                "readings_dropped_live": _counter(self.conn, "readings_dropped_live"),
                "outbox_dropped": _counter(self.conn, "outbox_dropped"),
                "outbox_undeliverable": _counter(self.conn, "outbox_undeliverable")}

    def outbox_stats(self) -> dict[str, int]:
        """Messages still to publish (outbox rows and telemetry in history rows), their bytes, and
        how many were dropped by policy. As this store sees them: another process's store counts
        what it found at open()."""
        return {"depth": self._outbox_rows + len(self._carried_size), "bytes": self._outbox_bytes + self._carried_bytes,
                "dropped": _counter(self.conn, "outbox_dropped")}

    # -- desired values --------------------------------------------------------------------

    def set_desired(
        self, device_id: DeviceId, name: str, raw: Any, *, expected_version: int | None = None,
        messages: Sequence[OutMessage] = (), ts: int | None = None, applied: bool = False,
    ) -> tuple[Value, int]:
        """Validate and store a desired value; returns (typed value, new version).

        `ts`: its desired_ts (ms), now by default; a restore that stores the same value again keeps
        the one of the value it restores (when it was set: a time limit counts from it).

        Raises UnknownDevice, UnknownProperty, NotWritable, ValueError (type or range),
        DeviceLocked (the device is locked for maintenance, unless `applied`: a value the device
        has already, as an auto-off's, is recorded all the same)
        or VersionConflict (when `expected_version` is older than the stored version).
        Inside `transaction()` it joins that transaction (several values, all or nothing).
        """
        joined = self.conn.in_transaction  # inside transaction(): committed or rolled back with it
        if not joined:
            # The checks below read under the write lock: a value another process (`mapper twin
            # set`) commits between a check and the write cannot be overwritten unseen.
            self._begin()
        try:
            ptype, writable, version = self._property_row(device_id, name)
            if not writable:
                raise NotWritable(device_id, name)
            if not applied and (lock := self.admin_lock(device_id)) is not None:
                raise DeviceLocked(device_id, lock)
            value = coerce(PropertyType(ptype), raw)
            if expected_version is not None and expected_version < version:
                raise VersionConflict(device_id, name, expected_version, version)
            new_version = self._set_desired(device_id, name, value, now_ms() if ts is None else ts)
            self._enqueue(messages, now_ms())
        except BaseException:
            if not joined:
                self._rollback()
            raise
        if not joined:
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

    # -- maintenance locks ------------------------------------------------------------------

    def admin_lock(self, device_id: DeviceId) -> AdminLock | None:
        """The device's maintenance lock (`mapper lock`), or None. None on a twin from before
        the locks (read as it is by `mapper devices`, `twin get`): nothing there can be locked."""
        try:
            row = self.conn.execute("SELECT since_ms, by, reason FROM admin_locks WHERE device_id=?",
                                    (str(device_id),)).fetchone()
        except sqlite3.OperationalError as exc:
            if missing_schema(exc):
                return None
            raise
        return None if row is None else AdminLock(*row)

    def admin_locks(self) -> dict[DeviceId, AdminLock]:
        """Every device's maintenance lock, by device (none on a twin from before the locks)."""
        try:
            rows = self.conn.execute("SELECT device_id, since_ms, by, reason FROM admin_locks").fetchall()
        except sqlite3.OperationalError as exc:
            if missing_schema(exc):
                return {}
            raise
        return {DeviceId.parse(d): AdminLock(*rest) for d, *rest in rows}

    def lock_device(self, device_id: DeviceId, by: str, reason: str = "", *,
                    defined: bool = False) -> tuple[AdminLock, list[str], AdminLock | None]:
        """Lock the device for maintenance: every desired value is refused until unlock_device.
        Returns the lock in force, the properties whose pending desired values were dropped
        (refused for good, never written at the unlock: a relay switched on by a command sent
        before the maintenance began would surprise the person who unlocks it), and the lock
        already in force before (None: locked now). A locked device keeps its lock's time and
        holder (the maintenance it stands for); a new, different `reason` replaces its reason, the
        only way to correct one without an unlock (which would let writes through meanwhile).
        `defined`: the config defines the device, which may not be in the twin yet (no `mapper run`
        since it was added): it is locked from its first start on."""
        self._begin()
        try:
            if not defined and not self._has_device(device_id):
                raise UnknownDevice(device_id)
            before = lock = self.admin_lock(device_id)
            if lock is None:
                lock = AdminLock(now_ms(), by, reason)
                self.conn.execute("INSERT INTO admin_locks (device_id, since_ms, by, reason) VALUES (?, ?, ?, ?)",
                                  (str(device_id), lock.since_ms, lock.by, lock.reason))
            elif reason and reason != lock.reason:
                lock = AdminLock(lock.since_ms, lock.by, reason)
                self.conn.execute("UPDATE admin_locks SET reason=? WHERE device_id=?", (reason, str(device_id)))
            dropped = [r[0] for r in self.conn.execute(
                "SELECT name FROM properties WHERE device_id=? AND desired IS NOT NULL"
                " AND desired_version > applied_version ORDER BY name", (str(device_id),))]
            self.conn.execute(
                "UPDATE properties SET applied_version=desired_version, apply_error=?"
                " WHERE device_id=? AND desired IS NOT NULL AND desired_version > applied_version",
                (f"not written: dropped when {device_id} was locked for maintenance; set it again after"
                 f" `mapper unlock {device_id}`", str(device_id)))
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return lock, dropped, before

    def _has_device(self, device_id: DeviceId) -> bool:
        return self.conn.execute("SELECT 1 FROM devices WHERE id=?", (str(device_id),)).fetchone() is not None

    def unlock_device(self, device_id: DeviceId, *, defined: bool = False) -> AdminLock | None:
        """Release the device's maintenance lock; returns it (None: it was not locked). Nothing
        refused meanwhile is written now: a value is set again to be written. A device locked
        before it was in the twin (lock_device's `defined`) is unlocked too; `defined` as there."""
        self._begin()
        try:
            lock = self.admin_lock(device_id)
            if lock is None and not defined and not self._has_device(device_id):
                raise UnknownDevice(device_id)
            self.conn.execute("DELETE FROM admin_locks WHERE device_id=?", (str(device_id),))
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return lock

    def pending_desired(self) -> list[DesiredChange]:
        """Desired values not yet applied to the device (newer than the last applied version).

        A value whose write failed stays here (see mark_applied) until a later attempt writes it."""
        return [
            DesiredChange(DeviceId.parse(d), n, _load(v), ver)
            for d, n, v, ver in self.conn.execute(
                "SELECT p.device_id, p.name, p.desired, p.desired_version FROM properties p"
                " JOIN devices d ON d.id = p.device_id"
                " WHERE d.active=1 AND p.desired IS NOT NULL AND p.desired_version > p.applied_version"
            )
        ]

    def mark_applied(self, device_id: DeviceId, name: str, version: int, error: str | None = None, *,
                     pending: bool = False) -> None:
        """The device loop's result for desired `version`.

        `applied_version` is the newest version the device loop is done with: written (`error`
        None, or why the read-back differed from the value written) or refused for good (the
        device's definition does not take the value: `error` says why). It is no longer pending.

        `pending=True`: the write failed (the device did not answer, refused it): `error` is
        stored and shown, but `applied_version` stays, so the value is still pending
        (pending_desired) and is written again: by the running device loop (on its retry
        back-off, and when the device is `ok` again) and at the next start or reload. Never
        "applied" until a write succeeds. The error is stored only while `version` is still
        the desired version (a newer value cleared the error, and is applied next).

        A result for an older version than the desired one (a record that waited for the twin,
        made after a newer value's) leaves `apply_error` as it is: it used to put the older
        value's outcome on the newer one (its error, or none over the newer one's error).
        """
        if pending:
            self.conn.execute(
                "UPDATE properties SET apply_error=? WHERE device_id=? AND name=? AND desired_version=?"
                " AND applied_version < desired_version",
                (error, str(device_id), name, version),
            )
            return
        self.conn.execute(
            "UPDATE properties SET applied_version=max(applied_version, ?),"
            " apply_error=CASE WHEN ? >= desired_version THEN ? ELSE apply_error END WHERE device_id=? AND name=?",
            (version, version, error, str(device_id), name),
        )

    # -- reading the twin ------------------------------------------------------------------

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[TwinStore]:
        """One read transaction: every read inside it sees the twin as one commit left it, whatever
        another process (the running mapper) commits meanwhile. Inside a transaction already, that one.

            with store.snapshot():
                twin = store.device(device_id)
                newest = store.history(device_id, name, limit=1)  # the reading twin.quality describes
        """
        if self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN")
        try:
            yield self
        finally:
            self.conn.execute("COMMIT")

    def device(self, device_id: DeviceId) -> DeviceTwin:
        """The device's twin, with every committed reading (those not yet folded into
        `properties` are added here). Read in one snapshot: a fold or a prune by the recording
        process between the statements cannot hide readings from another process's reader."""
        if self.conn.in_transaction:
            return self._device(device_id)
        self.conn.execute("BEGIN")
        try:
            return self._device(device_id)
        finally:
            self.conn.execute("COMMIT")

    def _device(self, device_id: DeviceId) -> DeviceTwin:
        row = self.conn.execute(
            "SELECT model, protocol, state, state_detail, state_ts, last_online, last_reading_ts FROM devices WHERE id=?",
            (str(device_id),),
        ).fetchone()
        if row is None:
            raise UnknownDevice(device_id)
        props: dict[str, list[Any]] = {}
        for r in self.conn.execute(
            "SELECT name, type, writable, unit, desired, desired_version, desired_ts, reported, reported_version,"
            " reported_ts, quality, quality_detail, apply_error FROM properties WHERE device_id=? ORDER BY name",
            (str(device_id),),
        ):
            props[r[0]] = list(r)
        last_reading = row[6]
        key = str(device_id)
        # The readings not yet in `properties`: the store that records holds exactly those,
        # folded; any other reader folds this device's history rows after the last fold (about
        # CHECKPOINT_MS of readings, unless the recording process was killed).
        fold = self._fold
        if fold is None:
            fold = _Fold()
            for row_args in self.conn.execute(
                    "SELECT device_id, property, value, ts, quality, detail FROM readings WHERE id > ? AND device_id=?"
                    " ORDER BY id", (_counter(self.conn, "folded_through"), key)):
                fold.add(*row_args)
        for name, p in props.items():
            g = fold.good.get((key, name))
            if g is not None:
                p[7], p[8], p[9], p[10], p[11] = g[0], p[8] + g[2], g[1], GOOD, None
            q = fold.bad.get((key, name))
            if q is not None:
                p[10], p[11] = q
        taken = fold.last.get(key)
        if taken is not None:
            last_reading = taken if last_reading is None else max(last_reading, taken)
        twins = {
            r[0]: PropertyTwin(
                name=r[0], type=r[1], writable=bool(r[2]), unit=r[3], desired=_load(r[4]), desired_version=r[5],
                desired_ts=r[6], reported=_load(r[7]), reported_version=r[8], reported_ts=r[9], quality=r[10],
                quality_detail=r[11], apply_error=r[12],
            )
            for r in props.values()
        }
        return DeviceTwin(device_id, row[0], row[1], row[2], row[3], row[4], row[5], last_reading, twins,
                          self.admin_lock(device_id))

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

        `max_rows` is shared fairly among the properties (fair_cuts): over it, only the
        properties holding more than their share lose rows, their oldest, down to it; one read
        once a minute keeps its history next to 20 read every second (one limit for the oldest
        rows of all let the fast ones push it out within hours). The rows per property are kept
        in memory (counted once, COUNT_AT_ONCE_ROWS), and a property's oldest rows are found by
        walking the history from its oldest one (no index on property: it cost every reading).

        A reading whose telemetry is not yet acknowledged stays, on top of `max_rows` and of its
        property's share (the outbox limits bound those); the rows around it go as usual, also in
        steps. Before deleting, the readings are folded into `properties` and the seqs saved (both
        are otherwise kept only in the history).

        `step`: delete at most this many of the oldest rows in this call (one transaction);
        a caller sharing the twin thread with readings calls again while it returns `step`,
        so readings' commits run in between instead of waiting for one large delete.

        Age is judged on `_age_clock_ms`, not on the wall clock alone: a wall clock jumping
        ahead by more than `max_age_ms` (a Pi without a real-time clock, an operator's typo)
        deleted the whole history at the next prune, readings never published included. A pass
        (the calls up to one returning less than `step`) whose age rule deleted more than a
        prune period's worth says so at INFO (AGE_PRUNE_NOTE_MS).
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
            rows = self._history_rows()  # (before a delete: counted once, then kept by the commits)
            cutoff = self._age_clock_ms() - max_age_ms
            young = self.conn.execute("SELECT id FROM readings WHERE ts >= ? ORDER BY id LIMIT 1", (cutoff,)).fetchone()
            last = top if young is None else young[0] - 1  # the last too-old row
            waiting = self._oldest_waiting()
            sent = top if waiting is None else waiting - 1  # rows carrying a message after this one stay
            # Rows still carrying a message come on top of the limits (the outbox limits bound
            # them) and are skipped, so during a broker outage a stepped prune still reaches the
            # rows behind them. Ids have gaps (they are shared with the outbox): a step's end is
            # found by walking the rows that go, never more than `step` of them.
            if step is not None and last >= oldest:
                last = min(last, self._nth_deletable(step, sent))  # at most `step` rows
            rows_left = rows - len(self._carried_size)  # (those that may go, at most)
            if self._prop_rows is None and rows <= COUNT_AT_ONCE_ROWS:
                self._prop_rows = self._count_props()  # while it is cheap (a first prune, a fresh twin)
            folded = False
            props = None
            by_age = 0
            by_age_oldest = None
            if last >= oldest:
                folded = True
                if self._load_fold():
                    self._checkpoint()
                props = self._props_now()
                # (Only for the INFO line below: the oldest row going, a lookup by id at the old end.)
                row = self.conn.execute("SELECT ts FROM readings WHERE id <= ? AND (seq IS NULL OR id <= ?)"
                                        " ORDER BY id LIMIT 1", (last, sent)).fetchone()
                by_age_oldest = None if row is None else row[0]
                if props is not None:  # (the rows going, per property: as many as go, at the old end)
                    going = self.conn.execute(
                        "SELECT device_id, property, count(*) FROM readings WHERE id <= ? AND (seq IS NULL OR id <= ?)"
                        " GROUP BY device_id, property", (last, sent)).fetchall()
                    if _take_off(props, going):
                        floor = min(last, sent) + 1  # only rows still carrying a message stay before it
                        for held in props.values():
                            held[1] = max(held[1], floor)
                    else:
                        props = self._prop_rows = None  # counted again below, if the count rule needs them
                by_age = self.conn.execute("DELETE FROM readings WHERE id <= ? AND (seq IS NULL OR id <= ?)",
                                           (last, sent)).rowcount
            # The count rule: fair shares (fair_cuts) of `max_rows` among the properties, of the
            # rows that may go; a property under its share loses nothing to the others' pace.
            by_count = 0
            budget = None if step is None else step - by_age
            if rows_left - by_age > max_rows and budget != 0:
                if not folded:
                    folded = True
                    if self._load_fold():
                        self._checkpoint()
                    props = self._props_now()
                if props is None:  # (all rows are folded now: the GROUP BY counts them all)
                    props = self._count_props()
                may_go = {key: held[:] for key, held in props.items()}
                if waiting is not None:
                    staying = self.conn.execute(
                        "SELECT device_id, property, count(*) FROM readings WHERE id > ? AND seq IS NOT NULL"
                        " GROUP BY device_id, property", (sent,)).fetchall()
                    if not _take_off(may_go, staying):
                        props = self._count_props()
                        may_go = {key: held[:] for key, held in props.items()}
                        _take_off(may_go, staying)
                cuts = fair_cuts({key: n for key, (n, _) in may_go.items()}, max_rows)
                for key in sorted(cuts, key=lambda k: -cuts[k]):
                    n = cuts[key] if budget is None else min(cuts[key], budget - by_count)
                    if n <= 0:
                        break
                    by_count += self._delete_oldest_of(key, props[key], n, sent, top)
            deleted = by_age + by_count
            # Also when nothing goes: what open() reads back after a crash (seqs after
            # seq_saved_through, messages after published_through) stays ~one prune period long.
            self._save_seqs()
            if waiting is None and self._fold is not None:  # (only the recording store moves the cursor)
                self._published_through = max(self._published_through, self._next_id - 1)
                self._save_published()
        except BaseException:
            self._rollback()
            raise
        self._commit()
        if self._history_count is not None:
            self._history_count -= deleted
        if props is not None:
            self._prop_rows = {key: held for key, held in props.items() if held[0] > 0}
        if by_age:
            self._age_pass_deleted += by_age
            if by_age_oldest is not None and (self._age_pass_oldest is None or by_age_oldest < self._age_pass_oldest):
                self._age_pass_oldest = by_age_oldest
        if step is None or deleted < step:
            self._end_prune_pass(cutoff, max_age_ms)
        return deleted

    def _count_props(self) -> dict[tuple[str, str], list[int]]:
        """Rows per property of the history folded so far (the fold adds the rest when it is
        checkpointed): one GROUP BY, ~130 ms on 200,000 rows on a desktop."""
        rows: dict[tuple[str, str], list[int]] = {}
        for device, name, n, first in self.conn.execute(
                "SELECT device_id, property, count(*), min(id) FROM readings WHERE id <= ?"
                " GROUP BY device_id, property", (self._load_fold().since,)):
            rows[(device, name)] = [n, first]
        return rows

    def _props_now(self) -> dict[tuple[str, str], list[int]] | None:
        """A copy of the rows per property with the open transaction's folds counted (a prune's
        transaction may still roll back), or None while not counted yet."""
        if self._prop_rows is None:
            return None
        props = {key: held[:] for key, held in self._prop_rows.items()}
        self._count_folded(props, self._tx_folds)
        self._tx_folds = []  # (counted in the copy, which replaces _prop_rows at the commit)
        return props

    @staticmethod
    def _count_folded(props: dict[tuple[str, str], list[int]] | None, folds: list[_Fold]) -> None:
        """Add the readings of checkpointed folds to the rows per property."""
        if props is None:
            return
        for fold in folds:
            for counts in ((key, g[2]) for key, g in fold.good.items()), fold.failed.items():
                for key, n in counts:
                    held = props.get(key)
                    if held is None:
                        props[key] = [n, fold.since + 1]
                    else:
                        held[0] += n

    def _delete_oldest_of(self, key: tuple[str, str], held: list[int], n: int, sent: int, top: int) -> int:
        """Delete the `n` oldest rows of a property that may go (no message, or one sent: id <=
        `sent`), walking the history from `held`'s id on; `held` follows (rows, first id)."""
        device, name = key
        row = self.conn.execute("SELECT id FROM readings WHERE id >= ? AND device_id=? AND property=?"
                                " AND (seq IS NULL OR id <= ?) ORDER BY id LIMIT 1 OFFSET ?",
                                (held[1], device, name, sent, n - 1)).fetchone()
        through = top if row is None else row[0]
        deleted = self.conn.execute("DELETE FROM readings WHERE id >= ? AND id <= ? AND device_id=? AND property=?"
                                    " AND (seq IS NULL OR id <= ?)", (held[1], through, device, name, sent)).rowcount
        held[0] -= deleted
        held[1] = min(through, sent) + 1  # only its rows still carrying a message stay before it
        return deleted

    def _age_clock_ms(self) -> int:
        """The clock the history's age is judged on: the wall clock, or the wall clock as it was
        at open() plus the time elapsed since (monotonic) when that is earlier. A wall clock that
        jumps ahead within a run does not age the history; one that goes back is followed (rows
        are kept longer, never deleted early). After a boot with a clock far behind and a time
        sync's legitimate jump forward, the rows from before the jump are kept until they are
        really `history_age_s` old, and the ones after it that much longer too (the count rule,
        `history_rows`, still bounds the history)."""
        wall = now_ms()
        elapsed = (self._opened_wall_ns + time.monotonic_ns() - self._opened_mono_ns) // 1_000_000
        if wall - elapsed > AGE_PRUNE_NOTE_MS and not self._clock_ahead_told:
            self._clock_ahead_told = True
            log.info("the wall clock is %.0f s ahead of the time elapsed since the twin was opened (it jumped "
                     "forward): the history's age (twin.history_age_s) is judged on the elapsed time until the "
                     "next start", (wall - elapsed) / 1000)
        return min(wall, elapsed)

    def _end_prune_pass(self, cutoff: int, max_age_ms: int) -> None:
        """The end of a prune pass: INFO when its age rule deleted more than a prune period's
        worth, i.e. readings taken well before the limit the previous pass applied (or, in the
        first pass, the limit at open())."""
        before = self._age_last_cutoff
        if before is None:
            before = self._opened_wall_ns // 1_000_000 - max_age_ms
        oldest, deleted = self._age_pass_oldest, self._age_pass_deleted
        if deleted and oldest is not None and oldest < before - AGE_PRUNE_NOTE_MS:
            log.info("deleted %d readings from the twin's history for their age (twin.history_age_s: %d s), the "
                     "oldest taken %.0f s before the limit", deleted, max_age_ms // 1000, (cutoff - oldest) / 1000)
        self._age_pass_deleted = 0
        self._age_pass_oldest = None
        self._age_last_cutoff = cutoff

    def _history_rows(self) -> int:
        """Rows in history: counted once (the first prune), then kept up to date by commits."""
        if self._history_count is None:
            self._history_count = self.conn.execute("SELECT count(*) FROM readings").fetchone()[0] - self._tx_history
        return self._history_count + self._tx_history

    def _nth_deletable(self, n: int, sent: int) -> int:
        """The id of the n-th oldest history row that may go (no message, or one sent: id <= `sent`);
        the newest row when there are fewer. During a broker outage the rows still carrying a
        message pile up at the old end: counting them would stop a stepped prune at them."""
        row = self.conn.execute("SELECT id FROM readings WHERE seq IS NULL OR id <= ? ORDER BY id LIMIT 1 OFFSET ?",
                                (sent, n - 1)).fetchone()
        return row[0] if row else self.conn.execute("SELECT max(id) FROM readings").fetchone()[0]

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
