"""Validation of generation inputs: every bad value is named in the error."""

from __future__ import annotations

import pytest

from skyreels_local.engine.request import GenerationRequest, validate_fields, with_fps_prefix
from skyreels_local.errors import InvalidInputError, MediaError, MissingInputError
from skyreels_local.media.images import centre_crop_resize, decode_image
from tests.conftest import make_test_image


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 30),
        ("width", 0),
        ("height", 100),
        ("height", 4096),
        ("num_frames", 96),
        ("num_frames", 0),
        ("num_frames", 10),
        ("num_inference_steps", 0),
        ("num_inference_steps", 51),
        ("num_inference_steps", 2.5),
        ("guidance_scale", 0.5),
        ("guidance_scale", 21),
        ("seed", -2),
        ("seed", 2**31),
        ("aspect_ratio", "4:3"),
        ("prompt", ""),
        ("prompt", "   "),
        ("prompt", 5),
    ],
)
def test_bad_values_name_field_and_value(field, value):
    with pytest.raises(InvalidInputError) as info:
        validate_fields(**{field: value})
    assert info.value.field == field
    assert f"`{field}`" in info.value.message
    assert repr(value) in info.value.message


def test_missing_prompt():
    with pytest.raises(MissingInputError, match="`prompt` is required"):
        validate_fields(prompt=None)


@pytest.mark.parametrize("frames", [1, 5, 9, 97, 129])
def test_valid_frame_counts(frames):
    validate_fields(num_frames=frames)


def test_request_validate_uses_same_rules():
    with pytest.raises(InvalidInputError, match="width"):
        GenerationRequest(prompt="x", image=make_test_image(), width=33)


def test_fps_prefix():
    assert with_fps_prefix("a cat") == "FPS-24, a cat"
    assert with_fps_prefix("FPS-24, a cat") == "FPS-24, a cat"
    assert with_fps_prefix("  fps-24, a cat ") == "fps-24, a cat"


def test_unreadable_image_is_a_media_error():
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image(b"this is not an image", source="image")


def test_truncated_image_is_a_media_error(tmp_path):
    path = tmp_path / "x.png"
    make_test_image(200, 200).save(path)
    data = path.read_bytes()
    with pytest.raises(MediaError):
        decode_image(data[: len(data) // 2])


def test_centre_crop_keeps_marked_centre_and_drops_side_bars():
    image = make_test_image(400, 300)  # 4:3 with blue bars at left and right
    out = centre_crop_resize(image, 160, 160)  # 1:1 crop removes the sides
    assert out.size == (160, 160)
    assert out.getpixel((80, 80))[0] > 200  # red centre kept
    assert out.getpixel((0, 80)) == (128, 128, 128)  # grey, not the blue bar, at the edge


def test_centre_crop_to_wide_crops_top_and_bottom():
    image = make_test_image(300, 300)
    out = centre_crop_resize(image, 64, 32)
    assert out.size == (64, 32)
    assert out.getpixel((32, 16))[0] > 200
