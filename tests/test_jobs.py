"""The SQLite job table: states, claims, cancellation, recovery, outbox, history, retention."""

from __future__ import annotations

import sqlite3
import threading
import uuid

import pytest

from skyreels_local.jobs import Database, JobStatus, QueueFullError


@pytest.fixture
def store(tmp_path):
    return Database(tmp_path / "jobs.sqlite3")


def add(store: Database, *, webhook_url: str | None = None, now: float | None = None, **kwargs) -> str:
    job_id = uuid.uuid4().hex
    store.predictions.create(
        id=job_id,
        model="wavespeed-ai/SkyReels-V1",
        input={"prompt": "p", "image": "data:,"},
        params={"prompt": "p", "image": "data:,", "num_inference_steps": 2},
        seed=42,
        base_url="http://test",
        webhook_url=webhook_url,
        preset="exact",
        now=now,
        **kwargs,
    )
    return job_id


def test_create_get_and_queue_positions(store):
    first, second, third = add(store), add(store), add(store)
    job = store.predictions.get(second)
    assert job.status == JobStatus.CREATED and job.seed == 42 and job.preset == "exact"
    assert job.input == {} and job.params == {}  # polls never load the (possibly huge) request
    full = store.predictions.get_full(second)
    assert full.input == {"prompt": "p", "image": "data:,"} and full.params["num_inference_steps"] == 2
    assert [store.predictions.queue_position(store.predictions.get(i)) for i in (first, second, third)] == [
        1,
        2,
        3,
    ]
    assert store.predictions.queue_depth() == 3
    assert store.predictions.get("f" * 32) is None


def test_the_queue_bound(store):
    add(store, max_queue=2)
    add(store, max_queue=2)
    with pytest.raises(QueueFullError) as raised:
        add(store, max_queue=2)
    assert raised.value.http_status == 429 and raised.value.retry_after_s > 0
    assert store.predictions.queue_depth() == 2
    store.predictions.claim_next("w0", "c1")  # a running job does not count against the bound
    add(store, max_queue=2)


def test_claims_are_fifo_and_set_processing(store):
    ids = [add(store) for _ in range(3)]
    job = store.predictions.claim_next("w0", "claim-1", profile="cpu")
    assert job.id == ids[0] and job.status == JobStatus.PROCESSING
    assert job.attempts == 1 and job.claim == "claim-1" and job.profile == "cpu" and job.started_at
    assert store.predictions.queue_position(store.predictions.get(ids[1])) == 1
    assert store.predictions.claim_next("w1", "claim-2").id == ids[1]
    assert store.predictions.claim_next("w2", "claim-3").id == ids[2]
    assert store.predictions.claim_next("w3", "claim-4") is None


def test_concurrent_claims_never_hand_out_a_job_twice(tmp_path):
    store = Database(tmp_path / "jobs.sqlite3")
    ids = {add(store) for _ in range(60)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        own = Database(tmp_path / "jobs.sqlite3")  # its own connection, as a worker process has
        while (job := own.predictions.claim_next(name, uuid.uuid4().hex)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


def test_progress_and_results_need_the_current_claim(store):
    job_id = add(store)
    store.predictions.claim_next("w0", "mine")
    store.predictions.set_progress(job_id, "mine", 0.5)
    store.predictions.set_progress(job_id, "stale", 0.9)
    assert store.predictions.get(job_id).progress == 0.5
    assert store.predictions.fail(job_id, "stale", code=1403, error="x") is False
    assert store.predictions.complete(
        job_id, "mine", outputs=[f"{job_id}.mp4"], execution_ms=1500, inference_ms=1200
    )
    job = store.predictions.get(job_id)
    assert job.status == JobStatus.COMPLETED and job.progress == 1.0 and job.outputs == [f"{job_id}.mp4"]
    assert (job.execution_ms, job.inference_ms, job.error, job.code) == (1500, 1200, "", None)
    assert job.finished_at >= job.started_at
    assert store.predictions.fail(job_id, "mine", code=1403, error="late") is False  # terminal stays terminal


def test_failure_records_code_and_message(store):
    job_id = add(store)
    store.predictions.claim_next("w0", "c")
    assert store.predictions.fail(job_id, "c", code=1402, error="cannot download image")
    job = store.predictions.get(job_id)
    assert (job.status, job.code, job.error) == (JobStatus.FAILED, 1402, "cannot download image")


def test_cancel_waiting_running_and_finished_jobs(store):
    running, waiting, done = add(store), add(store), add(store)
    store.predictions.claim_next("w0", "c-run")
    # a waiting job is cancelled at once
    job = store.predictions.request_cancel(waiting)
    assert job.status == JobStatus.CANCELLED and job.finished_at and "cancelled" in job.error
    # a running one is flagged; the worker sees it and records the cancellation
    assert store.predictions.should_stop(running, "c-run") is False
    assert store.predictions.request_cancel(running).status == JobStatus.PROCESSING
    assert store.predictions.should_stop(running, "c-run") is True
    assert store.predictions.mark_cancelled(running, "c-run")
    assert store.predictions.get(running).status == JobStatus.CANCELLED
    # a finished one is left alone
    store.predictions.claim_next("w0", "c-done")
    store.predictions.complete(done, "c-done", outputs=[], execution_ms=1, inference_ms=1)
    assert store.predictions.request_cancel(done).status == JobStatus.COMPLETED
    assert store.predictions.request_cancel("0" * 32) is None
    assert store.predictions.claim_next("w0", "c-next") is None  # the cancelled waiting job is never claimed


def test_requeue_on_graceful_stop_keeps_the_place_and_the_attempt(store):
    first, second = add(store), add(store)
    store.predictions.claim_next("w0", "c")
    assert store.predictions.requeue(first, "c")
    job = store.predictions.get(first)
    assert job.status == JobStatus.CREATED and job.attempts == 0 and job.claim is None
    assert (
        store.predictions.queue_position(job) == 1
        and store.predictions.queue_position(store.predictions.get(second)) == 2
    )


def test_recovery_requeues_then_fails_after_max_attempts(store):
    job_id = add(store, webhook_url="http://hook")
    store.predictions.claim_next("w0", "c1")
    assert store.predictions.recover(worker_ids=["w0"], max_attempts=2) == 1
    assert store.predictions.get(job_id).status == JobStatus.CREATED
    assert (
        store.predictions.complete(job_id, "c1", outputs=[], execution_ms=1, inference_ms=1) is False
    )  # old claim is dead
    store.predictions.claim_next("w0", "c2")
    assert (
        store.predictions.recover(worker_ids=["w1"], max_attempts=2) == 0
    )  # another worker's death: not ours
    store.predictions.recover(worker_ids=None, max_attempts=2)
    job = store.predictions.get(job_id)
    assert job.status == JobStatus.FAILED and job.code == 5000
    assert "interrupted 2 times" in job.error
    (delivery,) = store.webhooks.claim_due(limit=10, lease_s=60)
    assert delivery.prediction_id == job_id  # the failure is still announced


def test_webhook_outbox_is_written_with_the_result_and_leased(store):
    job_id = add(store, webhook_url="http://receiver/hook")
    add(store)  # no webhook
    store.predictions.claim_next("w0", "c")
    assert store.webhooks.claim_due(limit=10, lease_s=60) == []
    store.predictions.complete(job_id, "c", outputs=["x.mp4"], execution_ms=1, inference_ms=1)
    (delivery,) = store.webhooks.claim_due(limit=10, lease_s=60)
    assert (delivery.prediction_id, delivery.url, delivery.attempts) == (job_id, "http://receiver/hook", 0)
    assert store.webhooks.claim_due(limit=10, lease_s=60) == []  # leased
    store.webhooks.failed(delivery.id, error="HTTP 500", retry_at=0)
    (again,) = store.webhooks.claim_due(limit=10, lease_s=60)
    assert again.attempts == 1
    store.webhooks.delivered(again.id)
    assert store.webhooks.counts() == {"pending": 0, "delivered": 1, "dead": 0, "failed_attempts": 1}


def test_history_filters_and_pages(store):
    old = add(store, now=1000.0)
    mid = add(store, now=2000.0)
    new = add(store, now=3000.0)
    store.predictions.claim_next("w0", "c")
    store.predictions.fail(old, "c", code=1403, error="x")
    jobs, total = store.predictions.history()
    assert [j.id for j in jobs] == [new, mid, old] and total == 3
    assert [j.id for j in store.predictions.history(status="failed")[0]] == [old]
    assert [j.id for j in store.predictions.history(created_after=1500, created_before=2500)[0]] == [mid]
    jobs, total = store.predictions.history(page=2, page_size=2)
    assert [j.id for j in jobs] == [old] and total == 3
    assert store.predictions.history(model="other/model") == ([], 0)


def test_expire_removes_old_finished_jobs_and_uploads(store):
    old_done = add(store, now=1000.0)
    old_cancelled = add(store, now=1001.0)
    recent_done = add(store)
    store.predictions.request_cancel(old_cancelled)
    store.predictions.claim_next("w0", "c1")
    store.predictions.complete(old_done, "c1", outputs=[f"{old_done}.mp4"], execution_ms=1, inference_ms=1)
    store.predictions.claim_next("w0", "c2")
    store.predictions.complete(
        recent_done, "c2", outputs=[f"{recent_done}.mp4"], execution_ms=1, inference_ms=1
    )
    still_waiting = add(store, now=1002.0)
    store.uploads.create(id="a" * 32, filename="a.png", content_type="image/png", size=1, now=1000.0)
    store.uploads.create(id="b" * 32, filename="b.png", content_type="image/png", size=1)
    expired = store.predictions.expire(before=5000.0)
    assert expired.output_files == [f"{old_done}.mp4"]
    assert expired.upload_ids == ["a" * 32]
    assert store.predictions.get(old_done) is None and store.predictions.get(old_cancelled) is None
    assert store.predictions.get(recent_done) is not None
    assert store.predictions.get(still_waiting).status == JobStatus.CREATED  # never expire unfinished work
    assert store.uploads.get("b" * 32) is not None


def test_state_survives_reopening_and_secrets_are_stable(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = Database(path)
    job_id = add(store)
    secret = store.secrets.get_or_create("url_signing_key", "first")
    store.close()
    reopened = Database(path)
    assert reopened.predictions.get(job_id).status == JobStatus.CREATED
    assert reopened.secrets.get_or_create("url_signing_key", "second") == secret == "first"
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    Database(path).close()
    sqlite3.connect(path).execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer skyreels-local"):
        Database(path)


def test_workers_register_heartbeat_and_update(store):
    store.workers.register("w0", pid=123, device="cpu", now=10.0)
    store.workers.update("w0", state="ready", model="tiny-random", profile="cpu")
    store.workers.heartbeat("w0", now=20.0)
    (record,) = store.workers.all()
    assert (record.state, record.model, record.profile, record.heartbeat_at) == (
        "ready",
        "tiny-random",
        "cpu",
        20.0,
    )
    job_id = add(store)
    store.predictions.claim_next("w0", "c")
    assert store.workers.all()[0].state == "busy" and store.workers.all()[0].job_id == job_id
    with pytest.raises(ValueError):
        store.workers.update("w0", secret="x")


def test_step_totals_count_only_recorded_completions_and_survive_retention(store):
    first, second, stale = add(store), add(store), add(store)
    store.predictions.claim_next("w0", "c1")
    assert store.predictions.complete(
        first, "c1", outputs=[], execution_ms=1, inference_ms=1, steps=30, denoise_s=12.5
    )
    store.predictions.claim_next("w0", "c2")
    assert store.predictions.complete(
        second, "c2", outputs=[], execution_ms=1, inference_ms=1, steps=10, denoise_s=2.5
    )
    store.predictions.claim_next("w0", "c3")
    assert not store.predictions.complete(
        stale, "other", outputs=[], execution_ms=1, inference_ms=1, steps=99, denoise_s=9
    )
    assert store.counters.all() == {"denoise_steps": 40.0, "denoise_seconds": 15.0}
    store.predictions.expire(
        before=float("inf")
    )  # the rows go, the totals stay (Prometheus counters never drop)
    assert store.predictions.get(first) is None
    assert store.counters.all() == {"denoise_steps": 40.0, "denoise_seconds": 15.0}


def test_overdue_jobs_are_the_running_ones_claimed_before_the_cutoff(store):
    old, recent, waiting = add(store), add(store), add(store)
    store.predictions.claim_next("w0", "c-old", now=1000.0)
    store.predictions.claim_next("w1", "c-recent", now=2000.0)
    assert [j.id for j in store.predictions.overdue_jobs(started_before=1500.0)] == [old]
    assert {j.id for j in store.predictions.overdue_jobs(started_before=2500.0)} == {old, recent}
    assert store.predictions.get(waiting).status == JobStatus.CREATED
    overdue = store.predictions.overdue_jobs(started_before=1500.0)[0]
    assert (overdue.worker_id, overdue.claim) == ("w0", "c-old")
