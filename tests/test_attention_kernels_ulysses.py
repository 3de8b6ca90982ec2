"""Our attention kernels under Ulysses: the Ulysses processors keep the kernel the mask-free ones
had and call it on their head slice over the whole sequence; a gloo group of 2 ends on the
one-process latents (a kernel stand-in: SDPA in the kernels' [B, S, H, D] convention)."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.integration]

STEPS = 2


def sdpa_bshd(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    return out.transpose(1, 2)


def _pipe_with_kernel(calls: list | None = None):
    from skyreels_local.engine.attention import MaskFreeHunyuanVideoAttnProcessor
    from skyreels_local.engine.presets import apply_preset
    from skyreels_local.engine.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    apply_preset(pipe, "exact")

    def kernel(q, k, v):
        if calls is not None:
            calls.append(q.shape[2])  # heads this rank attends over
        return sdpa_bshd(q, k, v)

    for module in pipe.transformer.modules():
        if isinstance(getattr(module, "processor", None), MaskFreeHunyuanVideoAttnProcessor):
            module.processor.kernel = kernel
    return pipe


def _job(pipe):
    from test_presets_cache import make_job

    return replace(make_job(pipe), num_inference_steps=STEPS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from skyreels_local.engine.denoise import denoise_latents
    from skyreels_local.engine.parallel import (
        ParallelContext,
        Split,
        UlyssesHunyuanVideoAttnProcessor,
        install_ulysses,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        context = ParallelContext(Split(world=world, cfg=1, ulysses=world), torch.device("cpu"))
        calls: list[int] = []
        pipe = _pipe_with_kernel(calls)
        swapped = install_ulysses(pipe.transformer, context)
        ulysses = [
            m.processor
            for m in pipe.transformer.modules()
            if isinstance(getattr(m, "processor", None), UlyssesHunyuanVideoAttnProcessor)
        ]
        assert swapped == len(ulysses) > 0 and all(p.kernel is not None for p in ulysses)
        latents = denoise_latents(pipe, _job(pipe), parallel=context)
        out[rank] = (latents.clone(), sorted(set(calls)))
    finally:
        dist.destroy_process_group()


def test_a_ulysses_group_runs_the_kernel_on_its_head_slice():
    import torch.multiprocessing as mp

    from skyreels_local.engine.denoise import denoise_latents

    one = _pipe_with_kernel()
    reference = denoise_latents(one, _job(one))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
        results = dict(out)
    heads = one.transformer.config.num_attention_heads
    for rank in (0, 1):
        latents, head_counts = results[rank]
        assert head_counts == [heads // 2]  # every kernel call saw this rank's half of the heads
        assert float((latents - reference).norm() / reference.norm()) < 1e-4
