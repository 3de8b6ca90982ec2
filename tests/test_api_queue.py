"""Queue, progress, cancellation, the queue bound and sync-mode timeouts, with a job that is really
running: the tiny engine slowed to 0.25 s per denoising step (tests/slow_engine.py), so a
30-step job runs for about 8 s on one worker."""

from __future__ import annotations

import os
import signal
import statistics
import time

import httpx
import pytest
import wavespeed
from api_server import MODEL_PATH, auth, data_uri, running_server
from waiting import wait_until

from skyreels_local.video import read_mp4

MAX_QUEUE = 3
SYNC_WAIT_S = 1.5
LONG = 30  # steps of a job that is still running when the test acts on it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("queue") / "data"
    env = {"SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine", "SKYREELS_TEST_STEP_DELAY_S": "0.25"}
    args = ["--max-queue", str(MAX_QUEUE), "--sync-wait-s", str(SYNC_WAIT_S)]
    with running_server(data_dir, env=env, args=args) as server:
        yield server


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client
    # Leave an idle worker and an empty queue for the next test.
    with server.client() as cleanup:
        for item in cleanup.post("/api/v3/predictions", json={"page_size": 100}).json()["data"]["items"]:
            if item["status"] in ("created", "processing"):
                cleanup.post(f"/api/v3/predictions/{item['id']}/cancel")
                server.wait(item["id"], timeout=30)


def body(steps: int, **fields):
    return {"prompt": "a slow boat", "image": data_uri(), "num_inference_steps": steps, **fields}


def start_long_job(server) -> dict:
    data = server.submit(body(LONG))
    server.wait(data["id"], statuses=("processing",), timeout=60)
    return data


def test_polls_answer_in_milliseconds_while_the_worker_is_busy_and_progress_moves(server, client):
    job = start_long_job(server)
    latencies, progress = [], []
    for _ in range(25):
        started = time.perf_counter()
        response = client.get(f"/api/v3/predictions/{job['id']}/result")
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200
        progress.append(response.json()["data"]["progress"])
        time.sleep(0.1)  # 25 samples spread over ~2.5 s of the running job
    assert response.json()["data"]["status"] == "processing"
    # Generous bounds for a loaded 2-core CI box; typically a few milliseconds.
    assert statistics.median(latencies) < 0.25, latencies
    assert max(latencies) < 2.0, latencies
    assert progress == sorted(progress)
    assert any(0.0 < p < 0.95 for p in progress), progress
    assert progress[-1] > progress[0]


def test_queue_positions_cancel_waiting_and_running_jobs_and_the_worker_moves_on(server, client, tmp_path):
    running = start_long_job(server)
    waiting_b = server.submit(body(1))
    waiting_c = server.submit(body(1))
    assert (waiting_b["status"], waiting_b["queue_position"]) == ("created", 1)
    assert (waiting_c["status"], waiting_c["queue_position"]) == ("created", 2)
    assert server.get(running["id"])["queue_position"] == 0

    cancelled = client.post(f"/api/v3/predictions/{waiting_b['id']}/cancel").json()["data"]
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] == 0
    assert "cancelled" in cancelled["error"]
    assert server.get(waiting_c["id"])["queue_position"] == 1

    asked = time.monotonic()
    reply = client.post(f"/api/v3/predictions/{running['id']}/cancel").json()["data"]
    assert reply["status"] in ("processing", "cancelled")  # a running job stops at its next step
    stopped = server.wait(running["id"], timeout=20)
    assert stopped["status"] == "cancelled" and stopped["outputs"] == []
    assert time.monotonic() - asked < 5
    assert stopped["progress"] < 0.95  # stopped during denoising, no decode ran
    assert not (server.data_dir / "outputs" / f"{running['id']}.mp4").exists()

    # The worker moves on to the next waiting job.
    done = server.wait(waiting_c["id"], timeout=60)
    assert done["status"] == "completed"
    response = httpx.get(done["outputs"][0])
    (tmp_path / "c.mp4").write_bytes(response.content)
    assert read_mp4(tmp_path / "c.mp4")[0].shape == (9, 32, 64, 3)
    # The cancelled waiting job never ran.
    never = server.get(waiting_b["id"])
    assert never["status"] == "cancelled" and never["executionTime"] == 0 and never["profile"] == ""
    # Cancelling a finished job changes nothing.
    assert client.post(f"/api/v3/predictions/{done['id']}/cancel").json()["data"]["status"] == "completed"


def test_a_full_queue_answers_429_with_retry_after(server, client):
    start_long_job(server)
    for _ in range(MAX_QUEUE):
        server.submit(body(1))
    total = client.post("/api/v3/predictions").json()["data"]["total"]
    response = client.post(MODEL_PATH, json=body(1))
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert response.json() == {
        "code": 429,
        "message": "Too Many Requests",
        "data": {"error": f"the queue is full ({MAX_QUEUE} jobs waiting); retry later"},
    }
    assert client.post("/api/v3/predictions").json()["data"]["total"] == total  # nothing was created
    # Polls are never rate-limited.
    items = client.post("/api/v3/predictions").json()["data"]["items"]
    assert all(client.get(f"/api/v3/predictions/{i['id']}/result").status_code == 200 for i in items)


def test_sync_mode_timeout_replies_5004_and_the_job_goes_on(server, client):
    started = time.monotonic()
    response = client.post(MODEL_PATH, json=body(12, enable_sync_mode=True))
    waited = time.monotonic() - started
    assert response.status_code == 200
    data = response.json()["data"]
    assert SYNC_WAIT_S <= waited < SYNC_WAIT_S + 3
    assert data["status"] == "processing" and data["code"] == 5004
    assert data["error"] == (
        f"Sync mode timed out after {SYNC_WAIT_S:g} seconds. The prediction is still processing asynchronously."
    )
    assert data["urls"]["get"] == f"{server.base_url}/api/v3/predictions/{data['id']}/result"
    assert server.wait(data["id"], timeout=60)["status"] == "completed"


def test_the_official_client_reports_a_sync_timeout(server, client):
    ws = wavespeed.Client(base_url=server.base_url, api_key=server.api_key)
    with pytest.raises(RuntimeError, match="Sync mode timed out") as raised:
        ws.run("wavespeed-ai/SkyReels-V1", body(12), enable_sync_mode=True)
    assert f"{server.base_url}/api/v3/predictions/" in str(raised.value)
    result = ws.run_no_throw("wavespeed-ai/SkyReels-V1", body(12), enable_sync_mode=True)
    assert result["status"] == "processing" and len(result["task_id"]) == 32


def test_a_worker_killed_mid_job_is_restarted_and_the_job_runs_again(server, client):
    old_pid = httpx.get(server.base_url + "/ready", headers=auth(server)).json()["data"]["workers"][0]["pid"]
    job = server.submit(body(8))
    server.wait(job["id"], statuses=("processing",), timeout=60)
    behind = server.submit(body(1))  # accepted while the worker is busy, then dies
    os.kill(old_pid, signal.SIGKILL)
    # The API keeps answering while the worker is dead and reloading; the job waits, then reruns.
    seen = set()

    def completed() -> bool:
        status = server.get(job["id"])["status"]
        seen.add(status)
        assert status in ("processing", "created", "completed"), status
        return status == "completed"

    wait_until(completed, 120, "the job to complete after its worker was killed", interval=0.1)
    assert "created" in seen  # it went back to the queue
    assert server.wait(behind["id"], timeout=60)["status"] == "completed"
    for done in (job, behind):  # every accepted job has its row and its file
        assert (server.data_dir / "outputs" / f"{done['id']}.mp4").stat().st_size > 0
    ready = httpx.get(server.base_url + "/ready", headers=auth(server)).json()["data"]
    assert ready["ready"] and ready["workers"][0]["pid"] != old_pid
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "skyreels_worker_restarts_total 1.0" in metrics
