"""Faults against one real server (tests/slow_engine.py: the tiny engine at 0.05 s per step, with
`[hang]` and `[oom]` prompt markers): a step that never returns is cut off by the job timeout and
its worker restarted, a CUDA OOM fails only its own job, webhooks reach a receiver that was down
and do not wait for one that hangs, a small load run loses nothing, and /metrics counts it all."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from api_server import TESTS_DIR, auth, data_uri, local_site, running_server
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_until

from skyreels_local.jobs import Database
from skyreels_local.server.webhooks import verify

sys.path.insert(0, str(Path(TESTS_DIR).parent / "scripts"))
from load_bench import run_load  # noqa: E402

JOB_TIMEOUT_S = 15.0  # above a 1-step tiny job on a loaded 2-core CI machine (seen up to ~5 s)
WEBHOOK_BACKOFF_S = 0.3
WEBHOOK_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("faults") / "data"
    env = {"SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine", "SKYREELS_TEST_STEP_DELAY_S": "0.05"}
    args = [
        "--url-allow-list", "127.0.0.1",
        "--job-timeout-s", str(JOB_TIMEOUT_S),
        "--webhook-backoff-s", str(WEBHOOK_BACKOFF_S),
        "--webhook-timeout-s", str(WEBHOOK_TIMEOUT_S),
    ]  # fmt: skip
    with running_server(data_dir, env=env, args=args) as server:
        yield server


def body(prompt: str = "a calm sea", steps: int = 1) -> dict:
    return {"prompt": prompt, "image": data_uri(), "num_inference_steps": steps}


def worker_pid(server) -> int:
    return httpx.get(server.base_url + "/ready", headers=auth(server)).json()["data"]["workers"][0]["pid"]


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.base_url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_a_hung_step_fails_at_the_job_timeout_and_the_worker_is_restarted(server):
    old_pid = worker_pid(server)
    restarts = metrics(server)["skyreels_worker_restarts_total"]
    with local_site() as site:
        hung = server.submit(body("[hang] a stuck GPU"), webhook=f"{site.url}/hook")
        waiting = server.submit(body())
        # The API answers throughout: while the step hangs, and while the worker is reloaded.
        latencies: list[float] = []

        def hung_job_ended() -> str | None:
            status = server.get(hung["id"])["status"]
            started = time.monotonic()
            server.get(waiting["id"])
            latencies.append(time.monotonic() - started)
            return status if status in ("failed", "completed") else None

        status = wait_until(hung_job_ended, 120, "the hung job to end at the job timeout", interval=0.1)
        assert max(latencies) < 2.0
        failed = server.get(hung["id"])
        assert (status, failed["code"]) == ("failed", 5004)
        assert failed["error"] == (
            f"generation did not finish within the job timeout of {JOB_TIMEOUT_S:g} s "
            "(--job-timeout-s / SKYREELS_JOB_TIMEOUT_S); its worker was restarted"
        )
        assert failed["outputs"] == []
        # The job behind it runs on the restarted worker.
        done = server.wait(waiting["id"], timeout=120)
        assert done["status"] == "completed" and httpx.get(done["outputs"][0]).status_code == 200
        assert worker_pid(server) != old_pid
        assert metrics(server)["skyreels_worker_restarts_total"] == restarts + 1
        # The timeout is announced like any failure.
        (hook,) = site.wait_for(1, timeout=30)
        assert hook.json()["id"] == hung["id"] and hook.json()["code"] == 5004
    log = server.log_path.read_text()
    assert (
        f"prediction {hung['id']}: still running on worker w0 after the {JOB_TIMEOUT_S:g}s job timeout" in log
    )
    assert f"worker w0 killed: prediction {hung['id']} passed the job timeout" in log


def test_a_cuda_out_of_memory_fails_only_its_own_job(server):
    pid = worker_pid(server)
    oom = server.wait(server.submit(body("[oom] too big"))["id"])
    assert oom["status"] == "failed" and oom["code"] == 1403
    assert oom["error"] == (
        "the GPU ran out of memory during generation with memory profile 'cpu'; start the server "
        "with a lower-memory profile (--profile / SKYREELS_PROFILE, see `skyreels-local serve --help`)"
    )
    after = server.wait(server.submit(body())["id"])
    assert after["status"] == "completed"
    assert worker_pid(server) == pid  # an OOM corrupts nothing: same worker, model still loaded
    # The engine's own log line does not know the job; the worker tags it with the id.
    log = server.log_path.read_text()
    assert f"worker[w0] [prediction {after['id']}] skyreels_local.engine.engine: generated" in log


def test_a_receiver_that_is_down_at_first_still_gets_the_webhook(server):
    with local_site() as site:
        site.post_statuses = [503, 502]
        job = server.submit(body(), webhook=f"{site.url}/late")
        received = site.wait_for(3, timeout=30)
        assert [r.path for r in received] == ["/late"] * 3
        secret = server.client().get("/api/v3/webhook/secret").json()["data"]["secret"]
        for request in received:
            assert verify(secret, request.headers, request.body)
            assert request.json()["id"] == job["id"] and request.json()["status"] == "completed"
    store = Database(server.data_dir / "jobs.sqlite3")
    row = store._conn().execute(
        "SELECT status, attempts, last_error FROM webhooks WHERE prediction_id = ?", (job["id"],)
    )
    assert tuple(row.fetchone()) == ("delivered", 3, "HTTP 502")


def test_a_hanging_receiver_stalls_neither_jobs_nor_other_webhooks(server):
    with local_site() as site:
        site.post_delays["/hang"] = 20.0
        hanging = server.submit(body(), webhook=f"{site.url}/hang")
        server.wait(hanging["id"])
        site.wait_for(1, timeout=30)  # the hanging delivery is in progress
        started = time.monotonic()
        other = server.wait(server.submit(body(), webhook=f"{site.url}/ok")["id"])
        assert other["status"] == "completed"
        site.wait_for_path("/ok", timeout=10)  # not held behind the hanging one
        assert time.monotonic() - started < 10
        # The hanging receiver is cut off at the webhook timeout and tried again later.
        wait_until(
            lambda: len([r for r in site.received if r.path == "/hang"]) >= 2,
            30,
            "a retry of the hanging delivery",
        )
    store = Database(server.data_dir / "jobs.sqlite3")
    status, error = (
        store._conn()
        .execute("SELECT status, last_error FROM webhooks WHERE prediction_id = ?", (hanging["id"],))
        .fetchone()
    )
    assert status == "pending" and "timed out" in error


def test_a_small_load_run_loses_nothing(server):
    # A CI-sized cut of scripts/load_bench.py (200 submits from 20 clients): the same code path.
    report = run_load(
        server.base_url, server.api_key, submits=10, clients=5, poll_s=0.2, steps=1, timeout_s=240
    )
    assert report.errors == []
    assert (report.accepted, report.completed, report.lost, report.history_missing) == (10, 10, [], [])
    assert report.ok and len(report.poll_latencies_s) >= 10


def test_metrics_count_jobs_queue_generation_steps_restarts_and_webhooks(server):
    store = Database(server.data_dir / "jobs.sqlite3")
    rows = store._conn().execute("SELECT id, status FROM predictions").fetchall()
    completed = [job_id for job_id, status in rows if status == "completed"]
    steps = sum(store.predictions.get_full(job_id).params["num_inference_steps"] for job_id in completed)
    values = metrics(server)
    for status in ("created", "processing", "completed", "failed", "cancelled"):
        expected = sum(1 for _, s in rows if s == status)
        assert values[f"skyreels_jobs{{status={status}}}"] == expected, status
    assert values["skyreels_queue_depth"] == 0
    assert values["skyreels_generation_seconds_count"] == len(completed) >= 13
    assert values["skyreels_step_seconds_count"] == steps
    # Denoising is a part of each whole generation.
    assert 0 < values["skyreels_step_seconds_sum"] < values["skyreels_generation_seconds_sum"]
    assert values["skyreels_worker_restarts_total"] == 1  # the hung worker
    assert values["skyreels_workers_up"] == 1
    assert values["skyreels_webhook_failures_total"] >= 4  # 2 while down, 2+ against the hanging one
    assert values["skyreels_webhooks_total{outcome=delivered}"] >= 3
