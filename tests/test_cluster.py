"""The cluster mode end to end (issue 11): a real redis-server, `serve --broker` and
`skyreels-local worker` processes, each worker in its own working directory with nothing but the
broker URL (no shared files, no job table). The tiny engine is slowed per step
(tests/slow_engine.py) so that jobs can be caught mid-run.

One cluster (Redis with AOF, one API, two workers) serves the module; the tests run in file order
and each leaves it serving: clients first, then cancels, then the faults (a worker killed -9,
Redis killed -9 with and without AOF, the API killed -9), then a second API with another model.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import wavespeed
from api_server import (
    RunningServer,
    auth,
    data_uri,
    running_server,
    start_server,
    stop_server,
    wait_ready,
)
from cluster_support import (
    RedisServer,
    WorkerProcess,
    cluster_args,
    queued_messages,
    require_cluster_tools,
    start_redis,
    start_worker,
    wait_for,
    wait_worker_ready,
)

from skyreels_local.jobs import Database
from skyreels_local.jobs.remote import RemoteJobs
from skyreels_local.paths import DataPaths
from skyreels_local.video import read_mp4

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "wavespeed-ai/SkyReels-V1"
STEP_DELAY_S = 0.1  # per denoising step on the workers


class Cluster:
    def __init__(self, root: Path, redis_server: RedisServer) -> None:
        self.root = root
        self.redis = redis_server
        self.data_dir = root / "api-data"
        self.api: RunningServer | None = None
        self.workers: dict[str, WorkerProcess] = {}

    def start_api(self) -> RunningServer:
        self.api = start_server(self.data_dir, args=cluster_args(self.redis))
        return self.api

    def add_worker(self, worker_id: str) -> WorkerProcess:
        worker = start_worker(self.redis.url, self.root / worker_id, worker_id, step_delay_s=STEP_DELAY_S)
        self.workers[worker_id] = worker
        return worker

    def completions(self) -> list[str]:
        return [pid for worker in self.workers.values() for pid in worker.completed()]

    def db(self) -> Database:
        return Database(DataPaths(self.data_dir).database)

    def submit(self, steps: int = 2, prompt: str = "a calm sea") -> str:
        return self.api.submit({"prompt": prompt, "image": data_uri(), "num_inference_steps": steps})["id"]

    def wait_all(self, ids: list[str], timeout: float = 120.0) -> dict[str, dict]:
        return {pid: self.api.wait(pid, timeout=timeout) for pid in ids}

    def running_on(self, prediction_id: str) -> str | None:
        """The remote worker whose heartbeat shows it running the prediction (/ready's detail)."""
        workers = httpx.get(self.api.base_url + "/ready", headers=auth(self.api)).json()["data"]["workers"]
        return next((w["id"] for w in workers if w.get("remote") and w["job_id"] == prediction_id), None)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_cluster_tools()
    root = tmp_path_factory.mktemp("cluster")
    redis_server = start_redis(root / "redis", appendonly=True)
    cluster = Cluster(root, redis_server)
    try:
        for worker_id in ("gpu-a", "gpu-b"):
            cluster.add_worker(worker_id)
        cluster.start_api()
        for worker in cluster.workers.values():
            wait_worker_ready(worker)
        wait_ready(cluster.api)
        yield cluster
    finally:
        if cluster.api is not None:
            stop_server(cluster.api)
        for worker in cluster.workers.values():
            worker.stop()
        redis_server.kill()


def test_eight_jobs_from_the_wavespeed_client_complete_on_both_workers(cluster, tmp_path):
    client = wavespeed.Client(base_url=cluster.api.base_url, api_key=cluster.api.api_key)

    def run(index: int) -> dict:
        body = {"prompt": f"waves {index}", "image": data_uri(), "num_inference_steps": 3, "seed": index}
        return client.run(MODEL, body, poll_interval=0.2, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    # The client returns the outputs: /files/outputs/<prediction id>.mp4?<signature>.
    ids = [result["outputs"][0].split("/files/outputs/")[1].split(".mp4")[0] for result in results]
    assert len(set(ids)) == 8
    for index, result in enumerate(results):
        assert cluster.api.get(ids[index])["seed"] == index
        response = httpx.get(result["outputs"][0])
        assert response.status_code == 200
        (tmp_path / f"{index}.mp4").write_bytes(response.content)
        frames, fps = read_mp4(tmp_path / f"{index}.mp4")
        assert frames.shape == (9, 32, 64, 3) and fps == 24
    # Every job ran exactly once, and each worker took some.
    per_worker = {name: set(ids) & set(w.completed()) for name, w in cluster.workers.items()}
    assert sorted(cluster.completions()) == sorted(ids)
    assert all(per_worker.values()), per_worker
    # /ready (with a key) shows each remote worker: host, device, model, idle/busy, last seen.
    ready = httpx.get(cluster.api.base_url + "/ready", headers=auth(cluster.api)).json()["data"]
    remote = {w["id"]: w for w in ready["workers"] if w.get("remote")}
    assert set(remote) == {"gpu-a", "gpu-b"} and ready["broker"] == {"connected": True, "error": None}
    for worker in remote.values():
        assert (worker["host"], worker["device"], worker["model_key"]) == (
            socket.gethostname(),
            "cpu",
            "tiny-random",
        )
        assert worker["state"] in ("ready", "busy") and time.time() - worker["last_seen"] < 10
    # /metrics names both remote workers with their host, device and state.
    text = httpx.get(cluster.api.base_url + "/metrics").text
    assert 'skyreels_remote_worker_last_seen_seconds{device="cpu"' in text
    assert 'worker="gpu-a"' in text and 'worker="gpu-b"' in text
    assert "skyreels_workers_up 2.0" in text and "skyreels_broker_connected 1.0" in text
    assert "skyreels_broker_send_window 4.0" in text  # 2 per live worker
    assert "skyreels_broker_sent_waiting " in text


def test_ten_jobs_go_out_through_the_send_window_and_all_complete_once(cluster):
    # Two live workers: at most 4 jobs sent but not started wait in Redis; the rest in the table.
    ids = [cluster.submit(steps=4, prompt=f"window {i}") for i in range(10)]
    client, db = cluster.redis.client(), cluster.db()
    most_queued, most_sent_waiting = 0, 0

    def all_ended() -> bool:
        nonlocal most_queued, most_sent_waiting
        most_queued = max(most_queued, queued_messages(client))
        most_sent_waiting = max(most_sent_waiting, RemoteJobs(db).sent_waiting())
        jobs = [db.predictions.get(pid) for pid in ids]
        return all(job.terminal for job in jobs)

    wait_for(all_ended, 120, "the ten jobs to end")
    assert [db.predictions.get(pid).status for pid in ids] == ["completed"] * 10
    assert 1 <= most_queued <= 4 and 1 <= most_sent_waiting <= 4, (most_queued, most_sent_waiting)
    completions = cluster.completions()
    assert {pid: completions.count(pid) for pid in ids} == dict.fromkeys(ids, 1)


def test_cancel_of_a_queued_and_of_a_running_remote_job(cluster):
    running = [cluster.submit(steps=50, prompt=f"long {i}") for i in range(2)]
    queued = cluster.submit(steps=2, prompt="queued")
    for pid in running:
        cluster.api.wait(pid, statuses=("processing",), timeout=60)
    # The workers' progress reaches the table; the third job waits in the queue behind them.
    wait_for(lambda: 0 < cluster.api.get(running[0])["progress"] < 1, 30, "progress of a remote job")
    assert cluster.api.get(queued)["status"] == "created"
    assert cluster.api.get(queued)["queue_position"] == 1
    with cluster.api.client() as client:
        assert client.post(f"/api/v3/predictions/{queued}/cancel").json()["data"]["status"] == "cancelled"
        answer = client.post(f"/api/v3/predictions/{running[0]}/cancel").json()["data"]
        assert answer["status"] == "processing"  # stops at its next step
        client.post(f"/api/v3/predictions/{running[1]}/cancel")
    for pid in running:
        assert cluster.api.wait(pid, timeout=30)["status"] == "cancelled"
    # The queued one never started anywhere; both workers go on with the next jobs.
    logs = "".join(w.log() for w in cluster.workers.values())
    assert f"prediction {queued}: started" not in logs
    after = [cluster.submit(steps=2) for _ in range(2)]
    assert all(job["status"] == "completed" for job in cluster.wait_all(after).values())
    assert cluster.db().predictions.get(queued).status == "cancelled"


def test_a_stale_message_is_dropped_and_acknowledged_not_left_for_redelivery(cluster):
    # What Redis redelivers after the visibility timeout, or an API re-sent: an old token.
    from skyreels_local.cluster import protocol
    from skyreels_local.cluster.celery_app import make_celery
    from skyreels_local.config import Settings

    app = make_celery(Settings(broker=cluster.redis.url))
    client = cluster.redis.client()
    client.set(protocol.dispatch_key("stale-job"), "new-token")
    payload = protocol.TaskPayload("stale-job", "old-token", {"prompt": "x"}, b"", 30.0)
    app.send_task(protocol.TASK_NAME, args=[payload.to_json()], task_id="stale-job.old-token",
                  queue="skyreels.tiny-random", exchange="", routing_key="skyreels.tiny-random")  # fmt: skip
    dropped = "prediction stale-job: dispatch old-token is stale; dropped without running"
    wait_for(
        lambda: any(dropped in w.log() for w in cluster.workers.values()), 30, "the stale message dropped"
    )
    wait_for(lambda: client.hlen("unacked") == 0, 10, "the stale message to be acknowledged")
    assert queued_messages(client) == 0
    meta = client.get(app.backend.get_key_for_task("stale-job.old-token"))
    assert meta is None or json.loads(meta)["status"] == "STARTED"  # no outcome stored for it
    client.delete(protocol.dispatch_key("stale-job"))


def test_a_worker_killed_mid_job_its_job_completes_on_the_other(cluster):
    pid = cluster.submit(steps=40, prompt="interrupted")
    cluster.api.wait(pid, statuses=("processing",), timeout=60)
    holder = wait_for(lambda: cluster.running_on(pid), 10, "a worker's heartbeat to show the job")
    victim = cluster.workers[holder]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    final = cluster.api.wait(pid, timeout=90)
    assert final["status"] == "completed", final
    job = cluster.db().predictions.get(pid)
    assert job.attempts == 2 and job.worker_id != holder
    assert pid in cluster.workers[job.worker_id].completed()
    assert pid not in victim.completed()
    # Its replacement (as systemd/compose would start) joins the same queue.
    cluster.add_worker(holder)


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-aof"])
def test_redis_killed_and_restarted_mid_queue_every_job_completes(cluster, appendonly):
    ids = [cluster.submit(steps=4, prompt=f"redis {i}") for i in range(6)]
    cluster.api.wait(ids[0], statuses=("processing", "completed"), timeout=60)
    if appendonly:
        wait_for(lambda: queued_messages(cluster.redis.client()) > 0, 10, "queued messages")
        time.sleep(1.2)  # past appendfsync everysec: the queue is on disk
    cluster.redis.kill()
    ids.append(cluster.submit(steps=2, prompt="while Redis is down"))  # accepted: the table decides
    cluster.redis.start(appendonly=appendonly)
    finals = cluster.wait_all(ids, timeout=120)
    assert [finals[pid]["status"] for pid in ids] == ["completed"] * 7, finals
    # Recorded once each. A job whose outcome Redis lost may have been run again, but only as a
    # counted attempt: no worker ever ran a job more often than the table dispatched it.
    db = cluster.db()
    completions = cluster.completions()
    for pid in ids:
        attempts = db.predictions.get(pid).attempts
        assert 1 <= completions.count(pid) <= attempts <= 2, (pid, completions.count(pid), attempts)


def test_api_killed_and_restarted_with_jobs_queued_all_complete_once(cluster):
    # 9 jobs of 3 s+ on 2 workers (the killed one's replacement took its id), so the 4 queued
    # in Redis are still waiting when the API is back, even if its restart is slow: the
    # restarted dispatcher must find and re-send them.
    ids = [cluster.submit(steps=30, prompt=f"restart {i}") for i in range(9)]
    cluster.api.wait(ids[0], statuses=("processing",), timeout=60)
    wait_for(lambda: queued_messages(cluster.redis.client()) >= 2, 10, "jobs queued in Celery")
    stop_server(cluster.api, sig=signal.SIGKILL)
    cluster.start_api()
    wait_ready(cluster.api)
    finals = cluster.wait_all(ids, timeout=120)
    assert [finals[pid]["status"] for pid in ids] == ["completed"] * 9, finals
    # The restarted dispatcher re-sent what was still queued (under fresh tokens; the workers
    # dropped the old messages), and still every job ran to completion exactly once.
    assert "re-sent" in cluster.api.log_path.read_text()
    completions = cluster.completions()
    assert {pid: completions.count(pid) for pid in ids} == dict.fromkeys(ids, 1)
    db = cluster.db()
    assert [db.predictions.get(pid).attempts for pid in ids] == [1] * 9


def test_a_worker_of_another_model_never_takes_a_job(cluster, tmp_path):
    # A second API on the same Redis serving a weights folder (model key skyreels-v1): the
    # tiny-random workers, idle, never take its job; a worker of that model then runs it.
    weights = tmp_path / "weights"
    weights.mkdir()
    args = cluster_args(cluster.redis, "--model", str(weights))
    with running_server(tmp_path / "data", args=args, ready_path="/health") as other:
        assert httpx.get(other.base_url + "/ready").status_code == 503  # no worker of its model
        pid = other.submit({"prompt": "elsewhere", "image": data_uri(), "num_inference_steps": 2})["id"]
        time.sleep(3)
        assert other.get(pid)["status"] == "created"
        right = start_worker(cluster.redis.url, tmp_path / "right", "weights-worker", model=str(weights))
        try:
            assert other.wait(pid, timeout=180)["status"] == "completed"
            assert pid in right.completed()
        finally:
            right.stop()
    assert all(pid not in w.log() for w in cluster.workers.values())
