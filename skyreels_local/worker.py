"""A worker process: loads the engine once, then claims jobs from the job table and runs them.

One worker per GPU (one on a CPU-only machine), each its own process, started and restarted by
the server's supervisor (supervisor.py) as `python -m skyreels_local.worker`. All communication
with the HTTP process goes through the SQLite job table: the worker claims the oldest waiting
job, writes throttled progress, checks the cancel flag after every denoising step (the engine
raises from its step callback, so a cancelled job runs no VAE decode), writes the MP4 atomically,
then records the result. torch is imported here and never in the HTTP process.

SIGTERM stops the worker gracefully: the running job stops at its next step and goes back to the
queue (without counting as an attempt). If the server dies, the worker dies with it (Linux
parent-death signal, plus a parent check in the heartbeat thread), so a restarted server can
safely re-queue whatever was running.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from .config import Settings
from .errors import GenerationCancelled, SkyreelsError, TaskCode
from .jobs import Job, JobStore
from .media import AddressPolicy, ImageFetcher, UploadStore, UrlSigner
from .paths import DataPaths

# Named explicitly: run as `python -m`, __name__ would be "__main__".
log = logging.getLogger("skyreels_local.worker")

PROGRESS_EVERY_S = 0.5  # throttle of progress writes
DENOISE_SHARE = 0.95  # progress reached when denoising ends; decode + encode are the rest
HEARTBEAT_S = 1.0
IDLE_POLL_S = 0.2


def build_engine(settings: Settings, device: str | None) -> Any:
    """The engine this worker runs: `settings.engine_factory` when set, else `load_engine`."""
    if settings.engine_factory:
        module_name, _, attr = settings.engine_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "build_engine")
        return factory(settings, device)
    from .engine.loader import load_engine
    from .engine.presets import PresetOptions

    options = PresetOptions(
        attention=settings.attention,
        cache_threshold=settings.turbo_threshold,
        # Compiled kernels persist across restarts: the compile cost is paid once per machine.
        compile_cache_dir=DataPaths(settings.data_dir).compile_cache,
    )
    # The memory profile is chosen per worker (from its own GPU's free memory when `auto`).
    engine = load_engine(
        settings.model,
        device=device,
        profile=settings.profile,
        preset=settings.preset,
        preset_options=options,
    )
    # Compile and pick kernels now, before the worker reports ready, not in the first request.
    warm_s = engine.warm_up()
    log.info("engine warmed up in %.1fs (preset %s)", warm_s, engine.preset)
    return engine


class GpuWorker:
    """Runs jobs on one device until stopped."""

    def __init__(
        self, settings: Settings, *, worker_id: str, device: str | None, store: JobStore | None = None
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.device = device
        self.paths = DataPaths(settings.data_dir)
        self.store = store or JobStore(self.paths.database)
        signer = UrlSigner(self.store.secret("url_signing_key", secrets.token_hex(32)))
        self.fetcher = ImageFetcher(
            uploads=UploadStore(self.paths.uploads, self.store, max_bytes=settings.max_upload_bytes),
            signer=signer,
            policy=AddressPolicy(settings.url_allow_list),
            max_bytes=settings.max_download_bytes,
            timeout_s=settings.download_timeout_s,
        )
        self._stopping = threading.Event()
        self._parent_pid = os.getppid()

    def stop(self) -> None:
        self._stopping.set()

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        self.store.register_worker(self.worker_id, pid=os.getpid(), device=self.device or "auto")
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        try:
            engine = build_engine(self.settings, self.device)
        except Exception as exc:
            message = exc.message if isinstance(exc, SkyreelsError) else f"{exc.__class__.__name__}: {exc}"
            log.exception("worker %s: cannot load model %s", self.worker_id, self.settings.model)
            self.store.update_worker(self.worker_id, state="failed", error=message)
            return 3
        profile = str(getattr(engine, "profile", ""))
        preset = getattr(engine, "preset", None)
        self.store.update_worker(self.worker_id, state="ready", model=engine.spec.name, profile=profile)
        log.info(
            "worker %s ready: model %s, profile %s, preset %s",
            self.worker_id,
            engine.spec.name,
            profile,
            preset,
        )
        while not self._stopping.is_set():
            job = self.store.claim_next(self.worker_id, uuid.uuid4().hex, profile=profile, preset=preset)
            if job is None:
                self._stopping.wait(IDLE_POLL_S)
                continue
            self.run_job(engine, job)
        self.store.update_worker(self.worker_id, state="stopped", job_id=None)
        log.info("worker %s stopped", self.worker_id)
        return 0

    def _heartbeat(self) -> None:
        while True:
            if os.getppid() != self._parent_pid:
                # The server is gone: stop at once so that a restarted server owns the job table.
                log.error("worker %s: server process died; exiting", self.worker_id)
                os._exit(70)
            try:
                self.store.heartbeat(self.worker_id)
            except Exception:
                log.exception("worker %s: heartbeat failed", self.worker_id)
            time.sleep(HEARTBEAT_S)

    # --- one job -----------------------------------------------------------------------------

    def run_job(self, engine: Any, job: Job) -> None:
        from .engine.request import GenerationRequest

        claim = job.claim or ""
        started = time.monotonic()
        log.info("prediction %s: started on worker %s (attempt %d)", job.id, self.worker_id, job.attempts)
        last_write = [0.0]

        def on_progress(progress: Any) -> None:
            now = time.monotonic()
            if now - last_write[0] >= PROGRESS_EVERY_S or progress.step == progress.total:
                last_write[0] = now
                self.store.set_progress(job.id, claim, DENOISE_SHARE * progress.fraction)

        def should_cancel() -> bool:
            return self._stopping.is_set() or self.store.should_stop(job.id, claim)

        try:
            params = job.params
            image = self.fetcher.fetch(params["image"])
            request = GenerationRequest(
                prompt=params["prompt"],
                image=image,
                negative_prompt=params.get("negative_prompt"),
                seed=job.seed,
                guidance_scale=float(params.get("guidance_scale", 6.0)),
                num_inference_steps=int(params.get("num_inference_steps", 30)),
                aspect_ratio=params.get("aspect_ratio", "16:9"),
            )
            result = engine.generate(request, on_progress=on_progress, should_cancel=should_cancel)
            name = f"{job.id}.mp4"
            try:
                from .video import write_mp4

                write_mp4(result.frames, self.paths.outputs / name, fps=result.fps)
            except OSError as exc:
                raise OutputWriteError(f"could not write the output video: {exc}") from exc
        except GenerationCancelled:
            if self._stopping.is_set():
                log.info("prediction %s: worker stopping, job goes back to the queue", job.id)
                self.store.requeue(job.id, claim)
            else:
                log.info("prediction %s: cancelled", job.id)
                self.store.mark_cancelled(job.id, claim)
            return
        except SkyreelsError as exc:
            log.warning("prediction %s: failed (%d): %s", job.id, exc.task_code, exc.message)
            self.store.fail(job.id, claim, code=exc.task_code, error=exc.message)
            return
        except Exception as exc:
            code, message = describe_failure(exc)
            log.exception("prediction %s: generation failed", job.id)
            self.store.fail(job.id, claim, code=code, error=message)
            return
        elapsed_ms = int((time.monotonic() - started) * 1000)
        inference_ms = int(result.timings.get("total_s", elapsed_ms / 1000) * 1000)
        self.store.complete(job.id, claim, outputs=[name], execution_ms=elapsed_ms, inference_ms=inference_ms)
        log.info("prediction %s: completed in %.1fs (seed %d)", job.id, elapsed_ms / 1000, result.seed)


class OutputWriteError(SkyreelsError):
    http_status = 500
    task_code = TaskCode.INTERNAL_ERROR


def describe_failure(exc: Exception) -> tuple[int, str]:
    """Task code and user-facing message for an unexpected exception from the engine."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass
        return TaskCode.EXECUTION_FAILED, (
            "the GPU ran out of memory during generation; start the server with a lower-memory "
            "profile (--profile / SKYREELS_PROFILE) or fewer frames"
        )
    return TaskCode.EXECUTION_FAILED, f"generation failed: {exc.__class__.__name__}: {exc}"


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
        format=f"%(asctime)s %(levelname)s worker[{args.id}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent()
    settings = Settings(**json.loads(args.config_json))
    worker = GpuWorker(settings, worker_id=args.id, device=args.device or None)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    return worker.run()


if __name__ == "__main__":
    raise SystemExit(main())
