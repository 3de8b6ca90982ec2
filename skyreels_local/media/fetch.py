"""The `image` field of a job to a decoded image (runs in the worker), and the capped download
that the CLI's `generate --image URL` uses too.

An input image is an http(s) URL, one of our own upload URLs (read from local storage, not over
HTTP), or a `data:` URI. Downloads are capped in size and time, redirects are limited, content is
sniffed (never trusted from headers or names), and connections go only where the address policy
allows (net.py).
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

import httpx
from PIL import Image

from ..errors import MediaError, shorten
from .images import decode_image
from .net import MAX_REDIRECTS, AddressPolicy, guarded_client
from .signing import UPLOADS_PREFIX, UrlSigner
from .uploads import UPLOAD_PATH, UploadStore

if TYPE_CHECKING:  # annotations only: media does not need the job table at import
    from ..jobs import Upload


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """`data:[<type>][;base64],<payload>` -> bytes, with a size cap."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaError("the data: URI has no ',' before its payload")
    if header.lower().endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes:
            raise MediaError(f"the data: URI image is larger than {max_bytes} bytes")
        try:
            data = base64.b64decode(payload.strip(), validate=False)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"the data: URI is not valid base64 ({exc})") from exc
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise MediaError(f"the data: URI image is larger than {max_bytes} bytes")
    return data


def download(url: str, *, policy: AddressPolicy, max_bytes: int, timeout_s: float) -> bytes:
    """The body of `url`: HTTP 200 only, at most `max_bytes` (the declared length is checked
    first, then the bytes as they arrive), within `timeout_s` in all (a server that drips a byte
    at a time does not hold a worker), through the policy-checked client. MediaError otherwise."""
    shown = shorten(url)
    started = time.monotonic()
    try:
        with (
            guarded_client(policy, timeout=timeout_s) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise MediaError(
                    f"cannot download image {shown!r}: HTTP {response.status_code} {response.reason_phrase}"
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise MediaError(f"image {shown!r} is {declared} bytes, more than the {max_bytes} allowed")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise MediaError(f"image {shown!r} is larger than the {max_bytes} bytes allowed")
                if time.monotonic() - started > timeout_s:
                    raise MediaError(f"downloading image {shown!r} took longer than {timeout_s:g}s")
                chunks.append(chunk)
    except httpx.TooManyRedirects:
        raise MediaError(f"image {shown!r} redirects more than {MAX_REDIRECTS} times") from None
    except httpx.TimeoutException:
        raise MediaError(f"downloading image {shown!r} timed out after {timeout_s:g}s") from None
    except httpx.HTTPError as exc:
        raise MediaError(f"cannot download image {shown!r}: {exc.__class__.__name__}: {exc}") from None
    return b"".join(chunks)


class ImageFetcher:
    """Turns the `image` field of a job into a decoded image (runs in the worker)."""

    def __init__(
        self,
        *,
        uploads: UploadStore,
        signer: UrlSigner,
        policy: AddressPolicy,
        max_bytes: int,
        timeout_s: float,
    ) -> None:
        self.uploads = uploads
        self.signer = signer
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def fetch(self, source: str) -> Image.Image:
        if source[:5].lower() == "data:":
            return decode_image(
                decode_data_uri(source, max_bytes=self.max_bytes), source="the `image` data: URI"
            )
        own = self.own_upload(source)
        if own is not None:
            return self._read_upload(own, source)
        return decode_image(self.download(source), source=f"the `image` URL {shorten(source)!r}")

    def own_upload(self, url: str) -> Upload | None:
        """The upload behind one of our own signed upload URLs, whatever host the client used.
        The signature proves it is ours; an expired or forged one is treated as foreign."""
        parts = urlsplit(url)
        match = UPLOAD_PATH.search(parts.path)
        if match is None:
            return None
        path = f"{UPLOADS_PREFIX}{match.group(1)}/{match.group(2)}"
        query = parse_qs(parts.query)
        if not self.signer.verify(
            "GET", path, query.get("expires", [""])[0], query.get("signature", [""])[0]
        ):
            return None
        return self.uploads.store.get(match.group(1))

    def _read_upload(self, upload: Upload, source: str) -> Image.Image:
        path = self.uploads.file(upload)
        if not upload.complete or not path.is_file():
            raise MediaError(f"upload {shorten(source)!r} has no file (was the PUT completed?)")
        return decode_image(path.read_bytes(), source=f"the `image` upload {upload.filename!r}")

    def download(self, url: str) -> bytes:
        return download(url, policy=self.policy, max_bytes=self.max_bytes, timeout_s=self.timeout_s)
