"""The built wheel works outside the checkout: installed into a fresh virtual environment, run
from an unrelated directory, `generate` and `serve` find everything they need (the memory
profiles are package data). The new environment reuses this one's installed dependencies through
a .pth file, so the test needs no network and downloads no torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest
from api_server import png_bytes
from waiting import wait_until

from skyreels_local.video import read_mp4

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "wheel-test-key"


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the fresh venv's bin folder, an environment without PYTHONPATH pointing at the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"  # build from a copy: the checkout gets no build/ or egg-info
    shutil.copytree(
        ROOT / "skyreels_local", source / "skyreels_local", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = base / "dist"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ]
    )
    (wheel,) = wheels.glob("skyreels_local-*.whl")

    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    # This environment's packages (torch, diffusers, ...) come after the venv's own site-packages.
    Path(purelib, "reuse-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--ignore-installed",
            str(wheel),
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SKYREELS_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    imported = run(
        [str(python), "-c", "import skyreels_local; print(skyreels_local.__file__)"], env=env, cwd=base
    )
    assert imported.stdout.strip().startswith(purelib), imported.stdout  # the wheel, not the checkout
    return venv / "bin", env


def test_wheel_holds_the_profiles(installed):
    bin_dir, env = installed
    code = "from skyreels_local.profile_names import builtin_profile_names as n; print(','.join(n()))"
    names = run([str(bin_dir / "python"), "-c", code], env=env).stdout.strip()
    assert names == "24gb,48gb,80gb,cpu,sequential"


def test_generate_from_an_unrelated_directory(installed, tmp_path):
    bin_dir, env = installed
    (tmp_path / "in.png").write_bytes(png_bytes())
    result = run(
        [str(bin_dir / "skyreels-local"), "generate", "--model", "tiny-random", "--image", "in.png",
         "--prompt", "waves", "--out", "out.mp4", "--steps", "1", "--seed", "3", "--no-progress"],
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert "profile cpu" in result.stdout and "seed 3, 64x32, 9 frames" in result.stdout, result.stdout
    frames, _fps = read_mp4(tmp_path / "out.mp4")
    assert frames.shape == (9, 32, 64, 3)


def test_serve_from_an_unrelated_directory(installed, tmp_path):
    bin_dir, env = installed
    port_file = tmp_path / "port"
    command = [
        str(bin_dir / "skyreels-local"), "serve", "--model", "tiny-random", "--device", "cpu",
        "--port", "0", "--port-file", str(port_file), "--data-dir", "data", "--api-key", API_KEY,
    ]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: port_file.is_file() or server.poll() is not None, 60, "the port file")
        assert server.poll() is None, log_path.read_text()
        url = f"http://127.0.0.1:{int(port_file.read_text())}/ready"

        def ready() -> dict | None:
            assert server.poll() is None, log_path.read_text()
            try:
                response = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
            except httpx.HTTPError:
                return None
            return response.json()["data"] if response.status_code == 200 else None

        data = wait_until(ready, 180, lambda: f"/ready:\n{log_path.read_text()[-3000:]}", interval=0.25)
        assert data["model"] == "tiny-random" and data["profile"] == "cpu"
        assert (tmp_path / "data" / "jobs.sqlite3").is_file()
    finally:
        server.terminate()
        server.wait(timeout=60)
