"""The benchmark's end-to-end runs: one whole video per preset, timed in its four parts.

encode (the text encoders on the prompt and the negative prompt) + the denoising steps (a full
schedule, `--e2e-steps`, 30 by default as in production) + the VAE decode + the MP4 write.
Every run denoises the same shared inputs (bench Setup), so the final latents of each preset
compare with stock's at the same step count.

The text encoders: the tiny model has its own (real code, tiny weights). The full-size random
model has none; `--text-encoder random-full` builds stand-ins of SkyReels' real shapes on the
device (a Llama-3-8B-shaped decoder, 7.5 B parameters in bf16, and CLIP-L's text model, random
weights) and keeps them resident through the run, which is what the 80gb memory profile does:
their ~15 GiB show in every variant's peak. Their output is timed, not used: the shared prompt
embeddings keep every variant on the same inputs.

Standard library at the top (bench/run.py's rule); torch and friends load when a run starts.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_ENCODERS = ("auto", "none", "random-full")
# SkyReels V1 / HunyuanVideo text encoders (their config.json files): the llava-llama-3-8b text
# model and CLIP ViT-L/14's text tower. Real prompts use the template's ~95 tokens + <= 256.
LLAMA_8B = dict(
    vocab_size=128_320,
    hidden_size=4096,
    intermediate_size=14_336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
)
CLIP_L_TEXT = dict(
    vocab_size=49_408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
)
LLAMA_TOKENS = 95 + 256  # the prompt template's prefix + SkyReels' 256 text tokens
CLIP_TOKENS = 77


@dataclass
class TextEncoderStandIn:
    """Random full-size text encoders with the real compute of `PromptEncoder.encode`: one
    Llama forward over the templated prompt (hidden states of the third-last layer, as
    HunyuanVideo takes them) and one CLIP forward for the pooled embedding."""

    llama: Any
    clip: Any
    device: Any

    def encode(self, _text: str) -> Any:
        import torch

        ids = torch.randint(0, 32_000, (1, LLAMA_TOKENS), device=self.device)
        clip_ids = torch.randint(0, 49_000, (1, CLIP_TOKENS), device=self.device)
        with torch.inference_mode():
            hidden = self.llama(input_ids=ids, output_hidden_states=True).hidden_states[-3]
            pooled = self.clip(input_ids=clip_ids).pooler_output
        return hidden, pooled

    def parameters_b(self) -> float:
        return sum(p.numel() for m in (self.llama, self.clip) for p in m.parameters()) / 1e9


def build_text_encoder_stand_in(device: Any) -> TextEncoderStandIn:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            llama = LlamaModel(LlamaConfig(**LLAMA_8B))
        torch.set_default_dtype(torch.float16)
        with torch.device(device):
            clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # small weights: finite activations through 32 random layers
        for module in (*llama.modules(), *clip.modules()):
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                module.weight.normal_(0, 0.02)
    return TextEncoderStandIn(llama.eval().requires_grad_(False), clip.eval().requires_grad_(False), device)


class FreshPromptEncoder:
    """The pipeline's text encoders behind our PromptEncoder, a new one per call: PromptEncoder
    caches by text, and every e2e run encodes the same prompts (a cache hit is not an encode)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def encode(self, text: str) -> Any:
        from ..engine.prompts import PromptEncoder
        from ..engine.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_PROMPT_TEMPLATE

        return PromptEncoder(
            self.pipe, prompt_template=TINY_PROMPT_TEMPLATE, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
        ).encode(text)


def pipeline_prompt_encoder(pipe: Any) -> Any | None:
    """The tiny model's own text encoders (None for a pipeline without them: the full-size
    random model, whose stand-ins come from --text-encoder random-full)."""
    if pipe.text_encoder is None or pipe.tokenizer is None:
        return None
    return FreshPromptEncoder(pipe)


def time_encode(encoder: Any | None, sync: Callable[[], None], prompts: tuple[str, str]) -> float | None:
    """Seconds to encode the prompt and the negative prompt (None: no encoder to time)."""
    if encoder is None:
        return None
    sync()
    started = time.perf_counter()
    for text in prompts:
        encoder.encode(text)
    sync()
    return time.perf_counter() - started


def time_mp4(video: Any) -> tuple[float, int]:
    """Seconds to turn the pipeline's float frames into uint8 and write the MP4 (and its bytes).
    The conversion is the engine's (engine.to_uint8_frames), inlined: that module is not needed."""
    import numpy as np

    from ..video import write_mp4

    started = time.perf_counter()
    frames = np.clip(np.rint(np.asarray(video[0], dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = write_mp4(frames, Path(folder) / "bench.mp4")
        size = path.stat().st_size
    return time.perf_counter() - started, size


def stock_decode(pipe: Any, latents: Any) -> Any:
    """The stock pipeline's decode: diffusers' default 256-px tiles (what `decode_default` times)."""
    import torch

    pipe.vae.enable_tiling(
        tile_sample_min_height=256,
        tile_sample_min_width=256,
        tile_sample_stride_height=192,
        tile_sample_stride_width=192,
    )
    with torch.inference_mode():
        video = pipe.vae.decode(
            latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False
        )[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")
