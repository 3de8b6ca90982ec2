"""Uploads: the ticket flow (POST a ticket, then PUT the bytes to a signed URL) and multipart."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ....errors import DiskFullError, is_disk_full
from ....media.uploads import PayloadTooLargeError
from ...schemas import Envelope, UploadedFile, UploadInstruction, UploadTicket, UploadTicketRequest
from ..deps import AccountDep, Authenticated, BaseUrlDep, ServicesDep, json_body
from .predictions import ERRORS

router = APIRouter(prefix="/api/v3/media", dependencies=[Authenticated], responses=ERRORS, tags=["media"])

CHUNK = 1024 * 1024


@router.post(
    "/uploads",
    response_model=Envelope[UploadTicket],
    summary="Start an upload: returns a signed PUT URL (no Authorization needed) and the download URL",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": UploadTicketRequest.model_json_schema()}},
        }
    },
)
def create_upload(
    body: Annotated[Any, Depends(json_body)],
    services: ServicesDep,
    base_url: BaseUrlDep,
    account: AccountDep,
) -> Envelope[UploadTicket]:
    # The body is read strictly by json_body (no NaN, no huge numbers), then checked by the model.
    try:
        ticket = UploadTicketRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    upload = services.uploads.new(
        filename=ticket.filename, size=ticket.size, content_type=ticket.content_type, account=account
    )
    return Envelope(
        data=UploadTicket(
            filename=upload.filename,
            size=upload.size,
            download_url=services.links.upload_download(base_url, upload),
            upload=UploadInstruction(
                url=services.links.upload_put(base_url, upload),
                headers={"Content-Type": upload.content_type},
            ),
        )
    )


@router.post(
    "/upload/binary",
    response_model=Envelope[UploadedFile],
    summary="Upload an image as multipart form data (field `file`)",
)
async def upload_binary(
    file: Annotated[UploadFile, File(description="the image")],
    services: ServicesDep,
    base_url: BaseUrlDep,
    account: AccountDep,
) -> Envelope[UploadedFile]:
    upload = services.uploads.new(
        filename=file.filename or "upload", size=0, content_type=file.content_type, account=account
    )
    size = await store_upload(services, upload, _chunks(file))
    return Envelope(
        data=UploadedFile(
            filename=upload.filename, size=size, download_url=services.links.upload_download(base_url, upload)
        )
    )


async def _chunks(file: UploadFile) -> Any:
    while chunk := await file.read(CHUNK):
        yield chunk


async def store_upload(services: ServicesDep, upload: Any, chunks: Any) -> int:
    """Stream chunks to a temporary file under the cap, then sniff and publish it."""
    uploads = services.uploads
    try:
        tmp, handle = uploads.open_writer(upload)
    except OSError as exc:
        raise _storage_error(exc) from exc
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > uploads.max_bytes:
                raise PayloadTooLargeError(f"the file is larger than the {uploads.max_bytes} bytes allowed")
            handle.write(chunk)
        handle.close()
        await run_in_threadpool(uploads.finish, upload, tmp, size)
    except OSError as exc:
        raise _storage_error(exc) from exc
    finally:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            handle.close()
        tmp.unlink(missing_ok=True)
    return size


def _storage_error(exc: OSError) -> Exception:
    if is_disk_full(exc):
        return DiskFullError(
            "the server's disk is full, so the upload cannot be stored; retry once space is freed"
        )
    return exc
