"""Strict JSON in and out (RFC 8259), so hostile bodies get a 400 and every reply is valid JSON.

Python's `json` is lenient where that hurts a server: it reads `NaN`/`Infinity`, turns `1e400`
into infinity, accepts lone surrogates (`"\\ud800"`, which cannot be encoded as UTF-8 later),
converts an integer of any length (thousands of digits overflow SQLite and CPU), and recurses
into any nesting depth. `loads` refuses all of these with an InvalidInputError that names the
field (as a dotted path such as `input.seed` or `ids.3`) where there is one.

On the way out, `dumps` writes `null` for a non-finite float instead of the invalid `NaN`
(a number that is not finite has no JSON form; null is what strict encoders agree on).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import InvalidInputError

MAX_DEPTH = 32  # arrays/objects inside each other; our bodies use 2
MAX_NUMBER_CHARS = 40  # an int64 is 19 digits; a float's repr at most 24 characters


class _Refused:
    """Stands in for a value the parser must not produce; reported with its field by the walk."""

    def __init__(self, text: str, why: str) -> None:
        self.text = text
        self.why = why


def _parse_constant(name: str) -> _Refused:
    return _Refused(name, "must be a number; NaN and Infinity are not JSON (RFC 8259)")


def _parse_int(text: str) -> int | _Refused:
    if len(text) > MAX_NUMBER_CHARS:
        return _Refused(
            f"<integer of {len(text)} characters>", f"must be a number of at most {MAX_NUMBER_CHARS} digits"
        )
    return int(text)


def _parse_float(text: str) -> float | _Refused:
    if len(text) > MAX_NUMBER_CHARS:
        return _Refused(
            f"<number of {len(text)} characters>",
            f"must be a number of at most {MAX_NUMBER_CHARS} characters",
        )
    value = float(text)
    if not math.isfinite(value):
        return _Refused(text, "must be a finite number (it overflows a 64-bit float)")
    return value


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(text: str) -> str:
    """Up to 100 characters of `text`, each surrogate shown as U+FFFD (the replacement character)."""
    return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text[:100])


def _field(path: list[str]) -> str:
    return ".".join(path) or "body"


def _check_tree(value: Any) -> None:
    """Walk the parsed value without recursion; the first refused value raises, naming its field."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Refused):
            raise InvalidInputError(_field(path), node.text, node.why)
        if isinstance(node, str):
            if _has_lone_surrogate(node):
                raise InvalidInputError(
                    _field(path),
                    _shown(node),
                    "must be valid Unicode text (a lone surrogate such as \\ud800 is not)",
                )
            continue
        if isinstance(node, dict | list) and len(path) >= MAX_DEPTH:
            raise InvalidInputError(_field(path), "<nested value>", f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, child in reversed(node.items()):
                if _has_lone_surrogate(key):
                    raise InvalidInputError(
                        _field(path), _shown(key), "has a key that is not valid Unicode text"
                    )
                stack.append((child, [*path, key]))
        elif isinstance(node, list):
            stack.extend((child, [*path, str(i)]) for i, child in reversed(list(enumerate(node))))


def loads(raw: bytes | str) -> Any:
    """Parse a request body as strict JSON; InvalidInputError (a 400) for anything else."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            "body", f"<byte {exc.object[exc.start]:#04x} at {exc.start}>", "must be UTF-8"
        ) from None
    try:
        value = json.loads(
            text, parse_constant=_parse_constant, parse_int=_parse_int, parse_float=_parse_float
        )
    except RecursionError:
        raise InvalidInputError("body", "<nested value>", f"nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            "body",
            text[max(exc.pos - 20, 0) : exc.pos + 20],
            f"must be valid JSON ({exc.msg} at character {exc.pos})",
        ) from None
    _check_tree(value)
    return value


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (containers are copied)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(child) for key, child in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(child) for child in value]
    return value


def dumps(value: Any, *, ensure_ascii: bool = False) -> bytes:
    """Compact strict JSON: non-finite floats become null; allow_nan=False guards the rest."""
    return json.dumps(
        finite_or_none(value), ensure_ascii=ensure_ascii, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")
