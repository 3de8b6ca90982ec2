"""Attention for the fast presets: mask-free processors and the choice of kernel.

Two independent pieces:

* `MaskFreeHunyuanVideoAttnProcessor` drops the attention mask that diffusers' HunyuanVideo
  transformer always builds. That is exact only when every text token is real, which our
  denoising loop guarantees by cutting the prompt padding first (batch 1; see denoise.py). A
  mask forces PyTorch's SDPA off the flash/cuDNN kernels (measured on an H200: 13.34 -> 10.46
  s/step), and FlashAttention-3 / SageAttention refuse masks outright.
* `choose_backend` picks a kernel of diffusers' attention dispatcher (`set_attention_backend`).
  Exact presets take only kernels that compute exact softmax attention; approximate ones
  (SageAttention quantises Q and K to 8 bits) only where the preset may change the output. With
  more than one candidate on a GPU, a short probe times each on one attention of this model's
  head shape and keeps the fastest whose output agrees with the preferred one; a kernel that is
  installed but broken simply drops out.

Detection reads diffusers' own availability flags, so "installed" means "diffusers can call it".

Besides the dispatcher's backends, `--attention` names the kernels our processor calls itself
(attention_kernels.py: fa4, cudnn-fp8, te-fp8, flashinfer-fp8, sage1). They are opt-in by name
(the automatic choice is unchanged), and a named one that is not installed or not supported by
this GPU falls back to the automatic choice with a warning. With no kernel set, the processor
runs diffusers' own code path: `exact` stays bit-identical.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from ..errors import InvalidInputError
from .attention_kernels import APPROXIMATE_KERNELS, KERNELS, Kernel, kernel_status

log = logging.getLogger(__name__)

# 8-bit attention (changes the output): only for presets that may change it.
APPROXIMATE_BACKENDS = ("sage",)
AUTO = "auto"

# The probe's attention: SkyReels' 24 heads of 128, long enough to be bandwidth- and
# compute-bound like the real 51k-token one, short enough to take milliseconds.
PROBE_HEADS, PROBE_HEAD_DIM, PROBE_SEQ_LEN = 24, 128, 16_384
# Output agreement with the preferred candidate that a probed kernel must meet (relative L2).
# Exact kernels differ by ~1e-3 in bf16; SageAttention's 8-bit Q.K by a few 1e-2.
EXACT_AGREEMENT, APPROXIMATE_AGREEMENT = 2e-2, 1e-1


class MaskFreeHunyuanVideoAttnProcessor(HunyuanVideoAttnProcessor2_0):
    """diffusers' HunyuanVideo attention with the (all-true) mask dropped.

    Only correct when the text sequence holds no padding: install it only on a transformer that
    is called through our denoising loop, which trims the padding (denoise.trim_padding).
    With `kernel` set (apply_backend), attention runs on that kernel (attention_kernels.py).
    """

    kernel: Kernel | None = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        if self.kernel is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)
        return self._call_kernel(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    def _call_kernel(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """diffusers' HunyuanVideoAttnProcessor2_0.__call__ step for step (0.42.1), with the
        attention itself on `self.kernel` ([B, S, H, D] in and out)."""
        from diffusers.models.embeddings import apply_rotary_emb

        joint = attn.add_q_proj is None and encoder_hidden_states is not None
        if joint:  # single-stream block: video and text share the projections
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (
            proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if joint:  # RoPE on the video tokens only
                text = encoder_hidden_states.shape[1]
                query, key = (
                    torch.cat(
                        [apply_rotary_emb(x[:, :-text], image_rotary_emb, sequence_dim=1), x[:, -text:]],
                        dim=1,
                    )
                    for x in (query, key)
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq, ek, ev = (
                proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (
                torch.cat([query, eq], dim=1),
                torch.cat([key, ek], dim=1),
                torch.cat([value, ev], dim=1),
            )
        hidden_states = self.kernel(query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-text], hidden_states[:, -text:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def install_mask_free_attention(transformer: torch.nn.Module) -> int:
    """Swap the blocks' HunyuanVideo processors for mask-free ones (idempotent).

    The token refiner keeps its own processor and mask: it attends over the text only and uses
    plain SDPA, not the dispatcher. Returns how many processors are mask-free afterwards.
    """
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is HunyuanVideoAttnProcessor2_0:
            replacement = MaskFreeHunyuanVideoAttnProcessor()
            # Keep a backend that was already chosen for this processor.
            if "_attention_backend" in vars(processor):
                replacement._attention_backend = processor._attention_backend
            module.set_processor(replacement)
        if isinstance(getattr(module, "processor", None), MaskFreeHunyuanVideoAttnProcessor):
            count += 1
    return count


def has_mask_free_attention(transformer: torch.nn.Module) -> bool:
    return any(
        isinstance(getattr(m, "processor", None), MaskFreeHunyuanVideoAttnProcessor)
        for m in transformer.modules()
    )


@dataclass(frozen=True)
class AttentionEnvironment:
    """What the dispatcher could run here: the device and which optional kernels import."""

    device_type: str
    capability: tuple[int, int] | None = None  # CUDA compute capability
    cudnn: bool = False
    flash_attn_3: bool = False
    flash_attn: bool = False
    sageattention: bool = False
    xformers: bool = False


def detect_environment(device: torch.device | str) -> AttentionEnvironment:
    """Read the device and diffusers' own availability flags for the optional kernels."""
    device = torch.device(device)
    if device.type != "cuda":
        return AttentionEnvironment(device_type=device.type)
    from diffusers.models import attention_dispatch as dispatch

    return AttentionEnvironment(
        device_type="cuda",
        capability=tuple(torch.cuda.get_device_capability(device)),
        cudnn=bool(torch.backends.cudnn.is_available()),
        flash_attn_3=bool(dispatch._CAN_USE_FLASH_ATTN_3),
        flash_attn=bool(dispatch._CAN_USE_FLASH_ATTN),
        sageattention=bool(dispatch._CAN_USE_SAGE_ATTN),
        xformers=bool(dispatch._CAN_USE_XFORMERS_ATTN),
    )


def candidate_backends(env: AttentionEnvironment, *, allow_approximate: bool) -> list[str]:
    """Dispatcher backends usable in `env`, best first by published speed.

    FlashAttention-3 is the fastest published bf16 kernel at head dim 128 on Hopper (648 TFLOP/s vs
    cuDNN's 595, PERFORMANCE.md); cuDNN SDPA is what a stock torch build has; "native" is PyTorch's
    SDPA with its own kernel choice (always works). The probe at load then measures the order.
    """
    if env.device_type != "cuda":
        return ["native"]
    capability = env.capability or (0, 0)
    ampere_or_newer = capability >= (8, 0)
    candidates = []
    if allow_approximate and env.sageattention and ampere_or_newer:
        candidates.append("sage")
    if env.flash_attn_3 and capability[0] == 9:  # FlashAttention-3 is built for Hopper
        candidates.append("_flash_3")
    if env.flash_attn and ampere_or_newer:
        candidates.append("flash")
    if env.cudnn and ampere_or_newer:
        candidates.append("_native_cudnn")
    if env.xformers:
        candidates.append("xformers")
    candidates.append("native")
    return candidates


@dataclass(frozen=True)
class AttentionChoice:
    backend: str
    candidates: tuple[str, ...]
    how: str  # "requested", "only candidate", "preference order", "probe", or "fallback from X: why"
    probe: dict[str, float | str] = field(default_factory=dict)  # ms per candidate, or its error

    @property
    def exact(self) -> bool:
        return self.backend not in APPROXIMATE_BACKENDS + APPROXIMATE_KERNELS

    @property
    def is_kernel(self) -> bool:
        """One of our own kernels (attention_kernels.py), not a dispatcher backend."""
        return self.backend in KERNELS


ProbeFn = Callable[[Sequence[str]], dict[str, float | str]]


def choose_backend(
    env: AttentionEnvironment,
    *,
    allow_approximate: bool,
    requested: str = AUTO,
    probe: ProbeFn | None = None,
    importable: Callable[[str], bool] | None = None,
) -> AttentionChoice:
    """The backend to use: `requested` when it is usable here, else the fastest candidate.

    `probe(candidates)` returns milliseconds per candidate (or an error string for one that
    failed or disagreed); without a probe the preference order decides.
    """
    candidates = candidate_backends(env, allow_approximate=allow_approximate)
    if requested in KERNELS:
        return _choose_kernel(
            env, requested, allow_approximate=allow_approximate, probe=probe, importable=importable
        )
    if requested != AUTO:
        if requested in APPROXIMATE_BACKENDS and not allow_approximate:
            raise InvalidInputError(
                "attention",
                requested,
                "changes the output (8-bit attention): use it with the fp8 or turbo preset, or an exact backend",
            )
        if requested not in candidates:
            raise InvalidInputError(
                "attention",
                requested,
                f"must be usable on this {env.device_type} device: {', '.join(candidates)} "
                f"(or one of our kernels: {', '.join(KERNELS)})",
            )
        return AttentionChoice(requested, tuple(candidates), "requested")
    if len(candidates) == 1:
        return AttentionChoice(candidates[0], tuple(candidates), "only candidate")
    if probe is None:
        return AttentionChoice(candidates[0], tuple(candidates), "preference order")
    timings = probe(candidates)
    usable = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
    if not usable:
        # Every probe failed: fall back to PyTorch's own SDPA, which is always present.
        return AttentionChoice("native", tuple(candidates), "probe failed", timings)
    best = min(usable, key=lambda name: (usable[name], candidates.index(name)))
    return AttentionChoice(best, tuple(candidates), "probe", timings)


def _choose_kernel(
    env: AttentionEnvironment,
    name: str,
    *,
    allow_approximate: bool,
    probe: ProbeFn | None,
    importable: Callable[[str], bool] | None,
) -> AttentionChoice:
    """A named kernel of ours when it can run here; else the automatic choice, with a warning."""
    spec = KERNELS[name]
    if not spec.exact and not allow_approximate:
        raise InvalidInputError(
            "attention",
            name,
            "changes the output (8-bit attention): use it with the fp8 or turbo preset, or an exact backend",
        )
    kwargs = {} if importable is None else {"importable": importable}
    reason = kernel_status(spec, device_type=env.device_type, capability=env.capability, **kwargs)
    if reason is None:
        return AttentionChoice(name, (name,), "requested")
    choice = choose_backend(env, allow_approximate=allow_approximate, probe=probe)
    log.warning("attention %s is not usable here (%s): using %s instead", name, reason, choice.backend)
    return AttentionChoice(choice.backend, choice.candidates, f"fallback from {name}: {reason}", choice.probe)


def probe_backends(
    candidates: Sequence[str],
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    seq_len: int = PROBE_SEQ_LEN,
    heads: int = PROBE_HEADS,
    head_dim: int = PROBE_HEAD_DIM,
    repeats: int = 3,
) -> dict[str, float | str]:
    """Time one mask-free attention per candidate through diffusers' dispatcher (median ms).

    A candidate that raises, or whose output differs from the first working candidate's by more
    than its agreement tolerance, is reported with the reason instead of a time.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (
        torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype, generator=generator)
        for _ in range(3)
    )
    results: dict[str, float | str] = {}
    reference: torch.Tensor | None = None
    # Exact kernels first, so that the agreement reference is an exact one.
    ordered = [c for c in candidates if c not in APPROXIMATE_BACKENDS]
    ordered += [c for c in candidates if c in APPROXIMATE_BACKENDS]
    for name in ordered:
        try:
            backend = AttentionBackendName(name)

            def run(backend=backend) -> torch.Tensor:
                return dispatch_attention_fn(q, k, v, attn_mask=None, backend=backend)

            out = run()  # warm-up; its output is the one compared
            synchronize(device)
            milliseconds = median_ms(run, device, repeats)
        except Exception as exc:  # a kernel that is importable but unusable here drops out
            results[name] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
            continue
        if reference is None:
            reference = out.float()
        else:
            error = float((out.float() - reference).norm() / reference.norm())
            limit = APPROXIMATE_AGREEMENT if name in APPROXIMATE_BACKENDS else EXACT_AGREEMENT
            if not error <= limit:  # also catches NaN
                results[name] = f"disagrees: relative error {error:.3g} > {limit:g}"
                continue
        results[name] = round(milliseconds, 3)
    return results


def set_kernel(transformer: torch.nn.Module, name: str | None) -> int:
    """Put kernel `name` (None: none) on every mask-free processor, one instance each (a kernel
    may keep per-layer state). Returns how many processors have it."""
    spec = KERNELS[name] if name is not None else None
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, MaskFreeHunyuanVideoAttnProcessor):
            processor.kernel = None if spec is None else spec.make()
            count += spec is not None
    return count


def apply_backend(transformer: torch.nn.Module, backend: str) -> None:
    """Route the transformer's processors to `backend`: a dispatcher backend, or one of our
    kernels (on the mask-free processors; the dispatcher then stays on its default)."""
    set_kernel(transformer, None)
    if backend in KERNELS:
        apply_backend(transformer, "native")
        if set_kernel(transformer, backend) == 0:
            raise RuntimeError(
                f"attention {backend} needs the mask-free processors (a preset other than stock)"
            )
        return
    if backend == "native":
        # diffusers' default (no backend on the processor) already is native SDPA; setting it
        # explicitly only adds a warning. Undo an earlier choice, if any.
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and "_attention_backend" in vars(processor):
                processor._attention_backend = None
        return
    transformer.set_attention_backend(backend)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median wall time of `repeats` calls of `run`, each waited for on the device (ms).
    Warm it up first: the first call may compile or autotune."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)
