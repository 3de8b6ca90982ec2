"""`weights import`: single-file checkpoints in the original/ComfyUI naming -> the diffusers layout."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import save_file

from skyreels_local.cli import main as cli_main
from skyreels_local.engine.loader import load_engine
from skyreels_local.engine.tiny import build_tiny_components
from skyreels_local.errors import WeightsError
from skyreels_local.weights.layout import read_manifest, verify_weights_dir
from skyreels_local.weights.single_file import (
    SKYREELS_I2V_TRANSFORMER_CONFIG,
    _split_fused_single_block_linear1,
    _to_diffusers,
    import_single_file,
)
from skyreels_local.weights.synthetic import write_weights_folder
from tests.weights_helpers import diffusers_to_original

COMFY_PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=5)


@pytest.fixture(scope="module")
def tiny_config(tiny) -> dict:
    return {k: v for k, v in tiny["transformer"].config.items() if not k.startswith("_")}


@pytest.fixture
def base_only(tiny, tmp_path):
    """A weights folder with every component but the transformer (`download --skip-transformer`)."""
    names = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    return write_weights_folder(tmp_path / "weights", tiny, only=names)


def write_checkpoint(path, state: dict[str, torch.Tensor], prefix: str = COMFY_PREFIX) -> None:
    save_file({prefix + k: v.contiguous() for k, v in diffusers_to_original(state).items()}, str(path))


def safetensors_dtypes(path) -> set[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_full_size_original_checkpoint_maps_onto_every_skyreels_weight():
    """At full size (meta tensors: no memory), diffusers' mapping turns the original layout into
    exactly the SkyReels I2V transformer's weights: the path a real 25.6 GB import takes."""
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel.from_config(SKYREELS_I2V_TRANSFORMER_CONFIG)
    expected = model.state_dict()
    original = diffusers_to_original(expected)
    assert "double_blocks.19.img_attn_qkv.weight" in original
    assert original["single_blocks.39.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    converted = _to_diffusers(dict(original), "original", SKYREELS_I2V_TRANSFORMER_CONFIG)
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_bf16_comfy_checkpoint_imports_verifies_and_loads(tiny, tiny_config, base_only, tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in tiny["transformer"].state_dict().items()}
    checkpoint = tmp_path / "skyreels_hunyuan_i2v_bf16.safetensors"
    write_checkpoint(checkpoint, state)

    result = import_single_file(checkpoint, base_only, config=tiny_config, max_shard_bytes=16_000)
    assert result.source_format == "original" and result.prefix == COMFY_PREFIX and not result.scaled_fp8
    assert result.num_tensors == len(state)
    shards = sorted((base_only / "transformer").glob("*.safetensors"))
    assert len(shards) > 1  # sharded with an index, as the Hub repository is
    assert (base_only / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()

    manifest = read_manifest(base_only)
    assert manifest.sources["transformer"]["imported_from"] == checkpoint.name
    assert {f"transformer/{p.name}" for p in shards} <= set(manifest.files)
    assert verify_weights_dir(base_only).ok

    engine = load_engine(str(base_only), device="cpu", profile="cpu")
    loaded = engine.pipe.transformer.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor.float()), name


def test_import_equals_diffusers_from_single_file(tiny, tiny_config, tmp_path):
    """Our block-by-block conversion gives what diffusers' own single-file loader gives."""
    state = tiny["transformer"].state_dict()
    checkpoint = tmp_path / "ckpt.safetensors"
    write_checkpoint(checkpoint, state, prefix="")
    import_single_file(checkpoint, tmp_path / "w", config=tiny_config)
    ours = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "w" / "transformer").state_dict()

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(tiny_config))
    original = diffusers_to_original(state)
    _split_fused_single_block_linear1(
        original, tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]
    )
    reference = HunyuanVideoTransformer3DModel.from_single_file(
        original, config=str(tmp_path / "cfg"), local_files_only=True
    ).state_dict()
    assert set(ours) == set(reference)
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name


def test_fp8_checkpoint_stays_fp8_on_disk(tiny, tiny_config, tmp_path):
    state = tiny["transformer"].state_dict()
    # ComfyUI fp8 files: the matrices in float8_e4m3fn, vectors (norms, biases) in bf16.
    stored = {k: v.to(torch.float8_e4m3fn) if v.ndim >= 2 else v.to(torch.bfloat16) for k, v in state.items()}
    checkpoint = tmp_path / "skyreels_hunyuan_i2v_fp8_e4m3fn.safetensors"
    write_checkpoint(checkpoint, stored)
    result = import_single_file(checkpoint, tmp_path / "w", config=tiny_config)
    assert result.dtypes["float8_e4m3fn"] > result.dtypes["bfloat16"] > 0
    shard = tmp_path / "w" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert safetensors_dtypes(shard) == {"F8_E4M3", "BF16"}
    loaded = HunyuanVideoTransformer3DModel.from_pretrained(
        tmp_path / "w" / "transformer", torch_dtype=torch.float32
    )
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, stored[name].float()), name
    # --dtype bf16 casts on the way in.
    import_single_file(checkpoint, tmp_path / "w", config=tiny_config, dtype="bf16", replace=True)
    assert safetensors_dtypes(shard) == {"BF16"}


def test_scaled_fp8_is_dequantized(tiny, tiny_config, tmp_path):
    state = tiny["transformer"].state_dict()
    original = diffusers_to_original(state)
    tensors: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    expected: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        if value.ndim == 2 and key.endswith(".weight"):
            scale = value.abs().max().float() / 448.0
            q = (value.float() / scale).to(torch.float8_e4m3fn)
            tensors[key], tensors[key[: -len("weight")] + "scale_weight"] = q, scale.reshape(1)
            expected[key] = (q.float() * scale).to(torch.bfloat16)
        else:
            tensors[key] = value
            expected[key] = value
    checkpoint = tmp_path / "scaled.safetensors"
    save_file(tensors, str(checkpoint))
    result = import_single_file(checkpoint, tmp_path / "w", config=tiny_config)
    assert result.scaled_fp8
    loaded = HunyuanVideoTransformer3DModel.from_pretrained(
        tmp_path / "w" / "transformer", torch_dtype=torch.float32
    )
    qkv = loaded.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    fused = expected["double_blocks.0.img_attn_qkv.weight"].float()
    assert torch.equal(qkv, fused[: qkv.shape[0]])
    # and close to the unquantized weight (it is a real fp8 approximation, not garbage)
    exact = state["transformer_blocks.0.attn.to_q.weight"]
    assert (qkv - exact).norm() / exact.norm() < 0.1


def test_text_to_video_checkpoint_is_refused(tiny_config, tmp_path):
    t2v = dict(tiny_config, in_channels=tiny_config["out_channels"])
    torch.manual_seed(0)
    state = HunyuanVideoTransformer3DModel(**t2v).state_dict()
    checkpoint = tmp_path / "skyreels_hunyuan_t2v_bf16.safetensors"
    write_checkpoint(checkpoint, state)
    with pytest.raises(WeightsError, match="text-to-video transformer: 4 input channels"):
        import_single_file(checkpoint, tmp_path / "w", config=tiny_config)
    assert not (tmp_path / "w" / "transformer").exists()


def test_incomplete_checkpoint_is_refused_and_leaves_nothing(tiny, tiny_config, tmp_path):
    state = dict(tiny["transformer"].state_dict())
    original = diffusers_to_original(state)
    del original["single_blocks.0.linear2.weight"]
    checkpoint = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(checkpoint))
    with pytest.raises(
        WeightsError, match=r"lacks 1 transformer weights: single_transformer_blocks\.0\.proj_out\.weight"
    ):
        import_single_file(checkpoint, tmp_path / "w", config=tiny_config)
    assert not (tmp_path / "w" / "transformer").exists()
    assert not (tmp_path / "w" / "transformer.importing").exists()


def test_other_files_are_refused_clearly(tmp_path):
    not_a_model = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(not_a_model))
    with pytest.raises(WeightsError, match="not a HunyuanVideo/SkyReels transformer checkpoint"):
        import_single_file(not_a_model, tmp_path / "w")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        import_single_file(garbage, tmp_path / "w")


def test_existing_transformer_needs_replace(tiny, tiny_config, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.safetensors"
    write_checkpoint(checkpoint, tiny["transformer"].state_dict())
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config))
    folder = tmp_path / "w"
    args = [
        "weights",
        "import",
        str(checkpoint),
        "--dir",
        str(folder),
        "--config",
        str(tmp_path / "cfg.json"),
    ]
    assert cli_main(args) == 0
    assert (
        "imported ckpt.safetensors (original naming, prefix 'model.diffusion_model.')"
        in capsys.readouterr().out
    )
    assert cli_main(args) == 2
    assert "--replace" in capsys.readouterr().err
    assert cli_main([*args, "--replace"]) == 0
