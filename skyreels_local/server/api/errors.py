"""HTTP-level errors in the contract's envelope: `{"code": <status>, "message": <reason>, "data": {"error": ...}}`.

One place turns every exception into that shape: our SkyreelsError subclasses (they carry their
status), Starlette's HTTP errors (unknown route 404, 405), request validation (400, naming the
field and the value) and anything unexpected (500, logged with its traceback, never sent).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ... import MODEL_ID
from ...errors import DiskFullError, SkyreelsError, TaskCode, shorten
from ...jobs import QueueFullError
from ...media.uploads import PayloadTooLargeError
from .responses import StrictJSONResponse as JSONResponse

log = logging.getLogger(__name__)

DISK_FULL_RETRY_AFTER_S = 60
MODEL_PREFIX = "/api/v3/"


class NotFoundError(SkyreelsError):
    http_status = 404
    task_code = TaskCode.INVALID_PARAMETER


class ForbiddenError(SkyreelsError):
    http_status = 403
    task_code = TaskCode.INVALID_PARAMETER


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"code": status, "message": phrase(status), "data": {"error": message}},
        status_code=status,
        headers=headers,
    )


def _describe_validation(exc: RequestValidationError) -> str:
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = ".".join(loc) or "body"
    value = first.get("input")
    detail = first.get("msg", "is invalid")
    if first.get("type") == "json_invalid":
        return "`body` must be valid JSON"
    if first.get("type") == "missing":
        return f"`{field}` is required"
    return f"`{field}` {detail[:1].lower() + detail[1:]}, got {shorten(repr(value))}"


def _no_route(request: Request) -> str:
    """The 404 of a path no route matches. Only the served model id is a route, so a POST to any
    other /api/v3/<owner>/<model> lands here: name the model (the contract's unknown-model 404)."""
    path = request.url.path
    if request.method == "POST" and path.startswith(MODEL_PREFIX):
        return (
            f"unknown model or endpoint {path.removeprefix(MODEL_PREFIX)!r}; this server serves {MODEL_ID!r}"
        )
    return "no such endpoint"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SkyreelsError)
    async def _skyreels(_request: Request, exc: SkyreelsError) -> JSONResponse:
        headers = None
        if isinstance(exc, QueueFullError):
            headers = {"Retry-After": str(exc.retry_after_s)}
        if isinstance(exc, DiskFullError):
            headers = {"Retry-After": str(DISK_FULL_RETRY_AFTER_S)}
        # 503 says what is unavailable (e.g. a full disk); other 5xx never show their message.
        status = exc.http_status if exc.http_status < 500 or exc.http_status == 503 else 500
        message = exc.message if status != 500 else "internal server error"
        if status >= 500:
            log.error("request failed: %s", exc.message)
        return error_response(status, message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else phrase(exc.status_code)
        if exc.status_code == 404 and message == "Not Found":
            message = _no_route(request)
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _describe_validation(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")


class BodySizeLimit:
    """Refuse request bodies over a limit with 413 before they are read into memory or spooled
    to disk: by Content-Length up front, and by counting for chunked bodies."""

    def __init__(
        self, app: ASGIApp, *, default_limit: int, upload_limit: int, upload_paths: tuple[str, ...]
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = self.upload_limit if path.startswith(self.upload_paths) else self.default_limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_too_large(send, limit)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(f"the request body is larger than the {limit} bytes allowed")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except PayloadTooLargeError:
            if not started:
                await _send_too_large(send, limit)


async def _send_too_large(send: Send, limit: int) -> None:
    response = error_response(413, f"the request body is larger than the {limit} bytes allowed")
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
