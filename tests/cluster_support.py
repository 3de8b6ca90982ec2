"""Test helpers for the cluster mode: a real `redis-server` on a free loopback port (killable and
restartable on the same port, with or without AOF), and `skyreels-local worker` processes, each
in its own working directory with no access to the API's data directory.

Skipped when redis-server or celery is missing, but failed under CI=true (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from api_server import server_env
from waiting import wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HEARTBEAT_S = 0.5  # short heartbeats: a killed worker is noticed in 4 of them


def require_cluster_tools() -> None:
    """Skip (fail under CI=true) without redis-server or celery."""
    missing = []
    if not Path(REDIS_SERVER).is_file():
        missing.append("redis-server (apt-get install redis-server)")
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        missing.append("celery[redis] (pip install -e '.[cluster]')")
    if missing:
        message = "cluster tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    folder: Path
    appendonly: bool
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, appendonly: bool | None = None) -> None:
        if appendonly is not None:
            self.appendonly = appendonly
        command = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.folder),
        ]  # fmt: skip
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the process writes it
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.answers, 20, "redis-server to answer PING", interval=0.05)

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """kill -9: no shutdown save, whatever the AOF has not fsynced is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def client(self):
        import redis

        return redis.Redis(port=self.port)


def start_redis(folder: Path, *, appendonly: bool = True) -> RedisServer:
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(free_port(), folder, appendonly)
    server.start()
    return server


@dataclass
class WorkerProcess:
    worker_id: str
    folder: Path
    process: subprocess.Popen

    @property
    def log_path(self) -> Path:
        return self.folder / "worker.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def completed(self) -> list[str]:
        """The prediction ids this worker ran to completion, in order (from its log)."""
        return [
            line.split("prediction ", 1)[1].split(":", 1)[0]
            for line in self.log().splitlines()
            if "skyreels_local.cluster.remote_worker: prediction " in line and ": completed in " in line
        ]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_worker(
    broker: str,
    folder: Path,
    worker_id: str,
    *,
    model: str = "tiny-random",
    step_delay_s: float = 0.1,
    args: list[str] = (),
) -> WorkerProcess:
    """`skyreels-local worker` in its own working directory, on the slowed tiny engine
    (tests/slow_engine.py: `step_delay_s` per denoising step, so a job can be caught mid-run)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = server_env(
        {
            "SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine",
            "SKYREELS_TEST_STEP_DELAY_S": str(step_delay_s),
        }
    )
    command = [
        sys.executable, "-m", "skyreels_local", "worker", "--broker", broker, "--model", model,
        "--device", "cpu", "--worker-id", worker_id, "--cluster-heartbeat-s", str(HEARTBEAT_S), *args,
    ]  # fmt: skip
    with open(folder / "worker.log", "ab") as log:
        process = subprocess.Popen(
            command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return WorkerProcess(worker_id, folder, process)


def wait_worker_ready(worker: WorkerProcess, timeout: float = 180.0) -> None:
    def ready() -> bool:
        if worker.process.poll() is not None:
            raise AssertionError(f"worker {worker.worker_id} exited:\n{worker.log()[-3000:]}")
        return " ready." in worker.log()  # Celery's "<id>@<host> ready." once it consumes

    wait_until(ready, timeout, lambda: f"worker {worker.worker_id} to consume:\n{worker.log()[-2000:]}")


QUEUE = "skyreels.tiny-random"
# kombu's Redis lists of one queue, by priority step (dispatcher: 0 = sent again, 3 = new).
QUEUE_AGAIN, QUEUE_NEW = QUEUE, QUEUE + "\x06\x163"


def queued_messages(client) -> int:
    """Messages waiting in the tiny model's queue (both priority lists)."""
    return client.llen(QUEUE_AGAIN) + client.llen(QUEUE_NEW)


def cluster_args(redis_server: RedisServer, *extra: str) -> list[str]:
    return [
        "--broker", redis_server.url, "--workers", "0", "--cluster-heartbeat-s", str(HEARTBEAT_S), *extra,
    ]  # fmt: skip


def wait_for(predicate, timeout: float, what) -> object:
    return wait_until(predicate, timeout, what, interval=0.1)


def settle(seconds: float) -> None:
    time.sleep(seconds)
