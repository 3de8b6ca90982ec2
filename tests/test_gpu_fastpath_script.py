"""scripts/gpu_fastpath_round2.py, the one prepared GPU run: its CPU dry run (--tiny) runs every
phase and writes every result file; the GPU-only parts say they are unavailable here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_fastpath_round2.py"

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("round2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def _load(path: Path):
    return json.loads(path.read_text())


def test_every_phase_ran_and_wrote_its_files(dry_run):
    status = _load(dry_run / "status.json")
    assert list(status) == ["check", "attention", "profile", "bench"]
    assert all(value.startswith("ok") for value in status.values()), status
    for name in ("check.json", "attention.json", "profile.json", "profile_stock.txt", "profile_exact.txt"):
        assert (dry_run / name).stat().st_size > 0, name
    assert (dry_run / "bench.txt").read_text().count("per preset") == 1


def test_check_lists_every_kernel_with_its_reason(dry_run):
    check = _load(dry_run / "check.json")
    assert set(check["kernels"]) == {"fa4", "cudnn-fp8", "te-fp8", "flashinfer-fp8", "sage1"}
    assert all("needs a CUDA GPU" in reason for reason in check["kernels"].values())
    assert check["versions"]["torch"] and check["versions"]["diffusers"]


def test_attention_phase_has_both_regimes_and_the_emulated_estimates(dry_run):
    attention = _load(dry_run / "attention.json")
    for regime in ("diffuse", "peaked"):
        results = attention["regimes"][regime]["results"]
        assert results["sdpa-bf16"]["vs_float32"] < 5e-3 and results["sdpa-bf16"]["ms"] > 0
        for name in ("cudnn-fp8", "te-fp8", "flashinfer-fp8", "sage1"):
            assert "needs a CUDA GPU" in results[name]["unavailable"]
            assert 0 < results[name]["emulated"]["vs_bf16"] < 0.5
        assert "emulated" not in results["fa4"]


def test_profile_phase_ranks_the_top_ops_of_one_step(dry_run):
    profile = _load(dry_run / "profile.json")
    for variant in ("stock", "exact"):
        top = profile[variant]
        assert 5 <= len(top) <= 15
        shares = [row["share"] for row in top]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert any("attention" in row["name"] for row in profile["exact"])


def test_bench_phase_measured_the_e2e_rows(dry_run):
    bench = _load(dry_run / "bench.json")
    v = bench["variants"]
    assert bench["config"]["e2e_steps"] == 4
    for name in ("e2e_stock", "e2e_exact", "e2e_turbo_taylorseer", "e2e_turbo_magcache"):
        assert v[name]["e2e_s"] > 0, name


def test_unknown_phase_is_refused():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--phases", "warp"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown ['warp']" in result.stderr


def test_bench_phase_takes_the_fastest_8bit_kernel_within_the_bound(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_fastpath_round2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = {
        "sdpa-bf16": {"ms": 100.0, "vs_float32": 2e-3},
        "fa4": {"ms": 20.0, "vs_bf16": 1e-3},  # exact: not a candidate for fp8 attention
        "cudnn-fp8": {"ms": 50.0, "vs_bf16": 0.06},
        "te-fp8": {"ms": 40.0, "vs_bf16": 0.15},  # fastest, but beyond the bound
        "flashinfer-fp8": {"error": "RuntimeError: no kernel image"},
        "sage1": {"ms": 120.0, "vs_bf16": 0.01},  # within the bound, slower than bf16
    }
    path = tmp_path / "attention.json"
    path.write_text(json.dumps({"regimes": {"diffuse": {"results": results}}}))
    assert module.best_8bit_kernel(path) == "cudnn-fp8"
    results["cudnn-fp8"]["vs_bf16"] = 0.2
    path.write_text(json.dumps({"regimes": {"diffuse": {"results": results}}}))
    assert module.best_8bit_kernel(path) is None
    assert module.best_8bit_kernel(tmp_path / "missing.json") is None
