"""Submit, poll, cancel and list predictions (the WaveSpeed v3 prediction endpoints)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from .... import MODEL_ID
from ....errors import InvalidInputError, TaskCode, shorten
from ....jobs import Job, JobStatus
from ....media.net import check_webhook_url
from ...schemas import (
    DeletedCount,
    Envelope,
    ErrorEnvelope,
    Prediction,
    PredictionPage,
    SkyReelsInput,
    parse_datetime,
    parse_skyreels_input,
)
from ..deps import AccountDep, Authenticated, BaseUrlDep, ServicesDep, json_body
from ..errors import NotFoundError

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope} for code in (400, 401, 404, 413, 429, 500)
}

router = APIRouter(prefix="/api/v3", dependencies=[Authenticated], responses=ERRORS)

_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SkyReelsInput.model_json_schema()}},
    }
}


@router.post(
    f"/{MODEL_ID}",
    response_model=Envelope[Prediction],
    response_model_exclude_none=True,
    summary="Submit a SkyReels-V1 image-to-video prediction",
    tags=["predictions"],
    openapi_extra=_SUBMIT_BODY,
)
async def submit(
    services: ServicesDep,
    base_url: BaseUrlDep,
    account: AccountDep,
    body: Annotated[Any, Depends(json_body)],
    webhook: Annotated[str | None, Query(description="URL that receives the finished prediction")] = None,
) -> Envelope[Prediction]:
    parsed = parse_skyreels_input(body, webhook_query=webhook)
    if parsed.webhook_url:
        field = "webhook" if webhook is not None else "webhook_url"
        await run_in_threadpool(check_webhook_url, services.policy, parsed.webhook_url, field=field)
    job = await run_in_threadpool(services.submit, parsed, body, base_url, account)
    if not parsed.enable_sync_mode:
        return Envelope(data=await run_in_threadpool(services.render, job, base_url))
    wait_s = services.settings.sync_wait_s
    job = await services.wait(job.id, wait_s)
    prediction = await run_in_threadpool(services.render, job, base_url)
    if not job.terminal:
        # [compat] the hosted API's sync-timeout reply: HTTP 200, status processing, code 5004.
        prediction.status = JobStatus.PROCESSING.value
        prediction.code = TaskCode.TIMEOUT
        prediction.error = f"Sync mode timed out after {wait_s:g} seconds. The prediction is still processing asynchronously."
    return Envelope(data=prediction)


def _owned(services: ServicesDep, prediction_id: str, account: str | None) -> Job:
    """The caller's prediction; another account's is a 404 exactly like an unknown id."""
    job = services.owned(prediction_id, account)
    if job is None:
        raise NotFoundError(f"prediction {prediction_id!r} not found")
    return job


@router.get(
    "/predictions/{prediction_id}/result",
    response_model=Envelope[Prediction],
    response_model_exclude_none=True,
    summary="Poll a prediction (what every SDK calls)",
    tags=["predictions"],
)
@router.get(
    "/predictions/{prediction_id}",
    response_model=Envelope[Prediction],
    response_model_exclude_none=True,
    summary="Get a prediction",
    tags=["predictions"],
)
def get_prediction(
    prediction_id: str, services: ServicesDep, base_url: BaseUrlDep, account: AccountDep
) -> Envelope[Prediction]:
    return Envelope(data=services.render(_owned(services, prediction_id, account), base_url))


@router.delete(
    "/predictions/{prediction_id}",
    response_model=Envelope[Prediction],
    response_model_exclude_none=True,
    summary="Cancel a prediction, as `POST .../cancel` (what some hosted-API CLIs send)",
    tags=["predictions"],
)
@router.post(
    "/predictions/{prediction_id}/cancel",
    response_model=Envelope[Prediction],
    response_model_exclude_none=True,
    summary="Cancel a prediction (extra): waiting ones at once, running ones at the next step",
    tags=["predictions"],
)
def cancel(
    prediction_id: str, services: ServicesDep, base_url: BaseUrlDep, account: AccountDep
) -> Envelope[Prediction]:
    _owned(services, prediction_id, account)
    job = services.db.predictions.request_cancel(prediction_id)
    if job is None:
        raise NotFoundError(f"prediction {prediction_id!r} not found")
    if job.webhook_url and job.terminal:
        services.dispatcher.wake()
    return Envelope(data=services.render(job, base_url))


_STATUSES = [s.value for s in JobStatus]
MAX_PAGE = 1_000_000_000


MAX_DELETE_IDS = 100


@router.post(
    "/predictions/delete",
    response_model=Envelope[DeletedCount],
    summary=f"Delete predictions (ids, at most {MAX_DELETE_IDS}): rows, outputs and input uploads; "
    "waiting or running ones are cancelled first; only the caller's own count",
    tags=["predictions"],
)
def delete_predictions(
    services: ServicesDep, account: AccountDep, body: Annotated[Any, Depends(json_body)]
) -> Envelope[DeletedCount]:
    ids = _delete_ids(body)
    deleted = services.delete_predictions(ids, account)
    return Envelope(data=DeletedCount(deleted_count=deleted))


def _delete_ids(body: Any) -> list[str]:
    """`{"ids": [...]}`: a list of at most MAX_DELETE_IDS strings, duplicates counted once."""
    if not isinstance(body, dict):
        raise InvalidInputError("body", type(body).__name__, "must be a JSON object")
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InvalidInputError("ids", shorten(repr(ids)), "must be a list of prediction ids (strings)")
    if len(ids) > MAX_DELETE_IDS:
        raise InvalidInputError("ids", f"{len(ids)} ids", f"must hold at most {MAX_DELETE_IDS} ids")
    return list(dict.fromkeys(ids))


def _history(
    services: ServicesDep, base_url: str, query: dict[str, Any], account: str | None
) -> Envelope[PredictionPage]:
    if not isinstance(query, dict):
        raise InvalidInputError("body", type(query).__name__, "must be a JSON object")
    page = query.get("page") or 1
    page_size = query.get("page_size") or 100
    if isinstance(page, bool) or not isinstance(page, int) or not 1 <= page <= MAX_PAGE:
        # Bounded so that the row offset fits SQLite's 64-bit integers.
        raise InvalidInputError("page", page, f"must be an integer from 1 to {MAX_PAGE}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 100:
        raise InvalidInputError("page_size", page_size, "must be an integer from 1 to 100")
    status = query.get("status") or None
    if status is not None and status not in _STATUSES:
        raise InvalidInputError("status", status, f"must be one of {', '.join(_STATUSES)}")
    model = query.get("model") or None
    if model is not None and not isinstance(model, str):
        raise InvalidInputError("model", model, "must be a string")
    jobs, total = services.db.predictions.history(
        page=page,
        page_size=page_size,
        model=model,
        status=status,
        created_after=parse_datetime("created_after", query.get("created_after")),
        created_before=parse_datetime("created_before", query.get("created_before")),
        account=account,
    )
    items = [services.render(job, base_url, urls_only=True) for job in jobs]
    return Envelope(data=PredictionPage(page=page, page_size=page_size, total=total, items=items))


@router.post(
    "/predictions",
    response_model=Envelope[PredictionPage],
    response_model_exclude_none=True,
    summary="Prediction history, newest first (page, page_size, model, status, created_after/before)",
    tags=["predictions"],
)
def history(
    services: ServicesDep,
    base_url: BaseUrlDep,
    account: AccountDep,
    body: Annotated[Any, Depends(json_body)],
) -> Envelope[PredictionPage]:
    return _history(services, base_url, body, account)


@router.get(
    "/predictions",
    response_model=Envelope[PredictionPage],
    response_model_exclude_none=True,
    summary="Prediction history by query parameters",
    tags=["predictions"],
)
def history_get(
    services: ServicesDep,
    base_url: BaseUrlDep,
    account: AccountDep,
    page: int = 1,
    page_size: int = 100,
    model: str | None = None,
    status: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
) -> Envelope[PredictionPage]:
    query = {
        "page": page,
        "page_size": page_size,
        "model": model,
        "status": status,
        "created_after": created_after,
        "created_before": created_before,
    }
    return _history(services, base_url, query, account)
