"""Prompt encoding with a small LRU cache of embeddings, and where the text encoders live.

The 8B Llama text encoder costs seconds per prompt, and the negative prompt is nearly always the
same default: caching embeddings by text makes repeated prompts free. Entries are kept on the
device the transformer runs on (a few MB each at full size: 256 x 4096 bf16 = 2 MiB).

On GPUs that cannot keep the text encoders (16 GB in fp16) next to the transformer, the memory
profile gives the encoder a `TextEncoderResidency`: the text encoders come onto the GPU only for a
cache miss and leave (or are freed) right after, so they never share the GPU with denoising.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
CLIP_MAX_TOKENS = 77


class _ClipTruncationFilter(logging.Filter):
    """Drops the two warnings about prompts longer than CLIP's 77 tokens. The truncation is on
    purpose: SkyReels uses CLIP-L only for its pooled summary vector, the pipeline cuts CLIP's
    input at 77 tokens by design, and the whole prompt reaches the model through the Llama
    encoder (up to 256 tokens). SkyReels' own default negative prompt is longer than 77 tokens,
    so without this every generation would warn about text the user never wrote."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "CLIP can only handle sequences up to" in message
            or ("Token indices sequence length is longer" in message and f"> {CLIP_MAX_TOKENS})" in message)
        )


for _name in (
    "diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video",  # "...was truncated..."
    "transformers.tokenization_utils_base",  # "Token indices sequence length ... (119 > 77)"
):
    logging.getLogger(_name).addFilter(_ClipTruncationFilter())


class TextEncoderResidency(Protocol):
    """Moves the pipeline's text encoders around one encode (see profiles.py)."""

    # True when an encode brings whole text encoders (16 GB at full size) onto the GPU: such an
    # encode must not overlap a denoise, whose memory the profile did not plan for both.
    moves_whole_models: bool

    def before_encode(self, pipe: Any) -> None: ...

    def after_encode(self, pipe: Any) -> None: ...


class ResidentTextEncoders:
    """Text encoders stay where the profile put them (on the GPU, or managed by offload hooks)."""

    moves_whole_models = False

    def before_encode(self, pipe: Any) -> None:
        pass

    def after_encode(self, pipe: Any) -> None:
        pass


def _release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class OffloadedTextEncoders:
    """Text encoders live in host memory; moved to the GPU for an encode and back right after."""

    moves_whole_models = True

    def __init__(self, device: torch.device, offload_device: torch.device) -> None:
        self.device = device
        self.offload_device = offload_device

    def before_encode(self, pipe: Any) -> None:
        for name in TEXT_ENCODER_NAMES:
            getattr(pipe, name).to(self.device)

    def after_encode(self, pipe: Any) -> None:
        for name in TEXT_ENCODER_NAMES:
            getattr(pipe, name).to(self.offload_device)
        _release_device_memory(self.device)


class FreedTextEncoders:
    """Text encoders are dropped after each encode and reloaded (from the weights folder) for the
    next cache miss: the least memory on both GPU and host, at the cost of a reload per new prompt."""

    moves_whole_models = True

    def __init__(
        self, device: torch.device, reload: Callable[[], tuple[torch.nn.Module, torch.nn.Module]]
    ) -> None:
        self.device = device
        self.reload = reload
        self.reloads = 0

    def before_encode(self, pipe: Any) -> None:
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            log.info("reloading the text encoders (profile frees them after encoding)")
            pipe.text_encoder, pipe.text_encoder_2 = self.reload()
            self.reloads += 1
        for name in TEXT_ENCODER_NAMES:
            getattr(pipe, name).to(self.device)

    def after_encode(self, pipe: Any) -> None:
        pipe.text_encoder = None
        pipe.text_encoder_2 = None
        _release_device_memory(self.device)


@dataclass(frozen=True)
class PromptEmbeds:
    embeds: torch.Tensor  # [1, L, D] Llama hidden states
    pooled: torch.Tensor  # [1, P] CLIP pooled output
    mask: torch.Tensor  # [1, L] 1 for real tokens, 0 for padding

    def as_positive(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": self.embeds,
            "pooled_prompt_embeds": self.pooled,
            "prompt_attention_mask": self.mask,
        }

    def as_negative(self) -> dict[str, torch.Tensor]:
        return {
            "negative_prompt_embeds": self.embeds,
            "negative_pooled_prompt_embeds": self.pooled,
            "negative_prompt_attention_mask": self.mask,
        }


class PromptEncoder:
    """Encodes prompts through the pipeline's own `encode_prompt`, caching by text."""

    def __init__(
        self,
        pipe: Any,
        *,
        prompt_template: dict[str, Any] | None,
        max_sequence_length: int,
        cache_size: int = 32,
        residency: TextEncoderResidency | None = None,
    ) -> None:
        self._pipe = pipe
        self.residency: TextEncoderResidency = residency or ResidentTextEncoders()
        self._template_kwargs = {} if prompt_template is None else {"prompt_template": prompt_template}
        self._max_sequence_length = max_sequence_length
        self._cache: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # One encode at a time: the residency moves whole models between devices around it.
        self._encode_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def encode(self, text: str) -> PromptEmbeds:
        cached = self._lookup(text)
        if cached is not None:
            return cached
        with self._encode_lock:
            # Looked up again: a prefetch (worker/prefetch.py) may have encoded this very text
            # while we waited for the lock; then the wait was the encode and this is a hit.
            cached = self._lookup(text)
            if cached is not None:
                return cached
            self.residency.before_encode(self._pipe)
            try:
                embeds = self._encode_uncached(text)
            finally:
                self.residency.after_encode(self._pipe)
            # Cached before the encode lock is released, so that a waiter finds it.
            with self._lock:
                self.misses += 1
                self._cache[text] = embeds
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return embeds

    def _lookup(self, text: str) -> PromptEmbeds | None:
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                self.hits += 1
            return cached

    def resident_on(self, device: torch.device) -> bool:
        """True when an encode moves no weights: the residency moves none and every text encoder
        parameter already lives on `device` (not on the host behind group- or sequential-offload
        hooks). Only then may an encode run while the transformer denoises (worker/prefetch.py)."""
        if self.residency.moves_whole_models:
            return False
        device = torch.device(device)
        for name in TEXT_ENCODER_NAMES:
            encoder = getattr(self._pipe, name, None)
            if encoder is None:
                return False
            for param in encoder.parameters():
                here = param.device
                if here.type != device.type or (
                    here.index is not None and device.index is not None and here.index != device.index
                ):
                    return False
        return True

    @torch.inference_mode()
    def _encode_uncached(self, text: str) -> PromptEmbeds:
        pipe = self._pipe
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=text,
            device=pipe._execution_device,
            max_sequence_length=self._max_sequence_length,
            **self._template_kwargs,
        )
        dtype = pipe.transformer.dtype
        return PromptEmbeds(embeds.to(dtype), pooled.to(dtype), mask.to(dtype))

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
