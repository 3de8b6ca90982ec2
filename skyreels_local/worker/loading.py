"""The engine that Settings describe, loaded one way for a worker, a group rank and `generate`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..paths import DataPaths

if TYPE_CHECKING:
    from ..config import Settings


def load_configured_engine(settings: Settings, device: str | None) -> Any:
    """`settings.model` on `device` with the configured profile, preset and preset options (not
    warmed up: the caller decides when). torch loads here, not at import."""
    from ..engine.loader import load_engine
    from ..engine.presets import PresetOptions

    options = PresetOptions(
        attention=settings.attention,
        cache_threshold=settings.turbo_threshold,
        step_cache=settings.step_cache,
        # Compiled kernels persist across restarts: the compile cost is paid once per machine.
        compile_cache_dir=DataPaths(settings.data_dir).compile_cache,
    )
    # The memory profile is resolved per process (from its own GPU's free memory when `auto`).
    return load_engine(
        settings.model,
        device=device,
        profile=settings.profile,
        preset=settings.preset,
        preset_options=options,
    )
