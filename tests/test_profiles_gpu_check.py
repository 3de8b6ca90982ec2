"""scripts/gpu_check.py runs end to end with --tiny on the CPU, as the GPU machine will run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """Shared by the runs of this module: the second run reuses the weights the first wrote."""
    return tmp_path_factory.mktemp("gpu-check") / "weights"


def run_check(tmp_path: Path, weights: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "scripts/gpu_check.py", "--tiny", "--out", str(out),
               "--weights-dir", str(weights), *extra]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return done, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_tiny_run_loads_every_profile_and_writes_results(tmp_path, weights_dir):
    done, results = run_check(tmp_path, weights_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert results["sections"]["env"]["device"] in ("cpu", "cuda")
    assert results["sections"]["weights"]["bytes"] > 0
    assert any("stand-ins" in note for note in results["notes"])
    profiles = {r["profile"]: r for r in results["profiles"]}
    assert list(profiles) == ["24gb", "80gb", "48gb", "sequential"]  # the 24 GB one first
    for name, record in profiles.items():
        assert record["status"] == "ok", record
        assert record["engine_profile"] == name
        assert record["load_s"] >= 0
        assert len(record["step_s"]) == 2 and record["s_per_step"] > 0
    # Only the decode profile decodes (the others stop after the last step).
    assert profiles["24gb"]["decoded_frames"] == [5, 32, 32, 3]
    assert "decoded_frames" not in profiles["80gb"]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.startswith("| profile | status | load s | s/step | peak alloc GiB")
    assert "| 24gb | ok |" in table and "| sequential | ok |" in table


@pytest.mark.slow
def test_budget_skips_profiles_and_says_so(tmp_path, weights_dir):
    done, results = run_check(tmp_path, weights_dir, "--budget-s", "1", "--profiles", "24gb,80gb")
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = [(r["profile"], r["status"]) for r in results["profiles"]]
    assert statuses == [("24gb", "skipped"), ("80gb", "skipped")]
    assert "budget" in results["profiles"][0]["reason"]


def test_weights_must_not_land_in_the_output(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "scripts/gpu_check.py",
        "--tiny",
        "--out",
        str(out),
        "--weights-dir",
        str(out / "w"),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--weights-dir must not be inside --out" in done.stderr
