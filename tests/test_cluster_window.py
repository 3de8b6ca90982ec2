"""The dispatcher's send window against a real redis-server (no workers, no HTTP): at most W jobs
sent but not yet started wait in Redis (W = --broker-send-window, default max(2, 2 x live
workers of the model key)); the others wait in the job table, in order, and go out oldest first
as jobs start or end. The end-to-end check (10 jobs on real workers) is in tests/test_cluster.py."""

from __future__ import annotations

import pytest
from cluster_support import require_cluster_tools, start_redis
from test_cluster_logic import beat, make_settings, queued_task_ids, report, submit

from skyreels_local.cluster import protocol as p
from skyreels_local.jobs import Database, JobStatus
from skyreels_local.media.fetch import ImageFetcher
from skyreels_local.media.net import AddressPolicy
from skyreels_local.media.signing import UrlSigner
from skyreels_local.media.uploads import UploadStore
from skyreels_local.paths import DataPaths

pytestmark = pytest.mark.integration  # starts a redis-server process

QUEUE_NEW = "skyreels.tiny-random\x06\x163"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    require_cluster_tools()
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.kill()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushdb()
    return client


@pytest.fixture(autouse=True)
def fetches_finish_within_a_cycle(monkeypatch):
    from skyreels_local.cluster import dispatcher

    monkeypatch.setattr(dispatcher, "FETCH_WAIT_S", 10.0)


@pytest.fixture
def make_dispatcher(redis_server, redis_client, tmp_path):
    made = []

    def build(**extra):
        from skyreels_local.cluster.dispatcher import Dispatcher

        settings = make_settings(redis_server, tmp_path, **extra)
        paths = DataPaths(settings.data_dir).create()
        db = Database(paths.database)
        fetcher = ImageFetcher(
            uploads=UploadStore(paths.uploads, db.uploads, max_bytes=10**6),
            signer=UrlSigner("k" * 32),
            policy=AddressPolicy([]),
            max_bytes=10**6,
            timeout_s=5,
        )
        dispatcher = Dispatcher(settings, db, fetcher=fetcher, outputs=paths.outputs)
        dispatcher.connect()
        made.append(db)
        return dispatcher

    yield build
    for db in made:
        db.close()


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


def test_with_no_live_worker_two_of_ten_jobs_are_in_redis_the_rest_wait_in_the_table(
    make_dispatcher, redis_client
):
    dispatcher = make_dispatcher()
    ids = [submit(dispatcher.db) for _ in range(10)]
    dispatcher.cycle()
    assert dispatcher.send_window() == 2
    assert queued_task_ids(redis_client) == sent(dispatcher, ids[:2]) and len(sent(dispatcher, ids)) == 2
    assert markers(redis_client) == set(ids[:2])
    assert all(dispatcher.db.predictions.get(pid).status == JobStatus.CREATED for pid in ids)
    # The queue position a client sees counts every waiting job, sent or not.
    assert [position(dispatcher, pid) for pid in ids] == list(range(1, 11))
    dispatcher.cycle()  # nothing more while none starts
    assert len(queued_task_ids(redis_client)) == 2


def test_the_window_is_twice_the_live_workers_of_the_model_and_at_least_two(make_dispatcher, redis_client):
    dispatcher = make_dispatcher()
    ids = [submit(dispatcher.db) for _ in range(10)]
    beat(redis_client, "w1", None, None)  # one idle worker: 2
    dispatcher.cycle()
    assert dispatcher.send_window() == 2 and queued_task_ids(redis_client) == sent(dispatcher, ids[:2])
    beat(redis_client, "w2", None, None)
    beat(redis_client, "w3", None, None)
    other = p.WorkerBeat(id="x1", host="h", device="cpu", model="w", model_key="skyreels-v1", queue="q")
    redis_client.set(p.worker_key("x1"), other.dumps(), ex=5)  # another model's: not counted
    dispatcher.cycle()
    assert dispatcher.send_window() == 6
    assert queued_task_ids(redis_client) == sent(dispatcher, ids[:6])  # oldest first, in order
    assert len(sent(dispatcher, ids)) == 6 and markers(redis_client) == set(ids[:6])


def test_the_setting_overrides_the_window(make_dispatcher, redis_client):
    dispatcher = make_dispatcher(broker_send_window=3)
    ids = [submit(dispatcher.db) for _ in range(5)]
    for worker in ("w1", "w2", "w3"):
        beat(redis_client, worker, None, None)
    dispatcher.cycle()
    assert dispatcher.send_window() == 3 and queued_task_ids(redis_client) == sent(dispatcher, ids[:3])


def test_as_jobs_start_or_end_the_next_waiting_ones_go_out_oldest_first(make_dispatcher, redis_client):
    dispatcher = make_dispatcher()
    ids = [submit(dispatcher.db) for _ in range(10)]
    dispatcher.cycle()
    assert position(dispatcher, ids[5]) == 6
    assert take_and_start(dispatcher, redis_client, "w1") == ids[0]
    dispatcher.cycle()  # w1 live and busy: the window is 2, ids[1] and ids[2] wait in Redis
    assert dispatcher.db.predictions.get(ids[0]).status == JobStatus.PROCESSING
    assert queued_task_ids(redis_client) == sent(dispatcher, ids[1:3])
    assert position(dispatcher, ids[5]) == 5 and position(dispatcher, ids[0]) == 0
    # A sent job cancelled while queued frees its place; one never sent is simply cancelled in
    # the table (no marker, no cancel key, no message).
    dispatcher.db.predictions.request_cancel(ids[1])
    dispatcher.db.predictions.request_cancel(ids[9])
    dispatcher.cycle()
    assert dispatcher.db.predictions.get(ids[9]).status == JobStatus.CANCELLED
    assert redis_client.get(p.cancel_key(ids[9])) is None and ids[9] not in markers(redis_client)
    assert sent(dispatcher, ids[2:]) == sent(dispatcher, ids[2:4])
    assert markers(redis_client) == {ids[0], ids[2], ids[3]}
    assert position(dispatcher, ids[5]) == 4
    # Two workers start: the window grows to 4 and the next ones go out, still in order.
    redis_client.rpop(QUEUE_NEW)  # ids[1]'s message: a worker drops it (its marker is gone)
    assert take_and_start(dispatcher, redis_client, "w2") == ids[2]
    dispatcher.cycle()
    assert dispatcher.send_window() == 4
    assert sent(dispatcher, ids[3:]) == sent(dispatcher, ids[3:7])
    assert queued_task_ids(redis_client) == sent(dispatcher, ids[3:7])


def test_a_redis_restart_without_aof_resends_only_the_window(make_dispatcher, redis_client):
    dispatcher = make_dispatcher()
    ids = [submit(dispatcher.db) for _ in range(10)]
    dispatcher.cycle()
    before = sent(dispatcher, ids)
    redis_client.flushdb()  # what a restart without AOF leaves
    dispatcher._resync = True  # as after its run_id changed
    dispatcher.cycle()
    after = sent(dispatcher, ids)
    assert len(after) == 2 and set(after).isdisjoint(before)  # fresh tokens, the same two jobs
    assert [task.partition(".")[0] for task in after] == ids[:2]
    assert sorted(queued_task_ids(redis_client)) == sorted(after) and markers(redis_client) == set(ids[:2])


def test_a_lost_workers_job_goes_out_at_once_ahead_even_with_the_window_full(make_dispatcher, redis_client):
    dispatcher = make_dispatcher()
    ids = [submit(dispatcher.db) for _ in range(6)]
    dispatcher.cycle()
    take_and_start(dispatcher, redis_client, "w1")
    dispatcher.cycle()  # ids[0] runs; ids[1], ids[2] wait in Redis (window 2)
    redis_client.delete(p.worker_key("w1"))  # killed
    dispatcher.lost_after_s = 0.0
    dispatcher.cycle()
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(ids[0])
    assert (job.status, job.attempts) == (JobStatus.CREATED, 1)
    assert queued_task_ids(redis_client) == sent(dispatcher, ids[:3])  # re-sent first
    assert sent(dispatcher, ids) == sent(dispatcher, ids[:3])  # and nothing new: the window is full
