"""`skyreels-local serve`: flags, their SKYREELS_* twins, and the refusal to serve unauthenticated
on a non-loopback address."""

from __future__ import annotations

import logging

import pytest

from skyreels_local.cli import build_parser, main
from skyreels_local.cli.serve import ServeConfigError, check_bind_policy, settings_from_args
from skyreels_local.config import Settings
from skyreels_local.server.supervisor import plan_workers


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SKYREELS_"):
            monkeypatch.delenv(name)


def parse(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_flag_beats_env_beats_default(monkeypatch):
    assert parse().max_queue == 500
    monkeypatch.setenv("SKYREELS_MAX_QUEUE", "7")
    monkeypatch.setenv("SKYREELS_PORT", "9001")
    assert parse().max_queue == 7
    settings = parse("--max-queue", "3")
    assert settings.max_queue == 3 and settings.port == 9001


def test_list_settings_from_env_and_flags(monkeypatch):
    monkeypatch.setenv("SKYREELS_API_KEYS", "k1, k2,,k3")
    monkeypatch.setenv("SKYREELS_URL_ALLOW_LIST", "10.0.0.0/8,images.studio.lan")
    settings = parse()
    assert settings.api_keys == ["k1", "k2", "k3"]
    assert settings.url_allow_list == ["10.0.0.0/8", "images.studio.lan"]
    assert parse("--api-key", "a", "--api-key", "b").api_keys == ["a", "b"]  # the flag replaces the env list
    assert parse("--url-allow-list", "127.0.0.1").url_allow_list == ["127.0.0.1"]


def test_every_serve_flag_names_its_env_twin():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    for action in serve._actions:
        if action.dest != "help":
            assert f"env SKYREELS_{action.dest.upper()}" in action.help, action.dest


def test_no_key_is_fine_on_loopback_but_refused_elsewhere(caplog):
    caplog.set_level(logging.WARNING)
    check_bind_policy(Settings(host="127.0.0.1"))
    assert "no API key configured" in caplog.text
    with pytest.raises(ServeConfigError, match="refusing to listen on 0.0.0.0 without an API key"):
        check_bind_policy(Settings(host="0.0.0.0"))
    check_bind_policy(Settings(host="0.0.0.0", api_keys=["k"]))
    with pytest.raises(ServeConfigError, match="does not exist"):
        check_bind_policy(Settings(host="0.0.0.0", api_keys_file="/no/such/keys.txt"))
    caplog.clear()
    check_bind_policy(Settings(host="0.0.0.0", insecure_no_auth=True))
    assert "INSECURE" in caplog.text


def test_serve_exits_with_a_message_instead_of_binding(tmp_path, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err
    assert main(["serve", "--max-queue", "0", "--data-dir", str(tmp_path)]) == 2
    assert "--max-queue / SKYREELS_MAX_QUEUE" in capsys.readouterr().err


def test_worker_plan(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [(w.id, w.device) for w in plan_workers(Settings())] == [("w0", "cpu")]
    assert plan_workers(Settings(workers=0)) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    plan = plan_workers(Settings())
    assert [(w.id, w.device, w.env["CUDA_VISIBLE_DEVICES"]) for w in plan] == [
        ("w0", "cuda", "2"),
        ("w1", "cuda", "3"),
    ]
    assert [w.device for w in plan_workers(Settings(device="cuda:1"))] == ["cuda:1"]
