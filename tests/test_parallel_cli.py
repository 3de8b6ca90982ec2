"""`generate --gpus-per-video N` and the supervisor's plan of groups for `serve`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from skyreels_local.config import Settings
from skyreels_local.server.supervisor import plan_workers

CLI = [sys.executable, "-m", "skyreels_local"]


def test_plan_groups_of_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    plan = plan_workers(Settings(gpus_per_video=4))
    assert [(w.id, w.device, w.env["CUDA_VISIBLE_DEVICES"]) for w in plan] == [
        ("w0", "cuda", "0,1,2,3"),
        ("w1", "cuda", "4,5,6,7"),
    ]
    # A remainder stays idle; --workers caps the count.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan_workers(Settings(gpus_per_video=2))] == ["3,5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert len(plan_workers(Settings(gpus_per_video=2, workers=1))) == 1
    # Fewer GPUs than N: one group that fails to load with a message naming the shortfall.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan_workers(Settings(gpus_per_video=2))] == ["0"]


def test_plan_groups_on_a_cpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert [(w.id, w.device) for w in plan_workers(Settings(gpus_per_video=2, device="cpu"))] == [
        ("w0", "cpu")
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [(w.id, w.device) for w in plan_workers(Settings(gpus_per_video=4))] == [("w0", "cpu")]


def test_generate_rejects_a_split_that_does_not_divide_the_heads(tmp_path, test_image_path):
    done = subprocess.run(
        [*CLI, "generate", "--model", "tiny-random", "--device", "cpu", "--image", str(test_image_path),
         "--prompt", "x", "--out", str(tmp_path / "o.mp4"), "--gpus-per-video", "3", "--steps", "1"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode != 0
    assert "`ulysses` must divide the model's 4 attention heads" in done.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_generate_on_two_processes_writes_the_same_video(tmp_path, test_image_path):
    from skyreels_local.video import read_mp4

    common = [*CLI, "generate", "--model", "tiny-random", "--device", "cpu", "--image", str(test_image_path),
              "--prompt", "a red kite", "--seed", "9", "--steps", "3", "--no-progress"]  # fmt: skip
    one = subprocess.run(
        [*common, "--out", str(tmp_path / "one.mp4")], capture_output=True, text=True, timeout=180
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [*common, "--out", str(tmp_path / "two.mp4"), "--gpus-per-video", "2", "--no-cfg-parallel"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "2 processes: Ulysses x2" in two.stdout
    a, _ = read_mp4(tmp_path / "one.mp4")
    b, _ = read_mp4(tmp_path / "two.mp4")
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert float(diff.mean()) < 0.5 and float((diff <= 1).mean()) > 0.95
