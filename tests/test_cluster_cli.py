"""The cluster mode's command line: `worker`'s flags (derived from Settings like `serve`'s), and
what `serve --broker` and `worker` refuse before they start anything (no Redis needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from api_server import server_env

pytestmark = pytest.mark.integration  # runs the CLI as a process

CLI = [sys.executable, "-m", "skyreels_local"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=server_env(env))


def test_worker_help_lists_its_flags_with_their_environment_twins():
    result = run_cli("worker", "--help")
    assert result.returncode == 0, result.stderr
    for flag, env in [
        ("--broker", "SKYREELS_BROKER"), ("--model", "SKYREELS_MODEL"), ("--device", "SKYREELS_DEVICE"),
        ("--gpus-per-video", "SKYREELS_GPUS_PER_VIDEO"), ("--profile", "SKYREELS_PROFILE"),
        ("--preset", "SKYREELS_PRESET"), ("--cluster-heartbeat-s", "SKYREELS_CLUSTER_HEARTBEAT_S"),
    ]:  # fmt: skip
        assert flag in result.stdout and env in result.stdout
    assert "--worker-id" in result.stdout
    assert "--api-key" not in result.stdout and "--port" not in result.stdout  # serve's, not the worker's
    assert "--broker" in run_cli("serve", "--help").stdout


def test_worker_without_a_broker_says_which_flag_is_missing():
    result = run_cli("worker", "--model", "tiny-random")
    assert result.returncode == 2
    assert "--broker / SKYREELS_BROKER is required" in result.stderr


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--broker", "http://redis:6379/0"], None, "`broker` must be a Redis URL"),
        (["--broker", "redis://127.0.0.1:1/0", "--workers", "2"], None, "--workers 2 with --broker"),
        (["--workers", "1"], {"SKYREELS_BROKER": "redis://127.0.0.1:1/0"}, "--workers 1 with --broker"),
    ],
    ids=["not-redis", "local-workers", "env-twin"],
)
def test_serve_refuses_a_bad_broker_setup_in_one_line(tmp_path, args, env, message):
    result = run_cli("serve", "--port", "0", "--api-key", "k", "--data-dir", str(tmp_path), *args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "jobs.sqlite3").exists()  # refused before anything was started


def test_worker_refuses_a_bad_broker_url_without_showing_its_password():
    result = run_cli("worker", "--broker", "amqp://user:s3cret@host//")
    assert result.returncode == 2 and "`broker` must be a Redis URL" in result.stderr
    assert "s3cret" not in result.stderr


def test_without_the_cluster_extra_the_embedded_mode_works_and_broker_says_what_to_install(tmp_path):
    # A `celery` that cannot be imported, first on the path: as if the extra were not installed.
    blocked = tmp_path / "blocked"
    (blocked / "celery").mkdir(parents=True)
    (blocked / "celery" / "__init__.py").write_text("raise ImportError('celery is not installed')\n")
    env = server_env()
    env["PYTHONPATH"] = f"{blocked}:{env['PYTHONPATH']}"
    probe = (
        "from skyreels_local.cli import build_parser; build_parser(); "
        "from skyreels_local.config import Settings; from skyreels_local.server.api import create_app; "
        "create_app(Settings()); print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.stdout.strip() == "ok", result.stderr
    for args in (
        ["worker", "--broker", "redis://127.0.0.1:1/0"],
        ["serve", "--broker", "redis://127.0.0.1:1/0"],
    ):
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2 and "pip install 'skyreels-local[cluster]'" in result.stderr, (
            result.stderr
        )
