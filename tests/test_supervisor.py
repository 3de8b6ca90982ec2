"""The worker supervisor with real worker processes (a stub engine, so they start instantly)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
from api_server import TESTS_DIR, data_uri
from waiting import wait_until

from skyreels_local.config import Settings
from skyreels_local.jobs import Database, JobStatus
from skyreels_local.server.supervisor import WorkerSupervisor


@pytest.fixture
def supervised(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    settings = Settings(data_dir=tmp_path, device="cpu", engine_factory="slow_engine:build_stub_engine")
    store = Database(tmp_path / "jobs.sqlite3")
    supervisor = WorkerSupervisor(settings, store)
    yield supervisor, store
    supervisor.stop()


def ready_pid(store: Database) -> int | None:
    workers = store.workers.all()
    return workers[0].pid if workers and workers[0].state == "ready" else None


def test_workers_outlive_the_thread_that_started_the_supervisor(supervised):
    supervisor, store = supervised

    def pool_thread() -> None:  # as a server's thread pool would: start it, idle, then retire
        supervisor.start()
        wait_until(lambda: ready_pid(store) is not None, 30, "a ready worker")

    starter = threading.Thread(target=pool_thread)
    starter.start()
    starter.join()
    pid = ready_pid(store)
    time.sleep(1.5)  # the starting thread is gone: the parent-death signal must not have fired
    os.kill(pid, 0)
    assert store.workers.all()[0].state == "ready" and supervisor.restarts == 0


def test_a_dead_worker_is_restarted_and_its_job_queued_again(supervised):
    supervisor, store = supervised
    supervisor.start()
    wait_until(lambda: ready_pid(store) is not None, 30, "a ready worker")
    pid = ready_pid(store)
    # A job the worker "was running" when it died.
    job_id = uuid.uuid4().hex
    store.predictions.create(
        id=job_id,
        model="m",
        input={},
        params={"prompt": "p", "image": data_uri()},
        seed=1,
        base_url="http://s",
    )
    store.predictions.claim_next("w0", "claim")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: ready_pid(store) not in (None, pid), 30, "a new ready worker")
    assert supervisor.restarts == 1
    job = store.predictions.get(job_id)
    # re-queued, then claimed by the restarted worker whose stub engine fails it
    assert job.status in (JobStatus.CREATED, JobStatus.PROCESSING, JobStatus.FAILED)
    wait_until(lambda: store.predictions.get(job_id).status == JobStatus.FAILED, 30, "the job to fail")
    failed = store.predictions.get(job_id)
    assert failed.attempts == 2 and "stub engine does not generate" in failed.error


def test_stop_is_graceful(supervised):
    supervisor, store = supervised
    supervisor.start()
    wait_until(lambda: ready_pid(store) is not None, 30, "a ready worker")
    supervisor.stop()
    assert store.workers.all()[0].state == "stopped"
    assert [w.process.returncode for w in supervisor.workers] == [0]
