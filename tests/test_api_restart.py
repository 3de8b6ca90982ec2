"""Nothing accepted is lost across a kill -9 of the server or a graceful stop: waiting jobs run,
the interrupted one is re-run, finished results and their signed URLs stay valid, a webhook still
owed is delivered by the next server, and SIGTERM hands the running job back to the queue."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from api_server import auth, data_uri, local_site, start_server, stop_server, wait_ready
from waiting import wait_until

from skyreels_local.jobs import Database, JobStatus
from skyreels_local.video import read_mp4

SLOW = {"SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine", "SKYREELS_TEST_STEP_DELAY_S": "0.25"}


def body(steps: int) -> dict:
    return {"prompt": "survivor", "image": data_uri(), "num_inference_steps": steps}


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    return wait_until(gone, timeout, f"process {pid} to exit", interval=0.1)


@pytest.mark.slow
def test_kill_9_of_the_server_restart_then_sigterm(tmp_path):
    data_dir = tmp_path / "data"
    args = ["--url-allow-list", "127.0.0.1"]
    with local_site() as site:
        site.post_statuses = [500] * 50  # the receiver is down while the first server lives
        first = start_server(data_dir, args=args, env=SLOW)
        port = first.port  # the next lives listen where the first did (its URLs stay good)
        try:
            wait_ready(first)
            workers = httpx.get(first.base_url + "/ready", headers=auth(first)).json()["data"]["workers"]
            worker_pid = workers[0]["pid"]
            finished = first.wait(first.submit(body(1), webhook=f"{site.url}/hook")["id"])
            assert finished["status"] == "completed"
            site.wait_for(1)  # one failed delivery attempt
            interrupted = first.submit(body(8))
            first.wait(interrupted["id"], statuses=("processing",))
            waiting = first.submit(body(1))
        finally:
            stop_server(first, sig=signal.SIGKILL)
        assert pid_gone(worker_pid), "the worker must die with its server"

        site.post_statuses = []  # the receiver is back
        second = start_server(data_dir, args=args, env=SLOW, port=port)
        try:
            wait_ready(second)
            rerun = second.wait(interrupted["id"], timeout=60)
            assert rerun["status"] == "completed" and rerun["seed"] == interrupted["seed"]
            assert second.wait(waiting["id"], timeout=60)["status"] == "completed"
            # the result from before the crash, and its URL, are still good
            again = second.get(finished["id"])
            assert again["outputs"] == finished["outputs"]
            video = tmp_path / "before.mp4"
            video.write_bytes(httpx.get(finished["outputs"][0]).content)
            assert read_mp4(video)[0].shape == (9, 32, 64, 3)
            # the webhook owed from before the crash arrives (after its backoff)
            wait_until(lambda: len(site.received) >= 2, 30, "the owed webhook")
            assert [r.path for r in site.received] == ["/hook", "/hook"]
            assert site.received[-1].json()["id"] == finished["id"]

            # SIGTERM: the running job goes back to the queue and the server exits promptly.
            running = second.submit(body(16))  # ~4 s or more
            second.wait(running["id"], statuses=("processing",))
            queued = second.submit(body(1))
            stopping = time.monotonic()
        finally:
            code = stop_server(second)
        assert time.monotonic() - stopping < 15
        # uvicorn re-raises the signal once its graceful shutdown is done, so the exit status says SIGTERM.
        assert code in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in second.log_path.read_text()
        store = Database(data_dir / "jobs.sqlite3")
        assert store.predictions.get(interrupted["id"]).attempts == 2  # started once by each server
        handed_back = store.predictions.get(running["id"])
        assert handed_back.status == JobStatus.CREATED and handed_back.attempts == 0
        assert store.predictions.get(queued["id"]).status == JobStatus.CREATED
        store.close()

        # A third life (full speed) runs what SIGTERM handed back: every accepted job is terminal.
        third = start_server(data_dir, args=args, port=port)
        try:
            wait_ready(third)
            for job in (running, queued):
                assert third.wait(job["id"], timeout=60)["status"] == "completed"
        finally:
            stop_server(third)
    accepted = [finished, interrupted, waiting, running, queued]
    store = Database(data_dir / "jobs.sqlite3")
    assert {job.id: job.status for job in store.predictions.history(page_size=100)[0]} == {
        job["id"]: JobStatus.COMPLETED for job in accepted
    }
    assert sorted(p.name for p in (data_dir / "outputs").iterdir()) == sorted(
        f"{j['id']}.mp4" for j in accepted
    )
