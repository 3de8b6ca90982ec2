"""The API side of the cluster mode: a thread in `serve --broker` (torch-free) that hands the job
table's waiting jobs to Celery and writes what the remote workers report back into the table.

The job table stays the single source of truth; this thread is the only writer of remote jobs
(besides the API's cancel and delete, which only flag or remove rows). Each cycle:

1. Follow every dispatched job (MGET of their Celery results): a worker reported it started
   (-> `processing`, an attempt), its progress, or its outcome (the MP4 is written under
   outputs/ atomically, then the outcome recorded guarded by the dispatch token, so a job never
   completes twice); a job past --job-timeout-s fails with 5004; a cancel sets cancel:<id>.
2. A running job whose worker's heartbeat stopped showing it (killed: its key expires after 4
   heartbeats; host gone; restarted), for 2 more heartbeats, is dispatched again under a new
   token (an attempt; --max-attempts applies), ahead of the new jobs in the queue.
3. Jobs that ended in the table while dispatched (cancelled while queued, deleted) get their
   marker deleted, cancel:<id> set and their task revoked: a worker drops or stops them.
4. Reconcile (every few seconds): a dispatch whose marker is gone (Redis restarted without AOF)
   is sent again. At start, after a Redis restart (its run_id changed) and after any Redis error,
   every queued dispatch is re-sent under a fresh token, since its message may be lost (an API
   killed between the marker and the send, the last second of an AOF); the old message, if it
   survived, is dropped by the worker's stale-token check.
5. Send new jobs, oldest first, through a send window: at most W jobs sent but not yet started
   (W = --broker-send-window, default max(2, 2 x live workers of the model key)); the others
   wait in the table (`created`, no claim: their queue position is the same), so Redis holds a
   few input images rather than the whole queue's, and a Redis restart without AOF re-sends
   only those few. For each: fetch the input image on a few fetch threads (media/fetch.py;
   failure -> 1402 as a local worker would), then assign a fresh token, write the marker, send
   the task to the model key's queue. (Re-sends fetch on the dispatcher's thread: they are
   rare; they go out at once, ahead of the new jobs, even if the window is full.)

Redis down: submits are still accepted (the table) and the cycle is retried with backoff.
Only jobs the API accepted (authenticated) are ever in the table, so only those are sent.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import SkyreelsError, TaskCode, is_disk_full
from ..jobs import Database, Job, JobStatus
from ..jobs.remote import REQUEUED, RemoteJobs
from ..media.fetch import ImageFetcher
from . import protocol as p

log = logging.getLogger(__name__)

POLL_S = 0.25
MAX_BACKOFF_S = 30.0
RECONCILE_S = 5.0
# Redis priorities (kombu keeps one list per step and workers pop step 0 first): a job sent
# again (its worker lost, its message lost) goes ahead of the new ones, as a local job that
# is re-queued keeps its place in the table's order.
AGAIN_PRIORITY = 0
NEW_PRIORITY = 3
FETCHERS = 4  # input images fetched at once, off the dispatcher's thread (a URL can take 30 s)
FETCH_AHEAD = 16  # new jobs being fetched at a time (a long queue goes out over a few cycles)
FETCH_WAIT_S = 0.2  # a cycle waits this long for fresh fetches (data: URIs, uploads: milliseconds)
# Default send window: twice the live workers (each has its next job waiting in Redis when it
# finishes one, with no round trip through the dispatcher), and at least this many.
MIN_SEND_WINDOW = 2
SENT_PER_WORKER = 2


def new_token() -> str:
    return secrets.token_hex(8)


class Dispatcher:
    def __init__(self, settings: Settings, db: Database, *, fetcher: ImageFetcher, outputs: Path) -> None:
        self.settings = settings
        self.db = db
        self.remote = RemoteJobs(db)
        self.fetcher = fetcher
        self.outputs = outputs
        self.key = p.model_key(settings.model)
        self.queue = p.queue_name(self.key)
        # After the heartbeat key expired (4 beats), 2 more beats of grace: a job that ends while
        # its worker already beats `idle` has its outcome stored within milliseconds, and after a
        # Redis restart without AOF the live workers' keys come back with their next beat.
        self.lost_after_s = max(1.0, 2 * settings.cluster_heartbeat_s)
        self.reconcile_s = min(RECONCILE_S, max(1.0, settings.cluster_heartbeat_s))
        self._app: Any = None
        self._redis: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-dispatcher", daemon=True)
        self._fetch_pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="cluster-fetch")
        self._fetching: dict[str, tuple[Job, Future]] = {}  # new jobs whose image is being fetched
        self._tracked: dict[str, str] = {}  # prediction id -> token, of the jobs in flight last cycle
        self._cancel_sent: set[str] = set()
        self._missing_since: dict[str, float] = {}
        self._run_id: str | None = None
        self._resync = True  # re-send queued dispatches (at start, after a Redis restart or error)
        self._last_reconcile = 0.0
        self.workers: list[p.WorkerBeat] = []  # the live workers, as their heartbeats say
        self.connected = False
        self.last_error = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> None:
        import redis

        from .celery_app import make_celery, visibility_timeout_s

        self._app = make_celery(self.settings)
        self._redis = redis.Redis.from_url(
            self.settings.broker, socket_timeout=10, socket_connect_timeout=3, health_check_interval=30
        )
        self._cancel_ttl_s = int(visibility_timeout_s(self.settings))

    def start(self) -> None:
        self.connect()
        log.info("dispatching jobs to Celery queue %s (model key %s)", self.queue, self.key)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        delay = POLL_S
        while not self._stop.wait(delay):
            try:
                self.cycle()
            except Exception as exc:
                # Redis down or restarting, mostly: jobs stay in the table; try again with backoff,
                # then re-send the queued dispatches (a message may have been lost meanwhile).
                self.connected = False
                if _is_connection_error(exc):
                    self._resync = True  # a marker or a message may not have reached Redis
                    self.workers = []  # unknown while Redis is unreachable: /ready says 503
                delay = min(max(delay * 2, 1.0), MAX_BACKOFF_S)
                self.last_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("cluster dispatcher: %s; retrying in %.0fs", self.last_error, delay)
                if not _is_connection_error(exc):
                    log.exception("cluster dispatcher: unexpected error")
            else:
                if not self.connected:
                    log.info("cluster dispatcher: connected to the broker")
                self.connected = True
                self.last_error = ""
                delay = POLL_S

    # --- one cycle ---------------------------------------------------------------------------

    def cycle(self) -> None:
        now = time.time()
        self._notice_redis_restart()
        self._refresh_workers()
        jobs = self.remote.in_flight()
        self._forget_ended({job.id for job in jobs})
        metas = self._results(jobs)
        for job in jobs:
            self._follow(job, metas.get(job.id), now)
        if self._resync:
            self._resend_queued(now)
            self._sweep_stray_markers()
            self._resync = False
            self._last_reconcile = now
        elif now - self._last_reconcile >= self.reconcile_s:
            self._reconcile()
            self._last_reconcile = now
        self._dispatch_new()

    def _notice_redis_restart(self) -> None:
        run_id = self._redis.info("server").get("run_id")
        if self._run_id is not None and run_id != self._run_id:
            log.warning("cluster dispatcher: Redis restarted; re-sending the queued jobs")
            self._resync = True
        self._run_id = run_id

    def _refresh_workers(self) -> None:
        keys = list(self._redis.scan_iter(match=p.WORKER_KEY_PATTERN, count=500))
        beats = []
        for raw in self._redis.mget(keys) if keys else []:
            if raw:
                try:
                    beats.append(p.WorkerBeat.loads(raw))
                except (ValueError, TypeError):
                    continue
        self.workers = sorted(beats, key=lambda b: b.id)

    def _results(self, jobs: list[Job]) -> dict[str, dict]:
        """Each job's Celery result meta (status + result) for its current token, one MGET."""
        if not jobs:
            return {}
        backend = self._app.backend
        keys = [backend.get_key_for_task(p.task_id(job.id, job.claim or "")) for job in jobs]
        metas = {}
        for job, raw in zip(jobs, self._redis.mget(keys), strict=True):
            if raw is not None:
                metas[job.id] = backend.decode_result(raw)
        return metas

    def _follow(self, job: Job, meta: dict | None, now: float) -> None:
        token = job.claim or ""
        self._tracked[job.id] = token
        state = meta["status"] if meta else "PENDING"
        info = meta.get("result") if meta else None
        if state == "SUCCESS":
            self._record(job, p.Outcome.from_json(info))
            return
        if state == "FAILURE":
            # The task body catches every generation error itself: a FAILURE is the worker's
            # plumbing (Redis unreachable mid-task, a payload it cannot read). Dispatch it again,
            # as an attempt, so that --max-attempts ends a failure that repeats.
            self._forget_result(job.id, token)
            if job.status == JobStatus.CREATED:
                self.remote.mark_started(job.id, token, worker_id="?")
            self._redispatch(job, f"its worker failed: {str(info)[:300]}")
            return
        if state in ("STARTED", "PROGRESS") and isinstance(info, dict):
            # STARTED is Celery's own (task_track_started: {"hostname": "<worker id>@<host>"}),
            # PROGRESS the worker's: either way a worker took it, and from now on its heartbeat
            # must show it (the lost-worker check).
            worker = str(info.get("worker") or str(info.get("hostname", "")).partition("@")[0])
            if job.status == JobStatus.CREATED:
                self.remote.mark_started(
                    job.id, token, worker_id=worker, profile=str(info.get("profile", "")),
                    preset=str(info.get("preset", "")), now=now,
                )  # fmt: skip
                log.info("prediction %s: started on remote worker %s", job.id, worker)
                return
            if state == "PROGRESS":
                self.db.predictions.set_progress(job.id, token, float(info.get("fraction", 0.0)))
        if job.status != JobStatus.PROCESSING:
            return
        if job.cancel_requested and job.id not in self._cancel_sent:
            self._redis.set(p.cancel_key(job.id), "1", ex=self._cancel_ttl_s)
            self._cancel_sent.add(job.id)
        if job.started_at is not None and now - job.started_at > self.settings.job_timeout_s:
            self._time_out(job)
            return
        self._check_alive(job, now)

    def _time_out(self, job: Job) -> None:
        timeout = self.settings.job_timeout_s
        error = (
            f"generation did not finish within the job timeout of {timeout:g} s "
            "(--job-timeout-s / SKYREELS_JOB_TIMEOUT_S); its remote worker was told to stop"
        )
        if self.db.predictions.fail(job.id, job.claim or "", code=TaskCode.TIMEOUT, error=error):
            log.error("prediction %s: past the %gs job timeout on worker %s", job.id, timeout, job.worker_id)
            self._end(job.id, cancel=True)

    def _check_alive(self, job: Job, now: float) -> None:
        """A running job that its worker's heartbeat has not shown for lost_after_s is lost."""
        beat = next((b for b in self.workers if b.id == job.worker_id), None)
        if beat is not None and beat.job_id == job.id and beat.token == job.claim:
            self._missing_since.pop(job.id, None)
            return
        since = self._missing_since.setdefault(job.id, now)
        if now - since < self.lost_after_s:
            return
        self._missing_since.pop(job.id, None)
        reason = (
            f"remote worker {job.worker_id} lost" if beat is None else f"worker {job.worker_id} dropped it"
        )
        self._redispatch(job, reason)

    def _redispatch(self, job: Job, reason: str) -> None:
        token = new_token()
        outcome = self.remote.redispatch_lost(
            job.id, job.claim or "", token, max_attempts=self.settings.max_attempts, reason=reason
        )
        if not outcome:
            return
        if outcome != REQUEUED:
            log.error("prediction %s: %s; %s", job.id, reason, outcome)
            self._end(job.id, cancel=True)
            return
        full = self.db.predictions.get_full(job.id)
        if full is not None:
            log.warning(
                "prediction %s: %s; dispatched again (%d attempts so far)", job.id, reason, full.attempts
            )
            self._send(full, token, again=True)

    # --- outcomes ----------------------------------------------------------------------------

    def _record(self, job: Job, outcome: p.Outcome) -> None:
        token = job.claim or ""
        if outcome.status == p.STALE:
            # The worker found no (or another) marker: dispatch it again rather than wait.
            self._forget_result(job.id, token)
            if job.status == JobStatus.CREATED:
                self._resend(job, reason="its marker was gone when a worker took it")
            else:
                self._redispatch(job, "its worker found the dispatch stale")
            return
        if job.status == JobStatus.CREATED:  # finished before a cycle saw it start
            self.remote.mark_started(
                job.id, token, worker_id=outcome.worker, profile=outcome.profile, preset=outcome.preset
            )
        if outcome.status == p.COMPLETED:
            self._record_video(job, token, outcome)
        elif outcome.status == p.CANCELLED:
            if self.db.predictions.mark_cancelled(job.id, token):
                log.info("prediction %s: cancelled on worker %s", job.id, outcome.worker)
        else:
            if self.db.predictions.fail(
                job.id, token, code=outcome.code or int(TaskCode.INTERNAL_ERROR), error=outcome.message,
                nsfw_blocked=outcome.nsfw_blocked,
            ):  # fmt: skip
                log.warning("prediction %s: failed on worker %s: %s", job.id, outcome.worker, outcome.message)
        self._forget_result(job.id, token)
        self._end(job.id, cancel=False)

    def _record_video(self, job: Job, token: str, outcome: p.Outcome) -> None:
        current = self.db.predictions.get(job.id)
        if current is None or current.claim != token or current.status != JobStatus.PROCESSING:
            return  # deleted, or no longer this dispatch's: nothing to write
        name = f"{job.id}.mp4"
        try:
            write_atomically(self.outputs / name, outcome.video(), temp_tag=token)
        except OSError as exc:
            message = (
                "the server's disk is full: the output video could not be written"
                if is_disk_full(exc)
                else f"could not write the output video: {exc}"
            )
            log.error("prediction %s: %s", job.id, message)
            self.db.predictions.fail(job.id, token, code=TaskCode.INTERNAL_ERROR, error=message)
            return
        self.db.predictions.complete(
            job.id, token, outputs=[name], execution_ms=outcome.execution_ms,
            inference_ms=outcome.inference_ms, steps=outcome.steps, denoise_s=outcome.denoise_s,
            has_nsfw_contents=outcome.has_nsfw_contents,
        )  # fmt: skip
        final = self.db.predictions.get(job.id)
        if final is None or final.status != JobStatus.COMPLETED:
            # Deleted while it ran, or a cancel that came after the last step: it wins.
            (self.outputs / name).unlink(missing_ok=True)
            return
        log.info(
            "prediction %s: completed on remote worker %s in %.1fs (seed %s)",
            job.id, outcome.worker, outcome.execution_ms / 1000, outcome.seed,
        )  # fmt: skip

    def _forget_result(self, prediction_id: str, token: str) -> None:
        self._redis.delete(self._app.backend.get_key_for_task(p.task_id(prediction_id, token)))

    def _end(self, prediction_id: str, *, cancel: bool) -> None:
        """The job ended in the table: no worker may start (cancel: or go on with) it."""
        if cancel:
            self._redis.set(p.cancel_key(prediction_id), "1", ex=self._cancel_ttl_s)
        self._redis.delete(p.dispatch_key(prediction_id))
        self._tracked.pop(prediction_id, None)
        self._cancel_sent.discard(prediction_id)
        self._missing_since.pop(prediction_id, None)

    def _forget_ended(self, in_flight: set[str]) -> None:
        """Jobs that ended in the table while dispatched (a cancel while queued, a delete, the
        supervisor's timeout): tell the workers, and revoke the queued message."""
        for prediction_id, token in list(self._tracked.items()):
            if prediction_id in in_flight:
                continue
            self._end(prediction_id, cancel=True)
            try:  # no terminate: a running one stops cooperatively (the cancel key)
                self._app.control.revoke(p.task_id(prediction_id, token))
            except Exception as exc:
                log.debug("revoke of %s failed: %s", prediction_id, exc)

    # --- reconcile ---------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Dispatches whose marker is gone (Redis restarted without AOF): a queued one is sent
        again; a running one whose worker still shows it gets its marker back (the lost-worker
        check handles the others)."""
        jobs = self.remote.in_flight()
        if not jobs:
            return
        markers = self._redis.mget([p.dispatch_key(job.id) for job in jobs])
        for job, marker in zip(jobs, markers, strict=True):
            if marker is not None and marker.decode() == job.claim:
                continue
            if job.status == JobStatus.CREATED:
                self._resend(job, reason="its marker is gone (Redis lost its data?)")
            elif any(b.id == job.worker_id and b.job_id == job.id for b in self.workers):
                self._redis.set(p.dispatch_key(job.id), job.claim or "")

    def _resend_queued(self, now: float) -> None:
        """Every queued dispatch whose task has not started, under a fresh token."""
        jobs = [job for job in self.remote.in_flight() if job.status == JobStatus.CREATED]
        metas = self._results(jobs)
        resent = 0
        for job in jobs:
            if job.id not in metas:  # PENDING: queued, or its message lost
                self._resend(job, reason="")
                resent += 1
        if resent:
            log.info("cluster dispatcher: re-sent %d queued jobs under fresh tokens", resent)

    def _resend(self, job: Job, *, reason: str) -> None:
        token = new_token()
        if not self.remote.assign(job.id, token, previous=job.claim):
            return
        if reason:
            log.warning("prediction %s: %s; dispatched again", job.id, reason)
        full = self.db.predictions.get_full(job.id)
        if full is not None:
            self._send(full, token, again=True)

    def _sweep_stray_markers(self) -> None:
        """Markers of this table's jobs that ended while the API was down (markers of unknown
        ids are left alone: they may be another API's, sharing this Redis database)."""
        keys = list(self._redis.scan_iter(match=p.DISPATCH_KEY_PATTERN, count=500))
        for key in keys:
            prediction_id = key.decode().rpartition(":")[2]
            job = self.db.predictions.get(prediction_id)
            if job is not None and job.terminal:
                self._end(prediction_id, cancel=True)

    # --- sending -----------------------------------------------------------------------------

    def send_window(self) -> int:
        """How many jobs may wait in Redis, sent but not started (module docstring, step 5)."""
        if self.settings.broker_send_window is not None:
            return self.settings.broker_send_window
        live = [b for b in self.workers if b.model_key == self.key and b.state != "failed"]
        return max(MIN_SEND_WINDOW, SENT_PER_WORKER * len(live))

    def _dispatch_new(self) -> None:
        """Fetch the images of new jobs on the fetch threads, and send each job once its image is
        in: a slow image URL holds up neither the other jobs nor the outcomes. A job being
        fetched holds a place in the send window: it is sent next."""
        room = self.send_window() - self.remote.sent_waiting() - len(self._fetching)
        room = min(room, FETCH_AHEAD - len(self._fetching))
        if room > 0:
            # The oldest waiting jobs (those being fetched come back too, no claim yet: skipped).
            for job in self.remote.undispatched(len(self._fetching) + room):
                if job.id not in self._fetching and room > 0:
                    self._fetching[job.id] = (job, self._fetch_pool.submit(self._fetch_png, job))
                    room -= 1
        if self._fetching:
            wait(
                [future for _, future in self._fetching.values()],
                timeout=FETCH_WAIT_S,
                return_when=ALL_COMPLETED,
            )
        for prediction_id, (job, future) in list(self._fetching.items()):
            if self._stop.is_set():
                return
            if not future.done():
                continue
            del self._fetching[prediction_id]
            token = new_token()
            if self.remote.assign(job.id, token):  # not if cancelled or deleted meanwhile
                self._send(job, token, fetched=future)

    def _send(self, job: Job, token: str, *, fetched: Future | None = None, again: bool = False) -> None:
        """Fetch the image (unless `fetched`), write the marker, send the task. The table already
        holds `token`, so a failure after this point is caught by the reconcile (no marker) or
        the resync."""
        try:
            image_png = fetched.result() if fetched is not None else self._fetch_png(job)
        except Exception as exc:
            # As a local worker would: the job started (an attempt) and failed with 1402.
            code, message = (
                (int(exc.task_code), exc.message)
                if isinstance(exc, SkyreelsError)
                else (int(TaskCode.MEDIA_ACCESS_FAILED), f"cannot read the input image: {exc}")
            )
            self.remote.mark_started(job.id, token, worker_id="dispatcher")
            self.db.predictions.fail(job.id, token, code=code, error=message)
            log.warning("prediction %s: failed (%d): %s", job.id, code, message)
            return
        payload = p.TaskPayload(
            prediction_id=job.id,
            token=token,
            # The image travels once, fetched and checked: not its URL or data: URI again.
            params={**job.params, "image": None},
            image_png=image_png,
            job_timeout_s=self.settings.job_timeout_s,
        )
        # The marker first: a worker that takes the task checks it at once.
        self._redis.set(p.dispatch_key(job.id), token)
        self._tracked[job.id] = token
        self._app.send_task(
            p.TASK_NAME,
            args=[payload.to_json()],
            task_id=p.task_id(job.id, token),
            queue=self.queue,
            # The default exchange routes straight to the queue's list: no binding that a Redis
            # restart without AOF could lose.
            exchange="",
            routing_key=self.queue,
            priority=AGAIN_PRIORITY if again else NEW_PRIORITY,
            retry=False,  # a Redis error reaches the cycle's backoff (and the resync) at once
        )
        log.info("prediction %s: sent to queue %s", job.id, self.queue)

    def _fetch_png(self, job: Job) -> bytes:
        image = self.fetcher.fetch(job.params["image"])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    # --- views -------------------------------------------------------------------------------

    def worker_rows(self) -> list[dict[str, Any]]:
        """The remote workers for /ready (same fields as local ones, plus host, preset, last seen)."""
        return [
            {
                "id": b.id,
                "state": b.state,
                "device": b.device,
                "pid": b.pid,
                "model": b.model,
                "profile": b.profile,
                "error": b.error,
                "job_id": b.job_id,
                "host": b.host,
                "preset": b.preset,
                "model_key": b.model_key,
                "last_seen": b.last_seen,
                "remote": True,
            }
            for b in self.workers
        ]

    def serving_workers(self) -> list[p.WorkerBeat]:
        """Live workers that take this server's jobs (its model key), idle or busy."""
        return [b for b in self.workers if b.model_key == self.key and b.state in ("ready", "busy")]


def write_atomically(path: Path, data: bytes, *, temp_tag: str) -> None:
    """`.{name}.{tag}.part.mp4` then rename (the retention sweep removes orphaned parts)."""
    temporary = path.with_name(f".{path.stem}.{temp_tag}.part{path.suffix}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _is_connection_error(exc: BaseException) -> bool:
    names: Iterable[str] = (cls.__name__ for cls in type(exc).__mro__)
    return any(n in ("ConnectionError", "TimeoutError", "OperationalError", "OSError") for n in names)
