"""Where the server keeps its state under the data directory (one place, so nothing drifts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def database(self) -> Path:
        return self.root / "jobs.sqlite3"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's on-disk cache (inductor), so compiling is paid once per machine."""
        return self.root / "compile-cache"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def create(self) -> DataPaths:
        for folder in (self.root, self.outputs, self.uploads):
            folder.mkdir(parents=True, exist_ok=True)
        return self
