"""Signed, expiring URLs of our files.

Output files and upload URLs carry a signed, expiring token (HMAC of method, path and expiry with a
key kept in the job table), never the bearer key, so they can be handed to browsers and to the
SDK's upload PUT, which sends no Authorization header [compat].
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: media does not need the job table at import
    from ..jobs import Upload

OUTPUTS_PREFIX = "/files/outputs/"
UPLOADS_PREFIX = "/files/uploads/"
UPLOAD_PUT_TTL_S = 3600


class UrlSigner:
    """HMAC-SHA256 tokens that authorize one method on one path until an expiry time."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def signature(self, method: str, path: str, expires: int) -> str:
        message = f"{method.upper()}\n{path}\n{expires}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def query(self, method: str, path: str, expires: int) -> str:
        return f"expires={expires}&signature={self.signature(method, path, expires)}"

    def verify(
        self, method: str, path: str, expires: object, signature: object, *, now: float | None = None
    ) -> bool:
        try:
            # ASCII digits only: int() also reads other scripts' digits and "1_000".
            expires_at = int(str(expires)) if str(expires).isascii() else -1
        except ValueError:
            return False
        if not isinstance(signature, str) or expires_at < (time.time() if now is None else now):
            return False
        if not signature.isascii():  # compare_digest raises TypeError on non-ASCII text
            return False
        return hmac.compare_digest(self.signature(method, path, expires_at), signature)


class Links:
    """Absolute, signed URLs of our files. Expiry is derived from stored times, so a URL is the
    same on every poll and in the webhook body."""

    def __init__(self, signer: UrlSigner, retention_s: float) -> None:
        self.signer = signer
        self.retention_s = retention_s

    def output(self, base_url: str, name: str, finished_at: float) -> str:
        path = OUTPUTS_PREFIX + name
        return f"{base_url}{path}?{self.signer.query('GET', path, int(finished_at + self.retention_s))}"

    def upload_download(self, base_url: str, upload: Upload) -> str:
        path = upload_path(upload)
        return f"{base_url}{path}?{self.signer.query('GET', path, int(upload.created_at + self.retention_s))}"

    def upload_put(self, base_url: str, upload: Upload, *, now: float | None = None) -> str:
        path = upload_path(upload)
        expires = int((time.time() if now is None else now) + UPLOAD_PUT_TTL_S)
        return f"{base_url}{path}?{self.signer.query('PUT', path, expires)}"


def upload_path(upload: Upload) -> str:
    """The URL path (unsigned) of an upload's file. Here rather than in uploads.py, which reads
    these paths back, so that the two modules do not import each other."""
    return f"{UPLOADS_PREFIX}{upload.id}/{upload.filename}"
