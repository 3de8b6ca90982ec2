"""One video on several processes: classifier-free guidance in parallel x Ulysses attention.

A group of N processes (one per GPU; gloo processes on a CPU for tests) runs one generation:

* **CFG-parallel** (degree 1 or 2): the conditional and the unconditional forward run on the two
  halves of the group at the same time; one all-gather of the velocity per step lets every rank
  combine them exactly as the single-process loop does (denoise.cfg_velocity).
* **Ulysses** (degree U = N / CFG degree): inside each half, the video tokens are split into U
  contiguous shards after the patch embedding. Each attention trades its Q, K, V shards for a
  slice of the heads over the whole sequence (all-to-all), attends, and trades the output back;
  the text tokens (a few dozen after denoise.trim_padding) stay replicated, each rank attending
  with its own head slice of them and all-gathering the text output over the heads. The output
  projection's tokens are gathered back into the full sequence before the unpatchify.

Why our own processor rather than diffusers' `enable_parallelism`: the transformer has no
`_cp_plan`, diffusers' Ulysses does not handle the joint text mask (we have none: the prompt is
trimmed), the Hopper `_flash_3` backend we pick is not context-parallel-capable in 0.42.1, and
its CPU path needs a shim (it divides by the accelerator count). Replicating the short text keeps
the attention exact for any prompt length (no uneven split), and the dispatcher's backend choice
works unchanged. cache-dit 1.5.3 has a working HunyuanVideo plan but patches the classes
globally and does not know our processor.

Every rank computes the same scheduler step on the same full latents, so the latents stay
identical on every rank without further communication. A forward whose video sequence does not
divide by U (an unusual size) simply runs unsplit on every rank: correct, just not faster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InvalidInputError
from .attention import MaskFreeHunyuanVideoAttnProcessor
from .prompts import PromptEmbeds

log = logging.getLogger(__name__)


# --- the split ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """How a group of `world` processes divides one generation: cfg x ulysses == world."""

    world: int
    cfg: int  # 1 or 2
    ulysses: int

    def describe(self) -> str:
        parts = [f"CFG-parallel x{self.cfg}"] if self.cfg > 1 else []
        parts += [f"Ulysses x{self.ulysses}"] if self.ulysses > 1 else []
        return f"{self.world} processes: " + (" . ".join(parts) or "no split")


def choose_split(
    world: int,
    *,
    heads: int,
    cfg_on: bool = True,
    ulysses: int | None = None,
    cfg_parallel: bool | None = None,
) -> Split:
    """The split for `world` processes. Auto: CFG x2 when `world` is even and CFG is on (one
    all-gather per step, the cheapest split), Ulysses for the rest. `ulysses` / `cfg_parallel`
    override it; every choice must divide the attention heads (24 for SkyReels: 2, 3, 4, 6, 8)."""
    if world < 1:
        raise InvalidInputError("gpus_per_video", world, "must be at least 1")
    if ulysses is not None:
        if ulysses < 1 or world % ulysses:
            raise InvalidInputError("ulysses", ulysses, f"must divide --gpus-per-video {world}")
        cfg = world // ulysses
        if cfg > 2:
            raise InvalidInputError(
                "ulysses", ulysses, f"leaves {cfg} ranks per sequence shard; use {world} or {world // 2}"
            )
        if cfg_parallel is False and cfg != 1:
            raise InvalidInputError(
                "ulysses", ulysses, f"must equal --gpus-per-video {world} without CFG-parallel"
            )
        if cfg_parallel is True and cfg != 2:
            raise InvalidInputError("ulysses", ulysses, f"must be {world // 2} with CFG-parallel")
    else:
        use_cfg = cfg_on and world % 2 == 0 if cfg_parallel is None else cfg_parallel
        if use_cfg and world % 2:
            raise InvalidInputError("cfg_parallel", True, f"needs an even --gpus-per-video, got {world}")
        cfg = 2 if use_cfg else 1
        ulysses = world // cfg
    if heads % ulysses:
        raise InvalidInputError(
            "ulysses",
            ulysses,
            f"must divide the model's {heads} attention heads (choose another --gpus-per-video)",
        )
    return Split(world=world, cfg=cfg, ulysses=ulysses)


# --- the process group -------------------------------------------------------------------------


class ParallelContext:
    """This rank's place in the group and the subgroups of the split (made on every rank, in the
    same order, as torch.distributed requires)."""

    def __init__(self, split: Split, device: torch.device) -> None:
        if not dist.is_initialized() or dist.get_world_size() != split.world:
            raise RuntimeError(f"a process group of {split.world} ranks must be initialised first")
        self.split = split
        self.device = torch.device(device)
        self.rank = dist.get_rank()
        self.cfg_index = self.rank // split.ulysses  # 0: cond half, 1: uncond half
        self.ulysses_rank = self.rank % split.ulysses
        self.ulysses_group = None
        self.cfg_group = None
        for c in range(split.cfg):
            ranks = [c * split.ulysses + j for j in range(split.ulysses)]
            group = dist.new_group(ranks) if split.cfg > 1 else dist.group.WORLD
            if self.rank in ranks:
                self.ulysses_group = group
        for j in range(split.ulysses):
            ranks = [c * split.ulysses + j for c in range(split.cfg)]
            group = dist.new_group(ranks) if split.ulysses > 1 else dist.group.WORLD
            if self.rank in ranks:
                self.cfg_group = group
        self.sharding = False  # set per forward by the RoPE hook: this forward's tokens are split

    @property
    def is_leader(self) -> bool:
        """Rank 0 encodes the text, draws the noise, blends the decoded tiles and writes the video."""
        return self.rank == 0

    # Whole-group helpers (every rank calls them at the same point).

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (cancel decisions must be the same everywhere)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def broadcast_object(self, obj: Any) -> Any:
        holder = [obj if self.is_leader else None]
        dist.broadcast_object_list(holder, src=0, device=self._comm_device)
        return holder[0]

    def broadcast_tensor_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's values into `tensor` on every rank (same shape everywhere)."""
        staged = tensor.to(self._comm_device).contiguous()
        dist.broadcast(staged, src=0)
        if staged is not tensor:
            tensor.copy_(staged.to(tensor.device))
        return tensor

    def broadcast_embeds(self, embeds: PromptEmbeds | None) -> PromptEmbeds | None:
        """Rank 0's prompt embeddings (CPU in transit: a pickled CUDA tensor would name rank 0's GPU)."""
        payload = None
        if self.is_leader and embeds is not None:
            payload = (embeds.embeds.cpu(), embeds.pooled.cpu(), embeds.mask.cpu())
        payload = self.broadcast_object(payload)
        if payload is None:
            return None
        return PromptEmbeds(*(t.to(self.device) for t in payload))

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # CFG-parallel: one forward per half, one all-gather.

    def cfg_velocity(self, forward, positive: PromptEmbeds, negative: PromptEmbeds | None, scale: float):
        """`forward(name, embeds)` on this rank's branch; the combined velocity on every rank."""
        from ..params import cfg_enabled
        from .denoise import COND, UNCOND

        do_cfg = negative is not None and cfg_enabled(scale)
        if self.split.cfg == 1 or not do_cfg:
            # Unsplit CFG (or no CFG job): both forwards here, as the single-process loop does.
            noise_pred = forward(COND, positive)
            if do_cfg:
                neg = forward(UNCOND, negative)
                noise_pred = neg + scale * (noise_pred - neg)
            return noise_pred
        mine = forward(COND, positive) if self.cfg_index == 0 else forward(UNCOND, negative)
        mine = mine.contiguous()  # before empty_like, which keeps a permuted tensor's strides
        gathered = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(gathered, mine, group=self.cfg_group)
        cond, neg = gathered
        return neg + scale * (cond - neg)


# --- Ulysses -----------------------------------------------------------------------------------


@torch.compiler.disable
def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # before empty_like, which would copy a permuted tensor's strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """[B, S/P, H, D] sequence shard -> [B, S, H/P, D] head slice, over the whole sequence."""
    b, s_local, h, d = x.shape
    x = x.reshape(b, s_local, size, h // size, d).permute(2, 1, 0, 3, 4)  # [P, S/P, B, H/P, D]
    x = _all_to_all(x, group)  # dim 0 now indexes the source rank = the sequence shard
    return x.permute(2, 0, 1, 3, 4).reshape(b, size * s_local, h // size, d)


def heads_to_seq(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """[B, S, H/P, D] head slice -> [B, S/P, H, D] sequence shard (the inverse of seq_to_heads)."""
    b, s, h_local, d = x.shape
    x = x.reshape(b, size, s // size, h_local, d).permute(1, 2, 0, 3, 4)  # [P, S/P, B, H/P, D]
    x = _all_to_all(x, group)  # dim 0 now indexes the source rank = the head slice
    return x.permute(2, 1, 0, 3, 4).reshape(b, s // size, size * h_local, d)


@torch.compiler.disable
def gather_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """[B, L, H/P, D] on each rank -> [B, L, H, D] (the text tokens' attention output)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=2)


@torch.compiler.disable
def gather_sequence(x: torch.Tensor, size: int, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=1)


def _project(attn, x: torch.Tensor, q_proj, k_proj, v_proj, q_norm, k_norm):
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in (q_proj, k_proj, v_proj))
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k, v


class UlyssesHunyuanVideoAttnProcessor(MaskFreeHunyuanVideoAttnProcessor):
    """The mask-free HunyuanVideo attention with the video tokens split over the Ulysses group.

    Same math as diffusers' HunyuanVideoAttnProcessor2_0 (projections, QK norms, RoPE on the
    video tokens, joint attention, output projections); only where the heads live differs.
    """

    def __init__(self, context: ParallelContext) -> None:
        super().__init__()
        self.context = context

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        ctx = self.context
        if not ctx.sharding or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        size, group = ctx.split.ulysses, ctx.ulysses_group
        text_len = encoder_hidden_states.shape[1]
        # 1-2. Projections and QK norms: the single-stream blocks use the same ones for both.
        q, k, v = _project(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if attn.add_q_proj is None:
            tq, tk, tv = _project(
                attn, encoder_hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k
            )
        else:
            tq, tk, tv = _project(
                attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k,
            )  # fmt: skip
        # 3. RoPE on this rank's video tokens (the rope hook gave it this shard's positions).
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        # Sequence shard -> head slice; the replicated text keeps only this rank's heads.
        heads = slice(ctx.ulysses_rank * (attn.heads // size), (ctx.ulysses_rank + 1) * (attn.heads // size))
        q, k, v = (
            torch.cat([seq_to_heads(x, size, group), t[:, :, heads]], dim=1)
            for x, t in ((q, tq), (k, tk), (v, tv))
        )
        # 5. Attention over the whole sequence for this rank's heads.
        if self.kernel is not None:  # one of our kernels (attention_kernels.py)
            out = self.kernel(q, k, v)
        else:
            out = dispatch_attention_fn(
                q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
            )
        video = heads_to_seq(out[:, :-text_len], size, group)
        text = gather_heads(out[:, -text_len:], size, group)
        hidden_states = video.flatten(2, 3).to(q.dtype)
        encoder_hidden_states = text.flatten(2, 3).to(q.dtype)
        # 6. Output projections.
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def install_ulysses(transformer: torch.nn.Module, context: ParallelContext) -> int:
    """Split the video tokens over the Ulysses group: Ulysses processors in place of the
    mask-free ones, and hooks that shard the patch embedding and RoPE and gather `proj_out`.
    Returns the number of processors swapped (0 when the split has no Ulysses)."""
    size = context.split.ulysses
    if size == 1:
        return 0
    heads = transformer.config.num_attention_heads
    if heads % size:
        raise InvalidInputError("ulysses", size, f"must divide the model's {heads} attention heads")
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is MaskFreeHunyuanVideoAttnProcessor:
            replacement = UlyssesHunyuanVideoAttnProcessor(context)
            if "_attention_backend" in vars(processor):
                replacement._attention_backend = processor._attention_backend
            replacement.kernel = processor.kernel
            module.set_processor(replacement)
            count += 1
    if count == 0:
        raise RuntimeError("Ulysses needs the mask-free attention processors (a preset other than stock)")

    def shard(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.chunk(size, dim=dim)[context.ulysses_rank].contiguous()

    def on_rope(_module, _args, output):
        # RoPE runs first in the forward: decide here whether this forward's tokens split evenly.
        context.sharding = output[0].shape[0] % size == 0
        if not context.sharding:
            return output
        return tuple(shard(x, 0) for x in output)

    def on_embed(_module, _args, output):
        return shard(output, 1) if context.sharding else output

    def on_proj_out(_module, _args, output):
        return gather_sequence(output, size, context.ulysses_group) if context.sharding else output

    transformer.rope.register_forward_hook(on_rope)
    transformer.x_embedder.register_forward_hook(on_embed)
    transformer.proj_out.register_forward_hook(on_proj_out)
    return count


def agree_step_cache(transformer: torch.nn.Module, context: ParallelContext) -> int:
    """Make First Block Cache (the turbo preset) decide the same on every Ulysses rank.

    Its head-block hook compares mean |residual change| / mean |previous residual| with the
    threshold; under Ulysses each rank sees only its token shard, so ranks could decide apart and
    one would skip the blocks (and their all-to-alls) the others run: a hang. The two sums are
    all-reduced over the group first, which gives the one-process decision exactly (the shards
    are equal in size). The other step caches (taylorseer, magcache: engine/step_cache.py) decide
    from the step index and shipped numbers alone, the same on every rank with no communication.
    Returns how many hooks were wrapped."""
    if context.split.ulysses == 1:
        return 0
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    count = 0
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if isinstance(hook, FBCHeadBlockHook):
                hook._should_compute_remaining_blocks = _agreed_decision(hook, context)
                count += 1
    return count


def _agreed_decision(hook: Any, context: ParallelContext):
    def should_compute(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            return True
        sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).float()
        sums = sums.to(context._comm_device)
        dist.all_reduce(sums, group=context.ulysses_group)
        return float(sums[0] / sums[1]) > hook.threshold

    return should_compute


def setup_parallel(engine: Any, context: ParallelContext) -> None:
    """Make a loaded engine one rank of the group. Ranks other than 0 drop their text encoders
    (rank 0 encodes and broadcasts): 16 GB each at full size."""
    if engine.preset_info.uses_pipeline_call:
        raise InvalidInputError(
            "preset", "stock", "runs diffusers' own loop: use exact, fp8 or turbo with --gpus-per-video"
        )
    install_ulysses(engine.pipe.transformer, context)
    agree_step_cache(engine.pipe.transformer, context)
    engine.parallel = context
    if not context.is_leader:
        engine.pipe.text_encoder = None
        engine.pipe.text_encoder_2 = None
    log.info("rank %d of %s", context.rank, context.split.describe())
