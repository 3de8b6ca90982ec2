"""One way to wait in tests: poll a predicate until it holds or a deadline passes.

Polling instead of sleeping keeps fast machines fast and slow ones correct; the message says what
was awaited, so a timeout reads as a failed expectation rather than a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy, and return that; AssertionError naming
    `what` after `timeout` seconds. `what` may be a callable, for a message built at failure time
    (e.g. with a server's log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {detail}")
        time.sleep(interval)
