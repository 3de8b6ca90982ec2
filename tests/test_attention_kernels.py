"""Our own attention kernels as named --attention options: availability, conversions, fallback,
the processor's kernel path, and the emulated 8-bit error (everything up to the kernel call, on CPU)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from test_presets_cache import make_job

from skyreels_local.engine import attention_kernels as ak
from skyreels_local.engine.attention import (
    AttentionEnvironment,
    MaskFreeHunyuanVideoAttnProcessor,
    apply_backend,
    choose_backend,
)
from skyreels_local.engine.denoise import denoise_latents
from skyreels_local.engine.presets import apply_preset, verify_kernel
from skyreels_local.engine.tiny import build_tiny_pipeline
from skyreels_local.errors import InvalidInputError

HOPPER = AttentionEnvironment(device_type="cuda", capability=(9, 0), cudnn=True)
ADA = AttentionEnvironment(device_type="cuda", capability=(8, 9), cudnn=True)


def sdpa_bshd(q, k, v):
    """A CPU stand-in for a kernel: PyTorch's SDPA in the kernels' [B, S, H, D] convention."""
    out = torch.nn.functional.scaled_dot_product_attention(*(ak.bshd_to_bhsd(t) for t in (q, k, v)))
    return ak.bhsd_to_bshd(out)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Two registered kernels that run on a CPU: an exact one (SDPA) and an fp8-emulating one."""
    made = []

    def maker(fn):
        def make():
            made.append(fn)
            return fn

        return make

    base = ak.KERNELS["sage1"]
    monkeypatch.setitem(
        ak.KERNELS, "test-exact", replace(base, name="test-exact", exact=True, make=maker(sdpa_bshd))
    )
    monkeypatch.setitem(
        ak.KERNELS, "test-fp8", replace(base, name="test-fp8", make=maker(ak.emulate_fp8_per_tensor))
    )
    return made


# --- availability --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ak.KERNELS))
def test_every_kernel_states_why_it_cannot_run(name):
    spec = ak.KERNELS[name]
    assert "needs a CUDA GPU" in ak.kernel_status(spec, device_type="cpu", capability=None)
    old = ak.kernel_status(spec, device_type="cuda", capability=(7, 5), importable=lambda _m: True)
    assert "compute capability" in old and "7.5" in old
    low = spec.capabilities[0]
    missing = ak.kernel_status(spec, device_type="cuda", capability=low, importable=lambda _m: False)
    assert spec.package in missing and spec.modules[0] in missing
    assert ak.kernel_status(spec, device_type="cuda", capability=low, importable=lambda _m: True) is None
    assert "head dim 80" in ak.kernel_status(
        spec, device_type="cuda", capability=low, head_dim=80, importable=lambda _m: True
    )


def test_capability_ranges_follow_the_wheels():
    ok = {
        name: ak.kernel_status(spec, device_type="cuda", capability=(8, 9), importable=lambda _m: True)
        is None
        for name, spec in ak.KERNELS.items()
    }
    # On an Ada card (4090, the 24gb class) only SageAttention of these runs.
    assert ok == {"fa4": False, "cudnn-fp8": False, "te-fp8": False, "flashinfer-fp8": False, "sage1": True}
    assert ak.APPROXIMATE_KERNELS == ("cudnn-fp8", "te-fp8", "flashinfer-fp8", "sage1")


def test_nothing_here_imports_the_gpu_packages():
    import sys

    for spec in ak.KERNELS.values():
        assert not any(m.split(".")[0] in sys.modules for m in spec.modules if m != "cudnn"), spec.name


# --- choosing and falling back ----------------------------------------------------------------


def test_a_named_kernel_is_chosen_when_it_can_run():
    choice = choose_backend(HOPPER, allow_approximate=True, requested="cudnn-fp8", importable=lambda _m: True)
    assert (choice.backend, choice.how, choice.exact, choice.is_kernel) == (
        "cudnn-fp8",
        "requested",
        False,
        True,
    )
    exact = choose_backend(HOPPER, allow_approximate=False, requested="fa4", importable=lambda _m: True)
    assert exact.backend == "fa4" and exact.exact


def test_a_missing_kernel_falls_back_to_the_automatic_choice_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="skyreels_local.engine.attention"):
        choice = choose_backend(
            HOPPER, allow_approximate=True, requested="te-fp8", importable=lambda _m: False
        )
    assert choice.backend == "_native_cudnn" and not choice.is_kernel
    assert choice.how.startswith("fallback from te-fp8:") and "transformer-engine" in choice.how
    assert "te-fp8 is not usable here" in caplog.text and "using _native_cudnn" in caplog.text
    ada = choose_backend(ADA, allow_approximate=True, requested="flashinfer-fp8", importable=lambda _m: True)
    assert ada.how.startswith("fallback from flashinfer-fp8") and "8.9" in ada.how


def test_an_8bit_kernel_is_refused_for_an_exact_preset():
    with pytest.raises(InvalidInputError) as info:
        choose_backend(HOPPER, allow_approximate=False, requested="sage1", importable=lambda _m: True)
    assert "attention" in str(info.value) and "sage1" in str(info.value)


def test_unknown_backend_names_the_kernels_too():
    with pytest.raises(InvalidInputError, match="cudnn-fp8"):
        choose_backend(HOPPER, allow_approximate=True, requested="warp-drive")


# --- conversions ------------------------------------------------------------------------------


def test_cudnn_strides_describe_our_memory_as_bhsd():
    x = torch.randn(2, 7, 3, 4)
    dims, strides = ak.bhsd_view_of_bshd(tuple(x.shape))
    assert torch.equal(torch.as_strided(x, dims, strides), x.transpose(1, 2))
    assert torch.equal(ak.bhsd_to_bshd(ak.bshd_to_bhsd(x)), x)


def test_fp8_quantisation_per_tensor_and_per_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 4, 128, generator=g) * torch.tensor([1.0, 10.0, 1e-4, 3.0]).view(1, 1, 4, 1)
    per_head = ak.fp8_descale(x, (0, 1, 3))
    assert per_head.shape == (1, 1, 4, 1)
    torch.testing.assert_close(per_head.flatten() * ak.E4M3_MAX, x.abs().amax(dim=(0, 1, 3)))
    q = ak.to_fp8(x, per_head)
    assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) == ak.E4M3_MAX
    # e4m3 keeps ~2^-4 relative precision: per-head scales keep every head at it, a per-tensor
    # scale pushes the small head (1e-4 of the largest) into subnormals.
    for dims, limit in (((0, 1, 3), 0.04), (None, 1.01)):
        err = (ak.fake_fp8(x, dims) - x)[..., 2, :].norm() / x[..., 2, :].norm()
        assert err < limit
    small_head_per_tensor = (ak.fake_fp8(x, None) - x)[..., 2, :].norm() / x[..., 2, :].norm()
    assert small_head_per_tensor > 0.5
    assert torch.equal(
        ak.to_fp8(torch.tensor([1e6, -1e6]), torch.tensor(1.0)).float(), torch.tensor([448.0, -448.0])
    )


def test_int8_block_quantisation():
    x = torch.randn(1, 300, 2, 64)
    y = ak.fake_int8_blocks(x, 128)
    assert y.shape == x.shape
    assert float((y - x).norm() / x.norm()) < 0.02
    grid = (
        torch.arange(-127, 128, dtype=torch.float32).repeat(2)[:300].view(1, 300, 1, 1).expand(1, 300, 2, 64)
    )
    torch.testing.assert_close(ak.fake_int8_blocks(grid, 300), grid)  # already on the int8 grid


def test_reference_attention_is_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 96, 3, 32, generator=g) for _ in range(3))
    torch.testing.assert_close(
        ak.reference_attention(q, k, v, chunk=40), sdpa_bshd(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_emulated_errors_order_and_bounds():
    r = ak.estimate_errors(query_rows=16, tokens=2048, heads=2)
    assert r["bf16-exact"]["vs_float32"] < 5e-3
    assert 0 < r["sage1"]["vs_bf16"] < r["cudnn-fp8"]["vs_bf16"] < ak.ATTENTION_ERROR_BOUND
    assert r["te-fp8"] == r["cudnn-fp8"]  # the same cuDNN fp8 numerics
    assert "fa4" not in r  # the bf16 exact kernel is the yardstick itself
    peaked = ak.estimate_errors(
        ("cudnn-fp8", "sage1"), query_rows=16, tokens=2048, heads=2, logit_std=4.0, key_bias=2.0
    )
    assert peaked["cudnn-fp8"]["vs_bf16"] > r["cudnn-fp8"]["vs_bf16"]  # peaked attention suffers more


# --- the processor's kernel path (tiny model) ---------------------------------------------------


def _short_job(pipe):
    return replace(make_job(pipe), num_inference_steps=3)  # a fresh generator per run


def test_no_kernel_keeps_the_exact_path_bit_identical(fake_kernels):
    pipe, reference = build_tiny_pipeline(), build_tiny_pipeline()
    apply_preset(reference, "exact")
    apply_preset(pipe, "exact")
    apply_backend(pipe.transformer, "test-exact")
    apply_backend(pipe.transformer, "native")  # and off again
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    assert all(getattr(p, "kernel", None) is None for p in processors)
    assert torch.equal(denoise_latents(pipe, make_job(pipe)), denoise_latents(reference, make_job(reference)))


def test_an_exact_kernel_through_our_processor_matches_diffusers_path(fake_kernels):
    pipe, reference = build_tiny_pipeline(), build_tiny_pipeline()
    apply_preset(reference, "exact")
    apply_preset(pipe, "exact")
    apply_backend(pipe.transformer, "test-exact")
    mask_free = [
        m.processor
        for m in pipe.transformer.modules()
        if isinstance(getattr(m, "processor", None), MaskFreeHunyuanVideoAttnProcessor)
    ]
    assert mask_free and all(p.kernel is sdpa_bshd for p in mask_free)
    assert len(fake_kernels) == len(mask_free)  # one kernel instance per processor
    ours = denoise_latents(pipe, _short_job(pipe))
    torch.testing.assert_close(ours, denoise_latents(reference, _short_job(reference)), rtol=1e-5, atol=1e-5)


def test_an_fp8_emulated_kernel_changes_the_result_by_a_bounded_amount(fake_kernels):
    pipe, reference = build_tiny_pipeline(), build_tiny_pipeline()
    apply_preset(reference, "exact")
    apply_preset(pipe, "exact")
    apply_backend(pipe.transformer, "test-fp8")
    ours, exact = denoise_latents(pipe, _short_job(pipe)), denoise_latents(reference, _short_job(reference))
    error = float((ours - exact).norm() / exact.norm())
    assert 1e-4 < error < ak.FP8_PRESET_ERROR_BOUND, error


def test_check_kernel_drops_broken_and_wrong_kernels(fake_kernels):
    cpu = torch.device("cpu")
    spec = ak.KERNELS["test-fp8"]
    ok, message = ak.check_kernel(
        spec, ak.emulate_fp8_per_tensor, device=cpu, tokens=512, heads=2, dtype=torch.float32
    )
    assert ok and "relative error" in message

    def broken(q, k, v):
        raise RuntimeError("no kernel image for this GPU")

    assert ak.check_kernel(spec, broken, device=cpu, tokens=64, heads=2, dtype=torch.float32) == (
        False,
        "test-fp8 failed: RuntimeError: no kernel image for this GPU",
    )
    ok, message = ak.check_kernel(
        spec, lambda q, k, v: torch.zeros_like(q), device=cpu, tokens=64, heads=2, dtype=torch.float32
    )
    assert not ok and "disagrees" in message


def test_verify_kernel_reads_the_installed_kernel(fake_kernels, monkeypatch):
    pipe = build_tiny_pipeline()
    apply_preset(pipe, "exact")
    apply_backend(pipe.transformer, "test-exact")
    # The tiny model's head dim is not one the real kernels support: check at a supported one.
    monkeypatch.setattr(
        ak, "check_kernel", lambda spec, kernel, **kw: (kernel is sdpa_bshd, f"{spec.name} checked")
    )
    assert verify_kernel(pipe.transformer, "test-exact", torch.device("cpu")) is None
    apply_backend(pipe.transformer, "test-fp8")
    assert (
        verify_kernel(pipe.transformer, "test-fp8", torch.device("cpu"))
        == "attention test-fp8 dropped: test-fp8 checked"
    )
