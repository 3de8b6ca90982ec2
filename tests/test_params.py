"""GenerationParams, the one parameter contract: defaults, limits, SkyReels semantics, JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from skyreels_local.errors import InvalidInputError, MissingInputError
from skyreels_local.jobs import Database
from skyreels_local.params import (
    DEFAULT_NEGATIVE_PROMPT,
    MAX_PROMPT_CHARS,
    SEED_MAX,
    SKYREELS_GEOMETRY,
    GenerationParams,
    cfg_enabled,
)
from skyreels_local.server.schemas import SkyReelsInput, parse_skyreels_input
from skyreels_local.worker.main import stored_params

IMAGE = "https://example.com/a.png"


def test_defaults_are_the_hosted_apis():
    params = GenerationParams(prompt="a boat")
    assert (params.seed, params.guidance_scale, params.num_inference_steps, params.aspect_ratio) == (
        -1,
        6.0,
        30,
        "16:9",
    )
    assert params.negative_prompt is None and params.image is None
    assert (params.width, params.height, params.num_frames) == (None, None, None)
    assert SKYREELS_GEOMETRY.resolve(params) == (960, 544, 97)


def test_wire_schema_takes_its_defaults_and_limits_from_params():
    wire = SkyReelsInput.model_json_schema()["properties"]
    ours = GenerationParams.model_json_schema()["properties"]
    for name in (
        "prompt",
        "seed",
        "guidance_scale",
        "num_inference_steps",
        "negative_prompt",
        "aspect_ratio",
    ):
        for key in ("default", "minimum", "maximum", "maxLength"):
            assert wire[name].get(key) == ours[name].get(key), (name, key)
    assert wire["prompt"]["maxLength"] == MAX_PROMPT_CHARS
    assert wire["guidance_scale"]["default"] == 6.0 and wire["guidance_scale"]["maximum"] == 20.0


def test_parsed_submit_carries_the_validated_params():
    parsed = parse_skyreels_input({"prompt": "x", "image": IMAGE, "guidance_scale": 2, "unknown": 1})
    assert parsed.params == GenerationParams(prompt="x", image=IMAGE, guidance_scale=2.0)


@pytest.mark.parametrize(
    ("fields", "field", "shown"),
    [
        ({"guidance_scale": 25}, "guidance_scale", "25"),
        ({"guidance_scale": True}, "guidance_scale", "True"),
        ({"guidance_scale": "6"}, "guidance_scale", "'6'"),
        ({"seed": "7"}, "seed", "'7'"),
        ({"num_inference_steps": 51}, "num_inference_steps", "51"),
        ({"aspect_ratio": "1:1"}, "aspect_ratio", "'1:1'"),
        ({"width": 17}, "width", "17"),
        ({"num_frames": 96}, "num_frames", "96"),
        ({"negative_prompt": 3}, "negative_prompt", "3"),
        ({"image": ""}, "image", "''"),
    ],
)
def test_bad_values_are_the_contracts_error(fields, field, shown):
    with pytest.raises(InvalidInputError) as info:
        GenerationParams(prompt="x", **fields)
    assert info.value.field == field
    assert info.value.message.startswith(f"`{field}` must ")
    assert info.value.message.endswith(f"got {shown}")


def test_exact_message_of_the_contract():
    with pytest.raises(InvalidInputError) as info:
        GenerationParams(prompt="x", guidance_scale=25)
    assert info.value.message == "`guidance_scale` must be a number from 1 to 20, got 25"


def test_first_bad_field_wins_in_contract_order():
    with pytest.raises(InvalidInputError) as info:
        GenerationParams(prompt="x", seed=-5, guidance_scale=99)
    assert info.value.field == "seed"


def test_missing_prompt_and_unknown_field():
    with pytest.raises(MissingInputError, match="`prompt` is required"):
        GenerationParams(seed=1)
    with pytest.raises(ValueError, match="steps"):  # a typo in code, not user input
        GenerationParams(prompt="x", steps=3)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_length_cap(field):
    at_cap = "a" * MAX_PROMPT_CHARS
    fields = {"prompt": "x", field: at_cap}
    assert getattr(GenerationParams(**fields), field) == at_cap
    with pytest.raises(InvalidInputError) as info:
        GenerationParams(**{**fields, field: at_cap + "a"})
    assert info.value.field == field
    # The length, not a 2 KB text, is echoed back.
    assert (
        info.value.message
        == f"`{field}` must be at most {MAX_PROMPT_CHARS} characters, got {MAX_PROMPT_CHARS + 1}"
    )


def test_prompt_cap_is_a_400_at_submit():
    with pytest.raises(InvalidInputError, match="`prompt` must be at most 2000 characters, got 2001"):
        parse_skyreels_input({"prompt": "p" * 2001, "image": IMAGE})


def test_fps_prefix_and_default_negative_prompt_with_cfg():
    params = GenerationParams(prompt="  a cat ", guidance_scale=6.0)
    assert params.cfg_enabled
    assert params.encoder_prompt == "FPS-24, a cat"
    assert params.encoder_negative_prompt == DEFAULT_NEGATIVE_PROMPT
    own = GenerationParams(prompt="FPS-24, a cat", negative_prompt=" blur ")
    assert own.encoder_prompt == "FPS-24, a cat" and own.encoder_negative_prompt == "blur"
    blank = GenerationParams(prompt="a cat", negative_prompt="   ")
    assert blank.encoder_negative_prompt == DEFAULT_NEGATIVE_PROMPT


def test_guidance_one_disables_cfg_and_the_negative_prompt():
    params = GenerationParams(prompt="a cat", guidance_scale=1, negative_prompt="blur")
    assert not params.cfg_enabled and params.encoder_negative_prompt is None
    assert (cfg_enabled(1.0), cfg_enabled(1.01)) == (False, True)


def test_seed_minus_one_is_drawn_once():
    drawn = GenerationParams(prompt="x").with_drawn_seed()
    assert 0 <= drawn.seed <= SEED_MAX
    assert drawn.with_drawn_seed() is drawn  # a concrete seed is kept
    assert GenerationParams(prompt="x", seed=0).with_drawn_seed().seed == 0


def test_geometry_per_aspect_ratio_and_overrides():
    assert SKYREELS_GEOMETRY.resolve(GenerationParams(prompt="x", aspect_ratio="9:16")) == (544, 960, 97)
    overridden = GenerationParams(prompt="x", width=64, height=32, num_frames=9)
    assert SKYREELS_GEOMETRY.resolve(overridden) == (64, 32, 9)


def test_json_round_trip_is_unchanged():
    params = GenerationParams(
        prompt="a boat", image=IMAGE, negative_prompt="blur", seed=7, guidance_scale=2.5,
        num_inference_steps=4, aspect_ratio="9:16", width=64, height=32, num_frames=9,
    )  # fmt: skip
    text = params.to_json()
    assert GenerationParams.from_json(text) == params
    assert json.loads(text)["guidance_scale"] == 2.5
    with pytest.raises(InvalidInputError, match="guidance_scale"):  # a tampered row is refused
        GenerationParams.from_json(text.replace("2.5", "25"))


def stored(tmp_path, params: dict, seed: int):
    """The job as the worker gets it after a round trip through the real job table."""
    store = Database(tmp_path / "jobs.db")
    try:
        store.predictions.create(
            id="a" * 32, model="m", input={}, params=params, seed=seed, base_url="http://s"
        )
        return store.predictions.get_full("a" * 32)
    finally:
        store.close()


def test_worker_reads_back_what_submit_stored(tmp_path):
    submitted = parse_skyreels_input({"prompt": "x", "image": IMAGE, "num_inference_steps": 3}).params
    params = submitted.with_drawn_seed()
    job = stored(tmp_path, params.model_dump(mode="json"), seed=params.seed)
    assert stored_params(job) == params


def test_worker_reads_a_row_from_before_the_seed_was_in_params(tmp_path):
    legacy = {"prompt": "x", "image": IMAGE, "guidance_scale": 6.0, "num_inference_steps": 3}
    params = stored_params(stored(tmp_path, legacy, seed=42))
    assert (params.seed, params.num_inference_steps, params.image) == (42, 3, IMAGE)


def test_params_module_imports_neither_torch_nor_pil():
    code = "import sys, skyreels_local.params, skyreels_local.server.schemas; print('torch' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cli_shows_the_same_field_named_error_before_loading_anything(tmp_path, test_image_path):
    result = subprocess.run(
        [sys.executable, "-m", "skyreels_local", "generate", "--model", "tiny-random",
         "--image", str(test_image_path), "--prompt", "p" * (MAX_PROMPT_CHARS + 1),
         "--out", str(tmp_path / "o.mp4")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "error: `prompt` must be at most 2000 characters, got 2001"
