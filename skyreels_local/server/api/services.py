"""Everything the routes need, built once per app from one Settings object.

`Services` owns the job database, URL signing, uploads, auth, the worker supervisor, the webhook
dispatcher and the retention sweep, and knows how to turn a stored job into the wire
prediction. Routes get it through a FastAPI dependency (deps.py), never through a global.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ... import MODEL_ID
from ...config import Settings
from ...errors import SkyreelsError, TaskCode
from ...jobs import TERMINAL_STATUSES, Database, Job, JobStatus
from ...media.net import AddressPolicy
from ...media.signing import Links, UrlSigner
from ...media.uploads import UploadStore, upload_id_in
from ...paths import DataPaths
from ...safety.policy import config_from_settings as safety_config
from .. import strict_json
from ..schemas import Prediction, SkyReelsInput, prediction_from_job
from ..supervisor import WorkerSupervisor
from ..webhooks import SECRET_PREFIX, WebhookDispatcher, new_secret
from .auth import ApiKeys
from .errors import NotFoundError

log = logging.getLogger(__name__)

WORKER_FRESH_S = 15.0  # a worker counts as up while its heartbeat is this recent
SWEEP_EVERY_S = 3600.0
SYNC_POLL_S = 0.1


class DataDirInUseError(SkyreelsError):
    http_status = 500
    task_code = TaskCode.SERVICE_UNAVAILABLE


class NoWorkerCanLoadError(SkyreelsError):
    """Every worker failed to load the model: a submit would only wait; 503 says why."""

    http_status = 503
    task_code = TaskCode.SERVICE_UNAVAILABLE


def lock_data_dir(paths: DataPaths) -> IO[str]:
    """One server per data directory: a second one would start workers with the same ids and
    re-queue the first one's running jobs. The kernel drops the lock when the process dies."""
    handle = open(paths.root / "server.lock", "a+")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise DataDirInUseError(
            f"data directory {str(paths.root)!r} is in use by another server (pid {owner})"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class Periodic:
    """Calls `fn` every `interval_s` seconds on a daemon thread (first call at start)."""

    def __init__(self, interval_s: float, fn: Callable[[], None], name: str) -> None:
        self.interval_s = interval_s
        self.fn = fn
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn()
            except Exception:
                log.exception("%s failed", self.name)
            self._stop.wait(self.interval_s)


class Services:
    def __init__(self, settings: Settings, *, log_level: str = "INFO") -> None:
        self.settings = settings
        self.paths = DataPaths(settings.data_dir).create()
        self._lock = lock_data_dir(self.paths)
        self.db = Database(self.paths.database)
        self.signer = UrlSigner(self.db.secrets.get_or_create("url_signing_key", secrets.token_hex(32)))
        self.links = Links(self.signer, retention_s=settings.retention_days * 86400)
        self.uploads = UploadStore(self.paths.uploads, self.db.uploads, max_bytes=settings.max_upload_bytes)
        configured = settings.webhook_secret
        if configured:
            self.webhook_secret = (
                configured if configured.startswith(SECRET_PREFIX) else SECRET_PREFIX + configured
            )
        else:
            self.webhook_secret = self.db.secrets.get_or_create("webhook_secret", new_secret())
        self.auth = ApiKeys(settings.api_keys, settings.api_keys_file)
        self.policy = AddressPolicy(settings.url_allow_list)
        self.supervisor = WorkerSupervisor(settings, self.db, log_level=log_level)
        self.dispatcher = WebhookDispatcher(
            self.db,
            secret=self.webhook_secret,
            render=self.webhook_body,
            policy=self.policy,
            timeout_s=settings.webhook_timeout_s,
            retry_window_s=settings.webhook_retry_window_s,
            backoff_base_s=settings.webhook_backoff_s,
        )
        self.sweeper = Periodic(SWEEP_EVERY_S, self.sweep, "retention-sweep")
        # --broker: jobs go to remote workers through Celery (cluster/dispatcher.py, torch-free).
        self.cluster = self._cluster_dispatcher() if settings.broker else None

    def _cluster_dispatcher(self) -> Any:
        from ...cluster.dispatcher import Dispatcher
        from ...media.fetch import ImageFetcher

        fetcher = ImageFetcher(
            uploads=self.uploads,
            signer=self.signer,
            policy=self.policy,
            max_bytes=self.settings.max_download_bytes,
            timeout_s=self.settings.download_timeout_s,
        )
        return Dispatcher(self.settings, self.db, fetcher=fetcher, outputs=self.paths.outputs)

    def start(self) -> None:
        self.supervisor.start()
        if self.cluster is not None:
            self.cluster.start()
        self.dispatcher.start()
        self.sweeper.start()

    def stop(self) -> None:
        self.sweeper.stop()
        self.dispatcher.stop()
        if self.cluster is not None:
            self.cluster.stop()
        self.supervisor.stop()
        self.db.close()
        self._lock.close()

    # --- URLs --------------------------------------------------------------------------------

    def base_url(self, request: Request) -> str:
        """The configured public base URL, else the scheme and host this request came to."""
        if self.settings.public_base_url:
            return self.settings.public_base_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def render(
        self, job: Job, base_url: str, *, include_input: bool = False, urls_only: bool = False
    ) -> Prediction:
        """The wire prediction of a stored job. `urls_only` keeps history pages small."""
        outputs: list[str] = []
        if job.status == JobStatus.COMPLETED:
            if job.base64_output and not urls_only:
                outputs = [self._base64_file(name) for name in job.outputs]
            else:
                outputs = [
                    self.links.output(base_url, name, job.finished_at or job.created_at)
                    for name in job.outputs
                ]
        return prediction_from_job(
            job,
            base_url=base_url,
            outputs=outputs,
            queue_position=self.db.predictions.queue_position(job),
            include_input=include_input,
        )

    def _base64_file(self, name: str) -> str:
        # [compat] bare base64, no `data:` prefix.
        return base64.b64encode((self.paths.outputs / name).read_bytes()).decode("ascii")

    def webhook_body(self, prediction_id: str) -> bytes | None:
        """The webhook body: the bare prediction object with `input` [compat]."""
        job = self.db.predictions.get_full(prediction_id)
        if job is None:
            return None
        prediction = self.render(job, job.base_url, include_input=True)
        # Strict JSON (null for a non-finite float), ASCII-escaped as before.
        return strict_json.dumps(prediction.model_dump(exclude_none=True), ensure_ascii=True)

    # --- predictions -------------------------------------------------------------------------

    def submit(
        self, parsed: SkyReelsInput, body: dict[str, Any], base_url: str, account: str | None = None
    ) -> Job:
        self._refuse_when_no_worker_can_load()
        # A seed is drawn now, not by the worker, so `data.seed` is known from the first reply.
        params = parsed.params.with_drawn_seed()
        job = self.db.predictions.create(
            id=uuid.uuid4().hex,
            model=MODEL_ID,
            input=body,
            # The worker reads these back unchanged (worker.stored_params).
            params=params.model_dump(mode="json"),
            seed=params.seed,
            base_url=base_url,
            webhook_url=parsed.webhook_url,
            base64_output=parsed.enable_base64_output,
            preset=self.settings.preset,
            max_queue=self.settings.max_queue,
            account=account,
        )
        log.info(
            "prediction %s: submitted (seed %d, %d steps)", job.id, params.seed, params.num_inference_steps
        )
        return job

    def owned(self, prediction_id: str, account: str | None) -> Job | None:
        """The prediction when `account` owns it; None for unknown ids and other accounts' ones
        alike (a 404 either way: ids of other accounts are not even confirmed to exist)."""
        job = self.db.predictions.get(prediction_id)
        return job if job is not None and job.account == account else None

    def delete_predictions(self, ids: list[str], account: str | None) -> int:
        """Delete `account`'s predictions among `ids`: waiting or running ones are cancelled
        first; each one's row, output files and input upload go. Returns how many were deleted."""
        for prediction_id in ids:
            job = self.owned(prediction_id, account)
            if job is not None and not job.terminal:
                self.db.predictions.request_cancel(prediction_id)
        deleted = self.db.predictions.delete(ids, account=account)
        for name in deleted.output_files:
            (self.paths.outputs / name).unlink(missing_ok=True)
        for image in deleted.inputs:
            upload_id = upload_id_in(image)
            if upload_id and self.db.uploads.delete(upload_id, account=account):
                self.uploads.delete(upload_id)
        if deleted.ids:
            log.info("deleted %d predictions: %s", len(deleted.ids), ", ".join(deleted.ids))
        return len(deleted.ids)

    async def wait(self, prediction_id: str, timeout_s: float) -> Job:
        """Poll the job table until the job is terminal or `timeout_s` passes (sync mode)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = await run_in_threadpool(self.db.predictions.get, prediction_id)
            if job is None:  # deleted (POST /api/v3/predictions/delete) while the client waited
                raise NotFoundError(f"prediction {prediction_id!r} was deleted")
            remaining = deadline - time.monotonic()
            if job.status in TERMINAL_STATUSES or remaining <= 0:
                return job
            await asyncio.sleep(min(SYNC_POLL_S, remaining))

    def _refuse_when_no_worker_can_load(self) -> None:
        failure = self.supervisor.load_failure()
        if failure and not self._workers_up():
            raise NoWorkerCanLoadError(
                f"no worker can load the model: {failure}; the server retries about every "
                f"{self.supervisor.retry_delay_s:.0f} s (see /ready)"
            )

    # --- health ------------------------------------------------------------------------------

    @staticmethod
    def _state(ready: bool, workers: list[dict[str, Any]], load_error: str | None) -> str:
        """ready | failed (no worker can load the model, or every worker gave up) | loading."""
        if ready:
            return "ready"
        if load_error or (workers and all(w["state"] == "failed" for w in workers)):
            return "failed"
        return "loading"

    def _workers_up(self, workers: list | None = None) -> list:
        now = time.time()
        workers = self.db.workers.all() if workers is None else workers
        return [w for w in workers if w.state in ("ready", "busy") and now - w.heartbeat_at < WORKER_FRESH_S]

    def readiness(self) -> dict[str, Any]:
        workers = self.db.workers.all()
        up = self._workers_up(workers)
        ready_worker = up[0] if up else None
        data = {
            "ready": ready_worker is not None,
            # Why no worker can serve (a load error, retried with backoff); None when ready or loading.
            "load_error": None if ready_worker else self.supervisor.load_failure(),
            "model": ready_worker.model if ready_worker else self.settings.model,
            "profile": ready_worker.profile if ready_worker else "",
            "preset": self.settings.preset,
            "queue_depth": self.db.predictions.queue_depth(),
            # Whether finished videos go through the NSFW classifier (README "Safety checker").
            "safety_checker": safety_config(self.settings).describe(),
            "workers": [
                {
                    "id": w.id,
                    "state": w.state if w in up or w.state not in ("ready", "busy") else "unresponsive",
                    "device": w.device,
                    "pid": w.pid,
                    "model": w.model,
                    "profile": w.profile,
                    "error": w.error,
                    "job_id": w.job_id,
                }
                for w in workers
            ],
        }
        if self.cluster is not None:
            # Remote workers (their heartbeats in Redis): ready when one of this model is up.
            data["workers"] += self.cluster.worker_rows()
            serving = self.cluster.serving_workers()
            if serving and not data["ready"]:
                data.update(ready=True, model=serving[0].model, profile=serving[0].profile)
            data["broker"] = {"connected": self.cluster.connected, "error": self.cluster.last_error or None}
        data["state"] = self._state(data["ready"], data["workers"], data["load_error"])
        return data

    # --- retention ---------------------------------------------------------------------------

    def sweep(self) -> None:
        removed = remove_orphan_partials(self.paths.outputs, self._is_running)
        if removed:
            log.info("removed %d unfinished video files left by interrupted workers", len(removed))
        expired = self.db.predictions.expire(before=time.time() - self.settings.retention_days * 86400)
        for name in expired.output_files:
            (self.paths.outputs / name).unlink(missing_ok=True)
        for upload_id in expired.upload_ids:
            self.uploads.delete(upload_id)
        if expired.output_files or expired.upload_ids:
            log.info(
                "retention: removed %d outputs and %d uploads",
                len(expired.output_files),
                len(expired.upload_ids),
            )

    def _is_running(self, prediction_id: str) -> bool:
        job = self.db.predictions.get(prediction_id)
        return job is not None and job.status == JobStatus.PROCESSING


def remove_orphan_partials(outputs: Path, is_running: Callable[[str], bool]) -> list[Path]:
    """Delete the `.{prediction id}.*.part.mp4` files (video.write_mp4's temporary output) whose
    prediction is not running: a worker killed mid-encode leaves them behind. The one of a job
    that is running now (its worker is encoding) is kept. Runs with each retention sweep,
    the first at start-up."""
    removed = []
    for path in outputs.glob(".*.part.mp4"):
        prediction_id = path.name[1:].split(".", 1)[0]
        if is_running(prediction_id):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
