"""Where the memory profiles live and what they are called, importable without torch (the CLI and
the HTTP process check `--profile` before any worker starts).

The built-in profiles ship inside the package (`skyreels_local/profiles/*.toml`, read with
importlib.resources), so an installed wheel finds them from any working directory. What a profile
means, and how it is applied, is in profiles.py.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .errors import InvalidInputError

AUTO = "auto"
PROFILE_SUFFIXES = (".toml", ".json", ".yaml", ".yml")


def builtin_profiles_dir() -> Traversable:
    """The package's own profile folder (a real directory for any normal install)."""
    return resources.files("skyreels_local") / "profiles"


def profile_files(directory: Path | Traversable | None = None) -> list[Traversable]:
    folder = builtin_profiles_dir() if directory is None else directory
    if not folder.is_dir():
        return []
    return sorted(
        (entry for entry in folder.iterdir() if Path(entry.name).suffix in PROFILE_SUFFIXES),
        key=lambda entry: entry.name,
    )


def builtin_profile_names() -> list[str]:
    """The names `--profile` accepts besides `auto` and a file path (a TOML file's `name` key wins
    over its file name, as in profiles.py; the built-in ones are all TOML)."""
    names = []
    for entry in profile_files():
        data = tomllib.loads(entry.read_text()) if entry.name.endswith(".toml") else {}
        names.append(str(data.get("name", Path(entry.name).stem)))
    return sorted(names)


def validate_profile_spec(spec: str) -> str:
    """`auto`, a built-in profile name, or an existing profile file; the cheap check only (the
    file's contents are checked when a worker loads it)."""
    if spec == AUTO or spec in builtin_profile_names():
        return spec
    candidate = Path(spec).expanduser()
    if candidate.suffix in PROFILE_SUFFIXES:
        if candidate.is_file():
            return spec
        raise InvalidInputError("profile", spec, "must be an existing profile file (no such file)")
    names = ", ".join([AUTO, *builtin_profile_names()])
    raise InvalidInputError("profile", spec, f"must be one of {names} or a path to a profile file")
