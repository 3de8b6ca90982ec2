"""The generation engine: one call from a request to decoded video frames.

`Engine.generate` applies the SkyReels conventions (size per aspect ratio, the "FPS-24, " prefix,
centre crop, default negative prompt, true CFG), runs diffusers' pipeline, reports progress after
every step and stops at the next step boundary when asked to cancel. Cancelling raises from the
step callback, because the pipeline's own `_interrupt` flag still runs the VAE decode.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import GenerationCancelled
from .images import centre_crop_resize
from .prompts import PromptEncoder, TextEncoderResidency
from .request import (
    DEFAULT_NEGATIVE_PROMPT,
    OUTPUT_FPS,
    SEED_MAX,
    GenerationRequest,
    ModelGeometry,
    with_fps_prefix,
)

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


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a loaded model beyond its pipeline."""

    name: str
    geometry: ModelGeometry
    prompt_template: dict[str, Any] | None = None  # None: the pipeline's own (real SkyReels) template
    max_sequence_length: int = 256


def draw_seed() -> int:
    """A fresh seed for `seed: -1`, in the contract's range."""
    return secrets.randbelow(SEED_MAX + 1)


class Engine:
    """Owns a loaded pipeline and runs one generation at a time."""

    def __init__(
        self,
        pipe: Any,
        spec: ModelSpec,
        *,
        profile: str = "default",
        text_encoders: TextEncoderResidency | None = None,
    ) -> None:
        self.pipe = pipe
        self.spec = spec
        self.profile = profile  # the memory profile's name (profiles.py), shown in /ready and logs
        self.prompts = PromptEncoder(
            pipe,
            prompt_template=spec.prompt_template,
            max_sequence_length=spec.max_sequence_length,
            residency=text_encoders,
        )
        # One generation at a time: the pipeline and its scheduler hold per-call state.
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        request.validate()
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
        width, height, num_frames = self.spec.geometry.resolve(request)
        seed = request.seed if request.seed >= 0 else draw_seed()
        prompt = with_fps_prefix(request.prompt)
        # True CFG only runs when the pipeline gets negative embeddings: give it the SkyReels
        # default whenever the caller gave none, so guidance_scale is never silently ignored.
        do_cfg = request.guidance_scale > 1.0
        negative = ((request.negative_prompt or "").strip() or DEFAULT_NEGATIVE_PROMPT) if do_cfg else None

        image = centre_crop_resize(request.image, width, height)

        text_started = time.perf_counter()
        embed_kwargs = self.prompts.encode(prompt).as_positive()
        if negative is not None:
            embed_kwargs |= self.prompts.encode(negative).as_negative()
        check_cancel()

        denoise_started = time.perf_counter()
        total_steps = request.num_inference_steps
        marks = {"last_step": denoise_started}

        def on_step_end(_pipe: Any, index: int, _timestep: Any, _tensors: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            marks["last_step"] = now
            step = index + 1
            elapsed = now - denoise_started
            if on_progress is not None:
                on_progress(Progress(step, total_steps, elapsed, elapsed / step * (total_steps - step)))
            # Raising here (not setting pipe._interrupt) is what skips the VAE decode.
            check_cancel()
            return {}

        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.inference_mode():
            output = self.pipe(
                image=image,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=total_steps,
                true_cfg_scale=request.guidance_scale,
                guidance_scale=1.0,  # embedded guidance, as upstream SkyReels
                generator=generator,
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=[],
                **embed_kwargs,
            )
        frames = to_uint8_frames(output.frames[0])
        finished = time.perf_counter()
        timings = {
            "prepare_s": text_started - started,
            "text_encode_s": denoise_started - text_started,
            "denoise_s": marks["last_step"] - denoise_started,
            "decode_s": finished - marks["last_step"],
            "total_s": finished - started,
        }
        log.info(
            "generated %dx%dx%d in %.1fs (seed %d, %d steps, cfg %.1f)",
            width, height, num_frames, timings["total_s"], seed, total_steps, request.guidance_scale,
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
        )


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """Pipeline float frames in [0, 1] -> uint8 [F, H, W, 3]."""
    return np.clip(np.rint(np.asarray(frames, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
