"""The webhook outbox: one row per delivery owed, written in the same transaction as the job's
terminal state (so a finished job can never lose its webhook), leased and retried by
server/webhooks.py until delivered or dead."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any

from .models import WebhookDelivery

if TYPE_CHECKING:
    from .db import Database


class WebhooksTable:
    def __init__(self, db: Database) -> None:
        self._db = db

    def claim_due(self, *, limit: int, lease_s: float, now: float | None = None) -> list[WebhookDelivery]:
        """Pending deliveries that are due; each is leased (pushed back by `lease_s`) so that a
        crash mid-delivery only delays it."""
        now = time.time() if now is None else now
        with self._db.write() as conn:
            rows = conn.execute(
                """SELECT id, prediction_id, url, attempts, created_at FROM webhooks
                   WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?""",
                (now, limit),
            ).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE webhooks SET next_attempt_at = ? WHERE id = ?", (now + lease_s, row["id"])
                )
        return [WebhookDelivery(**dict(row)) for row in rows]

    def delivered(self, id: int, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._db.write() as conn:
            conn.execute(
                "UPDATE webhooks SET status = 'delivered', attempts = attempts + 1, delivered_at = ? WHERE id = ?",
                (now, id),
            )

    def failed(self, id: int, *, error: str, retry_at: float | None) -> None:
        """Record a failed attempt; `retry_at` None gives up on it (status dead)."""
        with self._db.write() as conn:
            if retry_at is None:
                conn.execute(
                    "UPDATE webhooks SET status = 'dead', attempts = attempts + 1, last_error = ? WHERE id = ?",
                    (error, id),
                )
            else:
                conn.execute(
                    """UPDATE webhooks SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?
                       WHERE id = ?""",
                    (error, retry_at, id),
                )

    def deliveries(self, prediction_id: str) -> list[dict[str, Any]]:
        """A prediction's webhook deliveries, oldest first: status pending | delivered | dead."""
        rows = self._db.rows(
            """SELECT url, status, attempts, created_at, next_attempt_at, delivered_at, last_error
               FROM webhooks WHERE prediction_id = ? ORDER BY id""",
            (prediction_id,),
        )
        return [dict(row) for row in rows]

    def counts(self) -> dict[str, int]:
        counts = {"pending": 0, "delivered": 0, "dead": 0, "failed_attempts": 0}
        for status, count in self._db.rows("SELECT status, COUNT(*) FROM webhooks GROUP BY status"):
            counts[status] = count
        counts["failed_attempts"] = self._db.row(
            "SELECT COALESCE(SUM(attempts - (status = 'delivered')), 0) FROM webhooks WHERE attempts > 0"
        )[0]
        return counts

    # --- inside a predictions transaction (the caller's connection) ---------------------------

    @staticmethod
    def enqueue(conn: sqlite3.Connection, prediction_id: str, url: str | None, now: float) -> None:
        if url:
            conn.execute(
                "INSERT INTO webhooks (prediction_id, url, created_at, next_attempt_at) VALUES (?, ?, ?, ?)",
                (prediction_id, url, now, now),
            )

    @staticmethod
    def forget(conn: sqlite3.Connection, prediction_ids: list[str]) -> None:
        """Drop the outbox rows of deleted predictions."""
        marks = ",".join("?" * len(prediction_ids))
        conn.execute(f"DELETE FROM webhooks WHERE prediction_id IN ({marks})", prediction_ids)

    @staticmethod
    def expire_settled(conn: sqlite3.Connection, *, before: float) -> None:
        conn.execute("DELETE FROM webhooks WHERE status != 'pending' AND created_at < ?", (before,))
