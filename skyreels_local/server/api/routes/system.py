"""Liveness, readiness, metrics, the models list and the webhook secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .... import MODEL_ID, __version__
from ...schemas import Balance, Envelope, ModelInfo, SkyReelsInput, WebhookSecret
from ..deps import Authenticated, ServicesDep, has_valid_key
from ..errors import error_response, phrase
from ..metrics import render
from .predictions import ERRORS

public = APIRouter(tags=["system"])
router = APIRouter(prefix="/api/v3", dependencies=[Authenticated], responses=ERRORS, tags=["system"])


# What /health and /ready show a caller without a valid key: the state only. An allow-list, so
# any detail added to these answers later (worker pids, job ids, model paths, error text, the
# reason a worker cannot load) stays private to key holders until it is listed here.
PUBLIC_HEALTH_FIELDS = ("status",)
PUBLIC_READY_FIELDS = ("ready", "state")


def _public_view(request: Request, data: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    if has_valid_key(request):
        return data
    return {name: data[name] for name in allowed if name in data}


@public.get("/health", summary="Liveness: the HTTP process answers (the version only with a valid key)")
def health(request: Request) -> dict[str, Any]:
    data = {"status": "ok", "version": __version__}
    return {"code": 200, "message": "success", "data": _public_view(request, data, PUBLIC_HEALTH_FIELDS)}


@public.get(
    "/ready",
    summary="Readiness: 200 once a worker has the model loaded, 503 until then; the detail (workers, "
    "model, errors) only with a valid key",
    responses={503: {"description": "no worker is ready yet"}},
)
def ready(request: Request, services: ServicesDep) -> JSONResponse:
    data = services.readiness()
    if not data["ready"]:
        data["error"] = "no worker has the model loaded yet"
    data = _public_view(request, data, PUBLIC_READY_FIELDS)
    if data["ready"]:
        return JSONResponse({"code": 200, "message": "success", "data": data})
    return JSONResponse({"code": 503, "message": phrase(503), "data": data}, status_code=503)


@public.get(
    "/metrics",
    summary="Prometheus metrics (behind the key with --metrics-require-key)",
    response_class=Response,
)
def metrics(request: Request, services: ServicesDep) -> Response:
    if services.settings.metrics_require_key and not has_valid_key(request):
        return error_response(401, "/metrics needs an API key on this server", {"WWW-Authenticate": "Bearer"})
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
