"""The job table seen by the cluster dispatcher (cluster/dispatcher.py): predictions sent to
remote workers through Celery instead of claimed by local ones.

A remote job's `claim` column holds its dispatch token (a fresh one per dispatch), so the usual
claim-guarded writes of PredictionsTable (set_progress, complete, fail, mark_cancelled) record
an outcome only for the current dispatch. States as for local jobs: `created` while it waits in
the Celery queue (claim set = dispatched), `processing` once a worker reports it started.
A `created` job without a claim waits in the table for the dispatcher's send window.
Local recovery (PredictionsTable.recover) never touches them: their worker_id is a remote
worker's id, which is not in the local workers table, and never NULL while processing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import TaskCode
from .models import Job
from .predictions import _LIGHT_COLUMNS

if TYPE_CHECKING:
    from .db import Database

REQUEUED, FAILED, CANCELLED = "requeued", "failed", "cancelled"


class RemoteJobs:
    def __init__(self, db: Database) -> None:
        self._db = db

    def undispatched(self, limit: int) -> list[Job]:
        """Waiting jobs not yet sent, oldest first, with their params and input."""
        rows = self._db.rows(
            "SELECT * FROM predictions WHERE status = 'created' AND claim IS NULL ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [Job.from_row(row) for row in rows]

    def sent_waiting(self) -> int:
        """Dispatched jobs no worker has started yet (their task waits in Redis): the send window."""
        return self._db.row(
            "SELECT COUNT(*) FROM predictions WHERE status = 'created' AND claim IS NOT NULL"
        )[0]

    def in_flight(self) -> list[Job]:
        """Dispatched jobs that have not ended: queued in Celery (`created`) or running (`processing`)."""
        rows = self._db.rows(
            f"""SELECT {_LIGHT_COLUMNS} FROM predictions
                WHERE status IN ('created', 'processing') AND claim IS NOT NULL ORDER BY seq"""
        )
        return [Job.from_row(row) for row in rows]

    def assign(self, id: str, token: str, *, previous: str | None = None) -> bool:
        """Record a dispatch of a waiting job (`previous`: the token it replaces, None for the first)."""
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE predictions SET claim = ? WHERE id = ? AND status = 'created' AND claim IS ?",
                (token, id, previous),
            )
        return cursor.rowcount == 1

    def mark_started(
        self,
        id: str,
        token: str,
        *,
        worker_id: str,
        profile: str = "",
        preset: str = "",
        now: float | None = None,
    ) -> bool:
        """A worker took the job (an attempt, as a local claim is)."""
        now = time.time() if now is None else now
        with self._db.write() as conn:
            cursor = conn.execute(
                """UPDATE predictions SET status = 'processing', worker_id = ?, started_at = ?,
                   attempts = attempts + 1, profile = ?, preset = COALESCE(NULLIF(?, ''), preset), progress = 0
                   WHERE id = ? AND claim = ? AND status = 'created'""",
                (worker_id, now, profile, preset, id, token),
            )
        return cursor.rowcount == 1

    def redispatch_lost(
        self, id: str, token: str, new_token: str, *, max_attempts: int, reason: str, now: float | None = None
    ) -> str:
        """The worker running this dispatch is gone. Like PredictionsTable.recover: back to the
        queue under `new_token` (REQUEUED), or FAILED (5000) once started `max_attempts` times,
        or CANCELLED when a cancel was waiting for it. "" when the dispatch is no longer current."""
        now = time.time() if now is None else now
        with self._db.write() as conn:
            row = conn.execute(
                "SELECT status, claim, attempts, cancel_requested, webhook_url FROM predictions WHERE id = ?",
                (id,),
            ).fetchone()
            if row is None or row["claim"] != token or row["status"] != "processing":
                return ""
            if row["cancel_requested"]:
                conn.execute(
                    """UPDATE predictions SET status = 'cancelled', error = 'Prediction was cancelled',
                       finished_at = ? WHERE id = ?""",
                    (now, id),
                )
                outcome = CANCELLED
            elif row["attempts"] >= max_attempts:
                conn.execute(
                    "UPDATE predictions SET status = 'failed', code = ?, error = ?, finished_at = ? WHERE id = ?",
                    (
                        int(TaskCode.INTERNAL_ERROR),
                        f"generation was interrupted {row['attempts']} times ({reason}); giving up",
                        now,
                        id,
                    ),
                )
                outcome = FAILED
            else:
                conn.execute(
                    """UPDATE predictions SET status = 'created', claim = ?, worker_id = NULL, progress = 0,
                       started_at = NULL WHERE id = ?""",
                    (new_token, id),
                )
                return REQUEUED
            self._db.webhooks.enqueue(conn, id, row["webhook_url"], now)
        return outcome
