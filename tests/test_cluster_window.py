"""The dispatcher's send window against a real redis-server (no workers, no HTTP): at most W jobs
sent but not yet started wait in Redis (W = --broker-send-window, default max(2, 2 x live
workers of the model key)); the others wait in the job table, in order, and go out oldest first
as jobs start or end. The end-to-end check (10 jobs on real workers) is in tests/test_cluster.py."""

from __future__ import annotations

import pytest

# The Redis server, its flushed client `r`, the dispatcher builder and the fetch wait are the
# logic tests' own fixtures (imported, so pytest uses them here too).
from test_cluster_logic import (  # noqa: F401
    QUEUE_NEW,
    beat,
    dispatcher_of,
    fetches_finish_within_a_cycle,
    queued_task_ids,
    r,
    redis_server,
    report,
    submit,
)

from skyreels_local.cluster import protocol as p
from skyreels_local.jobs import JobStatus

pytestmark = pytest.mark.integration  # starts a redis-server process


def sent(dispatcher, ids: list[str]) -> list[str]:
    """The task ids of `ids` that the table shows dispatched (claim set), in `ids` order."""
    jobs = [dispatcher.db.predictions.get(pid) for pid in ids]
    return [p.task_id(job.id, job.claim) for job in jobs if job.claim]


def markers(client) -> set[str]:
    return {key.decode().rpartition(":")[2] for key in client.scan_iter(match=p.DISPATCH_KEY_PATTERN)}


def position(dispatcher, pid: str) -> int:
    return dispatcher.db.predictions.queue_position(dispatcher.db.predictions.get(pid))


def take_and_start(dispatcher, client, worker: str) -> str:
    """What a worker does: pop the oldest message, report it started, beat busy with it."""
    import json

    task = json.loads(client.rpop(QUEUE_NEW))["headers"]["id"]
    pid, _, token = task.partition(".")
    report(dispatcher, pid, token, "PROGRESS", {"fraction": 0.1, "worker": worker})
    beat(client, worker, pid, token)
    return pid


def test_with_no_live_worker_two_of_ten_jobs_are_in_redis_the_rest_wait_in_the_table(dispatcher_of, r):
    dispatcher = dispatcher_of()
    ids = [submit(dispatcher.db) for _ in range(10)]
    dispatcher.cycle()
    assert dispatcher.send_window() == 2
    assert queued_task_ids(r) == sent(dispatcher, ids[:2]) and len(sent(dispatcher, ids)) == 2
    assert markers(r) == set(ids[:2])
    assert all(dispatcher.db.predictions.get(pid).status == JobStatus.CREATED for pid in ids)
    # The queue position a client sees counts every waiting job, sent or not.
    assert [position(dispatcher, pid) for pid in ids] == list(range(1, 11))
    dispatcher.cycle()  # nothing more while none starts
    assert len(queued_task_ids(r)) == 2


def test_the_window_is_twice_the_live_workers_of_the_model_and_at_least_two(dispatcher_of, r):
    dispatcher = dispatcher_of()
    ids = [submit(dispatcher.db) for _ in range(10)]
    beat(r, "w1", None, None)  # one idle worker: 2
    dispatcher.cycle()
    assert dispatcher.send_window() == 2 and queued_task_ids(r) == sent(dispatcher, ids[:2])
    beat(r, "w2", None, None)
    beat(r, "w3", None, None)
    other = p.WorkerBeat(id="x1", host="h", device="cpu", model="w", model_key="skyreels-v1", queue="q")
    r.set(p.worker_key("x1"), other.dumps(), ex=5)  # another model's: not counted
    dispatcher.cycle()
    assert dispatcher.send_window() == 6
    assert queued_task_ids(r) == sent(dispatcher, ids[:6])  # oldest first, in order
    assert len(sent(dispatcher, ids)) == 6 and markers(r) == set(ids[:6])


def test_the_setting_overrides_the_window(dispatcher_of, r):
    dispatcher = dispatcher_of(broker_send_window=3)
    ids = [submit(dispatcher.db) for _ in range(5)]
    for worker in ("w1", "w2", "w3"):
        beat(r, worker, None, None)
    dispatcher.cycle()
    assert dispatcher.send_window() == 3 and queued_task_ids(r) == sent(dispatcher, ids[:3])


def test_as_jobs_start_or_end_the_next_waiting_ones_go_out_oldest_first(dispatcher_of, r):
    dispatcher = dispatcher_of()
    ids = [submit(dispatcher.db) for _ in range(10)]
    dispatcher.cycle()
    assert position(dispatcher, ids[5]) == 6
    assert take_and_start(dispatcher, r, "w1") == ids[0]
    dispatcher.cycle()  # w1 live and busy: the window is 2, ids[1] and ids[2] wait in Redis
    assert dispatcher.db.predictions.get(ids[0]).status == JobStatus.PROCESSING
    assert queued_task_ids(r) == sent(dispatcher, ids[1:3])
    assert position(dispatcher, ids[5]) == 5 and position(dispatcher, ids[0]) == 0
    # A sent job cancelled while queued frees its place; one never sent is simply cancelled in
    # the table (no marker, no cancel key, no message).
    dispatcher.db.predictions.request_cancel(ids[1])
    dispatcher.db.predictions.request_cancel(ids[9])
    dispatcher.cycle()
    assert dispatcher.db.predictions.get(ids[9]).status == JobStatus.CANCELLED
    assert r.get(p.cancel_key(ids[9])) is None and ids[9] not in markers(r)
    assert sent(dispatcher, ids[2:]) == sent(dispatcher, ids[2:4])
    assert markers(r) == {ids[0], ids[2], ids[3]}
    assert position(dispatcher, ids[5]) == 4
    # Two workers start: the window grows to 4 and the next ones go out, still in order.
    r.rpop(QUEUE_NEW)  # ids[1]'s message: a worker drops it (its marker is gone)
    assert take_and_start(dispatcher, r, "w2") == ids[2]
    dispatcher.cycle()
    assert dispatcher.send_window() == 4
    assert sent(dispatcher, ids[3:]) == sent(dispatcher, ids[3:7])
    assert queued_task_ids(r) == sent(dispatcher, ids[3:7])


def test_a_redis_restart_without_aof_resends_only_the_window(dispatcher_of, r):
    dispatcher = dispatcher_of()
    ids = [submit(dispatcher.db) for _ in range(10)]
    dispatcher.cycle()
    before = sent(dispatcher, ids)
    r.flushdb()  # what a restart without AOF leaves
    dispatcher._resync = True  # as after its run_id changed
    dispatcher.cycle()
    after = sent(dispatcher, ids)
    assert len(after) == 2 and set(after).isdisjoint(before)  # fresh tokens, the same two jobs
    assert [task.partition(".")[0] for task in after] == ids[:2]
    assert sorted(queued_task_ids(r)) == sorted(after) and markers(r) == set(ids[:2])


def test_a_lost_workers_job_goes_out_at_once_ahead_even_with_the_window_full(dispatcher_of, r):
    dispatcher = dispatcher_of()
    ids = [submit(dispatcher.db) for _ in range(6)]
    dispatcher.cycle()
    take_and_start(dispatcher, r, "w1")
    dispatcher.cycle()  # ids[0] runs; ids[1], ids[2] wait in Redis (window 2)
    r.delete(p.worker_key("w1"))  # killed
    dispatcher.lost_after_s = 0.0
    dispatcher.cycle()
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(ids[0])
    assert (job.status, job.attempts) == (JobStatus.CREATED, 1)
    assert queued_task_ids(r) == sent(dispatcher, ids[:3])  # re-sent first
    assert sent(dispatcher, ids) == sent(dispatcher, ids[:3])  # and nothing new: the window is full
