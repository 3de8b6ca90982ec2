"""The built-in `tiny-random` model: the real SkyReels pipeline class with tiny seeded components.

Everything is built locally (no Hub access): the transformer, VAE and both text encoders are
random but seeded, and the tokenizers are character-level BPE tokenizers built in memory, so
that every distinct prompt maps to distinct token ids. A whole generation runs on a CPU in about
a second; outputs are noise-like videos, useful only to exercise the system end to end.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanSkyreelsImageToVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from .request import ModelGeometry

TINY_MODEL_NAME = "tiny-random"
# Landscape for 16:9 and portrait for 9:16, at sizes a CPU denoises in milliseconds.
TINY_GEOMETRY = ModelGeometry(sizes={"16:9": (64, 32), "9:16": (32, 64)}, num_frames=9)
# The real template crops a 95-token system prompt; the tiny one has none.
TINY_PROMPT_TEMPLATE = {"template": "{}", "crop_start": 0}
TINY_MAX_SEQUENCE_LENGTH = 64

_SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


def build_char_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory: no vocabulary file, no network."""
    alphabet = list(dict.fromkeys(string.printable.strip() + "".join(chr(c) for c in range(0xC0, 0x180))))
    vocab = {tok: i for i, tok in enumerate(_SPECIAL + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
    )


def build_tiny_components(seed: int = 0) -> dict[str, object]:
    """The seven pipeline components, each built under its own fixed seed."""
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=8,  # 4 noisy latent channels + 4 image latent channels (latent concat)
        out_channels=4,
        # 4 heads: the Ulysses tests split them over 2 and 4 ranks (engine/parallel.py).
        num_attention_heads=4,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    torch.manual_seed(seed + 2)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(_SPECIAL) + 300,
            hidden_size=16,
            intermediate_size=37,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=4,
            max_position_embeddings=512,  # room for the real 95-token template when loaded from disk
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    torch.manual_seed(seed + 3)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(_SPECIAL) + 300,
            hidden_size=8,
            intermediate_size=37,
            projection_dim=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": llama.eval(),
        "tokenizer": build_char_tokenizer(TINY_MAX_SEQUENCE_LENGTH),
        "text_encoder_2": clip.eval(),
        "tokenizer_2": build_char_tokenizer(77),
        "scheduler": scheduler,
    }


def build_tiny_pipeline(seed: int = 0) -> HunyuanSkyreelsImageToVideoPipeline:
    """The real pipeline class over tiny random components (float32, CPU)."""
    return HunyuanSkyreelsImageToVideoPipeline(**build_tiny_components(seed))
