"""Speed presets: attention backend choice, fp8 module selection, what each preset installs."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from skyreels_local.engine.attention import (
    AttentionEnvironment,
    MaskFreeHunyuanVideoAttnProcessor,
    candidate_backends,
    choose_backend,
    detect_environment,
    probe_backends,
)
from skyreels_local.engine.presets import (
    PRESETS,
    PresetOptions,
    apply_preset,
    configure_compile_cache,
    fp8_unavailable_reason,
    is_fp8_target,
)
from skyreels_local.engine.tiny import build_tiny_pipeline
from skyreels_local.errors import InvalidInputError

HOPPER = (9, 0)
AMPERE = (8, 0)


def cuda_env(capability=HOPPER, **installed) -> AttentionEnvironment:
    return AttentionEnvironment(device_type="cuda", capability=capability, cudnn=True, **installed)


# --- which attention kernel ---------------------------------------------------------------


def test_cpu_has_only_native_sdpa():
    env = detect_environment("cpu")
    assert env == AttentionEnvironment(device_type="cpu")
    assert candidate_backends(env, allow_approximate=True) == ["native"]
    choice = choose_backend(env, allow_approximate=False)
    assert (choice.backend, choice.how) == ("native", "only candidate")


def test_stock_torch_gpu_prefers_cudnn():
    env = cuda_env()  # nothing optional installed
    assert candidate_backends(env, allow_approximate=True) == ["_native_cudnn", "native"]
    choice = choose_backend(env, allow_approximate=False)
    assert (choice.backend, choice.how, choice.exact) == ("_native_cudnn", "preference order", True)


def test_flash_attention_3_first_on_hopper_only():
    assert candidate_backends(cuda_env(flash_attn_3=True), allow_approximate=False)[0] == "_flash_3"
    assert "_flash_3" not in candidate_backends(cuda_env(AMPERE, flash_attn_3=True), allow_approximate=False)


def test_all_optional_kernels_installed():
    env = cuda_env(flash_attn_3=True, flash_attn=True, sageattention=True, xformers=True)
    assert candidate_backends(env, allow_approximate=False) == [
        "_flash_3",
        "flash",
        "_native_cudnn",
        "xformers",
        "native",
    ]
    # Sage (8-bit Q.K) only where the preset may change the output.
    assert candidate_backends(env, allow_approximate=True)[0] == "sage"
    assert choose_backend(env, allow_approximate=True).backend == "sage"
    assert choose_backend(env, allow_approximate=False).backend == "_flash_3"


def test_xformers_without_cudnn():
    env = AttentionEnvironment(device_type="cuda", capability=(7, 5), xformers=True)
    assert candidate_backends(env, allow_approximate=False) == ["xformers", "native"]


def test_probe_picks_the_fastest_working_kernel():
    env = cuda_env(flash_attn_3=True, xformers=True)
    seen = []

    def probe(candidates):
        seen.append(list(candidates))
        return {
            "_flash_3": "error: RuntimeError: no kernel image",
            "_native_cudnn": 9.5,
            "xformers": 7.25,
            "native": 12.0,
        }

    choice = choose_backend(env, allow_approximate=False, probe=probe)
    assert seen == [["_flash_3", "_native_cudnn", "xformers", "native"]]
    assert (choice.backend, choice.how) == ("xformers", "probe")
    assert choice.probe["_flash_3"].startswith("error")


def test_probe_with_every_kernel_failing_falls_back_to_native():
    choice = choose_backend(cuda_env(), allow_approximate=False, probe=lambda c: dict.fromkeys(c, "error: x"))
    assert (choice.backend, choice.how) == ("native", "probe failed")


def test_requested_backend():
    env = cuda_env(sageattention=True)
    assert choose_backend(env, allow_approximate=False, requested="native").how == "requested"
    assert choose_backend(env, allow_approximate=True, requested="sage").backend == "sage"
    with pytest.raises(InvalidInputError, match="`attention` changes the output.*got 'sage'"):
        choose_backend(env, allow_approximate=False, requested="sage")
    with pytest.raises(
        InvalidInputError, match="`attention` must be usable on this cuda device.*got '_flash_3'"
    ):
        choose_backend(env, allow_approximate=False, requested="_flash_3")
    with pytest.raises(InvalidInputError, match="got 'xformers'"):
        choose_backend(detect_environment("cpu"), allow_approximate=False, requested="xformers")


def test_probe_runs_the_dispatcher_and_rejects_a_wrong_kernel():
    # On a CPU the probe can still run through diffusers' dispatcher: native and math agree,
    # a name the dispatcher does not know is reported as an error, not a time.
    results = probe_backends(
        ["native", "_native_math", "bogus"],
        device="cpu",
        dtype=torch.float32,
        seq_len=64,
        heads=2,
        head_dim=16,
        repeats=1,
    )
    assert isinstance(results["native"], float) and isinstance(results["_native_math"], float)
    assert results["bogus"].startswith("error")


# --- what each preset installs ------------------------------------------------------------


def test_preset_names_are_validated_with_field_and_value():
    with pytest.raises(
        InvalidInputError, match=r"`preset` must be one of stock, exact, fp8, turbo, got 'fast'"
    ):
        apply_preset(build_tiny_pipeline(), "fast")
    assert PRESETS == ("stock", "exact", "fp8", "turbo")


def test_stock_preset_leaves_the_pipeline_alone():
    pipe = build_tiny_pipeline()
    applied = apply_preset(pipe, "stock")
    assert applied.uses_pipeline_call and applied.summary()["attention"] is None
    assert all(
        type(p) is not MaskFreeHunyuanVideoAttnProcessor for p in pipe.transformer.attn_processors.values()
    )


def test_exact_preset_on_cpu():
    pipe = build_tiny_pipeline()
    applied = apply_preset(pipe, "exact")
    summary = applied.summary()
    assert summary["preset"] == "exact" and summary["mask_free"] is True
    assert summary["attention"] == "native" and summary["compiled"] is False and summary["fp8_linears"] == 0
    kinds = {type(p) for name, p in pipe.transformer.attn_processors.items() if "token_refiner" not in name}
    assert kinds == {MaskFreeHunyuanVideoAttnProcessor}
    # Idempotent: applying again changes nothing and keeps one processor per block.
    assert apply_preset(pipe, "exact").mask_free
    assert not any(type(p) is HunyuanVideoAttnProcessor2_0 for p in pipe.transformer.attn_processors.values())


def test_fp8_falls_back_to_exact_without_a_capable_gpu():
    assert "CUDA" in fp8_unavailable_reason(torch.device("cpu"))
    pipe = build_tiny_pipeline()
    applied = apply_preset(pipe, "fp8")
    assert (applied.name, applied.requested) == ("exact", "fp8")
    assert applied.fp8_linears == 0 and "CUDA" in applied.notes[0]


def test_turbo_keeps_its_name_and_adds_the_step_cache_on_cpu():
    pipe = build_tiny_pipeline()
    applied = apply_preset(pipe, "turbo", PresetOptions(cache_threshold=0.3))
    assert applied.name == "turbo" and pipe.transformer.is_cache_enabled
    assert applied.summary()["step_cache"] == "first-block-cache threshold=0.3"
    assert applied.fp8_linears == 0 and any("CUDA" in n for n in applied.notes)


def test_compile_cache_dir_respects_an_explicit_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert configure_compile_cache(None) is None
    chosen = configure_compile_cache(tmp_path / "cache")
    assert chosen == str((tmp_path / "cache").resolve()) and os.environ["TORCHINDUCTOR_CACHE_DIR"] == chosen
    assert (tmp_path / "cache").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert configure_compile_cache(tmp_path / "other") == "/somewhere/else"


# --- fp8 selection ------------------------------------------------------------------------


def small_transformer() -> HunyuanVideoTransformer3DModel:
    # Hidden size 32: every linear is divisible by 16, as at full size (3072).
    return HunyuanVideoTransformer3DModel(
        in_channels=8,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    )


def test_fp8_targets_are_the_video_stream_linears():
    model = small_transformer()
    chosen = {fqn for fqn, m in model.named_modules() if is_fp8_target(fqn, m)}
    dual = {
        f"transformer_blocks.{i}.{s}"
        for i in range(2)
        for s in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
    }
    single = {
        f"single_transformer_blocks.{i}.{s}"
        for i in range(2)
        for s in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
    }
    assert chosen == dual | single
    # Never: the text stream, the one-token modulation, the refiner, the embedders.
    assert not any("add_" in f or "context" in f or "norm" in f or "refiner" in f for f in chosen)
    only_dual = {
        fqn for fqn, m in model.named_modules() if is_fp8_target(fqn, m, include_single_blocks=False)
    }
    assert only_dual == dual


def test_fp8_skips_shapes_scaled_mm_cannot_take():
    tiny = build_tiny_pipeline().transformer  # hidden size 20: not a multiple of 16
    assert not any(is_fp8_target(fqn, m) for fqn, m in tiny.named_modules())
    assert not is_fp8_target("transformer_blocks.0.attn.to_q", torch.nn.Conv1d(16, 16, 1))
