"""What the API's dispatcher and the remote workers agree on, torch- and celery-free.

One Celery task per attempt at a prediction: name TASK_NAME, id `<prediction id>.<token>`, on
the queue of the model key (a worker with another model never sees it). The token is fresh for
each dispatch; the Redis marker `skyreels:dispatch:<id>` holds the current one, so a message of
an older dispatch (redelivered by Redis, or re-sent after a restart) is recognised and dropped.

Redis keys (all under `skyreels:`):
- dispatch:<id>   the current token of a dispatched, unfinished prediction (deleted when it ends)
- cancel:<id>     set by the API when the prediction is cancelled or ended without the worker;
                  the worker checks it before starting and at every denoising step
- lease:<id>      `<token> <worker id>`, SET NX with a TTL refreshed by the running worker's
                  heartbeat: two deliveries of one prediction never run at once
- worker:<id>     a worker's heartbeat (JSON WorkerBeat), TTL = a few heartbeats
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

TASK_NAME = "skyreels.generate"
KEY_PREFIX = "skyreels:"
TINY_MODEL_KEY = "tiny-random"
# Every weights folder holds SkyReels V1 (the one model this server serves): its workers share a
# queue whatever the folder is called on each host.
WEIGHTS_MODEL_KEY = "skyreels-v1"
HEARTBEATS_TO_LOSE = 4  # a worker silent for this many heartbeats is gone (its key expires)


def model_key(model: str) -> str:
    """The host-independent name of what a worker runs: `tiny-random` for the demo model, else
    `skyreels-v1` (a weights folder's path differs between hosts; its contents do not)."""
    from ..config import TINY_MODEL

    return TINY_MODEL_KEY if model == TINY_MODEL else WEIGHTS_MODEL_KEY


def queue_name(key: str) -> str:
    return f"skyreels.{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}"


def task_id(prediction_id: str, token: str) -> str:
    return f"{prediction_id}.{token}"


def dispatch_key(prediction_id: str) -> str:
    return f"{KEY_PREFIX}dispatch:{prediction_id}"


def cancel_key(prediction_id: str) -> str:
    return f"{KEY_PREFIX}cancel:{prediction_id}"


def lease_key(prediction_id: str) -> str:
    return f"{KEY_PREFIX}lease:{prediction_id}"


def worker_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}worker:{worker_id}"


WORKER_KEY_PATTERN = f"{KEY_PREFIX}worker:*"
DISPATCH_KEY_PATTERN = f"{KEY_PREFIX}dispatch:*"


def beat_ttl_s(heartbeat_s: float) -> int:
    return max(2, round(heartbeat_s * HEARTBEATS_TO_LOSE))


@dataclass
class TaskPayload:
    """One attempt at a prediction, as the worker receives it (JSON: the image as base64 PNG,
    fetched and checked by the API; the worker reaches nothing but Redis)."""

    prediction_id: str
    token: str
    params: dict[str, Any]  # GenerationParams as stored in the job row (seed drawn)
    image_png: bytes
    job_timeout_s: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["image_png"] = base64.b64encode(self.image_png).decode("ascii")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskPayload:
        return cls(
            prediction_id=str(data["prediction_id"]),
            token=str(data["token"]),
            params=dict(data["params"]),
            image_png=base64.b64decode(data["image_png"]),
            job_timeout_s=float(data["job_timeout_s"]),
        )


# Outcome statuses a task returns (its Celery result).
COMPLETED, FAILED, CANCELLED, STALE = "completed", "failed", "cancelled", "stale"


@dataclass
class Outcome:
    """What a task returns through the result backend."""

    status: str  # completed | failed | cancelled | stale (not run: an old dispatch)
    worker: str = ""
    video_b64: str = ""  # completed: the MP4
    execution_ms: int = 0
    inference_ms: int = 0
    steps: int = 0
    denoise_s: float = 0.0
    seed: int | None = None
    has_nsfw_contents: list[bool] | None = None  # None: no check ran
    code: int = 0  # failed
    message: str = ""
    nsfw_blocked: bool = False
    profile: str = ""
    preset: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Outcome:
        if not isinstance(data, dict) or "status" not in data:
            return cls(status=FAILED, code=5000, message=f"a remote worker returned {str(data)[:200]!r}")
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def video(self) -> bytes:
        return base64.b64decode(self.video_b64)


@dataclass
class WorkerBeat:
    """A worker's heartbeat, JSON under worker:<id> (the API's /ready and /metrics show them)."""

    id: str
    host: str
    device: str
    model: str
    model_key: str
    queue: str
    profile: str = ""
    preset: str = ""
    state: str = "loading"  # loading | ready (idle) | busy | failed
    job_id: str | None = None
    token: str | None = None
    pid: int = 0
    started_at: float = 0.0
    last_seen: float = 0.0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str | bytes) -> WorkerBeat:
        data = json.loads(text)
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
