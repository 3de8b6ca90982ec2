"""A full disk, for real: a few-MB tmpfs filled to the last byte (tests/small_disk.py; skipped where
mounting is not permitted). The video writer reports ENOSPC instead of leaving an empty file, the
job table refuses writes without being corrupted or left inside a dead transaction, and a server
whose disk fills up mid-job fails that job with a clear error, answers submits and uploads 503,
keeps answering polls, and carries on once space is freed."""

from __future__ import annotations

import errno
import sqlite3
import uuid

import httpx
import numpy as np
import pytest
from api_server import MODEL_PATH, auth, data_uri, png_bytes, running_server
from small_disk import fill, small_filesystem
from waiting import wait_until

from skyreels_local.errors import DiskFullError
from skyreels_local.jobs import Database, JobStatus
from skyreels_local.video import VideoWriteError, read_mp4, write_mp4

FRAMES = np.full((9, 32, 64, 3), 90, np.uint8)


def test_writing_a_video_to_a_full_disk_raises_enospc_and_leaves_no_file(tmp_path):
    with small_filesystem(tmp_path / "disk", size_mb=1) as disk:
        write_mp4(FRAMES, disk / "fits.mp4")
        assert read_mp4(disk / "fits.mp4")[0].shape == FRAMES.shape
        fill(disk)
        with pytest.raises(VideoWriteError, match="No space left on device") as raised:
            write_mp4(FRAMES, disk / "full.mp4")
        assert raised.value.errno == errno.ENOSPC
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "fits.mp4"]  # no empty or partial file


def new_job(store: Database) -> str:
    job_id = uuid.uuid4().hex
    store.predictions.create(
        id=job_id, model="m", input={"prompt": "p"}, params={"prompt": "p"}, seed=1, base_url="http://s"
    )
    return job_id


def test_the_job_table_refuses_writes_on_a_full_disk_and_loses_nothing(tmp_path):
    with small_filesystem(tmp_path / "disk", size_mb=4) as disk:
        store = Database(disk / "jobs.sqlite3")
        accepted = [new_job(store) for _ in range(5)]
        store.predictions.claim_next("w0", "claim-0")
        filler = fill(disk)
        with pytest.raises(DiskFullError, match="disk is full"):
            new_job(store)
        with pytest.raises(DiskFullError):
            store.predictions.fail(accepted[0], "claim-0", code=5000, error="x")
        # Reads go on while nothing can be written.
        assert store.predictions.get(accepted[0]).status == JobStatus.PROCESSING
        assert store.predictions.queue_depth() == 4

        filler.unlink()
        # The same connection writes again: no transaction was left open by the failed commits.
        late = new_job(store)
        assert store.predictions.fail(accepted[0], "claim-0", code=5000, error="x")
        conn = sqlite3.connect(disk / "jobs.sqlite3")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        ids = {row[0] for row in conn.execute("SELECT id FROM predictions")}
        assert ids == {*accepted, late}
        conn.close()
        store.close()


@pytest.mark.slow
def test_a_server_whose_disk_fills_mid_job(tmp_path):
    env = {"SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine", "SKYREELS_TEST_STEP_DELAY_S": "0.25"}
    body = {"prompt": "a full disk", "image": data_uri()}
    with (
        small_filesystem(tmp_path / "data", size_mb=24) as data_dir,
        running_server(data_dir, env=env) as server,
        server.client() as client,
    ):
        before = server.wait(server.submit({**body, "num_inference_steps": 1})["id"])
        assert before["status"] == "completed"
        workers = httpx.get(server.base_url + "/ready", headers=auth(server)).json()["data"]["workers"]
        worker_pid = workers[0]["pid"]
        running = server.submit({**body, "num_inference_steps": 12})  # about 3 s of denoising
        server.wait(running["id"], statuses=("processing",))
        filler = fill(data_dir)

        # Submits and uploads are refused with a clear 503 in the envelope; polls still answer.
        refused = client.post(MODEL_PATH, json={**body, "num_inference_steps": 1})
        assert refused.status_code == 503, refused.text
        assert refused.json() == {
            "code": 503,
            "message": "Service Unavailable",
            "data": {
                "error": "the server's disk is full, so the job table cannot be written; retry once space is freed"
            },
        }
        assert int(refused.headers["retry-after"]) > 0
        upload = client.post(
            "/api/v3/media/upload/binary", files={"file": ("in.png", png_bytes(), "image/png")}
        )
        assert upload.status_code == 503 and "disk is full" in upload.json()["data"]["error"]
        assert server.get(before["id"])["status"] == "completed"
        assert httpx.get(before["outputs"][0]).status_code == 200
        assert httpx.get(server.base_url + "/health").status_code == 200

        # The worker cannot write the video, nor record that: it waits for space.
        marker = f"prediction {running['id']}: cannot record the outcome"
        wait_until(
            lambda: marker in server.log_path.read_text(errors="replace"),
            60,
            lambda: f"{marker!r} in the log:\n{server.log_tail()}",
            interval=0.2,
        )
        assert server.get(running["id"])["status"] == "processing"

        filler.unlink()
        failed = server.wait(running["id"], timeout=60)
        assert failed["status"] == "failed" and failed["code"] == 5000
        assert "disk is full: the output video could not be written" in failed["error"]
        assert failed["outputs"] == []

        # Space is back: the same worker (no restart, model still loaded) runs the next job.
        after = server.wait(server.submit({**body, "num_inference_steps": 1})["id"])
        assert after["status"] == "completed"
        assert (
            httpx.get(server.base_url + "/ready", headers=auth(server)).json()["data"]["workers"][0]["pid"]
            == worker_pid
        )
        video = tmp_path / "before.mp4"
        video.write_bytes(httpx.get(before["outputs"][0]).content)
        assert read_mp4(video)[0].shape[0] == 9
        outputs = sorted(p.name for p in (data_dir / "outputs").iterdir())
        assert outputs == sorted([f"{before['id']}.mp4", f"{after['id']}.mp4"])  # no partial files
        conn = sqlite3.connect(data_dir / "jobs.sqlite3")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = dict(conn.execute("SELECT id, status FROM predictions"))
        conn.close()
        assert rows == {before["id"]: "completed", running["id"]: "failed", after["id"]: "completed"}
