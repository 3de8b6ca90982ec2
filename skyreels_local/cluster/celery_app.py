"""The Celery app of both sides, built from the broker URL (Redis is broker and result backend).

Every setting below matters for minute-long GPU jobs; Celery's defaults would lose or hoard them
(/work/shared/SCALE.md has the table). celery is imported here only, lazily by the callers, so
the embedded mode runs without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Settings

if TYPE_CHECKING:
    from celery import Celery

VISIBILITY_MARGIN_S = 600.0  # above the job timeout: a slow job is never redelivered while it runs
RESULT_EXPIRES_S = 24 * 3600  # an outcome waits this long for an API that is down
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 3.0


class ClusterUnavailableError(RuntimeError):
    """celery (the `cluster` extra) is not installed."""


def visibility_timeout_s(settings: Settings) -> float:
    if settings.broker_visibility_timeout_s is not None:
        return settings.broker_visibility_timeout_s
    return settings.job_timeout_s + VISIBILITY_MARGIN_S


def celery_url(url: str) -> str:
    """The broker URL as given, but a `rediss://` one without `ssl_cert_reqs` (which Celery
    refuses) gets `ssl_cert_reqs=required`: redis-py's own default, the server's certificate is
    verified (CA: `&ssl_ca_certs=/path/ca.pem`; `ssl_cert_reqs=none` turns the check off)."""
    if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
        return url + ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
    return url


def make_celery(settings: Settings) -> Celery:
    """The app for `settings.broker` (redis://, rediss:// or unix:// URLs, passed through as is)."""
    try:
        from celery import Celery
    except ImportError as exc:
        raise ClusterUnavailableError("--broker needs Celery: pip install 'skyreels-local[cluster]'") from exc
    assert settings.broker, "make_celery needs settings.broker"
    url = celery_url(settings.broker)
    app = Celery("skyreels_local", broker=url, backend=url, set_as_current=False)
    transport = {
        # An unacknowledged task (taken by a worker) is handed to another worker only after this:
        # it must exceed the longest job, or a job still running would start a second time. A
        # worker *process* that dies is noticed much sooner by the dispatcher (its heartbeat key
        # expires) and its job re-dispatched under a new token, so this only matters for a whole
        # host that vanished and for the old message, which the stale-token check then drops.
        "visibility_timeout": visibility_timeout_s(settings),
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
    }
    app.conf.update(
        # JSON only: a pickle in a shared broker would run code in every worker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Acknowledge after the task ran, not on receipt: a worker killed mid-job leaves its
        # message unacknowledged, so Redis still holds it (default False loses the job).
        task_acks_late=True,
        # If a pool child dies, requeue its message instead of failing it (default False). With
        # the solo pool there is no child: a dead worker process leaves its message unacknowledged
        # (see the visibility timeout); set anyway, should a pool ever be configured.
        task_reject_on_worker_lost=True,
        # Take one task at a time: the default 4 would hoard three jobs behind a busy GPU.
        worker_prefetch_multiplier=1,
        # One task at a time per process (one process per GPU or GPU group), in the `solo` pool:
        # the task runs in the worker's main process, where the model was loaded before it
        # started consuming. No fork, so no CUDA context inherited by a forked child.
        worker_concurrency=1,
        worker_pool="solo",
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        redis_socket_timeout=SOCKET_TIMEOUT_S,
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        redis_retry_on_timeout=True,
        # The dispatcher reads each outcome within a second and deletes it; one that finds the
        # API down waits a day (past that the job is dispatched again: nothing lost).
        result_expires=RESULT_EXPIRES_S,
        # STARTED as soon as a worker takes the task (the worker then reports PROGRESS itself).
        task_track_started=True,
        # Keep a running task when the broker connection drops (a Redis restart): the outcome goes
        # to the result backend on a new connection, and a redelivered copy of its message is
        # dropped by the stale-token/lease checks. Cancelling would throw away minutes of GPU work.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis forever, it does not exit
        worker_hijack_root_logger=False,  # keep the CLI's log format
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=True,  # revoke() of a cancelled queued task
        task_create_missing_queues=True,
    )
    return app
