"""The counters table: monotonic totals for /metrics that no retention sweep may lower (e.g.
denoising steps run, videos the safety checker looked at)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .db import Database

# The safety checker's totals (README "Safety checker"), added with each job's outcome: videos
# checked, and of those the ones flagged (kept) and blocked (withheld).
SAFETY_CHECKS = "safety_checks"
NSFW_FLAGGED = "nsfw_flagged"
NSFW_BLOCKED = "nsfw_blocked"


class CountersTable:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> dict[str, float]:
        """The totals by name, e.g. `denoise_steps`, `denoise_seconds`."""
        return {name: value for name, value in self._db.rows("SELECT name, value FROM counters")}

    @staticmethod
    def add(conn: sqlite3.Connection, totals: dict[str, float]) -> None:
        """Inside the caller's transaction (a job's completion): add to the totals."""
        for name, value in totals.items():
            conn.execute(
                """INSERT INTO counters (name, value) VALUES (?, ?)
                   ON CONFLICT (name) DO UPDATE SET value = value + excluded.value""",
                (name, value),
            )
