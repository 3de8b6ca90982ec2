"""The secrets table: values every process of one server must share (e.g. the URL signing key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .db import Database


class SecretsTable:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get_or_create(self, name: str, default: str) -> str:
        """The stored secret `name`, created as `default` on first use (the same in every process)."""
        with self._db.write() as conn:
            conn.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, default))
            return conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0]
