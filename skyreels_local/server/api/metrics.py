"""Prometheus metrics, read from the job table at scrape time (so they are right across
processes and restarts) plus the supervisor's in-process restart count."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from ...jobs.counters import NSFW_BLOCKED, NSFW_FLAGGED, SAFETY_CHECKS

if TYPE_CHECKING:
    from ...config import Settings
    from .services import Services


class ServerCollector(Collector):
    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        db = self.services.db
        jobs = GaugeMetricFamily(
            "skyreels_jobs", "Predictions in the job table, by status", labels=["status"]
        )
        for status, count in db.predictions.count_by_status().items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "skyreels_queue_depth", "Predictions waiting for a worker", value=db.predictions.queue_depth()
        )
        readiness = self.services.readiness()
        up = sum(1 for w in readiness["workers"] if w["state"] in ("ready", "busy"))
        yield GaugeMetricFamily(
            "skyreels_workers_up", "Workers with a model loaded and a fresh heartbeat", value=up
        )
        yield from cluster_metrics(self.services)
        yield CounterMetricFamily(
            "skyreels_worker_restarts",
            "Worker processes restarted after dying",
            value=self.services.supervisor.restarts,
        )
        count, seconds = db.predictions.generation_totals()
        yield SummaryMetricFamily(
            "skyreels_generation_seconds", "Time from start to result of completed predictions",
            count_value=count, sum_value=seconds,
        )  # fmt: skip
        counters = db.counters.all()
        yield SummaryMetricFamily(
            "skyreels_step_seconds", "Denoising steps of completed predictions and the seconds they took",
            count_value=counters.get("denoise_steps", 0.0), sum_value=counters.get("denoise_seconds", 0.0),
        )  # fmt: skip
        hooks = db.webhooks.counts()
        deliveries = CounterMetricFamily(
            "skyreels_webhooks", "Webhooks delivered, and given up after the retry window", labels=["outcome"]
        )
        for outcome in ("delivered", "dead"):
            deliveries.add_metric([outcome], hooks[outcome])
        yield deliveries
        yield GaugeMetricFamily(
            "skyreels_webhooks_pending", "Webhooks waiting for (re)delivery", value=hooks["pending"]
        )
        yield CounterMetricFamily(
            "skyreels_webhook_failures", "Failed webhook delivery attempts", value=hooks["failed_attempts"]
        )
        yield from safety_metrics(self.services.settings, counters)


def cluster_metrics(services: Services) -> Iterator[Metric]:
    """With --broker: each remote worker's last heartbeat (host, device, idle/busy), and whether
    the dispatcher reaches the broker."""
    cluster = services.cluster
    if cluster is None:
        return
    seen = GaugeMetricFamily(
        "skyreels_remote_worker_last_seen_seconds",
        "Unix time of each live remote worker's last heartbeat, by host, device and state (ready = idle)",
        labels=["worker", "host", "device", "model_key", "state"],
    )
    for beat in cluster.workers:
        seen.add_metric([beat.id, beat.host, beat.device, beat.model_key, beat.state], beat.last_seen)
    yield seen
    yield GaugeMetricFamily(
        "skyreels_broker_connected",
        "1 while the dispatcher reaches the Redis broker",
        value=int(cluster.connected),
    )
    # The send window (cluster/dispatcher.py): how many jobs may wait in Redis, and how many do;
    # the rest of the queue waits in the job table (skyreels_queue_depth counts both).
    yield GaugeMetricFamily(
        "skyreels_broker_send_window",
        "Jobs that may wait in Redis sent but not started (--broker-send-window, or 2 per live worker)",
        value=cluster.send_window(),
    )
    yield GaugeMetricFamily(
        "skyreels_broker_sent_waiting",
        "Jobs sent to Redis that no worker has started yet",
        value=cluster.remote.sent_waiting(),
    )


def safety_metrics(settings: Settings, counters: dict[str, float]) -> Iterator[Metric]:
    """The NSFW safety checker: on or off, videos checked, and outputs flagged or blocked (the
    counters table, added to by the workers with each job's outcome)."""
    from ...safety.policy import config_from_settings

    yield GaugeMetricFamily(
        "skyreels_safety_checker_enabled",
        "1 when finished videos go through the NSFW safety checker",
        value=int(config_from_settings(settings).enabled),
    )
    yield CounterMetricFamily(
        "skyreels_safety_checks",
        "Videos the safety checker looked at",
        value=counters.get(SAFETY_CHECKS, 0.0),
    )
    outputs = CounterMetricFamily(
        "skyreels_nsfw_outputs",
        "Videos the safety checker rated NSFW: flagged (kept, has_nsfw_contents true) or blocked (not kept)",
        labels=["action"],
    )
    for action, name in (("flagged", NSFW_FLAGGED), ("blocked", NSFW_BLOCKED)):
        outputs.add_metric([action], counters.get(name, 0.0))
    yield outputs


def build_registry(services: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(services))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
