"""Build an Engine from a model name: the built-in `tiny-random` or a local weights directory.

Loading never touches the network: Hugging Face offline mode is forced before any component is
read, so a missing file is an error naming it, never a silent download.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .engine import Engine, ModelSpec
from .presets import DEFAULT_PRESET, PresetOptions, apply_preset, validate_preset
from .request import SKYREELS_GEOMETRY
from .tiny import (
    TINY_GEOMETRY,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_MODEL_NAME,
    TINY_PROMPT_TEMPLATE,
    build_tiny_pipeline,
)
from .weights import TRANSFORMER_SUBDIR, check_weights_dir

log = logging.getLogger(__name__)


def force_offline() -> None:
    """Make huggingface_hub, transformers and diffusers refuse all network access in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def component_dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """Per-component compute dtypes: bf16 transformer, fp16 VAE and text encoders on a GPU
    (as diffusers' and upstream's examples do); float32 everywhere on a CPU."""
    if device.type != "cuda":
        return dict.fromkeys(("transformer", "vae", "text_encoder", "text_encoder_2"), torch.float32)
    return {
        "transformer": torch.bfloat16,
        "vae": torch.float16,
        "text_encoder": torch.float16,
        "text_encoder_2": torch.float16,
    }


def load_pipeline_from_dir(weights_dir: str | Path, device: torch.device):
    """Load the SkyReels I2V pipeline from a complete local weights directory (see weights.py)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanSkyreelsImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    path = check_weights_dir(weights_dir)
    force_offline()
    dtypes = component_dtypes(device)
    common = {"local_files_only": True}
    log.info("loading weights from %s", path)
    components = {
        "transformer": HunyuanVideoTransformer3DModel.from_pretrained(
            path / TRANSFORMER_SUBDIR, torch_dtype=dtypes["transformer"], **common
        ),
        "vae": AutoencoderKLHunyuanVideo.from_pretrained(path / "vae", torch_dtype=dtypes["vae"], **common),
        "text_encoder": LlamaModel.from_pretrained(
            path / "text_encoder", dtype=dtypes["text_encoder"], **common
        ),
        "text_encoder_2": CLIPTextModel.from_pretrained(
            path / "text_encoder_2", dtype=dtypes["text_encoder_2"], **common
        ),
        "tokenizer": AutoTokenizer.from_pretrained(path / "tokenizer", **common),
        "tokenizer_2": AutoTokenizer.from_pretrained(path / "tokenizer_2", **common),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler", **common),
    }
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        components[name].eval().requires_grad_(False)
    return HunyuanSkyreelsImageToVideoPipeline(**components)


def place_pipeline(pipe, device: torch.device) -> str:
    """Put the pipeline on its device. Returns the name of the placement used.

    On a GPU everything resident plus VAE tiling (the 80 GB class); memory profiles for smaller
    GPUs hook in here.
    """
    if device.type == "cuda":
        pipe.to(device)
        pipe.vae.enable_tiling()
        return "bf16-resident"
    pipe.to(device)
    return "cpu"


def load_engine(
    model: str,
    *,
    device: str | None = None,
    preset: str = DEFAULT_PRESET,
    preset_options: PresetOptions | None = None,
) -> Engine:
    """`model` is `tiny-random` or a path to a weights directory; `preset` a speed preset
    (presets.py), applied after the pipeline is placed on its device."""
    validate_preset(preset)  # before the (minutes-long) load
    force_offline()
    target = pick_device(device)
    if model == TINY_MODEL_NAME:
        pipe = build_tiny_pipeline()
        spec = ModelSpec(
            name=TINY_MODEL_NAME,
            geometry=TINY_GEOMETRY,
            prompt_template=TINY_PROMPT_TEMPLATE,
            max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        )
    else:
        pipe = load_pipeline_from_dir(model, target)
        spec = ModelSpec(name=str(Path(model).expanduser()), geometry=SKYREELS_GEOMETRY)
    pipe.set_progress_bar_config(disable=True)
    profile = place_pipeline(pipe, target)
    applied = apply_preset(pipe, preset, preset_options)
    log.info("model %s loaded on %s (profile %s, preset %s)", spec.name, target, profile, applied.name)
    return Engine(pipe, spec, profile=profile, preset=applied)
