"""Webhook delivery: signed exactly as the hosted API signs, retried from a persistent outbox.

A terminal job writes its delivery row in the same transaction as its state (jobs/predictions.py), so a
result is never left without its webhook, even across a crash. This dispatcher runs in the HTTP
process (never in a worker, so a slow receiver cannot hold up the GPU): it leases due rows,
POSTs the bare prediction object with `input` [compat], and on failure retries with exponential
backoff for a bounded window, after which the delivery is marked dead (shown by
`GET /api/v3/predictions/{id}/webhook` and counted in /metrics). Redirects are never followed.
Receivers that hang are cut off by a timeout; deliveries run on a
small thread pool so one hanging receiver does not stall the others.

Signature [compat]: `webhook-signature: v3,<hex HMAC-SHA256>` of `"{webhook-id}.{webhook-timestamp}.{body}"`
keyed with the secret from `GET /api/v3/webhook/secret` minus its `whsec_` prefix, as UTF-8 text.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from ..errors import SkyreelsError, shorten
from ..jobs import Database, WebhookDelivery
from ..media.net import AddressPolicy, guarded_client

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
MAX_BACKOFF_S = 600.0


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_hex(24)


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery."""
    key = secret.removeprefix(SECRET_PREFIX).encode()
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v3,{digest}"


def verify(
    secret: str, headers: dict[str, str], body: bytes, *, max_age_s: int = 300, now: float | None = None
) -> bool:
    """What a receiver does (the documented algorithm); used by our tests."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lower["webhook-timestamp"])
        webhook_id = lower["webhook-id"]
        signature = lower["webhook-signature"]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, webhook_id, timestamp, body), signature)


def backoff_s(attempts: int, base_s: float = 2.0) -> float:
    """Delay before the next try after `attempts` failures: base, 2x, 4x, ... (2, 4, 8 s by
    default), capped at 10 minutes."""
    return min(base_s * 2.0 ** (attempts - 1), MAX_BACKOFF_S)


class WebhookDispatcher:
    """Delivers due outbox rows on a background thread until stopped."""

    def __init__(
        self,
        db: Database,
        *,
        secret: str,
        render: Callable[[str], bytes | None],
        policy: AddressPolicy,
        timeout_s: float,
        retry_window_s: float,
        backoff_base_s: float = 2.0,
        poll_s: float = 0.5,
        concurrency: int = 4,
    ) -> None:
        self.db = db
        self.secret = secret
        self.render = render  # prediction id -> JSON body (None: the prediction is gone)
        self.policy = policy
        self.timeout_s = timeout_s
        self.retry_window_s = retry_window_s
        self.backoff_base_s = backoff_base_s
        self.poll_s = poll_s
        self.concurrency = concurrency
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Deliveries claimed and not finished. Only free slots are claimed, so a lease never
        # runs out while its row waits behind hanging receivers (which would deliver it twice).
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pool is not None:
            # Deliveries in flight keep their lease and are retried after a restart.
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._in_flight_lock:
                    free = self.concurrency - self._in_flight
                due = self.db.webhooks.claim_due(limit=free, lease_s=self.timeout_s + 30) if free else []
                for delivery in due:
                    assert self._pool is not None
                    with self._in_flight_lock:
                        self._in_flight += 1
                    self._pool.submit(self._deliver_in_slot, delivery)
            except Exception:
                log.exception("webhook dispatcher: cannot read the outbox")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _deliver_in_slot(self, delivery: WebhookDelivery) -> None:
        try:
            self.deliver(delivery)
        except Exception:
            log.exception("prediction %s: webhook delivery failed", delivery.prediction_id)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
            self._wake.set()  # a slot is free: look for more due deliveries now

    def deliver(self, delivery: WebhookDelivery) -> bool:
        """One attempt. Returns True when the receiver answered 2xx."""
        body = self.render(delivery.prediction_id)
        if body is None:
            self.db.webhooks.failed(delivery.id, error="prediction no longer exists", retry_at=None)
            return False
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.prediction_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, delivery.prediction_id, timestamp, body),
        }
        try:
            # Redirects are not followed: the signed body goes to the configured URL or nowhere
            # (a 3xx is a failed attempt, retried like any other).
            with guarded_client(self.policy, timeout=self.timeout_s, follow_redirects=False) as client:
                response = client.post(delivery.url, content=body, headers=headers)
            if 200 <= response.status_code < 300:
                self.db.webhooks.delivered(delivery.id)
                log.info(
                    "prediction %s: webhook delivered to %s", delivery.prediction_id, shorten(delivery.url)
                )
                return True
            error = f"HTTP {response.status_code}"
            if response.is_redirect:
                error += " (a redirect; webhook redirects are not followed)"
        except (httpx.HTTPError, SkyreelsError) as exc:
            error = getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"
        except Exception as exc:  # a webhook must never take the dispatcher down
            log.exception("prediction %s: webhook delivery crashed", delivery.prediction_id)
            error = f"{exc.__class__.__name__}: {exc}"
        attempts = delivery.attempts + 1
        delay = backoff_s(attempts, self.backoff_base_s)
        retry_at = time.time() + delay
        if retry_at - delivery.created_at > self.retry_window_s:
            log.error(
                "prediction %s: webhook to %s failed %d times (%s); giving up",
                delivery.prediction_id, shorten(delivery.url), attempts, error,
            )  # fmt: skip
            self.db.webhooks.failed(delivery.id, error=error, retry_at=None)
        else:
            log.warning(
                "prediction %s: webhook to %s failed (%s); retry %d in %.3gs",
                delivery.prediction_id, shorten(delivery.url), error, attempts, delay,
            )  # fmt: skip
            self.db.webhooks.failed(delivery.id, error=error, retry_at=retry_at)
        return False
