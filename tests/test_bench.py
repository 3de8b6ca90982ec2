"""`skyreels-local bench`: the tiny-random run on CPU, its accounting, budget and output files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from skyreels_local.bench import run as bench
from skyreels_local.bench.report import bf16_floor_s, breakeven_reuse, transformer_flops
from skyreels_local.bench.run import FULL_TRANSFORMER
from skyreels_local.cli import build_parser


def test_flop_accounting_matches_performance_md():
    # 544x960x97: 51,000 video tokens + 256 text tokens (PERFORMANCE.md's own count).
    linear, attention = transformer_flops(FULL_TRANSFORMER, 51_000, 256)
    assert linear == pytest.approx(0.70e15, rel=0.01)
    assert attention == pytest.approx(1.94e15, rel=0.01)
    # Two forwards per step at the bf16 floor: ~7.7 s on an H100/H200.
    assert 2 * bf16_floor_s(linear, attention) == pytest.approx(7.7, abs=0.05)


def test_breakeven_reuse_fraction():
    # 30 steps of 10 s, reused steps 1 s, 10 s decode: 310 s -> 100 s needs (310 - 100) / 270.
    assert breakeven_reuse(10.0, 1.0, 10.0, 100.0, 30) == pytest.approx(210 / 270)
    assert breakeven_reuse(10.0, 1.0, 10.0, 20.0, 30) is None  # even reusing everything is too slow
    assert breakeven_reuse(10.0, 1.0, 10.0, 400.0, 30) == 0.0
    assert breakeven_reuse(1.0, 1.0, 0.0, 10.0, 30) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    assert (
        bench.main(["--model", "tiny-random", "--device", "cpu", "--out", str(out), "--budget-s", "600"]) == 0
    )
    return out, json.loads(out.read_text())


def test_tiny_bench_runs_every_variant_and_writes_json_and_table(tiny_run):
    out, data = tiny_run
    v = data["variants"]
    assert list(v) == list(bench.VARIANTS)
    assert data["config"]["model"] == "tiny-random" and data["config"]["text_lens"] == [64, 32]
    assert data["env"]["torch"] and data["env"]["diffusers"]
    for name in ("stock", "exact"):
        assert v[name]["step_median_s"] > 0 and len(v[name]["step_s"]) == 2
        assert v[name]["tflops"] > 0 and v[name]["finite"] is True
        assert "error" not in v[name]
    # Exact is the same math as stock: float rounding apart, equal.
    assert v["exact"]["rel_err_vs_stock"] < 1e-5
    assert v["exact"]["preset"]["mask_free"] is True
    # The reference runs in float64 for this float32 model; both sit at float32 rounding from it.
    assert data["config"]["ref_dtype"] == "torch.float64"
    assert 0 < v["ref"]["stock_rel_err_vs_ref"] < 1e-4 and v["exact"]["rel_err_vs_ref"] < 1e-4
    assert data["summary"]["exact_error_ratio"]["value"] <= 1.1
    # Turbo: a computed and a reused step cost, and the (labelled) random-weights reuse.
    assert v["turbo"]["computed_step_s"] > 0 and v["turbo"]["reused_step_s"] > 0
    assert v["turbo"]["base"] == "exact"  # fp8 did not run on the CPU
    assert 0 <= v["turbo"]["random_weights_reuse_fraction"] <= 1
    assert "says nothing about real videos" in v["turbo"]["note"]
    assert "CUDA" in v["fp8"]["skipped"]
    assert v["decode"]["shape"] == [1, 9, 32, 64, 3] and v["decode_default"]["seconds"] > 0
    turbo = data["summary"]["turbo_e2e"]
    assert set(turbo["by_reuse_fraction"]) == {"0.0", "0.3", "0.5", "0.6", "0.7"}
    table = out.with_suffix(".txt").read_text()
    assert table.splitlines()[0].split()[:3] == ["variant", "s/step", "x"]
    assert all(name in table for name in bench.VARIANTS)


def test_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "b.json"
    bench.main(
        [
            "--model",
            "tiny-random",
            "--device",
            "cpu",
            "--variants",
            "stock,exact",
            "--budget-s",
            "0",
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"stock", "exact"}
    assert all(rec["skipped"].startswith("budget") for rec in data["variants"].values())


def test_a_failing_variant_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "b.json"
    # Turbo needs a fast base (exact or fp8) before it: alone, it fails, and decode still runs.
    bench.main(
        ["--model", "tiny-random", "--device", "cpu", "--variants", "stock,turbo,decode", "--out", str(out)]
    )
    v = json.loads(out.read_text())["variants"]
    assert "run the exact (or fp8) variant first" in v["turbo"]["error"] and "traceback" in v["turbo"]
    assert v["stock"]["step_median_s"] > 0 and v["decode"]["seconds"] > 0


def test_arguments_are_validated():
    with pytest.raises(SystemExit):
        bench.main(["--variants", "stock,warp"])
    args = build_parser().parse_args(["bench", "--model", "tiny-random", "--variants", "exact,stock"])
    assert args.variants == ["stock", "exact"]  # always run in the fixed order
    assert args.func is bench.run


def test_bench_entry_point_needs_neither_the_server_nor_its_settings(tmp_path):
    """The GPU machine has torch and diffusers but no fastapi/pydantic: the module must not import them."""
    code = (
        "import sys\n"
        "from skyreels_local.bench import run as bench\n"
        "assert 'torch' not in sys.modules, 'registering the CLI must not load torch'\n"
        f"bench.main(['--model', 'tiny-random', '--device', 'cpu', '--variants', 'stock', '--out', r'{tmp_path / 'x.json'}'])\n"
        "bad = [m for m in ('skyreels_local.config', 'pydantic_settings', 'fastapi', 'uvicorn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_a_failing_dynamic_compile_falls_back_to_static_shapes(tmp_path, monkeypatch):
    """The GPU run is one shot: a compile failure must still leave exact measured."""
    import torch

    real_compile = torch.compile

    def fake_compile(fn, *, dynamic=None, backend=None, **kwargs):
        if dynamic:

            def broken(*args, **kw):
                raise RuntimeError("simulated dynamic-shape compile failure")

            broken._torchdynamo_orig_callable = fn
            return broken
        return real_compile(fn, dynamic=dynamic, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "b.json"
    bench.main(
        [
            "--model",
            "tiny-random",
            "--device",
            "cpu",
            "--variants",
            "stock,exact",
            "--compile",
            "on",
            "--out",
            str(out),
        ]
    )
    exact = json.loads(out.read_text())["variants"]["exact"]
    assert "simulated dynamic-shape compile failure" in exact["compile_error"]
    assert exact["compiled_as"] == "static shapes" and exact["preset"]["compiled"] is True
    assert exact["step_median_s"] > 0 and exact["rel_err_vs_stock"] < 1e-5


def test_a_tight_budget_times_fewer_steps_before_skipping(tmp_path, monkeypatch):
    # Every variant "costs" 10 s per timed step: two variants at 2 steps need 40 s, at 1 step 20 s.
    monkeypatch.setattr(bench.Bench, "estimate", lambda self, name: 10.0 * self.timed)
    out = tmp_path / "b.json"
    argv = ["--model", "tiny-random", "--device", "cpu", "--variants", "stock,exact", "--timed-steps", "2"]
    bench.main([*argv, "--budget-s", "35", "--out", str(out)])
    v = json.loads(out.read_text())["variants"]
    assert v["stock"]["timed_steps"] == 1 and len(v["stock"]["step_s"]) == 1
    assert v["exact"]["timed_steps"] == 2  # alone, it fits with both timed steps
