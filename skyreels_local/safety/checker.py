"""The classifier itself: a Hugging Face image-classification model (AutoModelForImageClassification
and its image processor) loaded from a local folder, scoring sampled frames of a video.

Imported only where the checker is on (a worker or `generate`), so that a server with it off never
loads transformers' vision classes or the weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .policy import (
    DEFAULT_SAMPLED_FRAMES,
    SafetyCheckerError,
    check_folder,
    nsfw_label_ids,
    sample_frame_indices,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """One video's result: the highest NSFW probability among the sampled frames, and where."""

    score: float
    frame: int  # index of the frame with that score
    frames_checked: int
    seconds: float

    def flagged(self, threshold: float) -> bool:
        # "Above the threshold" (issue 10): a score equal to it is not flagged.
        return self.score > threshold


class SafetyChecker:
    def __init__(self, model, processor, nsfw_ids: list[int], device: torch.device, folder: Path) -> None:
        self.model = model
        self.processor = processor
        self.nsfw_ids = nsfw_ids
        self.device = device
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device | None = None) -> SafetyChecker:
        """Load from a local folder only (never the network); a damaged folder is a
        SafetyCheckerError naming the problem, raised here, at start-up."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        folder = Path(folder).expanduser()
        check_folder(folder)  # the cheap checks first: a clear message rather than a deep traceback
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Half precision on a GPU: a ViT-base is then ~170 MB next to the video model.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            model = AutoModelForImageClassification.from_pretrained(
                folder, local_files_only=True, dtype=dtype
            )
        except Exception as exc:
            raise SafetyCheckerError(
                f"safety checker folder {str(folder)!r} cannot be loaded: {exc.__class__.__name__}: {exc}"
            ) from exc
        model.to(device).eval()
        nsfw_ids = nsfw_label_ids(model.config.to_dict())
        labels = [model.config.id2label[i] for i in nsfw_ids]
        log.info("safety checker loaded from %s on %s (NSFW classes: %s)", folder, device, ", ".join(labels))
        return cls(model, processor, nsfw_ids, device, folder)

    @torch.inference_mode()
    def score_images(self, images: list[np.ndarray]) -> list[float]:
        """The NSFW probability of each image (uint8 HxWx3), summed over the NSFW classes."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        probs = torch.softmax(self.model(pixel_values=pixels).logits.float(), dim=-1)
        return probs[:, self.nsfw_ids].sum(dim=-1).tolist()

    def check_video(self, frames: np.ndarray, *, count: int = DEFAULT_SAMPLED_FRAMES) -> Verdict:
        """Score `count` frames spread over the clip (uint8 [F, H, W, 3]); the verdict is the worst."""
        started = time.perf_counter()
        indices = sample_frame_indices(len(frames), count)
        scores = self.score_images([np.asarray(frames[i]) for i in indices])
        worst = int(np.argmax(scores))
        return Verdict(
            score=float(scores[worst]),
            frame=indices[worst],
            frames_checked=len(indices),
            seconds=time.perf_counter() - started,
        )


__all__ = ["SafetyChecker", "SafetyCheckerError", "Verdict"]
