"""`serve --gpus-per-video 2` on a CPU: a worker is a group of two gloo processes.

A job through the official client completes; kill -9 of the second rank mid-job ends the whole
group, the supervisor re-queues the job and restarts the group, and the job completes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import wavespeed
from api_server import data_uri, running_server
from waiting import wait_until

from skyreels_local.video import read_mp4

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "wavespeed-ai/SkyReels-V1"
KEY = "group-test-key"


def group_ranks(data_dir: Path) -> list[int]:
    """PIDs of the `worker.group` rank processes serving `data_dir` (its path is in their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "skyreels_local.worker.group" in command and str(data_dir) in command:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("group") / "data"
    args = ["--gpus-per-video", "2", "--no-cfg-parallel", "--group-timeout-s", "60", "--max-attempts", "2"]
    with running_server(data_dir, api_key=KEY, args=args) as server:
        yield server


def test_job_through_the_official_client(server, tmp_path):
    client = wavespeed.Client(base_url=server.base_url, api_key=KEY)
    result = client.run(
        MODEL,
        {"prompt": "a lighthouse in fog", "image": data_uri(), "num_inference_steps": 2, "seed": 5},
        poll_interval=0.2,
        timeout=120,
    )
    (url,) = result["outputs"]
    import httpx

    path = tmp_path / "out.mp4"
    path.write_bytes(httpx.get(url).content)
    frames, fps = read_mp4(path)
    assert frames.shape == (9, 32, 64, 3) and fps == 24
    assert "Ulysses x2" in server.log_path.read_text(errors="replace")


def test_cancel_mid_job_stops_the_group_and_it_takes_the_next_job(server):
    body = {
        "prompt": "cancel me",
        "image": data_uri(),
        "num_inference_steps": 50,
        "num_frames": 65,
        "seed": 8,
    }
    job = server.submit(body)
    server.wait(job["id"], statuses=("processing",), timeout=60)
    time.sleep(0.3)
    with server.client() as client:
        assert client.post(f"/api/v3/predictions/{job['id']}/cancel").status_code == 200
    assert server.wait(job["id"], timeout=60)["status"] == "cancelled"
    nxt = server.submit({"prompt": "next", "image": data_uri(), "num_inference_steps": 2, "seed": 2})
    assert server.wait(nxt["id"], timeout=60)["status"] == "completed"
    assert "rank 1 of the group exited" not in server.log_path.read_text(errors="replace")


def test_kill_9_of_one_rank_restarts_the_group_and_the_job_completes(server):
    (rank1,) = group_ranks(server.data_dir)
    body = {
        "prompt": "a slow one",
        "image": data_uri(),
        "num_inference_steps": 50,
        "num_frames": 65,
        "seed": 7,
    }
    job = server.submit(body)
    server.wait(job["id"], statuses=("processing",), timeout=60)
    time.sleep(0.5)  # well inside its denoising steps
    assert server.get(job["id"])["status"] == "processing"
    os.kill(rank1, signal.SIGKILL)
    final = server.wait(job["id"], timeout=240)
    assert final["status"] == "completed", final
    log = server.log_path.read_text(errors="replace")
    assert f"rank 1 of the group exited with code {-signal.SIGKILL}" in log
    # A new group serves (a new rank 1), and nothing else is left running from the old one.
    wait_until(lambda: group_ranks(server.data_dir) not in ([], [rank1]), 30, lambda: "the restarted group")
    assert rank1 not in group_ranks(server.data_dir)


def test_a_rank_stuck_in_a_collective_fails_the_job_by_the_group_timeout(tmp_path):
    """SIGSTOP of rank 1 mid-job: rank 0 waits in a collective until --group-timeout-s, fails the
    job, and the group is restarted; the next job completes."""
    args = ["--gpus-per-video", "2", "--no-cfg-parallel", "--group-timeout-s", "10"]
    with running_server(tmp_path / "data", api_key=KEY, args=args) as server:
        (rank1,) = group_ranks(server.data_dir)
        body = {
            "prompt": "stuck",
            "image": data_uri(),
            "num_inference_steps": 50,
            "num_frames": 65,
            "seed": 3,
        }
        job = server.submit(body)
        server.wait(job["id"], statuses=("processing",), timeout=60)
        time.sleep(0.5)
        os.kill(rank1, signal.SIGSTOP)
        try:
            started = time.monotonic()
            final = server.wait(job["id"], timeout=120)
        finally:
            if rank1 in group_ranks(server.data_dir):
                os.kill(rank1, signal.SIGKILL)
        assert final["status"] == "failed" and "generation failed" in final["error"], final
        assert time.monotonic() - started < 60
        nxt = server.submit({"prompt": "after", "image": data_uri(), "num_inference_steps": 2, "seed": 1})
        assert server.wait(nxt["id"], timeout=180)["status"] == "completed"
