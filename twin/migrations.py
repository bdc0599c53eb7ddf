"""Schema migrations, applied in order and recorded in `PRAGMA user_version`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_twin(conn: sqlite3.Connection) -> None:
    _run(conn, 
        """
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            model TEXT NOT NULL,
            protocol TEXT NOT NULL,
            fingerprint TEXT,
            active INTEGER NOT NULL DEFAULT 1,
            state TEXT NOT NULL DEFAULT 'unknown',
            state_detail TEXT,
            state_ts INTEGER,
            last_online INTEGER,
            last_reading_ts INTEGER
        );
        CREATE TABLE properties (
            device_id TEXT NOT NULL,
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            writable INTEGER NOT NULL,
            unit TEXT NOT NULL DEFAULT '',
            desired TEXT,
            desired_version INTEGER NOT NULL DEFAULT 0,
            desired_ts INTEGER,
            applied_version INTEGER NOT NULL DEFAULT 0,
            apply_error TEXT,
            reported TEXT,
            reported_version INTEGER NOT NULL DEFAULT 0,
            reported_ts INTEGER,
            quality TEXT,
            quality_detail TEXT,
            PRIMARY KEY (device_id, name)
        ) WITHOUT ROWID;
        CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            property TEXT NOT NULL,
            value TEXT,
            ts INTEGER NOT NULL,
            quality TEXT NOT NULL
        );
        CREATE INDEX readings_by_property ON readings (device_id, property, id);
        """
    )


@migration
def m002_outbox(conn: sqlite3.Connection) -> None:
    _run(conn, 
        """
        CREATE TABLE outbox (
            -- AUTOINCREMENT: ids are never reused after rows are deleted, so the publisher
            -- can tell new rows from old by id alone.
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            kind TEXT NOT NULL,
            created_ts INTEGER NOT NULL
        );
        CREATE TABLE topic_seq (
            topic TEXT PRIMARY KEY,
            seq INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID;
        """
    )


@migration
def m003_inference(conn: sqlite3.Connection) -> None:
    """Decisions of inference pipelines (mapper/inference), one row per window decided or offloaded.

    `status`: pending (offloaded, no answer yet, nothing decided), provisional (the deadline
    passed: the edge answer stands), final (edge exit, or the cloud's answer). A pending or
    provisional row with a request_id is an offload still waiting for its result.
    """
    _run(conn,
        """
        CREATE TABLE inference_decisions (
            id INTEGER PRIMARY KEY,
            pipeline TEXT NOT NULL,
            device_id TEXT NOT NULL,
            window_start_ts INTEGER NOT NULL,
            window_end_ts INTEGER NOT NULL,
            request_id TEXT UNIQUE,
            audit INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            label TEXT,
            confidence REAL,
            exit TEXT,
            edge_label TEXT NOT NULL,
            edge_confidence REAL NOT NULL,
            cloud_label TEXT,
            cloud_confidence REAL,
            created_ts INTEGER NOT NULL,
            decided_ts INTEGER,
            final_ts INTEGER,
            request BLOB
        );
        CREATE INDEX inference_by_pipeline ON inference_decisions (pipeline, id);
        CREATE INDEX inference_waiting ON inference_decisions (status) WHERE request_id IS NOT NULL
        """
    )


@migration
def m004_cheaper_commits(conn: sqlite3.Connection) -> None:
    """Fewer B-tree pages written per reading batch (TwinStore.record, the hot path).

    - The index readings (device_id, property, id) goes. It cost one write per reading at a
      scattered place (one page per property per batch once the history is large), and its
      only users are `mapper twin history` and TwinStore.history, which now scan the history
      backwards by id and stop at `limit` matches.
    - The outbox is rebuilt without AUTOINCREMENT, which rewrote sqlite_sequence once per
      inserted row. TwinStore assigns outbox ids itself and keeps the guarantee AUTOINCREMENT
      gave (an id is never used twice, even after the outbox was emptied and the mapper
      restarted) with a high-water mark, counters('outbox_id_reserved'), advanced in blocks
      in the same transaction as the rows it covers. It starts at the old sqlite_sequence.
    """
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
    top = max(row[0] if row else 0, conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])
    _run(conn,
        """
        CREATE TABLE outbox_m004 (
            -- ids are assigned by TwinStore, never reused: see counters('outbox_id_reserved').
            id INTEGER PRIMARY KEY,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            kind TEXT NOT NULL,
            created_ts INTEGER NOT NULL
        );
        INSERT INTO outbox_m004 (id, topic, payload, qos, retain, kind, created_ts)
            SELECT id, topic, payload, qos, retain, kind, created_ts FROM outbox;
        DROP TABLE outbox;
        ALTER TABLE outbox_m004 RENAME TO outbox;
        DROP INDEX readings_by_property
        """
    )
    conn.execute(
        "INSERT INTO counters (name, value) VALUES ('outbox_id_reserved', ?)"
        " ON CONFLICT (name) DO UPDATE SET value=max(value, excluded.value)",
        (top,),
    )


@migration
def m005_history_carries_telemetry(conn: sqlite3.Connection) -> None:
    """A batch is stored as little more than its history rows (see twin/store.py).

    - A reading's telemetry message lives in its history row: `route` (topic, QoS, retain and
      the payload's other fields, each combination once in `routes`) and `seq`; the payload
      is rebuilt from the row when it has to be sent again. counters('published_through'):
      every such message up to this history id is acknowledged (or dropped by policy).
    - `detail` keeps a bad reading's detail, so that `properties` can be rebuilt from history:
      counters('folded_through') is the last history id folded into `properties`.
    - counters('seq_saved_through'): `topic_seq` holds the seqs of history rows up to here.
    - History ids come from the outbox's id sequence from now on (one order for the publisher).

    Existing history is folded and sent already: all three counters start at its last id.
    """
    _run(conn,
        """
        ALTER TABLE readings ADD COLUMN detail TEXT;
        ALTER TABLE readings ADD COLUMN route INTEGER;
        ALTER TABLE readings ADD COLUMN seq INTEGER;
        CREATE TABLE routes (
            id INTEGER PRIMARY KEY,
            topic TEXT NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            fields TEXT NOT NULL,  -- the payload after value and ts, e.g. ,"unit":"C"
            UNIQUE (topic, qos, retain, fields)
        )
        """
    )
    top = conn.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0]
    for name in ("folded_through", "published_through", "seq_saved_through"):
        conn.execute("INSERT INTO counters (name, value) VALUES (?, ?)", (name, top))
    conn.execute(
        "INSERT INTO counters (name, value) VALUES ('outbox_id_reserved', ?)"
        " ON CONFLICT (name) DO UPDATE SET value=max(value, excluded.value)",
        (top,),
    )


@migration
def m006_device_origin(conn: sqlite3.Connection) -> None:
    """`devices.origin`: where the definition a device id last ran under came from, "local" (the
    operator's YAML files) or "edgecore" (a KubeEdge DMI Device); "derived" for a derived device.

    When it changes, the device's stored desired values are dropped (TwinStore.sync_devices): one
    origin's desired values must not drive the other's device. NULL (rows from before this
    migration): not known. The next sync of an active row records it without dropping anything
    (it ran in the last run); an inactive row's is recorded when a definition of that name is
    synced again, as a change (its desired values dropped): it may have been the other origin's
    device (twin.store.origin_changes).
    """
    conn.execute("ALTER TABLE devices ADD COLUMN origin TEXT")


@migration
def m007_file_desired(conn: sqlite3.Connection) -> None:
    """`properties.file_desired`: the desired value the device's definition (its YAML file, or
    edgecore's Device) gave the property when the twin last took up that definition, as JSON:
    its text as the file says it (a JSON string), `null` when it gave none. The definition's
    `desired:` is applied when it differs from this (TwinStore.sync_devices), not whenever
    anything else about the device or its model changed, which overrode a value the operator set
    later (`mapper twin set`, MQTT) at every such reload or restart.

    SQL NULL (rows from before this migration): not known. The next sync records the file's
    value then and applies it only if the twin has no desired value (twin.store.sync_devices).
    """
    conn.execute("ALTER TABLE properties ADD COLUMN file_desired TEXT")


@migration
def m008_meta(conn: sqlite3.Connection) -> None:
    """`meta`: facts about the mapper that ran on this twin, by name (TwinStore.swap_meta); `node`:
    the node it last ran as. The node is part of every topic and defaults to the host name: a Pi
    renamed moved its topics away from the apps and the bridge without a word."""
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migration
def m009_admin_locks(conn: sqlite3.Connection) -> None:
    """`admin_locks`: devices locked for maintenance (`mapper lock`), with when, by whom and why.
    A table of its own: sync_devices (a reload, a restart) never rewrites it, so a lock outlives both."""
    conn.execute("CREATE TABLE admin_locks (device_id TEXT PRIMARY KEY, since_ms INTEGER NOT NULL,"
                 " by TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '')")


def _run(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, and a migration must be one transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


class NewerSchema(RuntimeError):
    """The file's schema version is beyond this code's: a newer mapper wrote it (TwinStore.open names
    the file: twin.store.NewerTwin)."""

    def __init__(self, current: int) -> None:
        self.found = current
        super().__init__(f"twin database schema version {current} is newer than this mapper ({len(MIGRATIONS)}):"
                         " upgrade the mapper")


def _newer(current: int) -> NewerSchema:
    return NewerSchema(current)


def version(conn: sqlite3.Connection) -> int:
    """The schema version of the file, migrating nothing (the commands that only read the twin);
    a version newer than this code knows is refused, as by apply()."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise _newer(current)
    return current


def apply(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version now in force.

    Each step re-reads the version under the write lock: two processes opening a new or old
    file at once (two mapper starts, a test's store and a mapper) must not both apply it.
    """
    current = version(conn)
    while current < len(MIGRATIONS):
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise _newer(current)
            if current < len(MIGRATIONS):
                MIGRATIONS[current](conn)
                current += 1
                conn.execute(f"PRAGMA user_version = {current}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return len(MIGRATIONS)
