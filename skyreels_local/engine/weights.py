"""The on-disk weights layout, its completeness check, and loading it without the network.

Layout of a weights directory (see weights/README.md):

    WEIGHTS_DIR/
      model_index.json  scheduler/  vae/  text_encoder/  text_encoder_2/  tokenizer/  tokenizer_2/
                        <- hunyuanvideo-community/HunyuanVideo, without its own transformer
      transformer/      <- Skywork/SkyReels-V1-Hunyuan-I2V: config.json + safetensors shards

So the directory is a regular diffusers pipeline folder whose transformer is the SkyReels
image-to-video one (32 input channels). We load the components one by one rather than through
`DiffusionPipeline.from_pretrained` so that each gets its own dtype and the transformer can be
loaded with a memory profile's storage settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError

log = logging.getLogger(__name__)

BASE_REPO = "hunyuanvideo-community/HunyuanVideo"
TRANSFORMER_REPO = "Skywork/SkyReels-V1-Hunyuan-I2V"
TRANSFORMER_SUBDIR = "transformer"
MODEL_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_COMPONENTS = ("tokenizer", "tokenizer_2")
HOW_TO_GET = (
    "Download them with `skyreels-local weights download --dir {dir}` on a machine with network access, "
    "or copy a complete weights folder here and check it with `skyreels-local weights verify --dir {dir}` "
    "(see weights/README.md)."
)


@dataclass(frozen=True)
class WeightsProblem:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _model_folder_problems(folder: Path, name: str) -> list[WeightsProblem]:
    problems: list[WeightsProblem] = []
    if not folder.is_dir():
        return [WeightsProblem(f"{name}/", "missing folder")]
    if not (folder / "config.json").is_file():
        problems.append(WeightsProblem(f"{name}/config.json", "missing"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        for index in indexes:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                problems.append(WeightsProblem(f"{name}/{index.name}", f"unreadable index ({exc})"))
                continue
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    problems.append(WeightsProblem(f"{name}/{shard}", "missing shard named in the index"))
    elif not any(folder.glob("*.safetensors")):
        problems.append(WeightsProblem(f"{name}/*.safetensors", "no weights file"))
    return problems


def _tokenizer_folder_problems(folder: Path, name: str) -> list[WeightsProblem]:
    if not folder.is_dir():
        return [WeightsProblem(f"{name}/", "missing folder")]
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((folder / f).is_file() for f in known):
        return [WeightsProblem(f"{name}/", f"no tokenizer files (expected one of {', '.join(known)})")]
    return []


def find_layout_problems(weights_dir: Path) -> list[WeightsProblem]:
    """Everything missing from a weights directory, in a stable order (empty when complete)."""
    if not weights_dir.is_dir():
        return [WeightsProblem(str(weights_dir), "no such directory")]
    problems: list[WeightsProblem] = []
    if not (weights_dir / "model_index.json").is_file():
        problems.append(WeightsProblem("model_index.json", "missing"))
    if not (weights_dir / "scheduler" / "scheduler_config.json").is_file():
        problems.append(WeightsProblem("scheduler/scheduler_config.json", "missing"))
    for name in MODEL_COMPONENTS:
        problems += _model_folder_problems(weights_dir / name, name)
    for name in TOKENIZER_COMPONENTS:
        problems += _tokenizer_folder_problems(weights_dir / name, name)
    if not problems:
        problems += _transformer_kind_problems(weights_dir / TRANSFORMER_SUBDIR)
    return problems


def _transformer_kind_problems(folder: Path) -> list[WeightsProblem]:
    """The base repo's own transformer (text-to-video, 16 channels) is the wrong one: say so."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return [WeightsProblem(f"{TRANSFORMER_SUBDIR}/config.json", f"unreadable ({exc})")]
    in_channels = config.get("in_channels")
    if in_channels is not None and in_channels != 2 * config.get("out_channels", in_channels):
        return [
            WeightsProblem(
                f"{TRANSFORMER_SUBDIR}/config.json",
                f"in_channels={in_channels}: this is a text-to-video transformer; the image-to-video "
                f"one ({TRANSFORMER_REPO}) has twice the output channels as input",
            )
        ]
    return []


def check_weights_dir(weights_dir: str | Path) -> Path:
    """Return the directory as a Path, or raise WeightsError naming every missing file."""
    path = Path(weights_dir).expanduser()
    problems = find_layout_problems(path)
    if problems:
        listing = "; ".join(str(p) for p in problems)
        raise WeightsError(
            f"weights directory {str(path)!r} is incomplete: {listing}. " + HOW_TO_GET.format(dir=path)
        )
    return path
