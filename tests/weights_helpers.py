"""Helpers for the weights tests: checkpoints in the original (ComfyUI) naming, and a local stand-in
for the Hugging Face Hub (the Hub cannot be reached from tests)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

# diffusers name -> original HunyuanVideo name, for tensors that are renamed only (no split/merge).
# The inverse of diffusers' `convert_hunyuan_video_transformer_to_diffusers`, written out by hand
# so that the import test checks diffusers' mapping against an independent statement of it.
_TOP_LEVEL = {
    "x_embedder.proj": "img_in.proj",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
    "proj_out": "final_layer.linear",
}
_REFINER = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.to_out.0": "self_attn_proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
    "norm_out.linear": "adaLN_modulation.1",
}
_DOUBLE = {
    "attn.norm_q": "img_attn_q_norm",
    "attn.norm_k": "img_attn_k_norm",
    "attn.to_out.0": "img_attn_proj",
    "attn.norm_added_q": "txt_attn_q_norm",
    "attn.norm_added_k": "txt_attn_k_norm",
    "attn.to_add_out": "txt_attn_proj",
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
}
_SINGLE = {
    "proj_out": "linear2",
    "attn.norm_q": "q_norm",
    "attn.norm_k": "k_norm",
    "norm.linear": "modulation.linear",
}


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers HunyuanVideo transformer state dict in the original/ComfyUI key naming."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}

    def fuse(prefix: str, parts: list[str], target: str) -> None:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}.{p}.{kind}" for p in parts]
            if keys[0] in state:
                out[target + "." + kind] = torch.cat([state.pop(k) for k in keys], dim=0)

    # final_layer.adaLN_modulation.1 holds (shift, scale); diffusers' norm_out holds (scale, shift).
    for kind in ("weight", "bias"):
        scale, shift = state.pop(f"norm_out.linear.{kind}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale], dim=0)
    for name in sorted(state):
        if name not in state:
            continue  # consumed by a fuse
        stem, kind = name.rsplit(".", 1)
        if m := re.match(r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)$", stem):
            block, rest = m.groups()
            prefix = f"context_embedder.token_refiner.refiner_blocks.{block}"
            target = f"txt_in.individual_token_refiner.blocks.{block}"
            if rest.startswith("attn.to_") and rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
                fuse(prefix, ["attn.to_q", "attn.to_k", "attn.to_v"], f"{target}.self_attn_qkv")
                continue
            out[f"{target}.{_REFINER[rest]}.{kind}"] = state.pop(name)
        elif m := re.match(r"transformer_blocks\.(\d+)\.(.+)$", stem):
            block, rest = m.groups()
            prefix, target = f"transformer_blocks.{block}", f"double_blocks.{block}"
            if rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
                fuse(prefix, ["attn.to_q", "attn.to_k", "attn.to_v"], f"{target}.img_attn_qkv")
            elif rest in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
                fuse(
                    prefix,
                    ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                    f"{target}.txt_attn_qkv",
                )
            else:
                out[f"{target}.{_DOUBLE[rest]}.{kind}"] = state.pop(name)
        elif m := re.match(r"single_transformer_blocks\.(\d+)\.(.+)$", stem):
            block, rest = m.groups()
            prefix, target = f"single_transformer_blocks.{block}", f"single_blocks.{block}"
            if rest in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
                fuse(prefix, ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], f"{target}.linear1")
            else:
                out[f"{target}.{_SINGLE[rest]}.{kind}"] = state.pop(name)
        else:
            out[f"{_TOP_LEVEL[stem]}.{kind}"] = state.pop(name)
    return out


def fake_snapshot_download(hub_root: Path, calls: list[dict]):
    """A stand-in for `huggingface_hub.snapshot_download` that copies from `hub_root/<repo_id>/`.

    It selects files with huggingface_hub's own pattern filter (what the real function uses), so
    allow/ignore patterns behave as they would against the Hub.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    def snapshot_download(
        repo_id, *, revision=None, local_dir=None, allow_patterns=None, ignore_patterns=None, **kw
    ):
        calls.append({"repo_id": repo_id, "revision": revision, "local_dir": Path(local_dir), **kw})
        repo = hub_root / repo_id
        if not repo.is_dir():
            raise LocalEntryNotFoundError(f"no such repo in the fake hub: {repo_id}")
        files = [p.relative_to(repo).as_posix() for p in sorted(repo.rglob("*")) if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            target = Path(local_dir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or target.stat().st_size != (repo / rel).stat().st_size:
                shutil.copyfile(repo / rel, target)
        return str(local_dir)

    return snapshot_download
