"""Safety checker decisions that need no torch: where the classifier lives, whether it runs for a
prediction, and which frames it looks at.

How the verdict is stored: the worker records it in the job row (`predictions.has_nsfw_contents`,
jobs migration 3) with the job's outcome, in one transaction that also adds to the /metrics
totals (the counters table). A blocked video is never written: the prediction fails with code
1405 and an error that says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..config import DEFAULT_WEIGHTS_DIR, TINY_MODEL
from ..errors import SkyreelsError, TaskCode

if TYPE_CHECKING:
    from ..config import Settings
    from ..params import GenerationParams

# Under the weights folder, next to the model's components (`weights download --safety-checker`).
SAFETY_CHECKER_SUBDIR = "safety_checker"
# Class names that count as "not safe": the probabilities of all of them add up to the score.
# Falconsai/nsfw_image_detection has `normal` and `nsfw`; the others cover common NSFW classifiers
# (porn/hentai of the five-class ones).
NSFW_LABELS = frozenset({"nsfw", "porn", "hentai", "explicit", "unsafe"})
# Frames looked at per video: evenly spread, always the first, the middle and the last.
DEFAULT_SAMPLED_FRAMES = 5
SafetyAction = Literal["flag", "block"]


class SafetyCheckerError(SkyreelsError):
    """The classifier folder is missing or damaged (found at start-up, never per job)."""

    http_status = 503
    task_code = TaskCode.SERVICE_UNAVAILABLE


class OutputBlockedError(SkyreelsError):
    """`--nsfw-action block`: the video was withheld. The prediction fails with this message."""

    task_code = TaskCode.TASK_FAILED


@dataclass(frozen=True)
class SafetyConfig:
    """The checker as configured: `folder` None means off."""

    folder: Path | None
    threshold: float = 0.5
    action: SafetyAction = "flag"
    allow_disable: bool = False

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def applies_to(self, params: GenerationParams | None) -> bool:
        """Whether the check runs for this prediction. A request's `enable_safety_checker: false`
        counts only when the operator allows it (--allow-disable-safety-checker)."""
        opted_out = params is not None and not params.enable_safety_checker
        return self.enabled and not (opted_out and self.allow_disable)

    def describe(self) -> dict[str, object]:
        """What /ready shows (with a key)."""
        return {
            "enabled": self.enabled,
            "path": str(self.folder) if self.folder else None,
            "threshold": self.threshold,
            "action": self.action,
            "allow_disable": self.allow_disable,
        }


def weights_dir_of(model: str) -> Path:
    """The weights folder of `--model` (the demo model has none: then `weights/`)."""
    return DEFAULT_WEIGHTS_DIR if model == TINY_MODEL else Path(model).expanduser()


def resolve_folder(setting: str, model: str) -> Path | None:
    """`--safety-checker`: off -> None; auto -> <weights>/safety_checker/ when it exists, else
    None; anything else is the classifier folder itself (it must then exist: see check_folder)."""
    value = setting.strip()
    if value.lower() == "off":
        return None
    if value.lower() == "auto":
        folder = weights_dir_of(model) / SAFETY_CHECKER_SUBDIR
        return folder if folder.is_dir() else None
    return Path(value).expanduser()


def config_from_settings(settings: Settings) -> SafetyConfig:
    return SafetyConfig(
        folder=resolve_folder(settings.safety_checker, settings.model),
        threshold=settings.nsfw_threshold,
        action=settings.nsfw_action,
        allow_disable=settings.allow_disable_safety_checker,
    )


# --- the classifier folder ------------------------------------------------------------------


def nsfw_label_ids(config: dict) -> list[int]:
    """Indices of the classifier's NSFW classes, from config.json's `id2label`."""
    labels = config.get("id2label") or {}
    return sorted(int(i) for i, name in labels.items() if str(name).strip().lower() in NSFW_LABELS)


def folder_problems(folder: Path) -> list[str]:
    """What is wrong with a classifier folder, cheaply (no torch, no loading): the files
    transformers needs, config.json with an NSFW class, and every safetensors header."""
    from ..weights.layout import safetensors_header_problem

    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    problems: list[str] = []
    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        if len(config.get("id2label") or {}) < 2:
            problems.append("config.json: no `id2label` with at least two classes (not an image classifier)")
        elif not nsfw_label_ids(config):
            labels = ", ".join(str(v) for v in config["id2label"].values())
            problems.append(
                f"config.json: no NSFW class among {labels} (expected one of {', '.join(sorted(NSFW_LABELS))})"
            )
    except (OSError, ValueError) as exc:
        problems.append(f"config.json: unreadable ({exc})")
    try:
        if not isinstance(json.loads((folder / "preprocessor_config.json").read_text()), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        problems.append(f"preprocessor_config.json: unreadable ({exc})")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        problems.append("no *.safetensors weights file")
    for shard in shards:
        problem = safetensors_header_problem(shard)
        if problem:
            problems.append(f"{shard.name}: {problem}")
    return problems


def check_folder(folder: Path) -> None:
    """Raise SafetyCheckerError naming every problem of the classifier folder."""
    problems = folder_problems(folder)
    if problems:
        raise SafetyCheckerError(
            f"safety checker folder {str(folder)!r} is not a usable image classifier: {'; '.join(problems)}. "
            "Get one with `skyreels-local weights download --safety-checker` (or --safety-checker off)"
        )


# --- frames ---------------------------------------------------------------------------------


def sample_frame_indices(num_frames: int, count: int = DEFAULT_SAMPLED_FRAMES) -> list[int]:
    """`count` frame indices spread evenly over the clip: the first, the last, the middle
    (for an odd count) and evenly between; fewer when the clip is shorter."""
    if num_frames <= 0:
        return []
    count = max(1, min(count, num_frames))
    if count == 1:
        return [num_frames // 2]
    last = num_frames - 1
    picked = {round(i * last / (count - 1)) for i in range(count)} | {last // 2}
    return sorted(picked)
