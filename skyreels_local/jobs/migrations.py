"""The schema's history: an ordered list of numbered migrations, applied in order on open.

`PRAGMA user_version` records the last one applied. A migration is never edited once released:
a schema change is a new migration at the end (its number is LATEST_VERSION + 1), and the
Database applies each pending one in its own write transaction, so a crash mid-upgrade leaves
the file at the previous version, to be upgraded again on the next open.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


# Version 1: the schema as first released (commit 50b36db). IF NOT EXISTS, as it always was, so
# it also adopts a file whose tables exist but whose user_version was never written.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- queue order
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    seed INTEGER NOT NULL,                   -- drawn at submit when the request said -1
    base_url TEXT NOT NULL,                  -- where the client reached us (absolute URLs in webhooks)
    webhook_url TEXT,
    base64_output INTEGER NOT NULL DEFAULT 0,
    preset TEXT NOT NULL DEFAULT '',
    profile TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',      -- file names under outputs/
    error TEXT NOT NULL DEFAULT '',
    code INTEGER,
    execution_ms INTEGER NOT NULL DEFAULT 0,
    inference_ms INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    claim TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    -- Last on purpose: a data: URI image makes these megabytes long, and SQLite reads the
    -- columns before them without walking their overflow pages. Polls never load them.
    params TEXT NOT NULL,                    -- validated generation parameters (the worker's)
    input TEXT NOT NULL                      -- the request body as submitted (echoed in webhooks)
);
CREATE INDEX IF NOT EXISTS predictions_status_seq ON predictions (status, seq);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created_at);

CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    pid INTEGER,
    device TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    profile TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    job_id TEXT
);

CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prediction_id TEXT NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | dead
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (status, next_attempt_at);

CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Monotonic totals for /metrics that no retention sweep may lower (e.g. denoising steps run).
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL DEFAULT 0
);
"""


def _create_tables(conn: sqlite3.Connection) -> None:
    for statement in SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)


def _add_owners(conn: sqlite3.Connection) -> None:
    """Predictions and uploads have an owner, the account of the API key that created them.
    Rows of an older database get NULL, the same owner as rows created with auth off: they are
    visible only while the server runs without keys (a keyed server shows them to no account;
    their signed URLs keep working until retention removes them)."""
    for table in ("predictions", "uploads"):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if "account" not in columns:  # (a file upgraded by a build that added them unversioned)
            conn.execute(f"ALTER TABLE {table} ADD COLUMN account TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS predictions_account_seq ON predictions (account, seq)")


def _add_nsfw_verdicts(conn: sqlite3.Connection) -> None:
    """predictions.has_nsfw_contents: the safety checker's verdicts, a JSON list of booleans, one
    per output (`[true]`: flagged). NULL when no check ran (checker off, the request opted out,
    or a row written before this column): the API then shows `false` per output, as before."""
    conn.execute("ALTER TABLE predictions ADD COLUMN has_nsfw_contents TEXT")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "predictions, workers, webhooks, uploads, secrets, counters", _create_tables),
    Migration(2, "owners: predictions.account and uploads.account", _add_owners),
    Migration(3, "safety checker verdicts: predictions.has_nsfw_contents", _add_nsfw_verdicts),
)

LATEST_VERSION = MIGRATIONS[-1].version
