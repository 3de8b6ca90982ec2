"""Exceptions that carry their own HTTP status and task error code.

One handler in the API turns any `SkyreelsError` into the contract's envelope; the worker turns
one raised during generation into a failed task with `data.code`. Messages name the field and the
value, because they are shown to API users verbatim.
"""

from __future__ import annotations

import errno
import sqlite3
from enum import IntEnum


def shorten(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters for a message (a URL can be megabytes of data: URI)."""
    return text if len(text) <= limit else text[:limit] + "..."


class TaskCode(IntEnum):
    """`data.code` of a failed task, as the hosted API documents them."""

    MISSING_PARAMETER = 1400
    INVALID_PARAMETER = 1401
    MEDIA_ACCESS_FAILED = 1402
    EXECUTION_FAILED = 1403
    TASK_FAILED = 1405
    INTERNAL_ERROR = 5000
    SERVICE_UNAVAILABLE = 5003
    TIMEOUT = 5004


class SkyreelsError(Exception):
    """Base class: an error with a user-facing message, an HTTP status and a task code."""

    http_status: int = 500
    task_code: TaskCode = TaskCode.INTERNAL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(SkyreelsError):
    """A request field has a bad value. The message names the field and the value."""

    http_status = 400
    task_code = TaskCode.INVALID_PARAMETER

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"`{field}` {expected}, got {value!r}")


class MissingInputError(SkyreelsError):
    http_status = 400
    task_code = TaskCode.MISSING_PARAMETER

    def __init__(self, field: str) -> None:
        self.field = field
        super().__init__(f"`{field}` is required")


class MediaError(SkyreelsError):
    """The input image could not be fetched, read or decoded."""

    http_status = 400
    task_code = TaskCode.MEDIA_ACCESS_FAILED


class WeightsError(SkyreelsError):
    """Model weights are missing, incomplete or unreadable."""

    http_status = 503
    task_code = TaskCode.SERVICE_UNAVAILABLE


class GenerationCancelled(SkyreelsError):  # noqa: N818 - it is a signal, not a fault
    """Raised from the step callback when a job is cancelled, so that no VAE decode runs."""

    http_status = 409
    task_code = TaskCode.TASK_FAILED

    def __init__(self, message: str = "generation cancelled") -> None:
        super().__init__(message)


class OutOfMemoryError(SkyreelsError):
    """CUDA ran out of memory; the message points at a lower-memory profile."""

    http_status = 500
    task_code = TaskCode.EXECUTION_FAILED


class DiskFullError(SkyreelsError):
    """The data directory's disk is full. A job that hits it fails with code 5000; a submit or an
    upload that hits it is answered 503 (with the message: it is operational, not internal), so
    that clients retry once space is freed."""

    http_status = 503
    task_code = TaskCode.INTERNAL_ERROR


def is_disk_full(exc: BaseException) -> bool:
    """Whether an OS or SQLite error means "no space left" (ENOSPC, quota, SQLITE_FULL)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False
