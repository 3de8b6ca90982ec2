"""The cluster mode's rules, one at a time, against a real redis-server (no workers, no HTTP): the
dispatcher's cycle driven by hand over a real job table, and a remote worker's admission checks
(stale token dropped, cancel, lease) without its model."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
from api_server import data_uri, png_bytes
from cluster_support import require_cluster_tools, start_redis

from skyreels_local.cluster import protocol as p
from skyreels_local.config import Settings
from skyreels_local.jobs import Database, JobStatus
from skyreels_local.media.fetch import ImageFetcher
from skyreels_local.media.net import AddressPolicy
from skyreels_local.media.signing import UrlSigner
from skyreels_local.media.uploads import UploadStore
from skyreels_local.params import GenerationParams
from skyreels_local.paths import DataPaths

pytestmark = pytest.mark.integration  # starts a redis-server process

QUEUE = "skyreels.tiny-random"
QUEUE_AGAIN, QUEUE_NEW = QUEUE, QUEUE + "\x06\x163"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    require_cluster_tools()
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.kill()


@pytest.fixture
def r(redis_server):
    client = redis_server.client()
    client.flushdb()
    return client


def make_settings(redis_server, tmp_path, **extra) -> Settings:
    return Settings(
        broker=redis_server.url,
        model="tiny-random",
        data_dir=tmp_path / "data",
        cluster_heartbeat_s=0.5,
        **extra,
    )


@pytest.fixture(autouse=True)
def fetches_finish_within_a_cycle(monkeypatch):
    """A cycle waits for its image fetches (they return as soon as all are done): on a loaded
    machine a data: URI may take longer than the dispatcher's 0.2 s."""
    from skyreels_local.cluster import dispatcher

    monkeypatch.setattr(dispatcher, "FETCH_WAIT_S", 10.0)


@pytest.fixture
def dispatcher_of(redis_server, tmp_path, r):
    made = []

    def build(allow: list[str] = (), **extra):
        from skyreels_local.cluster.dispatcher import Dispatcher

        settings = make_settings(redis_server, tmp_path, **extra)
        paths = DataPaths(settings.data_dir).create()
        db = Database(paths.database)
        fetcher = ImageFetcher(
            uploads=UploadStore(paths.uploads, db.uploads, max_bytes=10**6),
            signer=UrlSigner("k" * 32),
            policy=AddressPolicy(list(allow)),
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


def submit(db: Database, image: str | None = None) -> str:
    params = GenerationParams(
        prompt="a sea", image=image or data_uri(), num_inference_steps=2
    ).with_drawn_seed()
    job = db.predictions.create(
        id=uuid.uuid4().hex,
        model="wavespeed-ai/SkyReels-V1",
        input={"prompt": "a sea"},
        params=params.model_dump(mode="json"),
        seed=params.seed,
        base_url="http://test",
    )
    return job.id


def queued_task_ids(r) -> list[str]:
    """The task ids queued, in the order workers take them: kombu keeps one Redis list per
    priority step (sent again: step 0, first; new: step 3), LPUSHes and BRPOPs (oldest first)."""
    return [
        json.loads(raw)["headers"]["id"]
        for key in (QUEUE_AGAIN, QUEUE_NEW)
        for raw in reversed(r.lrange(key, 0, -1))
    ]


def report(dispatcher, prediction_id: str, token: str, state: str, result: dict) -> None:
    """What a worker writes to the result backend (PROGRESS meta, or the outcome)."""
    dispatcher._app.backend.store_result(p.task_id(prediction_id, token), result, state)


def beat(r, worker_id: str, prediction_id: str | None, token: str | None) -> None:
    record = p.WorkerBeat(id=worker_id, host="h", device="cpu", model="tiny-random", model_key="tiny-random",
                          queue=QUEUE, state="busy" if prediction_id else "ready", job_id=prediction_id,
                          token=token, last_seen=time.time())  # fmt: skip
    r.set(p.worker_key(worker_id), record.dumps(), ex=5)


# --- the protocol ---------------------------------------------------------------------------


def test_model_keys_and_queues_do_not_depend_on_a_host_path():
    assert p.model_key("tiny-random") == "tiny-random"
    assert p.model_key("/srv/a/weights") == p.model_key("weights") == "skyreels-v1"
    assert p.queue_name("tiny-random") == QUEUE
    assert p.task_id("abc", "t1") == "abc.t1"


def test_a_payload_and_an_outcome_survive_json():
    payload = p.TaskPayload("id1", "tok", {"prompt": "x", "seed": 3}, png_bytes(), 30.0)
    assert p.TaskPayload.from_json(json.loads(json.dumps(payload.to_json()))) == payload
    outcome = p.Outcome(status=p.COMPLETED, video_b64="AAEC", has_nsfw_contents=[False], seed=4)
    assert p.Outcome.from_json(json.loads(json.dumps(outcome.to_json()))) == outcome
    assert p.Outcome.from_json("garbage").status == p.FAILED


def test_a_tls_url_passes_through_and_verifies_the_certificate_by_default():
    from skyreels_local.cluster.celery_app import celery_url, make_celery

    assert celery_url("redis://:pw@h:6379/0") == "redis://:pw@h:6379/0"
    assert celery_url("rediss://:pw@h:6380/0") == "rediss://:pw@h:6380/0?ssl_cert_reqs=required"
    given = "rediss://h:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem"
    assert celery_url(given) == given
    app = make_celery(Settings(broker="rediss://:pw@127.0.0.1:1/0"))
    assert app.backend.connparams["ssl_cert_reqs"] is not None  # Celery would refuse it without


# --- the dispatcher --------------------------------------------------------------------------


def test_a_new_job_is_sent_under_a_fresh_token_after_its_marker(dispatcher_of, r):
    dispatcher = dispatcher_of()
    pid = submit(dispatcher.db)
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert job.status == JobStatus.CREATED and job.claim  # waits in the Celery queue
    assert r.get(p.dispatch_key(pid)).decode() == job.claim
    assert queued_task_ids(r) == [f"{pid}.{job.claim}"]
    body = json.loads(r.lrange(QUEUE_NEW, 0, 0)[0])
    assert body["headers"]["task"] == p.TASK_NAME and body["properties"]["priority"] == 3
    assert body["properties"]["body_encoding"] == "base64"  # kombu's Redis envelope
    args, _kwargs, _options = json.loads(base64.b64decode(body["body"]))
    payload = p.TaskPayload.from_json(args[0])
    assert (payload.prediction_id, payload.token) == (pid, job.claim)
    assert payload.image_png.startswith(b"\x89PNG")  # the API fetched and sends it
    assert payload.params["image"] is None and payload.params["num_inference_steps"] == 2  # once, not twice
    dispatcher.cycle()  # nothing sent twice
    assert len(queued_task_ids(r)) == 1


def test_an_image_that_cannot_be_fetched_fails_the_job_with_1402(dispatcher_of, r):
    dispatcher = dispatcher_of()
    pid = submit(dispatcher.db, image="http://10.1.2.3/cat.png")  # not a public address
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert (job.status, job.code, job.attempts) == (JobStatus.FAILED, 1402, 1)
    assert "10.1.2.3" in job.error and queued_task_ids(r) == []


def test_a_slow_image_url_holds_up_neither_other_jobs_nor_outcomes(dispatcher_of, r, monkeypatch):
    from api_server import local_site

    from skyreels_local.cluster import dispatcher as module

    with local_site() as site:
        site.files["slow.png"] = png_bytes()
        site.drip_s["slow.png"] = 1.5  # 223 bytes, 100 at a time: 3 s or more
        dispatcher = dispatcher_of(allow=["127.0.0.1"])
        monkeypatch.setattr(module, "FETCH_WAIT_S", 0.2)
        slow = submit(dispatcher.db, image=f"{site.url}/slow.png")
        fast = submit(dispatcher.db)
        started = time.monotonic()
        dispatcher.cycle()
        assert time.monotonic() - started < 2.0  # one fetch wait (0.2 s), not the download
        assert dispatcher.db.predictions.get(slow).claim is None  # still downloading
        if dispatcher.db.predictions.get(fast).claim is None:  # a very loaded machine: one more cycle
            dispatcher.cycle()
        assert queued_task_ids(r) == [f"{fast}.{dispatcher.db.predictions.get(fast).claim}"]
        deadline = time.monotonic() + 20
        while dispatcher.db.predictions.get(slow).claim is None and time.monotonic() < deadline:
            dispatcher.cycle()
        assert len(queued_task_ids(r)) == 2 and queued_task_ids(r)[1].startswith(slow)


def test_reconcile_resends_a_queued_job_whose_marker_is_gone(dispatcher_of, r):
    dispatcher = dispatcher_of()
    pid = submit(dispatcher.db)
    dispatcher.cycle()
    first = dispatcher.db.predictions.get(pid).claim
    r.delete(p.dispatch_key(pid))  # as after a Redis restart without AOF
    dispatcher._last_reconcile = 0.0
    dispatcher.cycle()
    second = dispatcher.db.predictions.get(pid).claim
    assert second != first and r.get(p.dispatch_key(pid)).decode() == second
    # Sent again ahead of the new jobs; the old message will be dropped (stale token).
    assert queued_task_ids(r) == [f"{pid}.{second}", f"{pid}.{first}"]


def test_progress_marks_the_job_started_and_an_old_tokens_outcome_is_ignored(dispatcher_of, r):
    dispatcher = dispatcher_of()
    pid = submit(dispatcher.db)
    dispatcher.cycle()
    token = dispatcher.db.predictions.get(pid).claim
    report(dispatcher, pid, "old-token", "SUCCESS", p.Outcome(status=p.COMPLETED, video_b64="AAAA").to_json())
    report(
        dispatcher,
        pid,
        token,
        "PROGRESS",
        {"fraction": 0.4, "worker": "w1", "profile": "cpu", "preset": "exact"},
    )
    beat(r, "w1", pid, token)
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert (job.status, job.worker_id, job.attempts, job.profile) == (JobStatus.PROCESSING, "w1", 1, "cpu")
    dispatcher.cycle()
    assert dispatcher.db.predictions.get(pid).progress == pytest.approx(0.4)
    video = b"\x00\x00\x00\x20ftypisom-a-video"
    outcome = p.Outcome(status=p.COMPLETED, worker="w1", video_b64=base64.b64encode(video).decode(),
                        execution_ms=1200, inference_ms=900, steps=2, seed=7)  # fmt: skip
    report(dispatcher, pid, token, "SUCCESS", outcome.to_json())
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert (job.status, job.outputs, job.execution_ms) == (JobStatus.COMPLETED, [f"{pid}.mp4"], 1200)
    assert (dispatcher.outputs / f"{pid}.mp4").read_bytes() == video
    assert not list(dispatcher.outputs.glob(".*.part.mp4"))
    assert r.get(p.dispatch_key(pid)) is None  # the marker goes with the job
    assert r.get(dispatcher._app.backend.get_key_for_task(p.task_id(pid, token))) is None  # result read once


def test_celerys_started_state_already_marks_the_job_taken(dispatcher_of, r):
    dispatcher = dispatcher_of()
    pid = submit(dispatcher.db)
    dispatcher.cycle()
    token = dispatcher.db.predictions.get(pid).claim
    report(dispatcher, pid, token, "STARTED", {"hostname": "w7@gpu-host", "pid": 42})
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert (job.status, job.worker_id, job.attempts) == (JobStatus.PROCESSING, "w7", 1)


def start_on(dispatcher, r, pid: str, worker: str = "w1") -> str:
    dispatcher.cycle()
    token = dispatcher.db.predictions.get(pid).claim
    report(dispatcher, pid, token, "PROGRESS", {"fraction": 0.1, "worker": worker})
    beat(r, worker, pid, token)
    dispatcher.cycle()
    assert dispatcher.db.predictions.get(pid).status == JobStatus.PROCESSING
    return token


def test_a_job_whose_worker_stops_beating_is_dispatched_again_until_max_attempts(dispatcher_of, r):
    dispatcher = dispatcher_of(max_attempts=2)
    pid = submit(dispatcher.db)
    token = start_on(dispatcher, r, pid)
    newer = submit(dispatcher.db)
    dispatcher.cycle()
    r.delete(p.worker_key("w1"))  # killed: its heartbeat key expires
    dispatcher.cycle()
    assert dispatcher.db.predictions.get(pid).status == JobStatus.PROCESSING  # not yet: grace
    dispatcher.lost_after_s = 0.0
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert (job.status, job.attempts, job.worker_id) == (JobStatus.CREATED, 1, None)
    assert job.claim != token and r.get(p.dispatch_key(pid)).decode() == job.claim
    # It goes ahead of the job submitted after it, as a re-queued local job keeps its place.
    newer_task = f"{newer}.{dispatcher.db.predictions.get(newer).claim}"
    assert queued_task_ids(r)[:1] + queued_task_ids(r)[-1:] == [f"{pid}.{job.claim}", newer_task]
    start_on(dispatcher, r, pid, worker="w2")
    beat(r, "w2", None, None)  # restarted under the same id: alive, but no longer running it
    dispatcher.cycle()
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert (job.status, job.code, job.attempts) == (JobStatus.FAILED, 5000, 2)
    assert "interrupted 2 times" in job.error and r.get(p.cancel_key(pid)) == b"1"


def test_a_cancel_reaches_the_worker_and_a_queued_cancel_revokes(dispatcher_of, r):
    dispatcher = dispatcher_of()
    running, queued = submit(dispatcher.db), submit(dispatcher.db)
    start_on(dispatcher, r, running)
    dispatcher.db.predictions.request_cancel(running)
    dispatcher.db.predictions.request_cancel(queued)  # cancelled at once in the table
    dispatcher.cycle()
    assert r.get(p.cancel_key(running)) == b"1" and r.get(p.cancel_key(queued)) == b"1"
    assert r.get(p.dispatch_key(queued)) is None  # a worker that takes it drops it
    assert dispatcher.db.predictions.get(running).status == JobStatus.PROCESSING  # until it stops


def test_a_job_past_the_timeout_fails_with_5004_and_its_worker_is_told(dispatcher_of, r):
    dispatcher = dispatcher_of(job_timeout_s=0.5)
    pid = submit(dispatcher.db)
    start_on(dispatcher, r, pid)
    time.sleep(0.6)
    dispatcher.cycle()
    job = dispatcher.db.predictions.get(pid)
    assert (job.status, job.code) == (JobStatus.FAILED, 5004)
    assert r.get(p.cancel_key(pid)) == b"1"


def test_a_task_failure_is_retried_as_an_attempt_then_fails_the_job(dispatcher_of, r):
    dispatcher = dispatcher_of(max_attempts=2)
    pid = submit(dispatcher.db)
    for attempt in (1, 2):
        dispatcher.cycle()
        token = dispatcher.db.predictions.get(pid).claim
        report(
            dispatcher, pid, token, "FAILURE", {"exc_type": "ConnectionError", "exc_message": ["Redis gone"]}
        )
        dispatcher.cycle()
        job = dispatcher.db.predictions.get(pid)
        assert job.attempts == attempt
    assert (job.status, job.code) == (JobStatus.FAILED, 5000)
    assert "interrupted 2 times" in job.error and "its worker failed" in job.error


def test_with_redis_down_jobs_wait_in_the_table_and_go_out_once_it_is_back(redis_server, tmp_path):
    from cluster_support import RedisServer, free_port

    from skyreels_local.cluster.dispatcher import Dispatcher

    down = RedisServer(free_port(), tmp_path / "late-redis", appendonly=False)
    down.folder.mkdir()
    settings = Settings(
        broker=down.url, model="tiny-random", data_dir=tmp_path / "d", cluster_heartbeat_s=0.5
    )
    paths = DataPaths(settings.data_dir).create()
    db = Database(paths.database)
    fetcher = ImageFetcher(
        uploads=UploadStore(paths.uploads, db.uploads, max_bytes=10**6),
        signer=UrlSigner("k" * 32),
        policy=AddressPolicy([]),
        max_bytes=10**6,
        timeout_s=2,
    )
    dispatcher = Dispatcher(settings, db, fetcher=fetcher, outputs=paths.outputs)
    dispatcher.start()  # Redis is not there: the thread backs off
    try:
        pid = submit(db)  # what an accepted submit does: the table only
        time.sleep(1.5)
        job = db.predictions.get(pid)
        assert (job.status, job.claim, dispatcher.connected) == (JobStatus.CREATED, None, False)
        assert "Connection" in dispatcher.last_error and dispatcher.serving_workers() == []
        down.start()
        try:
            # The table takes the token first, then the task goes to Redis: wait for both (a
            # check right after the claim appears raced the send once in CI).
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                db.predictions.get(pid).claim and queued_task_ids(down.client())
            ):
                time.sleep(0.1)
            claim = db.predictions.get(pid).claim
            assert claim and queued_task_ids(down.client()) == [f"{pid}.{claim}"]
            assert dispatcher.connected
        finally:
            down.kill()
    finally:
        dispatcher.stop()
        db.close()


# --- the worker's admission ------------------------------------------------------------------


@pytest.fixture
def worker_of(redis_server, tmp_path, r):
    def build(worker_id: str):
        from skyreels_local.cluster.remote_worker import RemoteWorker

        return RemoteWorker(make_settings(redis_server, tmp_path), worker_id=worker_id)

    return build


def test_a_worker_drops_stale_dispatches_and_two_deliveries_never_run_at_once(worker_of, r):
    one, two = worker_of("w1"), worker_of("w2")
    assert one.admit("job", "t1") == p.STALE  # no marker: the job ended, or never was
    r.set(p.dispatch_key("job"), "t2")
    assert one.admit("job", "t1") == p.STALE  # an older dispatch, redelivered
    assert one.admit("job", "t2") == "run"
    assert r.get(p.lease_key("job")) == b"t2 w1" and 0 < r.ttl(p.lease_key("job")) <= one.ttl_s
    assert two.admit("job", "t2") == "duplicate"  # the same message delivered twice
    assert not one.told_to_stop("job", "t2")
    r.delete(p.dispatch_key("job"))
    assert not one.told_to_stop("job", "t2")  # a lost marker (Redis restart) is no stop
    r.set(p.dispatch_key("job"), "t3")
    assert one.told_to_stop("job", "t2")  # superseded by a newer dispatch
    # The newer dispatch waits for the older one's lease, then runs.
    got = []
    waiter = threading.Thread(target=lambda: got.append(two.admit("job", "t3")))
    waiter.start()
    time.sleep(0.6)
    assert got == [] and two.beat.job_id == "job"  # its heartbeat shows the job it waits for
    one.release("job")
    waiter.join(timeout=5)
    assert got == ["run"] and r.get(p.lease_key("job")) == b"t3 w2"
    r.set(p.cancel_key("job"), "1")
    assert two.told_to_stop("job", "t3") and one.admit("job", "t3") == p.CANCELLED


def test_the_http_side_of_the_cluster_imports_no_torch():
    code = (
        "import sys; from skyreels_local.config import Settings; "
        "from skyreels_local.cluster.dispatcher import Dispatcher; "
        "from skyreels_local.cluster.celery_app import make_celery; "
        "app = make_celery(Settings(broker='redis://127.0.0.1:1/0')); app.backend; "
        "assert 'celery' in sys.modules and 'redis' in sys.modules; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_watchdog_ends_a_process_whose_job_hangs_past_the_timeout(worker_of, r, monkeypatch):
    worker = worker_of("w1")
    exits = []
    monkeypatch.setattr("os._exit", lambda code: exits.append(code))
    r.set(p.dispatch_key("job"), "t1")
    assert worker.admit("job", "t1") == "run"
    worker._job_timeout_s = 1.0
    worker._watchdog()
    assert exits == []  # within the timeout + grace
    worker._job_started -= 1.0 + 60.0 + 1
    worker._watchdog()
    assert exits == [75]


def test_the_servers_start_up_recovery_leaves_remote_jobs_alone(dispatcher_of, r, redis_server, tmp_path):
    from skyreels_local.server.supervisor import WorkerSupervisor

    dispatcher = dispatcher_of()
    db = dispatcher.db
    pid = submit(db)
    token = start_on(dispatcher, r, pid)
    queued = submit(db)
    dispatcher.cycle()
    # A local worker row left by an earlier embedded run, dead: the start-up recovery runs.
    db.workers.register("w0", pid=2**22 + 12345, device="cpu")
    supervisor = WorkerSupervisor(make_settings(redis_server, tmp_path), db)  # --broker: no local workers
    assert supervisor.workers == []
    supervisor.start()
    supervisor.stop()
    job = db.predictions.get(pid)
    assert (job.status, job.claim, job.worker_id, job.attempts) == (JobStatus.PROCESSING, token, "w1", 1)
    assert db.predictions.get(queued).claim is not None  # still dispatched, not re-queued
