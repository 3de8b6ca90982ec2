"""The app factory: `create_app(settings)` -> a FastAPI app serving the WaveSpeed v3 contract.

Startup (lifespan) opens the job table, re-queues what a previous run left unfinished, starts the
worker processes, the webhook dispatcher and the retention sweep; shutdown stops them in reverse,
letting each worker hand its running job back to the queue.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ... import MODEL_ID, __version__
from ...config import Settings
from .deps import ApiKeyGate
from .errors import BodySizeLimit, install_error_handlers
from .metrics import build_registry
from .responses import StrictJSONResponse
from .routes import files, media, predictions, system, webhooks
from .routes.playground import router as playground_router
from .services import Services

log = logging.getLogger(__name__)

UPLOAD_PATHS = ("/api/v3/media/upload/binary", "/files/uploads/")
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings, *, log_level: str = "INFO") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await run_in_threadpool(Services, settings, log_level=log_level)
        app.state.services = services
        app.state.metrics = build_registry(services)
        await run_in_threadpool(services.start)
        log.info(
            "serving %s (model %s, preset %s) from %s",
            MODEL_ID,
            settings.model,
            settings.preset,
            settings.data_dir,
        )
        try:
            yield
        finally:
            await run_in_threadpool(services.stop)

    app = FastAPI(
        title="skyreels-local",
        version=__version__,
        description=(
            f"Self-hosted `{MODEL_ID}` behind the WaveSpeed v3 HTTP contract. Authenticate with "
            "`Authorization: Bearer <API key>`; output and upload URLs carry their own signed tokens."
        ),
        lifespan=lifespan,
        default_response_class=StrictJSONResponse,  # no NaN/Infinity ever reaches a client
    )
    install_error_handlers(app)
    # A data: URI image is base64 (4/3 of the bytes) inside the JSON body.
    json_limit = max(settings.max_download_bytes * 4 // 3 + MULTIPART_OVERHEAD, 1024 * 1024)
    app.add_middleware(
        BodySizeLimit,
        default_limit=json_limit,
        upload_limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        upload_paths=UPLOAD_PATHS,
    )
    app.add_middleware(ApiKeyGate)  # added last = runs first: no key, no body read
    app.include_router(system.public)
    app.include_router(playground_router)  # the web page: GET /playground, / redirects there
    app.include_router(files.router)
    app.include_router(system.router)
    app.include_router(media.router)
    app.include_router(predictions.router)
    app.include_router(webhooks.router)
    return app
