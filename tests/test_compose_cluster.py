"""compose.cluster.yaml cannot be run here (no Docker Compose, no GPU): check it statically.

It must start what this repository builds (Dockerfile.cuda's image), every command and flag it
passes must exist in our CLI, every SKYREELS_* variable must be a Settings field, and the
settings the README promises (Redis persistence and password, no published Redis port, a
worker with a GPU, no HTTP health check on a worker, restarts) must really be in the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.cluster.yaml"

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` forms (nested defaults too)."""
    pattern = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:-|:\?)([^${}]*))?\}")
    while True:
        match = pattern.search(value)
        if match is None:
            return value
        name, kind, rest = match.groups()
        if name in env and env[name]:
            replacement = env[name]
        elif kind == ":-":
            replacement = rest
        elif kind == ":?":
            raise KeyError(f"{name}: {rest}")
        else:
            replacement = ""
        value = value[: match.start()] + replacement + value[match.end() :]


def our_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc for name, svc in compose["services"].items() if svc.get("image") == "skyreels-local:cuda"
    }


def test_the_services_are_redis_an_api_and_a_gpu_worker(compose):
    assert set(compose["services"]) == {"redis", "api", "worker"}
    assert set(our_services(compose)) == {"api", "worker"}
    build = compose["services"]["api"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile.cuda"


def test_every_command_and_flag_exists_in_our_cli(compose):
    from skyreels_local.cli import build_parser

    parser = build_parser()
    env = {"REDIS_PASSWORD": "pw", "SKYREELS_API_KEYS": "k"}
    for name, service in our_services(compose).items():
        argv = [interpolate(str(word), env) for word in service["command"]]
        # The image's ENTRYPOINT is `tini -- skyreels-local`: the command is our subcommand line.
        parser.parse_args(argv)  # exits (fails the test) on an unknown subcommand or flag
        broker = interpolate(service["environment"]["SKYREELS_BROKER"], env)
        assert broker == "redis://:pw@redis:6379/0", name
        assert not any("redis://" in str(word) for word in argv), f"{name}: the password would show in ps"


def test_api_and_worker_share_one_broker_url_and_a_worker_host_can_point_it_elsewhere(compose):
    urls = {name: svc["environment"]["SKYREELS_BROKER"] for name, svc in our_services(compose).items()}
    assert urls["api"] == urls["worker"]
    assert interpolate(urls["worker"], {"REDIS_PASSWORD": "s3cret", "REDIS_HOST": "api.lan"}) == (
        "redis://:s3cret@api.lan:6379/0"
    )
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(urls["worker"], {})  # no password, no start


def test_environment_names_are_settings(compose):
    from skyreels_local.config import Settings

    for service in our_services(compose).values():
        for name in service.get("environment", {}):
            assert name.startswith("SKYREELS_")
            assert name.removeprefix("SKYREELS_").lower() in Settings.model_fields, name
    # The API binds 0.0.0.0 in the image: it must be given real keys (serve refuses none).
    assert "SKYREELS_API_KEYS" in compose["services"]["api"]["environment"]


def test_redis_is_persistent_private_and_password_protected(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in command
    assert "ports" not in redis  # never published by this file
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_the_worker_has_a_gpu_weights_no_http_health_check_and_restarts(compose):
    worker = compose["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["device_ids"] == ["${WORKER_GPU:-0}"]
    command = worker["command"]
    model = command[command.index("--model") + 1]
    assert any(volume.split(":")[1] == model for volume in worker["volumes"])
    assert worker["healthcheck"] == {"disable": True}
    assert worker["stop_grace_period"] == "10m"  # SIGTERM lets the running job finish
    for service in compose["services"].values():
        assert service["restart"] == "unless-stopped"
    # The API keeps its state on the API host; the worker needs no data directory (no shared files).
    assert "./data:/data" in compose["services"]["api"]["volumes"]
    assert not any(volume.endswith(":/data") for volume in worker["volumes"])


def test_the_image_has_the_cluster_extra():
    dockerfile = (ROOT / "Dockerfile.cuda").read_text()
    assert re.search(r'pip install "\.\[cluster\]"', dockerfile)


def test_readme_shows_the_compose_commands():
    readme = (ROOT / "README.md").read_text()
    assert "docker compose -f compose.cluster.yaml up -d" in readme
    assert "skyreels-local worker --broker" in readme
    assert "compose.cluster.yaml" in readme and "--no-deps worker" in readme
