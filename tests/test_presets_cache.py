"""The turbo preset's step cache inside our loop: both CFG branches, their own caches, compile."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import make_test_image
from torch._dynamo.testing import CompileCounter

from skyreels_local.engine.denoise import DenoiseJob, denoise_latents
from skyreels_local.engine.loader import load_engine
from skyreels_local.engine.presets import (
    PresetOptions,
    RegionHooked,
    StepCacheMonitor,
    apply_preset,
    compile_regions,
)
from skyreels_local.engine.prompts import PromptEncoder
from skyreels_local.engine.request import GenerationRequest
from skyreels_local.engine.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_PROMPT_TEMPLATE, build_tiny_pipeline

STEPS = 4
NEVER_REUSE, ALWAYS_REUSE = 0.0, 1e9


def make_job(pipe) -> DenoiseJob:
    encoder = PromptEncoder(
        pipe, prompt_template=TINY_PROMPT_TEMPLATE, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
    )
    # Different real lengths: a cache shared by both branches would mix up their shapes.
    positive, negative = encoder.encode("FPS-24, a long positive prompt"), encoder.encode("short")
    assert int(positive.mask.sum()) != int(negative.mask.sum())
    return DenoiseJob(
        image=make_test_image(),
        height=32,
        width=64,
        num_frames=9,
        num_inference_steps=STEPS,
        true_cfg_scale=6.0,
        positive=positive,
        negative=negative,
        generator=torch.Generator().manual_seed(3),
    )


@pytest.fixture
def turbo_pipe():
    pipe = build_tiny_pipeline()
    applied = apply_preset(pipe, "turbo", PresetOptions(cache_threshold=ALWAYS_REUSE))
    return pipe, applied.step_cache


def spy_cache_contexts(transformer, monkeypatch) -> list[tuple[str, int]]:
    names: list[tuple[str, int]] = []
    real = transformer.cache_context

    @contextlib.contextmanager
    def spy(name, **kwargs):
        names.append((name, kwargs.get("step_index")))
        with real(name, **kwargs):
            yield

    monkeypatch.setattr(transformer, "cache_context", spy)
    return names


def test_both_cfg_branches_run_in_their_own_cache_context(turbo_pipe, monkeypatch):
    pipe, monitor = turbo_pipe
    names = spy_cache_contexts(pipe.transformer, monkeypatch)
    forwards, tail_runs = [], []
    hooks = [
        pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1)),
        # The last block's output projection only runs when the cache is not reused.
        pipe.transformer.single_transformer_blocks[-1].proj_out.register_forward_pre_hook(
            lambda *_: tail_runs.append(1)
        ),
    ]
    try:
        denoise_latents(pipe, make_job(pipe), on_forward=monitor)
    finally:
        for hook in hooks:
            hook.remove()
    assert names == [(branch, step) for step in range(STEPS) for branch in ("cond", "uncond")]
    assert len(forwards) == 2 * STEPS
    # First step computes both branches; every later one reuses each branch's own cache.
    assert monitor.computed == {"cond": 1, "uncond": 1}
    assert monitor.reused == {"cond": STEPS - 1, "uncond": STEPS - 1}
    assert monitor.reuse_fraction == pytest.approx((STEPS - 1) / STEPS)
    assert len(tail_runs) == 2


def test_threshold_decides_between_exact_and_reused_output(turbo_pipe):
    pipe, monitor = turbo_pipe
    reference = build_tiny_pipeline()
    apply_preset(reference, "exact")
    exact = denoise_latents(reference, make_job(reference))

    monitor.threshold = NEVER_REUSE
    monitor.reset()
    never = denoise_latents(pipe, make_job(pipe), on_forward=monitor)
    assert sum(monitor.reused.values()) == 0
    torch.testing.assert_close(never, exact)

    monitor.threshold = ALWAYS_REUSE
    monitor.reset()
    always = denoise_latents(pipe, make_job(pipe), on_forward=monitor)
    assert sum(monitor.reused.values()) == 2 * (STEPS - 1)
    assert (always - exact).abs().max() > 1e-3  # reusing steps changes the result

    with pytest.raises(ValueError, match="threshold must be >= 0"):
        monitor.threshold = -1.0


def test_cache_state_is_reset_between_generations(turbo_pipe):
    pipe, monitor = turbo_pipe
    first = denoise_latents(pipe, make_job(pipe), on_forward=monitor)
    monitor.reset()
    second = denoise_latents(pipe, make_job(pipe), on_forward=monitor)
    # Had the second run started from the first one's cache, its first step would be reused.
    assert monitor.computed == {"cond": 1, "uncond": 1}
    torch.testing.assert_close(first, second)


def test_engine_turbo_reports_its_reuse_fraction():
    engine = load_engine(
        "tiny-random",
        device="cpu",
        preset="turbo",
        preset_options=PresetOptions(cache_threshold=ALWAYS_REUSE),
    )
    assert engine.preset == "turbo"
    request = GenerationRequest(prompt="turbo", image=make_test_image(), seed=5, num_inference_steps=5)
    result = engine.generate(request)
    assert result.timings["step_cache_reuse_fraction"] == pytest.approx(4 / 5)
    assert result.frames.shape == (9, 32, 64, 3)


@pytest.mark.slow
def test_compiled_regions_under_the_step_cache():
    """Regional compile of the blocks' forward, then cache hooks around the compiled functions:
    one graph per block class (no recompile per step or per text length), same numbers."""
    eager_pipe = build_tiny_pipeline()
    apply_preset(eager_pipe, "exact")
    expected = denoise_latents(eager_pipe, make_job(eager_pipe))

    pipe = build_tiny_pipeline()
    apply_preset(pipe, "exact")
    counter = CompileCounter()
    regions = compile_regions(pipe.transformer, dynamic=True, backend=counter)
    assert regions == 2  # the dual-stream and the single-stream block (one each in the tiny model)
    monitor = StepCacheMonitor(pipe.transformer, threshold=NEVER_REUSE)
    with pytest.raises(RegionHooked):  # compiling under hooks would trace the hooks: refused
        _compile_hooked()
    got = denoise_latents(pipe, make_job(pipe), on_forward=monitor)
    torch.testing.assert_close(got, expected)
    graphs = counter.frame_count
    assert graphs == 2  # one graph per block class, for both branches' text lengths and all steps
    denoise_latents(pipe, make_job(pipe), on_forward=monitor)
    assert counter.frame_count == graphs  # a second generation compiles nothing


def _compile_hooked() -> None:
    """Enable the cache first, then try to compile."""
    pipe = build_tiny_pipeline()
    StepCacheMonitor(pipe.transformer, threshold=NEVER_REUSE)
    compile_regions(pipe.transformer, backend="eager")
