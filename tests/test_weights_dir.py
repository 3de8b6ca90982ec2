"""Loading from a weights directory written by the test in the real on-disk layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from skyreels_local.engine.loader import load_engine
from skyreels_local.engine.request import GenerationRequest
from skyreels_local.engine.tiny import build_tiny_pipeline
from skyreels_local.errors import WeightsError
from skyreels_local.weights.layout import check_weights_dir, find_layout_problems
from tests.conftest import make_test_image


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """The tiny pipeline written with diffusers' own save_pretrained: the real layout."""
    path = tmp_path_factory.mktemp("weights")
    pipe = build_tiny_pipeline(seed=3)
    pipe.save_pretrained(path)
    return path, pipe


@pytest.fixture
def weights_copy(saved_pipeline, tmp_path):
    path, _ = saved_pipeline
    copy = tmp_path / "weights"
    shutil.copytree(path, copy)
    return copy


def test_layout_complete(saved_pipeline):
    path, _ = saved_pipeline
    assert find_layout_problems(path) == []
    assert check_weights_dir(path) == path


def test_loads_the_saved_weights_and_generates(saved_pipeline):
    path, original = saved_pipeline
    engine = load_engine(str(path), device="cpu")
    loaded = engine.pipe.transformer.state_dict()
    for name, tensor in original.transformer.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(
        engine.pipe.vae.state_dict()["decoder.conv_out.conv.weight"],
        original.vae.state_dict()["decoder.conv_out.conv.weight"],
    )
    # A real weights folder gets the SkyReels geometry (960x544x97); override it for a CPU run.
    assert engine.spec.geometry.sizes["16:9"] == (960, 544)
    result = engine.generate(
        GenerationRequest(
            prompt="a lighthouse",
            image=make_test_image(),
            width=64,
            height=32,
            num_frames=5,
            num_inference_steps=2,
        )
    )
    assert result.frames.shape == (5, 32, 64, 3)


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("vae", "vae/"),
        ("tokenizer_2", "tokenizer_2/"),
        ("transformer/config.json", "transformer/config.json"),
        ("text_encoder/model.safetensors", "text_encoder/*.safetensors"),
        ("model_index.json", "model_index.json"),
        ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ],
)
def test_missing_component_is_named(weights_copy, remove, named):
    target = weights_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError) as info:
        load_engine(str(weights_copy), device="cpu")
    message = info.value.message
    assert named in message
    assert "skyreels-local weights download" in message


def test_missing_shard_named_in_index(weights_copy):
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (weights_copy / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(index)
    )
    with pytest.raises(WeightsError, match="transformer/diffusion_pytorch_model-00001-of-00002.safetensors"):
        check_weights_dir(weights_copy)


def test_text_to_video_transformer_is_refused(weights_copy):
    config_path = weights_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = config["out_channels"]  # what the base HunyuanVideo T2V transformer has
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="text-to-video"):
        check_weights_dir(weights_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="no such directory"):
        load_engine(str(tmp_path / "nope"), device="cpu")
