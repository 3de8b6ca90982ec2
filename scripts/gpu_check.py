#!/usr/bin/env python3
"""GPU check of the memory profiles: full-size random weights -> the real loader -> 2 steps.

On a GPU machine without network access (no weights there), this writes full-size random weights
in the real folder layout (transformer 12.8B bf16 in 5 GB shards, the HunyuanVideo VAE; the text
encoders are small random stand-ins with the real output sizes, 4096 and 768, unless
--full-text-encoders), then for each memory profile: loads the folder through
`skyreels_local.engine.loader.load_engine(profile=...)`, runs `--steps` denoising steps (true CFG,
two transformer passes each) at 544x960x97 through `Engine.generate`, decodes once with the VAE
(in --decode-profile only) and records load seconds, seconds per step and peak VRAM.

Every section is wrapped so that a failure is recorded and the next one runs; results are written
to OUT/gpu_check.json after every section, so a run killed by a time limit still leaves data.
Profiles are skipped (and recorded as skipped) when the remaining --budget-s looks too short.

    PYTHONPATH=. python3 scripts/gpu_check.py --out $OUT             # on the GPU, from the repo root
    PYTHONPATH=. python3 scripts/gpu_check.py --tiny --out /tmp/gc   # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
# Fewer, growable allocations: a fairer peak-reserved figure across profiles (set before torch loads).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
GIB = 1024**3
DEFAULT_PROFILES = "24gb,80gb,48gb,sequential"  # the 24 GB one first: it has a target
# Real Llama-3-8B (llava-llama-3 text tower, vocab 128320) + CLIP-L in fp16, for the estimate of
# the peak with the real text encoders when stand-ins were used.
REAL_TEXT_ENCODERS_GIB = 14.21
REAL_LLAMA_EMBEDDING_GIB = 128320 * 4096 * 2 / GIB
REAL_LLAMA_LAYER_GIB = (4 * 4096 * 4096 * 0.625 + 3 * 4096 * 14336) * 2 / GIB  # GQA attention + MLP
TARGETS = {"24gb": "peak VRAM <= 18 GB at 544x960x97", "80gb": "loaded in < 60 s from local disk"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")), help="results folder"
    )
    p.add_argument("--weights-dir", type=Path, default=None, help="where to write the random weights "
                   "(default /tmp/skyreels-gpu-check-weights; never under --out: 27 GB must not come back)")  # fmt: skip
    p.add_argument("--profiles", default=DEFAULT_PROFILES, help="comma-separated, run in this order")
    p.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget for the whole script")
    p.add_argument("--height", type=int, default=544)
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--frames", type=int, default=97, help="4k+1; fewer frames run faster")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--preset", default="exact", help="speed preset each profile runs with (presets.py)")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="off",
        help="torch.compile for the preset (off by default: compile time is the bench's "
        "subject, and this check measures loading and memory)",
    )
    p.add_argument("--guidance", type=float, default=6.0, help="true CFG scale (>1: two passes per step)")
    p.add_argument(
        "--decode-profile", default="24gb", help="profile whose run also decodes with the VAE ('' = none)"
    )
    p.add_argument("--cold-load-profile", default="80gb",
                   help="evict the weights from the page cache before this profile's load ('' = none)")  # fmt: skip
    p.add_argument("--full-text-encoders", action="store_true", help="write full-size random Llama-8B/CLIP-L")
    p.add_argument("--rewrite-weights", action="store_true", help="rewrite even if a matching folder exists")
    p.add_argument("--depth", default=None, help="DUAL,SINGLE transformer blocks instead of 20,40 (a quicker "
                   "rehearsal at full width, e.g. on a CPU with a small --height/--width/--frames)")  # fmt: skip
    p.add_argument(
        "--tiny", action="store_true", help="tiny model, small video: a CPU smoke test of this script"
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.height, args.width, args.frames = 32, 32, 5
    if args.weights_dir is None:
        args.weights_dir = Path("/tmp") / (
            "skyreels-gpu-check-tiny" if args.tiny else "skyreels-gpu-check-weights"
        )
    return args


class Recorder:
    """Results as one JSON document, rewritten (atomically) after every section."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu_check.json"
        self.data: dict[str, Any] = {"sections": {}, "profiles": [], "notes": []}

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def section(self, name: str, **values: Any) -> None:
        self.data["sections"][name] = values
        print(
            f"[{time.perf_counter() - STARTED:6.1f}s] {name}: {json.dumps(values, default=str)}", flush=True
        )
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"note: {text}", flush=True)
        self.save()


def error_record(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}


# --- environment ---------------------------------------------------------------------------------


def environment(device) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except Exception as exc:  # absent, or built for another torch: not needed by the profiles
        env["torchao"] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        env |= {
            "gpu": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "total_gib": round(total / GIB, 1),
            "free_gib_at_start": round(free / GIB, 1),
            "cuda": torch.version.cuda,
        }
    env["host_ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    return env


# --- writing the random weights ------------------------------------------------------------------


def weights_signature(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tiny": args.tiny,
        "full_text_encoders": args.full_text_encoders,
        "depth": args.depth,
        "version": 1,
    }


def write_random_weights(args: argparse.Namespace, device) -> dict[str, Any]:
    """Full-size random weights in the real layout (or the tiny model with --tiny)."""
    import torch

    from skyreels_local.weights.synthetic import write_weights_folder

    folder: Path = args.weights_dir
    marker = folder / ".gpu_check_weights.json"
    if (
        not args.rewrite_weights
        and marker.is_file()
        and json.loads(marker.read_text()) == weights_signature(args)
    ):
        return {"reused": True, "bytes": folder_bytes(folder)}
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    components = build_tiny_weights() if args.tiny else build_full_weights(args, device)
    built = time.perf_counter()
    write_weights_folder(folder, components, max_shard_size="5GB")
    written = time.perf_counter()
    del components
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync_folder(folder)
    marker.write_text(json.dumps(weights_signature(args)))
    return {
        "reused": False,
        "bytes": folder_bytes(folder),
        "build_s": round(built - started, 1),
        "save_s": round(written - built, 1),
        "fsync_s": round(time.perf_counter() - written, 1),
        "text_encoders": "full size (random)"
        if args.full_text_encoders
        else "stand-ins: 2-layer Llama (hidden 4096), 2-layer CLIP (hidden 768), char-level tokenizers",
    }


def build_tiny_weights() -> dict[str, Any]:
    from skyreels_local.engine.tiny import build_tiny_components

    return build_tiny_components(seed=0)


def build_full_weights(args: argparse.Namespace, device) -> dict[str, Any]:
    """Built directly on the GPU (seconds, not minutes), small init so 60 blocks stay finite,
    then moved to host memory for saving."""
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from skyreels_local.engine.tiny import build_char_tokenizer
    from skyreels_local.weights.layout import SKYREELS_I2V_TRANSFORMER_CONFIG

    def build(factory, dtype):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                module = factory()
        finally:
            torch.set_default_dtype(previous)
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.normal_(0.0, 0.02)
        return module.to("cpu").eval()

    config = dict(SKYREELS_I2V_TRANSFORMER_CONFIG)
    if args.depth:
        config["num_layers"], config["num_single_layers"] = (int(x) for x in args.depth.split(","))
    torch.manual_seed(0)
    transformer = build(lambda: HunyuanVideoTransformer3DModel.from_config(config), torch.bfloat16)
    vae = build(
        lambda: AutoencoderKLHunyuanVideo(), torch.float16
    )  # the HunyuanVideo VAE config is the default
    tokenizer = build_char_tokenizer(model_max_length=512)
    tokenizer_2 = build_char_tokenizer(model_max_length=77)
    vocab = len(tokenizer)
    if args.full_text_encoders:
        llama_config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=vocab,
                                   max_position_embeddings=8192, pad_token_id=0)  # fmt: skip
        clip_layers, clip_mlp = 12, 3072
    else:
        llama_config = LlamaConfig(hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=vocab,
                                   max_position_embeddings=512, pad_token_id=0)  # fmt: skip
        clip_layers, clip_mlp = 2, 3072
    clip_config = CLIPTextConfig(hidden_size=768, intermediate_size=clip_mlp, num_hidden_layers=clip_layers,
                                 num_attention_heads=12, vocab_size=vocab, max_position_embeddings=77,
                                 projection_dim=768, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    llama = build(lambda: LlamaModel(llama_config), torch.float16)
    clip = build(lambda: CLIPTextModel(clip_config), torch.float16)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": llama,
        "text_encoder_2": clip,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
    }


def weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(folder))


def sync_folder(folder: Path) -> None:
    """Flush the written weights to disk, so that a later cold load reads from the disk."""
    for path in weight_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict_page_cache(folder: Path) -> dict[str, Any]:
    """Drop the weights from the page cache (no root needed for clean pages)."""
    before = cached_gib()
    for path in weight_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"page_cache_gib_before": before, "page_cache_gib_after": cached_gib()}


def cached_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Cached:"):
                return round(int(line.split()[1]) * 1024 / GIB, 1)
    except OSError:
        pass
    return None


# --- one profile ---------------------------------------------------------------------------------


def run_profile(name: str, args: argparse.Namespace, device, recorder: Recorder) -> dict[str, Any]:
    import torch
    from PIL import Image

    from skyreels_local.engine.loader import load_engine
    from skyreels_local.engine.request import GenerationRequest
    from skyreels_local.errors import GenerationCancelled

    cuda = device.type == "cuda"
    record: dict[str, Any] = {"profile": name, "status": "running"}
    started = time.perf_counter()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if name == args.cold_load_profile and not args.tiny:
        record["cold_load"] = evict_page_cache(args.weights_dir)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        record["free_gib_before"] = round(torch.cuda.mem_get_info(device)[0] / GIB, 1)

    t0 = time.perf_counter()
    from skyreels_local.engine.presets import PresetOptions

    options = PresetOptions(compile={"auto": None, "on": True, "off": False}[args.compile])
    engine = load_engine(
        str(args.weights_dir), device=str(device), profile=name, preset=args.preset, preset_options=options
    )
    record["engine_preset"] = engine.preset
    sync()
    record["load_s"] = round(time.perf_counter() - t0, 1)
    record["engine_profile"] = engine.profile
    if cuda:
        record["after_load_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
        record["load_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    recorder.save()

    decode = name == args.decode_profile
    marks: dict[str, Any] = {"steps": []}

    def first_forward(_module, _args, _kwargs) -> None:
        if "first_forward" not in marks:
            sync()
            marks["first_forward"] = time.perf_counter()

    handle = engine.pipe.transformer.register_forward_pre_hook(first_forward, with_kwargs=True)

    def on_progress(progress) -> None:
        sync()
        marks["steps"].append(time.perf_counter())

    def should_cancel() -> bool:
        # After the last step: cancelling skips the VAE decode (the engine raises from the callback).
        return not decode and len(marks["steps"]) >= args.steps

    image = Image.new("RGB", (args.width, args.height), (90, 120, 160))
    request = GenerationRequest(prompt="a lighthouse on a cliff at dusk, waves", image=image, seed=0,
                                guidance_scale=args.guidance, num_inference_steps=args.steps,
                                width=args.width, height=args.height, num_frames=args.frames)  # fmt: skip
    t1 = time.perf_counter()
    try:
        result = engine.generate(request, on_progress=on_progress, should_cancel=should_cancel)
        record["timings"] = {k: round(v, 2) for k, v in result.timings.items()}
        record["decoded_frames"] = list(result.frames.shape)
        record["frames_finite"] = True
    except GenerationCancelled:
        pass  # the planned stop after the last step
    finally:
        handle.remove()
    sync()
    record["generate_s"] = round(time.perf_counter() - t1, 1)
    steps = marks["steps"]
    if steps and "first_forward" in marks:
        times = [steps[0] - marks["first_forward"]] + [b - a for a, b in zip(steps, steps[1:], strict=False)]
        record["step_s"] = [round(t, 2) for t in times]
        # The first step pays one-off costs (cuDNN plans, first transfers): report the later ones.
        steady = times[1:] or times
        record["s_per_step"] = round(sorted(steady)[len(steady) // 2], 2)
    if cuda:
        record["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 2)
        record["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
    record["host_max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 1)
    profile = _profile(name)
    record["expected_peak_gib"] = profile.expected_peak_gib
    if not args.full_text_encoders and cuda:
        record["estimated_peak_gib_with_real_text_encoders"] = estimate_real_text_encoder_peak(
            profile, record
        )
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        record["left_allocated_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
    record["status"] = "ok"
    record["total_s"] = round(time.perf_counter() - started, 1)
    return record


def _profile(name: str):
    from skyreels_local.engine.profiles import load_profiles

    return load_profiles()[name]


def estimate_real_text_encoder_peak(profile, record: dict[str, Any]) -> float | None:
    """The measured peak plus what the real 8B text encoders would add where they sit on the GPU."""
    peak = record.get("peak_alloc_gib")
    if peak is None:
        return None
    placement = profile.text_encoders.placement
    resident_weights = record.get("after_load_gib", 0.0)
    if placement == "resident":
        return round(peak + REAL_TEXT_ENCODERS_GIB, 1)
    if placement == "offload":  # on the GPU alone with the resident weights while encoding
        return round(max(peak, resident_weights + REAL_TEXT_ENCODERS_GIB + 0.5), 1)
    if placement == "group-offload":  # the embedding table and a layer at a time
        return round(
            max(peak, resident_weights + REAL_LLAMA_EMBEDDING_GIB + 2 * REAL_LLAMA_LAYER_GIB + 0.5), 1
        )
    return round(peak + REAL_LLAMA_EMBEDDING_GIB, 1)  # sequential: layer by layer


# --- main ----------------------------------------------------------------------------------------


def print_table(recorder: Recorder) -> str:
    header = "| profile | status | load s | s/step | peak alloc GiB | peak reserved GB | est. peak w/ real TE GiB | expected GiB |"
    lines = [header, "|" + "---|" * 8]
    for r in recorder.data["profiles"]:
        cells = [r["profile"], r.get("status", ""), r.get("load_s", ""), r.get("s_per_step", ""),
                 r.get("peak_alloc_gib", ""), r.get("peak_reserved_gb", ""),
                 r.get("estimated_peak_gib_with_real_text_encoders", ""), r.get("expected_peak_gib", "")]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder(args.out)
    recorder.data["args"] = {k: str(v) for k, v in vars(args).items()}
    recorder.data["targets"] = TARGETS
    if args.weights_dir.resolve().is_relative_to(args.out.resolve()):
        print("error: --weights-dir must not be inside --out", file=sys.stderr)
        return 2
    try:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        recorder.section("env", **environment(device))
    except Exception as exc:
        recorder.section("env", **error_record(exc))
        return 1
    if device.type != "cuda":
        recorder.note("no CUDA device: peak VRAM is not measured")
    if not args.full_text_encoders:
        recorder.note("text encoders are small random stand-ins with the real output sizes (hidden 4096 / "
                      "pooled 768); their peak is estimated, not measured (estimated_peak_gib_with_real_text_encoders)")  # fmt: skip

    try:
        recorder.section("weights", **write_random_weights(args, device))
    except Exception as exc:
        recorder.section("weights", **error_record(exc))
        return 1

    durations: list[float] = []
    for name in [n.strip() for n in args.profiles.split(",") if n.strip()]:
        elapsed = time.perf_counter() - STARTED
        # The next profile probably takes as long as the longest so far (sequential: longer).
        expected = max(durations, default=5.0 if args.tiny else 75.0) * (1.5 if name == "sequential" else 1.0)
        if elapsed + expected > args.budget_s:
            recorder.data["profiles"].append(
                {
                    "profile": name,
                    "status": "skipped",
                    "reason": f"budget: {elapsed:.0f}s used, ~{expected:.0f}s "
                    f"needed, {args.budget_s:.0f}s allowed",
                }  # fmt: skip
            )
            recorder.save()
            continue
        started = time.perf_counter()
        try:
            record = run_profile(name, args, device, recorder)
        except Exception as exc:
            record = {"profile": name, "status": "failed", **error_record(exc)}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        durations.append(time.perf_counter() - started)
        recorder.data["profiles"].append(record)
        print(
            f"[{time.perf_counter() - STARTED:6.1f}s] profile {name}: {json.dumps(record, default=str)[:1500]}"
        )
        recorder.save()

    table = print_table(recorder)
    (args.out / "gpu_check.md").write_text(table + "\n")
    failed = [r["profile"] for r in recorder.data["profiles"] if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
