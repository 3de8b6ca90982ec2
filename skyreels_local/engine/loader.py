"""Build an Engine from a model name: the built-in `tiny-random` or a local weights directory.

Loading never touches the network: Hugging Face offline mode is forced before any component is
read, so a missing file is an error naming it, never a silent download. Where each component then
lives (and in which storage dtype) is the memory profile's decision (profiles.py).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

from ..weights.layout import TRANSFORMER_SUBDIR, check_weights_dir
from .engine import Engine, ModelSpec
from .presets import DEFAULT_PRESET, PresetOptions, apply_preset, validate_preset
from .profiles import AUTO, Profile, apply_profile, resolve_profile
from .request import SKYREELS_GEOMETRY
from .tiny import (
    TINY_GEOMETRY,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_MODEL_NAME,
    TINY_PROMPT_TEMPLATE,
    build_tiny_pipeline,
)

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


def _load_device(profile: Profile | None, component: str, device: torch.device) -> str | None:
    """Load straight onto the GPU what the profile keeps resident there in its loaded dtype (no
    host copy, no second transfer); everything else is loaded into host memory first."""
    if profile is None or device.type != "cuda":
        return None
    if component == "transformer":
        t = profile.transformer
        resident = t.placement == "resident" and t.storage_dtype == "compute"
    else:
        resident = profile.text_encoders.placement == "resident"
    return str(device) if resident else None


def load_text_encoders(path: Path, device: torch.device, *, device_map: str | None = None):
    """The Llama and CLIP text encoders of a weights directory (also used to reload freed ones)."""
    from transformers import CLIPTextModel, LlamaModel

    dtypes = component_dtypes(device)
    common = {"local_files_only": True, "device_map": device_map}
    llama = LlamaModel.from_pretrained(path / "text_encoder", dtype=dtypes["text_encoder"], **common)
    clip = CLIPTextModel.from_pretrained(path / "text_encoder_2", dtype=dtypes["text_encoder_2"], **common)
    return llama.eval().requires_grad_(False), clip.eval().requires_grad_(False)


def load_pipeline_from_dir(weights_dir: str | Path, device: torch.device, profile: Profile | None = None):
    """Load the SkyReels I2V pipeline from a complete local weights directory (see weights.py)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanSkyreelsImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import AutoTokenizer

    path = check_weights_dir(weights_dir)
    force_offline()
    dtypes = component_dtypes(device)
    common = {"local_files_only": True}
    log.info("loading weights from %s", path)
    text_encoder, text_encoder_2 = load_text_encoders(
        path, device, device_map=_load_device(profile, "text_encoders", device)
    )
    components = {
        "transformer": HunyuanVideoTransformer3DModel.from_pretrained(
            path / TRANSFORMER_SUBDIR,
            torch_dtype=dtypes["transformer"],
            device_map=_load_device(profile, "transformer", device),
            **common,
        ),
        "vae": AutoencoderKLHunyuanVideo.from_pretrained(path / "vae", torch_dtype=dtypes["vae"], **common),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": AutoTokenizer.from_pretrained(path / "tokenizer", **common),
        "tokenizer_2": AutoTokenizer.from_pretrained(path / "tokenizer_2", **common),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler", **common),
    }
    for name in ("transformer", "vae"):
        components[name].eval().requires_grad_(False)
    return HunyuanSkyreelsImageToVideoPipeline(**components)


def load_engine(
    model: str,
    *,
    device: str | None = None,
    profile: str = AUTO,
    preset: str = DEFAULT_PRESET,
    preset_options: PresetOptions | None = None,
) -> Engine:
    """`model` is `tiny-random` or a path to a weights directory; `profile` is `auto`, a memory
    built-in profile name (skyreels_local/profiles) or a profile file (profiles.py); `preset` a speed preset
    (presets.py), applied after the profile has placed the pipeline on its device."""
    validate_preset(preset)  # before the (minutes-long) load
    force_offline()
    started = time.perf_counter()
    target = pick_device(device)
    chosen = resolve_profile(profile, target)
    reload_text_encoders = None
    if model == TINY_MODEL_NAME:
        pipe = build_tiny_pipeline()
        spec = ModelSpec(
            name=TINY_MODEL_NAME,
            geometry=TINY_GEOMETRY,
            prompt_template=TINY_PROMPT_TEMPLATE,
            max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        )
    else:
        path = Path(model).expanduser()
        pipe = load_pipeline_from_dir(path, target, chosen)
        spec = ModelSpec(name=str(path), geometry=SKYREELS_GEOMETRY)
        reload_text_encoders = functools.partial(load_text_encoders, path, target)
    pipe.set_progress_bar_config(disable=True)
    placed = apply_profile(pipe, chosen, target, reload_text_encoders=reload_text_encoders)
    applied = apply_preset(pipe, preset, preset_options)
    log.info(
        "model %s loaded on %s in %.1fs with memory profile %s, speed preset %s",
        spec.name, target, time.perf_counter() - started, chosen.summary(), applied.name,
    )  # fmt: skip
    return Engine(
        pipe,
        spec,
        profile=chosen.name,
        text_encoders=placed.text_encoders,
        preset=applied,
        decode_budget_bytes=chosen.vae.decode_budget_bytes,
    )
