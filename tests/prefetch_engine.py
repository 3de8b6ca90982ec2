"""An engine factory for the prompt prefetch API test (`SKYREELS_ENGINE_FACTORY=prefetch_engine:build_engine`):
the real tiny-random Engine (so `prepare_prompts` and the prefetch mode are the real ones; the
wrapper in slow_engine.py has neither), with every transformer forward slowed down so that the
next job is waiting while the current one denoises."""

from __future__ import annotations

import os
import time
from typing import Any

FORWARD_DELAY_S = float(os.environ.get("SKYREELS_TEST_FORWARD_DELAY_S", "0.2"))


def build_engine(settings: Any, device: str | None) -> Any:
    from skyreels_local.engine.loader import load_engine

    engine = load_engine("tiny-random", device=device)
    forward = engine.pipe.transformer.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(FORWARD_DELAY_S)
        return forward(*args, **kwargs)

    engine.pipe.transformer.forward = slow_forward
    return engine
