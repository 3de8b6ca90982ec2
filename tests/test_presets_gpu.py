"""Checks that need a CUDA GPU (skipped elsewhere): kernels, compile, fp8 on a small model."""

from __future__ import annotations

import pytest
import torch

from skyreels_local.engine.attention import detect_environment
from skyreels_local.engine.denoise import cfg_velocity, trim_padding
from skyreels_local.engine.presets import PresetOptions, apply_preset, fp8_unavailable_reason
from skyreels_local.engine.prompts import PromptEmbeds

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class _Pipe:
    """Just enough of a pipeline for apply_preset: a transformer and its device."""

    def __init__(self, transformer):
        self.transformer = transformer
        self._execution_device = torch.device("cuda")


def _model():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=8, out_channels=4, num_attention_heads=4, attention_head_dim=64, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=64,
        pooled_projection_dim=32, rope_axes_dim=(16, 24, 24),
    )  # fmt: skip
    return model.to("cuda", torch.bfloat16).eval().requires_grad_(False)


def _inputs():
    g = torch.Generator("cuda").manual_seed(1)
    mask = torch.zeros(1, 48, device="cuda", dtype=torch.bfloat16)
    mask[:, :19] = 1
    embeds = PromptEmbeds(
        torch.randn(1, 48, 64, device="cuda", dtype=torch.bfloat16, generator=g),
        torch.randn(1, 32, device="cuda", dtype=torch.bfloat16, generator=g),
        mask,
    )
    x = torch.randn(1, 8, 3, 32, 32, device="cuda", dtype=torch.bfloat16, generator=g)
    return (
        x,
        torch.tensor([900.0], device="cuda"),
        torch.tensor([1000.0], device="cuda", dtype=torch.bfloat16),
        embeds,
    )


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_exact_preset_on_gpu_matches_stock_forward():
    model = _model()
    x, t, g, embeds = _inputs()
    with torch.inference_mode():
        stock = cfg_velocity(model, x, t, g, embeds, embeds, 6.0)
    applied = apply_preset(_Pipe(model), "exact", PresetOptions(compile=True))
    assert applied.compiled and applied.attention.backend in applied.attention.candidates
    with torch.inference_mode():
        fast = cfg_velocity(model, x, t, g, trim_padding(embeds), trim_padding(embeds), 6.0)
    assert _rel(fast, stock) < 3e-2
    assert detect_environment("cuda").device_type == "cuda"


@pytest.mark.skipif(
    torch.cuda.is_available() and fp8_unavailable_reason(torch.device("cuda")) is not None,
    reason="needs cc >= 8.9 and torchao",
)
def test_fp8_preset_quantizes_the_video_stream_and_stays_close():
    model = _model()
    x, t, g, embeds = _inputs()
    with torch.inference_mode():
        reference = cfg_velocity(model, x, t, g, embeds, embeds, 6.0)
    applied = apply_preset(_Pipe(model), "fp8", PresetOptions(compile=False))
    assert applied.name == "fp8" and applied.fp8_linears > 0
    with torch.inference_mode():
        out = cfg_velocity(model, x, t, g, trim_padding(embeds), trim_padding(embeds), 6.0)
    assert torch.isfinite(out).all() and _rel(out, reference) < 0.15
