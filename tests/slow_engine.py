"""An engine factory for API tests (`SKYREELS_ENGINE_FACTORY=slow_engine:build_engine`): the real
tiny-random engine, slowed down after every denoising step, so that a test can watch progress,
queue positions and cancellation of a job that is really running.

Faults on demand, chosen by a marker in the prompt, so one server can run good and bad jobs:
`[hang]` makes the first denoising step never return (deaf to cancellation, as a stuck GPU call
would be); `[oom]` raises torch's CUDA out-of-memory error from the first step; `[slow-finish]`
takes SLOW_FINISH_S after the last step (a slow VAE decode: the job is past cancellation points)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

STEP_DELAY_S = float(os.environ.get("SKYREELS_TEST_STEP_DELAY_S", "0.25"))
HANG = "[hang]"
OOM = "[oom]"
SLOW_FINISH = "[slow-finish]"
SLOW_FINISH_S = 3.0


class SlowEngine:
    def __init__(self, engine: Any, delay_s: float) -> None:
        self._engine = engine
        self.delay_s = delay_s
        self.spec = engine.spec
        self.profile = engine.profile

    def generate(self, request: Any, *, on_progress: Any = None, should_cancel: Any = None) -> Any:
        def slow_progress(progress: Any) -> None:
            if HANG in request.params.prompt:
                threading.Event().wait()
            if OOM in request.params.prompt:
                import torch

                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (test engine)"
                )
            time.sleep(self.delay_s)
            if on_progress is not None:
                on_progress(progress)

        result = self._engine.generate(request, on_progress=slow_progress, should_cancel=should_cancel)
        if SLOW_FINISH in request.params.prompt:
            time.sleep(SLOW_FINISH_S)
        return result


def build_engine(settings: Any, device: str | None) -> SlowEngine:
    from skyreels_local.engine.loader import load_engine

    return SlowEngine(load_engine("tiny-random", device=device), STEP_DELAY_S)


class StubEngine:
    """Loads instantly and never generates: for tests of worker processes themselves."""

    spec = type("Spec", (), {"name": "stub"})()
    profile = "stub"

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the stub engine does not generate")


def build_stub_engine(settings: Any, device: str | None) -> StubEngine:
    return StubEngine()
