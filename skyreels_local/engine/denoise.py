"""Our denoising loop over the components of diffusers' SkyReels image-to-video pipeline.

The math is `HunyuanSkyreelsImageToVideoPipeline.__call__`'s, through the pipeline's own helpers
(image preprocessing, `prepare_latents`, `retrieve_timesteps`, the scheduler, the video
post-processor), with what the pipeline's loop cannot do:

1. The prompt padding is cut to the real token count. diffusers pads every prompt to 256 tokens
   and masks the padding in attention; with no padding the mask is all true, so the mask-free
   attention processors (attention.py) can drop it and attention runs on flash/cuDNN kernels.
   This is exact for batch 1: padded tokens are masked as keys, so real tokens never see them,
   and they are cut from the output anyway.
2. Each classifier-free-guidance branch runs inside `transformer.cache_context("cond")` /
   `("uncond")`, which diffusers' step-caching hooks (First Block Cache, TaylorSeer, MagCache)
   need to keep one cache per branch.
3. Progress and cancellation go through `on_step(steps_done, total)`, called after every step;
   it may raise (the engine raises GenerationCancelled), which ends the loop before the next
   transformer call, and the VAE decode only runs after the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video import retrieve_timesteps
from PIL import Image

from ..params import cfg_enabled
from .parallel_decode import decode_video_group
from .prompts import PromptEmbeds
from .vae_decode import TilePlan, decode_video

StepCallback = Callable[[int, int], None]  # (steps done, 1-based; total steps); may raise
ForwardObserver = Callable[[str], None]  # called inside each branch's cache context, after its forward

COND, UNCOND = "cond", "uncond"


@dataclass(frozen=True)
class DenoiseJob:
    """One generation's inputs, already resolved (size, seed, prompt embeddings)."""

    image: Image.Image | torch.Tensor
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    true_cfg_scale: float
    positive: PromptEmbeds
    negative: PromptEmbeds | None  # None: no CFG pass
    generator: torch.Generator | None = None
    guidance_scale: float = 1.0  # the transformer's embedded guidance; SkyReels runs it at 1
    latents: torch.Tensor | None = None  # initial noise; drawn from `generator` when None

    @property
    def do_cfg(self) -> bool:
        # The pipeline's rule: true CFG needs a scale above 1 and negative embeddings.
        return cfg_enabled(self.true_cfg_scale) and self.negative is not None


def pipeline_kwargs(job: DenoiseJob) -> dict[str, Any]:
    """The keyword arguments of diffusers' pipeline call (`pipe(**pipeline_kwargs(job), ...)`)
    for the same generation that `generate_video(pipe, job)` runs through our loop. The caller
    adds what differs per use: `output_type` and the step callback."""
    kwargs: dict[str, Any] = {
        "image": job.image,
        "height": job.height,
        "width": job.width,
        "num_frames": job.num_frames,
        "num_inference_steps": job.num_inference_steps,
        "true_cfg_scale": job.true_cfg_scale,
        "guidance_scale": job.guidance_scale,  # embedded guidance, 1 as upstream SkyReels
        "generator": job.generator,
        **job.positive.as_positive(),
    }
    if job.negative is not None:
        kwargs |= job.negative.as_negative()
    if job.latents is not None:
        kwargs["latents"] = job.latents
    return kwargs


def trim_padding(embeds: PromptEmbeds) -> PromptEmbeds:
    """Cut the prompt to its real tokens (the mask's leading ones). Batch 1 only.

    The transformer itself assumes the real tokens come first (it masks from the sum of the
    mask onwards), so a mask with a hole would be wrong for it too: refuse one.
    """
    mask = embeds.mask
    if mask.shape[0] != 1:
        raise ValueError(f"trim_padding handles batch 1, got a mask of shape {tuple(mask.shape)}")
    real = mask[0] != 0  # counted as booleans: a bf16 sum is inexact past 256
    length = int(real.sum().item())
    if length == mask.shape[1]:
        return embeds
    if length == 0 or not bool(real[:length].all()):
        raise ValueError("prompt attention mask must be ones followed by zeros")
    return PromptEmbeds(embeds.embeds[:, :length], embeds.pooled, mask[:, :length])


@dataclass
class PreparedLatents:
    latents: torch.Tensor  # float32 noise, [1, C, T, h, w]
    image_latents: torch.Tensor  # transformer dtype, first frame encoded, zeros after
    timesteps: torch.Tensor
    guidance: torch.Tensor


def prepare(pipe: Any, job: DenoiseJob) -> PreparedLatents:
    """Steps 4-6 of the pipeline's __call__: timesteps, latents, guidance."""
    device = pipe._execution_device
    transformer_dtype = pipe.transformer.dtype
    sigmas = np.linspace(1.0, 0.0, job.num_inference_steps + 1)[:-1]
    timesteps, _ = retrieve_timesteps(pipe.scheduler, job.num_inference_steps, device, sigmas=sigmas)
    image = pipe.video_processor.preprocess(job.image, height=job.height, width=job.width).to(
        device, pipe.vae.dtype
    )
    latents, image_latents = pipe.prepare_latents(
        image,
        1,
        pipe.transformer.config.in_channels // 2,
        job.height,
        job.width,
        job.num_frames,
        torch.float32,
        device,
        job.generator,
        job.latents,
    )
    guidance = torch.tensor([job.guidance_scale], dtype=transformer_dtype, device=device) * 1000.0
    return PreparedLatents(latents, image_latents.to(transformer_dtype), timesteps, guidance)


def cfg_velocity(
    transformer: Any,
    latent_model_input: torch.Tensor,
    timestep: torch.Tensor,
    guidance: torch.Tensor,
    positive: PromptEmbeds,
    negative: PromptEmbeds | None,
    true_cfg_scale: float,
    *,
    step_index: int | None = None,
    num_inference_steps: int | None = None,
    on_forward: ForwardObserver | None = None,
    parallel: Any = None,
) -> torch.Tensor:
    """One step's model output: the conditional forward, and with CFG the unconditional one,
    each in its own cache context, combined as the pipeline does. With a `parallel` context
    (engine/parallel.py) the two branches may run on the two halves of a process group."""

    def forward(name: str, embeds: PromptEmbeds) -> torch.Tensor:
        with transformer.cache_context(
            name, step_index=step_index, num_inference_steps=num_inference_steps, timestep=timestep
        ):
            out = transformer(
                hidden_states=latent_model_input,
                timestep=timestep,
                encoder_hidden_states=embeds.embeds,
                encoder_attention_mask=embeds.mask,
                pooled_projections=embeds.pooled,
                guidance=guidance,
                attention_kwargs=None,
                return_dict=False,
            )[0]
            if on_forward is not None:
                on_forward(name)
        return out

    if parallel is not None:
        return parallel.cfg_velocity(forward, positive, negative, true_cfg_scale)
    noise_pred = forward(COND, positive)
    if negative is not None and cfg_enabled(true_cfg_scale):
        neg_noise_pred = forward(UNCOND, negative)
        noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
    return noise_pred


def denoise_latents(
    pipe: Any,
    job: DenoiseJob,
    *,
    on_step: StepCallback | None = None,
    on_forward: ForwardObserver | None = None,
    on_begin: Callable[[], None] | None = None,
    parallel: Any = None,
) -> torch.Tensor:
    """Run all steps and return the final float32 latents (no decode). `on_begin` is called
    once the latents are prepared, right before the first step (the benchmark's clock). With a
    `parallel` context every rank of the group runs this together."""
    transformer = pipe.transformer
    with torch.inference_mode():
        positive = trim_padding(job.positive)
        negative = trim_padding(job.negative) if job.do_cfg else None
        state = prepare(pipe, job)
        if parallel is not None:
            # The same start on every rank, whatever each device's RNG or VAE rounding does:
            # rank 0's noise and encoded first frame, drawn once.
            parallel.broadcast_tensor_(state.latents)
            parallel.broadcast_tensor_(state.image_latents)
        latents = state.latents
        total = len(state.timesteps)
        # Step caches hold the previous step's residuals per branch: start every generation
        # clean (a new prompt has new text lengths) and free them when done.
        _reset_step_cache(transformer)
        if on_begin is not None:
            on_begin()
        try:
            for index, t in enumerate(state.timesteps):
                latent_model_input = torch.cat(
                    [latents.to(state.image_latents.dtype), state.image_latents], dim=1
                )
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                noise_pred = cfg_velocity(
                    transformer,
                    latent_model_input,
                    timestep,
                    state.guidance,
                    positive,
                    negative,
                    job.true_cfg_scale,
                    step_index=index,
                    num_inference_steps=total,
                    on_forward=on_forward,
                    parallel=parallel,
                )
                latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(index + 1, total)
        finally:
            _reset_step_cache(transformer)
    return latents


def decode_latents(
    pipe: Any,
    latents: torch.Tensor,
    *,
    output_type: str = "np",
    budget_bytes: int | None = None,
    parallel: Any = None,
) -> tuple[Any, TilePlan]:
    """The pipeline's decode (unscale, VAE, post-process), with tiles sized to free memory
    (capped by the memory profile's decode budget). With a `parallel` context every rank calls
    it and the decoder calls are split over the group (engine/parallel_decode.py); only rank 0
    gets the video, the others (None, plan)."""
    with torch.inference_mode():
        scaled = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        if parallel is None:
            video, plan = decode_video(pipe.vae, scaled, budget_bytes=budget_bytes)
        else:
            video, plan = decode_video_group(pipe.vae, scaled, parallel, budget_bytes=budget_bytes)
            if video is None:
                return None, plan
        return pipe.video_processor.postprocess_video(video, output_type=output_type), plan


def generate_video(
    pipe: Any,
    job: DenoiseJob,
    *,
    on_step: StepCallback | None = None,
    on_forward: ForwardObserver | None = None,
    output_type: str = "np",
    decode_budget_bytes: int | None = None,
    parallel: Any = None,
    keep_latents: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, TilePlan | None]:
    """Denoise then decode: the pipeline call's result (`output.frames`), and the tile plan.
    In a process group every rank decodes its share of the VAE tiles and rank 0 blends them;
    the others return (None, None). `keep_latents`, when given, receives the final latents
    under "latents" (tests, equivalence checks)."""
    latents = denoise_latents(pipe, job, on_step=on_step, on_forward=on_forward, parallel=parallel)
    if keep_latents is not None:
        keep_latents["latents"] = latents
    video, plan = decode_latents(
        pipe, latents, output_type=output_type, budget_bytes=decode_budget_bytes, parallel=parallel
    )
    if video is None:  # a rank of a group other than 0
        return None, None
    pipe.maybe_free_model_hooks()  # as the pipeline does, for offloading profiles
    return video, plan


def _reset_step_cache(transformer: Any) -> None:
    if getattr(transformer, "is_cache_enabled", False):
        transformer._reset_stateful_cache()
