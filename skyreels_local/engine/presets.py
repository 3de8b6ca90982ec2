"""Speed presets: what runs the denoising steps, from the stock pipeline call to step caching.

| preset | output | what it does |
|---|---|---|
| `stock` | diffusers' own | the plain `HunyuanSkyreelsImageToVideoPipeline.__call__`: the baseline |
| `exact` | same math (kernel rounding only) | our loop (denoise.py) with the text padding cut so attention runs mask-free, the fastest installed exact attention kernel, and regional `torch.compile` of the repeated blocks with a persistent compile cache |
| `fp8` | changes slightly | `exact` plus fp8 (e4m3, per-row scales) dynamic matmuls from torchao for the large video-stream linears, and 8-bit attention when SageAttention is installed; needs compute capability >= 8.9, else it falls back to `exact` with a warning |
| `turbo` | changes | the fastest of the above plus a step cache (diffusers hooks) per CFG branch, named by `step_cache` (step_cache.py): First Block Cache by default (a step whose first-block residual moved less than `cache_threshold` reuses the rest of the network from the previous step), or TaylorSeer / MagCache on fixed schedules |

Everything here changes the transformer in place and is applied once at load (loader.py); the
functions are idempotent so that the benchmark can stack presets on one model.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..preset_names import (
    DEFAULT_CACHE_THRESHOLD,
    DEFAULT_PRESET,
    DEFAULT_STEP_CACHE,
    PRESETS,
    validate_preset,
    validate_step_cache,
)
from .attention import (
    AUTO,
    AttentionChoice,
    apply_backend,
    choose_backend,
    detect_environment,
    install_mask_free_attention,
    probe_backends,
)
from .step_cache import FirstBlockCache, StepCache, install_step_cache

__all__ = ["DEFAULT_CACHE_THRESHOLD", "DEFAULT_PRESET", "PRESETS", "validate_preset"]  # re-exported

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with fp8 tensor cores

# The linears fp8 pays off on: those that see the ~51k video tokens. In the dual-stream blocks
# the video stream's projections and MLP; in the single-stream blocks everything but the
# modulation (video and text are concatenated there). Left in bf16: the text stream of the
# dual blocks (a few dozen tokens: torch._scaled_mm failed on those in the anchor run with
# CUBLAS_STATUS_NOT_SUPPORTED, and they cost nothing) and the AdaLN modulation linears (one
# token each).
FP8_DUAL_BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
FP8_SINGLE_BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
_BLOCK_LINEAR = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)$")
# Token counts the fp8 probe tries: one (modulation), a short prompt, the 544x960x97 video
# stream, and an odd video+text length of the single-stream blocks.
FP8_PROBE_ROWS = (1, 37, 51_000, 51_037)
FP8_PROBE_FEATURES = 3072


@dataclass(frozen=True)
class PresetOptions:
    attention: str = AUTO  # a diffusers attention backend name, or "auto" (probe)
    compile: bool | None = None  # None: compile on a CUDA device only (CPU compiles are slow)
    compile_dynamic: bool | None = True  # one graph for every text length and clip size
    compile_cache_dir: str | Path | None = None  # persistent inductor cache; TORCHINDUCTOR_CACHE_DIR wins
    cache_threshold: float = DEFAULT_CACHE_THRESHOLD  # fbcache's
    step_cache: str = DEFAULT_STEP_CACHE  # turbo's step cache: fbcache, taylorseer or magcache
    probe_attention: bool = True


@dataclass
class AppliedPreset:
    """What a preset actually did on this machine (recorded with every prediction)."""

    name: str  # the preset in effect
    requested: str
    attention: AttentionChoice | None = None
    mask_free: bool = False
    compiled: bool = False
    fp8_linears: int = 0
    step_cache: StepCache | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def uses_pipeline_call(self) -> bool:
        return self.name == "stock"

    def summary(self) -> dict[str, Any]:
        return {
            "preset": self.name,
            "requested": self.requested,
            "attention": None if self.attention is None else self.attention.backend,
            "attention_how": None if self.attention is None else self.attention.how,
            "mask_free": self.mask_free,
            "compiled": self.compiled,
            "fp8_linears": self.fp8_linears,
            "step_cache": None if self.step_cache is None else self.step_cache.describe(),
            "notes": list(self.notes),
        }


# --- compile ------------------------------------------------------------------------------


def configure_compile_cache(directory: str | Path | None) -> str | None:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels) at `directory`,
    so that a restart reloads compiled kernels instead of compiling again. An explicit
    TORCHINDUCTOR_CACHE_DIR in the environment wins. Returns the directory in effect."""
    existing = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if existing or directory is None:
        return existing
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return str(path)


def is_compiled(fn: Any) -> bool:
    return hasattr(fn, "_torchdynamo_orig_callable")


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """diffusers or accelerate hooks on the module (offloading, caching) replace its forward."""
    registry = getattr(module, "_diffusers_hook", None)
    return bool(registry is not None and registry.hooks) or hasattr(module, "_hf_hook")


class RegionHooked(RuntimeError):
    """A block to compile already has forward hooks (offloading or caching)."""


# The regions worth compiling: the 60 transformer blocks (all of the compute). diffusers'
# `_repeated_blocks` also lists the patch embedding (one conv) and the token refiner (two small
# blocks over the text), which gain nothing and cost recompiles: the refiner specialises on the
# prompt's length (its mask handling) and sees the timestep, whose dtype changes after the first
# step (the scheduler returns latents in the model's dtype, as in the stock pipeline).
COMPILED_BLOCKS = (
    "HunyuanVideoTransformerBlock",
    "HunyuanVideoSingleTransformerBlock",
    "HunyuanVideoTokenReplaceTransformerBlock",
    "HunyuanVideoTokenReplaceSingleTransformerBlock",
)


def compile_regions(
    transformer: torch.nn.Module,
    *,
    dynamic: bool | None = True,
    fullgraph: bool = True,
    mode: str | None = None,
    backend: Any = "inductor",
) -> int:
    """Regional compilation of the transformer blocks (as diffusers' `compile_repeated_blocks`),
    applied to each block's `forward` rather than to the module call.

    All instances of a block class share one compiled graph (compiled once, seconds per class).
    Compiling `forward` lets diffusers' cache hooks, registered afterwards, wrap the compiled
    function and stay in eager Python (their per-step decision reads a tensor), where
    `compile_repeated_blocks` would trace into the hooks. `dynamic=True` makes one graph serve
    every text length (cond and uncond differ) and clip size. Returns the compiled block count.
    """
    names = set(COMPILED_BLOCKS) & set(getattr(transformer, "_repeated_blocks", COMPILED_BLOCKS))
    regions = [m for m in transformer.modules() if type(m).__name__ in names]
    pending = [m for m in regions if not is_compiled(m.forward)]
    hooked = [m for m in pending if any(has_forward_hooks(sub) for sub in m.modules())]
    if hooked:  # checked first, so that a refusal leaves nothing half compiled
        raise RegionHooked(f"{type(hooked[0]).__name__} has forward hooks (offloading or caching)")
    for module in pending:
        compiled = torch.compile(
            module.forward, fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend
        )
        module.forward = _with_contiguous_inputs(compiled)
    return len(regions)


def _with_contiguous_inputs(compiled: Any) -> Any:
    """Call `compiled` with tensors in the standard row-major layout.

    The blocks see several layouts: the first dual-stream block gets the patch embedding's
    transpose, the first single-stream block the dual blocks' outputs, the later single blocks
    slices of a concatenation (whose batch stride is that of the whole). Each layout change is a
    recompile (a third of the compile time). The copies are one activation per block at most
    (~0.1 ms each on an H100); inputs already in standard layout pass through untouched.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_standard_layout(a) for a in args)
        kwargs = {k: _standard_layout(v) for k, v in kwargs.items()}
        return compiled(*args, **kwargs)

    forward._torchdynamo_orig_callable = compiled._torchdynamo_orig_callable  # is_compiled() sees it
    forward.__wrapped__ = compiled
    return forward


def _standard_layout(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    expected, step = [], 1
    for size in reversed(value.shape):
        expected.append(step)
        step *= max(size, 1)
    if tuple(reversed(expected)) == value.stride():
        return value
    # Not .contiguous(): that keeps odd strides on size-1 dimensions, which guards still see.
    return value.clone(memory_format=torch.contiguous_format)


# --- fp8 ----------------------------------------------------------------------------------


def is_fp8_target(fqn: str, module: torch.nn.Module, *, include_single_blocks: bool = True) -> bool:
    """Whether the transformer's submodule `fqn` gets fp8 matmuls (see FP8_*_LINEARS)."""
    if not isinstance(module, torch.nn.Linear):
        return False
    match = _BLOCK_LINEAR.match(fqn)
    if match is None:
        return False
    blocks, suffix = match.groups()
    wanted = FP8_DUAL_BLOCK_LINEARS if blocks == "transformer_blocks" else FP8_SINGLE_BLOCK_LINEARS
    if suffix not in wanted or (blocks == "single_transformer_blocks" and not include_single_blocks):
        return False
    # torch._scaled_mm needs both matrix dimensions divisible by 16.
    if module.in_features % 16 or module.out_features % 16:
        return False
    return type(module.weight.data) is torch.Tensor  # not quantized already


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """None when fp8 matmuls can run here, else why not."""
    if device.type != "cuda":
        return f"fp8 needs a CUDA GPU (device is {device.type})"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < FP8_MIN_CAPABILITY:
        return (
            f"fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU has {capability[0]}.{capability[1]}"
        )
    try:
        import torchao.quantization  # noqa: F401
    except Exception as exc:  # ImportError, or a torchao built for another torch
        return f"torchao is not usable ({type(exc).__name__}: {exc}); install torchao>=0.18"
    return None


def _fp8_config():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    # set_inductor_config=False: torchao's recommended inductor settings turn on coordinate
    # descent tuning, which multiplies compile time for a gain we have not measured here.
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def probe_fp8_rows(device: torch.device, rows: tuple[int, ...] = FP8_PROBE_ROWS) -> dict[int, str]:
    """Run one fp8 linear (3072 -> 3072, as in the model) at each token count: "ok" or the error.

    cuBLAS/CUTLASS fp8 kernels have shape constraints that differ by version; this finds out
    on the machine itself, in milliseconds, before the model depends on them.
    """
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(FP8_PROBE_FEATURES, FP8_PROBE_FEATURES, device=device, dtype=torch.bfloat16)
    quantize_(linear, _fp8_config())
    results: dict[int, str] = {}
    with torch.inference_mode():
        for count in rows:
            try:
                x = torch.randn(1, count, FP8_PROBE_FEATURES, device=device, dtype=torch.bfloat16)
                out = linear(x)
                torch.cuda.synchronize(device)
                results[count] = "ok" if bool(torch.isfinite(out).all()) else "non-finite output"
            except Exception as exc:
                results[count] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return results


def quantize_fp8(transformer: torch.nn.Module, *, include_single_blocks: bool = True) -> int:
    """fp8 dynamic-activation, fp8-weight (per-row) matmuls for the selected linears. Returns
    how many linears are quantized by this call."""
    from torchao.quantization import quantize_

    selected = {
        fqn
        for fqn, module in transformer.named_modules()
        if is_fp8_target(fqn, module, include_single_blocks=include_single_blocks)
    }
    if selected:
        quantize_(transformer, _fp8_config(), filter_fn=lambda _module, fqn: fqn in selected)
    return len(selected)


def plan_fp8(device: torch.device) -> tuple[bool, bool, str | None]:
    """(use fp8, include single-stream blocks, reason when not used or narrowed)."""
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        return False, False, reason
    rows = probe_fp8_rows(device)
    video, odd = rows[FP8_PROBE_ROWS[2]], rows[FP8_PROBE_ROWS[3]]
    if video != "ok":
        return False, False, f"fp8 matmul failed on this GPU at {FP8_PROBE_ROWS[2]} tokens: {video}"
    if odd != "ok":
        return True, False, f"fp8 only in the dual-stream blocks: odd token counts fail ({odd})"
    return True, True, None


# --- step cache (turbo) -------------------------------------------------------------------

# The default step cache under its historical name (tests and the benchmark build it directly).
StepCacheMonitor = FirstBlockCache


# --- presets ------------------------------------------------------------------------------


def apply_preset(pipe: Any, name: str, options: PresetOptions | None = None) -> AppliedPreset:
    """Prepare `pipe.transformer` for preset `name` (after the memory profile placed it)."""
    validate_preset(name)
    options = options or PresetOptions()
    validate_step_cache(options.step_cache)
    applied = AppliedPreset(name=name, requested=name)
    if name == "stock":
        return applied
    transformer = pipe.transformer
    device = torch.device(pipe._execution_device)

    use_fp8, include_single, fp8_note = False, False, None
    if name in ("fp8", "turbo"):
        if _is_offloaded(transformer, device):
            fp8_note = "fp8 needs the transformer resident on the GPU (the memory profile offloads it)"
        else:
            use_fp8, include_single, fp8_note = plan_fp8(device)
        if fp8_note:
            applied.notes.append(fp8_note)
        if not use_fp8 and name == "fp8":
            log.warning("preset fp8 falls back to exact: %s", fp8_note)
            applied.name = "exact"

    applied.mask_free = install_mask_free_attention(transformer) > 0
    env = detect_environment(device)
    probe = (
        partial(probe_backends, device=device) if options.probe_attention and device.type == "cuda" else None
    )
    applied.attention = choose_backend(
        env, allow_approximate=applied.name in ("fp8", "turbo"), requested=options.attention, probe=probe
    )
    apply_backend(transformer, applied.attention.backend)
    if applied.attention.is_kernel and device.type == "cuda" and options.probe_attention:
        verified = verify_kernel(transformer, applied.attention.backend, device)
        if verified is not None:  # broken or out of bounds here: back to the automatic choice
            applied.notes.append(verified)
            log.warning("%s", verified)
            applied.attention = choose_backend(
                env, allow_approximate=applied.name in ("fp8", "turbo"), probe=probe
            )
            apply_backend(transformer, applied.attention.backend)

    if use_fp8:
        applied.fp8_linears = quantize_fp8(transformer, include_single_blocks=include_single)

    want_compile = options.compile if options.compile is not None else device.type == "cuda"
    if want_compile:
        configure_compile_cache(options.compile_cache_dir)
        try:
            applied.compiled = compile_regions(transformer, dynamic=options.compile_dynamic) > 0
        except RegionHooked as exc:
            applied.notes.append(f"not compiled: {exc}")

    if name == "turbo":
        applied.step_cache = install_step_cache(
            transformer, options.step_cache, threshold=options.cache_threshold
        )
    log.info("preset %s: %s", applied.name, applied.summary())
    return applied


def verify_kernel(transformer: torch.nn.Module, name: str, device: torch.device) -> str | None:
    """Run the kernel the processors now hold once against SDPA (attention_kernels.check_kernel):
    None when it is usable, else why not."""
    from .attention import MaskFreeHunyuanVideoAttnProcessor
    from .attention_kernels import KERNELS, check_kernel

    kernel = next(
        m.processor.kernel
        for m in transformer.modules()
        if isinstance(getattr(m, "processor", None), MaskFreeHunyuanVideoAttnProcessor)
    )
    ok, message = check_kernel(
        KERNELS[name], kernel, device=device, head_dim=transformer.config.attention_head_dim
    )
    log.info("attention kernel check: %s", message)
    return None if ok else f"attention {name} dropped: {message}"


def _is_offloaded(transformer: torch.nn.Module, device: torch.device) -> bool:
    return any(p.device.type != device.type for p in transformer.parameters()) or has_forward_hooks(
        transformer
    )
