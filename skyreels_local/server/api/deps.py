"""FastAPI dependencies: the app's Services and bearer-key authentication."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import strict_json
from .errors import error_response
from .services import Services

# Documents bearer auth in the OpenAPI file. Enforcement is ApiKeyGate (below), a middleware,
# because FastAPI parses bodies (JSON, multipart) before it runs dependencies: a route-level check
# would answer a bad body with 400 to a caller without a key, instead of 401.
_bearer = HTTPBearer(auto_error=False, description="one of the server's API keys")


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def _document_bearer(_credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """No-op at run time (see ApiKeyGate); marks the route as needing the key in the docs."""


Authenticated = Depends(_document_bearer)


def base_url(request: Request, services: ServicesDep) -> str:
    return services.base_url(request)


BaseUrlDep = Annotated[str, Depends(base_url)]


async def json_body(request: Request) -> Any:
    """The request's JSON body, parsed strictly (strict_json: no NaN, no huge numbers, no deep
    nesting, no lone surrogates); an empty body counts as `{}` (clients send GET-style empty
    POSTs). Every JSON-body route reads its body through this, never through a pydantic body
    parameter (tests/test_hostile_input.py checks that)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    return strict_json.loads(raw)


class ApiKeyGate:
    """ASGI middleware: every request under /api/v3/ needs `Authorization: Bearer <key>`,
    checked before anything reads the body. Other paths are public (health, docs) or carry their
    own signed tokens (/files/)."""

    PROTECTED_PREFIX = "/api/v3/"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PROTECTED_PREFIX):
            services: Services = scope["app"].state.services
            account, error = _check_key(services, Headers(scope=scope).get("authorization", ""))
            if error is not None:
                response = error_response(401, error, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})[ACCOUNT_STATE] = account  # read by `account` below
        await self.app(scope, receive, send)


ACCOUNT_STATE = "account"


def _check_key(services: Services, header: str) -> tuple[str | None, str | None]:
    """(the caller's account, None) when the request may pass, else (None, what is wrong).
    With auth off every caller is the anonymous account, None."""
    if not services.auth.enabled:
        return None, None
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None, "missing API key: send `Authorization: Bearer <key>`"
    account = services.auth.account_of(key)
    if account is None:
        return None, "invalid API key"
    return account, None


def has_valid_key(request: Request) -> bool:
    """For public routes that show more to an authenticated caller (/ready, /health)."""
    services: Services = request.app.state.services
    if not services.auth.enabled:
        return True
    account, error = _check_key(services, request.headers.get("authorization", ""))
    return error is None and account is not None


def account(request: Request) -> str | None:
    """The account the caller's key belongs to (None: auth is off, the anonymous account).
    Fails closed: a route outside ApiKeyGate's prefix has no account."""
    marker = object()
    value = getattr(request.state, ACCOUNT_STATE, marker)
    if value is marker:
        raise RuntimeError(f"{request.url.path} is not behind ApiKeyGate: no account")
    return value


AccountDep = Annotated[str | None, Depends(account)]
