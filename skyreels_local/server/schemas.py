"""Wire models of the WaveSpeed v3 contract (see shared CONTRACT.md) and the SkyReels-V1 input.

The submit body is validated by hand (`parse_skyreels_input`) rather than by pydantic, so that a
bad value gets the contract's 400 envelope with a message naming the field and the value
(`guidance_scale` must be a number from 1 to 20, got 25), and unknown keys are ignored [compat].
The pydantic models document the same shapes in the OpenAPI file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..errors import InvalidInputError, MissingInputError
from ..jobs import Job, JobStatus
from ..media.net import is_legacy_ipv4
from ..params import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    GUIDANCE_MAX,
    GUIDANCE_MIN,
    MAX_PROMPT_CHARS,
    SEED_MAX,
    SEED_MIN,
    STEPS_MAX,
    STEPS_MIN,
    GenerationParams,
)

T = TypeVar("T")


# --- time ------------------------------------------------------------------------------------


def rfc3339(ts: float) -> str:
    """Unix seconds -> `2025-05-19T06:09:15.948268Z` (UTC, microseconds, Z) [compat]."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_datetime(field: str, value: object) -> float | None:
    """An ISO 8601 / RFC 3339 date-time (naive means UTC) -> Unix seconds; None stays None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInputError(field, value, "must be an ISO 8601 date-time such as 2025-05-19T06:09:15Z")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInputError(
            field, value, "must be an ISO 8601 date-time such as 2025-05-19T06:09:15Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# --- envelopes -------------------------------------------------------------------------------


class Envelope(BaseModel, Generic[T]):
    """Every success: HTTP 200 with code 200 and message "success" [compat]."""

    code: int = 200
    message: str = "success"
    data: T


class ErrorData(BaseModel):
    error: str


class ErrorEnvelope(BaseModel):
    """Every HTTP-level error: `code` repeats the HTTP status, `message` is its reason phrase."""

    code: int = Field(examples=[400])
    message: str = Field(examples=["Bad Request"])
    data: ErrorData


# --- predictions -----------------------------------------------------------------------------


class PredictionUrls(BaseModel):
    get: str = Field(description="absolute URL of this prediction's result on this server")


class Timings(BaseModel):
    inference: int = Field(0, description="generation time in milliseconds")


class Prediction(BaseModel):
    """The prediction object of submit, both result GETs, sync replies, history and webhooks."""

    id: str = Field(description="32 lowercase hex characters")
    model: str
    outputs: list[str] = Field(
        description="output URLs (one MP4) once completed; bare base64 with enable_base64_output"
    )
    urls: PredictionUrls
    has_nsfw_contents: list[bool] = Field(
        description='one per output: true when the server\'s safety checker flagged it (README "Safety checker")'
    )
    status: str = Field(description="created | processing | completed | failed | cancelled")
    created_at: str = Field(description="RFC 3339, UTC, with Z")
    error: str = Field("", description="empty unless failed or cancelled")
    executionTime: int = Field(0, description="milliseconds from start to finish")  # noqa: N815 [compat]
    timings: Timings
    code: int | None = Field(None, description="a failed task's error code (1400-5004); absent otherwise")
    progress: float = Field(0.0, description="0 to 1: denoising steps done, 1 when completed (extra)")
    queue_position: int = Field(0, description="1 = next to run, while created; 0 otherwise (extra)")
    seed: int = Field(description="the seed used (drawn at submit when the request said -1) (extra)")
    preset: str = Field("", description="the server's speed preset (extra)")
    profile: str = Field("", description="the memory profile of the worker that ran it (extra)")
    input: dict[str, Any] | None = Field(None, description="the request body; in webhook bodies only")


class PredictionPage(BaseModel):
    page: int
    page_size: int
    total: int
    items: list[Prediction]


def result_path(prediction_id: str) -> str:
    return f"/api/v3/predictions/{prediction_id}/result"


def nsfw_flags(job: Job) -> list[bool]:
    """One boolean per stored output: the safety checker's verdicts (jobs migration 3), or
    `false` for each when no check ran (checker off, opted out, or a row from before)."""
    if job.has_nsfw_contents is None:
        return [False] * len(job.outputs)
    return [bool(flag) for flag in job.has_nsfw_contents]


def prediction_from_job(
    job: Job, *, base_url: str, outputs: list[str], queue_position: int, include_input: bool = False
) -> Prediction:
    completed = job.status == JobStatus.COMPLETED
    outputs = outputs if completed else []
    return Prediction(
        id=job.id,
        model=job.model,
        outputs=outputs,
        urls=PredictionUrls(get=base_url + result_path(job.id)),
        has_nsfw_contents=nsfw_flags(job) if outputs else [],
        status=job.status.value,
        created_at=rfc3339(job.created_at),
        error=job.error or "",
        executionTime=job.execution_ms,
        timings=Timings(inference=job.inference_ms),
        code=job.code if job.status == JobStatus.FAILED else None,
        progress=round(job.progress, 4),
        queue_position=queue_position,
        seed=job.seed,
        preset=job.preset,
        profile=job.profile,
        input=job.input if include_input else None,
    )


# --- SkyReels-V1 input -----------------------------------------------------------------------

IMAGE_SCHEMES = ("http", "https", "data")
WEBHOOK_SCHEMES = ("http", "https")


class SkyReelsInput(BaseModel):
    """Body of `POST /api/v3/wavespeed-ai/SkyReels-V1`. Unknown keys are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    # The generation fields: defaults and limits from params.py (GenerationParams), the one contract.
    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description='what happens in the video ("FPS-24, " is prefixed)',
    )
    image: str = Field(
        description="the first frame: an http(s) URL, an upload URL of this server, or a data: URI"
    )
    seed: int = Field(
        DEFAULT_SEED, ge=SEED_MIN, le=SEED_MAX, description="-1 draws one; the seed used is returned"
    )
    guidance_scale: float = Field(
        DEFAULT_GUIDANCE_SCALE,
        ge=GUIDANCE_MIN,
        le=GUIDANCE_MAX,
        description="true classifier-free guidance scale",
    )
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=STEPS_MIN, le=STEPS_MAX)
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="default: SkyReels' own negative prompt"
    )
    aspect_ratio: Literal["16:9", "9:16"] = DEFAULT_ASPECT_RATIO
    enable_safety_checker: bool = Field(
        True,
        description="false skips this server's NSFW check when its operator allows that "
        "(--allow-disable-safety-checker); otherwise ignored",
    )
    enable_sync_mode: bool = Field(False, description="wait for the result in the submit reply")
    enable_base64_output: bool = Field(False, description="outputs as bare base64 instead of URLs")
    webhook_url: str | None = Field(None, description="POSTed the finished prediction (or use ?webhook=)")

    # The validated generation parameters, set by parse_skyreels_input (not a wire field).
    _params: GenerationParams | None = PrivateAttr(None)

    @property
    def params(self) -> GenerationParams:
        if self._params is None:
            raise RuntimeError("SkyReelsInput.params is set by parse_skyreels_input")
        return self._params


def _check_url(field: str, value: object, schemes: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(field, value, f"must be {what}")
    value = value.strip()
    shown = value if len(value) <= 100 else value[:100] + "..."
    try:
        parts = urlsplit(value)
        hostname = parts.hostname  # raises ValueError for a bad [IPv6] literal
    except ValueError as exc:
        raise InvalidInputError(field, shown, f"must be {what} (it cannot be parsed: {exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes or (scheme != "data" and not hostname):
        raise InvalidInputError(field, shown, f"must be {what}")
    if scheme != "data" and is_legacy_ipv4(hostname):
        raise InvalidInputError(
            field, shown, f"must name an IPv4 host in dotted-decimal form (a.b.c.d), not {hostname!r}"
        )
    if scheme != "data":
        # httpx fetches it later: what httpx cannot parse (e.g. the octal host 0177.0.0.1) is
        # refused now, naming the field, rather than failing the job in the worker.
        try:
            httpx.URL(value)
        except (httpx.InvalidURL, ValueError) as exc:
            raise InvalidInputError(field, shown, f"must be {what} (it cannot be parsed: {exc})") from None
    return value


def _optional_bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInputError(field, value, "must be true or false")
    return value


def parse_skyreels_input(body: object, *, webhook_query: str | None = None) -> SkyReelsInput:
    """Validate a submit body; raise a 400-mapped error naming the first bad field and value.

    A `null` optional field means its default, as clients send unset fields as null.
    """
    if not isinstance(body, dict):
        raise InvalidInputError("body", type(body).__name__, "must be a JSON object")
    if body.get("prompt") is None:
        raise MissingInputError("prompt")
    if body.get("image") is None:
        raise MissingInputError("image")
    values = {name: body[name] for name in SkyReelsInput.model_fields if body.get(name) is not None}
    values["image"] = _check_url(
        "image", values["image"], IMAGE_SCHEMES, "an http(s) URL, an upload URL of this server or a data: URI"
    )
    # The one validation of the generation fields (params.py); the worker reads them back as is.
    params = GenerationParams(
        **{name: values[name] for name in GenerationParams.model_fields if name in values}
    )
    for flag in ("enable_sync_mode", "enable_base64_output"):
        values[flag] = _optional_bool(body, flag)
    if webhook_query is not None:
        values["webhook_url"] = _check_url("webhook", webhook_query, WEBHOOK_SCHEMES, "an http(s) URL")
    elif values.get("webhook_url") is not None:
        values["webhook_url"] = _check_url(
            "webhook_url", values["webhook_url"], WEBHOOK_SCHEMES, "an http(s) URL"
        )
    if values.get("webhook_url") and values["enable_base64_output"]:
        # [compat] the hosted API refuses this combination: a webhook body must stay small.
        raise InvalidInputError(
            "enable_base64_output", True, "cannot be combined with a webhook (ask for URLs instead)"
        )
    parsed = SkyReelsInput.model_validate(values)
    parsed._params = params
    return parsed


class UploadTicketRequest(BaseModel):
    filename: str
    size: int = Field(ge=0)
    content_type: str | None = None


class UploadInstruction(BaseModel):
    method: Literal["PUT"] = "PUT"
    url: str
    headers: dict[str, str]


class UploadTicket(BaseModel):
    type: str = "image"
    filename: str
    size: int
    download_url: str
    upload: UploadInstruction


class UploadedFile(BaseModel):
    type: str = "image"
    filename: str
    size: int
    download_url: str


class DeletedCount(BaseModel):
    deleted_count: int = Field(description="how many of the given ids were the caller's and are now deleted")


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_ + the HMAC key (strip the prefix, use as UTF-8 text)")


class WebhookDeliveryInfo(BaseModel):
    url: str
    status: str = Field(description="pending (will be retried) | delivered | dead (retries exhausted)")
    attempts: int
    last_error: str
    created_at: str
    next_attempt_at: str | None = Field(description="the next try of a pending delivery")
    delivered_at: str | None


class WebhookDeliveries(BaseModel):
    prediction_id: str
    deliveries: list[WebhookDeliveryInfo]


class Balance(BaseModel):
    """`GET /api/v3/balance`: a self-hosted server bills nothing, so the balance is a fixed large
    number (clients that check for credit before submitting go ahead) marked unmetered."""

    balance: float = 1_000_000.0
    currency: str = "USD"
    unmetered: bool = True


class ModelInfo(BaseModel):
    id: str  # = model_id: some clients read `id`
    model_id: str
    name: str
    type: str
    description: str
    api_schema: dict[str, Any]
