"""Issue "Fast path, round two": the one prepared GPU run (H100/H200), results under scripts/results/.

Installs nothing and reaches no network: bring the wheels along (diffusers, and whichever of
torchao, nvidia-cudnn-frontend, transformer-engine, flashinfer-python, sageattention==1.0.6,
flash-attn-4 should be measured; a missing one is recorded as unavailable, not an error).

Phases (each writes its file as soon as it ends, so a run killed at its limit keeps the rest):

* `check`     versions, the GPU, and which attention kernels can run here (check.json).
* `attention` one attention of SkyReels at 544x960x97 (51,037 tokens, 24 heads of 128) on the
              GPU: every installed kernel's output against bf16 SDPA and float32, its time and
              TFLOP/s, in two input regimes (diffuse and peaked, see attention_kernels.py); and
              each kernel's CPU-style emulation on the same inputs, so that the emulated
              estimate in the README can be checked against the real kernel (attention.json).
* `profile`   torch.profiler over one denoising step (after a warm-up step) of stock and of
              `exact`, at full size with random weights: the top kernels and their share of
              GPU time (profile.json, profile_<variant>.txt). The step is a one-step run, so
              it includes the first frame's VAE encode (~1% of it).
* `bench`     `python -m skyreels_local.bench` at full size with the full-size random Llama-3-8B
              and CLIP-L stand-ins resident (the 80gb profile's memory), 30-step end-to-end runs
              for stock, exact, fp8 and turbo with each step cache (bench.json, bench.txt).

Full run ~35-45 min on one H200 (stock alone is 30 x 13.6 s end to end). Where one command may
run 10 minutes, run the phases separately, e.g.
  python scripts/gpu_fastpath_round2.py --phases check,attention,profile
  python scripts/gpu_fastpath_round2.py --phases bench --bench-variants ref,stock,exact,fp8,decode,turbo --budget-s 560
  python scripts/gpu_fastpath_round2.py --phases bench --bench-variants e2e_stock --budget-s 560
(each bench call builds the model again; e2e rows compare to stock's only when run together).
`--tiny` runs every phase on a CPU with the tiny model in about a minute (what the tests run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("check", "attention", "profile", "bench")
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "torchao",
    "imageio-ffmpeg",
    "nvidia-cudnn-frontend",
    "transformer-engine",
    "flashinfer-python",
    "sageattention",
    "flash-attn-4",
    "flash-attn",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default scripts/results/<date>-<gpu>-fastpath2"
    )
    parser.add_argument("--tiny", action="store_true", help="every phase on the CPU with the tiny model")
    parser.add_argument("--budget-s", type=float, default=2400.0, help="the bench phase's wall-clock budget")
    parser.add_argument("--e2e-steps", type=int, default=30)
    parser.add_argument("--bench-variants", default=None, help="bench --variants (default: all)")
    parser.add_argument(
        "--text-encoder",
        default="random-full",
        choices=("random-full", "none"),
        help="bench --text-encoder: random-full keeps a 16 GB 8B stand-in resident (the 80gb row); on an "
        "80 GB GPU the float32 `ref` variant (52 GB) may not fit beside it: use none there",
    )
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from {','.join(PHASES)}")

    import torch

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.tiny:
        print("no CUDA GPU: run with --tiny for the CPU dry run", file=sys.stderr)
        return 2
    out = args.out or ROOT / "scripts" / "results" / f"{dt.date.today()}-{_gpu_slug(device)}-fastpath2"
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for phase in phases:
        started = time.perf_counter()
        print(f"[round2] {phase} ...", flush=True)
        try:
            globals()[f"phase_{phase}"](args, device, out)
            status[phase] = f"ok in {time.perf_counter() - started:.1f}s"
        except Exception as exc:  # record, go on: one phase must not lose the others
            status[phase] = f"failed after {time.perf_counter() - started:.1f}s: {type(exc).__name__}: {exc}"
            (out / f"{phase}_error.txt").write_text(traceback.format_exc())
        print(f"[round2] {phase}: {status[phase]}", flush=True)
        _write(out / "status.json", status)
        _release(device)  # the next phase (the bench: another process) needs the memory
    return 0 if all(s.startswith("ok") for s in status.values()) else 1


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gpu_slug(device) -> str:
    import torch

    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).lower().replace("nvidia ", "").split()[0]


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --- check -------------------------------------------------------------------------------------


def phase_check(args, device, out: Path) -> None:
    import torch

    from skyreels_local.engine.attention_kernels import KERNELS, kernel_status

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    record = {
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "capability": capability,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "versions": versions,
        "kernels": {
            name: kernel_status(spec, device_type=device.type, capability=capability) or "available"
            for name, spec in KERNELS.items()
        },
    }
    _write(out / "check.json", record)
    print(json.dumps(record["kernels"], indent=1))


# --- attention ---------------------------------------------------------------------------------


def phase_attention(args, device, out: Path) -> None:
    import torch

    from skyreels_local.engine import attention_kernels as ak
    from skyreels_local.engine.attention_kernels import relative_error

    tokens, rows, heads = (2048, 32, 2) if args.tiny else (51_037, 51_037, 24)
    regimes = {"diffuse": dict(logit_std=1.0, key_bias=0.0), "peaked": dict(logit_std=4.0, key_bias=2.0)}
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    flops = 4.0 * rows * tokens * 128 * heads
    record: dict = {
        "shape": {"tokens": tokens, "query_rows": rows, "heads": heads, "head_dim": 128},
        "regimes": {},
    }
    for regime, inputs in regimes.items():
        q, k, v = (
            t.to(device) for t in ak.real_shaped_inputs(query_rows=rows, tokens=tokens, heads=heads, **inputs)
        )
        with torch.inference_mode():
            exact32 = _sdpa(q.float(), k.float(), v.float())
            bf16 = _sdpa(q, k, v).float()
        results = {
            "sdpa-bf16": {
                "vs_float32": relative_error(bf16, exact32),
                **_timed(lambda q=q, k=k, v=v: _sdpa(q, k, v), device, flops),
            }
        }
        for name, spec in ak.KERNELS.items():
            entry: dict = {}
            reason = ak.kernel_status(spec, device_type=device.type, capability=capability)
            if reason is None:
                try:
                    kernel = spec.make()
                    with torch.inference_mode():
                        got = kernel(q, k, v).float()
                        entry.update(
                            vs_bf16=relative_error(got, bf16), vs_float32=relative_error(got, exact32)
                        )
                        entry.update(
                            _timed(lambda kernel=kernel, q=q, k=k, v=v: kernel(q, k, v), device, flops)
                        )
                except Exception as exc:
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            else:
                entry["unavailable"] = reason
            if spec.emulate is not None and name != "fa4":
                with torch.inference_mode():
                    emulated = spec.emulate(q, k, v).float()
                entry["emulated"] = {
                    "vs_bf16": relative_error(emulated, bf16),
                    "vs_float32": relative_error(emulated, exact32),
                }
            results[name] = entry
            print(f"[attention] {regime} {name}: {entry}", flush=True)
        record["regimes"][regime] = {"inputs": inputs, "results": results}
        _write(out / "attention.json", record)
        del q, k, v, exact32, bf16
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sdpa(q, k, v):
    import torch

    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    return out.transpose(1, 2)


def _timed(fn, device, flops: float, repeats: int = 5) -> dict:
    from skyreels_local.engine.attention import median_ms, synchronize

    fn()  # warm-up
    synchronize(device)
    seconds = median_ms(fn, device, repeats) / 1000.0
    return {"ms": round(1000 * seconds, 3), "tflops": round(flops / seconds / 1e12, 1)}


# --- profile -----------------------------------------------------------------------------------


def phase_profile(args, device, out: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from skyreels_local.bench import run as bench
    from skyreels_local.engine.attention import synchronize
    from skyreels_local.engine.denoise import denoise_latents, pipeline_kwargs
    from skyreels_local.engine.presets import apply_preset

    model = bench.TINY_MODEL if args.tiny else bench.FULL_MODEL
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    bargs = parser.parse_args(
        [
            "--model",
            model,
            "--device",
            str(device),
            "--out",
            str(out / "profile_bench.json"),
            "--text-encoder",
            "none",
        ]
    )
    b = bench.Bench(bargs)
    b.setup = b.build()
    pipe = b.setup.pipe
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    record = {}

    def stock_step():
        with torch.inference_mode():
            pipe(**pipeline_kwargs(b.job(steps=1)), output_type="latent")

    def exact_step():
        denoise_latents(pipe, b.job(steps=1))

    for name, step in (("stock", stock_step), ("exact", None)):
        if name == "exact":
            apply_preset(pipe, "exact", b.preset_options())
            step = exact_step
        step()  # warm-up (and compilation for exact)
        synchronize(device)
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        table = prof.key_averages().table(sort_by=sort_key, row_limit=25)
        (out / f"profile_{name}.txt").write_text(table + "\n")
        record[name] = _top_kernels(prof, device)
        _write(out / "profile.json", record)


def _top_kernels(prof, device, limit: int = 15) -> list[dict]:
    """The kernels (CUDA) or ops (CPU) with the most self time, and their share of the step."""
    events = prof.key_averages()
    if device.type == "cuda":
        rows = [(e.key, e.self_device_time_total) for e in events if e.self_device_time_total > 0]
    else:
        rows = [(e.key, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    total = sum(t for _, t in rows) or 1.0
    rows.sort(key=lambda r: r[1], reverse=True)
    return [
        {"name": n[:120], "ms": round(t / 1000, 3), "share": round(t / total, 4)} for n, t in rows[:limit]
    ]


# --- bench -------------------------------------------------------------------------------------


def phase_bench(args, device, out: Path) -> None:
    command = [sys.executable, "-m", "skyreels_local.bench", "--out", str(out / "bench.json")]
    command += ["--budget-s", str(args.budget_s), "--e2e-steps", str(args.e2e_steps)]
    if args.tiny:
        command += ["--model", "tiny-random", "--device", "cpu", "--e2e-steps", str(min(args.e2e_steps, 4))]
    else:
        command += ["--model", "random-full", "--text-encoder", args.text_encoder]
    if args.bench_variants:
        command += ["--variants", args.bench_variants]
    kernel = best_8bit_kernel(out / "attention.json")
    if kernel is not None:
        command += ["--fp8-attention", kernel]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    print("[bench] " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"bench exited {result.returncode} (see bench.json for what it measured)")


def best_8bit_kernel(path: Path, bound: float = 0.1) -> str | None:
    """The fastest 8-bit kernel the attention phase ran within `bound` of bf16 (diffuse
    regime, the probe's), and faster than bf16 SDPA; None without one (fp8 keeps auto)."""
    if not path.exists():
        return None
    from skyreels_local.engine.attention_kernels import APPROXIMATE_KERNELS

    results = json.loads(path.read_text())["regimes"]["diffuse"]["results"]
    sdpa_ms = results.get("sdpa-bf16", {}).get("ms", float("inf"))
    good = {
        name: r["ms"]
        for name, r in results.items()
        if name in APPROXIMATE_KERNELS and "ms" in r and r.get("vs_bf16", 1.0) <= bound and r["ms"] < sdpa_ms
    }
    return min(good, key=good.get) if good else None


if __name__ == "__main__":
    raise SystemExit(main())
