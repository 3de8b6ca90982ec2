"""Run one job through a real GpuWorker (its `run` loop, in a thread of this process), then print
what the job table recorded (the outcome, the verdicts, the counters) and whether the safety
checker's module (torch + transformers' classifier) was ever imported:
`python tests/safety_worker_probe.py SETTINGS_JSON`.

A separate process so that sys.modules starts clean (tests/test_safety_api.py runs it)."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid

from api_server import data_uri

from skyreels_local.config import Settings
from skyreels_local.jobs import TERMINAL_STATUSES, Database
from skyreels_local.params import GenerationParams
from skyreels_local.paths import DataPaths
from skyreels_local.worker.main import GpuWorker

CHECKER_MODULE = "skyreels_local.safety.checker"


def main() -> None:
    settings = Settings(**json.loads(sys.argv[1]))
    db = Database(DataPaths(settings.data_dir).create().database)
    params = GenerationParams(prompt="a quay", image=data_uri(), seed=1, num_inference_steps=1, num_frames=5)
    job = db.predictions.create(
        id=uuid.uuid4().hex, model="m", input={}, params=params.model_dump(mode="json"), seed=1, base_url="x"
    )
    worker = GpuWorker(settings, worker_id="probe", device="cpu", db=db)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while (
        current := db.predictions.get(job.id)
    ).status not in TERMINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.stop()
    thread.join(60)
    print(json.dumps({"id": current.id, "status": current.status.value, "outputs": current.outputs,
                      "has_nsfw_contents": current.has_nsfw_contents, "error": current.error,
                      "counters": {k: v for k, v in db.counters.all().items() if not k.startswith("denoise")},
                      "checker_imported": CHECKER_MODULE in sys.modules}))  # fmt: skip


if __name__ == "__main__":
    main()
