"""The job table: predictions in SQLite (WAL), their state machine, and what survives a restart.

One database file under the data directory is shared by the HTTP process (submit, poll, cancel,
webhook delivery) and the worker processes (claim, progress, finish). WAL mode lets polls read
while a worker commits, so the API answers in milliseconds however busy the GPU is. Every state
change is one conditional UPDATE (or one short `BEGIN IMMEDIATE` transaction), so two processes
can never both move the same job.

States: created -> processing -> completed | failed, and cancelled (our extra cancel endpoint).
A claim token is written with each claim; a worker's later writes must carry it, so a worker that
was given up for dead (and its job re-queued) cannot overwrite the job's next run.

The same file also holds the webhook outbox (written in the same transaction as the terminal
state, so a finished job can never lose its webhook), the upload records and the server's secrets.
Timestamps are Unix seconds (UTC) as REAL; the wire format is produced in server/schemas.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import DiskFullError, SkyreelsError, TaskCode, is_disk_full

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2


class AllAccounts:
    """JobStore.history's default: no owner filter (the HTTP routes always pass the caller's)."""


ALL_ACCOUNTS = AllAccounts()


_CANCELLED = "status = 'cancelled', error = 'Prediction was cancelled'"


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
    account: str | None = None  # the owner (see _upgrade_to_2); None: anonymous or legacy
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
            input=json.loads(row["input"]) if "input" in columns else {},
            params=json.loads(row["params"]) if "params" in columns else {},
        )


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
    """What a retention sweep removed from the table; the caller deletes the files."""

    output_files: list[str] = field(default_factory=list)
    upload_ids: list[str] = field(default_factory=list)


@dataclass
class Deleted:
    """What delete_predictions removed: ids, and the files the caller deletes."""

    ids: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # `image` of each deleted prediction


_SCHEMA = """
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


# Every column but the large ones (input, params): what polls and history read.
_LIGHT_COLUMNS = """seq, id, model, status, seed, base_url, webhook_url, base64_output, preset, profile,
    created_at, started_at, finished_at, progress, outputs, error, code, execution_ms, inference_ms,
    attempts, worker_id, claim, cancel_requested, account"""


def _upgrade_to_2(conn: sqlite3.Connection) -> None:
    """Schema 2: predictions and uploads have an owner, the account of the API key that created
    them. Rows of an older database get NULL, the same owner as rows created with auth off:
    they are visible only while the server runs without keys (a keyed server shows them to no
    account; their signed URLs keep working until retention removes them)."""
    for table in ("predictions", "uploads"):
        columns = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
        if "account" not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN account TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS predictions_account_seq ON predictions (account, seq)")


class _ClosingConnection:
    """Holds a thread's own connection in its threading.local: when the thread ends, CPython
    drops this holder at once (it is in no reference cycle) and the connection is closed, instead
    of waiting for the garbage collector (sqlite3 connections sit in cycles)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


# Connections one store opens at most (about 2 file descriptors each in WAL mode, plus one shared
# -shm). Polls take well under a millisecond of database time, so a burst of 40 threads queues for
# a few milliseconds at most. A hard cap, not just a cap on idle ones: SQLite keeps the descriptor
# of a connection closed while another one holds a lock on the file open for later reuse, so
# opening extra connections during bursts would leave their descriptors behind anyway.
POOL_SIZE = 8
# Longer than this waiting for a pooled connection (only if something holds them all, e.g. the
# table is locked by a stuck writer): open an extra one rather than fail the request.
POOL_WAIT_S = 30.0


class JobStore:
    """All access to the SQLite file. A small pool of connections shared by threads; safe across
    processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._closed = False
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer skyreels-local (schema {version} > {SCHEMA_VERSION})"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if version < 2:
                _upgrade_to_2(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- connections -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves; timeout is SQLite's busy wait.
        # check_same_thread=False: a pooled connection serves one thread at a time, any thread.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an accepted job survives a power cut, not only a crash; the cost is one fsync
        # per commit, negligible next to a generation.
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for one operation, borrowed from a small pool and given back after it.

        Why a pool and not one connection per thread: the HTTP process runs sync routes on a
        threadpool of up to 40 threads that come and go; a connection per thread held its file
        descriptors (db, -wal, -shm) until the garbage collector found it, so polling bursts
        piled up ~120 descriptors. Here at most POOL_SIZE connections exist; a thread that finds
        them all busy waits for one. Nested use on one thread (a read inside a write) gets the
        same connection, so nesting never waits on itself."""
        held = getattr(self._local, "borrowed", None)
        if held is not None:
            yield held
            return
        pooled = self._slots.acquire(timeout=POOL_WAIT_S)
        if not pooled:
            log.warning(
                "job table: all %d connections busy for %gs; opening an extra one", POOL_SIZE, POOL_WAIT_S
            )
        try:
            conn = self._take_idle() if pooled else None
            conn = conn or self._open()
        except BaseException:
            if pooled:
                self._slots.release()
            raise
        self._local.borrowed = conn
        try:
            yield conn
        finally:
            self._local.borrowed = None
            self._give_back(conn, pooled)

    def _take_idle(self) -> sqlite3.Connection | None:
        with self._pool_lock:
            return self._idle.pop() if self._idle else None

    def _give_back(self, conn: sqlite3.Connection, pooled: bool) -> None:
        if conn.in_transaction:  # never hand on a connection stuck in a transaction
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        with self._pool_lock:
            keep = pooled and not self._closed
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        if pooled:
            self._slots.release()

    def _row(self, sql: str, args: tuple | list = ()) -> sqlite3.Row | None:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchone()

    def _rows(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple | list = ()) -> None:
        """One statement in autocommit mode (a single-row UPDATE needs no BEGIN IMMEDIATE)."""
        with self._connection() as conn:
            conn.execute(sql, args)

    def _conn(self) -> sqlite3.Connection:
        """A connection owned by the calling thread until it ends (then closed at once, not by
        the garbage collector). For tests and one-off scripts; the store itself uses
        `_connection()`, which keeps the number of open connections bounded."""
        held = getattr(self._local, "borrowed", None)
        if held is not None:
            return held
        owned = getattr(self._local, "owned", None)
        if owned is None:
            owned = self._local.owned = _ClosingConnection(self._open())
        return owned.conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no deadlock on upgrade).

        A failed statement or COMMIT leaves the table as it was: SQLite rolls back by itself on
        some errors (SQLITE_FULL, IOERR), so ROLLBACK is sent only while a transaction is still
        open; otherwise this thread's connection would be stuck inside a dead transaction. A full
        disk is raised as DiskFullError (a clear 503 / failed job, not an internal error)."""
        with self._connection() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if is_disk_full(exc):
                    log.error("job table %s: %s", self.path, exc)
                    raise DiskFullError(
                        "the server's disk is full, so the job table cannot be written; retry once space is freed"
                    ) from exc
                raise

    def close(self) -> None:
        """Close the pooled connections (and this thread's own one, if it made one)."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        owned = getattr(self._local, "owned", None)
        if owned is not None:
            owned.conn.close()
            self._local.owned = None

    # --- predictions: API side ---------------------------------------------------------------

    def create(
        self,
        *,
        id: str,
        model: str,
        input: dict[str, Any],
        params: dict[str, Any],
        seed: int,
        base_url: str,
        webhook_url: str | None = None,
        base64_output: bool = False,
        preset: str = "",
        max_queue: int | None = None,
        account: str | None = None,
        now: float | None = None,
    ) -> Job:
        """Insert a new job in `created`. Raises QueueFullError past `max_queue` waiting jobs."""
        now = time.time() if now is None else now
        with self._write() as conn:
            if max_queue is not None:
                waiting = conn.execute(
                    "SELECT COUNT(*) FROM predictions WHERE status = 'created'"
                ).fetchone()[0]
                if waiting >= max_queue:
                    raise QueueFullError(waiting)
            conn.execute(
                """INSERT INTO predictions (id, model, status, input, params, seed, base_url, webhook_url,
                   base64_output, preset, created_at, account) VALUES (?, ?, 'created', ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    id,
                    model,
                    json.dumps(input),
                    json.dumps(params),
                    seed,
                    base_url,
                    webhook_url,
                    int(base64_output),
                    preset,
                    now,
                    account,
                ),
            )
        job = self.get(id)
        assert job is not None
        return job

    def get(self, id: str) -> Job | None:
        row = self._row(f"SELECT {_LIGHT_COLUMNS} FROM predictions WHERE id = ?", (id,))
        return Job.from_row(row) if row is not None else None

    def get_full(self, id: str) -> Job | None:
        """With `input` and `params` (webhook bodies, the worker)."""
        row = self._row("SELECT * FROM predictions WHERE id = ?", (id,))
        return Job.from_row(row) if row is not None else None

    def queue_position(self, job: Job) -> int:
        """1-based place among waiting jobs (1 = next to run); 0 once it is no longer waiting."""
        if job.status != JobStatus.CREATED:
            return 0
        row = self._row("SELECT COUNT(*) FROM predictions WHERE status = 'created' AND seq <= ?", (job.seq,))
        return row[0]

    def queue_depth(self) -> int:
        return self._row("SELECT COUNT(*) FROM predictions WHERE status = 'created'")[0]

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        for status, count in self._rows("SELECT status, COUNT(*) FROM predictions GROUP BY status"):
            counts[status] = count
        return counts

    def generation_totals(self) -> tuple[int, float]:
        """(completed jobs, their summed execution seconds), for metrics."""
        count, total_ms = self._row(
            "SELECT COUNT(*), COALESCE(SUM(execution_ms), 0) FROM predictions WHERE status = 'completed'"
        )
        return count, total_ms / 1000.0

    def counters(self) -> dict[str, float]:
        """The monotonic totals (see the counters table), e.g. `denoise_steps`, `denoise_seconds`."""
        return {name: value for name, value in self._rows("SELECT name, value FROM counters")}

    def overdue_jobs(self, *, started_before: float) -> list[Job]:
        """Jobs still `processing` that were claimed before `started_before` (the job timeout)."""
        rows = self._rows(
            f"""SELECT {_LIGHT_COLUMNS} FROM predictions
                WHERE status = 'processing' AND started_at < ? ORDER BY seq""",
            (started_before,),
        )
        return [Job.from_row(row) for row in rows]

    def history(
        self,
        *,
        page: int = 1,
        page_size: int = 100,
        model: str | None = None,
        status: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        account: str | None | AllAccounts = ALL_ACCOUNTS,
    ) -> tuple[list[Job], int]:
        """Newest first, with the total count of matching jobs; of one account when `account` is
        given (None: the anonymous owner), of all (operators, tests) by default."""
        where: list[str] = []
        args: list[Any] = []
        if not isinstance(account, AllAccounts):
            where.append("account IS ?")  # IS: None matches the NULL (anonymous) owner
            args.append(account)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if created_after is not None:
            where.append("created_at >= ?")
            args.append(created_after)
        if created_before is not None:
            where.append("created_at <= ?")
            args.append(created_before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._connection() as conn:
            total = conn.execute(f"SELECT COUNT(*) FROM predictions {clause}", args).fetchone()[0]
            rows = conn.execute(
                f"SELECT {_LIGHT_COLUMNS} FROM predictions {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
                [*args, page_size, (page - 1) * page_size],
            ).fetchall()
        return [Job.from_row(row) for row in rows], total

    def request_cancel(self, id: str, *, now: float | None = None) -> Job | None:
        """A waiting job is cancelled at once; a running one is flagged and its worker stops it at
        the next step. Terminal jobs are left as they are. Returns the job after the change."""
        now = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute("SELECT status, webhook_url FROM predictions WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            if row["status"] == JobStatus.CREATED:
                conn.execute(
                    """UPDATE predictions SET status = 'cancelled', cancel_requested = 1, finished_at = ?,
                       error = 'Prediction was cancelled before it started' WHERE id = ?""",
                    (now, id),
                )
                self._enqueue_webhook(conn, id, row["webhook_url"], now)
            elif row["status"] == JobStatus.PROCESSING:
                conn.execute("UPDATE predictions SET cancel_requested = 1 WHERE id = ?", (id,))
        return self.get(id)

    def delete_predictions(self, ids: list[str], *, account: str | None) -> Deleted:
        """Delete the predictions of `ids` that `account` owns (others are skipped, as unknown
        ids are), with their webhook outbox rows. The caller cancels running ones first and
        deletes the files. A worker still running one finds its row gone and stops."""
        deleted = Deleted()
        if not ids:
            return deleted
        marks = ",".join("?" * len(ids))
        with self._write() as conn:
            rows = conn.execute(
                f"""DELETE FROM predictions WHERE id IN ({marks}) AND account IS ?
                    RETURNING id, outputs, input""",
                (*ids, account),
            ).fetchall()
            for row in rows:
                deleted.ids.append(row["id"])
                deleted.output_files.extend(json.loads(row["outputs"]))
                image = json.loads(row["input"]).get("image") if row["input"] else None
                if isinstance(image, str):
                    deleted.inputs.append(image)
            if deleted.ids:
                gone = ",".join("?" * len(deleted.ids))
                conn.execute(f"DELETE FROM webhooks WHERE prediction_id IN ({gone})", deleted.ids)
                # A worker running one stops at its next step (the row is gone) and takes the next job.
                conn.execute(
                    f"UPDATE workers SET job_id = NULL, state = 'ready' WHERE job_id IN ({gone})", deleted.ids
                )
        return deleted

    # --- predictions: worker side ------------------------------------------------------------

    def claim_next(
        self,
        worker_id: str,
        claim: str,
        *,
        profile: str = "",
        preset: str | None = None,
        now: float | None = None,
    ) -> Job | None:
        """Move the oldest waiting job to `processing` for this worker, atomically. `preset` is the
        speed preset the worker's engine really runs (a requested `fp8` may have fallen back)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute(
                """UPDATE predictions SET status = 'processing', worker_id = ?, claim = ?, started_at = ?,
                   attempts = attempts + 1, profile = ?, preset = COALESCE(?, preset), progress = 0
                   WHERE seq = (SELECT seq FROM predictions WHERE status = 'created' ORDER BY seq LIMIT 1)
                   RETURNING *""",
                (worker_id, claim, now, profile, preset),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE workers SET job_id = ?, state = 'busy' WHERE id = ?", (row["id"], worker_id)
                )
        return Job.from_row(row) if row is not None else None

    def set_progress(self, id: str, claim: str, progress: float) -> None:
        self._execute(
            "UPDATE predictions SET progress = ? WHERE id = ? AND claim = ? AND status = 'processing'",
            (progress, id, claim),
        )

    def should_stop(self, id: str, claim: str) -> bool:
        """True when the running job was cancelled, or taken away from this claim."""
        row = self._row("SELECT cancel_requested, status, claim FROM predictions WHERE id = ?", (id,))
        return (
            row is None
            or bool(row["cancel_requested"])
            or row["claim"] != claim
            or row["status"] != "processing"
        )

    def complete(
        self,
        id: str,
        claim: str,
        *,
        outputs: list[str],
        execution_ms: int,
        inference_ms: int,
        steps: int = 0,
        denoise_s: float = 0.0,
        now: float | None = None,
    ) -> bool:
        """Record the result. `steps` and `denoise_s` add to the step-time totals of /metrics.

        A cancel that arrived after the last denoising step (during decode or encode) still wins:
        a cancel answered `processing` always ends `cancelled`. The check and the state change
        are one transaction, so a cancel is either before it (job cancelled, no outputs; the
        worker deletes its video) or after it (the cancel finds the job completed and answers
        so). Returns True when this claim's outcome was recorded, either way."""
        recorded = self._finish(
            id,
            claim,
            "status = 'completed', progress = 1, outputs = ?, execution_ms = ?, inference_ms = ?, error = ''",
            (json.dumps(outputs), execution_ms, inference_ms),
            now,
            counters={"denoise_steps": steps, "denoise_seconds": denoise_s} if steps else None,
            unless_cancelled=True,
        )
        return recorded or self._finish(id, claim, _CANCELLED, (), now, only_if_cancel_requested=True)

    def fail(self, id: str, claim: str, *, code: int, error: str, now: float | None = None) -> bool:
        return self._finish(id, claim, "status = 'failed', code = ?, error = ?", (int(code), error), now)

    def mark_cancelled(self, id: str, claim: str, *, now: float | None = None) -> bool:
        return self._finish(id, claim, _CANCELLED, (), now)

    def requeue(self, id: str, claim: str) -> bool:
        """Give a job back to the queue (graceful shutdown): this attempt does not count."""
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE predictions SET status = 'created', claim = NULL, worker_id = NULL, progress = 0,
                   started_at = NULL, attempts = MAX(attempts - 1, 0)
                   WHERE id = ? AND claim = ? AND status = 'processing'""",
                (id, claim),
            )
            conn.execute("UPDATE workers SET job_id = NULL WHERE job_id = ?", (id,))
        return cursor.rowcount == 1

    def _finish(
        self,
        id: str,
        claim: str,
        assignments: str,
        args: tuple,
        now: float | None,
        *,
        counters: dict[str, float] | None = None,
        unless_cancelled: bool = False,
        only_if_cancel_requested: bool = False,
    ) -> bool:
        now = time.time() if now is None else now
        cancel_clause = ""
        if unless_cancelled:
            cancel_clause = " AND cancel_requested = 0"
        elif only_if_cancel_requested:
            cancel_clause = " AND cancel_requested = 1"
        with self._write() as conn:
            row = conn.execute(
                f"""UPDATE predictions SET {assignments}, finished_at = ?
                    WHERE id = ? AND claim = ? AND status = 'processing'{cancel_clause} RETURNING webhook_url""",
                (*args, now, id, claim),
            ).fetchone()
            if row is None:
                if not unless_cancelled:
                    log.warning("prediction %s: result of a stale claim ignored", id)
                return False
            self._enqueue_webhook(conn, id, row["webhook_url"], now)
            conn.execute("UPDATE workers SET job_id = NULL, state = 'ready' WHERE job_id = ?", (id,))
            for name, value in (counters or {}).items():
                conn.execute(
                    """INSERT INTO counters (name, value) VALUES (?, ?)
                       ON CONFLICT (name) DO UPDATE SET value = value + excluded.value""",
                    (name, value),
                )
        return True

    # --- recovery ----------------------------------------------------------------------------

    def recover_jobs(
        self, *, worker_ids: list[str] | None, max_attempts: int, now: float | None = None
    ) -> int:
        """Jobs left `processing` by dead workers (all of them when `worker_ids` is None): back to
        the queue, or `failed` with 5000 once they have been started `max_attempts` times."""
        now = time.time() if now is None else now
        with self._write() as conn:
            if worker_ids is None:
                rows = conn.execute(
                    "SELECT id, attempts, webhook_url FROM predictions WHERE status = 'processing'"
                )
            else:
                marks = ",".join("?" * len(worker_ids))
                rows = conn.execute(
                    f"""SELECT id, attempts, webhook_url FROM predictions
                        WHERE status = 'processing' AND (worker_id IN ({marks}) OR worker_id IS NULL)""",
                    worker_ids,
                )
            rows = rows.fetchall()
            for row in rows:
                if row["attempts"] >= max_attempts:
                    conn.execute(
                        """UPDATE predictions SET status = 'failed', code = ?, error = ?, finished_at = ?, claim = NULL
                           WHERE id = ?""",
                        (
                            int(TaskCode.INTERNAL_ERROR),
                            f"generation was interrupted {row['attempts']} times (worker crash or server "
                            "restart); giving up",
                            now,
                            row["id"],
                        ),
                    )
                    self._enqueue_webhook(conn, row["id"], row["webhook_url"], now)
                    log.error("prediction %s: interrupted %d times, failed", row["id"], row["attempts"])
                else:
                    conn.execute(
                        """UPDATE predictions SET status = 'created', claim = NULL, worker_id = NULL, progress = 0,
                           started_at = NULL WHERE id = ?""",
                        (row["id"],),
                    )
                    log.warning("prediction %s: interrupted, queued again", row["id"])
        return len(rows)

    # --- workers -----------------------------------------------------------------------------

    def register_worker(self, id: str, *, pid: int, device: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                """INSERT INTO workers (id, pid, device, state, started_at, heartbeat_at) VALUES (?, ?, ?, 'loading', ?, ?)
                   ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, device = excluded.device, state = 'loading',
                   model = '', profile = '', error = '', started_at = excluded.started_at,
                   heartbeat_at = excluded.heartbeat_at, job_id = NULL""",
                (id, pid, device, now, now),
            )

    def update_worker(self, id: str, **fields: Any) -> None:
        allowed = {"state", "model", "profile", "error", "pid", "job_id"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"unknown worker fields {sorted(set(fields) - allowed)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as conn:
            conn.execute(f"UPDATE workers SET {assignments} WHERE id = ?", (*fields.values(), id))

    def heartbeat(self, id: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, id))

    def workers(self) -> list[WorkerRecord]:
        rows = self._rows("SELECT * FROM workers ORDER BY id")
        return [WorkerRecord(**dict(row)) for row in rows]

    # --- webhook outbox ----------------------------------------------------------------------

    @staticmethod
    def _enqueue_webhook(conn: sqlite3.Connection, prediction_id: str, url: str | None, now: float) -> None:
        if url:
            conn.execute(
                "INSERT INTO webhooks (prediction_id, url, created_at, next_attempt_at) VALUES (?, ?, ?, ?)",
                (prediction_id, url, now, now),
            )

    def claim_due_webhooks(
        self, *, limit: int, lease_s: float, now: float | None = None
    ) -> list[WebhookDelivery]:
        """Pending deliveries that are due; each is leased (pushed back by `lease_s`) so that a
        crash mid-delivery only delays it."""
        now = time.time() if now is None else now
        with self._write() as conn:
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

    def webhook_delivered(self, id: int, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "UPDATE webhooks SET status = 'delivered', attempts = attempts + 1, delivered_at = ? WHERE id = ?",
                (now, id),
            )

    def webhook_failed(self, id: int, *, error: str, retry_at: float | None) -> None:
        """Record a failed attempt; `retry_at` None gives up on it (status dead)."""
        with self._write() as conn:
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

    def webhook_deliveries(self, prediction_id: str) -> list[dict[str, Any]]:
        """A prediction's webhook deliveries, oldest first: status pending | delivered | dead."""
        rows = self._rows(
            """SELECT url, status, attempts, created_at, next_attempt_at, delivered_at, last_error
               FROM webhooks WHERE prediction_id = ? ORDER BY id""",
            (prediction_id,),
        )
        return [dict(row) for row in rows]

    def webhook_counts(self) -> dict[str, int]:
        counts = {"pending": 0, "delivered": 0, "dead": 0, "failed_attempts": 0}
        for status, count in self._rows("SELECT status, COUNT(*) FROM webhooks GROUP BY status"):
            counts[status] = count
        counts["failed_attempts"] = self._row(
            "SELECT COALESCE(SUM(attempts - (status = 'delivered')), 0) FROM webhooks WHERE attempts > 0"
        )[0]
        return counts

    # --- uploads and secrets -----------------------------------------------------------------

    def create_upload(
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
        with self._write() as conn:
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

    def complete_upload(self, id: str, *, size: int, content_type: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE uploads SET complete = 1, size = ?, content_type = ? WHERE id = ?",
                (size, content_type, id),
            )

    def get_upload(self, id: str) -> Upload | None:
        row = self._row("SELECT * FROM uploads WHERE id = ?", (id,))
        if row is None:
            return None
        return Upload(**{**dict(row), "complete": bool(row["complete"])})

    def delete_upload(self, id: str, *, account: str | None) -> bool:
        """Remove an upload's row when `account` owns it; the caller deletes its files."""
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM uploads WHERE id = ? AND account IS ?", (id, account))
        return cursor.rowcount == 1

    def secret(self, name: str, default: str) -> str:
        """The stored secret `name`, created as `default` on first use (the same in every process)."""
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, default))
            return conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0]

    # --- retention ---------------------------------------------------------------------------

    def expire(self, *, before: float) -> Expired:
        """Delete finished predictions and uploads created before `before` (and settled webhooks)."""
        expired = Expired()
        with self._write() as conn:
            rows = conn.execute(
                """DELETE FROM predictions WHERE created_at < ? AND status IN ('completed', 'failed', 'cancelled')
                   AND id NOT IN (SELECT prediction_id FROM webhooks WHERE status = 'pending')
                   RETURNING outputs""",
                (before,),
            ).fetchall()
            for row in rows:
                expired.output_files.extend(json.loads(row["outputs"]))
            expired.upload_ids = [
                row["id"]
                for row in conn.execute(
                    "DELETE FROM uploads WHERE created_at < ? RETURNING id", (before,)
                ).fetchall()
            ]
            conn.execute("DELETE FROM webhooks WHERE status != 'pending' AND created_at < ?", (before,))
        return expired
