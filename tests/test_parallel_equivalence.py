"""One video on N gloo processes (the tiny model, 4 heads) equals the one-process run.

Each split has its own case: CFG-parallel only, Ulysses only, and both; the group is real
(rank 0 is this test process, the other ranks `python -m skyreels_local.worker.group`).
Final latents must match within 1e-4 relative and the frames written to the MP4 within one grey
level (the decoded MP4s on average: see _assert_same_video).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skyreels_local.config import Settings
from skyreels_local.errors import GenerationCancelled

pytestmark = [pytest.mark.integration]

torch = pytest.importorskip("torch")

STEPS = 3


def _request(**fields):
    from skyreels_local.engine.request import GenerationRequest

    image = Image.new("RGB", (64, 32), (200, 30, 90))
    for x in range(0, 64, 8):  # some structure, so that a shuffled token shows
        image.paste((20, 180, 40), (x, 0, x + 4, 32))
    values = {
        "prompt": "a cat on a red sofa",
        "seed": 42,
        "num_inference_steps": STEPS,
        "guidance_scale": 6.0,
    }
    return GenerationRequest(image=image, **{**values, **fields})


@pytest.fixture(scope="module")
def single_process():
    """The one-process engine and its results (computed once for every case)."""
    from skyreels_local.engine.loader import load_engine

    engine = load_engine("tiny-random", device="cpu", preset="exact")
    engine.keep_latents = True
    return {
        "cfg": engine.generate(_request()),
        "no_cfg": engine.generate(_request(guidance_scale=1.0)),
    }


def _launch(world: int, **overrides):
    from skyreels_local.worker.group import launch_group

    lost: list[str] = []
    settings = Settings(model="tiny-random", gpus_per_video=world, group_timeout_s=120, **overrides)
    group = launch_group(settings, "cpu", on_group_lost=lost.append)
    group.keep_latents = True
    return group, lost


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _assert_same_video(result, reference, tmp_path):
    from skyreels_local.video import read_mp4, write_mp4

    assert result.latents.shape == reference.latents.shape
    assert _relative(result.latents, reference.latents) < 1e-4
    assert result.seed == reference.seed
    ours, _ = read_mp4(write_mp4(result.frames, tmp_path / "group.mp4", fps=result.fps))
    theirs, _ = read_mp4(write_mp4(reference.frames, tmp_path / "single.mp4", fps=reference.fps))
    assert ours.shape == theirs.shape == (9, 32, 64, 3)
    # The frames the engine hands to the encoder: within one grey level, almost all identical.
    raw = np.abs(result.frames.astype(int) - reference.frames.astype(int))
    assert int(raw.max()) <= 1 and float((raw > 0).mean()) < 1e-3
    # After H.264 (lossy): a one-level flip in a single input pixel can move the encoder's choices
    # for its block (measured: max 12 levels on 2% of pixels for 1 flipped value of 13,824), so
    # the decoded videos are compared on average and per-pixel share, not on the maximum.
    mp4 = np.abs(ours.astype(int) - theirs.astype(int))
    assert float(mp4.mean()) < 0.5 and float((mp4 <= 1).mean()) > 0.95


@pytest.mark.parametrize(
    ("world", "overrides", "split"),
    [
        pytest.param(2, {}, (2, 1), id="cfg-only-2"),
        pytest.param(2, {"cfg_parallel": False}, (1, 2), id="ulysses-only-2"),
        pytest.param(4, {}, (2, 2), id="cfg-and-ulysses-4", marks=pytest.mark.slow),
        pytest.param(4, {"ulysses": 4}, (1, 4), id="ulysses-only-4", marks=pytest.mark.slow),
    ],
)
def test_group_equals_one_process(world, overrides, split, single_process, tmp_path):
    group, lost = _launch(world, **overrides)
    try:
        assert (group.split.cfg, group.split.ulysses) == split
        _assert_same_video(group.generate(_request()), single_process["cfg"], tmp_path)
        # A job without CFG on the same group (CFG halves then both run the conditional pass).
        _assert_same_video(group.generate(_request(guidance_scale=1.0)), single_process["no_cfg"], tmp_path)
    finally:
        group.close()
    assert lost == []


def test_cancel_stops_every_rank_and_the_group_goes_on(single_process, tmp_path):
    group, lost = _launch(2, cfg_parallel=False)
    steps_seen: list[int] = []
    try:
        with pytest.raises(GenerationCancelled):
            group.generate(
                _request(num_inference_steps=10),
                on_progress=lambda p: steps_seen.append(p.step),
                should_cancel=lambda: len(steps_seen) >= 2,
            )
        assert steps_seen == [1, 2]  # stopped at the step boundary where rank 0 said so
        # Every rank left the job at the same point: the next job runs and is exact.
        _assert_same_video(group.generate(_request()), single_process["cfg"], tmp_path)
        # A drawn seed (-1) is drawn once, on rank 0, and reported.
        assert group.generate(_request(seed=-1)).seed >= 0
    finally:
        group.close()
    assert lost == []


@pytest.mark.slow
def test_turbo_step_cache_decides_the_same_on_every_ulysses_rank(tmp_path):
    """First Block Cache under Ulysses: the reuse decisions are all-reduced, so the group reuses
    exactly the steps the one-process run reuses (a rank deciding alone would hang the group)."""
    from skyreels_local.engine.loader import load_engine
    from skyreels_local.engine.presets import PresetOptions

    threshold, request = 0.3, _request(num_inference_steps=8)
    engine = load_engine(
        "tiny-random", device="cpu", preset="turbo", preset_options=PresetOptions(cache_threshold=threshold)
    )
    engine.keep_latents = True
    reference = engine.generate(request)
    reused = reference.timings["step_cache_reuse_fraction"]
    assert 0 < reused < 1  # a mix of computed and reused steps, or the test shows nothing
    group, lost = _launch(2, cfg_parallel=False, preset="turbo", turbo_threshold=threshold)
    try:
        result = group.generate(request)
        # The decision is the all-reduced one (on this tiny model the shards happen to agree even
        # without it, so also check that it is installed).
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        heads = [
            hook
            for module in group.engine.pipe.transformer.modules()
            for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).values()
            if isinstance(hook, FBCHeadBlockHook)
        ]
        assert len(heads) == 1 and heads[0]._should_compute_remaining_blocks.__name__ == "should_compute"
    finally:
        group.close()
    assert lost == []
    assert result.timings["step_cache_reuse_fraction"] == reused
    assert _relative(result.latents, reference.latents) < 1e-4
