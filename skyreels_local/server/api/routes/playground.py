"""The playground: a web page to try the model (`GET /playground`; `/` redirects there).

The page is plain HTML/CSS/JS shipped inside the package (`skyreels_local/server/playground/`),
so it works air-gapped and needs no build step. Its form is generated in the browser from
`/playground/form.json`, which `form_fields` derives from the same input schema the API validates
with: a new field or range in `SkyReelsInput` shows up on the page without touching the JS.
A strict Content-Security-Policy keeps the page from loading anything from another origin.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, RedirectResponse, Response

from .... import MODEL_ID
from ...schemas import SkyReelsInput
from ..errors import NotFoundError

router = APIRouter(include_in_schema=False)

# No inline script or style, nothing from another origin. blob: is the local preview of a chosen
# image; data: previews a data: URI image and plays a base64 output. Uploads and outputs are
# same-origin URLs.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: data:; connect-src 'self'; font-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSETS = {  # the only files served: no path from the URL ever reaches the file system
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}

# --- schema -> form ---------------------------------------------------------------------------

# The page polls like the SDKs do, and shows URLs: these request options make no sense there.
# enable_safety_checker is the operator's business (ignored unless allowed): no checkbox for it.
HIDDEN_FIELDS = frozenset(
    {"enable_sync_mode", "enable_base64_output", "webhook_url", "enable_safety_checker"}
)
FIELD_ORDER = ("prompt", "negative_prompt", "image", "seed", "guidance_scale", "num_inference_steps")
LABELS = {"num_inference_steps": "Steps"}  # the hosted playground's word; others come from titles
WIDGETS = {"image": "image", "seed": "seed"}  # fields whose type alone does not say enough
SLIDER_MAX_SPAN = 1000  # a bounded number range this wide or narrower gets a slider


def _label(name: str, prop: dict[str, Any]) -> str:
    """The field's title in sentence case ("Negative Prompt" -> "Negative prompt")."""
    if name in LABELS:
        return LABELS[name]
    title = prop.get("title") or name.replace("_", " ")
    return title[:1].upper() + title[1:].lower()


def _plain(prop: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the non-null branch of an `anyOf: [X, null]`, whether null is allowed)."""
    branches = prop.get("anyOf")
    if not branches:
        return prop, False
    non_null = [b for b in branches if b.get("type") != "null"]
    return (non_null[0] if len(non_null) == 1 else prop), len(non_null) < len(branches)


def form_field(name: str, prop: dict[str, Any], *, required: bool) -> dict[str, Any]:
    """One JSON schema property -> the description of its form control."""
    plain, nullable = _plain(prop)
    field: dict[str, Any] = {
        "name": name,
        "label": _label(name, prop),
        "required": required,
        "default": prop.get("default"),
        "help": prop.get("description", ""),
    }
    kind = plain.get("type")
    if "enum" in plain:
        field.update(widget="choice", options=list(plain["enum"]))
    elif kind in ("integer", "number"):
        low, high = plain.get("minimum"), plain.get("maximum")
        step = 1 if kind == "integer" else 0.1
        bounded = low is not None and high is not None and high - low <= SLIDER_MAX_SPAN
        field.update(widget="slider" if bounded else "number", min=low, max=high, step=step)
    elif kind == "boolean":
        field.update(widget="checkbox")
    else:  # strings: free text
        field.update(widget="textarea")
    if name in WIDGETS:
        field["widget"] = WIDGETS[name]
    field["nullable"] = nullable
    return field


def form_fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The playground's form, from a model's input JSON schema: visible fields in FIELD_ORDER,
    then any others in schema order."""
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    names = [n for n in FIELD_ORDER if n in properties]
    names += [n for n in properties if n not in names]
    return [form_field(n, properties[n], required=n in required) for n in names if n not in HIDDEN_FIELDS]


@cache
def _form() -> dict[str, Any]:
    return {"model": MODEL_ID, "fields": form_fields(SkyReelsInput.model_json_schema())}


# --- routes ---------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    return resources.files("skyreels_local").joinpath("server", "playground", name).read_bytes()


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/playground", status_code=307)


@router.get("/playground")
def page() -> Response:
    return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/playground/form.json")
def form() -> JSONResponse:
    return JSONResponse(_form(), headers=SECURITY_HEADERS)


@router.get("/playground/{asset}")
def asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise NotFoundError(f"playground file {asset!r} not found")
    return Response(_static(asset), media_type=ASSETS[asset], headers=SECURITY_HEADERS)
