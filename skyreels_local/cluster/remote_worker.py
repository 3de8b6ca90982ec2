"""The worker side of the cluster mode: `skyreels-local worker --broker URL --model WEIGHTS`.

One process per GPU (or GPU group, --gpus-per-video), on any host; the broker URL is its only
connection (no shared files, no job table). It loads the model first, then consumes its model
key's queue only (so it never takes a job it cannot run), one task at a time in Celery's `solo`
pool (the task runs in this process, next to the loaded model: no fork).

For each task: the cancel key or a marker that is not the task's token (an old dispatch,
redelivered) -> dropped without running; else it takes the lease (SET NX, refreshed by the
heartbeat thread) so that two deliveries of one prediction never run at once, reports PROGRESS
(the API marks the job `processing`), generates with the same engine, safety gate and failure
messages as a local worker (worker/main.py), checks the cancel key and the marker at every
denoising step (cooperative: the model stays loaded), and returns the MP4 (base64) or the
failure through the result backend.

The heartbeat thread writes worker:<id> (host, device, model, profile, preset, idle/busy, job,
last seen) with a TTL of 4 heartbeats: the API's /ready and /metrics show it, and a job whose
worker stops showing it is dispatched again. It is also the watchdog: a job still running
--job-timeout-s + WATCHDOG_GRACE_S after it started (a hung step, deaf to the cancel key) makes
the process exit with code 75, for its supervisor (systemd `Restart=always`, compose
`restart: unless-stopped`) to start a fresh one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import GenerationCancelled, SkyreelsError
from ..media.images import decode_image
from ..params import GenerationParams
from ..safety.gate import SafetyGate
from ..safety.policy import OutputBlockedError, config_from_settings
from ..worker.main import DENOISE_SHARE, build_engine, describe_failure, is_out_of_memory, release_gpu_memory
from . import protocol as p

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5
CANCEL_CHECK_EVERY_S = 0.2
LEASE_WAIT_S = 0.25
WATCHDOG_GRACE_S = 60.0
WATCHDOG_EXIT_CODE = 75
# Deletes the lease only if it is still ours (a compare-and-delete, atomic in Redis).
RELEASE_LEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RemoteWorker:
    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        import redis

        assert settings.broker, "a remote worker needs settings.broker"
        self.settings = settings
        host = socket.gethostname()
        self.worker_id = worker_id or f"{host}-{os.getpid()}"
        key = p.model_key(settings.model)
        self.queue = p.queue_name(key)
        self.redis = redis.Redis.from_url(
            settings.broker, socket_timeout=10, socket_connect_timeout=3, health_check_interval=30
        )
        self.ttl_s = p.beat_ttl_s(settings.cluster_heartbeat_s)
        self.beat = p.WorkerBeat(
            id=self.worker_id, host=host, device=settings.device or "auto", model=settings.model,
            model_key=key, queue=self.queue, pid=os.getpid(), started_at=time.time(),
        )  # fmt: skip
        self.engine: Any = None
        self.safety = SafetyGate.off()
        self._lock = threading.Lock()
        self._lease: tuple[str, str] | None = None  # (key, value) while a job runs
        self._job_started = 0.0
        self._job_timeout_s = settings.job_timeout_s
        self._stopped = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        self._write_beat()  # `loading` shows in /ready at once
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        try:
            self.load()
        except Exception as exc:
            message = exc.message if isinstance(exc, SkyreelsError) else f"{exc.__class__.__name__}: {exc}"
            log.exception("worker %s: cannot load model %s", self.worker_id, self.settings.model)
            self._set(state="failed", error=message)
            time.sleep(1)  # let /ready show why for a moment (the key expires)
            return 3
        try:
            return self.consume()
        finally:
            self._stopped.set()
            with contextlib.suppress(Exception):
                self.redis.delete(p.worker_key(self.worker_id))

    def load(self) -> None:
        self.engine = build_engine(self.settings, self.settings.device)
        self.safety = SafetyGate.load(
            config_from_settings(self.settings),
            device=getattr(self.engine, "device", None) or self.settings.device,
        )
        # `ready` once Celery consumes (consume()); which GPU: the engine's device, and the
        # CUDA_VISIBLE_DEVICES it was started with (a GPU group's devices).
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._set(
            device=self.settings.device or str(getattr(self.engine, "device", "") or "auto"),
            profile=str(getattr(self.engine, "profile", "") or ""),
            preset=str(getattr(self.engine, "preset", "") or ""),
            extra={"cuda_visible_devices": visible} if visible is not None else {},
        )
        log.info(
            "worker %s loaded: model %s (key %s, queue %s), profile %s, preset %s",
            self.worker_id, self.settings.model, self.beat.model_key, self.queue, self.beat.profile,
            self.beat.preset,
        )  # fmt: skip

    def consume(self) -> int:
        """Celery's worker loop on this model's queue, in this process (solo pool)."""
        from .celery_app import make_celery

        app = make_celery(self.settings)
        # Celery logs each task's return value at INFO: a base64 video. Our own lines say it all.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
        # Celery warns at each broker reconnect that Celery 6 cancels running tasks on connection
        # loss; we keep them on purpose (celery_app.py) and pin celery < 6.
        # (Celery's worker re-enables its warnings at start, so the log record is what is dropped.)
        logging.getLogger("py.warnings").addFilter(
            lambda record: "worker_cancel_long_running_tasks_on_connection_loss" not in record.getMessage()
        )

        from celery.signals import worker_ready

        # Idle (`ready` in /ready and /metrics) only once Celery really consumes the queue.
        worker_ready.connect(lambda **_: self._set(state="ready"), weak=False)

        @app.task(name=p.TASK_NAME, bind=True)
        def generate(task: Any, payload: dict[str, Any]) -> dict[str, Any]:
            return self.handle(task, p.TaskPayload.from_json(payload))

        worker = app.Worker(
            pool="solo",
            concurrency=1,
            queues=[self.queue],
            hostname=f"{self.worker_id}@{self.beat.host}",
            without_gossip=True,  # no chatter between workers: nothing here needs it
            without_mingle=True,
            loglevel=logging.getLevelName(logging.getLogger().level),
        )
        worker.start()
        return int(worker.exitcode or 0)

    # --- one task ----------------------------------------------------------------------------

    def handle(self, task: Any, payload: p.TaskPayload) -> dict[str, Any]:
        from celery.exceptions import Ignore

        pid, token = payload.prediction_id, payload.token
        verdict = self.admit(pid, token)
        if verdict == p.CANCELLED:
            log.info("prediction %s: cancelled before it started", pid)
            return p.Outcome(status=p.CANCELLED, worker=self.worker_id).to_json()
        if verdict != "run":
            log.info("prediction %s: dispatch %s is %s; dropped without running", pid, token, verdict)
            raise Ignore()  # no result stored: the current dispatch's is the dispatcher's concern
        try:
            task.update_state(state="PROGRESS", meta=self._progress_meta(0.0))
            return self.generate(task, payload).to_json()
        finally:
            self.release(pid)

    def admit(self, prediction_id: str, token: str) -> str:
        """`run` once the lease is ours; else cancelled | stale | duplicate (not to be run here)."""
        lease = p.lease_key(prediction_id)
        value = f"{token} {self.worker_id}"
        verdict = ""
        while not verdict:
            cancelled, marker = self.redis.mget(p.cancel_key(prediction_id), p.dispatch_key(prediction_id))
            if cancelled:
                verdict = p.CANCELLED
            elif marker is None or marker.decode() != token:
                verdict = p.STALE
            elif self.redis.set(lease, value, nx=True, ex=self.ttl_s):
                with self._lock:
                    self._lease = (lease, value)
                    self._job_started = time.monotonic()
                self._set(state="busy", job_id=prediction_id, token=token)
                return "run"
            else:
                held = self.redis.get(lease)
                if held is not None and held.decode().split(" ", 1)[0] == token:
                    verdict = "duplicate"  # this very dispatch runs elsewhere (a redelivered message)
                else:
                    # An older dispatch of this prediction still runs somewhere; it stops at its
                    # next step (the marker changed), or its lease expires with its worker. The
                    # heartbeat shows this job meanwhile: the dispatcher knows we hold it.
                    if self.beat.job_id != prediction_id:
                        self._set(state="busy", job_id=prediction_id, token=token)
                    time.sleep(LEASE_WAIT_S)
        if self.beat.job_id == prediction_id:
            self._set(state="ready", job_id=None, token=None)
        return verdict

    def release(self, prediction_id: str) -> None:
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self.redis.eval(RELEASE_LEASE, 1, lease[0], lease[1])
            except Exception as exc:  # it expires by itself
                log.warning("prediction %s: could not release the lease: %s", prediction_id, exc)
        self._set(state="ready", job_id=None, token=None)

    def generate(self, task: Any, payload: p.TaskPayload) -> p.Outcome:
        from ..engine.request import GenerationRequest
        from ..video import write_mp4

        pid, token = payload.prediction_id, payload.token
        self._job_timeout_s = payload.job_timeout_s
        started = time.monotonic()
        last = {"progress": 0.0, "check": 0.0}
        log.info("prediction %s: started on worker %s", pid, self.worker_id)

        def on_progress(progress: Any) -> None:
            now = time.monotonic()
            if now - last["progress"] >= PROGRESS_EVERY_S or progress.step == progress.total:
                last["progress"] = now
                try:
                    task.update_state(
                        state="PROGRESS", meta=self._progress_meta(DENOISE_SHARE * progress.fraction)
                    )
                except Exception as exc:  # progress is a courtesy
                    log.warning("prediction %s: cannot report progress: %s", pid, exc)

        def should_cancel() -> bool:
            now = time.monotonic()
            if now - last["check"] < CANCEL_CHECK_EVERY_S:
                return False
            last["check"] = now
            return self.told_to_stop(pid, token)

        out_of_memory = False
        try:
            params = GenerationParams.model_validate(payload.params)
            image = decode_image(payload.image_png, source="the `image` sent by the API")
            request = GenerationRequest(image, params=params)
            if self.told_to_stop(pid, token):
                raise GenerationCancelled("cancelled before it started")
            result = self.engine.generate(request, on_progress=on_progress, should_cancel=should_cancel)
            flagged = self.safety.review(result.frames, params, label=f"prediction {pid}")
            with tempfile.TemporaryDirectory(prefix="skyreels-worker-") as folder:
                path = write_mp4(result.frames, Path(folder) / f"{pid}.mp4", fps=result.fps)
                video = path.read_bytes()
        except GenerationCancelled:
            log.info("prediction %s: cancelled", pid)
            return p.Outcome(status=p.CANCELLED, worker=self.worker_id)
        except SkyreelsError as exc:
            log.warning("prediction %s: failed (%d): %s", pid, exc.task_code, exc.message)
            return self._failed(
                int(exc.task_code), exc.message, nsfw_blocked=isinstance(exc, OutputBlockedError)
            )
        except Exception as exc:
            out_of_memory = is_out_of_memory(exc)
            code, message = describe_failure(exc, profile=self.beat.profile)
            log.exception("prediction %s: generation failed", pid)
            outcome = self._failed(code, message)
        else:
            elapsed_ms = int((time.monotonic() - started) * 1000)
            log.info("prediction %s: completed in %.1fs (seed %d)", pid, elapsed_ms / 1000, result.seed)
            import base64

            return p.Outcome(
                status=p.COMPLETED,
                worker=self.worker_id,
                video_b64=base64.b64encode(video).decode("ascii"),
                execution_ms=elapsed_ms,
                inference_ms=int(result.timings.get("total_s", elapsed_ms / 1000) * 1000),
                steps=params.num_inference_steps,
                denoise_s=float(result.timings.get("denoise_s", 0.0)),
                seed=int(result.seed),
                has_nsfw_contents=None if flagged is None else [flagged],
                profile=self.beat.profile,
                preset=self.beat.preset,
            )
        if out_of_memory:  # outside the except block: the exception's tensors are gone
            release_gpu_memory()
        return outcome

    def told_to_stop(self, prediction_id: str, token: str) -> bool:
        """The cancel key is set, or the marker names another dispatch (this one was superseded).
        A missing marker is not a stop: Redis may have restarted without its data, and the
        dispatcher restores it. Redis unreachable: go on (the dispatcher's timeout still holds)."""
        try:
            cancelled, marker = self.redis.mget(p.cancel_key(prediction_id), p.dispatch_key(prediction_id))
        except Exception as exc:
            log.warning("prediction %s: cannot check for a cancel: %s", prediction_id, exc)
            return False
        return bool(cancelled) or (marker is not None and marker.decode() != token)

    def _failed(self, code: int, message: str, *, nsfw_blocked: bool = False) -> p.Outcome:
        return p.Outcome(
            status=p.FAILED, worker=self.worker_id, code=code, message=message, nsfw_blocked=nsfw_blocked,
            profile=self.beat.profile, preset=self.beat.preset,
        )  # fmt: skip

    def _progress_meta(self, fraction: float) -> dict[str, Any]:
        return {
            "fraction": fraction,
            "worker": self.worker_id,
            "profile": self.beat.profile,
            "preset": self.beat.preset,
        }

    # --- heartbeat and watchdog --------------------------------------------------------------

    def _set(self, **fields: Any) -> None:
        """Change the heartbeat and write it now (a job's start is visible before its PROGRESS)."""
        with self._lock:
            for name, value in fields.items():
                setattr(self.beat, name, value)
        self._write_beat()

    def _write_beat(self) -> None:
        with self._lock:
            self.beat.last_seen = time.time()
            text = self.beat.dumps()
            lease = self._lease
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(p.worker_key(self.worker_id), text, ex=self.ttl_s)
            if lease is not None:
                pipe.expire(lease[0], self.ttl_s)
            pipe.execute()
        except Exception as exc:
            log.warning("worker %s: heartbeat failed: %s", self.worker_id, exc)

    def _heartbeat(self) -> None:
        while not self._stopped.wait(self.settings.cluster_heartbeat_s):
            self._write_beat()
            self._watchdog()

    def _watchdog(self) -> None:
        with self._lock:
            running_s = time.monotonic() - self._job_started if self._lease is not None else 0.0
        limit = self._job_timeout_s + WATCHDOG_GRACE_S
        if running_s > limit:
            log.error(
                "worker %s: job %s still running after %.0fs (job timeout + %.0fs grace): exiting so "
                "that the supervisor starts a fresh process",
                self.worker_id, self.beat.job_id, running_s, WATCHDOG_GRACE_S,
            )  # fmt: skip
            os._exit(WATCHDOG_EXIT_CODE)
