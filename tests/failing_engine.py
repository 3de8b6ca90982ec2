"""An engine factory that fails at load, as a GPU fault would (`--engine-factory
failing_engine:build_engine`): what only a worker can find out."""

from __future__ import annotations

from typing import Any

LOAD_ERROR = "CUDA error: no kernel image is available for execution on the device (test)"


def build_engine(settings: Any, device: str | None) -> Any:
    raise RuntimeError(LOAD_ERROR)
