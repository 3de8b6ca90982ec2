"""The job database: predictions in SQLite (WAL), their state machine, and what survives a restart.

`Database(path)` opens (and upgrades) the file; each table is an attribute: `db.predictions`,
`db.workers`, `db.webhooks` (the outbox), `db.uploads`, `db.secrets`, `db.counters`.
"""

from .db import POOL_SIZE, Database
from .migrations import LATEST_VERSION
from .models import (
    TERMINAL_STATUSES,
    Job,
    JobStatus,
    QueueFullError,
    Upload,
    WebhookDelivery,
    WorkerRecord,
)

__all__ = [
    "LATEST_VERSION",
    "POOL_SIZE",
    "TERMINAL_STATUSES",
    "Database",
    "Job",
    "JobStatus",
    "QueueFullError",
    "Upload",
    "WebhookDelivery",
    "WorkerRecord",
]
