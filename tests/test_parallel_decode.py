"""The VAE decode split over a process group (engine/parallel_decode.py).

The units must be exactly diffusers' decoder calls, the assignment must give each one owner and
balance the ranks, and the blended result must equal the one-process tiled decode bit for bit
(float32 on a CPU): in one process, over a real gloo group of 2 (and 4, slow), and through a
`--gpus-per-video 2` group end to end.
"""

from __future__ import annotations

import socket

import pytest

torch = pytest.importorskip("torch")

from skyreels_local.engine.parallel_decode import (  # noqa: E402
    assemble,
    assign_units,
    decode_layout,
    decode_units,
)
from skyreels_local.engine.tiny import build_tiny_pipeline  # noqa: E402

# Tiny VAE (8x spatial, 4x temporal): 16 px tiles at an 8 px stride are 2/1 latent tiles, and
# 8+1-frame chunks at a 4-frame stride are 2+1/1 latent chunks, so a small latent has many units.
TILING = {
    "tile_sample_min_height": 16,
    "tile_sample_min_width": 16,
    "tile_sample_stride_height": 8,
    "tile_sample_stride_width": 8,
    "tile_sample_min_num_frames": 8,
    "tile_sample_stride_num_frames": 4,
}
SHAPE = (1, 4, 3, 2, 3)  # B, C, latent frames, h, w: 9 frames of 16x24 px


def _vae(tiled: bool = True):
    vae = build_tiny_pipeline().vae
    vae.enable_tiling(**TILING)  # the chunk size too, which applies whether or not tiling is on
    vae.use_tiling = tiled
    return vae


def _latents(shape=SHAPE, seed: int = 3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _decoder_inputs(vae, z) -> list[tuple[int, ...]]:
    """The shapes of the latents diffusers' own decode feeds its decoder, in order."""
    seen: list[tuple[int, ...]] = []
    handle = vae.post_quant_conv.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        with torch.inference_mode():
            vae.decode(z, return_dict=False)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    ("tiled", "shape", "expected"),
    [
        pytest.param(True, SHAPE, (True, True, 3 * 2 * 3), id="chunks-and-tiles"),
        pytest.param(False, SHAPE, (True, False, 3), id="chunks-only"),
        pytest.param(True, (1, 4, 2, 3, 5), (False, True, 15), id="tiles-only"),
        pytest.param(False, (1, 4, 2, 3, 5), (False, False, 1), id="one-call"),
    ],
)
def test_the_units_are_diffusers_decoder_calls(tiled, shape, expected):
    vae = _vae(tiled)
    layout = decode_layout(vae, shape)
    assert (layout.temporal, layout.tiled, len(layout.units)) == expected
    ours = [
        (1, 4, u.frames[1] - u.frames[0], u.rows[1] - u.rows[0], u.cols[1] - u.cols[0]) for u in layout.units
    ]
    assert ours == _decoder_inputs(vae, _latents(shape))
    assert [u.index for u in layout.units] == list(range(len(layout.units)))


def test_every_unit_has_one_owner_and_the_ranks_are_balanced():
    units = decode_layout(_vae(), SHAPE).units
    costs = [u.cost for u in units]
    assert len(set(costs)) > 1  # edge tiles and the last chunk are smaller: a real balancing case
    for world in (1, 2, 3, 4, 8):
        owners = assign_units(costs, world)
        assert len(owners) == len(units) and set(owners) <= set(range(world))
        loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == rank) for rank in range(world)]
        assert sum(loads) == sum(costs)
        assert max(loads) - min(loads) <= max(costs)  # never more than one unit apart
        assert owners == assign_units(costs, world)  # the same on every rank
    # Equal units spread evenly: 10 over 4 ranks is 3, 3, 2, 2.
    assert sorted(assign_units([5] * 10, 4).count(r) for r in range(4)) == [2, 2, 3, 3]
    assert assign_units([9, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [0] + [1] * 9
    # Fewer units than ranks: each unit on its own rank, the rest idle.
    assert assign_units([4, 3], 4) == [0, 1]


@pytest.mark.parametrize("tiled", [True, False], ids=["chunks-and-tiles", "chunks-only"])
def test_units_decoded_apart_and_blended_equal_the_tiled_decode(tiled):
    vae, z = _vae(tiled), _latents()
    with torch.inference_mode():
        reference = vae.decode(z, return_dict=False)[0]
        layout = decode_layout(vae, tuple(z.shape))
        # Decoded in two separate calls (as two ranks would), blended afterwards.
        half = len(layout.units) // 2
        tiles = decode_units(vae, z, list(layout.units[:half])) | decode_units(
            vae, z, list(layout.units[half:])
        )
        video = assemble(vae, layout, tuple(z.shape), tiles)
    assert video.shape == reference.shape == (1, 3, 9, 16, 24)
    assert torch.equal(video, reference)


# --- over a real gloo group --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from skyreels_local.engine.parallel import ParallelContext, Split
    from skyreels_local.engine.parallel_decode import decode_video_group

    torch.set_num_threads(1)  # the ranks share the machine's few cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        context = ParallelContext(Split(world=world, cfg=1, ulysses=world), torch.device("cpu"))
        vae = _vae()
        # Only rank 0's latents are real: the others must receive them.
        z = _latents() if rank == 0 else torch.zeros(SHAPE)
        with torch.inference_mode():
            video, plan = decode_video_group(vae, z, context)
        out[rank] = (None if video is None else video.clone(), plan.tiled)
    finally:
        dist.destroy_process_group()


def _group_decode(world: int) -> dict:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(world, _free_port(), out), nprocs=world, join=True)
        return dict(out)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_a_group_decodes_the_same_video_as_one_process(world):
    vae, z = _vae(), _latents()
    with torch.inference_mode():
        reference = vae.decode(z, return_dict=False)[0]
    results = _group_decode(world)
    assert sorted(results) == list(range(world))
    video, tiled = results[0]
    assert tiled is True
    assert torch.equal(video, reference)
    assert all(results[rank][0] is None for rank in range(1, world))  # only rank 0 gets the video


# --- end to end: a --gpus-per-video 2 group ----------------------------------------------------


@pytest.mark.integration
def test_a_served_group_splits_the_decode_and_writes_the_one_process_frames():
    """25 frames are 7 latent frames, 3 temporal chunks of the tiny VAE: rank 0 decodes one, the
    other rank two, and the frames equal rank 0's one-process decode of the same latents."""
    from PIL import Image

    from skyreels_local.config import Settings
    from skyreels_local.engine.denoise import decode_latents
    from skyreels_local.engine.engine import to_uint8_frames
    from skyreels_local.engine.request import GenerationRequest
    from skyreels_local.worker.group import launch_group

    lost: list[str] = []
    group = launch_group(
        Settings(model="tiny-random", gpus_per_video=2, group_timeout_s=120), "cpu", on_group_lost=lost.append
    )
    try:
        group.keep_latents = True
        pipe = group.engine.pipe
        calls: list[int] = []
        handle = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda _m, _a: calls.append(1))
        try:
            image = Image.new("RGB", (64, 32), (200, 30, 90))
            result = group.generate(
                GenerationRequest(image=image, prompt="a cat", seed=7, num_inference_steps=2, num_frames=25)
            )
            assert len(calls) == 1  # of the 3 decoder calls, rank 0 made one
            reference, _plan = decode_latents(pipe, result.latents)
            assert len(calls) == 1 + 3  # the one-process decode makes all three
        finally:
            handle.remove()
        expected = to_uint8_frames(reference[0])
        assert result.frames.shape == expected.shape == (25, 32, 64, 3)
        assert (result.frames == expected).all()
    finally:
        group.close()
    assert lost == []
