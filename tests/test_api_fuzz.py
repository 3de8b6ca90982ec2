"""Schema-driven fuzzing of the whole API (schemathesis on our own /openapi.json) against a real
server: whatever the generated path, query, headers and body, no answer is a 5xx, every error is
in the contract's envelope, and the server is still alive and answering at the end.

Bounded and deterministic for CI: a fixed number of examples per operation, derandomized
(Hypothesis draws from a seed derived from the test, not from the clock), and no example database.
The server runs without workers, so accepted submits only queue up: no generated URL is ever
fetched (the network is out of bounds for tests)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from api_server import API_KEY, running_server
from hypothesis import HealthCheck, settings

from skyreels_local.config import Settings
from skyreels_local.server.api import create_app

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    args = ["--workers", "0", "--max-queue", "20", "--max-upload-bytes", "65536"]
    with running_server(data_dir, args=args, ready_path="/health") as server:
        yield server
    assert server.process.returncode in (0, -15), server.log_tail()


# The same document the server serves at /openapi.json, built from the app without starting it
# (the app factory does nothing until its lifespan runs), so the operations are known at collection.
schema = schemathesis.openapi.from_dict(create_app(Settings(workers=0)).openapi())


def assert_answer(case, response) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    # /ready's 503 until a worker is up is its contract (none runs here); nothing else may be 5xx.
    assert response.status_code < 500 or (case.path == "/ready" and response.status_code == 503), where
    if response.status_code >= 400 and case.method != "HEAD":  # a HEAD answer has no body
        body = response.json()
        assert set(body) == {"code", "message", "data"}, where
        assert body["code"] == response.status_code, where
        assert isinstance(body["message"], str) and body["message"], where
        assert isinstance(body["data"]["error"], str) and body["data"]["error"], where


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_gets_a_5xx_or_an_error_outside_the_envelope(case, fuzz_server):
    response = case.call(base_url=fuzz_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert_answer(case, response)


def test_the_server_survived_the_fuzzing(fuzz_server):
    assert fuzz_server.process.poll() is None
    assert httpx.get(fuzz_server.base_url + "/health").status_code == 200
    log = fuzz_server.log_path.read_text(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log
