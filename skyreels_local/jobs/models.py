"""What the job tables hold, as Python values: a prediction's state, its row, and the rows of the
other tables. Timestamps are Unix seconds (UTC) as REAL; the wire format is produced in
server/schemas.py."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..errors import SkyreelsError, TaskCode


class AllAccounts:
    """PredictionsTable.history's default: no owner filter (the HTTP routes always pass the caller's)."""


ALL_ACCOUNTS = AllAccounts()


class JobStatus(StrEnum):
    CREATED = "created"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class QueueFullError(SkyreelsError):
    """The bounded queue is full: submit answers 429 with Retry-After."""

    http_status = 429
    task_code = TaskCode.SERVICE_UNAVAILABLE

    def __init__(self, waiting: int, retry_after_s: int = 30) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"the queue is full ({waiting} jobs waiting); retry later")


@dataclass
class Job:
    """One prediction as stored. `params` are the validated generation parameters."""

    seq: int
    id: str
    model: str
    status: JobStatus
    seed: int
    base_url: str
    webhook_url: str | None
    base64_output: bool
    preset: str
    profile: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: float
    outputs: list[str]
    error: str
    code: int | None
    execution_ms: int
    inference_ms: int
    attempts: int
    worker_id: str | None
    claim: str | None
    cancel_requested: bool
    account: str | None = None  # the owner (see migration 2); None: anonymous or legacy
    # The safety checker's verdict per output (migration 3); None: no check ran, or an older row.
    has_nsfw_contents: list[bool] | None = None
    input: dict[str, Any] = field(default_factory=dict)  # empty unless loaded (get_full, claims)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        columns = set(row.keys())  # (`in row` would search the values)
        return cls(
            seq=row["seq"],
            id=row["id"],
            model=row["model"],
            status=JobStatus(row["status"]),
            seed=row["seed"],
            base_url=row["base_url"],
            webhook_url=row["webhook_url"],
            base64_output=bool(row["base64_output"]),
            preset=row["preset"],
            profile=row["profile"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            progress=row["progress"],
            outputs=json.loads(row["outputs"]),
            error=row["error"],
            code=row["code"],
            execution_ms=row["execution_ms"],
            inference_ms=row["inference_ms"],
            attempts=row["attempts"],
            worker_id=row["worker_id"],
            claim=row["claim"],
            cancel_requested=bool(row["cancel_requested"]),
            account=row["account"] if "account" in columns else None,
            has_nsfw_contents=_json_or_none(row["has_nsfw_contents"])
            if "has_nsfw_contents" in columns
            else None,
            input=json.loads(row["input"]) if "input" in columns else {},
            params=json.loads(row["params"]) if "params" in columns else {},
        )


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass
class WorkerRecord:
    id: str
    pid: int | None
    device: str
    state: str  # starting | loading | ready | busy | stopped | crashed | failed
    model: str
    profile: str
    error: str
    started_at: float
    heartbeat_at: float
    job_id: str | None


@dataclass
class WebhookDelivery:
    id: int
    prediction_id: str
    url: str
    attempts: int
    created_at: float


@dataclass
class Upload:
    id: str
    filename: str
    content_type: str
    size: int
    complete: bool
    created_at: float
    account: str | None = None


@dataclass
class Expired:
    """What a retention sweep removed from the tables; the caller deletes the files."""

    output_files: list[str] = field(default_factory=list)
    upload_ids: list[str] = field(default_factory=list)


@dataclass
class Deleted:
    """What PredictionsTable.delete removed: ids, and the files the caller deletes."""

    ids: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # `image` of each deleted prediction
