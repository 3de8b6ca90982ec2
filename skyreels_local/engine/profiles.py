"""GPU memory profiles: where each component lives and in which storage dtype.

A profile is a small file in `skyreels_local/profiles/` (TOML, JSON or YAML; package data) that says, per component:

- transformer: `resident` on the GPU, `group-offload` (blocks stream in from pinned host memory on
  a side CUDA stream while the previous block computes) or `sequential-offload` (accelerate's
  layer-by-layer offload, the slowest and smallest); stored in the compute dtype or as
  `float8_e4m3fn` (storage only: weights are upcast per layer for the bf16 matmul).
- text encoders (Llama 8B + CLIP-L): `resident`; `offload` (kept in host memory, moved to the GPU
  for an encode and back right after); `group-offload` (streamed block by block); `free` (dropped
  after encoding and reloaded from disk on the next new prompt); `sequential-offload`.
  Prompt embeddings are cached either way (prompts.py), so repeated prompts never touch them.
- VAE: `resident` or `sequential-offload`, and whether decoding is tiled.

Profiles only decide memory placement. Kernels, compilation and step caching are the speed
presets' business (`--preset`); the two are independent. In particular fp8 here is storage: fp8
*matmuls* (compute capability >= 8.9, cuBLAS-friendly shapes only) belong to the `fp8` preset.

`auto` picks the first profile, from the largest `min_free_gib` down, whose `min_free_gib` fits the
GPU's free memory at start-up; the one with the smallest requirement is the last resort.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InvalidInputError
from ..profile_names import AUTO, PROFILE_SUFFIXES, builtin_profiles_dir, profile_files
from .prompts import FreedTextEncoders, OffloadedTextEncoders, ResidentTextEncoders, TextEncoderResidency

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
GIB = 1024**3

# Profiles are plain dataclasses checked by `_from_dict` (not pydantic): the engine, and with it
# scripts/gpu_check.py, must import on a bare GPU machine that has torch and diffusers only.


@dataclass(frozen=True)
class GroupOffloadSettings:
    """diffusers group offloading (`apply_group_offloading`)."""

    offload_type: Literal["block_level", "leaf_level"] = "block_level"
    blocks_per_group: int = 1
    # Prefetch the next group on a side CUDA stream (needs pinned host memory; ignored off CUDA).
    use_stream: bool = True
    # With streams: let the allocator track cross-stream use instead of synchronising per block.
    record_stream: bool = True
    # Pin each group when it is loaded instead of pinning everything at start-up (less host RAM, slower).
    low_cpu_mem_usage: bool = False

    def __post_init__(self) -> None:
        if self.blocks_per_group < 1:
            raise ValueError(f"blocks_per_group: must be at least 1, got {self.blocks_per_group}")


@dataclass(frozen=True)
class TransformerSettings:
    placement: Literal["resident", "group-offload", "sequential-offload"] = "resident"
    storage_dtype: Literal["compute", "float8_e4m3fn"] = "compute"
    # layerwise: diffusers' layerwise casting (composes with group offload).
    # torchao: torchao Float8WeightOnlyConfig on the block linears (resident placement only).
    fp8_method: Literal["layerwise", "torchao"] = "layerwise"
    group_offload: GroupOffloadSettings = GroupOffloadSettings()


@dataclass(frozen=True)
class TextEncoderSettings:
    placement: Literal["resident", "offload", "group-offload", "free", "sequential-offload"] = "resident"
    # Encodes are rare (embeddings are cached): no stream, no pinned copy of 16 GB of host memory.
    group_offload: GroupOffloadSettings = GroupOffloadSettings(use_stream=False, record_stream=False)


@dataclass(frozen=True)
class VaeSettings:
    placement: Literal["resident", "sequential-offload"] = "resident"
    tiling: bool = True
    # The most GPU memory (GiB) the decode may plan for. The fast path sizes decode tiles from
    # the memory free at decode time; without this cap a small-GPU profile run on a large GPU
    # (or beside other processes) would decode untiled and blow its peak. None: whatever is free.
    decode_budget_gib: float | None = None

    @property
    def decode_budget_bytes(self) -> int | None:
        return None if self.decode_budget_gib is None else int(self.decode_budget_gib * 2**30)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    device: Literal["cuda", "cpu"] = "cuda"
    # `auto` chooses this profile when the GPU has at least this much free memory (GiB).
    min_free_gib: float = 0.0
    # Expected peak VRAM (GiB) at 544x960x97 with the real text encoders; documentation, and what
    # scripts/gpu_check.py compares its measurement with.
    expected_peak_gib: float | None = None
    transformer: TransformerSettings = TransformerSettings()
    text_encoders: TextEncoderSettings = TextEncoderSettings()
    vae: VaeSettings = VaeSettings()

    def __post_init__(self) -> None:
        if self.min_free_gib < 0:
            raise ValueError(f"min_free_gib: must be >= 0, got {self.min_free_gib}")
        t = self.transformer
        if t.storage_dtype == "float8_e4m3fn" and t.placement == "sequential-offload":
            raise ValueError(
                "transformer: float8 storage is not supported with sequential-offload; use group-offload"
            )
        if t.storage_dtype == "float8_e4m3fn" and t.fp8_method == "torchao" and t.placement != "resident":
            raise ValueError(
                "transformer: fp8_method 'torchao' needs placement 'resident'; use 'layerwise' to offload"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Build and check a profile; ValueError names the offending setting."""
        return _from_dict(cls, data, "", None)

    def summary(self) -> str:
        t = self.transformer
        storage = "fp8 storage" if t.storage_dtype == "float8_e4m3fn" else "compute-dtype storage"
        parts = [
            f"transformer {t.placement} ({storage})",
            f"text encoders {self.text_encoders.placement}",
            f"VAE {self.vae.placement}{' tiled' if self.vae.tiling else ''}",
        ]
        return f"{self.name}: " + ", ".join(parts)


def _from_dict(cls: type, data: Any, path: str, default: Any) -> Any:
    """A (nested) settings dataclass from a mapping: unknown keys, wrong types and values outside
    a Literal's choices are errors naming the setting; missing keys keep the defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{path.rstrip('.') or 'profile'}: must be a table of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"{path}{key}: unknown setting (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        where = f"{path}{key}"
        if dataclasses.is_dataclass(hint):
            base = getattr(default, key) if default is not None else getattr(cls, key, None)
            values[key] = _from_dict(hint, value, f"{where}.", base)
        else:
            values[key] = _check_value(hint, value, where)
    try:
        if default is not None:
            return dataclasses.replace(default, **values)
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"{path}{exc}") from exc


def _check_value(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        return _check_value(next(a for a in args if a is not type(None)), value, where)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where}: must be a string, got {value!r}")
    return value


# --- finding and reading profiles ----------------------------------------------------------------


def default_profiles_dir() -> Traversable:
    """The built-in profiles, shipped inside the package (profile_names.py)."""
    return builtin_profiles_dir()


def read_profile_file(path: Path | Traversable) -> Profile:
    suffix, stem = Path(path.name).suffix, Path(path.name).stem
    try:
        text = path.read_text()
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # PyYAML comes with huggingface_hub

            data = yaml.safe_load(text)
    except (OSError, ValueError) as exc:  # tomllib/json/yaml errors are ValueErrors
        raise InvalidInputError("profile", str(path), f"must be a readable profile file ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidInputError("profile", str(path), "must hold a table/object of profile settings")
    data.setdefault("name", stem)
    try:
        return Profile.from_dict(data)
    except ValueError as exc:
        raise InvalidInputError("profile", str(path), f"must be a valid profile ({exc})") from exc


def load_profiles(directory: Path | Traversable | None = None) -> dict[str, Profile]:
    """Every profile in `directory` (default: the built-in ones, skyreels_local/profiles/), by name."""
    folder = directory or default_profiles_dir()
    profiles: dict[str, Profile] = {}
    for path in profile_files(folder):
        profile = read_profile_file(path)
        if profile.name in profiles:
            raise InvalidInputError(
                "profile", str(path), f"must have a unique name; {profile.name!r} is defined twice"
            )
        profiles[profile.name] = profile
    if not profiles:
        raise InvalidInputError("profile", str(folder), "directory must hold profile files (*.toml)")
    return profiles


def select_profile(profiles: dict[str, Profile], *, device_type: str, free_gib: float | None) -> Profile:
    """The profile `auto` means for a device with `free_gib` free memory (ignored off CUDA)."""
    candidates = [p for p in profiles.values() if p.device == device_type]
    if not candidates:
        raise InvalidInputError(
            "profile", AUTO, f"needs a profile for device {device_type!r} among {', '.join(sorted(profiles))}"
        )
    if device_type != "cuda" or free_gib is None:
        return min(candidates, key=lambda p: p.min_free_gib)
    ordered = sorted(candidates, key=lambda p: p.min_free_gib, reverse=True)
    for profile in ordered:
        if free_gib >= profile.min_free_gib:
            return profile
    last_resort = ordered[-1]
    log.warning(
        "only %.1f GiB free; even profile %s asks for %.1f",
        free_gib,
        last_resort.name,
        last_resort.min_free_gib,
    )
    return last_resort


def free_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free / GIB


def resolve_profile(spec: str, device: torch.device, *, directory: Path | None = None) -> Profile:
    """`spec` is `auto`, a built-in profile name, or a path to a profile file."""
    candidate = Path(spec).expanduser()
    if candidate.suffix in PROFILE_SUFFIXES and candidate.is_file():
        return read_profile_file(candidate)
    profiles = load_profiles(directory)
    if spec == AUTO:
        free = free_memory_gib(device)
        profile = select_profile(profiles, device_type=device.type, free_gib=free)
        log.info("profile auto -> %s (%s free)", profile.name, "n/a" if free is None else f"{free:.1f} GiB")
        return profile
    if spec not in profiles:
        names = ", ".join([AUTO, *sorted(profiles)])
        raise InvalidInputError("profile", spec, f"must be one of {names} or a path to a profile file")
    return profiles[spec]


# --- applying a profile to a pipeline ------------------------------------------------------------


@dataclass
class AppliedProfile:
    profile: Profile
    text_encoders: TextEncoderResidency
    notes: list[str] = field(default_factory=list)  # decisions taken on this machine (logged)


def group_offload_kwargs(
    settings: GroupOffloadSettings, device: torch.device, offload_device: torch.device
) -> dict[str, Any]:
    """Arguments for diffusers' group offloading. Streams exist only on CUDA."""
    use_stream = settings.use_stream and device.type == "cuda"
    return {
        "onload_device": device,
        "offload_device": offload_device,
        "offload_type": settings.offload_type,
        "num_blocks_per_group": settings.blocks_per_group if settings.offload_type == "block_level" else None,
        "use_stream": use_stream,
        "record_stream": use_stream and settings.record_stream,
        "low_cpu_mem_usage": settings.low_cpu_mem_usage,
    }


def apply_profile(
    pipe: Any,
    profile: Profile,
    device: torch.device,
    *,
    offload_device: torch.device | None = None,
    reload_text_encoders: Callable[[], tuple[torch.nn.Module, torch.nn.Module]] | None = None,
) -> AppliedProfile:
    """Put the pipeline's components where `profile` says. Storage dtypes first (so that offloaded
    copies are made of the fp8 weights), then placement.

    `offload_device`: where offloaded weights live (host memory; tests pass `meta` to check what a
    profile does to full-size models without allocating them).
    `reload_text_encoders`: how to get the text encoders back for placement `free`.
    """
    offload_device = offload_device or torch.device("cpu")
    notes: list[str] = []
    if device.type == "cuda" and any(
        s.use_stream for s in (profile.transformer.group_offload, profile.text_encoders.group_offload)
    ):
        notes.append("group offload prefetches on a CUDA stream")
    elif device.type != "cuda":
        notes.append(f"device {device.type}: no CUDA streams")
    _apply_transformer(pipe, profile.transformer, device, offload_device, notes)
    residency = _apply_text_encoders(
        pipe, profile.text_encoders, device, offload_device, reload_text_encoders
    )
    _apply_vae(pipe, profile.vae, device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    log.info("applied profile %s on %s (%s)", profile.summary(), device, "; ".join(notes))
    return AppliedProfile(profile, residency, notes)


def _apply_transformer(
    pipe: Any, settings: TransformerSettings, device, offload_device, notes: list[str]
) -> None:
    transformer = pipe.transformer
    compute_dtype = transformer.dtype
    fp8 = settings.storage_dtype == "float8_e4m3fn"
    if fp8 and settings.fp8_method == "layerwise":
        if device.type == "cuda":
            cast_like_layerwise_casting(transformer, torch.float8_e4m3fn, device)
            notes.append("fp8 cast on the GPU")
        # diffusers skips embedders, norms (incl. the AdaLN modulation linears) and the output
        # projection: those stay in the compute dtype, the block linears are stored in fp8.
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    if settings.placement == "resident":
        transformer.to(device)
        if fp8 and settings.fp8_method == "torchao":
            _torchao_fp8_weight_only(transformer)
            notes.append("torchao fp8 weight-only storage")
    elif settings.placement == "group-offload":
        transformer.enable_group_offload(
            **group_offload_kwargs(settings.group_offload, device, offload_device)
        )
    else:
        _sequential(transformer, device)


def cast_like_layerwise_casting(
    model: torch.nn.Module, storage_dtype: torch.dtype, device: torch.device
) -> int:
    """Cast to `storage_dtype`, on `device`, exactly the parameters that diffusers' layerwise casting
    would cast; returns how many. `enable_layerwise_casting` casts on the host, where bf16 -> fp8
    runs on one CPU thread (~1 GB/s: 20 s and more for this model); after this it finds them cast.

    Which parameters: diffusers decides, in a dry run on a copy of the model built on the meta
    device (no memory), so that the choice stays exactly diffusers' own.
    """
    with torch.device("meta"):
        probe = type(model).from_config(model.config)
    probe.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.bfloat16)
    names = [name for name, p in probe.named_parameters() if p.dtype == storage_dtype]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            param = params[name]
            home = param.device
            param.data = param.data.to(device).to(storage_dtype).to(home)
    return len(names)


def _torchao_fp8_weight_only(transformer: torch.nn.Module) -> None:
    """fp8 weights, bf16 matmuls (dequantized per call): no cuBLAS fp8 shape limits apply."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_  # lazy: optional, GPU-only

    def in_blocks(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith(
            ("transformer_blocks.", "single_transformer_blocks.")
        )

    quantize_(transformer, Float8WeightOnlyConfig(), filter_fn=in_blocks)


def _apply_text_encoders(
    pipe: Any,
    settings: TextEncoderSettings,
    device: torch.device,
    offload_device: torch.device,
    reload: Callable[[], tuple[torch.nn.Module, torch.nn.Module]] | None,
) -> TextEncoderResidency:
    encoders = [getattr(pipe, name) for name in TEXT_ENCODERS]
    placement = settings.placement
    if placement == "resident":
        for encoder in encoders:
            encoder.to(device)
        return ResidentTextEncoders()
    if placement == "offload":
        for encoder in encoders:
            encoder.to(offload_device)
        return OffloadedTextEncoders(device, offload_device)
    if placement == "free":
        if reload is None:
            raise InvalidInputError(
                "profile", "text_encoders.placement = free", "needs a model loaded from a weights folder"
            )
        return FreedTextEncoders(device, reload)
    if placement == "group-offload":
        from diffusers.hooks import apply_group_offloading

        for encoder in encoders:
            apply_group_offloading(
                encoder, **group_offload_kwargs(settings.group_offload, device, offload_device)
            )
        return ResidentTextEncoders()
    for encoder in encoders:
        _sequential(encoder, device)
    return ResidentTextEncoders()


def _apply_vae(pipe: Any, settings: VaeSettings, device: torch.device) -> None:
    if settings.placement == "resident":
        pipe.vae.to(device)
    else:
        _sequential(pipe.vae, device)
    if settings.tiling:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def _sequential(module: torch.nn.Module, device: torch.device) -> None:
    """accelerate's layer-by-layer CPU offload, as diffusers' enable_sequential_cpu_offload does it."""
    from accelerate import cpu_offload

    cpu_offload(module, execution_device=device, offload_buffers=len(module._parameters) > 0)
