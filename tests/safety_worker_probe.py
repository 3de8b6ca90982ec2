"""Run one job through a real GpuWorker (its `run` loop, in a thread of this process), then print
what the job table recorded and whether the safety checker's module (torch + transformers'
classifier) was ever imported: `python tests/safety_worker_probe.py SETTINGS_JSON`.

A separate process so that sys.modules starts clean (tests/test_safety_api.py runs it)."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid

from api_server import data_uri

from skyreels_local.config import Settings
from skyreels_local.jobs import JobStore
from skyreels_local.params import GenerationParams
from skyreels_local.paths import DataPaths
from skyreels_local.worker.main import GpuWorker

CHECKER_MODULE = "skyreels_local.safety.checker"


def main() -> None:
    settings = Settings(**json.loads(sys.argv[1]))
    store = JobStore(DataPaths(settings.data_dir).create().database)
    params = GenerationParams(prompt="a quay", image=data_uri(), seed=1, num_inference_steps=1, num_frames=5)
    job = store.create(
        id=uuid.uuid4().hex, model="m", input={}, params=params.model_dump(mode="json"), seed=1, base_url="x"
    )
    worker = GpuWorker(settings, worker_id="probe", device="cpu", store=store)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while (current := store.get(job.id)).status.value not in (
        "completed",
        "failed",
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.stop()
    thread.join(60)
    print(json.dumps({"status": current.status.value, "outputs": current.outputs, "error": current.error,
                      "checker_imported": CHECKER_MODULE in sys.modules}))  # fmt: skip


if __name__ == "__main__":
    main()
