"""The generation engine: one call from a request to decoded video frames.

`Engine.generate` applies the SkyReels conventions (size per aspect ratio, the "FPS-24, " prefix,
centre crop, default negative prompt, true CFG), runs the denoising steps the way the engine's
speed preset says (presets.py: the `stock` preset is diffusers' pipeline call, the others our own
loop in denoise.py), reports progress after every step and stops at the next step boundary when
asked to cancel. Cancelling raises from the step callback, because the pipeline's own
`_interrupt` flag still runs the VAE decode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import GenerationCancelled
from ..media.images import centre_crop_resize
from ..params import OUTPUT_FPS, GenerationParams, ModelGeometry
from .denoise import DenoiseJob, generate_video, pipeline_kwargs
from .presets import AppliedPreset
from .prompts import PromptEncoder, TextEncoderResidency
from .request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Reported after each denoising step."""

    step: int  # steps done, 1-based
    total: int
    elapsed_s: float  # since denoising began
    eta_s: float  # remaining denoising time, from the mean step time so far

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8, [num_frames, height, width, 3]
    seed: int
    width: int
    height: int
    num_frames: int
    fps: int
    prompt: str  # as sent to the text encoder, prefix included
    negative_prompt: str | None  # None when guidance_scale <= 1 (no CFG pass)
    timings: dict[str, float] = field(default_factory=dict)
    latents: Any = None  # the final latents, kept only when Engine.keep_latents is set (tests)


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a loaded model beyond its pipeline."""

    name: str
    geometry: ModelGeometry
    prompt_template: dict[str, Any] | None = None  # None: the pipeline's own (real SkyReels) template
    max_sequence_length: int = 256


class Engine:
    """Owns a loaded pipeline and runs one generation at a time."""

    def __init__(
        self,
        pipe: Any,
        spec: ModelSpec,
        *,
        profile: str = "default",
        text_encoders: TextEncoderResidency | None = None,
        preset: AppliedPreset | None = None,
        decode_budget_bytes: int | None = None,
    ) -> None:
        self.pipe = pipe
        self.spec = spec
        self.profile = profile  # the memory profile's name (profiles.py), shown in /ready and logs
        self.decode_budget_bytes = decode_budget_bytes  # the profile's cap on VAE decode memory
        # The speed preset applied to the pipeline at load; none given: the plain pipeline call.
        self.preset_info = preset or AppliedPreset(name="stock", requested="stock")
        self.prompts = PromptEncoder(
            pipe,
            prompt_template=spec.prompt_template,
            max_sequence_length=spec.max_sequence_length,
            residency=text_encoders,
        )
        # One generation at a time: the pipeline and its scheduler hold per-call state.
        self._lock = threading.Lock()
        # Set by engine/parallel.setup_parallel when this engine is one rank of a process group.
        self.parallel: Any = None
        self.keep_latents = False

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def preset(self) -> str:
        """The speed preset in effect (`stock`, `exact`, `fp8` or `turbo`), as recorded per prediction."""
        return self.preset_info.name

    def warm_up(self, *, num_frames: int = 9) -> float:
        """Run one short generation so that compilation and kernel selection happen now, not in
        the first user's request; returns its seconds. The compiled graphs are shape-generic
        (presets compile with dynamic shapes), so a 9-frame clip at the model's size warms up
        every later size and prompt; with the persistent compile cache, later processes reload
        instead of compiling. A worker calls this once before taking jobs."""
        from PIL import Image

        width, height = self.spec.geometry.sizes["16:9"]
        request = GenerationRequest(
            prompt="warm-up",
            image=Image.new("RGB", (width, height), (128, 128, 128)),
            seed=0,
            num_inference_steps=2,  # the second step runs in the dtype every later step uses
            width=width,
            height=height,
            num_frames=min(num_frames, self.spec.geometry.num_frames),
        )
        started = time.perf_counter()
        self.generate(request)
        return time.perf_counter() - started

    @property
    def prompt_prefetch_overlaps_denoise(self) -> bool:
        """Whether `prepare_prompts` may run while another job denoises: only with the text
        encoders resident on this engine's device (no weights move; an encode adds ~0.2 GB of
        activations at full size: 33 Llama hidden states of ~350 tokens) and outside a process
        group. Otherwise a prefetch waits for the GPU to be
        idle between jobs (worker/prefetch.py)."""
        return self.parallel is None and self.prompts.resident_on(self.device)

    def prepare_prompts(self, request: GenerationRequest | GenerationParams) -> None:
        """Encode `request`'s prompt and negative prompt into the prompt cache ahead of its turn.

        Meant for a worker that has the next job while the current one denoises: call this from
        a second thread, and that job's `generate` then finds its embeddings cached. It takes no
        engine lock (the prompt cache has its own); on one GPU the text encoder's kernels queue
        between the denoiser's (tens of milliseconds), while tokenising and, when a memory
        profile keeps the text encoders on the CPU, the whole encode overlap with the denoise.
        Do not call it concurrently under a profile that offloads models on demand (accelerate
        CPU offload moves modules on each call): see `prompt_prefetch_overlaps_denoise`.
        Takes the request or only its params: prompts need no image.
        """
        params = request if isinstance(request, GenerationParams) else request.params
        self.prompts.encode(params.encoder_prompt)
        if params.encoder_negative_prompt is not None:
            self.prompts.encode(params.encoder_negative_prompt)

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        # No validation here: GenerationParams were validated where the request entered.
        with self._lock:
            return self._generate(request, on_progress=on_progress, should_cancel=should_cancel)

    def _generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
    ) -> GenerationResult:
        def check_cancel() -> None:
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled()

        started = time.perf_counter()
        check_cancel()
        params = request.params.with_drawn_seed()
        width, height, num_frames = self.spec.geometry.resolve(params)
        seed = params.seed
        prompt, negative = params.encoder_prompt, params.encoder_negative_prompt

        image = centre_crop_resize(request.image, width, height)

        text_started = time.perf_counter()
        positive_embeds, negative_embeds = self._encode_prompts(prompt, negative)
        check_cancel()

        denoise_started = time.perf_counter()
        total_steps = params.num_inference_steps
        marks = {"last_step": denoise_started}

        def on_step(step: int, total: int) -> None:
            now = time.perf_counter()
            marks["last_step"] = now
            elapsed = now - denoise_started
            if on_progress is not None:
                on_progress(Progress(step, total, elapsed, elapsed / step * (total - step)))
            # Raising here is what skips the VAE decode (and, in our loop, every later step).
            check_cancel()

        job = DenoiseJob(
            image=image,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=total_steps,
            true_cfg_scale=params.guidance_scale,
            positive=positive_embeds,
            negative=negative_embeds,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        )
        extra_timings: dict[str, float] = {}
        extra_latents = None
        if self.preset_info.uses_pipeline_call:

            def on_step_end(
                _pipe: Any, index: int, _timestep: Any, _tensors: dict[str, Any]
            ) -> dict[str, Any]:
                on_step(index + 1, total_steps)
                return {}

            with torch.inference_mode():
                output = self.pipe(
                    **pipeline_kwargs(job),
                    output_type="np",
                    callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=[],
                )
            video = output.frames
        else:
            monitor = self.preset_info.step_cache
            if monitor is not None:
                monitor.reset()
            kept: dict[str, Any] | None = {} if self.keep_latents else None
            video, _plan = generate_video(
                self.pipe,
                job,
                on_step=on_step,
                on_forward=monitor,
                decode_budget_bytes=self.decode_budget_bytes,
                parallel=self.parallel,
                keep_latents=kept,
            )
            if kept:
                extra_latents = kept["latents"]
            if monitor is not None and monitor.forwards:
                extra_timings["step_cache_reuse_fraction"] = monitor.reuse_fraction
        # A rank of a group other than 0 does not decode: no frames.
        frames = to_uint8_frames(video[0]) if video is not None else np.zeros((0, height, width, 3), np.uint8)
        finished = time.perf_counter()
        timings = {
            "prepare_s": text_started - started,
            "text_encode_s": denoise_started - text_started,
            "denoise_s": marks["last_step"] - denoise_started,
            "decode_s": finished - marks["last_step"],
            "total_s": finished - started,
            **extra_timings,
        }
        log.info(
            "generated %dx%dx%d in %.1fs (seed %d, %d steps, cfg %.1f, preset %s)",
            width, height, num_frames, timings["total_s"], seed, total_steps, params.guidance_scale, self.preset,
        )  # fmt: skip
        return GenerationResult(
            frames=frames,
            seed=seed,
            width=width,
            height=height,
            num_frames=num_frames,
            fps=OUTPUT_FPS,
            prompt=prompt,
            negative_prompt=negative,
            timings=timings,
            latents=extra_latents,
        )

    def _encode_prompts(self, prompt: str, negative: str | None) -> tuple[Any, Any]:
        """The prompt embeddings; in a process group encoded once on rank 0 and broadcast."""
        parallel = self.parallel
        if parallel is not None and not parallel.is_leader:
            return parallel.broadcast_embeds(None), parallel.broadcast_embeds(None)
        positive = self.prompts.encode(prompt)
        negative_embeds = self.prompts.encode(negative) if negative is not None else None
        if parallel is not None:
            parallel.broadcast_embeds(positive)
            parallel.broadcast_embeds(negative_embeds)
        return positive, negative_embeds


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """Pipeline float frames in [0, 1] -> uint8 [F, H, W, 3]."""
    return np.clip(np.rint(np.asarray(frames, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
