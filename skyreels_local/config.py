"""One Settings object, built once per process; the only place that reads SKYREELS_* variables.

Every CLI flag has an environment twin (`--data-dir` <-> `SKYREELS_DATA_DIR`); the flag wins.
Tests build their own Settings and pass it in.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_WEIGHTS_DIR = Path("weights")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKYREELS_", extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        default=str(DEFAULT_WEIGHTS_DIR),
        description="`tiny-random` (built-in demo model, random output) or a weights directory",
    )
    device: str | None = Field(default=None, description="torch device; default cuda when present, else cpu")
    profile: str = Field(default="auto", description="memory profile (configs/); `auto` picks from free VRAM")
    preset: str = Field(default="exact", description="speed preset: exact | fp8 | turbo | stock")
    attention: str = Field(
        default="auto", description="attention backend for the fast presets, or auto (probe)"
    )
    turbo_threshold: float = Field(
        default=0.15, ge=0, description="turbo preset's First Block Cache threshold"
    )

    # --- server ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Field(default=Path("data"), description="job table, uploads and outputs live here")
