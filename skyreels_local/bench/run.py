"""`skyreels-local bench`: stock diffusers against each speed preset, in one process, one device.

Method (shared/PERFORMANCE.md, shared/gpu/anchor_bench.py): SkyReels V1's transformer at full
size with random bf16 weights built directly on the GPU (std 0.02, so that activations stay
finite through 60 blocks; random weights time exactly like real ones), the real fp16 VAE shape,
and text embeddings of given real lengths padded to 256 as the text encoder returns them. Every
variant denoises the same inputs (image, initial noise, embeddings, seed) with true CFG (two
forwards per step):

* `ref`    the same CFG step on a short clip in float32 (float64 for a float32 model), the
           accuracy yardstick: "exact" must be no further from it than stock bf16 is.
* `stock`  `HunyuanSkyreelsImageToVideoPipeline.__call__` as shipped (padded text + mask).
* `exact`  our loop, mask-free attention on the best exact kernel, regional torch.compile.
* `fp8`    torchao fp8 matmuls for the video-stream linears (+ 8-bit attention if installed).
* `decode` the VAE decode of the final latents, tiles sized to free memory (what our presets do).
* `turbo`  First Block Cache on the fastest base reached (fp8 when it ran, else exact), as the
           preset does: the cost of a computed and of a reused step, and the reuse fraction at
           the configured threshold over a full 30-step schedule of a one-frame clip. With random
           weights the reuse fraction says nothing about real videos; the end-to-end estimate is
           a function of it and is labelled so.
* `decode_default` the same decode with diffusers' default 256 px tiles (what stock does).
* `e2e_*`  one whole video (bench/e2e.py): encode + `--e2e-steps` steps (30) + decode + MP4, for
           stock (pipeline call, default tiles), exact, fp8, and turbo with each step cache of
           `--step-caches` on the fastest base reached. Each runs right after its preset is
           applied (presets change the model in place: exact before fp8 quantizes it). The
           schedule-based caches (taylorseer, magcache) reuse the same steps on random and real
           weights, so their end-to-end time is a real measurement; fbcache's reuse on random
           weights is ~none and says nothing about real videos.

Per variant: median seconds per step (after one warm-up step that includes compilation),
effective TFLOP/s (useful FLOPs as PERFORMANCE.md counts them: 2 x 12 D^2 per token per block for
the linears, 4 N^2 D per block for attention, real tokens only), % of the bf16 floor, peak
memory, relative error of the final latents against stock and of the short-clip step against
the float32 reference. Results go to `--out` (JSON) after every variant, so that a run killed at
its time limit keeps what it measured; a variant that would not fit the remaining `--budget-s`
is skipped, and one that fails records its error.

At the top this module imports only the standard library and bench_report.py (likewise), so
that the CLI registers its arguments without loading torch; it never imports the server or its
settings, so that `python3 -m skyreels_local.bench` runs on a bare GPU machine with
torch, diffusers and transformers (and torchao for fp8).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from ..params import DEFAULT_GUIDANCE_SCALE, SKYREELS_GEOMETRY, cfg_enabled
from ..preset_names import STEP_CACHES
from ..weights.layout import SKYREELS_I2V_TRANSFORMER_CONFIG
from .e2e import TEXT_ENCODERS
from .report import (
    SCHEDULE_STEPS,
    Results,
    bf16_floor_s,
    format_table,
    json_default,
    significant,
    step_flops,
)

# Run in this order: the step-time targets first, then the decode (it completes the end-to-end
# estimates), then turbo on the fastest base reached, and the stock decode for comparison last.
VARIANTS = (
    "ref",
    "stock",
    "e2e_stock",
    "exact",
    "e2e_exact",
    "fp8",
    "e2e_fp8",
    "decode",
    "turbo",
    *(f"e2e_turbo_{option}" for option in STEP_CACHES),
    "decode_default",
)
DEFAULT_VARIANTS = VARIANTS
FULL_MODEL, TINY_MODEL = "random-full", "tiny-random"

# SkyReels V1 I2V transformer (HunyuanVideo, 32 input channels: noise + image latents).
FULL_TRANSFORMER = SKYREELS_I2V_TRANSFORMER_CONFIG  # the real model's config.json
FULL_TEXT = dict(max_len=256, dim=4096, pooled_dim=768)

# Budget guesses before anything is measured (seconds); replaced by measurements as they come.
COMPILE_GUESS_S, DECODE_GUESS_S = 90.0, 15.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=FULL_MODEL,
        choices=tuple(MODELS),
        help=f"`{FULL_MODEL}`: SkyReels-size random weights built on the GPU; "
        f"`{TINY_MODEL}`: the built-in tiny model (CPU, for CI)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        type=_variant_list,
        help=f"comma-separated subset of {','.join(VARIANTS)}, run in that order",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=280.0,
        help="wall-clock budget; variants that would not fit are skipped",
    )
    p.add_argument(
        "--timed-steps", type=int, default=2, help="timed steps per variant, after one warm-up step"
    )
    p.add_argument("--height", type=int, default=None, help="default 544 (tiny: 32)")
    p.add_argument("--width", type=int, default=None, help="default 960 (tiny: 64)")
    p.add_argument("--frames", type=int, default=None, help="default 97 (tiny: 9)")
    p.add_argument("--ref-frames", type=int, default=9, help="frames of the short clip for the float32 check")
    p.add_argument(
        "--text-len", default="64,32", help="real token counts of the prompt and the negative prompt"
    )
    p.add_argument("--cfg", type=float, default=DEFAULT_GUIDANCE_SCALE, help="true CFG scale")
    p.add_argument("--attention", default="auto", help="attention backend for the presets, or auto (probe)")
    p.add_argument(
        "--fp8-attention",
        default="auto",
        help="attention for the fp8 variant (and turbo on it): auto, a backend, or an 8-bit kernel "
        "(cudnn-fp8, te-fp8, flashinfer-fp8, sage1)",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="regional torch.compile (auto: on CUDA)",
    )
    p.add_argument("--compile-dynamic", default="on", choices=("on", "off"), help="one graph for all shapes")
    p.add_argument(
        "--compile-cache-dir", default=None, help="inductor cache dir (TORCHINDUCTOR_CACHE_DIR wins)"
    )
    p.add_argument("--cache-threshold", type=float, default=None, help="turbo's First Block Cache threshold")
    p.add_argument(
        "--e2e-steps",
        type=int,
        default=SCHEDULE_STEPS,
        help="steps of the end-to-end runs (e2e_* variants: encode + steps + decode + MP4)",
    )
    p.add_argument(
        "--step-caches",
        default=",".join(STEP_CACHES),
        type=_step_cache_list,
        help=f"turbo's step caches timed end to end (e2e_turbo_*), from {','.join(STEP_CACHES)}",
    )
    p.add_argument(
        "--text-encoder",
        default="auto",
        choices=TEXT_ENCODERS,
        help="text encoders timed in the e2e runs: auto (the model's own; none for random-full), none, "
        "or random-full (Llama-3-8B- and CLIP-L-shaped random stand-ins, resident as in the 80gb profile)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (same for every preset)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench.json"),
        help="JSON results (a .txt table is written beside it)",
    )


def _names_from(flag: str, choices: tuple[str, ...]):
    """An argparse type: a comma-separated subset of `choices`, returned in their order."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"{flag} must be names from {','.join(choices)}, got {text!r}")
        return [n for n in choices if n in names]

    return parse


_step_cache_list = _names_from("--step-caches", STEP_CACHES)
_variant_list = _names_from("--variants", VARIANTS)


# --- the run ------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything the variants share: the pipeline and the inputs."""

    pipe: Any
    device: Any
    dtype: Any
    ref_dtype: Any
    config: dict[str, Any]
    height: int
    width: int
    frames: int
    ref_frames: int
    cfg: float
    image: Any
    latents: Any  # initial noise, float32
    positive: Any  # PromptEmbeds, padded as the text encoder returns them
    negative: Any
    seed: int
    video_tokens: int
    short_video_tokens: int
    text_lens: tuple[int, int]
    short_inputs: dict[str, Any]
    stock_latents: Any = None
    exact_latents: Any = None
    exact_short_pred: Any = None
    ref_short_pred: Any = None
    text_encoder: Any = None  # something with .encode(text), timed in the e2e runs (e2e.py)
    stock_e2e_latents: Any = None
    exact_e2e_latents: Any = None


class Bench:
    def __init__(self, args: argparse.Namespace, *, started: float | None = None) -> None:
        # The budget counts from `started` (main's start), so that importing torch counts too.
        self.started = time.perf_counter() if started is None else started
        import torch

        self.args = args
        self.torch = torch
        self.results = Results(args.out)
        self.timed = args.timed_steps  # timed steps for the variant being run (budget may lower it)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # -- helpers --
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        """CUDA: the variant's peak allocated memory. CPU: the process's resident-set high-water
        mark so far (Linux; monotonic over the run, not per variant)."""
        if self.device.type != "cuda":
            try:
                import resource

                return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB
            except (ImportError, OSError):
                return None
        return round(self.torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    def rel_err(self, a: Any, b: Any) -> float:
        a64, b64 = a.detach().double(), b.detach().double()
        return float((a64 - b64).norm() / b64.norm())

    def flops_record(self, seconds: float | None) -> dict[str, Any]:
        s = self.setup
        linear, attention = step_flops(
            s.config, s.video_tokens, s.text_lens if cfg_enabled(s.cfg) else s.text_lens[:1]
        )
        rec: dict[str, Any] = {"step_tflop": significant((linear + attention) / 1e12)}
        if seconds:
            rec["tflops"] = significant((linear + attention) / seconds / 1e12)
            if self.device.type == "cuda":
                rec["pct_bf16_floor"] = round(100.0 * bf16_floor_s(linear, attention) / seconds, 1)
                rec["bf16_floor_s"] = round(bf16_floor_s(linear, attention), 3)
        return rec

    # -- driver --
    def run(self) -> Results:
        args = self.args
        self.results.data["env"] = self.environment()
        self.results.save()
        self.setup = self.build()
        self.results.save()
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "ref": self.run_ref,
            "stock": self.run_stock,
            "exact": self.run_exact,
            "turbo": self.run_turbo,
            "fp8": self.run_fp8,
            "decode": self.run_decode,
            "decode_default": self.run_decode_default,
            "e2e_stock": self.run_e2e_stock,
            "e2e_exact": lambda: self.run_e2e_preset("exact"),
            "e2e_fp8": lambda: self.run_e2e_preset("fp8"),
            **{f"e2e_turbo_{option}": partial(self.run_e2e_turbo, option) for option in STEP_CACHES},
        }
        variants = [name for name in args.variants if self.wanted(name)]
        for position, name in enumerate(variants):
            remaining = args.budget_s - self.elapsed()
            # Fewer timed steps (down to one) when all the variants still to run would not fit.
            self.timed = args.timed_steps
            later = variants[position:]
            while self.timed > 1 and sum(self.estimate(n) for n in later) > remaining:
                self.timed -= 1
            estimate = self.estimate(name)
            if estimate > remaining:
                self.results.variants[name] = {
                    "skipped": f"budget: needs ~{estimate:.0f}s, {max(0.0, remaining):.0f}s left"
                }
                self.results.save()
                print(f"[bench] {name}: skipped ({self.results.variants[name]['skipped']})", flush=True)
                continue
            print(f"[bench] {name}: running (~{estimate:.0f}s estimated, {remaining:.0f}s left)", flush=True)
            # Marked before it starts: a run killed at its time limit shows what it was doing.
            self.results.variants[name] = {
                "running_since_s": round(self.elapsed(), 1),
                "estimate_s": round(estimate),
                "timed_steps": self.timed,
            }
            self.results.save()
            started = time.perf_counter()
            self.reset_peak()
            try:
                record = runners[name]()
            except Exception as exc:  # record and go on: one failure must not lose the others
                record = {
                    "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                    "traceback": traceback.format_exc()[-2000:],
                }
                if self.device.type == "cuda":
                    self.torch.cuda.empty_cache()
            record["wall_s"] = round(time.perf_counter() - started, 2)
            record.setdefault("timed_steps", self.timed)
            record.setdefault("peak_gib", self.peak_gib())
            self.results.variants[name] = record
            self.results.save()
            print(
                f"[bench] {name}: {json.dumps({k: v for k, v in record.items() if k != 'traceback'}, default=json_default)}",
                flush=True,
            )
        self.results.data["env"]["total_wall_s"] = round(self.elapsed(), 1)
        self.results.save()
        return self.results

    def wanted(self, name: str) -> bool:
        """e2e variants only with --e2e-steps > 0, turbo's only for the caches in --step-caches."""
        if not name.startswith("e2e_"):
            return True
        if self.args.e2e_steps <= 0:
            return False
        return not name.startswith("e2e_turbo_") or name.removeprefix("e2e_turbo_") in self.args.step_caches

    def environment(self) -> dict[str, Any]:
        torch = self.torch
        env: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": str(self.device),
            "argv": sys.argv[1:],
        }
        for package in (
            "diffusers",
            "transformers",
            "accelerate",
            "torchao",
            "flash_attn",
            "sageattention",
            "xformers",
        ):
            try:
                env[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                env[package] = None
        if self.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(self.device)
            env["capability"] = list(torch.cuda.get_device_capability(self.device))
            env["gpu_memory_gib"] = round(
                torch.cuda.get_device_properties(self.device).total_memory / 2**30, 1
            )
            env["cudnn"] = torch.backends.cudnn.version()
        return env

    def build(self) -> Setup:
        import numpy as np
        import torch
        from PIL import Image

        from ..engine.prompts import PromptEmbeds

        args = self.args
        started = time.perf_counter()
        recipe = MODELS[args.model]
        if recipe.needs_cuda and self.device.type != "cuda":
            raise SystemExit(f"--model {args.model} needs a CUDA GPU; use --model {TINY_MODEL} on a CPU")
        pipe = recipe.build(self.device)
        width, height, frames = recipe.size
        text = recipe.text
        pipe.set_progress_bar_config(disable=True)
        pipe.set_progress_bar_config(disable=True)
        height, width, frames = args.height or height, args.width or width, args.frames or frames
        dtype = pipe.transformer.dtype
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        config = dict(pipe.transformer.config)
        text_lens = tuple(int(x) for x in args.text_len.split(","))
        if len(text_lens) != 2 or not all(0 < n <= text["max_len"] for n in text_lens):
            raise SystemExit(
                f"--text-len must be two counts from 1 to {text['max_len']}, got {args.text_len!r}"
            )

        g = torch.Generator("cpu").manual_seed(args.seed)

        def embeds(length: int) -> PromptEmbeds:
            mask = torch.zeros(1, text["max_len"])
            mask[:, :length] = 1
            return PromptEmbeds(
                torch.randn(1, text["max_len"], text["dim"], generator=g).to(self.device, dtype),
                torch.randn(1, text["pooled_dim"], generator=g).to(self.device, dtype),
                mask.to(self.device, dtype),
            )

        positive, negative = embeds(text_lens[0]), embeds(text_lens[1])
        # A smooth colour gradient: a plausible image for the VAE to encode.
        yy, xx = np.mgrid[0:height, 0:width]
        rgb = np.stack([xx / max(1, width - 1), yy / max(1, height - 1), 0.5 + 0 * xx], axis=-1)
        image = Image.fromarray((rgb * 255).astype(np.uint8))
        vae_ok = image_latents_finite(pipe, image, height, width)
        if not vae_ok:  # random VAE weights blew up: shrink them so the inputs stay finite
            shrink_vae(pipe.vae)
        vae_t, vae_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        channels = config["in_channels"] // 2
        latent_shape = (1, channels, (frames - 1) // vae_t + 1, height // vae_s, width // vae_s)
        latents = torch.randn(latent_shape, generator=g).to(self.device)
        patch, patch_t = config["patch_size"], config["patch_size_t"]
        video_tokens = (latent_shape[2] // patch_t) * (latent_shape[3] // patch) * (latent_shape[4] // patch)
        short_t = (args.ref_frames - 1) // vae_t + 1
        short_inputs = {
            "latent_model_input": torch.randn(
                1, config["in_channels"], short_t, height // vae_s, width // vae_s, generator=g
            ).to(self.device, dtype),
            "timestep": torch.tensor([900.0], device=self.device),
            "guidance": torch.tensor([1000.0], device=self.device, dtype=dtype),
        }
        text_encoder = self.build_text_encoder(pipe)
        self.sync()
        self.results.data["config"] = {
            "model": args.model,
            "height": height,
            "width": width,
            "frames": frames,
            "latent_shape": list(latent_shape),
            "video_tokens": video_tokens,
            "text_lens": list(text_lens),
            "padded_text_len": text["max_len"],
            "cfg": args.cfg,
            "timed_steps_requested": args.timed_steps,
            "ref_frames": args.ref_frames,
            "dtype": str(dtype),
            "ref_dtype": str(ref_dtype),
            "params_b": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 3),
            "vae_weights_shrunk": not vae_ok,
            "image_latents_finite": vae_ok or image_latents_finite(pipe, image, height, width),
            "build_s": round(time.perf_counter() - started, 1),
            "e2e_steps": args.e2e_steps,
            "text_encoder": args.text_encoder,
            "text_encoder_params_b": None
            if text_encoder is None or not hasattr(text_encoder, "parameters_b")
            else round(text_encoder.parameters_b(), 2),
            "peak_memory": "torch.cuda.max_memory_allocated per variant"
            if self.device.type == "cuda"
            else "process max RSS so far (CPU)",
        }
        return Setup(
            pipe=pipe,
            device=self.device,
            dtype=dtype,
            ref_dtype=ref_dtype,
            config=config,
            height=height,
            width=width,
            frames=frames,
            ref_frames=args.ref_frames,
            cfg=args.cfg,
            image=image,
            latents=latents,
            positive=positive,
            negative=negative,
            seed=args.seed,
            video_tokens=video_tokens,
            short_video_tokens=(short_t // patch_t) * (latent_shape[3] // patch) * (latent_shape[4] // patch),
            text_lens=text_lens,
            short_inputs=short_inputs,
            text_encoder=text_encoder,
        )

    def build_text_encoder(self, pipe: Any) -> Any:
        from .e2e import build_text_encoder_stand_in, pipeline_prompt_encoder

        choice = self.args.text_encoder
        if choice == "none":
            return None
        if choice == "random-full":
            if self.device.type != "cuda":
                raise SystemExit("--text-encoder random-full builds 7.5 B parameters: it needs a CUDA GPU")
            return build_text_encoder_stand_in(self.device)
        return pipeline_prompt_encoder(pipe)

    # -- estimates --
    def estimate(self, name: str) -> float:
        """Seconds a variant should take, from what has been measured so far."""
        s = self.setup
        steps = 1 + self.timed
        linear, attention = step_flops(s.config, s.video_tokens, s.text_lens)
        if self.device.type == "cuda":
            guess = 1.75 * bf16_floor_s(linear, attention)  # stock measured 13.34 s vs a 7.7 s floor
        else:
            guess = (linear + attention) / 50e9  # a slow CPU: ~50 GFLOP/s
        stock = self.step_s("stock") or guess
        exact = self.step_s("exact") or 0.8 * stock
        base = min(x for x in (exact, self.step_s("fp8")) if x)
        compile_s = COMPILE_GUESS_S if self.compiles() else 0.0
        exact_warm = self.results.variants.get("exact", {}).get("first_step_s")
        short = self.flops_share(s.short_video_tokens)
        latent_frames = (s.frames - 1) // s.pipe.vae_scale_factor_temporal + 1
        frame = self.flops_share(s.video_tokens // latent_frames)  # turbo's one-frame clip
        decode = self.results.variants.get("decode", {}).get("seconds")
        if decode is None:
            decode = (
                DECODE_GUESS_S * s.height * s.width * s.frames / (544 * 960 * 97)
                if self.device.type == "cuda"
                else 1.0
            )
        return {
            "ref": 4 * short * stock + (10.0 if self.device.type == "cuda" else 1.0),
            "stock": steps * stock + 2.0,
            "exact": compile_s + steps * exact + short * stock + 2.0,
            "turbo": base + (steps - 1) * 0.1 * base + SCHEDULE_STEPS * frame * base + 5.0,
            "fp8": (exact_warm or compile_s + exact) + steps * 0.7 * exact + short * stock + 10.0,
            "decode": decode + 2.0,
            "decode_default": 1.5 * decode + 2.0,
            **self.e2e_estimates(stock, exact, base, decode),
        }[name]

    def e2e_estimates(self, stock: float, exact: float, base: float, decode: float) -> dict[str, float]:
        steps = self.args.e2e_steps
        encode = 3.0 if self.device.type == "cuda" else 0.5
        fp8 = self.step_s("fp8") or 0.7 * exact
        out = {
            "e2e_stock": encode + steps * stock + 1.5 * decode + 2.0,
            "e2e_exact": encode + steps * exact + decode + 2.0,
            "e2e_fp8": encode + steps * fp8 + decode + 2.0,
        }
        for option in STEP_CACHES:  # fbcache reuses ~nothing on random weights: every step computes
            computed = 1.0 if option == "fbcache" else 0.5
            out[f"e2e_turbo_{option}"] = encode + steps * computed * base + decode + 2.0
        return out

    def flops_share(self, video_tokens: int) -> float:
        """A smaller clip's step cost as a share of a full one: its FLOP share, doubled because
        small shapes run less efficiently."""
        s = self.setup
        full = sum(step_flops(s.config, s.video_tokens, s.text_lens))
        return min(1.0, 2.0 * sum(step_flops(s.config, video_tokens, s.text_lens)) / full)

    def step_s(self, name: str) -> float | None:
        return self.results.variants.get(name, {}).get("step_median_s")

    def compiles(self) -> bool:
        return self.args.compile == "on" or (self.args.compile == "auto" and self.device.type == "cuda")

    def preset_options(self) -> Any:
        from ..engine.presets import DEFAULT_CACHE_THRESHOLD, PresetOptions

        a = self.args
        return PresetOptions(
            attention=a.attention,
            compile=self.compiles(),
            compile_dynamic=a.compile_dynamic == "on",
            compile_cache_dir=a.compile_cache_dir,
            cache_threshold=DEFAULT_CACHE_THRESHOLD if a.cache_threshold is None else a.cache_threshold,
        )

    # -- timing --
    def timed_steps(self, record: dict[str, Any], marks: list[float], begin: float) -> None:
        durations = [b - a for a, b in zip([begin, *marks[:-1]], marks, strict=True)]
        record["first_step_s"] = round(durations[0], 3)
        timed = durations[1:] or durations
        record["step_s"] = [round(d, 3) for d in timed]
        record["step_median_s"] = round(statistics.median(timed), 4)
        record.update(self.flops_record(record["step_median_s"]))

    def job(self, *, steps: int, frames: int | None = None) -> Any:
        """The shared inputs; the full clip starts from the shared noise, a shorter one from the seed."""
        import torch

        from ..engine.denoise import DenoiseJob

        s = self.setup
        return DenoiseJob(
            image=s.image,
            height=s.height,
            width=s.width,
            num_frames=frames or s.frames,
            num_inference_steps=steps,
            true_cfg_scale=s.cfg,
            positive=s.positive,
            negative=s.negative,
            generator=torch.Generator("cpu").manual_seed(s.seed),
            latents=s.latents.clone() if frames is None else None,
        )

    def run_loop(
        self, record: dict[str, Any], *, steps: int, on_forward: Callable[[str], None] | None = None
    ) -> Any:
        from ..engine.denoise import denoise_latents

        marks: list[float] = []
        begin = [0.0]

        def on_begin() -> None:
            self.sync()
            begin[0] = time.perf_counter()

        def on_step(_done: int, _total: int) -> None:
            self.sync()
            marks.append(time.perf_counter())

        latents = denoise_latents(
            self.setup.pipe, self.job(steps=steps), on_step=on_step, on_begin=on_begin, on_forward=on_forward
        )
        self.timed_steps(record, marks, begin[0])
        return latents

    def loop_with_compile_fallback(self, record: dict[str, Any], applied: Any) -> Any:
        """The timed loop; should compilation fail, record why and measure with static shapes,
        then uncompiled, rather than lose the variant (and the ones stacked on it)."""
        steps = 1 + self.timed
        try:
            return self.run_loop(record, steps=steps)
        except Exception as exc:
            if not applied.compiled:
                raise
            record["compile_error"] = (
                f"dynamic={self.args.compile_dynamic}: {type(exc).__name__}: {str(exc)[:400]}"
            )
        if self.args.compile_dynamic == "on":
            try:
                recompile(self.setup.pipe.transformer, dynamic=False)
                record["compiled_as"] = "static shapes"
                return self.run_loop(record, steps=steps)
            except Exception as exc:
                record["static_compile_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        recompile(self.setup.pipe.transformer, dynamic=None, compile=False)
        record["compiled_as"] = "not compiled (eager)"
        return self.run_loop(record, steps=steps)

    def compare(self, record: dict[str, Any], latents: Any) -> None:
        s = self.setup
        record["finite"] = bool(self.torch.isfinite(latents).all())
        if s.stock_latents is not None:
            record["rel_err_vs_stock"] = self.rel_err(latents, s.stock_latents)
            # The noise is shared; the change the steps made is the sharper comparison.
            record["rel_err_update_vs_stock"] = self.rel_err(latents - s.latents, s.stock_latents - s.latents)

    def short_pred(self, *, trimmed: bool, dtype: Any = None) -> Any:
        """One CFG step on the short clip, through the loop's own step function."""
        from ..engine.denoise import cfg_velocity, trim_padding
        from ..engine.prompts import PromptEmbeds

        s = self.setup
        dtype = dtype or s.dtype

        def cast(e: PromptEmbeds) -> PromptEmbeds:
            e = trim_padding(e) if trimmed else e
            return PromptEmbeds(e.embeds.to(dtype), e.pooled.to(dtype), e.mask.to(dtype))

        inputs = s.short_inputs
        with self.torch.inference_mode():
            out = cfg_velocity(
                s.pipe.transformer,
                inputs["latent_model_input"].to(dtype),
                inputs["timestep"],
                inputs["guidance"].to(dtype),
                cast(s.positive),
                cast(s.negative),
                s.cfg,
            )
        self.sync()
        return out.float()

    # -- variants --
    def run_ref(self) -> dict[str, Any]:
        """Stock forward on the short clip in the reference dtype, then in the model's dtype."""
        torch = self.torch
        s = self.setup
        transformer = s.pipe.transformer
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        started = time.perf_counter()
        try:
            transformer.to(s.ref_dtype)  # bf16 -> f32 -> bf16 is lossless: the same weights
            s.ref_short_pred = self.short_pred(trimmed=False, dtype=s.ref_dtype)
        finally:
            transformer.to(s.dtype)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        ref_s = time.perf_counter() - started
        stock_pred = self.short_pred(trimmed=False)
        return {
            "note": f"short clip ({s.ref_frames} frames), one CFG step; reference in {s.ref_dtype}",
            "ref_s": round(ref_s, 2),
            "stock_rel_err_vs_ref": self.rel_err(stock_pred, s.ref_short_pred),
            "finite": bool(torch.isfinite(s.ref_short_pred).all()),
        }

    def run_stock(self) -> dict[str, Any]:
        import torch

        from ..engine.denoise import pipeline_kwargs

        s = self.setup
        record: dict[str, Any] = {"note": "diffusers pipeline call (padded text + mask)"}
        marks: list[float] = []

        def on_step_end(_pipe: Any, _i: int, _t: Any, _kw: dict[str, Any]) -> dict[str, Any]:
            self.sync()
            marks.append(time.perf_counter())
            return {}

        job = self.job(steps=1 + self.timed)  # before the clock: it clones the shared noise
        self.sync()
        begin = time.perf_counter()
        with torch.inference_mode():
            out = s.pipe(
                **pipeline_kwargs(job),
                output_type="latent",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=[],
            )
        self.timed_steps(record, marks, begin)
        record["note"] += "; first step includes the image encode"
        s.stock_latents = out.frames.float()
        record["finite"] = bool(torch.isfinite(s.stock_latents).all())
        return record

    def run_exact(self) -> dict[str, Any]:
        from ..engine.presets import apply_preset

        s = self.setup
        started = time.perf_counter()
        applied = apply_preset(s.pipe, "exact", self.preset_options())
        record: dict[str, Any] = {
            "apply_s": round(time.perf_counter() - started, 2),
            "preset": applied.summary(),
        }
        if applied.attention is not None:
            record["attention_probe_ms"] = applied.attention.probe
        latents = self.loop_with_compile_fallback(record, applied)
        record["note"] = "first step includes compilation" if applied.compiled else ""
        self.compare(record, latents)
        s.exact_latents = latents
        if s.ref_short_pred is not None:
            s.exact_short_pred = self.short_pred(trimmed=True)
            record["rel_err_vs_ref"] = self.rel_err(s.exact_short_pred, s.ref_short_pred)
        return record

    def run_turbo(self) -> dict[str, Any]:
        from ..engine.attention import has_mask_free_attention
        from ..engine.denoise import denoise_latents
        from ..engine.presets import StepCacheMonitor

        s = self.setup
        transformer = s.pipe.transformer
        if not has_mask_free_attention(transformer):
            raise RuntimeError("turbo is measured on a fast base: run the exact (or fp8) variant first")
        fp8 = self.results.variants.get("fp8", {})
        base = "fp8" if fp8.get("step_median_s") and fp8.get("preset", {}).get("preset") == "fp8" else "exact"
        options = self.preset_options()
        monitor = StepCacheMonitor(transformer, threshold=math.inf)  # reuse every step after the first
        record: dict[str, Any] = {"base": base, "threshold": options.cache_threshold}
        try:
            steps = 1 + self.timed
            self.run_loop(record, steps=steps, on_forward=monitor)
            branches = ("cond", "uncond") if cfg_enabled(s.cfg) else ("cond",)
            if monitor.computed != dict.fromkeys(branches, 1) or monitor.reused != dict.fromkeys(
                branches, steps - 1
            ):
                raise RuntimeError(
                    f"unexpected cache decisions: computed {dict(monitor.computed)}, reused {dict(monitor.reused)}"
                )
            record["computed_step_s"] = record.pop("first_step_s")
            record["reused_steps_s"] = record.pop("step_s")
            record["reused_step_s"] = record.pop("step_median_s")
            for key in ("tflops", "pct_bf16_floor", "bf16_floor_s", "step_tflop"):
                record.pop(key, None)
            # The configured threshold over a whole schedule, on a one-frame clip (cheap: the
            # fraction is only indicative with random weights anyway).
            monitor.threshold = options.cache_threshold
            monitor.reset()
            short_job = self.job(steps=SCHEDULE_STEPS, frames=1)
            started = time.perf_counter()
            denoise_latents(s.pipe, short_job, on_forward=monitor)
            self.sync()
            record["short_schedule_s"] = round(time.perf_counter() - started, 2)
            record["random_weights_reuse_fraction"] = round(monitor.reuse_fraction, 3)
            record["random_weights_reuse_by_branch"] = {b: monitor.reused[b] for b in branches}
            record["note"] = (
                f"First Block Cache: computed step {record['computed_step_s']:.3f}s, reused step "
                f"{record['reused_step_s']:.3f}s; reuse at threshold {options.cache_threshold:g} on random "
                f"weights {record['random_weights_reuse_fraction']:.0%} (says nothing about real videos)"
            )
        finally:
            transformer.disable_cache()
        return record

    def run_fp8(self) -> dict[str, Any]:
        from ..engine.presets import apply_preset, fp8_unavailable_reason, probe_fp8_rows

        s = self.setup
        reason = fp8_unavailable_reason(self.device)
        if reason is not None:
            return {"skipped": reason}
        record: dict[str, Any] = {
            "fp8_probe_rows": {str(k): v for k, v in probe_fp8_rows(self.device).items()}
        }
        started = time.perf_counter()
        applied = apply_preset(
            s.pipe, "fp8", replace(self.preset_options(), attention=self.args.fp8_attention)
        )
        record["apply_s"] = round(time.perf_counter() - started, 2)
        record["preset"] = applied.summary()
        if applied.name != "fp8":
            record["skipped"] = "; ".join(applied.notes) or "fp8 unavailable"
            return record
        if applied.attention is not None:
            record["attention_probe_ms"] = applied.attention.probe
        latents = self.loop_with_compile_fallback(record, applied)
        record["note"] = "first step includes quantized recompilation"
        self.compare(record, latents)
        if s.ref_short_pred is not None:
            pred = self.short_pred(trimmed=True)
            record["rel_err_vs_ref"] = self.rel_err(pred, s.ref_short_pred)
            if s.exact_short_pred is not None:
                record["rel_err_vs_exact_bf16"] = self.rel_err(pred, s.exact_short_pred)
        return record

    # -- end to end (e2e.py) --
    def e2e_parts(
        self, record: dict[str, Any], denoise: Callable[[], Any], decode: Callable[[Any], Any]
    ) -> Any:
        """Time encode, the denoise call (image encode + all steps), decode and MP4 into `record`;
        compare the final latents with stock's and exact's; return them."""
        from .e2e import time_encode, time_mp4

        s = self.setup
        steps = self.args.e2e_steps
        encode_s = time_encode(s.text_encoder, self.sync, ("a bench prompt", "a bench negative prompt"))
        self.sync()
        started = time.perf_counter()
        latents = denoise()
        self.sync()
        denoise_s = time.perf_counter() - started
        started = time.perf_counter()
        video = decode(latents)
        self.sync()
        decode_s = time.perf_counter() - started
        try:
            mp4_s, mp4_bytes = time_mp4(video)
            record["mp4_bytes"] = mp4_bytes
        except Exception as exc:  # e.g. no imageio-ffmpeg on a bare GPU machine: keep the rest
            mp4_s = None
            record["mp4_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        record.update(
            e2e_steps=steps,
            encode_s=None if encode_s is None else significant(encode_s),
            denoise_s=round(denoise_s, 3),
            s_per_step=round(denoise_s / steps, 4),
            decode_s=round(decode_s, 3),
            mp4_s=None if mp4_s is None else round(mp4_s, 3),
            e2e_s=round(sum(x for x in (encode_s, denoise_s, decode_s, mp4_s) if x is not None), 3),
            e2e_parts="encode + denoise (image encode and steps) + decode + mp4"
            + ("" if encode_s is not None else "; no text encoder timed")
            + ("" if mp4_s is not None else "; mp4 failed"),
            finite=bool(self.torch.isfinite(latents).all()),
        )
        if s.stock_e2e_latents is not None and latents is not s.stock_e2e_latents:
            record["rel_err_vs_stock"] = self.rel_err(latents, s.stock_e2e_latents)
        if s.exact_e2e_latents is not None and latents is not s.exact_e2e_latents:
            record["rel_err_vs_exact"] = self.rel_err(latents, s.exact_e2e_latents)
        return latents

    def run_e2e_stock(self) -> dict[str, Any]:
        from ..engine.attention import has_mask_free_attention
        from ..engine.denoise import pipeline_kwargs
        from .e2e import stock_decode

        s = self.setup
        if has_mask_free_attention(s.pipe.transformer):
            raise RuntimeError("e2e_stock must run before a preset changes the model (order of VARIANTS)")
        job = self.job(steps=self.args.e2e_steps)

        def denoise() -> Any:
            with self.torch.inference_mode():
                return s.pipe(**pipeline_kwargs(job), output_type="latent").frames.float()

        record: dict[str, Any] = {"note": "pipeline call (padded text + mask), default VAE tiles"}
        s.stock_e2e_latents = self.e2e_parts(record, denoise, partial(stock_decode, s.pipe))
        return record

    def ours_decode(self, latents: Any) -> Any:
        from ..engine.denoise import decode_latents

        return decode_latents(self.setup.pipe, latents, output_type="np")[0]

    def run_e2e_preset(self, name: str) -> dict[str, Any]:
        from ..engine.denoise import denoise_latents

        s = self.setup
        measured = self.results.variants.get(name, {})
        if not measured.get("step_median_s") or measured.get("preset", {}).get("preset") != name:
            why = measured.get("skipped") or measured.get("error") or "not run"
            return {"skipped": f"the {name} variant did not run ({str(why)[:120]})"}
        record: dict[str, Any] = {"note": f"our loop, {name} as applied by the {name} variant"}
        latents = self.e2e_parts(
            record, lambda: denoise_latents(s.pipe, self.job(steps=self.args.e2e_steps)), self.ours_decode
        )
        if name == "exact":
            s.exact_e2e_latents = latents
        return record

    def run_e2e_turbo(self, option: str) -> dict[str, Any]:
        from ..engine.attention import has_mask_free_attention
        from ..engine.denoise import denoise_latents
        from ..engine.step_cache import install_step_cache, remove_step_cache

        s = self.setup
        transformer = s.pipe.transformer
        if not has_mask_free_attention(transformer):
            raise RuntimeError("turbo is measured on a fast base: run the exact (or fp8) variant first")
        fp8 = self.results.variants.get("fp8", {})
        base = "fp8" if fp8.get("step_median_s") and fp8.get("preset", {}).get("preset") == "fp8" else "exact"
        steps = self.args.e2e_steps
        cache = install_step_cache(transformer, option, threshold=self.preset_options().cache_threshold)
        record: dict[str, Any] = {"base": base, "step_cache": cache.describe()}
        try:
            self.e2e_parts(
                record,
                lambda: denoise_latents(s.pipe, self.job(steps=steps), on_forward=cache),
                self.ours_decode,
            )
        finally:
            remove_step_cache(transformer)
        record["computed_forwards"] = dict(cache.computed)
        record["reused_forwards"] = dict(cache.reused)
        record["reuse_fraction"] = round(cache.reuse_fraction, 4)
        planned = cache.planned_computed(steps)
        if planned is not None:
            record["planned_computed_steps"] = sum(planned)
            if any(count != sum(planned) for count in cache.computed.values()):
                raise RuntimeError(
                    f"{option} computed {dict(cache.computed)} steps, its schedule says {sum(planned)}"
                )
            record["note"] = (
                f"{option}: schedule computes {sum(planned)} of {steps} steps (weight-independent)"
            )
        else:
            record["note"] = (
                f"{option}: reuse on random weights ({record['reuse_fraction']:.0%}) says nothing about real videos"
            )
        return record

    def final_latents(self) -> Any:
        s = self.setup
        latents = getattr(s, "exact_latents", None)
        return latents if latents is not None else s.stock_latents

    def run_decode(self) -> dict[str, Any]:
        from ..engine.denoise import decode_latents

        latents = self.final_latents()
        if latents is None:
            return {"skipped": "no final latents (stock and exact did not run)"}
        self.sync()
        started = time.perf_counter()
        video, plan = decode_latents(self.setup.pipe, latents, output_type="np")
        self.sync()
        return {
            "seconds": round(time.perf_counter() - started, 2),
            "tiles": plan.describe(),
            "estimated_peak_gib": round(plan.estimated_peak_bytes / 2**30, 1),
            "free_gib_at_start": None if plan.free_bytes is None else round(plan.free_bytes / 2**30, 1),
            "shape": list(video.shape),
            "note": "latents to uint8-ready frames, tiles chosen from free memory",
        }

    def run_decode_default(self) -> dict[str, Any]:
        torch = self.torch
        pipe = self.setup.pipe
        latents = self.final_latents()
        if latents is None:
            return {"skipped": "no final latents (stock and exact did not run)"}
        pipe.vae.enable_tiling(
            tile_sample_min_height=256,
            tile_sample_min_width=256,
            tile_sample_stride_height=192,
            tile_sample_stride_width=192,
        )
        self.sync()
        started = time.perf_counter()
        with torch.inference_mode():
            video = pipe.vae.decode(
                latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False
            )[0]
            video = pipe.video_processor.postprocess_video(video, output_type="np")
        self.sync()
        return {
            "seconds": round(time.perf_counter() - started, 2),
            "tiles": "tiles 256/192 (diffusers default)",
            "shape": list(video.shape),
        }


def image_latents_finite(pipe: Any, image: Any, height: int, width: int) -> bool:
    import torch

    with torch.inference_mode():
        pixels = pipe.video_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(pipe._execution_device, pipe.vae.dtype).unsqueeze(2)
        return bool(torch.isfinite(pipe.vae.encode(pixels).latent_dist.mode()).all())


def shrink_vae(vae: Any) -> None:
    import torch

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv3d | torch.nn.Linear):
                module.weight.normal_(0, 0.02)


def recompile(transformer: Any, *, dynamic: bool | None, compile: bool = True) -> None:
    """Drop the compiled block forwards; compile them again with `dynamic` unless `compile` is False."""
    import torch

    from ..engine.presets import compile_regions, is_compiled

    torch._dynamo.reset()
    for module in transformer.modules():
        if is_compiled(vars(module).get("forward")):
            del module.forward  # back to the class's own forward
    if compile:
        compile_regions(transformer, dynamic=dynamic)


def build_tiny_random_pipeline(device: Any) -> Any:
    from ..engine.tiny import build_tiny_pipeline

    return build_tiny_pipeline().to(device)


@dataclass(frozen=True)
class ModelRecipe:
    build: Callable[[Any], Any]  # device -> pipeline (text encoders may be None)
    size: tuple[int, int, int]  # default width, height, frames
    text: dict[str, int]  # padded length, embedding and pooled dims
    needs_cuda: bool


def build_full_random_pipeline(device: Any) -> Any:
    """SkyReels V1 at full size with random weights, built on `device` (anchor_bench.py's recipe)."""
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanSkyreelsImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            transformer = HunyuanVideoTransformer3DModel(**FULL_TRANSFORMER)
        torch.set_default_dtype(torch.float16)
        with torch.device(device):
            vae = AutoencoderKLHunyuanVideo()
    finally:
        torch.set_default_dtype(previous)
    transformer.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        # Small weights keep random activations finite through 60 blocks.
        for module in transformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.02)
    return HunyuanSkyreelsImageToVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )


MODELS: dict[str, ModelRecipe] = {
    # SkyReels' own 16:9 clip: 960x544x97.
    FULL_MODEL: ModelRecipe(
        build_full_random_pipeline,
        (*SKYREELS_GEOMETRY.sizes["16:9"], SKYREELS_GEOMETRY.num_frames),
        FULL_TEXT,
        needs_cuda=True,
    ),
    # tiny.py's model: 64x32x9 (16:9), 64 text tokens of width 16, pooled width 8.
    TINY_MODEL: ModelRecipe(
        build_tiny_random_pipeline, (64, 32, 9), dict(max_len=64, dim=16, pooled_dim=8), False
    ),
}


def run(args: argparse.Namespace, *, started: float | None = None) -> int:
    bench = Bench(args, started=started)
    results = bench.run()
    print(format_table(results.data))
    print(f"[bench] results: {results.path} and {results.path.with_suffix('.txt')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        prog="python -m skyreels_local.bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv), started=started)


if __name__ == "__main__":
    raise SystemExit(main())
