"""Our denoising loop (engine/denoise.py) against diffusers' own pipeline call, on the tiny model."""

from __future__ import annotations

import diffusers.models.transformers.transformer_hunyuan_video as hv
import numpy as np
import pytest
import torch
from conftest import make_test_image

from skyreels_local.engine.attention import MaskFreeHunyuanVideoAttnProcessor
from skyreels_local.engine.denoise import (
    DenoiseJob,
    denoise_latents,
    generate_video,
    pipeline_kwargs,
    trim_padding,
)
from skyreels_local.engine.loader import load_engine
from skyreels_local.engine.presets import apply_preset
from skyreels_local.engine.prompts import PromptEmbeds, PromptEncoder
from skyreels_local.engine.request import GenerationRequest
from skyreels_local.engine.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_PROMPT_TEMPLATE, build_tiny_pipeline
from skyreels_local.errors import GenerationCancelled

WIDTH, HEIGHT, FRAMES, STEPS = 64, 32, 9, 3


def encode(pipe, text: str) -> PromptEmbeds:
    encoder = PromptEncoder(
        pipe, prompt_template=TINY_PROMPT_TEMPLATE, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
    )
    return encoder.encode(text)


def initial_noise(pipe) -> torch.Tensor:
    channels = pipe.transformer.config.in_channels // 2
    shape = (1, channels, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def stock_latents(
    pipe, image, positive: PromptEmbeds, negative: PromptEmbeds, noise: torch.Tensor
) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(**pipeline_kwargs(job(image, positive, negative, noise)), output_type="latent").frames


def job(
    image, positive: PromptEmbeds, negative: PromptEmbeds | None, noise: torch.Tensor | None
) -> DenoiseJob:
    return DenoiseJob(
        image=image,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        true_cfg_scale=6.0,
        positive=positive,
        negative=negative,
        generator=torch.Generator().manual_seed(1),
        latents=None if noise is None else noise.clone(),
    )


@pytest.fixture(scope="module")
def tiny_pair():
    """Two identical tiny pipelines: one stays stock, one gets the exact preset."""
    stock, fast = build_tiny_pipeline(), build_tiny_pipeline()
    stock.set_progress_bar_config(disable=True)
    fast.set_progress_bar_config(disable=True)
    applied = apply_preset(fast, "exact")
    assert applied.mask_free and not applied.compiled  # CPU: no compile by default
    return stock, fast


def test_mask_free_loop_equals_masked_pipeline(tiny_pair, monkeypatch):
    stock, fast = tiny_pair
    image = make_test_image(WIDTH, HEIGHT)
    positive = encode(stock, "FPS-24, a red square drifts")
    negative = encode(stock, "blurry")
    # The comparison only means something if there is padding to cut.
    assert 0 < int(positive.mask.sum()) < positive.mask.shape[1]
    assert 0 < int(negative.mask.sum()) < negative.mask.shape[1]

    calls: list[tuple[bool, int]] = []
    real_dispatch = hv.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kwargs):
        calls.append((attn_mask is None, key.shape[1]))
        return real_dispatch(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(hv, "dispatch_attention_fn", spy)
    noise = initial_noise(stock)
    expected = stock_latents(stock, image, positive, negative, noise)
    stock_calls, calls[:] = list(calls), []
    ours = denoise_latents(fast, job(image, positive, negative, noise))

    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert (ours - noise).abs().max() > 1e-2  # the steps did change the latents
    # Stock attends over the padded text with a mask; ours over the real tokens, no mask.
    video_tokens = noise.shape[2] * noise.shape[3] * noise.shape[4]
    assert stock_calls and all(not free for free, _ in stock_calls)
    assert {n for _, n in stock_calls} == {video_tokens + TINY_MAX_SEQUENCE_LENGTH}
    assert calls and all(free for free, _ in calls)
    real = {video_tokens + int(positive.mask.sum()), video_tokens + int(negative.mask.sum())}
    assert {n for _, n in calls} == real
    # Two forwards per step (true CFG), each through one dual and one single block.
    assert len(calls) == len(stock_calls) == STEPS * 2 * 2


def test_mask_free_processor_is_installed_only_on_the_blocks(tiny_pair):
    _stock, fast = tiny_pair
    processors = fast.transformer.attn_processors
    block_processors = {k: v for k, v in processors.items() if "token_refiner" not in k}
    assert block_processors and all(
        isinstance(p, MaskFreeHunyuanVideoAttnProcessor) for p in block_processors.values()
    )
    refiner = [v for k, v in processors.items() if "token_refiner" in k]
    assert refiner and not any(isinstance(p, MaskFreeHunyuanVideoAttnProcessor) for p in refiner)


def test_decoded_frames_match_the_pipeline(tiny_pair):
    stock, fast = tiny_pair
    image = make_test_image(WIDTH, HEIGHT)
    positive, negative = encode(stock, "FPS-24, waves"), encode(stock, "noise")
    with torch.inference_mode():
        expected = stock(**pipeline_kwargs(job(image, positive, negative, None)), output_type="np").frames
    video, plan = generate_video(fast, job(image, positive, negative, None))
    assert video.shape == expected.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(video, expected, atol=1e-4)
    assert plan.free_bytes is None  # CPU: the VAE's own tiling setting is kept


def test_without_cfg_runs_one_forward_per_step(tiny_pair):
    stock, fast = tiny_pair
    forwards = []
    handle = fast.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        no_cfg = DenoiseJob(
            **{**job(make_test_image(), encode(stock, "x"), None, None).__dict__, "true_cfg_scale": 1.0}
        )
        denoise_latents(fast, no_cfg)
    finally:
        handle.remove()
    assert len(forwards) == STEPS


def test_cancel_in_the_loop_stops_forwards_and_skips_decode(tiny_pair, monkeypatch):
    stock, fast = tiny_pair
    forwards: list[int] = []
    decodes: list[int] = []
    handle = fast.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    real_decode = fast.vae.decode
    monkeypatch.setattr(fast.vae, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))

    def on_step(done: int, total: int) -> None:
        assert total == STEPS
        if done == 2:
            raise GenerationCancelled()

    try:
        with pytest.raises(GenerationCancelled):
            generate_video(
                fast, job(make_test_image(), encode(stock, "a"), encode(stock, "b"), None), on_step=on_step
            )
    finally:
        handle.remove()
    assert len(forwards) == 2 * 2  # two steps, two CFG branches, nothing after the cancel
    assert decodes == []


def test_trim_padding():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    embeds = PromptEmbeds(torch.randn(1, 5, 4), torch.randn(1, 3), mask)
    trimmed = trim_padding(embeds)
    assert trimmed.embeds.shape == (1, 3, 4) and trimmed.mask.shape == (1, 3)
    torch.testing.assert_close(trimmed.embeds, embeds.embeds[:, :3])
    assert trim_padding(trimmed) is trimmed  # nothing left to cut
    with pytest.raises(ValueError, match="ones followed by zeros"):
        trim_padding(PromptEmbeds(embeds.embeds, embeds.pooled, torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]])))
    with pytest.raises(ValueError, match="batch 1"):
        trim_padding(PromptEmbeds(torch.randn(2, 5, 4), torch.randn(2, 3), mask.repeat(2, 1)))


def test_trim_padding_counts_long_bf16_masks_exactly():
    # 300 ones in bf16 would sum to 300 only by luck (bf16 integers are exact up to 256).
    mask = torch.zeros(1, 320, dtype=torch.bfloat16)
    mask[:, :299] = 1
    embeds = PromptEmbeds(torch.randn(1, 320, 2, dtype=torch.bfloat16), torch.randn(1, 2), mask)
    assert trim_padding(embeds).embeds.shape[1] == 299


# --- through the Engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines():
    return load_engine("tiny-random", device="cpu", preset="stock"), load_engine(
        "tiny-random", device="cpu", preset="exact"
    )


def test_engine_exact_preset_matches_stock_frames(engines):
    stock, exact = engines
    assert (stock.preset, exact.preset) == ("stock", "exact")
    request = GenerationRequest(prompt="a square", image=make_test_image(), seed=11, num_inference_steps=4)
    a, b = stock.generate(request), exact.generate(request)
    diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
    assert a.frames.shape == b.frames.shape == (9, 32, 64, 3)
    assert diff.max() <= 1 and diff.mean() < 0.01  # float rounding only
    assert set(b.timings) >= {"prepare_s", "text_encode_s", "denoise_s", "decode_s", "total_s"}


def test_engine_reports_every_step_and_cancels_without_decode(engines, monkeypatch):
    _stock, exact = engines
    progress = []
    decodes: list[int] = []
    real_decode = exact.pipe.vae.decode
    monkeypatch.setattr(exact.pipe.vae, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    request = GenerationRequest(prompt="stop me", image=make_test_image(), seed=1, num_inference_steps=5)
    with pytest.raises(GenerationCancelled):
        exact.generate(request, on_progress=progress.append, should_cancel=lambda: len(progress) >= 2)
    assert [p.step for p in progress] == [1, 2] and all(p.total == 5 for p in progress)
    assert decodes == []

    progress.clear()
    result = exact.generate(request, on_progress=progress.append)
    assert [p.step for p in progress] == [1, 2, 3, 4, 5]
    assert progress[-1].eta_s == 0.0 and result.frames.dtype == np.uint8
    assert decodes == [1]


def test_prepare_prompts_fills_the_cache_for_the_next_generate(engines):
    _stock, exact = engines
    request = GenerationRequest(
        prompt="pre-encoded prompt 1234",
        negative_prompt="pre-encoded negative 1234",
        image=make_test_image(),
        seed=2,
        num_inference_steps=2,
    )
    misses, hits = exact.prompts.misses, exact.prompts.hits
    exact.prepare_prompts(request)
    assert exact.prompts.misses == misses + 2  # the prompt and the negative prompt
    exact.generate(request)
    assert exact.prompts.misses == misses + 2
    assert exact.prompts.hits == hits + 2


def test_warm_up_runs_a_short_generation_through_the_preset_path(engines):
    _stock, exact = engines
    forwards: list[int] = []
    handle = exact.pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        seconds = exact.warm_up()
    finally:
        handle.remove()
    assert seconds > 0 and len(forwards) == 2 * 2  # two steps, both CFG branches
