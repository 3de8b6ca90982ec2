"""The app's JSON response class: strict JSON (RFC 8259) whatever the content holds."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from .. import strict_json


class StrictJSONResponse(JSONResponse):
    """A JSONResponse that writes `null` for a non-finite float instead of failing with a 500
    (Starlette's allow_nan=False raises) or writing the invalid `NaN`."""

    def render(self, content: Any) -> bytes:
        return strict_json.dumps(content)
