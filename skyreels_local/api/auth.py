"""Bearer API keys: from settings and an optional keys file, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and `#` comments are ignored."""
    keys = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


class ApiKeys:
    """The accepted keys. Auth is off only when no key and no keys file is configured at all;
    a configured but empty (or vanished) keys file lets nobody in."""

    def __init__(self, keys: list[str], keys_file: Path | None = None) -> None:
        self._static = [_digest(k) for k in keys if k]
        self._file = Path(keys_file).expanduser() if keys_file else None
        self._file_stamp: tuple[int, int] | None = None
        self._file_digests: list[bytes] = []
        self._lock = threading.Lock()
        if self._file is not None:
            if not self._file.is_file():
                raise FileNotFoundError(f"API keys file {str(self._file)!r} does not exist")
            self._reload()

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._file is not None

    def _reload(self) -> None:
        """Re-read the keys file when its size or mtime changed (rotation without a restart)."""
        assert self._file is not None
        try:
            stat = self._file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            if self._file_digests:
                log.error("API keys file %s is gone: no key from it is accepted", self._file)
            self._file_stamp, self._file_digests = None, []
            return
        if stamp != self._file_stamp:
            with self._lock:
                self._file_digests = [_digest(k) for k in read_keys_file(self._file)]
                self._file_stamp = stamp
            log.info("API keys file %s loaded: %d keys", self._file, len(self._file_digests))

    def check(self, presented: str) -> bool:
        """True when `presented` is a configured key. Every key is compared (digests, in constant
        time), so the answer's timing does not depend on which key, or how much of it, matched."""
        if self._file is not None:
            self._reload()
        digest = _digest(presented)
        matched = False
        for known in self._static + self._file_digests:
            matched |= hmac.compare_digest(digest, known)
        return matched
