"""`serve` fails fast: what is knowable up front (preset, profile, device, weights, a bad
SKYREELS_* value) stops it with one line and a non-zero exit before it accepts anything; what
only a worker finds (a load error) answers submits 503 and shows in /ready, while the worker is
retried with backoff."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from api_server import MODEL_PATH, data_uri, running_server, server_env
from failing_engine import LOAD_ERROR
from waiting import wait_until

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "skyreels_local"]
REFUSAL_S = 20  # "within seconds": the checks run before uvicorn, workers or the model start


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=REFUSAL_S, env=server_env(env)
    )


def serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("serve", "--port", "0", "--api-key", "k", "--data-dir", str(tmp_path / "data"), *args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "tiny-random", "--preset", "bogus"],
            "argument --preset: invalid choice: 'bogus' (choose from 'stock', 'exact', 'fp8', 'turbo') "
            "(see skyreels-local serve --help)",
        ),
        (
            ["--model", "tiny-random", "--profile", "nosuch"],
            "error: --profile / SKYREELS_PROFILE: `profile` must be one of auto, 24gb, 48gb, 80gb, cpu, "
            "sequential or a path to a profile file, got 'nosuch'",
        ),
        (
            ["--model", "tiny-random", "--profile", "mine.toml"],
            "error: --profile / SKYREELS_PROFILE: `profile` must be an existing profile file (no such file), "
            "got 'mine.toml'",
        ),
        (
            ["--model", "tiny-random", "--device", "gpu0"],
            "error: --device / SKYREELS_DEVICE: `device` must be a torch device such as cpu, cuda or cuda:1, "
            "got 'gpu0'",
        ),
    ],
)
def test_bad_names_refuse_to_start(tmp_path, args, message):
    started = time.monotonic()
    result = serve(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    # One line: the refusal, not a usage block or a traceback (the loopback no-key warning aside).
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(message), result.stderr
    assert "usage:" not in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < REFUSAL_S
    assert not (tmp_path / "data").exists()  # refused before the data directory was touched


def test_bad_preset_from_the_environment_is_one_line(tmp_path):
    result = run_cli("serve", "--model", "tiny-random", "--api-key", "k", env={"SKYREELS_PRESET": "bogus"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --preset / SKYREELS_PRESET: `preset` must be one of stock, exact, fp8, turbo, got 'bogus'"
    )


def test_empty_weights_folder_refuses_to_start(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    result = serve(tmp_path, "--model", str(weights), "--device", "cpu")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --model / SKYREELS_MODEL: weights directory '{weights}' is incomplete: ")
    assert "model_index.json: missing" in line and "weights download" in line


def test_bad_environment_value_is_one_line_naming_the_variable():
    result = run_cli("--version", env={"SKYREELS_PORT": "abc"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: SKYREELS_PORT (environment) 'abc': Input should be a valid integer, unable to parse "
        "string as an integer"
    )
    assert "Traceback" not in result.stderr
    good = run_cli("--version")
    assert good.returncode == 0 and good.stdout.startswith("skyreels-local ")


def test_a_worker_that_cannot_load_makes_submits_503_with_the_reason(tmp_path):
    args = ["--engine-factory", "failing_engine:build_engine"]
    with running_server(tmp_path / "data", args=args, ready_path="/health") as server:
        with server.client() as client:

            def load_error() -> str | None:
                return client.get("/ready").json()["data"].get("load_error")

            reason = wait_until(load_error, 60, "a load error in /ready")
            assert reason == f"RuntimeError: {LOAD_ERROR}"
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["data"]["ready"] is False
            submit = client.post(MODEL_PATH, json={"prompt": "x", "image": data_uri()})
        assert submit.status_code == 503
        envelope = submit.json()
        assert envelope["code"] == 503
        assert envelope["data"]["error"] == (
            f"no worker can load the model: RuntimeError: {LOAD_ERROR}; the server retries about "
            "every 60 s (see /ready)"
        )
        # The retry backs off (1 s, 2 s, ...; at most 60 s) and the log says why each time.
        wait_until(
            lambda: "restarting in 2s" in server.log_path.read_text(),
            30,
            lambda: f"a second, longer retry delay:\n{server.log_tail()}",
        )
        log = server.log_path.read_text()
        assert f"worker w0 could not load the model: RuntimeError: {LOAD_ERROR}; restarting in 1s" in log
        assert f"worker w0 could not load the model: RuntimeError: {LOAD_ERROR}; restarting in 2s" in log
        assert httpx.get(server.base_url + "/health").status_code == 200
