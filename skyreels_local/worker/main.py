"""A worker process: loads the engine once, then claims jobs from the job table and runs them.

One worker per GPU (one on a CPU-only machine), each its own process, started and restarted by
the server's supervisor (server/supervisor.py) as `python -m skyreels_local.worker`. All communication
with the HTTP process goes through the SQLite job table: the worker claims the oldest waiting
job, writes throttled progress, checks the cancel flag after every denoising step (the engine
raises from its step callback, so a cancelled job runs no VAE decode), writes the MP4 atomically,
then records the result. torch is imported here and never in the HTTP process. The next waiting
job's prompts are encoded before it is claimed (prefetch.py), so that it starts denoising at once.

SIGTERM stops the worker gracefully: the running job stops at its next step and goes back to the
queue (without counting as an attempt). If the server dies, the worker dies with it (Linux
parent-death signal, plus a parent check in the heartbeat thread), so a restarted server can
safely re-queue whatever was running.

Faults stay inside their job: a CUDA out-of-memory fails the job with a message naming a
lower-memory profile and the worker goes on with its model loaded; a full disk fails the job
with a clear "disk is full" error (code 5000), and an outcome that cannot be written to the job
table (the same full disk) is retried until it can, never dropped. A job that hangs is the
supervisor's to end (the per-job timeout, server/supervisor.py).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..config import Settings
from ..errors import DiskFullError, GenerationCancelled, SkyreelsError, TaskCode, is_disk_full
from ..jobs import Database, Job, JobStatus
from ..media.fetch import ImageFetcher
from ..media.net import AddressPolicy
from ..media.signing import UrlSigner
from ..media.uploads import UploadStore
from ..params import GenerationParams
from ..paths import DataPaths
from ..safety.gate import SafetyGate
from ..safety.policy import OutputBlockedError, config_from_settings
from .prefetch import PromptPrefetcher

# Named explicitly: run as `python -m`, __name__ would be "__main__".
log = logging.getLogger("skyreels_local.worker")

PROGRESS_EVERY_S = 0.5  # throttle of progress writes
DENOISE_SHARE = 0.95  # progress reached when denoising ends; decode + encode are the rest
HEARTBEAT_S = 1.0
IDLE_POLL_S = 0.2
STORE_RETRY_MAX_S = 30.0  # longest wait between tries to write to an unwritable job table


def build_engine(settings: Settings, device: str | None) -> Any:
    """The engine this worker runs: `settings.engine_factory` when set, else `load_engine`."""
    if settings.engine_factory:
        module_name, _, attr = settings.engine_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "build_engine")
        return factory(settings, device)
    if settings.gpus_per_video > 1:
        # A group of processes (worker/group.py): this one is rank 0; it loads and warms up too.
        from .group import launch_group

        return launch_group(settings, device, restart_on_fault=True)
    from .loading import load_configured_engine

    engine = load_configured_engine(settings, device)
    # Compile and pick kernels now, before the worker reports ready, not in the first request.
    warm_s = engine.warm_up()
    log.info("engine warmed up in %.1fs (preset %s)", warm_s, engine.preset)
    return engine


class GpuWorker:
    """Runs jobs on one device until stopped."""

    def __init__(
        self, settings: Settings, *, worker_id: str, device: str | None, db: Database | None = None
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.device = device
        self.paths = DataPaths(settings.data_dir)
        self.db = db or Database(self.paths.database)
        signer = UrlSigner(self.db.secrets.get_or_create("url_signing_key", secrets.token_hex(32)))
        self.fetcher = ImageFetcher(
            uploads=UploadStore(self.paths.uploads, self.db.uploads, max_bytes=settings.max_upload_bytes),
            signer=signer,
            policy=AddressPolicy(settings.url_allow_list),
            max_bytes=settings.max_download_bytes,
            timeout_s=settings.download_timeout_s,
        )
        self._stopping = threading.Event()
        self._parent_pid = os.getppid()
        self.profile = ""  # the engine's memory profile, once loaded
        self.safety = SafetyGate.off()  # the NSFW check of each video (loaded with the engine)
        self.prefetcher: PromptPrefetcher | None = None  # the next job's prompts (prefetch.py)

    def stop(self) -> None:
        self._stopping.set()

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        self.db.workers.register(self.worker_id, pid=os.getpid(), device=self.device or "auto")
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        try:
            engine = build_engine(self.settings, self.device)
            self.safety = self.load_safety_gate(engine)
        except Exception as exc:
            message = exc.message if isinstance(exc, SkyreelsError) else f"{exc.__class__.__name__}: {exc}"
            log.exception("worker %s: cannot load model %s", self.worker_id, self.settings.model)
            self.db.workers.update(self.worker_id, state="failed", error=message)
            return 3
        profile = self.profile = str(getattr(engine, "profile", ""))
        preset = getattr(engine, "preset", None)
        self.prefetcher = self.make_prefetcher(engine)
        self.db.workers.update(self.worker_id, state="ready", model=engine.spec.name, profile=profile)
        log.info(
            "worker %s ready: model %s, profile %s, preset %s, prompt prefetch %s",
            self.worker_id,
            engine.spec.name,
            profile,
            preset,
            self.prefetcher.mode,
        )
        retry_s = IDLE_POLL_S
        while not self._stopping.is_set():
            try:
                job = self.db.predictions.claim_next(
                    self.worker_id, uuid.uuid4().hex, profile=profile, preset=preset
                )
            except (DiskFullError, sqlite3.Error) as exc:
                # e.g. a full disk: keep the loaded model and try again, rather than crash and reload.
                log.error(
                    "worker %s: cannot claim jobs (%s); retrying in %.0fs", self.worker_id, exc, retry_s
                )
                self._stopping.wait(retry_s)
                retry_s = min(retry_s * 2, STORE_RETRY_MAX_S)
                continue
            retry_s = IDLE_POLL_S
            if job is None:
                self._stopping.wait(IDLE_POLL_S)
                continue
            self.run_job(engine, job)
        self.prefetcher.close()
        self.db.workers.update(self.worker_id, state="stopped", job_id=None)
        log.info("worker %s stopped", self.worker_id)
        return 0

    def make_prefetcher(self, engine: Any) -> PromptPrefetcher:
        return PromptPrefetcher(engine, self.db.predictions.peek_next, enabled=self.settings.prefetch_prompts)

    def _heartbeat(self) -> None:
        while True:
            if os.getppid() != self._parent_pid:
                # The server is gone: stop at once so that a restarted server owns the job table.
                log.error("worker %s: server process died; exiting", self.worker_id)
                os._exit(70)
            try:
                self.db.workers.heartbeat(self.worker_id)
            except Exception as exc:  # e.g. a full disk; the supervisor acts if it lasts
                log.warning("worker %s: heartbeat failed: %s", self.worker_id, exc)
            time.sleep(HEARTBEAT_S)

    # --- one job -----------------------------------------------------------------------------

    def run_job(self, engine: Any, job: Job) -> None:
        JobLogTag.current = job.id
        try:
            self._run_job(engine, job)
        finally:
            JobLogTag.current = None

    def _run_job(self, engine: Any, job: Job) -> None:
        from ..engine.request import GenerationRequest

        claim = job.claim or ""
        started = time.monotonic()
        log.info("prediction %s: started on worker %s (attempt %d)", job.id, self.worker_id, job.attempts)
        last_write = [0.0]
        if self.prefetcher is None:  # run_job called without run() (tests)
            self.prefetcher = self.make_prefetcher(engine)
        prefetcher = self.prefetcher

        def on_progress(progress: Any) -> None:
            prefetcher.denoise_step(progress.step, progress.total)
            now = time.monotonic()
            if now - last_write[0] >= PROGRESS_EVERY_S or progress.step == progress.total:
                last_write[0] = now
                try:
                    self.db.predictions.set_progress(job.id, claim, DENOISE_SHARE * progress.fraction)
                except sqlite3.Error as exc:  # progress is a courtesy: never fail a job over it
                    log.warning("prediction %s: cannot write progress: %s", job.id, exc)

        def should_cancel() -> bool:
            return self._stopping.is_set() or self.db.predictions.should_stop(job.id, claim)

        out_of_memory = nsfw_blocked = False
        try:
            params = stored_params(job)
            request = GenerationRequest(self.fetcher.fetch(params.image), params=params)
            prefetcher.before_generate()
            result = engine.generate(request, on_progress=on_progress, should_cancel=should_cancel)
            # Raises OutputBlockedError (a failed job, code 1405) under --nsfw-action block.
            flagged = self.safety.review(result.frames, params, label=f"prediction {job.id}")
            prefetcher.gpu_idle()  # the next job's prompts encode while the MP4 is written
            name = self.write_output(result, job.id)
        except GenerationCancelled:
            if self._stopping.is_set():
                log.info("prediction %s: worker stopping, job goes back to the queue", job.id)
                self._record(job.id, lambda: self.db.predictions.requeue(job.id, claim))
            else:
                log.info("prediction %s: cancelled", job.id)
                self._record(job.id, lambda: self.db.predictions.mark_cancelled(job.id, claim))
            return
        except SkyreelsError as exc:
            log.warning("prediction %s: failed (%d): %s", job.id, exc.task_code, exc.message)
            code, message = int(exc.task_code), exc.message
            nsfw_blocked = isinstance(exc, OutputBlockedError)
        except Exception as exc:
            out_of_memory = is_out_of_memory(exc)
            code, message = describe_failure(exc, profile=self.profile)
            log.exception("prediction %s: generation failed", job.id)
        else:
            elapsed_ms = int((time.monotonic() - started) * 1000)
            inference_ms = int(result.timings.get("total_s", elapsed_ms / 1000) * 1000)
            self._record(
                job.id,
                lambda: self.db.predictions.complete(
                    job.id,
                    claim,
                    outputs=[name],
                    execution_ms=elapsed_ms,
                    inference_ms=inference_ms,
                    steps=params.num_inference_steps,
                    denoise_s=float(result.timings.get("denoise_s", 0.0)),
                    # One verdict per output; None when no check ran (the API shows false).
                    has_nsfw_contents=None if flagged is None else [flagged],
                ),
            )
            final = self.db.predictions.get(job.id)
            if final is None:  # deleted while it ran: its output goes too
                (self.paths.outputs / name).unlink(missing_ok=True)
                log.info("prediction %s: deleted while running; output removed", job.id)
                return
            elif final.status == JobStatus.CANCELLED:
                # The cancel came after the last denoising step but before the result was
                # recorded: it wins (jobs.complete), and the video is not kept.
                (self.paths.outputs / name).unlink(missing_ok=True)
                log.info("prediction %s: cancelled after its last step; output discarded", job.id)
                return
            log.info(
                "prediction %s: completed in %.1fs (seed %d, text encode %.3fs)",
                job.id, elapsed_ms / 1000, result.seed, result.timings.get("text_encode_s", 0.0),
            )  # fmt: skip
            return
        self._record(
            job.id,
            lambda: self.db.predictions.fail(
                job.id, claim, code=code, error=message, nsfw_blocked=nsfw_blocked
            ),
        )
        if out_of_memory:
            # Outside the except block: the exception's frames (and the tensors they hold) are
            # gone now, so the cache can really be returned. A CUDA OOM corrupts nothing; the
            # worker goes on with the next job without reloading the model.
            release_gpu_memory()

    def load_safety_gate(self, engine: Any) -> SafetyGate:
        """The safety checker on the engine's device; off, nothing is imported (safety/gate.py)."""
        return SafetyGate.load(
            config_from_settings(self.settings),
            device=getattr(engine, "device", None) or self.device,
        )

    def write_output(self, result: Any, job_id: str) -> str:
        """The job's MP4 under outputs/ (`<id>.mp4`); returns its file name. A full disk is a
        DiskFullError."""
        from ..video import write_mp4

        name = f"{job_id}.mp4"
        try:
            write_mp4(result.frames, self.paths.outputs / name, fps=result.fps)
            return name
        except OSError as exc:
            if is_disk_full(exc):
                free_mb = shutil.disk_usage(self.paths.outputs).free // 2**20
                log.error(
                    "prediction %s: disk full writing the video (%d MiB free): %s", job_id, free_mb, exc
                )
                raise DiskFullError(
                    f"the server's disk is full: the output video could not be written ({free_mb} MiB "
                    "free); the operator must free space (or lower --retention-days)"
                ) from exc
            raise OutputWriteError(f"could not write the output video: {exc}") from exc

    def _record(self, job_id: str, write: Callable[[], object]) -> None:
        """Write a job's outcome to the table, waiting out a full disk or a locked table rather
        than dropping it. Only a worker that is told to stop gives up: the job then stays
        `processing` and the server re-queues it, as after a crash."""
        delay = 1.0
        while True:
            try:
                write()
                return
            except (DiskFullError, sqlite3.Error) as exc:
                if self._stopping.is_set():
                    log.error("prediction %s: cannot record the outcome (%s); worker stopping", job_id, exc)
                    return
                log.error(
                    "prediction %s: cannot record the outcome (%s); retrying in %.0fs", job_id, exc, delay
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)


def stored_params(job: Job) -> GenerationParams:
    """The job's GenerationParams as the server stored them at submit (validated there).

    Rows written before the seed was part of the stored params carry it only in their `seed`
    column (drawn at submit too), so it fills in when the params have none."""
    return GenerationParams.model_validate({"seed": job.seed, **job.params})


class OutputWriteError(SkyreelsError):
    http_status = 500
    task_code = TaskCode.INTERNAL_ERROR


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError (torch.OutOfMemoryError), recognised without importing torch.
    return type(exc).__name__ == "OutOfMemoryError"


def describe_failure(exc: Exception, *, profile: str = "") -> tuple[int, str]:
    """Task code and user-facing message for an unexpected exception from the engine."""
    if is_out_of_memory(exc):
        current = f" with memory profile {profile!r}" if profile else ""
        return TaskCode.EXECUTION_FAILED, (
            f"the GPU ran out of memory during generation{current}; start the server with a "
            "lower-memory profile (--profile / SKYREELS_PROFILE, see `skyreels-local serve --help`)"
        )
    return TaskCode.EXECUTION_FAILED, f"generation failed: {exc.__class__.__name__}: {exc}"


def release_gpu_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class JobLogTag(logging.Filter):
    """Adds `job` to every log record: ` [prediction <id>]` while this worker runs that job, so
    that lines from the engine and libraries, which do not know the job, still name it (lines
    that already carry the id are left as they are)."""

    current: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = JobLogTag.current
        record.job = f" [prediction {job_id}]" if job_id and job_id not in record.getMessage() else ""
        return True


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent (the server) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except Exception:  # the heartbeat thread's parent check is the fallback
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skyreels_local.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--id", required=True, help="worker id, e.g. w0")
    parser.add_argument("--device", default="", help="torch device; empty picks cuda when present, else cpu")
    parser.add_argument("--config-json", required=True, help="the server's Settings as JSON")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s worker[{args.id}]%(job)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(JobLogTag())
    _die_with_parent()
    settings = Settings(**json.loads(args.config_json))
    worker = GpuWorker(settings, worker_id=args.id, device=args.device or None)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    return worker.run()


if __name__ == "__main__":
    raise SystemExit(main())
