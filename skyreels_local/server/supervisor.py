"""Starts the worker processes, watches them, and restarts the ones that die.

Runs inside the HTTP process (a thread; it never imports torch). One worker per visible GPU,
each pinned with CUDA_VISIBLE_DEVICES; one on a CPU-only machine; `--device` pins a single
worker. A worker that exits unexpectedly has its job re-queued (or failed once it has used up
its attempts, see jobs/predictions.py) and is restarted with a growing delay, so a model that
cannot load does not spin. A worker whose heartbeat stops (a hung process) is killed and treated the same.

A job still running after `job_timeout_s` (a step that never returns, a stuck GPU: the worker's
heartbeat thread goes on beating, so only the job's age shows it) is failed with code 5004 and
its worker is killed and restarted; the job is not retried, since a job that hung once would
most likely hold the next worker just as long.

A worker that cannot load the model (a GPU fault, a bad profile file) says why in its row of the
worker table and exits; its reason is logged with each retry, and `load_failure()` hands it to
/ready and to submits (503) until a worker loads. The retries back off to one a minute.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..config import Settings
from ..errors import TaskCode
from ..jobs import Database

log = logging.getLogger(__name__)

MONITOR_S = 0.5
HEARTBEAT_STALE_S = 60.0  # a worker that has not written its heartbeat for this long is hung
MAX_RESTART_DELAY_S = 60.0
STOP_GRACE_S = 20.0


@dataclass
class WorkerSpec:
    id: str
    device: str  # "" lets the worker pick (cuda when present, else cpu)
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """GPU indices this process may use, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def plan_workers(settings: Settings) -> list[WorkerSpec]:
    if settings.workers == 0 or (settings.broker and not settings.workers):
        return []  # with --broker, jobs go to remote workers (cluster/dispatcher.py)
    if settings.gpus_per_video > 1:
        return plan_groups(settings)
    if settings.device:
        return [WorkerSpec("w0", settings.device)]
    gpus = visible_gpus()
    if not gpus:
        return [WorkerSpec(f"w{i}", "cpu") for i in range(settings.workers or 1)]
    count = settings.workers or len(gpus)
    return [WorkerSpec(f"w{i}", "cuda", {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}) for i in range(count)]


def plan_groups(settings: Settings) -> list[WorkerSpec]:
    """`--gpus-per-video N`: each worker is a group of N processes (worker/group.py) that sees
    its own N GPUs; visible GPUs / N groups (a remainder stays idle). On a CPU (`--device cpu`,
    or no GPU) one group of N gloo processes."""
    n = settings.gpus_per_video
    gpus = [] if settings.device == "cpu" else visible_gpus()
    if not gpus:
        return [WorkerSpec(f"w{i}", "cpu") for i in range(settings.workers or 1)]
    groups = [gpus[i : i + n] for i in range(0, len(gpus) - n + 1, n)]
    if not groups:
        # Start one anyway: it fails to load with a message naming the shortfall (/ready shows it).
        groups = [gpus]
    if len(gpus) % n:
        log.warning("--gpus-per-video %d: %d of %d GPUs stay idle", n, len(gpus) % n, len(gpus))
    count = min(settings.workers or len(groups), len(groups))
    return [WorkerSpec(f"w{i}", "cuda", {"CUDA_VISIBLE_DEVICES": ",".join(groups[i])}) for i in range(count)]


@dataclass
class _Managed:
    spec: WorkerSpec
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    kill_reason: str = ""  # set when the supervisor itself killed the process
    load_error: str = ""  # why its last start could not load the model ("" once it did, or crashed later)


class WorkerSupervisor:
    def __init__(self, settings: Settings, db: Database, *, log_level: str = "INFO") -> None:
        self.settings = settings
        self.db = db
        self.log_level = log_level
        self.workers = [_Managed(spec) for spec in plan_workers(settings)]
        self.restarts = 0
        self.retry_delay_s = MAX_RESTART_DELAY_S  # the steady retry of a worker that cannot load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Workers need the settings but not the API keys or the webhook secret.
        self._config_json = settings.model_dump_json(exclude={"api_keys", "webhook_secret"})

    def start(self) -> None:
        # Jobs left running by our worker ids, or by any worker process that no longer exists,
        # belong to a previous life of the server: queue them again (or fail them, see jobs/predictions.py).
        dead = {w.spec.id for w in self.workers}
        dead |= {r.id for r in self.db.workers.all() if r.pid is None or not pid_alive(r.pid)}
        if dead:
            self.db.predictions.recover(worker_ids=sorted(dead), max_attempts=self.settings.max_attempts)
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Every worker is started, watched and stopped from this one thread, which outlives them:
        # Linux's parent-death signal (worker/main.py) fires when the *thread* that started a process
        # exits, so a worker started from a short-lived thread (e.g. a thread pool's) would be
        # killed when that thread is retired.
        for worker in self.workers:
            self._spawn(worker)
        while not self._stop.wait(MONITOR_S):
            try:
                self._enforce_job_timeout()
            except Exception:
                log.exception("supervisor: checking job timeouts failed")
            for worker in self.workers:
                try:
                    self._check(worker)
                except Exception:
                    log.exception("supervisor: checking worker %s failed", worker.spec.id)
        self._stop_workers()

    def _enforce_job_timeout(self) -> None:
        if self.settings.broker:
            return  # remote jobs: the cluster dispatcher enforces it (and tells their worker)
        timeout = self.settings.job_timeout_s
        for job in self.db.predictions.overdue_jobs(started_before=time.time() - timeout):
            error = (
                f"generation did not finish within the job timeout of {timeout:g} s "
                "(--job-timeout-s / SKYREELS_JOB_TIMEOUT_S); its worker was restarted"
            )
            # Fail first, guarded by the claim: a job that finished a moment ago stays finished.
            if not self.db.predictions.fail(job.id, job.claim or "", code=TaskCode.TIMEOUT, error=error):
                continue
            worker = next((w for w in self.workers if w.spec.id == job.worker_id), None)
            log.error(
                "prediction %s: still running on worker %s after the %gs job timeout; failed it%s",
                job.id, job.worker_id, timeout, ", killing the worker" if worker else "",
            )  # fmt: skip
            if worker is not None and worker.process is not None and worker.process.poll() is None:
                worker.kill_reason = f"killed: prediction {job.id} passed the job timeout"
                worker.process.kill()

    def _spawn(self, worker: _Managed) -> None:
        command = [
            sys.executable, "-m", "skyreels_local.worker",
            "--id", worker.spec.id,
            "--device", worker.spec.device,
            "--config-json", self._config_json,
            "--log-level", self.log_level,
        ]  # fmt: skip
        env = {**os.environ, **worker.spec.env, "PYTHONUNBUFFERED": "1"}
        # Own session: a Ctrl+C in the server's terminal reaches the server only, which then stops
        # its workers in order (SIGTERM, each hands its job back) instead of racing them.
        worker.process = subprocess.Popen(command, env=env, start_new_session=True)
        worker.started_at = time.monotonic()
        log.info(
            "worker %s started (pid %d, device %s)", worker.spec.id, worker.process.pid, worker.spec.device
        )

    def _check(self, worker: _Managed) -> None:
        now = time.monotonic()
        if worker.process is None:
            if now >= worker.restart_at and not self._stop.is_set():
                self.restarts += 1
                self._spawn(worker)
            return
        code = worker.process.poll()
        if code is None:
            if self._heartbeat_stale(worker):
                log.error("worker %s: no heartbeat for %.0fs, killing it", worker.spec.id, HEARTBEAT_STALE_S)
                worker.kill_reason = f"killed: no heartbeat for {HEARTBEAT_STALE_S:.0f}s"
                worker.process.kill()
            return
        if self._stop.is_set():
            return
        # Died (or was killed by us): give its job back (or fail it), then restart with a growing
        # delay, so that a worker that cannot start does not spin.
        uptime = now - worker.started_at
        worker.load_error = self._load_error(worker)
        reason = worker.kill_reason or (
            f"could not load the model: {worker.load_error}"
            if worker.load_error
            else f"exited with code {code}"
        )
        worker.failures = 1 if uptime > MAX_RESTART_DELAY_S else worker.failures + 1
        delay = min(2.0 ** (worker.failures - 1), self.retry_delay_s)
        log.error("worker %s %s; restarting in %.0fs", worker.spec.id, reason, delay)
        self._mark_dead(worker, reason)
        worker.process = None
        worker.kill_reason = ""
        worker.restart_at = now + delay

    def _load_error(self, worker: _Managed) -> str:
        """The reason a dead worker gave for not loading the model (worker/main.py marks it `failed`)."""
        for record in self.db.workers.all():
            if record.id == worker.spec.id and record.state == "failed":
                return record.error or "unknown error"
        return ""

    def load_failure(self) -> str | None:
        """Why no worker can load the model: set while every worker's last start failed to load
        (None once any worker is up or crashed for another reason, and with no workers at all)."""
        if not self.workers or not all(w.load_error for w in self.workers):
            return None
        return self.workers[0].load_error

    def _heartbeat_stale(self, worker: _Managed) -> bool:
        if time.monotonic() - worker.started_at < HEARTBEAT_STALE_S:
            return False
        for record in self.db.workers.all():
            if record.id == worker.spec.id:
                return time.time() - record.heartbeat_at > HEARTBEAT_STALE_S
        return False

    def _mark_dead(self, worker: _Managed, reason: str) -> None:
        records = {record.id: record for record in self.db.workers.all()}
        record = records.get(worker.spec.id)
        if record is not None and record.state != "failed":
            self.db.workers.update(worker.spec.id, state="crashed", error=reason, job_id=None)
        self.db.predictions.recover(worker_ids=[worker.spec.id], max_attempts=self.settings.max_attempts)

    def stop(self) -> None:
        """Stop every worker (each hands its running job back) and wait for them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 15)

    def _stop_workers(self) -> None:
        """SIGTERM every worker (each re-queues its running job), then SIGKILL stragglers."""
        running = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        for worker in running:
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in running:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %s did not stop in %.0fs, killing it", worker.spec.id, STOP_GRACE_S)
                worker.process.kill()
                worker.process.wait()
        ids = [w.spec.id for w in self.workers]
        if ids:
            self.db.predictions.recover(worker_ids=ids, max_attempts=self.settings.max_attempts)
