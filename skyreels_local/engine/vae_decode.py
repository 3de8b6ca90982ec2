"""VAE decode with the spatial tile size chosen from the memory that is free at decode time.

diffusers' HunyuanVideo VAE always decodes in chunks of 16+1 frames; spatial tiling (256 px
tiles at a 192 px stride by default) is what keeps one chunk small. Overlapping tiles cost
compute: at 256/192 about (256/192)^2 ~ 1.8x the pixels of an untiled decode. After the denoise
the transformer's activations are gone, so on a large GPU the whole frame fits and the decode
runs untiled; on a small one the largest tile that fits is used. An out-of-memory error (the
estimate is only an estimate) falls back to the smallest tiles and decodes again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Peak decoder memory per output pixel of one 17-frame chunk, fp16. Calibrated from the anchor
# run (PERFORMANCE.md: 256 px tiles of a 544x960x97 decode peaked ~3 GiB above the weights,
# i.e. ~2.6 kB per tile pixel-frame) and rounded up.
BYTES_PER_PIXEL_FRAME = 3_000
SAFETY = 1.3  # headroom over the estimate
RESERVE_BYTES = 2 << 30  # left free for the allocator, cuDNN workspaces and the output copy
# (tile, stride) in output pixels, largest first; multiples of the VAE's 8x spatial factor.
TILE_LADDER = ((512, 448), (384, 320), (256, 192), (192, 160))
DEFAULT_TILE = (256, 192)  # diffusers' own default


@dataclass(frozen=True)
class TilePlan:
    tiled: bool
    tile: int | None  # tile edge in output pixels, None when untiled
    stride: int | None
    estimated_peak_bytes: int
    free_bytes: int | None

    def describe(self) -> str:
        return "untiled" if not self.tiled else f"tiles {self.tile}/{self.stride}"


def chunk_frames(vae: Any) -> int:
    """Output frames decoded at once (diffusers' framewise decoding: 16 + 1)."""
    return int(getattr(vae, "tile_sample_min_num_frames", 16)) + 1


def estimate_peak_bytes(height: int, width: int, frames: int) -> int:
    return int(height * width * frames * BYTES_PER_PIXEL_FRAME * SAFETY)


def plan_tiling(
    height: int, width: int, frames: int, free_bytes: int | None, *, budget_bytes: int | None = None
) -> TilePlan:
    """The largest decode (untiled, else the largest tile) whose estimated peak fits `free_bytes`,
    and `budget_bytes` (a memory profile's cap) when given.

    `free_bytes=None` (unknown, e.g. on a CPU) keeps diffusers' default tiles.
    """
    if free_bytes is not None and budget_bytes is not None:
        free_bytes = min(free_bytes, budget_bytes + RESERVE_BYTES)
    if free_bytes is None:
        tile, stride = DEFAULT_TILE
        return TilePlan(True, tile, stride, estimate_peak_bytes(tile, tile, frames), None)
    usable = free_bytes - RESERVE_BYTES
    untiled = estimate_peak_bytes(height, width, frames)
    if untiled <= usable:
        return TilePlan(False, None, None, untiled, free_bytes)
    for tile, stride in TILE_LADDER:
        peak = estimate_peak_bytes(min(tile, height), min(tile, width), frames)
        if peak <= usable:
            return TilePlan(True, tile, stride, peak, free_bytes)
    tile, stride = TILE_LADDER[-1]
    return TilePlan(True, tile, stride, estimate_peak_bytes(tile, tile, frames), free_bytes)


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can get: free on the device plus what torch caches unused."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached_unused))


def apply_plan(vae: Any, plan: TilePlan) -> None:
    if not plan.tiled:
        vae.disable_tiling()
        return
    vae.enable_tiling(
        tile_sample_min_height=plan.tile,
        tile_sample_min_width=plan.tile,
        tile_sample_stride_height=plan.stride,
        tile_sample_stride_width=plan.stride,
    )


def decode_video(
    vae: Any, latents: torch.Tensor, *, budget_bytes: int | None = None
) -> tuple[torch.Tensor, TilePlan]:
    """Decode scaled latents [B, C, T, h, w] with a tile plan fitted to free memory, and to
    `budget_bytes` when the memory profile sets one (its VAE `decode_budget_gib`).

    On a CPU the VAE's own tiling setting is left as configured.
    """
    device = latents.device
    height = latents.shape[-2] * vae.spatial_compression_ratio
    width = latents.shape[-1] * vae.spatial_compression_ratio
    frames = min(chunk_frames(vae), (latents.shape[2] - 1) * vae.temporal_compression_ratio + 1)
    if device.type != "cuda":
        plan = TilePlan(bool(vae.use_tiling), None, None, 0, None)
        return vae.decode(latents, return_dict=False)[0], plan
    plan = plan_tiling(height, width, frames, free_device_bytes(device), budget_bytes=budget_bytes)
    apply_plan(vae, plan)
    try:
        return vae.decode(latents, return_dict=False)[0], plan
    except torch.OutOfMemoryError:
        tile, stride = TILE_LADDER[-1]
        log.warning("VAE decode (%s) ran out of memory; retrying with %d px tiles", plan.describe(), tile)
        torch.cuda.empty_cache()
        plan = TilePlan(True, tile, stride, estimate_peak_bytes(tile, tile, frames), plan.free_bytes)
        apply_plan(vae, plan)
        return vae.decode(latents, return_dict=False)[0], plan
