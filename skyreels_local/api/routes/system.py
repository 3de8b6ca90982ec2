"""Liveness, readiness, metrics, the models list and the webhook secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ... import MODEL_ID, __version__
from ...schemas import Balance, Envelope, ModelInfo, SkyReelsInput, WebhookSecret
from ..deps import Authenticated, ServicesDep
from ..errors import phrase
from ..metrics import render
from .predictions import ERRORS

public = APIRouter(tags=["system"])
router = APIRouter(prefix="/api/v3", dependencies=[Authenticated], responses=ERRORS, tags=["system"])


@public.get("/health", summary="Liveness: the HTTP process answers")
def health() -> dict[str, Any]:
    return {"code": 200, "message": "success", "data": {"status": "ok", "version": __version__}}


@public.get(
    "/ready",
    summary="Readiness: 200 once a worker has the model loaded, 503 until then",
    responses={503: {"description": "no worker is ready yet"}},
)
def ready(services: ServicesDep) -> JSONResponse:
    data = services.readiness()
    if data["ready"]:
        return JSONResponse({"code": 200, "message": "success", "data": data})
    data["error"] = "no worker has the model loaded yet"
    return JSONResponse({"code": 503, "message": phrase(503), "data": data}, status_code=503)


@public.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(render(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/models", response_model=Envelope[list[ModelInfo]], summary="The models this server serves")
def models() -> Envelope[list[ModelInfo]]:
    return Envelope(
        data=[
            ModelInfo(
                id=MODEL_ID,
                model_id=MODEL_ID,
                name="SkyReels V1",
                type="image-to-video",
                description="SkyReels V1 image-to-video (HunyuanVideo fine-tune), served locally",
                api_schema=SkyReelsInput.model_json_schema(),
            )
        ]
    )


@router.get(
    "/balance",
    response_model=Envelope[Balance],
    summary="A fixed, unmetered balance: nothing is billed here (desktop and MCP clients read it)",
)
def balance() -> Envelope[Balance]:
    return Envelope(data=Balance())


@router.get("/webhook/secret", response_model=Envelope[WebhookSecret], summary="The webhook signing secret")
def webhook_secret(services: ServicesDep) -> Envelope[WebhookSecret]:
    return Envelope(data=WebhookSecret(secret=services.webhook_secret))
