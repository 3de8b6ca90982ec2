"""CLI flags derived from the Settings fields (config.py), so that help, defaults and the
SKYREELS_* environment twins cannot drift apart.

A field `max_queue` becomes `--max-queue` with the field's description as its help, the field's
type, `[env SKYREELS_MAX_QUEUE; default 500]` appended, and argparse default None: a flag given
wins, else the environment, else the field's default (pydantic-settings does the last two).
Each command lists which fields it exposes (`serve` exposes every field but a few, so a new
Settings field gets its `serve` flag without touching the CLI). Settings are built when a
command runs, never while the parser is built: a bad environment value then is one clear line.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from ..config import Settings
from ..errors import SkyreelsError, TaskCode

ENV_PREFIX = "SKYREELS_"
# Extra spellings kept for compatibility (`--api-key a --api-key b` reads better than the plural).
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"api_keys": ("--api-key",)}


class SettingsError(SkyreelsError):
    """A flag or SKYREELS_* value that Settings rejects (the message names both spellings)."""

    http_status = 500
    task_code = TaskCode.SERVICE_UNAVAILABLE


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `list[str]` (also behind Annotated) -> list."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _default_text(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    return "" if default in (None, [], "") else f"; default {default}"


def _argparse_options(field: str, info: FieldInfo) -> dict[str, Any]:
    if not info.description:
        raise TypeError(f"Settings.{field} needs a description: it is the help of {flag_name(field)}")
    kind = _base_type(info.annotation)
    help_text = f"{info.description} [env {env_name(field)}{_default_text(info)}]"
    options: dict[str, Any] = {"dest": field, "default": None, "help": help_text}
    if kind is bool and info.default is not False:
        # Three-way (None = automatic) or on by default: --flag / --no-flag.
        options.update(action=argparse.BooleanOptionalAction)
    elif kind is bool:
        options.update(action="store_const", const=True)
    elif kind is list:
        # Repeatable, and each value may itself be comma-separated (as the environment twin is).
        options.update(action="append", metavar=field.upper().removesuffix("S"))
    elif kind in (int, float, Path):
        options["type"] = kind
    choices = (
        (info.json_schema_extra or {}).get("choices") if isinstance(info.json_schema_extra, dict) else None
    )
    if choices:
        options["choices"] = list(choices)
    return options


def add_settings_flags(parser: argparse.ArgumentParser, fields: Iterable[str]) -> None:
    """One flag per Settings field in `fields`, in that order."""
    for field in fields:
        info = Settings.model_fields[field]
        parser.add_argument(flag_name(field), *FLAG_ALIASES.get(field, ()), **_argparse_options(field, info))


def fields_except(excluded: Sequence[str]) -> list[str]:
    """Every Settings field but `excluded`, in declaration order."""
    unknown = set(excluded) - set(Settings.model_fields)
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    return [name for name in Settings.model_fields if name not in excluded]


def settings_from_args(args: argparse.Namespace, fields: Iterable[str]) -> Settings:
    """Settings from the given flags over the environment over the defaults; raises SettingsError."""
    overrides: dict[str, Any] = {}
    for field in fields:
        value = getattr(args, field, None)
        if value is None:
            continue
        if isinstance(value, list):  # an appended list flag: join, Settings splits at commas
            value = ",".join(value)
        overrides[field] = value
    return load_settings(**overrides)


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, given=set(overrides))) from None


def describe_errors(exc: ValidationError, *, given: set[str] = frozenset()) -> str:
    """One line: each rejected value with the flag or variable it came from."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        source = (
            f"{flag_name(field)} / {env_name(field)}"
            if field in given
            else f"{env_name(field)} (environment)"
        )
        value = error.get("input")
        shown = "" if isinstance(value, dict) else f" {str(value)!r}"
        parts.append(f"{source}{shown}: {error['msg']}")
    return "; ".join(parts)


def check_environment() -> None:
    """Fail on a bad SKYREELS_* value before anything else (every command reads them)."""
    load_settings()


class HelpFormatter(argparse.HelpFormatter):
    """Shows `(default: X)` only where it says something: not for None, not for required options,
    and not where the help already states the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.required
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"
