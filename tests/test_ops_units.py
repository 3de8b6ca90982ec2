"""Unit tests of the operational helpers: the removal of unfinished videos and the job table's
connection pool."""

from __future__ import annotations

import threading

from skyreels_local.jobs import POOL_SIZE, Database
from skyreels_local.server.api.services import remove_orphan_partials


def test_orphan_partials_are_removed_unless_their_job_is_running(tmp_path):
    running, dead = "1" * 32, "2" * 32
    names = [f".{running}.abc.part.mp4", f".{dead}.def.part.mp4", f"{dead}.mp4", "notes.part.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_orphan_partials(tmp_path, lambda prediction_id: prediction_id == running)
    assert [p.name for p in removed] == [f".{dead}.def.part.mp4"]
    kept = sorted(n for n in names if n != f".{dead}.def.part.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_the_store_never_opens_more_than_its_pool_of_connections(tmp_path, monkeypatch):
    store = Database(tmp_path / "jobs.sqlite3")
    opened = []
    real_open = store._open
    monkeypatch.setattr(store, "_open", lambda: opened.append(1) or real_open())
    threads_count = 3 * POOL_SIZE
    start = threading.Barrier(threads_count)
    errors = []

    def poll() -> None:
        start.wait()
        try:
            for _ in range(50):
                assert store.predictions.queue_depth() == 0
        except Exception as exc:  # surfaced below: a thread's assert would be lost
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert 1 <= len(opened) <= POOL_SIZE
    store.close()
    assert store._idle == []


def test_nested_use_on_one_thread_shares_the_connection(tmp_path):
    store = Database(tmp_path / "jobs.sqlite3")
    with store.write() as outer, store.connection() as inner:
        assert inner is outer
    store.close()


def running_job(store: Database, *, webhook_url: str | None = None) -> str:
    store.predictions.create(
        id="c" * 32, model="m", input={}, params={}, seed=1, base_url="http://x", webhook_url=webhook_url
    )
    job = store.predictions.claim_next("w0", "claim-1")
    assert job is not None and job.id == "c" * 32
    return job.id


def test_a_cancel_after_the_last_step_wins_over_the_result(tmp_path):
    """The cancel arrives while the worker decodes/encodes (the job is still processing): the
    result is not recorded, the job ends cancelled, and its webhook reports that."""
    store = Database(tmp_path / "jobs.sqlite3")
    job_id = running_job(store, webhook_url="http://hook.example/x")
    assert store.predictions.request_cancel(job_id).status == "processing"
    assert store.predictions.complete(
        job_id, "claim-1", outputs=[f"{job_id}.mp4"], execution_ms=5, inference_ms=4, steps=2
    )
    job = store.predictions.get(job_id)
    assert (job.status, job.outputs, job.error) == ("cancelled", [], "Prediction was cancelled")
    assert store.counters.all() == {}  # the steps of a cancelled job are not counted as completed work
    assert [d["status"] for d in store.webhooks.deliveries(job_id)] == ["pending"]
    # a later cancel leaves the terminal job as it is and answers its real status
    assert store.predictions.request_cancel(job_id).status == "cancelled"


def test_a_cancel_after_the_result_is_recorded_answers_completed(tmp_path):
    store = Database(tmp_path / "jobs.sqlite3")
    job_id = running_job(store)
    assert store.predictions.complete(
        job_id, "claim-1", outputs=[f"{job_id}.mp4"], execution_ms=5, inference_ms=4
    )
    job = store.predictions.request_cancel(job_id)
    assert (job.status, job.outputs) == ("completed", [f"{job_id}.mp4"])


def test_a_stale_claim_records_nothing_even_with_a_cancel_pending(tmp_path):
    store = Database(tmp_path / "jobs.sqlite3")
    job_id = running_job(store)
    store.predictions.request_cancel(job_id)
    assert not store.predictions.complete(job_id, "someone-else", outputs=[], execution_ms=1, inference_ms=1)
    assert store.predictions.get(job_id).status == "processing"
