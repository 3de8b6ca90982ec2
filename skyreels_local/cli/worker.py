"""`skyreels-local worker`: a GPU worker for a `serve --broker` API, on any machine.

One process per GPU (--device cuda:N) or GPU group (--gpus-per-video N); the broker URL is its
only connection to the API host (no shared files, no job table). It loads the model, then takes
jobs of its model from Redis one at a time until stopped (SIGTERM: the running job finishes
first). Run it under a supervisor that restarts it (systemd `Restart=always`, compose
`restart: unless-stopped`): a job that hangs past the job timeout makes it exit (watchdog).
"""

from __future__ import annotations

import argparse
import logging

from ..errors import SkyreelsError, TaskCode
from .settings_flags import HelpFormatter, add_settings_flags, settings_from_args

log = logging.getLogger(__name__)

# The Settings fields a remote worker reads, each a flag with its SKYREELS_* twin.
WORKER_FIELDS = (
    "broker",
    "model",
    "device",
    "gpus_per_video",
    "profile",
    "preset",
    "attention",
    "turbo_threshold",
    "step_cache",
    "ulysses",
    "cfg_parallel",
    "group_timeout_s",
    "safety_checker",
    "nsfw_threshold",
    "nsfw_action",
    "allow_disable_safety_checker",
    "job_timeout_s",
    "cluster_heartbeat_s",
    "broker_visibility_timeout_s",
    "engine_factory",
)


class WorkerConfigError(SkyreelsError):
    http_status = 500
    task_code = TaskCode.SERVICE_UNAVAILABLE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run a GPU worker for a `serve --broker` API (any machine; needs the cluster extra)",
        description="A GPU worker that takes jobs of its model from the Redis broker of a "
        "`skyreels-local serve --broker` API and sends the videos back through it. One process per "
        "GPU (--device cuda:N) or GPU group (--gpus-per-video N). Needs `pip install "
        "'skyreels-local[cluster]'`. Every flag has a SKYREELS_* environment twin.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--worker-id",
        default=None,
        help="this worker's name in /ready and /metrics (unique across hosts); default HOSTNAME-PID",
    )
    add_settings_flags(p, WORKER_FIELDS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, WORKER_FIELDS)
    if not settings.broker:
        raise WorkerConfigError("--broker / SKYREELS_BROKER is required, e.g. redis://api-host:6379/0")
    from .serve import check_broker_url, check_device

    check_broker_url(settings.broker)
    if settings.device is not None:
        check_device(settings.device)
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        raise WorkerConfigError("`worker` needs Celery: pip install 'skyreels-local[cluster]'") from None
    from ..cluster.remote_worker import RemoteWorker

    return RemoteWorker(settings, worker_id=args.worker_id).run()
