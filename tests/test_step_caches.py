"""turbo's step caches as named options (--step-cache): schedules, counts, output, settings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_presets_cache import make_job

from skyreels_local.config import Settings
from skyreels_local.engine.denoise import denoise_latents
from skyreels_local.engine.presets import PresetOptions, apply_preset
from skyreels_local.engine.step_cache import (
    FirstBlockCache,
    MagCache,
    MagCacheSchedule,
    TaylorSeerCache,
    TaylorSeerSchedule,
    install_step_cache,
    load_profile,
    remove_step_cache,
)
from skyreels_local.engine.tiny import build_tiny_pipeline
from skyreels_local.errors import InvalidInputError
from skyreels_local.preset_names import DEFAULT_STEP_CACHE, STEP_CACHES

SCHEDULED = ("taylorseer", "magcache")


def _job(pipe, steps: int):
    return replace(make_job(pipe), num_inference_steps=steps)


@pytest.fixture(scope="module")
def exact_latents():
    """The no-cache result (exact preset) at 12 and 30 steps."""
    pipe = build_tiny_pipeline()
    apply_preset(pipe, "exact")
    return {steps: denoise_latents(pipe, _job(pipe, steps)) for steps in (12, 30)}


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


# --- the schedules (pure) --------------------------------------------------------------------


def test_taylorseer_schedule_is_warmup_then_one_step_per_interval():
    schedule = TaylorSeerSchedule.from_profile(load_profile()["taylorseer"])
    assert (schedule.cache_interval, schedule.warmup_steps) == (3, 3)
    computed = [i for i, c in enumerate(schedule.computed_steps(30)) if c]
    assert computed == [0, 1, 2, 4, 7, 10, 13, 16, 19, 22, 25, 28]


def test_magcache_schedule_from_the_shipped_hunyuanvideo_ratios():
    table = load_profile()["magcache"]
    schedule = MagCacheSchedule.from_profile(table)
    assert len(schedule.ratios) == 50 and schedule.ratios[0] == 1.0  # 50-step calibration
    assert schedule.ratios[-1] == pytest.approx(0.76592)
    plan = schedule.computed_steps(30)
    # Retention: the first round(0.2 x 30) = 6 steps always compute.
    assert all(plan[:6])
    assert sum(plan) == 11 and len(plan) == 30
    # Never more than max_skip_steps reused in a row.
    run = longest = 0
    for computed in plan:
        run = 0 if computed else run + 1
        longest = max(longest, run)
    assert 0 < longest <= schedule.max_skip_steps
    # Resampled to the step count as diffusers does (nearest): 50 -> 30 keeps the ends.
    ratios = schedule.ratios_for(30)
    assert len(ratios) == 30 and float(ratios[-1]) == pytest.approx(0.76592)


def test_magcache_threshold_zero_reuses_nothing():
    schedule = MagCacheSchedule(
        ratios=(1.0, 1.1, 1.05, 1.2), threshold=0.0, max_skip_steps=3, retention_ratio=0
    )
    assert schedule.computed_steps(4) == [True, True, True, True]
    # All ratios 1: no error ever accumulates, so only max_skip_steps limits the reuse.
    flat = MagCacheSchedule(ratios=(1.0,) * 8, threshold=0.1, max_skip_steps=2, retention_ratio=0)
    assert flat.computed_steps(8) == [True, False, False, True, False, False, True, False]


# --- each option on the tiny model ----------------------------------------------------------


@pytest.mark.parametrize("option", SCHEDULED)
@pytest.mark.parametrize("steps", [12, 30])
def test_scheduled_cache_reuses_what_its_schedule_says(option, steps, exact_latents):
    pipe = build_tiny_pipeline()
    applied = apply_preset(pipe, "turbo", PresetOptions(step_cache=option))
    cache = applied.step_cache
    assert cache.option == option and applied.summary()["step_cache"] == cache.describe()
    latents = denoise_latents(pipe, _job(pipe, steps), on_forward=cache)
    planned = sum(cache.planned_computed(steps))
    assert 0 < planned < steps
    assert dict(cache.computed) == {"cond": planned, "uncond": planned}
    assert dict(cache.reused) == {"cond": steps - planned, "uncond": steps - planned}
    # Reused steps change the result, by a bounded amount (measured 1.1-2.3% on this model).
    error = _relative(latents, exact_latents[steps])
    assert 1e-4 < error < 0.1, error


def test_magcache_follows_each_generations_step_count():
    pipe = build_tiny_pipeline()
    cache = apply_preset(pipe, "turbo", PresetOptions(step_cache="magcache")).step_cache
    for steps in (30, 12, 30):
        cache.reset()
        denoise_latents(pipe, _job(pipe, steps), on_forward=cache)
        assert cache.computed["cond"] == sum(cache.planned_computed(steps)), steps
        assert cache.config.num_inference_steps == steps


def test_fbcache_stays_the_default_with_its_threshold():
    assert DEFAULT_STEP_CACHE == "fbcache" == Settings().step_cache
    pipe = build_tiny_pipeline()
    cache = apply_preset(pipe, "turbo", PresetOptions(cache_threshold=1e9)).step_cache
    assert isinstance(cache, FirstBlockCache) and cache.planned_computed(4) is None
    denoise_latents(pipe, _job(pipe, 4), on_forward=cache)
    assert dict(cache.computed) == {"cond": 1, "uncond": 1}
    assert dict(cache.reused) == {"cond": 3, "uncond": 3}


def test_caches_replace_one_another_and_come_off():
    pipe = build_tiny_pipeline()
    apply_preset(pipe, "exact")
    transformer = pipe.transformer
    expected = {"fbcache": FirstBlockCache, "taylorseer": TaylorSeerCache, "magcache": MagCache}
    for option in (*STEP_CACHES, "fbcache"):
        cache = install_step_cache(transformer, option, threshold=0.1)
        assert type(cache) is expected[option] and transformer.is_cache_enabled
    remove_step_cache(transformer)
    assert not transformer.is_cache_enabled
    assert not transformer._forward_pre_hooks  # MagCache's step-count hook is gone too


def test_unknown_step_cache_is_refused_naming_the_field():
    with pytest.raises(InvalidInputError) as info:
        apply_preset(build_tiny_pipeline(), "turbo", PresetOptions(step_cache="teacache"))
    assert "step_cache" in str(info.value) and "teacache" in str(info.value)


def test_settings_and_engine_carry_the_option(monkeypatch):
    from skyreels_local.engine.request import GenerationRequest
    from skyreels_local.worker.loading import load_configured_engine

    monkeypatch.setenv("SKYREELS_STEP_CACHE", "taylorseer")
    settings = Settings(model="tiny-random", preset="turbo")
    assert settings.step_cache == "taylorseer"
    engine = load_configured_engine(settings, "cpu")
    cache = engine.preset_info.step_cache
    assert isinstance(cache, TaylorSeerCache)
    from conftest import make_test_image

    result = engine.generate(
        GenerationRequest(prompt="x", image=make_test_image(), seed=1, num_inference_steps=8)
    )
    planned = cache.planned_computed(8)
    assert result.timings["step_cache_reuse_fraction"] == pytest.approx(1 - sum(planned) / 8)


def test_generate_cli_lists_the_flag():
    from skyreels_local.cli.generate import GENERATE_FIELDS

    assert "step_cache" in GENERATE_FIELDS


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("option", SCHEDULED)
def test_scheduled_cache_decides_the_same_on_every_ulysses_rank(option):
    """A group of 2 (Ulysses x2): the schedule-based caches need no communication to agree; the
    group reuses exactly the one-process steps and ends on the same latents."""
    from test_parallel_equivalence import _launch, _relative, _request

    from skyreels_local.engine.loader import load_engine

    request = _request(num_inference_steps=8)
    engine = load_engine(
        "tiny-random", device="cpu", preset="turbo", preset_options=PresetOptions(step_cache=option)
    )
    engine.keep_latents = True
    reference = engine.generate(request)
    fraction = reference.timings["step_cache_reuse_fraction"]
    assert 0 < fraction < 1
    group, lost = _launch(2, cfg_parallel=False, preset="turbo", step_cache=option)
    try:
        result = group.generate(request)
        assert group.engine.preset_info.step_cache.option == option
    finally:
        group.close()
    assert lost == []
    assert result.timings["step_cache_reuse_fraction"] == fraction
    assert _relative(result.latents, reference.latents) < 1e-4


def test_reuse_counts_are_the_same_with_a_cfg_parallel_split_layout():
    """Each branch keeps its own state: running only one branch (what a CFG-parallel rank does)
    decides as that branch does in the one-process loop."""
    from skyreels_local.engine.denoise import COND

    pipe = build_tiny_pipeline()
    cache = apply_preset(pipe, "turbo", PresetOptions(step_cache="taylorseer")).step_cache
    job = replace(_job(pipe, 12), negative=None)  # cond branch only
    denoise_latents(pipe, job, on_forward=cache)
    assert dict(cache.computed) == {COND: sum(cache.planned_computed(12))}
    assert torch.isfinite(torch.tensor(cache.reuse_fraction))
