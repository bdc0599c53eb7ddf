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


def _run(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, and a migration must be one transaction.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def apply(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version now in force."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"twin database schema version {current} is newer than this mapper ({len(MIGRATIONS)}): upgrade the mapper"
        )
    for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {version}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return len(MIGRATIONS)
