"""Counts for /metrics: videos checked, flagged and blocked, kept under `<data-dir>/safety/`.

One small JSON file per worker (`<worker id>.json`), each written only by its own worker (whole
file, then renamed), so concurrent workers never contend; the HTTP process adds them up at
scrape time. Totals are monotonic across restarts and retention (no job row is needed). A
worker killed between counting and recording its result may count that video twice when the
job is re-run: the counts are at-least-once.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("checked", "flagged", "blocked")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def tally_dir(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser() / "safety"


class Tally:
    """One worker's counts."""

    def __init__(self, folder: Path, worker_id: str) -> None:
        self.path = folder / f"{_SAFE_NAME.sub('_', worker_id)}.json"
        self.counts = dict.fromkeys(KINDS, 0) | _read(self.path)

    def add(self, **amounts: int) -> None:
        for kind, amount in amounts.items():
            self.counts[kind] = self.counts.get(kind, 0) + int(amount)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self.counts))
            os.replace(temporary, self.path)
        except OSError as exc:  # a full disk: a metric is not worth failing a job over
            log.warning("cannot write safety checker counts to %s: %s", self.path, exc)


def _read(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
        return {k: int(v) for k, v in data.items() if k in KINDS}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def totals(data_dir: str | Path) -> dict[str, int]:
    """The counts of every worker, added up (zeros when nothing was ever checked)."""
    summed = dict.fromkeys(KINDS, 0)
    folder = tally_dir(data_dir)
    if folder.is_dir():
        for path in folder.glob("*.json"):
            for kind, value in _read(path).items():
                summed[kind] += value
    return summed
