"""Media in and out: signed file URLs, upload storage, and safe fetching of input images.

- Output files and upload URLs carry a signed, expiring token (HMAC of method, path and expiry
  with a key kept in the job table), never the bearer key, so they can be handed to browsers and
  to the SDK's upload PUT, which sends no Authorization header [compat].
- An input image is an http(s) URL, one of our own upload URLs (read from local storage, not over
  HTTP), or a `data:` URI. Downloads are capped in size and time, redirects are limited, content is
  sniffed (never trusted from headers or names), and by default a URL that resolves to a
  non-public address (loopback, private, link-local incl. cloud metadata, multicast) is refused.
  The check runs on the address actually connected to, on every redirect hop, so a DNS name that
  resolves to 127.0.0.1 or a redirect to 169.254.169.254 is refused too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

import httpcore
import httpx
from PIL import Image

from .engine.images import MAX_IMAGE_PIXELS, decode_image, open_image
from .errors import InvalidInputError, MediaError, SkyreelsError, TaskCode
from .jobs import Upload
from .jobs.uploads import UploadsTable

log = logging.getLogger(__name__)

OUTPUTS_PREFIX = "/files/outputs/"
UPLOADS_PREFIX = "/files/uploads/"
UPLOAD_PUT_TTL_S = 3600
MAX_REDIRECTS = 5
_UPLOAD_PATH = re.compile(r"/files/uploads/([0-9a-f]{32})/([^/?#]+)$")


def shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class PayloadTooLargeError(SkyreelsError):
    http_status = 413
    task_code = TaskCode.INVALID_PARAMETER


# --- signed URLs -----------------------------------------------------------------------------


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
    return f"{UPLOADS_PREFIX}{upload.id}/{upload.filename}"


def upload_id_in(url: str) -> str | None:
    """The upload id when `url` is one of our upload URLs (any host), else None."""
    try:
        match = _UPLOAD_PATH.search(urlsplit(url).path)
    except ValueError:  # not a parsable URL, so not one of ours
        return None
    return match.group(1) if match else None


# --- upload storage --------------------------------------------------------------------------

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: object) -> str:
    """A name that is safe in a path and a URL: basename only, odd characters replaced."""
    base = os.path.basename(str(name).replace("\\", "/")).strip()
    cleaned = _UNSAFE_NAME.sub("_", base).strip("._")[:100]
    return cleaned or "upload"


def sniff_image(path: Path) -> tuple[str, int, int]:
    """(MIME type, width, height) from the file's content; MediaError when it is no image."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    try:
        with open_image(path, head, source="the file") as image:
            width, height = image.size
            mime = Image.MIME.get(image.format or "", "application/octet-stream")
            if width * height > MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"the image is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed"
                )
            image.verify()
    except MediaError:
        raise
    except Exception as exc:  # PIL raises many types for bad files
        raise MediaError(f"not an image this server can read ({exc.__class__.__name__}: {exc})") from exc
    return mime, width, height


class UploadStore:
    """Uploaded input images: rows in the job table, bytes under `<data>/uploads/<id>/<name>`."""

    def __init__(self, root: Path, store: UploadsTable, *, max_bytes: int) -> None:
        self.root = root
        self.store = store
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def new(
        self, *, filename: object, size: int, content_type: str | None, account: str | None = None
    ) -> Upload:
        if size > self.max_bytes:
            raise PayloadTooLargeError(f"`size` {size} is larger than the {self.max_bytes} bytes allowed")
        return self.store.create(
            id=uuid.uuid4().hex,
            filename=safe_filename(filename),
            content_type=content_type or "application/octet-stream",
            size=size,
            account=account,
        )

    def file(self, upload: Upload) -> Path:
        return self.root / upload.id / upload.filename

    def open_writer(self, upload: Upload) -> tuple[Path, Any]:
        folder = self.root / upload.id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{uuid.uuid4().hex}.part"
        return tmp, open(tmp, "wb")  # noqa: SIM115 - closed by finish()/discard()

    def finish(self, upload: Upload, tmp: Path, size: int) -> Upload:
        """Check the written bytes are an image, then publish them atomically."""
        try:
            mime, _, _ = sniff_image(tmp)
        except MediaError as exc:
            tmp.unlink(missing_ok=True)
            raise InvalidInputError("file", upload.filename, f"must be an image: {exc.message}") from None
        os.replace(tmp, self.file(upload))
        self.store.complete(upload.id, size=size, content_type=mime)
        upload.size, upload.content_type, upload.complete = size, mime, True
        return upload

    def delete(self, upload_id: str) -> None:
        folder = self.root / upload_id
        if folder.is_dir():
            for child in folder.iterdir():
                child.unlink(missing_ok=True)
            folder.rmdir()


# --- address policy --------------------------------------------------------------------------


class BlockedAddressError(MediaError):
    """A URL would reach an address that is not public and not allow-listed."""


def describe_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not public (None when it is)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (this includes cloud metadata services)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified or ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private-network address"
    if not ip.is_global:
        return "a non-public address"
    return None


class AddressPolicy:
    """Which addresses outbound requests (image downloads, webhooks) may connect to."""

    def __init__(self, allow: list[str] | None = None) -> None:
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow or []:
            entry = entry.strip()
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.lower().rstrip("."))

    def resolve(self, host: str, port: int) -> str:
        """The address to connect to for `host`, or BlockedAddressError naming the reason."""
        return self.addresses(host, port)[0]

    def addresses(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to, in the resolver's order, once all are found allowed
        (one refused address refuses the host: DNS answers can be mixed on purpose)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise MediaError(f"cannot resolve host {host!r}: {exc.strerror or exc}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if host.lower().rstrip(".") in self.allowed_hosts:
            return addresses
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            reason = describe_address(ip)
            if reason is not None and not any(ip in net for net in self.allowed_networks):
                raise BlockedAddressError(
                    f"host {host!r} resolves to {address}, {reason}; refused "
                    "(allow it with SKYREELS_URL_ALLOW_LIST / --url-allow-list)"
                )
        return addresses


def check_webhook_url(policy: AddressPolicy, url: str, *, field: str) -> None:
    """Refuse at submit a webhook URL whose host the policy refuses (loopback, private, metadata),
    instead of failing every delivery for the whole retry window. A host that does not resolve
    now is let through: DNS can be briefly down, and each delivery checks again anyway."""
    parts = httpx.URL(url)  # already parsed once by parse_skyreels_input
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        policy.addresses(parts.raw_host.decode("ascii"), port)  # IDNA-encoded, as sent to DNS
    except BlockedAddressError as exc:
        raise InvalidInputError(field, shorten(url), f"is refused: {exc.message}") from None
    except MediaError:
        return
    except ValueError as exc:  # a name the resolver cannot even encode (UnicodeError)
        raise InvalidInputError(field, shorten(url), f"has a host that cannot be resolved ({exc})") from None


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, connecting only to addresses the policy allows."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        # Each allowed address in turn, as a plain connect would (e.g. `localhost` -> ::1, then
        # 127.0.0.1). TLS still verifies `host` (httpcore passes the URL's host as server_hostname).
        addresses = self._policy.addresses(host, port)
        for address in addresses[:-1]:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return self._inner.connect_tcp(addresses[-1], port, timeout, local_address, socket_options)

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise BlockedAddressError("unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_GuardedBackend(policy)
        )


def guarded_client(policy: AddressPolicy, *, timeout: float, follow_redirects: bool = True) -> httpx.Client:
    """An httpx client for user-supplied URLs: policy-checked connections, no proxies from the
    environment (they would bypass the check), bounded redirects (or none)."""
    return httpx.Client(
        transport=_GuardedTransport(policy),
        trust_env=False,
        follow_redirects=follow_redirects,
        max_redirects=MAX_REDIRECTS,
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": "skyreels-local"},
    )


# --- input images ----------------------------------------------------------------------------


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
        match = _UPLOAD_PATH.search(parts.path)
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
        shown = shorten(url)
        started = time.monotonic()
        try:
            with (
                guarded_client(self.policy, timeout=self.timeout_s) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise MediaError(
                        f"cannot download image {shown!r}: HTTP {response.status_code} {response.reason_phrase}"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise MediaError(
                        f"image {shown!r} is {declared} bytes, more than the {self.max_bytes} allowed"
                    )
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise MediaError(f"image {shown!r} is larger than the {self.max_bytes} bytes allowed")
                    if time.monotonic() - started > self.timeout_s:
                        raise MediaError(f"downloading image {shown!r} took longer than {self.timeout_s:g}s")
                    chunks.append(chunk)
        except httpx.TooManyRedirects:
            raise MediaError(f"image {shown!r} redirects more than {MAX_REDIRECTS} times") from None
        except httpx.TimeoutException:
            raise MediaError(f"downloading image {shown!r} timed out after {self.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise MediaError(f"cannot download image {shown!r}: {exc.__class__.__name__}: {exc}") from None
        return b"".join(chunks)
