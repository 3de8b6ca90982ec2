"""VAE decode tile size chosen from free memory (engine/vae_decode.py)."""

from __future__ import annotations

import pytest

from skyreels_local.engine.tiny import build_tiny_pipeline
from skyreels_local.engine.vae_decode import (
    DEFAULT_TILE,
    RESERVE_BYTES,
    TILE_LADDER,
    TilePlan,
    apply_plan,
    estimate_peak_bytes,
    plan_tiling,
)

GiB = 1 << 30
H, W, CHUNK = 544, 960, 17  # SkyReels 16:9, one 16+1-frame decode chunk


def test_a_large_free_memory_decodes_untiled():
    plan = plan_tiling(H, W, CHUNK, free_bytes=100 * GiB)
    assert plan == TilePlan(False, None, None, estimate_peak_bytes(H, W, CHUNK), 100 * GiB)
    assert plan.describe() == "untiled"


def test_tiles_shrink_with_free_memory():
    untiled = estimate_peak_bytes(H, W, CHUNK)
    just_short = untiled + RESERVE_BYTES - 1
    plans = [plan_tiling(H, W, CHUNK, free) for free in (just_short, 13 * GiB, 7 * GiB, 5 * GiB)]
    assert [(p.tile, p.stride) for p in plans] == list(TILE_LADDER)
    for plan in plans:
        assert plan.tiled and plan.estimated_peak_bytes <= plan.free_bytes - RESERVE_BYTES
        assert plan.tile % 8 == 0 and plan.stride % 8 == 0 and plan.stride < plan.tile


def test_too_little_memory_still_plans_the_smallest_tiles():
    plan = plan_tiling(H, W, CHUNK, free_bytes=1 * GiB)
    assert (plan.tile, plan.stride) == TILE_LADDER[-1]


def test_a_profile_budget_caps_the_plan_on_a_large_gpu():
    # The 24gb profile on an H200: 139 GiB free, but the decode must stay within 8 GiB (measured
    # on an H200: untiled, the decode alone peaked at 46.5 GiB).
    plan = plan_tiling(H, W, CHUNK, free_bytes=139 * GiB, budget_bytes=8 * GiB)
    assert plan.tiled and (plan.tile, plan.stride) == (256, 192)
    assert plan.estimated_peak_bytes <= 8 * GiB
    # A budget above what is free changes nothing.
    assert plan_tiling(H, W, CHUNK, 5 * GiB, budget_bytes=64 * GiB) == plan_tiling(H, W, CHUNK, 5 * GiB)


def test_profiles_carry_their_decode_budget():
    import torch

    from skyreels_local.engine.profiles import resolve_profile

    cuda = torch.device("cuda")
    assert resolve_profile("24gb", cuda).vae.decode_budget_bytes == 8 * GiB
    assert resolve_profile("80gb", cuda).vae.decode_budget_bytes is None


def test_unknown_free_memory_keeps_diffusers_default():
    plan = plan_tiling(H, W, CHUNK, free_bytes=None)
    assert (plan.tile, plan.stride) == DEFAULT_TILE and plan.describe() == "tiles 256/192"


@pytest.mark.parametrize("plan", [plan_tiling(H, W, CHUNK, 100 * GiB), plan_tiling(H, W, CHUNK, 5 * GiB)])
def test_plans_are_applied_to_the_vae(plan):
    vae = build_tiny_pipeline().vae
    vae.enable_tiling()
    apply_plan(vae, plan)
    assert vae.use_tiling == plan.tiled
    if plan.tiled:
        assert (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (plan.tile, plan.stride)
