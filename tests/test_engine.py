"""The engine on the tiny seeded model: SkyReels semantics, seeds, progress and cancellation."""

from __future__ import annotations

import numpy as np
import pytest

from skyreels_local.engine.engine import Progress
from skyreels_local.engine.request import DEFAULT_NEGATIVE_PROMPT, GenerationRequest
from skyreels_local.errors import GenerationCancelled
from tests.conftest import make_test_image


def request(**overrides) -> GenerationRequest:
    fields = {
        "prompt": "a red kite over a beach",
        "image": make_test_image(),
        "seed": 7,
        "num_inference_steps": 3,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


class TransformerCallCounter:
    """Counts transformer forwards without changing them (wraps the module's forward)."""

    def __init__(self, engine, monkeypatch):
        self.calls = 0
        transformer = engine.pipe.transformer
        original = transformer.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(transformer, "forward", counted)


def test_default_geometry_landscape_and_portrait(tiny_engine):
    landscape = tiny_engine.generate(request(aspect_ratio="16:9"))
    portrait = tiny_engine.generate(request(aspect_ratio="9:16"))
    assert landscape.frames.shape == (9, 32, 64, 3)
    assert portrait.frames.shape == (9, 64, 32, 3)
    assert landscape.frames.dtype == np.uint8
    assert (landscape.fps, landscape.num_frames) == (24, 9)


def test_size_overrides(tiny_engine):
    result = tiny_engine.generate(request(width=48, height=16, num_frames=5))
    assert result.frames.shape == (5, 16, 48, 3)
    assert (result.width, result.height, result.num_frames) == (48, 16, 5)


def test_same_seed_same_video_other_seed_differs(tiny_engine):
    first = tiny_engine.generate(request(seed=123))
    again = tiny_engine.generate(request(seed=123))
    other = tiny_engine.generate(request(seed=124))
    assert np.array_equal(first.frames, again.frames)
    assert not np.array_equal(first.frames, other.frames)
    assert first.seed == 123


def test_random_seed_is_returned_and_reproduces(tiny_engine):
    drawn = tiny_engine.generate(request(seed=-1))
    assert 0 <= drawn.seed <= 2_147_483_647
    replay = tiny_engine.generate(request(seed=drawn.seed))
    assert np.array_equal(drawn.frames, replay.frames)


def test_fps_prefix_added_once(tiny_engine, monkeypatch):
    encoded: list[str] = []
    original = tiny_engine.prompts._encode_uncached
    monkeypatch.setattr(
        tiny_engine.prompts, "_encode_uncached", lambda text: encoded.append(text) or original(text)
    )
    tiny_engine.prompts.clear()
    plain = tiny_engine.generate(request(prompt="a cat on a wall"))
    prefixed = tiny_engine.generate(request(prompt="FPS-24, a cat on a wall"))
    assert plain.prompt == "FPS-24, a cat on a wall"
    assert prefixed.prompt == "FPS-24, a cat on a wall"
    assert "FPS-24, a cat on a wall" in encoded
    assert not any(text.startswith("FPS-24, FPS-24") for text in encoded)


def test_default_negative_prompt_runs_true_cfg(tiny_engine, monkeypatch):
    counter = TransformerCallCounter(tiny_engine, monkeypatch)
    result = tiny_engine.generate(request(num_inference_steps=3, guidance_scale=6.0))
    assert result.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert counter.calls == 2 * 3  # conditional + unconditional pass per step


def test_guidance_one_runs_single_pass(tiny_engine, monkeypatch):
    counter = TransformerCallCounter(tiny_engine, monkeypatch)
    result = tiny_engine.generate(request(num_inference_steps=3, guidance_scale=1.0))
    assert result.negative_prompt is None
    assert counter.calls == 3


def test_guidance_scale_changes_output(tiny_engine):
    low = tiny_engine.generate(request(guidance_scale=2.0))
    high = tiny_engine.generate(request(guidance_scale=9.0))
    assert not np.array_equal(low.frames, high.frames)


def test_custom_negative_prompt_is_used(tiny_engine):
    result = tiny_engine.generate(request(negative_prompt="blurry, dark"))
    assert result.negative_prompt == "blurry, dark"


def test_prompt_embeddings_cached_for_repeated_prompts(tiny_engine):
    tiny_engine.prompts.clear()
    misses = tiny_engine.prompts.misses
    tiny_engine.generate(request(prompt="one"))
    tiny_engine.generate(request(prompt="two"))
    # "one", "two" and the default negative prompt: three encodings, not four.
    assert tiny_engine.prompts.misses - misses == 3


def test_image_is_centre_cropped_before_the_pipeline(tiny_engine, monkeypatch):
    seen = {}
    original = tiny_engine.pipe.video_processor.preprocess

    def spy(image, *args, **kwargs):
        seen["image"] = image
        return original(image, *args, **kwargs)

    monkeypatch.setattr(tiny_engine.pipe.video_processor, "preprocess", spy)
    # 4:3 input with blue side bars and a red centre; 16:9 target crops top and bottom, not the centre.
    tiny_engine.generate(request(image=make_test_image(400, 300), width=64, height=32))
    image = np.asarray(seen["image"])
    assert image.shape == (32, 64, 3)
    centre = image[16, 32]
    assert centre[0] > 200 and centre[1] < 60 and centre[2] < 60


def test_progress_reported_every_step(tiny_engine):
    reports: list[Progress] = []
    tiny_engine.generate(request(num_inference_steps=4), on_progress=reports.append)
    assert [p.step for p in reports] == [1, 2, 3, 4]
    assert all(p.total == 4 for p in reports)
    assert reports[-1].eta_s == 0
    assert all(p.elapsed_s >= 0 and p.eta_s >= 0 for p in reports)
    assert reports[-1].fraction == 1.0


@pytest.mark.parametrize("cancel_after", [1, 2])
def test_cancel_after_step_k_stops_without_decode(tiny_engine, monkeypatch, cancel_after):
    counter = TransformerCallCounter(tiny_engine, monkeypatch)
    decodes = []
    original_decode = tiny_engine.pipe.vae.decode
    monkeypatch.setattr(
        tiny_engine.pipe.vae, "decode", lambda *a, **k: decodes.append(1) or original_decode(*a, **k)
    )
    steps_done: list[int] = []
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate(
            request(num_inference_steps=5),
            on_progress=lambda p: steps_done.append(p.step),
            should_cancel=lambda: len(steps_done) >= cancel_after,
        )
    assert steps_done == list(range(1, cancel_after + 1))
    assert counter.calls == 2 * cancel_after  # no transformer call after the cancel
    assert decodes == []


def test_cancel_before_start_runs_nothing(tiny_engine, monkeypatch):
    counter = TransformerCallCounter(tiny_engine, monkeypatch)
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate(request(), should_cancel=lambda: True)
    assert counter.calls == 0


def test_engine_is_usable_after_a_cancel(tiny_engine):
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate(request(), should_cancel=lambda: True)
    assert tiny_engine.generate(request(seed=5)).frames.shape[0] == 9
