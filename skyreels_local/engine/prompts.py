"""Prompt encoding with a small LRU cache of embeddings.

The 8B Llama text encoder costs seconds per prompt, and the negative prompt is nearly always the
same default: caching embeddings by text makes repeated prompts free. Entries are kept on the
device the transformer runs on (a few MB each at full size: 256 x 4096 bf16 = 2 MiB).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


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
    ) -> None:
        self._pipe = pipe
        self._template_kwargs = {} if prompt_template is None else {"prompt_template": prompt_template}
        self._max_sequence_length = max_sequence_length
        self._cache: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def encode(self, text: str) -> PromptEmbeds:
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return cached
        embeds = self._encode_uncached(text)
        with self._lock:
            self.misses += 1
            self._cache[text] = embeds
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return embeds

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
