"""Our files over HTTP, authorized by signed, expiring URL tokens instead of the API key:
output videos, uploaded images, and the PUT target of the upload ticket flow."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from ....jobs import Upload
from ....media.signing import OUTPUTS_PREFIX, UPLOADS_PREFIX
from ...schemas import Envelope, UploadedFile
from ..deps import BaseUrlDep, ServicesDep
from ..errors import ForbiddenError, NotFoundError
from .media import store_upload

router = APIRouter(tags=["files"])

_OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}\.mp4$")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")

Expires = Annotated[str, Query(description="expiry, Unix seconds (part of the signed URL)")]
Signature = Annotated[str, Query(description="HMAC token (part of the signed URL)")]


def _authorize(services: ServicesDep, method: str, path: str, expires: str, signature: str) -> None:
    if not services.signer.verify(method, path, expires, signature):
        raise ForbiddenError("the URL's signature is invalid or has expired")


# HEAD is served too but left out of the schema: one route for both methods would give the two
# operations the same OpenAPI operationId.
@router.head("/files/outputs/{name}", include_in_schema=False)
@router.get("/files/outputs/{name}", summary="An output video (signed URL)")
def output_file(
    name: str, services: ServicesDep, expires: Expires = "", signature: Signature = ""
) -> FileResponse:
    _authorize(services, "GET", OUTPUTS_PREFIX + name, expires, signature)
    path = services.paths.outputs / name
    if not _OUTPUT_NAME.match(name) or not path.is_file():
        raise NotFoundError(f"output {name!r} not found (it may have expired)")
    return FileResponse(path, media_type="video/mp4")


def _upload(services: ServicesDep, upload_id: str, filename: str) -> Upload:
    upload = services.db.uploads.get(upload_id) if _UPLOAD_ID.match(upload_id) else None
    if upload is None or upload.filename != filename:
        raise NotFoundError(f"upload {upload_id}/{filename} not found (it may have expired)")
    return upload


@router.head("/files/uploads/{upload_id}/{filename}", include_in_schema=False)
@router.get("/files/uploads/{upload_id}/{filename}", summary="An uploaded image (signed URL)")
def upload_file(
    upload_id: str, filename: str, services: ServicesDep, expires: Expires = "", signature: Signature = ""
) -> FileResponse:
    _authorize(services, "GET", f"{UPLOADS_PREFIX}{upload_id}/{filename}", expires, signature)
    upload = _upload(services, upload_id, filename)
    path = services.uploads.file(upload)
    if not upload.complete or not path.is_file():
        raise NotFoundError(f"upload {upload_id}/{filename} has no content yet")
    return FileResponse(path, media_type=upload.content_type)


@router.put(
    "/files/uploads/{upload_id}/{filename}",
    response_model=Envelope[UploadedFile],
    summary="The upload ticket's PUT target: raw bytes, authorized by the signed URL",
)
async def put_upload(
    upload_id: str,
    filename: str,
    request: Request,
    services: ServicesDep,
    base_url: BaseUrlDep,
    expires: Expires = "",
    signature: Signature = "",
) -> Envelope[UploadedFile]:
    _authorize(services, "PUT", f"{UPLOADS_PREFIX}{upload_id}/{filename}", expires, signature)
    upload = _upload(services, upload_id, filename)
    size = await store_upload(services, upload, request.stream())
    return Envelope(
        data=UploadedFile(
            filename=upload.filename, size=size, download_url=services.links.upload_download(base_url, upload)
        )
    )
