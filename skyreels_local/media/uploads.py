"""Uploaded input images: rows in the job table, bytes under `<data>/uploads/<id>/<name>`.

An upload is checked to be an image (sniffed from its bytes, never trusted from its name or
Content-Type) before it is published, atomically, under a name safe in a path and a URL.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from PIL import Image

from ..errors import InvalidInputError, MediaError, SkyreelsError, TaskCode
from .images import MAX_IMAGE_PIXELS, open_image
from .signing import UPLOADS_PREFIX

if TYPE_CHECKING:  # annotations only: media does not need the job table at import
    from ..jobs import Upload
    from ..jobs.uploads import UploadsTable

# The path of one of our upload URLs: /files/uploads/<32 hex id>/<name>.
UPLOAD_PATH = re.compile(re.escape(UPLOADS_PREFIX) + r"([0-9a-f]{32})/([^/?#]+)$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class PayloadTooLargeError(SkyreelsError):
    http_status = 413
    task_code = TaskCode.INVALID_PARAMETER


def upload_id_in(url: str) -> str | None:
    """The upload id when `url` is one of our upload URLs (any host), else None."""
    try:
        match = UPLOAD_PATH.search(urlsplit(url).path)
    except ValueError:  # not a parsable URL, so not one of ours
        return None
    return match.group(1) if match else None


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
