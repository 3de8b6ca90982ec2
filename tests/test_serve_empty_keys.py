"""`skyreels-local serve` as a real process: an empty key (`--api-key "$KEY"` with KEY unset, an
empty SKYREELS_API_KEYS entry, a keys file without a key) never turns authentication off."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from api_server import MODEL_PATH, data_uri, running_server, server_env

REFUSAL = "refusing to listen on 0.0.0.0 without an API key"


def serve(tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "skyreels_local", "serve", "--data-dir", str(tmp_path / "data"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=server_env(env), timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "keys_file"),
    [
        (["--api-key", ""], None, None),
        (["--api-key", "", "--api-key", "  "], None, None),
        ([], {"SKYREELS_API_KEYS": " , ,"}, None),
        (["--api-key", "team-a:"], None, None),
        ([], None, "# no key yet\n\n   \n"),
    ],
    ids=["empty-flag", "blank-flags", "empty-env-entries", "account-without-secret", "keys-file-without-key"],
)
def test_no_real_key_on_a_public_bind_is_refused(tmp_path, args, env, keys_file):
    if keys_file is not None:
        (tmp_path / "keys.txt").write_text(keys_file)
        args = [*args, "--api-keys-file", str(tmp_path / "keys.txt")]
    result = serve(tmp_path, "--host", "0.0.0.0", "--workers", "0", *args, env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and REFUSAL in errors[0] and "--insecure-no-auth" in errors[0], result.stderr


def test_insecure_no_auth_stays_the_explicit_opt_out(tmp_path):
    args = ["--host", "0.0.0.0", "--insecure-no-auth", "--workers", "0"]
    with running_server(tmp_path / "data", api_key="", args=args, ready_path="/health") as server:
        response = httpx.get(server.base_url + "/api/v3/predictions")
        assert response.status_code == 200 and response.json()["data"]["total"] == 0
    assert "INSECURE: no API key, listening on 0.0.0.0" in server.log_path.read_text()


def test_an_empty_key_on_loopback_serves_without_auth_and_warns_loudly(tmp_path):
    with running_server(
        tmp_path / "data", api_key="", args=["--workers", "0"], ready_path="/health"
    ) as server:
        response = httpx.post(server.base_url + MODEL_PATH, json={"prompt": "p", "image": data_uri()})
        assert response.status_code == 200 and response.json()["data"]["status"] == "created"
        log = server.log_path.read_text()
    assert "no API key configured: authentication is OFF" in log
    assert "!" * 78 in log
