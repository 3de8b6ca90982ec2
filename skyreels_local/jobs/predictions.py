"""The predictions table and its state machine: what survives a restart.

States: created -> processing -> completed | failed, and cancelled (our extra cancel endpoint).
A claim token is written with each claim; a worker's later writes must carry it, so a worker that
was given up for dead (and its job re-queued) cannot overwrite the job's next run.

A job's terminal state, its webhook outbox row, its worker's release and the /metrics counters
are written in one transaction: this table owns those operations and hands its connection to
the other tables' helpers (WebhooksTable.enqueue, WorkersTable.finished_jobs, CountersTable.add).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import TaskCode
from .counters import NSFW_BLOCKED, NSFW_FLAGGED, SAFETY_CHECKS
from .models import ALL_ACCOUNTS, AllAccounts, Deleted, Expired, Job, JobStatus, QueueFullError

if TYPE_CHECKING:
    from .db import Database

log = logging.getLogger(__name__)

_CANCELLED = "status = 'cancelled', error = 'Prediction was cancelled'"

# Every column but the large ones (input, params): what polls and history read.
_LIGHT_COLUMNS = """seq, id, model, status, seed, base_url, webhook_url, base64_output, preset, profile,
    created_at, started_at, finished_at, progress, outputs, error, code, execution_ms, inference_ms,
    attempts, worker_id, claim, cancel_requested, account, has_nsfw_contents"""


class PredictionsTable:
    def __init__(self, db: Database) -> None:
        self._db = db

    # --- API side ---------------------------------------------------------------------------

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
        with self._db.write() as conn:
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
        row = self._db.row(f"SELECT {_LIGHT_COLUMNS} FROM predictions WHERE id = ?", (id,))
        return Job.from_row(row) if row is not None else None

    def get_full(self, id: str) -> Job | None:
        """With `input` and `params` (webhook bodies, the worker)."""
        row = self._db.row("SELECT * FROM predictions WHERE id = ?", (id,))
        return Job.from_row(row) if row is not None else None

    def queue_position(self, job: Job) -> int:
        """1-based place among waiting jobs (1 = next to run); 0 once it is no longer waiting."""
        if job.status != JobStatus.CREATED:
            return 0
        row = self._db.row(
            "SELECT COUNT(*) FROM predictions WHERE status = 'created' AND seq <= ?", (job.seq,)
        )
        return row[0]

    def queue_depth(self) -> int:
        return self._db.row("SELECT COUNT(*) FROM predictions WHERE status = 'created'")[0]

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        for status, count in self._db.rows("SELECT status, COUNT(*) FROM predictions GROUP BY status"):
            counts[status] = count
        return counts

    def generation_totals(self) -> tuple[int, float]:
        """(completed jobs, their summed execution seconds), for metrics."""
        count, total_ms = self._db.row(
            "SELECT COUNT(*), COALESCE(SUM(execution_ms), 0) FROM predictions WHERE status = 'completed'"
        )
        return count, total_ms / 1000.0

    def overdue_jobs(self, *, started_before: float) -> list[Job]:
        """Jobs still `processing` that were claimed before `started_before` (the job timeout)."""
        rows = self._db.rows(
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
        with self._db.connection() as conn:
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
        with self._db.write() as conn:
            row = conn.execute("SELECT status, webhook_url FROM predictions WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            if row["status"] == JobStatus.CREATED:
                conn.execute(
                    """UPDATE predictions SET status = 'cancelled', cancel_requested = 1, finished_at = ?,
                       error = 'Prediction was cancelled before it started' WHERE id = ?""",
                    (now, id),
                )
                self._db.webhooks.enqueue(conn, id, row["webhook_url"], now)
            elif row["status"] == JobStatus.PROCESSING:
                conn.execute("UPDATE predictions SET cancel_requested = 1 WHERE id = ?", (id,))
        return self.get(id)

    def delete(self, ids: list[str], *, account: str | None) -> Deleted:
        """Delete the predictions of `ids` that `account` owns (others are skipped, as unknown
        ids are), with their webhook outbox rows. The caller cancels running ones first and
        deletes the files. A worker still running one finds its row gone and stops."""
        deleted = Deleted()
        if not ids:
            return deleted
        marks = ",".join("?" * len(ids))
        with self._db.write() as conn:
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
                self._db.webhooks.forget(conn, deleted.ids)
                # A worker running one stops at its next step (the row is gone) and takes the next job.
                self._db.workers.finished_jobs(conn, deleted.ids)
        return deleted

    # --- worker side ------------------------------------------------------------------------

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
        with self._db.write() as conn:
            row = conn.execute(
                """UPDATE predictions SET status = 'processing', worker_id = ?, claim = ?, started_at = ?,
                   attempts = attempts + 1, profile = ?, preset = COALESCE(?, preset), progress = 0
                   WHERE seq = (SELECT seq FROM predictions WHERE status = 'created' ORDER BY seq LIMIT 1)
                   RETURNING *""",
                (worker_id, claim, now, profile, preset),
            ).fetchone()
            if row is not None:
                self._db.workers.took_job(conn, worker_id, row["id"])
        return Job.from_row(row) if row is not None else None

    def peek_next(self) -> Job | None:
        """The job `claim_next` would take now (the oldest waiting one, with its params), read
        only: nothing changes. A worker prefetches its prompts; another worker may claim it first."""
        row = self._db.row("SELECT * FROM predictions WHERE status = 'created' ORDER BY seq LIMIT 1")
        return Job.from_row(row) if row is not None else None

    def set_progress(self, id: str, claim: str, progress: float) -> None:
        self._db.execute(
            "UPDATE predictions SET progress = ? WHERE id = ? AND claim = ? AND status = 'processing'",
            (progress, id, claim),
        )

    def should_stop(self, id: str, claim: str) -> bool:
        """True when the running job was cancelled, or taken away from this claim."""
        row = self._db.row("SELECT cancel_requested, status, claim FROM predictions WHERE id = ?", (id,))
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
        has_nsfw_contents: list[bool] | None = None,
        now: float | None = None,
    ) -> bool:
        """Record the result. `steps` and `denoise_s` add to the step-time totals of /metrics.
        `has_nsfw_contents`: the safety checker's verdict per output (None: no check ran); the
        checks and the flagged outputs add to the safety totals of /metrics in the same
        transaction, so each recorded outcome is counted exactly once.

        A cancel that arrived after the last denoising step (during decode or encode) still wins:
        a cancel answered `processing` always ends `cancelled`. The check and the state change
        are one transaction, so a cancel is either before it (job cancelled, no outputs; the
        worker deletes its video) or after it (the cancel finds the job completed and answers
        so). Returns True when this claim's outcome was recorded, either way."""
        counters: dict[str, float] = {"denoise_steps": steps, "denoise_seconds": denoise_s} if steps else {}
        if has_nsfw_contents is not None:
            counters |= {SAFETY_CHECKS: len(has_nsfw_contents), NSFW_FLAGGED: sum(has_nsfw_contents)}
        recorded = self._finish(
            id,
            claim,
            """status = 'completed', progress = 1, outputs = ?, execution_ms = ?, inference_ms = ?, error = '',
               has_nsfw_contents = ?""",
            (
                json.dumps(outputs),
                execution_ms,
                inference_ms,
                None if has_nsfw_contents is None else json.dumps(has_nsfw_contents),
            ),
            now,
            counters=counters,
            unless_cancelled=True,
        )
        return recorded or self._finish(id, claim, _CANCELLED, (), now, only_if_cancel_requested=True)

    def fail(
        self,
        id: str,
        claim: str,
        *,
        code: int,
        error: str,
        nsfw_blocked: bool = False,
        now: float | None = None,
    ) -> bool:
        """Record a failure. `nsfw_blocked`: the safety checker withheld the video
        (--nsfw-action block), counted for /metrics in the same transaction."""
        return self._finish(
            id,
            claim,
            "status = 'failed', code = ?, error = ?",
            (int(code), error),
            now,
            counters={SAFETY_CHECKS: 1, NSFW_BLOCKED: 1} if nsfw_blocked else None,
        )

    def mark_cancelled(self, id: str, claim: str, *, now: float | None = None) -> bool:
        return self._finish(id, claim, _CANCELLED, (), now)

    def requeue(self, id: str, claim: str) -> bool:
        """Give a job back to the queue (graceful shutdown): this attempt does not count."""
        with self._db.write() as conn:
            cursor = conn.execute(
                """UPDATE predictions SET status = 'created', claim = NULL, worker_id = NULL, progress = 0,
                   started_at = NULL, attempts = MAX(attempts - 1, 0)
                   WHERE id = ? AND claim = ? AND status = 'processing'""",
                (id, claim),
            )
            self._db.workers.dropped_job(conn, id)
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
        with self._db.write() as conn:
            row = conn.execute(
                f"""UPDATE predictions SET {assignments}, finished_at = ?
                    WHERE id = ? AND claim = ? AND status = 'processing'{cancel_clause} RETURNING webhook_url""",
                (*args, now, id, claim),
            ).fetchone()
            if row is None:
                if not unless_cancelled:
                    log.warning("prediction %s: result of a stale claim ignored", id)
                return False
            self._db.webhooks.enqueue(conn, id, row["webhook_url"], now)
            self._db.workers.finished_jobs(conn, [id])
            self._db.counters.add(conn, counters or {})
        return True

    # --- recovery ----------------------------------------------------------------------------

    def recover(self, *, worker_ids: list[str] | None, max_attempts: int, now: float | None = None) -> int:
        """Jobs left `processing` by dead workers (all of them when `worker_ids` is None): back to
        the queue, or `failed` with 5000 once they have been started `max_attempts` times."""
        now = time.time() if now is None else now
        with self._db.write() as conn:
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
                    self._db.webhooks.enqueue(conn, row["id"], row["webhook_url"], now)
                    log.error("prediction %s: interrupted %d times, failed", row["id"], row["attempts"])
                else:
                    conn.execute(
                        """UPDATE predictions SET status = 'created', claim = NULL, worker_id = NULL, progress = 0,
                           started_at = NULL WHERE id = ?""",
                        (row["id"],),
                    )
                    log.warning("prediction %s: interrupted, queued again", row["id"])
        return len(rows)

    # --- retention ---------------------------------------------------------------------------

    def expire(self, *, before: float) -> Expired:
        """Delete finished predictions and uploads created before `before` (and settled webhooks),
        in one transaction: a prediction whose webhook is still pending is kept."""
        expired = Expired()
        with self._db.write() as conn:
            rows = conn.execute(
                """DELETE FROM predictions WHERE created_at < ? AND status IN ('completed', 'failed', 'cancelled')
                   AND id NOT IN (SELECT prediction_id FROM webhooks WHERE status = 'pending')
                   RETURNING outputs""",
                (before,),
            ).fetchall()
            for row in rows:
                expired.output_files.extend(json.loads(row["outputs"]))
            expired.upload_ids = self._db.uploads.expire(conn, before=before)
            self._db.webhooks.expire_settled(conn, before=before)
        return expired
