"""The safety checker end to end: real `serve` processes with real workers and a tiny ViT
classifier saved in the real folder layout (tests/safety_helpers.py). has_nsfw_contents through
the API, flag and block, the request opt-out, /ready and /metrics; a damaged folder refuses
`serve` at start-up; and a worker with the checker off never imports it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from api_server import API_KEY, auth, data_uri, running_server, server_env
from safety_helpers import normal_classifier, nsfw_classifier

pytestmark = pytest.mark.integration

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {"nsfw": nsfw_classifier(root / "nsfw"), "normal": normal_classifier(root / "normal")}


def quick(**fields) -> dict:
    return {"image": data_uri(), "prompt": "a quay", "num_inference_steps": 1, **fields}


def metric(server, line_start: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


def ready_detail(server) -> dict:
    return httpx.get(server.base_url + "/ready", headers=auth(server)).json()["data"]


def test_flag_marks_the_output_counts_it_and_honours_an_allowed_opt_out(tmp_path, folders):
    args = ["--safety-checker", str(folders["nsfw"]), "--allow-disable-safety-checker"]
    with running_server(tmp_path / "data", args=args) as server:
        assert ready_detail(server)["safety_checker"] == {
            "enabled": True, "path": str(folders["nsfw"]), "threshold": 0.5, "action": "flag", "allow_disable": True,
        }  # fmt: skip
        flagged = server.wait(server.submit(quick())["id"])
        assert flagged["status"] == "completed", flagged
        assert flagged["has_nsfw_contents"] == [True]
        (url,) = flagged["outputs"]
        # Kept under its usual name (the verdict is in the job row), and readable.
        assert f"/{flagged['id']}.mp4?" in url and httpx.get(url).status_code == 200
        skipped = server.wait(server.submit(quick(enable_safety_checker=False))["id"])
        assert skipped["status"] == "completed" and skipped["has_nsfw_contents"] == [False]
        assert metric(server, "skyreels_safety_checker_enabled") == 1
        assert metric(server, "skyreels_safety_checks_total") == 1  # the opted-out one was not checked
        assert metric(server, 'skyreels_nsfw_outputs_total{action="flagged"}') == 1
        assert metric(server, 'skyreels_nsfw_outputs_total{action="blocked"}') == 0


def test_block_keeps_no_video_and_ignores_the_opt_out_unless_allowed(tmp_path, folders):
    args = ["--safety-checker", str(folders["nsfw"]), "--nsfw-action", "block"]
    with running_server(tmp_path / "data", args=args) as server:
        for body in (quick(), quick(enable_safety_checker=False)):  # no --allow-disable-...: ignored
            done = server.wait(server.submit(body)["id"])
            assert done["status"] == "failed", done
            assert done["outputs"] == [] and done["has_nsfw_contents"] == []
            assert done["code"] == 1405
            assert done["error"].startswith(
                "the output was withheld: the safety checker rated the video NSFW"
            )
        assert list((tmp_path / "data" / "outputs").glob("*.mp4")) == []
        assert metric(server, 'skyreels_nsfw_outputs_total{action="blocked"}') == 2


def test_the_normal_model_passes(tmp_path, folders):
    with running_server(tmp_path / "data", args=["--safety-checker", str(folders["normal"])]) as server:
        done = server.wait(server.submit(quick())["id"])
        assert done["status"] == "completed" and done["has_nsfw_contents"] == [False]
        assert f"/{done['id']}.mp4?" in done["outputs"][0]
        assert metric(server, "skyreels_safety_checks_total") == 1
        assert metric(server, 'skyreels_nsfw_outputs_total{action="flagged"}') == 0


def test_a_damaged_folder_refuses_serve_in_one_line(tmp_path, folders):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (broken / name).write_bytes((folders["nsfw"] / name).read_bytes())
    data = (folders["nsfw"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = subprocess.run(
        [sys.executable, "-m", "skyreels_local", "serve", "--model", "tiny-random", "--port", "0",
         "--api-key", API_KEY, "--data-dir", str(tmp_path / "data"), "--safety-checker", str(broken)],
        capture_output=True, text=True, timeout=60, env=server_env(),
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: --safety-checker / SKYREELS_SAFETY_CHECKER: safety checker folder '{broken}'"
    )
    assert "model.safetensors: header describes" in line
    assert not (tmp_path / "data").exists()  # refused before anything started


def probe(tmp_path: Path, folders: dict[str, Path], safety_checker: str) -> dict:
    """One job through a real worker, run where `auto` finds the NSFW classifier
    (./weights/safety_checker/ for tiny-random)."""
    shutil.copytree(folders["nsfw"], tmp_path / "weights" / "safety_checker", dirs_exist_ok=True)
    settings = {"model": "tiny-random", "data_dir": str(tmp_path / "data"), "safety_checker": safety_checker}
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / "safety_worker_probe.py"), json.dumps(settings)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=server_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_off_never_imports_or_runs_the_checker_and_auto_finds_it(tmp_path, folders):
    off = probe(tmp_path, folders, "off")
    assert off["status"] == "completed", off
    assert off["checker_imported"] is False
    assert off["outputs"] == [off["id"] + ".mp4"]
    assert off["has_nsfw_contents"] is None and off["counters"] == {}  # no check ran, none counted
    auto = probe(tmp_path, folders, "auto")  # the same folder: now it is looked at
    assert auto["status"] == "completed", auto
    assert auto["checker_imported"] is True
    assert auto["outputs"] == [auto["id"] + ".mp4"]
    assert auto["has_nsfw_contents"] == [True]
    assert auto["counters"] == {"safety_checks": 1.0, "nsfw_flagged": 1.0}
