"""`skyreels-local weights import FILE`: a single-file SkyReels transformer into the weights folder.

Studios often already hold the transformer as one ComfyUI-style safetensors file (Kijai's
`skyreels_hunyuan_i2v_bf16.safetensors`, 25.6 GB, or `..._fp8_e4m3fn.safetensors`, 13.2 GB) in the
original HunyuanVideo key naming (`double_blocks.0.img_attn_qkv.weight`, optionally under a
`model.diffusion_model.` prefix). This module turns such a file into the diffusers layout the
loader reads (`transformer/config.json` + safetensors shards + index), so nothing is downloaded again.

The key conversion is diffusers' own: `convert_hunyuan_video_transformer_to_diffusers`, the mapping
that `HunyuanVideoTransformer3DModel.from_single_file` applies. We call the mapping rather than
`from_single_file` itself because `from_single_file` materialises the whole model in host memory
(25.6 GB in bf16) before it could be saved; converting block by block and writing shards as they
fill keeps peak host memory near one shard (5 GiB). Every converted key and shape is checked
against the model built on the meta device from the target config, so a wrong or partial file
fails before anything is replaced.

Storage dtype is kept as found (an fp8 file stays fp8 on disk, half the size; the loader upcasts
to the compute dtype or keeps fp8 storage as the memory profile says), or cast with `dtype="bf16"`.
ComfyUI "scaled fp8" files (`scaled_fp8` marker, per-weight `scale_weight`) are dequantized to bf16.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import WeightsError
from .layout import (
    SKYREELS_I2V_TRANSFORMER_CONFIG,
    TRANSFORMER_SUBDIR,
    build_manifest,
    list_weight_files,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

# diffusers' converter splits the single blocks' fused `linear1` with this width hard-coded (the
# 13B model's hidden size). For other widths (small test models) we split it ourselves first.
_DIFFUSERS_SINGLE_BLOCK_WIDTH = 3072
_KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
_ORIGINAL_MARKER = "img_in.proj.weight"
_DIFFUSERS_MARKER = "x_embedder.proj.weight"
_BLOCK_RE = re.compile(
    r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\."
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
WEIGHTS_NAME = "diffusion_pytorch_model"


@dataclass
class ImportResult:
    transformer_dir: Path
    source: Path
    source_format: Literal["original", "diffusers"]
    prefix: str
    scaled_fp8: bool
    num_tensors: int
    total_bytes: int
    files: list[str]
    dtypes: Counter = field(default_factory=Counter)  # parameters per stored dtype


def import_single_file(
    checkpoint: str | Path,
    weights_dir: str | Path,
    *,
    config: dict[str, Any] | str | Path | None = None,
    dtype: Literal["keep", "bf16"] = "keep",
    replace: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    update_manifest: bool = True,
) -> ImportResult:
    """Convert `checkpoint` into `weights_dir/transformer/` (diffusers layout) and update the manifest.

    `config`: the transformer config (a dict, a config.json path or a folder holding one); default
    the SkyReels I2V config. An existing `transformer/` is only replaced with `replace=True`, and
    only after the new one is completely written.
    """
    from safetensors import safe_open

    source = Path(checkpoint).expanduser()
    if not source.is_file():
        raise WeightsError(f"checkpoint {str(source)!r} does not exist")
    root = Path(weights_dir).expanduser()
    target = root / TRANSFORMER_SUBDIR
    if target.exists() and any(target.iterdir()) and not replace:
        raise WeightsError(
            f"{target} already holds a transformer; pass --replace to overwrite it with {source.name}"
        )
    model_config = _load_config(config)
    expected = _expected_shapes(model_config)

    try:
        handle = safe_open(str(source), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise WeightsError(f"{source} is not a readable safetensors file ({exc})") from exc
    with handle as f:
        keys = list(f.keys())
        prefix, source_format = _detect_layout(keys, source)
        scales = {k[: -len(".scale_weight")] + ".weight": k for k in keys if k.endswith(".scale_weight")}
        scaled_fp8 = bool(scales) or f"{prefix}scaled_fp8" in keys
        tensor_keys = [
            k for k in keys if k.startswith(prefix) and not _is_quantization_extra(k[len(prefix) :])
        ]
        _check_input_channels(f, prefix, source_format, model_config, source)

        staging = root / f"{TRANSFORMER_SUBDIR}.importing"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        writer = _ShardWriter(staging, max_shard_bytes)
        seen: set[str] = set()
        dtypes: Counter = Counter()
        try:
            for group in _groups(tensor_keys, prefix):
                tensors = {k[len(prefix) :]: _load(f, k, scales.get(k)) for k in group}
                converted = _to_diffusers(tensors, source_format, model_config)
                for name, tensor in converted.items():
                    _check_tensor(name, tensor, expected, seen, source)
                    if dtype == "bf16" and tensor.is_floating_point():
                        tensor = tensor.to(torch.bfloat16)
                    dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
                    writer.add(name, tensor)
            missing = sorted(set(expected) - seen)
            if missing:
                shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                raise WeightsError(f"{source.name} lacks {len(missing)} transformer weights: {shown}")
            files = writer.finish()
            _write_config(staging, model_config)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    _swap_in(staging, target)
    result = ImportResult(
        transformer_dir=target,
        source=source,
        source_format=source_format,
        prefix=prefix,
        scaled_fp8=scaled_fp8,
        num_tensors=len(seen),
        total_bytes=writer.total_bytes,
        files=[f"{TRANSFORMER_SUBDIR}/{name}" for name in [*files, "config.json"]],
        dtypes=dtypes,
    )
    if update_manifest:
        _update_manifest(root, result)
    log.info("imported %s (%s layout, %d tensors) into %s", source.name, source_format, len(seen), target)
    return result


# --- reading the checkpoint ----------------------------------------------------------------------


def _detect_layout(keys: list[str], source: Path) -> tuple[str, Literal["original", "diffusers"]]:
    key_set = set(keys)
    for prefix in ("", *_KNOWN_PREFIXES):
        if prefix + _ORIGINAL_MARKER in key_set:
            return prefix, "original"
        if prefix + _DIFFUSERS_MARKER in key_set:
            return prefix, "diffusers"
    sample = ", ".join(keys[:5])
    raise WeightsError(
        f"{source.name} is not a HunyuanVideo/SkyReels transformer checkpoint: neither {_ORIGINAL_MARKER!r} "
        f"(original/ComfyUI naming) nor {_DIFFUSERS_MARKER!r} (diffusers naming) found; first keys: {sample}"
    )


def _is_quantization_extra(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input"))


def _load(f: Any, key: str, scale_key: str | None) -> torch.Tensor:
    tensor = f.get_tensor(key)
    if scale_key is not None:
        # ComfyUI scaled fp8: the real weight is the stored fp8 value times a per-tensor scale.
        tensor = (tensor.to(torch.float32) * f.get_tensor(scale_key).to(torch.float32)).to(torch.bfloat16)
    return tensor


def _groups(keys: list[str], prefix: str) -> Iterator[list[str]]:
    """Keys grouped per transformer block (everything else in one group): the converter works on
    any subset that holds whole blocks, and one block at a time bounds host memory."""
    blocks: dict[tuple[str, int], list[str]] = {}
    rest: list[str] = []
    for key in keys:
        match = _BLOCK_RE.match(key[len(prefix) :])
        if match:
            blocks.setdefault((match.group(1), int(match.group(2))), []).append(key)
        else:
            rest.append(key)
    if rest:
        yield rest
    for _, group in sorted(blocks.items()):
        yield group


def _check_input_channels(f: Any, prefix: str, fmt: str, config: dict[str, Any], source: Path) -> None:
    key = prefix + (_ORIGINAL_MARKER if fmt == "original" else _DIFFUSERS_MARKER)
    found = f.get_slice(key).get_shape()[1]
    wanted = config["in_channels"]
    if found != wanted:
        kind = "a text-to-video" if found * 2 == wanted else "another"
        raise WeightsError(
            f"{source.name} is {kind} transformer: {found} input channels, but the target config (SkyReels "
            f"image-to-video) has {wanted}. Use the I2V checkpoint (e.g. skyreels_hunyuan_i2v_*.safetensors)."
        )


# --- conversion ----------------------------------------------------------------------------------


def _to_diffusers(
    tensors: dict[str, torch.Tensor], fmt: str, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    if fmt == "diffusers":
        return tensors
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    width = config["num_attention_heads"] * config["attention_head_dim"]
    if width != _DIFFUSERS_SINGLE_BLOCK_WIDTH:
        _split_fused_single_block_linear1(tensors, width)
    return convert_hunyuan_video_transformer_to_diffusers(tensors)


def _split_fused_single_block_linear1(tensors: dict[str, torch.Tensor], width: int) -> None:
    """The split diffusers does for width 3072, for any width: linear1 = [q; k; v; mlp]. The
    results carry their diffusers names, which the converter passes through unchanged."""
    for key in [k for k in tensors if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
        fused = tensors.pop(key)
        block, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        q, k, v, mlp = torch.split(fused, [width, width, width, fused.shape[0] - 3 * width], dim=0)
        base = f"single_transformer_blocks.{block}"
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            tensors[f"{base}.{name}.{kind}"] = part


def _check_tensor(
    name: str, tensor: torch.Tensor, expected: dict[str, torch.Size], seen: set[str], source: Path
) -> None:
    if name not in expected:
        raise WeightsError(
            f"{source.name}: tensor {name!r} (after conversion) is not part of the transformer"
        )
    if tensor.shape != expected[name]:
        raise WeightsError(
            f"{source.name}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects "
            f"{tuple(expected[name])} (wrong model size or variant?)"
        )
    if name in seen:
        raise WeightsError(f"{source.name}: tensor {name!r} appears twice")
    seen.add(name)


# --- the target model ----------------------------------------------------------------------------


def _load_config(config: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        return dict(SKYREELS_I2V_TRANSFORMER_CONFIG)
    if isinstance(config, dict):
        return dict(config)
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read transformer config {str(path)!r}: {exc}") from exc
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _meta_model(config: dict[str, Any]):
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        return HunyuanVideoTransformer3DModel.from_config(config)


def _expected_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    try:
        model = _meta_model(config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"invalid transformer config: {exc}") from exc
    return {k: v.shape for k, v in model.state_dict().items()}


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    _meta_model(config).save_config(folder)


# --- writing shards ------------------------------------------------------------------------------


class _ShardWriter:
    """Writes tensors into numbered safetensors shards of at most `max_bytes`, then the index."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        # Split views share their parent's storage, which safetensors refuses to write: copy them.
        if tensor.untyped_storage().nbytes() != nbytes or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp_name = f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(self.folder / tmp_name), metadata={"format": "pt"})
        self.shards.append((tmp_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending:
            self._flush()
        count = len(self.shards)
        if count == 1:
            final = f"{WEIGHTS_NAME}.safetensors"
            os.replace(self.folder / self.shards[0][0], self.folder / final)
            return [final]
        weight_map: dict[str, str] = {}
        names: list[str] = []
        for i, (tmp_name, tensor_names) in enumerate(self.shards, start=1):
            final = f"{WEIGHTS_NAME}-{i:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        index_name = f"{WEIGHTS_NAME}.safetensors.index.json"
        (self.folder / index_name).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, index_name]


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` so that a crash leaves either the old or the new folder."""
    old = target.with_name(f"{target.name}.replaced-{int(time.time())}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _update_manifest(root: Path, result: ImportResult) -> None:
    previous = read_manifest(root)
    base = None
    if previous is not None:
        previous.files = {
            k: v for k, v in previous.files.items() if not k.startswith(f"{TRANSFORMER_SUBDIR}/")
        }
        base = previous
    present = set(list_weight_files(root))
    manifest = build_manifest(
        root,
        only=[f for f in result.files if f in present],
        base=base,
        sources={
            "transformer": {
                "imported_from": result.source.name,
                "source_bytes": result.source.stat().st_size,
                "source_format": result.source_format,
                "scaled_fp8": result.scaled_fp8,
            }
        },
    )
    write_manifest(root, manifest)
