"""The workers table: one row per worker process (state, heartbeat, the job it runs), written by
the workers and read by the supervisor and /health."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any

from .models import WorkerRecord

if TYPE_CHECKING:
    from .db import Database


class WorkersTable:
    def __init__(self, db: Database) -> None:
        self._db = db

    def register(self, id: str, *, pid: int, device: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._db.write() as conn:
            conn.execute(
                """INSERT INTO workers (id, pid, device, state, started_at, heartbeat_at) VALUES (?, ?, ?, 'loading', ?, ?)
                   ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, device = excluded.device, state = 'loading',
                   model = '', profile = '', error = '', started_at = excluded.started_at,
                   heartbeat_at = excluded.heartbeat_at, job_id = NULL""",
                (id, pid, device, now, now),
            )

    def update(self, id: str, **fields: Any) -> None:
        allowed = {"state", "model", "profile", "error", "pid", "job_id"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"unknown worker fields {sorted(set(fields) - allowed)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._db.write() as conn:
            conn.execute(f"UPDATE workers SET {assignments} WHERE id = ?", (*fields.values(), id))

    def heartbeat(self, id: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._db.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, id))

    def all(self) -> list[WorkerRecord]:
        rows = self._db.rows("SELECT * FROM workers ORDER BY id")
        return [WorkerRecord(**dict(row)) for row in rows]

    # --- inside a predictions transaction (the caller's connection) ---------------------------

    @staticmethod
    def took_job(conn: sqlite3.Connection, worker_id: str, job_id: str) -> None:
        conn.execute("UPDATE workers SET job_id = ?, state = 'busy' WHERE id = ?", (job_id, worker_id))

    @staticmethod
    def dropped_job(conn: sqlite3.Connection, job_id: str) -> None:
        """The job went back to the queue: its worker no longer runs it (its state is its own)."""
        conn.execute("UPDATE workers SET job_id = NULL WHERE job_id = ?", (job_id,))

    @staticmethod
    def finished_jobs(conn: sqlite3.Connection, job_ids: list[str]) -> None:
        """The jobs ended (or were deleted): their workers are ready for the next one."""
        marks = ",".join("?" * len(job_ids))
        conn.execute(f"UPDATE workers SET job_id = NULL, state = 'ready' WHERE job_id IN ({marks})", job_ids)
