"""Write pipeline components as a weights folder in the real layout (see weights.py).

Used by the tests (tiny seeded components -> a folder the real loader reads) and by
`scripts/gpu_check.py` (full-size random weights, so that loading, memory profiles and step times
can be measured on a GPU machine that cannot download the real weights). The files are exactly
what the real folder holds: diffusers/transformers `save_pretrained` output, sharded safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .layout import TRANSFORMER_SUBDIR

# The base repository's model_index.json names the pipeline and each component's class.
_MODEL_INDEX_CLASSES = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "LlamaModel"),
    "text_encoder_2": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "LlamaTokenizerFast"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "transformer": ("diffusers", "HunyuanVideoTransformer3DModel"),
    "vae": ("diffusers", "AutoencoderKLHunyuanVideo"),
}


def write_weights_folder(
    folder: str | Path,
    components: dict[str, Any],
    *,
    max_shard_size: str = "5GB",
    only: tuple[str, ...] | None = None,
) -> Path:
    """Save `components` (the seven pipeline components) under `folder` in the download layout.

    `only` limits which components are written (e.g. everything but the transformer).
    """
    import diffusers

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    names = only or tuple(_MODEL_INDEX_CLASSES)
    for name in names:
        component = components[name]
        target = root / (TRANSFORMER_SUBDIR if name == "transformer" else name)
        if name.startswith("tokenizer") or name == "scheduler":
            component.save_pretrained(target)
        elif isinstance(component, diffusers.ModelMixin):
            component.save_pretrained(target, max_shard_size=max_shard_size, safe_serialization=True)
        else:  # transformers >= 5 always writes safetensors (and no longer takes safe_serialization)
            component.save_pretrained(target, max_shard_size=max_shard_size)
    index = {"_class_name": "HunyuanVideoPipeline", "_diffusers_version": diffusers.__version__}
    index.update({name: list(lib_cls) for name, lib_cls in _MODEL_INDEX_CLASSES.items()})
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


def write_tiny_weights(folder: str | Path, *, seed: int = 0) -> Path:
    """The built-in tiny-random components written as a weights folder (tests)."""
    from ..engine.tiny import build_tiny_components

    return write_weights_folder(folder, build_tiny_components(seed))
