"""Memory profiles: reading, automatic choice from free memory, and what each does to the models.

Full-size models are built on the meta device (no memory) to check which layers each profile
stores in fp8 and which it offloads; the tiny model runs under every profile on the CPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.hooks.group_offloading import GroupOffloadingHook
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

from skyreels_local.cli import main as cli_main
from skyreels_local.engine.loader import load_engine
from skyreels_local.engine.profiles import (
    GroupOffloadSettings,
    apply_profile,
    cast_like_layerwise_casting,
    default_profiles_dir,
    group_offload_kwargs,
    load_profiles,
    read_profile_file,
    resolve_profile,
    select_profile,
)
from skyreels_local.engine.prompts import FreedTextEncoders, OffloadedTextEncoders, ResidentTextEncoders
from skyreels_local.engine.request import GenerationRequest
from skyreels_local.engine.tiny import build_tiny_components
from skyreels_local.errors import InvalidInputError
from skyreels_local.weights.layout import SKYREELS_I2V_TRANSFORMER_CONFIG
from skyreels_local.weights.synthetic import write_tiny_weights
from tests.conftest import make_test_image

GIB = 1024**3
META = torch.device("meta")
CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# Llama 3 8B (llava-llama-3's text tower) and CLIP ViT-L/14's text encoder, as in the base repo.
LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192,
)  # fmt: skip
CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        vocab_size=49408, max_position_embeddings=77, projection_dim=768)  # fmt: skip


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


# --- reading and choosing ----------------------------------------------------------------------


def test_shipped_profiles(profiles):
    assert set(profiles) == {"80gb", "48gb", "24gb", "sequential", "cpu"}
    assert profiles["24gb"].transformer.storage_dtype == "float8_e4m3fn"
    assert profiles["24gb"].transformer.placement == "group-offload"
    assert profiles["48gb"].text_encoders.placement == "offload"
    assert all(p.expected_peak_gib for p in profiles.values() if p.device == "cuda")
    # The 24 GB class profile must be planned under the 18 GB target (SkyReels' engine: 18.5 GB).
    assert profiles["24gb"].expected_peak_gib * GIB <= 18e9


@pytest.mark.parametrize(
    ("free_gib", "expected"),
    [
        (139.0, "80gb"),  # H200
        (79.1, "80gb"),  # H100 / A100 80GB
        (47.4, "48gb"),  # RTX 6000 Ada / A6000
        (44.3, "48gb"),  # L40S
        (39.0, "24gb"),  # A100 40GB: not enough for bf16 + text encoders
        (23.5, "24gb"),  # RTX 4090 / 3090, L4
        (15.6, "24gb"),  # 16 GB cards
        (10.5, "sequential"),
        (0.5, "sequential"),  # nothing fits: the last resort
    ],
)
def test_auto_selection_from_free_memory(profiles, free_gib, expected):
    assert select_profile(profiles, device_type="cuda", free_gib=free_gib).name == expected


def test_auto_on_cpu_is_the_cpu_profile(profiles):
    assert select_profile(profiles, device_type="cpu", free_gib=None).name == "cpu"
    assert resolve_profile("auto", CPU).name == "cpu"


def test_profile_by_name_and_by_file(tmp_path):
    assert resolve_profile("48gb", CUDA).name == "48gb"
    custom = tmp_path / "mine.json"
    custom.write_text('{"description": "x", "transformer": {"placement": "group-offload"}}')
    profile = resolve_profile(str(custom), CUDA)
    assert profile.name == "mine" and profile.transformer.placement == "group-offload"
    yaml_file = tmp_path / "also.yaml"
    yaml_file.write_text("name: also\nvae:\n  tiling: false\n")
    assert resolve_profile(str(yaml_file), CUDA).vae.tiling is False


def test_unknown_profile_names_the_choices():
    with pytest.raises(InvalidInputError) as info:
        resolve_profile("12gb", CUDA)
    assert info.value.field == "profile"
    assert "must be one of auto, 24gb, 48gb, 80gb, cpu, sequential" in info.value.message


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ('[transformer]\nplacement = "everywhere"\n', "transformer.placement"),
        ('[transformer]\nstorage_dtype = "float8_e4m3fn"\nplacement = "sequential-offload"\n', "group-offload"),
        ('[transformer]\nstorage_dtype = "float8_e4m3fn"\nfp8_method = "torchao"\nplacement = "group-offload"\n',
         "layerwise"),
        ("min_free_gib = -1\n", "min_free_gib"),
        ("colour = 'blue'\n", "colour"),
        ("not toml at all [", "readable"),
    ],
)  # fmt: skip
def test_bad_profile_files_are_refused_with_the_field(tmp_path, content, complaint):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=complaint):
        read_profile_file(path)


def test_group_offload_streams_only_on_cuda():
    settings = GroupOffloadSettings()
    on_gpu = group_offload_kwargs(settings, CUDA, CPU)
    assert on_gpu["use_stream"] and on_gpu["record_stream"] and on_gpu["num_blocks_per_group"] == 1
    assert on_gpu["onload_device"] == CUDA and on_gpu["offload_device"] == CPU
    on_cpu = group_offload_kwargs(settings, CPU, CPU)
    assert not on_cpu["use_stream"] and not on_cpu["record_stream"]
    leaf = group_offload_kwargs(GroupOffloadSettings(offload_type="leaf_level"), CUDA, CPU)
    assert leaf["num_blocks_per_group"] is None


# --- full-size models on the meta device -------------------------------------------------------


def full_size_pipeline() -> HunyuanSkyreelsImageToVideoPipeline:
    """SkyReels I2V at full size on the meta device (the VAE is the tiny real one: it stays resident
    in every GPU profile, and resident moves need real tensors when the test onloads to the CPU)."""
    tiny = build_tiny_components()
    with torch.device("meta"):
        transformer = HunyuanVideoTransformer3DModel.from_config(SKYREELS_I2V_TRANSFORMER_CONFIG).to(
            torch.bfloat16
        )
        llama = LlamaModel(LLAMA_8B).to(torch.float16)
        clip = CLIPTextModel(CLIP_L).to(torch.float16)
    return HunyuanSkyreelsImageToVideoPipeline(
        transformer=transformer, vae=tiny["vae"], text_encoder=llama, text_encoder_2=clip,
        tokenizer=tiny["tokenizer"], tokenizer_2=tiny["tokenizer_2"], scheduler=tiny["scheduler"],
    )  # fmt: skip


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def group_hook(module: torch.nn.Module) -> GroupOffloadingHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook("group_offloading")


def test_24gb_profile_stores_block_linears_in_fp8_and_offloads_every_block(profiles):
    pipe = full_size_pipeline()
    bf16_bytes = nbytes(pipe.transformer)
    assert 23.5 < bf16_bytes / GIB < 24.5  # 12.8B parameters
    # Onload to the CPU here (no GPU); offloaded weights go to `meta` so nothing is allocated.
    applied = apply_profile(pipe, profiles["24gb"], CPU, offload_device=META)
    t = pipe.transformer

    params = dict(t.named_parameters())
    # fp8: the attention and MLP linears of every dual- and single-stream block, and the timestep/
    # guidance/pooled-text embedders.
    for name in (
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.19.ff.net.2.weight",
        "transformer_blocks.7.attn.add_k_proj.weight",
        "transformer_blocks.7.ff_context.net.0.proj.weight",
        "single_transformer_blocks.0.attn.to_q.weight",
        "single_transformer_blocks.39.proj_mlp.weight",
        "single_transformer_blocks.39.proj_out.weight",
        "time_text_embed.guidance_embedder.linear_2.weight",
    ):
        assert params[name].dtype == torch.float8_e4m3fn, name  # fmt: skip
    # bf16: AdaLN modulation linears, QK norms, the patch/text embedders and the output layers.
    for name in (
        "transformer_blocks.0.norm1.linear.weight",
        "transformer_blocks.0.norm1_context.linear.weight",
        "single_transformer_blocks.5.norm.linear.weight",
        "transformer_blocks.3.attn.norm_q.weight",
        "x_embedder.proj.weight",
        "context_embedder.proj_in.weight",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight",
        "norm_out.linear.weight",
        "proj_out.weight",
    ):
        assert params[name].dtype == torch.bfloat16, name  # fmt: skip
    fp8 = sum(p.numel() for p in params.values() if p.dtype == torch.float8_e4m3fn)
    assert 9.0e9 < fp8 < 9.2e9  # of 12.8B: the rest (modulation, embedders) stays bf16
    assert 15.0 < nbytes(t) / GIB < 15.8
    assert t.dtype == torch.bfloat16  # the compute dtype the pipeline sees

    # Group offload: one group per block (20 dual + 40 single), prefetched in turn; the embedders
    # and output layers form the top-level group.
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    hooks = [group_hook(block) for block in blocks]
    assert len(blocks) == 60 and all(h is not None for h in hooks)
    assert len({id(h.group) for h in hooks}) == 60
    assert all(h.group.onload_device == CPU and h.group.offload_device == META for h in hooks)
    assert group_hook(t) is not None
    # The Llama text encoder streams layer by layer (32 groups); CLIP-L (0.2 GiB, no top-level
    # layer list) comes in as one group.
    llama_hooks = [group_hook(layer) for layer in pipe.text_encoder.layers]
    assert len({id(h.group) for h in llama_hooks}) == 32
    assert group_hook(pipe.text_encoder_2) is not None
    assert isinstance(applied.text_encoders, ResidentTextEncoders)  # hooks do the moving
    assert pipe.vae.use_tiling
    assert pipe._execution_device == CPU  # the onload device, found through the hooks


@pytest.mark.parametrize("name", ["80gb", "48gb"])
def test_bf16_profiles_quantize_and_offload_nothing(profiles, name):
    pipe = full_size_pipeline()
    applied = apply_profile(pipe, profiles[name], META, offload_device=META)
    t = pipe.transformer
    assert {p.dtype for p in t.parameters()} == {torch.bfloat16}
    assert group_hook(t) is None and all(group_hook(b) is None for b in t.transformer_blocks)
    assert pipe.vae.use_tiling
    if name == "80gb":
        assert isinstance(applied.text_encoders, ResidentTextEncoders)
    else:
        assert isinstance(applied.text_encoders, OffloadedTextEncoders)


def test_expected_peaks_cover_the_weights_each_profile_keeps_on_the_gpu(profiles):
    """The documented peaks are at least the weights resident at the busiest moment."""
    pipe = full_size_pipeline()
    transformer = nbytes(pipe.transformer)
    text = nbytes(pipe.text_encoder) + nbytes(pipe.text_encoder_2)
    assert 13.9 < text / GIB < 14.5  # Llama-3-8B without its LM head + CLIP-L, fp16
    # 80gb: everything at once; 48gb: the transformer plus the text encoders while encoding.
    assert profiles["80gb"].expected_peak_gib * GIB > transformer + text
    assert profiles["48gb"].expected_peak_gib * GIB > transformer + text
    # 48gb must fit a 48 GB card; 80gb must fit 80 GB.
    assert profiles["48gb"].expected_peak_gib < profiles["48gb"].min_free_gib <= 44
    assert profiles["80gb"].expected_peak_gib < profiles["80gb"].min_free_gib <= 76


def test_device_side_fp8_cast_matches_diffusers_layerwise_casting():
    """The GPU pre-cast (run here on the CPU) casts exactly what enable_layerwise_casting casts,
    to the same values, so enabling the hooks afterwards changes nothing."""
    reference = build_tiny_components(seed=2)["transformer"]
    reference.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    model = build_tiny_components(seed=2)["transformer"]
    count = cast_like_layerwise_casting(model, torch.float8_e4m3fn, CPU)
    expected = reference.state_dict()
    assert count == sum(1 for p in reference.parameters() if p.dtype == torch.float8_e4m3fn) > 10
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor.float(), expected[name].float()), name
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.float(), expected[name].float()), name


# --- the tiny model under every profile, on the CPU -------------------------------------------


@pytest.fixture(scope="module")
def cpu_reference():
    engine = load_engine("tiny-random", device="cpu", profile="cpu")
    return engine.generate(tiny_request())


def tiny_request(prompt: str = "a boat at dawn") -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, image=make_test_image(), seed=11, num_inference_steps=2, num_frames=5
    )


@pytest.mark.parametrize("name", ["80gb", "48gb", "sequential"])
def test_offloading_profiles_give_the_same_video(cpu_reference, name):
    engine = load_engine("tiny-random", device="cpu", profile=name)
    assert engine.profile == name
    result = engine.generate(tiny_request())
    np.testing.assert_array_equal(result.frames, cpu_reference.frames)


def test_sequential_profile_offloads_every_component():
    engine = load_engine("tiny-random", device="cpu", profile="sequential")
    pipe = engine.pipe
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        hooked = [m for m in getattr(pipe, name).modules() if hasattr(m, "_hf_hook")]
        assert hooked, name
    # accelerate keeps the weights off the device between uses
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.device == META


def test_24gb_profile_runs_with_fp8_storage_on_the_tiny_model(cpu_reference):
    engine = load_engine("tiny-random", device="cpu", profile="24gb")
    q = engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert q.dtype == torch.float8_e4m3fn
    result = engine.generate(tiny_request())
    difference = np.abs(result.frames.astype(int) - cpu_reference.frames.astype(int))
    assert difference.max() > 0  # fp8 storage does change the numbers...
    assert difference.mean() < 3.0  # ...by little


def test_offloaded_text_encoders_leave_the_device_after_encoding():
    engine = load_engine("tiny-random", device="cpu", profile="48gb")
    moves: list[str] = []
    residency = engine.prompts.residency
    assert isinstance(residency, OffloadedTextEncoders)
    original_before, original_after = residency.before_encode, residency.after_encode
    residency.before_encode = lambda pipe: (moves.append("in"), original_before(pipe))[1]
    residency.after_encode = lambda pipe: (moves.append("out"), original_after(pipe))[1]
    engine.prompts.encode("first")
    engine.prompts.encode("first")  # cached: no move
    engine.prompts.encode("second")
    assert moves == ["in", "out", "in", "out"]
    assert residency.moves_whole_models  # an encode must not overlap a denoise under this profile
    assert not load_engine("tiny-random", device="cpu", profile="24gb").prompts.residency.moves_whole_models


def test_freed_text_encoders_are_reloaded_for_new_prompts(tmp_path):
    folder = write_tiny_weights(tmp_path / "w")
    from skyreels_local.weights.layout import build_manifest, write_manifest

    write_manifest(folder, build_manifest(folder))
    shutil.copy(default_profiles_dir() / "cpu.toml", tmp_path / "cpu-free.toml")
    profile_file = tmp_path / "cpu-free.toml"
    profile_file.write_text(
        profile_file.read_text()
        .replace('name = "cpu"', 'name = "cpu-free"')
        .replace('[text_encoders]\nplacement = "resident"', '[text_encoders]\nplacement = "free"')
    )
    reference = load_engine(str(folder), device="cpu", profile="cpu").prompts.encode("FPS-24, a harbour")
    engine = load_engine(str(folder), device="cpu", profile=str(profile_file))
    assert engine.profile == "cpu-free"
    residency = engine.prompts.residency
    assert isinstance(residency, FreedTextEncoders)
    first = engine.prompts.encode("FPS-24, a harbour")
    assert engine.pipe.text_encoder is None and engine.pipe.text_encoder_2 is None
    torch.testing.assert_close(first.embeds, reference.embeds)
    torch.testing.assert_close(first.pooled, reference.pooled)
    engine.prompts.encode("FPS-24, a harbour")  # cached: no reload
    engine.prompts.encode("FPS-24, a storm")
    assert residency.reloads == 1  # the first encode used the encoders loaded at start-up


def test_free_placement_needs_a_weights_folder(tmp_path):
    profile_file = tmp_path / "free.toml"
    profile_file.write_text('device = "cpu"\n[text_encoders]\nplacement = "free"\n')
    with pytest.raises(InvalidInputError, match="weights folder"):
        load_engine("tiny-random", device="cpu", profile=str(profile_file))


def test_generate_cli_takes_and_reports_the_profile(tmp_path, test_image_path, capsys, caplog):
    out = tmp_path / "out.mp4"
    args = ["generate", "--model", "tiny-random", "--device", "cpu", "--image", str(test_image_path),
            "--prompt", "a boat", "--steps", "1", "--num-frames", "5", "--out", str(out), "--no-progress"]  # fmt: skip
    with caplog.at_level("INFO"):
        assert cli_main([*args, "--profile", "24gb"]) == 0
    assert "profile 24gb" in capsys.readouterr().out
    assert "memory profile 24gb: transformer group-offload (fp8 storage)" in caplog.text
    assert cli_main([*args, "--profile", "12gb"]) == 2
    assert "`profile` must be one of auto" in capsys.readouterr().err
