"""Webhook signing (the documented algorithm) and delivery from the persistent outbox."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid

import pytest
from api_server import local_site

from skyreels_local.jobs import Database
from skyreels_local.media.net import AddressPolicy
from skyreels_local.server.webhooks import WebhookDispatcher, backoff_s, new_secret, sign, verify

SECRET = "whsec_0123456789abcdef"


def test_signature_follows_the_documented_algorithm():
    body = b'{"id":"abc","status":"completed"}'
    expected = hmac.new(b"0123456789abcdef", b"abc.1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, "abc", 1700000000, body) == f"v3,{expected}"
    # the prefix is stripped, not part of the key; the rest is used as text, not base64-decoded
    assert sign("0123456789abcdef", "abc", 1700000000, body) == sign(SECRET, "abc", 1700000000, body)


def test_verify_rejects_tampering_and_stale_timestamps():
    body = b"{}"
    now = int(time.time())
    headers = {
        "webhook-id": "x",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(SECRET, "x", now, body),
    }
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, b"{ }")
    assert not verify("whsec_other", headers, body)
    assert not verify(SECRET, {**headers, "webhook-id": "y"}, body)
    old = now - 301
    stale = {
        "webhook-id": "x",
        "webhook-timestamp": str(old),
        "webhook-signature": sign(SECRET, "x", old, body),
    }
    assert not verify(SECRET, stale, body)
    assert new_secret().startswith("whsec_") and new_secret() != new_secret()


def test_backoff_grows_and_is_capped():
    assert [backoff_s(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert backoff_s(30) == 600.0


@pytest.fixture
def store(tmp_path):
    return Database(tmp_path / "jobs.sqlite3")


def finished_job(store: Database, url: str) -> str:
    job_id = uuid.uuid4().hex
    store.predictions.create(
        id=job_id, model="m", input={"prompt": "p"}, params={}, seed=1, base_url="http://s", webhook_url=url
    )
    store.predictions.claim_next("w0", "c")
    store.predictions.complete(job_id, "c", outputs=[], execution_ms=1, inference_ms=1)
    return job_id


def dispatcher(store, **kwargs) -> WebhookDispatcher:
    options = {"timeout_s": 2.0, "retry_window_s": 3600.0, "policy": AddressPolicy(["127.0.0.1"]), **kwargs}
    return WebhookDispatcher(store, secret=SECRET, render=lambda pid: f'{{"id":"{pid}"}}'.encode(), **options)


def test_a_receiver_that_is_down_first_still_gets_the_result(store):
    with local_site() as site:
        site.post_statuses = [503, 500]
        job_id = finished_job(store, f"{site.url}/hook")
        hooks = dispatcher(store)
        for expected in (False, False, True):
            (delivery,) = store.webhooks.claim_due(limit=5, lease_s=0, now=time.time() + 10_000)
            assert hooks.deliver(delivery) is expected
        assert store.webhooks.counts() == {"pending": 0, "delivered": 1, "dead": 0, "failed_attempts": 2}
        assert len(site.received) == 3
        for request in site.received:
            headers = {k.lower(): v for k, v in request.headers.items()}
            assert headers["webhook-id"] == job_id and verify(SECRET, headers, request.body)


def test_a_hanging_receiver_is_cut_off_and_retried_later(store):
    with local_site() as site:
        site.post_delay_s = 3.0
        finished_job(store, f"{site.url}/slow")
        hooks = dispatcher(store, timeout_s=0.5)
        (delivery,) = store.webhooks.claim_due(limit=5, lease_s=60)
        started = time.monotonic()
        assert hooks.deliver(delivery) is False
        assert time.monotonic() - started < 2.5
        assert store.webhooks.counts()["pending"] == 1


def test_deliveries_give_up_after_the_retry_window(store):
    finished_job(store, "http://127.0.0.1:9/closed")
    hooks = dispatcher(store, retry_window_s=0.0)
    (delivery,) = store.webhooks.claim_due(limit=5, lease_s=60)
    assert hooks.deliver(delivery) is False
    assert store.webhooks.counts()["dead"] == 1


def test_webhooks_to_private_addresses_are_refused_by_default(store):
    finished_job(store, "http://10.0.0.1/hook")
    hooks = dispatcher(store, policy=AddressPolicy())
    (delivery,) = store.webhooks.claim_due(limit=5, lease_s=60)
    assert hooks.deliver(delivery) is False
    row = store._conn().execute("SELECT last_error FROM webhooks").fetchone()
    assert "private-network address" in row[0]


def test_the_dispatcher_thread_delivers_from_the_outbox(store):
    with local_site() as site:
        hooks = dispatcher(store)
        hooks.poll_s = 0.05
        hooks.start()
        try:
            job_id = finished_job(store, f"{site.url}/hook")
            (received,) = site.wait_for(1, timeout=10)
            assert received.json() == {"id": job_id}
        finally:
            hooks.stop()


def test_the_backoff_base_is_a_setting():
    assert [backoff_s(n, 0.25) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert backoff_s(40, 0.25) == 600.0


def test_the_dispatcher_leases_only_what_it_can_send_at_once(store):
    # Rows wait unleased in the outbox while every slot is held by a hanging receiver, so a long
    # backlog can never outlive its lease and be delivered twice.
    with local_site() as site:
        site.post_delays["/hang"] = 3.0
        hooks = dispatcher(store, timeout_s=1.0, concurrency=2)
        hooks.poll_s = 0.05
        for _ in range(4):
            finished_job(store, f"{site.url}/hang")
        hooks.start()
        try:
            site.wait_for(2, timeout=5)
            # Nothing more may arrive while both slots hang (3 s each); 0.3 s is six poll
            # intervals (poll_s 0.05) of the dispatcher: a third delivery would have started.
            time.sleep(0.3)
            assert len(site.received) == 2
            leased = (
                store._conn()
                .execute("SELECT COUNT(*) FROM webhooks WHERE next_attempt_at > ?", (time.time(),))
                .fetchone()[0]
            )
            assert leased == 2
            site.wait_for(4, timeout=5)  # the 1 s timeout frees the slots for the other two
            assert len({r.headers["webhook-id"] for r in site.received}) == 4
        finally:
            hooks.stop()
