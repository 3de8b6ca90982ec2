"""Bearer API keys: from settings and an optional keys file, compared in constant time.

Every key belongs to an account, and predictions belong to the account of the key that created
them. An entry `team-a:SECRET` is the key `SECRET` of account `team-a` (several keys of one
account share its predictions, so keys rotate without losing history); a bare entry `SECRET` is
an account of its own, named from a hash of the key (`key-<12 hex>`, never the key itself).
Empty entries (`--api-key ""`, `a,,b`, `team-a:`) are ignored: an empty key never turns auth off.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# An account name before the first `:`; anything else makes the whole entry a bare key.
_ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyEntry:
    account: str
    digest: bytes  # sha256 of the secret; the secret itself is not kept


def bare_key_account(secret: str) -> str:
    """The stable, non-secret account id of a key configured without an account name."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def parse_key_entry(entry: str) -> KeyEntry | None:
    """`account:secret` or a bare `secret`; None for an empty entry (or an empty secret)."""
    entry = entry.strip()
    account, sep, secret = entry.partition(":")
    if sep and _ACCOUNT.match(account.strip()):
        account, secret = account.strip(), secret.strip()
        return KeyEntry(account, _digest(secret)) if secret else None
    return KeyEntry(bare_key_account(entry), _digest(entry)) if entry else None


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and comment lines (`#` first, after optional spaces) are
    ignored. A `#` inside a key is part of it: `Zx9#pQ7-secret` is one key."""
    keys = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def parse_entries(entries: list[str]) -> list[KeyEntry]:
    return [key for key in map(parse_key_entry, entries) if key is not None]


def configured_keys(api_keys: list[str], keys_file: Path | None) -> list[KeyEntry]:
    """The real keys of the settings and the keys file (if it exists), empty entries dropped."""
    keys = parse_entries(api_keys)
    path = Path(keys_file).expanduser() if keys_file else None
    if path is not None and path.is_file():
        keys += parse_entries(read_keys_file(path))
    return keys


class ApiKeys:
    """The accepted keys. Auth is off only when no real key and no keys file is configured at
    all; a configured but empty (or vanished) keys file lets nobody in."""

    def __init__(self, keys: list[str], keys_file: Path | None = None) -> None:
        self._static = parse_entries(keys)
        self._file = Path(keys_file).expanduser() if keys_file else None
        self._file_stamp: tuple[int, int] | None = None
        self._file_keys: list[KeyEntry] = []
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
            if self._file_keys:
                log.error("API keys file %s is gone: no key from it is accepted", self._file)
            self._file_stamp, self._file_keys = None, []
            return
        if stamp != self._file_stamp:
            with self._lock:
                self._file_keys = parse_entries(read_keys_file(self._file))
                self._file_stamp = stamp
            log.info("API keys file %s loaded: %d keys", self._file, len(self._file_keys))

    def account_of(self, presented: str) -> str | None:
        """The account of `presented` when it is a configured key, else None. Every key is
        compared (digests, in constant time), so the answer's timing does not depend on which
        key, or how much of it, matched."""
        if self._file is not None:
            self._reload()
        digest = _digest(presented)
        account = None
        for known in self._static + self._file_keys:
            if hmac.compare_digest(digest, known.digest) and account is None:
                account = known.account
        return account

    def check(self, presented: str) -> bool:
        """True when `presented` is a configured key."""
        return self.account_of(presented) is not None
