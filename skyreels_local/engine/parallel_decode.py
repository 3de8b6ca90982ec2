"""The VAE decode split over the ranks of a process group (`--gpus-per-video N`).

diffusers' AutoencoderKLHunyuanVideo decodes in two nested levels of tiles: temporal chunks of
16+1 output frames (`_temporal_tiled_decode`, always on for clips longer than one chunk) and,
when tiling is on, overlapping spatial tiles inside each chunk (`tiled_decode`). Every decoder
call sees only its own slice of the latents, so the calls are independent; only the blending of
the overlaps afterwards combines them. The split therefore uses both levels as its work units,
every (chunk, tile) pair being one decoder call: with tiling off (a large GPU, where the plan
decodes whole frames) the units are the 9 chunks of a 97-frame clip, with tiling on they are
9 x 15 tiles at 544x960 (256/192 px), fine enough to balance 8 ranks. Either level alone would
not do: spatial tiles do not exist on the untiled plan, and 9 chunks cannot balance 8 ranks.

Each rank decodes its share of the units (balanced by latent volume), the decoded tiles are sent
to rank 0, and rank 0 blends them with diffusers' own code path (the same in-place blend_v /
blend_h / blend_t sequence as `tiled_decode` / `_temporal_tiled_decode`), so the video equals the
one-process decode with the same tile plan: bit-exact on a CPU in float32 (tests).

All ranks use rank 0's tile plan and rank 0's final latents (broadcast: 13 MB), so a rank's
free memory or rounding cannot make its tiles differ. A decode of a single unit (a short clip,
untiled) is not split: rank 0 runs the one-process decode and the others return at once.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers.utils.accelerate_utils import apply_forward_hook

from .vae_decode import (
    TILE_LADDER,
    TilePlan,
    apply_plan,
    chunk_frames,
    decode_video,
    estimate_peak_bytes,
    free_device_bytes,
    plan_tiling,
)

log = logging.getLogger(__name__)


# --- the units ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeUnit:
    """One decoder call: latent frames, rows and columns [start, stop) of temporal chunk `chunk`,
    spatial tile (`row`, `col`) of that chunk's grid."""

    index: int
    chunk: int
    row: int
    col: int
    frames: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def cost(self) -> int:
        """Latent volume: the decoder's work is proportional to it."""
        return (
            (self.frames[1] - self.frames[0]) * (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])
        )


@dataclass(frozen=True)
class DecodeLayout:
    temporal: bool  # diffusers' framewise chunks (more latent frames than one chunk)
    tiled: bool  # spatial tiles inside each chunk
    units: tuple[DecodeUnit, ...]


def decode_layout(vae: Any, shape: tuple[int, ...]) -> DecodeLayout:
    """The decoder calls `vae.decode` makes for latents of `shape` [B, C, T, h, w] with the VAE's
    current tiling settings, in diffusers' order (AutoencoderKLHunyuanVideo._decode's branches)."""
    _b, _c, frames, height, width = shape
    s, t = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    tile_h, tile_w = vae.tile_sample_min_height // s, vae.tile_sample_min_width // s
    stride_h, stride_w = vae.tile_sample_stride_height // s, vae.tile_sample_stride_width // s
    tile_t = vae.tile_sample_min_num_frames // t
    stride_t = vae.tile_sample_stride_num_frames // t
    temporal = bool(vae.use_framewise_decoding) and frames > tile_t
    # Inside a chunk the tiling test is on the chunk's size, which is the clip's size.
    tiled = bool(vae.use_tiling) and (width > tile_w or height > tile_h)
    chunks = (
        [(i, min(i + tile_t + 1, frames)) for i in range(0, frames, stride_t)] if temporal else [(0, frames)]
    )
    row_ranges = (
        [(i, min(i + tile_h, height)) for i in range(0, height, stride_h)] if tiled else [(0, height)]
    )
    col_ranges = [(j, min(j + tile_w, width)) for j in range(0, width, stride_w)] if tiled else [(0, width)]
    units = []
    for c, f in enumerate(chunks):
        for r, rows in enumerate(row_ranges):
            for k, cols in enumerate(col_ranges):
                units.append(DecodeUnit(len(units), c, r, k, f, rows, cols))
    return DecodeLayout(temporal, tiled, tuple(units))


def assign_units(costs: list[int], world: int) -> list[int]:
    """The rank decoding each unit: largest first onto the least loaded rank (ties: lowest
    rank), so every unit has exactly one owner and no rank carries more than the average load
    plus one unit. Deterministic: every rank computes the same assignment."""
    owners = [0] * len(costs)
    loads = [(0, rank) for rank in range(world)]
    heapq.heapify(loads)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners


# --- decoding and blending ---------------------------------------------------------------------


@apply_forward_hook  # as vae.decode: an offloading hook moves the VAE onto the device first
def decode_units(vae: Any, z: torch.Tensor, units: list[DecodeUnit]) -> dict[int, torch.Tensor]:
    """Decode `units` of the scaled latents `z`, as diffusers' tiled decode does per tile."""
    out = {}
    for u in units:
        tile = z[:, :, u.frames[0] : u.frames[1], u.rows[0] : u.rows[1], u.cols[0] : u.cols[1]]
        out[u.index] = vae.decoder(vae.post_quant_conv(tile))
    return out


def assemble(vae: Any, layout: DecodeLayout, shape: tuple[int, ...], tiles: dict[int, torch.Tensor]):
    """The decoded video from every unit's tile, blended exactly as diffusers does (its code,
    step for step: the blends are in place and later ones read earlier results)."""
    _b, _c, frames, height, width = shape
    chunks: dict[int, list[list[torch.Tensor]]] = {}
    for u in layout.units:
        grid = chunks.setdefault(u.chunk, [])
        if u.col == 0:
            grid.append([])
        grid[u.row].append(tiles[u.index])
    decoded_chunks = [
        _blend_spatial(vae, grid, height, width) if layout.tiled else grid[0][0]
        for _c, grid in sorted(chunks.items())
    ]
    if not layout.temporal:
        return decoded_chunks[0]
    # AutoencoderKLHunyuanVideo._temporal_tiled_decode, after its decoder calls.
    num_sample_frames = (frames - 1) * vae.temporal_compression_ratio + 1
    blend_num_frames = vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames
    row = [d if i == 0 else d[:, :, 1:, :, :] for i, d in enumerate(decoded_chunks)]
    result_row = []
    for i, tile in enumerate(row):
        if i > 0:
            tile = vae.blend_t(row[i - 1], tile, blend_num_frames)
            result_row.append(tile[:, :, : vae.tile_sample_stride_num_frames, :, :])
        else:
            result_row.append(tile[:, :, : vae.tile_sample_stride_num_frames + 1, :, :])
    return torch.cat(result_row, dim=2)[:, :, :num_sample_frames]


def _blend_spatial(vae: Any, rows: list[list[torch.Tensor]], height: int, width: int) -> torch.Tensor:
    # AutoencoderKLHunyuanVideo.tiled_decode, after its decoder calls.
    sample_height = height * vae.spatial_compression_ratio
    sample_width = width * vae.spatial_compression_ratio
    blend_height = vae.tile_sample_min_height - vae.tile_sample_stride_height
    blend_width = vae.tile_sample_min_width - vae.tile_sample_stride_width
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_height)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_width)
            result_row.append(tile[:, :, :, : vae.tile_sample_stride_height, : vae.tile_sample_stride_width])
        result_rows.append(torch.cat(result_row, dim=-1))
    return torch.cat(result_rows, dim=3)[:, :, :, :sample_height, :sample_width]


# --- over the group ----------------------------------------------------------------------------


def decode_video_group(
    vae: Any, latents: torch.Tensor, context: Any, *, budget_bytes: int | None = None
) -> tuple[torch.Tensor | None, TilePlan]:
    """decode_video over the group: every rank calls it with the scaled latents; rank 0 gets
    the decoded video [B, 3, F, H, W], the other ranks None. The tile plan is rank 0's."""
    context.broadcast_tensor_(latents)
    plan = _agreed_plan(vae, latents, context, budget_bytes)
    layout = decode_layout(vae, tuple(latents.shape))
    if len(layout.units) < 2 or (vae.use_slicing and latents.shape[0] > 1):
        # Nothing to split (or diffusers would decode per sample): the one-process decode.
        if not context.is_leader:
            return None, plan
        return decode_video(vae, latents, budget_bytes=budget_bytes)
    on_cuda = latents.device.type == "cuda"
    mine, owners, failed = _decode_share(vae, latents, layout, context)
    if on_cuda and _any_rank(failed, context):
        # One rank ran out of memory: all retry with the smallest tiles (same plan everywhere).
        torch.cuda.empty_cache()
        tile, stride = TILE_LADDER[-1]
        log.warning(
            "split VAE decode (%s) ran out of memory; retrying with %d px tiles", plan.describe(), tile
        )
        frames = min(chunk_frames(vae), (latents.shape[2] - 1) * vae.temporal_compression_ratio + 1)
        plan = TilePlan(True, tile, stride, estimate_peak_bytes(tile, tile, frames), plan.free_bytes)
        apply_plan(vae, plan)
        layout = decode_layout(vae, tuple(latents.shape))
        mine, owners, failed = _decode_share(vae, latents, layout, context)
        if _any_rank(failed, context):
            raise torch.OutOfMemoryError("split VAE decode ran out of memory with the smallest tiles")
    tiles = _gather_to_leader(mine, owners, layout, latents, context)
    if not context.is_leader:
        return None, plan
    return assemble(vae, layout, tuple(latents.shape), tiles), plan


def _agreed_plan(vae: Any, latents: torch.Tensor, context: Any, budget_bytes: int | None) -> TilePlan:
    """Rank 0's tile plan, applied on every rank (the ranks' free memory may differ). On a CPU
    the VAE's own setting stands, as in decode_video (it is the same on every rank)."""
    if latents.device.type != "cuda":
        return TilePlan(bool(vae.use_tiling), None, None, 0, None)
    plan = None
    if context.is_leader:
        height = latents.shape[-2] * vae.spatial_compression_ratio
        width = latents.shape[-1] * vae.spatial_compression_ratio
        frames = min(chunk_frames(vae), (latents.shape[2] - 1) * vae.temporal_compression_ratio + 1)
        plan = plan_tiling(
            height, width, frames, free_device_bytes(latents.device), budget_bytes=budget_bytes
        )
    plan = context.broadcast_object(plan)
    apply_plan(vae, plan)
    return plan


def _decode_share(vae, latents, layout, context) -> tuple[dict[int, torch.Tensor], list[int], bool]:
    owners = assign_units([u.cost for u in layout.units], context.split.world)
    share = [u for u in layout.units if owners[u.index] == context.rank]
    try:
        return decode_units(vae, latents, share), owners, False
    except torch.OutOfMemoryError:
        if latents.device.type != "cuda":
            raise
        return {}, owners, True


def _any_rank(flag: bool, context: Any) -> bool:
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=context._comm_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _gather_to_leader(mine, owners, layout, latents, context) -> dict[int, torch.Tensor]:
    """Every unit's tile on rank 0, sent point to point in unit order (a shape, then the data)."""
    comm, dtype = context._comm_device, latents.dtype
    if not context.is_leader:
        for u in layout.units:
            if owners[u.index] == context.rank:
                tile = mine.pop(u.index).to(comm, dtype).contiguous()
                dist.send(torch.tensor(tile.shape, dtype=torch.int64, device=comm), dst=0)
                dist.send(tile, dst=0)
        return {}
    tiles = dict(mine)
    for u in layout.units:
        source = owners[u.index]
        if source == 0:
            continue
        shape = torch.empty(5, dtype=torch.int64, device=comm)
        dist.recv(shape, src=source)
        tile = torch.empty(tuple(shape.tolist()), dtype=dtype, device=comm)
        dist.recv(tile, src=source)
        tiles[u.index] = tile.to(latents.device)
    return tiles
