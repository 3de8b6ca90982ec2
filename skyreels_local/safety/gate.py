"""What a worker (and `generate`) calls on each finished video, before it is written.

`SafetyGate.load` imports the classifier (safety/checker.py: torch, transformers) only when the
checker is on; off, it is a no-op that imports nothing. `review` returns whether the video is
flagged (None when no check ran), or raises OutputBlockedError under `--nsfw-action block`; the
caller records that with the job's outcome (jobs/predictions.py: complete, fail).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .policy import OutputBlockedError, SafetyConfig

if TYPE_CHECKING:
    from ..params import GenerationParams

log = logging.getLogger(__name__)


class SafetyGate:
    def __init__(self, config: SafetyConfig, checker: Any = None) -> None:
        self.config = config
        self.checker = checker

    @classmethod
    def off(cls) -> SafetyGate:
        return cls(SafetyConfig(folder=None))

    @classmethod
    def load(cls, config: SafetyConfig, *, device: Any = None) -> SafetyGate:
        """Load the classifier when the checker is on (a damaged folder raises SafetyCheckerError
        here, at start-up, not in a job)."""
        if not config.enabled:
            log.info("safety checker: off")
            return cls(config)
        from .checker import SafetyChecker

        checker = SafetyChecker.load(config.folder, device=device)
        log.info(
            "safety checker: on (threshold %g, action %s, request opt-out %s)",
            config.threshold,
            config.action,
            "honoured" if config.allow_disable else "ignored",
        )
        return cls(config, checker)

    def review(self, frames: Any, params: GenerationParams | None, *, label: str) -> bool | None:
        """Whether the video is flagged NSFW; raises OutputBlockedError when it is and the action
        is `block`. None when no check ran (checker off, or the request opted out and may), so
        that the job table counts only the videos really looked at."""
        if self.checker is None or not self.config.applies_to(params):
            return None
        verdict = self.checker.check_video(frames)
        flagged = verdict.flagged(self.config.threshold)
        log.info(
            "%s: safety checker %s (NSFW score %.3f at frame %d, %d frames in %.2fs, threshold %g)",
            label,
            ("flagged" + (", blocked" if self.config.action == "block" else "")) if flagged else "passed",
            verdict.score,
            verdict.frame,
            verdict.frames_checked,
            verdict.seconds,
            self.config.threshold,
        )
        if flagged and self.config.action == "block":
            raise OutputBlockedError(
                f"the output was withheld: the safety checker rated the video NSFW (score "
                f"{verdict.score:.2f} at frame {verdict.frame}, above the threshold {self.config.threshold:g}); "
                "no video was kept"
            )
        return flagged
