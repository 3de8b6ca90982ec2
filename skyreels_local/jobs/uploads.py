"""The uploads table: one row per file uploaded through /media/upload (its bytes live under the
data directory; media.py writes them)."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

from .models import Upload

if TYPE_CHECKING:
    from .db import Database


class UploadsTable:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        *,
        id: str,
        filename: str,
        content_type: str,
        size: int,
        account: str | None = None,
        now: float | None = None,
    ) -> Upload:
        now = time.time() if now is None else now
        with self._db.write() as conn:
            conn.execute(
                """INSERT INTO uploads (id, filename, content_type, size, created_at, account)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (id, filename, content_type, size, now, account),
            )
        return Upload(
            id=id,
            filename=filename,
            content_type=content_type,
            size=size,
            complete=False,
            created_at=now,
            account=account,
        )

    def complete(self, id: str, *, size: int, content_type: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                "UPDATE uploads SET complete = 1, size = ?, content_type = ? WHERE id = ?",
                (size, content_type, id),
            )

    def get(self, id: str) -> Upload | None:
        row = self._db.row("SELECT * FROM uploads WHERE id = ?", (id,))
        if row is None:
            return None
        return Upload(**{**dict(row), "complete": bool(row["complete"])})

    def delete(self, id: str, *, account: str | None) -> bool:
        """Remove an upload's row when `account` owns it; the caller deletes its files."""
        with self._db.write() as conn:
            cursor = conn.execute("DELETE FROM uploads WHERE id = ? AND account IS ?", (id, account))
        return cursor.rowcount == 1

    @staticmethod
    def expire(conn: sqlite3.Connection, *, before: float) -> list[str]:
        """Inside the retention sweep's transaction: delete the rows created before `before`."""
        rows = conn.execute("DELETE FROM uploads WHERE created_at < ? RETURNING id", (before,)).fetchall()
        return [row["id"] for row in rows]
