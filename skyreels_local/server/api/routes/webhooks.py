"""Webhook delivery status of a prediction (an extra endpoint; the v3 prediction object is left
as the contract defines it). A delivery that exhausted its retry window shows `dead` here."""

from __future__ import annotations

from fastapi import APIRouter

from ...schemas import Envelope, WebhookDeliveries, WebhookDeliveryInfo, rfc3339
from ..deps import AccountDep, Authenticated, ServicesDep
from ..errors import NotFoundError
from .predictions import ERRORS

router = APIRouter(prefix="/api/v3", dependencies=[Authenticated], responses=ERRORS, tags=["predictions"])


@router.get(
    "/predictions/{prediction_id}/webhook",
    response_model=Envelope[WebhookDeliveries],
    summary="Webhook deliveries of a prediction (extra): pending, delivered or dead",
)
def webhook_deliveries(
    prediction_id: str, services: ServicesDep, account: AccountDep
) -> Envelope[WebhookDeliveries]:
    # Another account's prediction is a 404 exactly like an unknown id.
    if services.owned(prediction_id, account) is None:
        raise NotFoundError(f"prediction {prediction_id!r} not found")
    deliveries = [
        WebhookDeliveryInfo(
            url=row["url"],
            status=row["status"],
            attempts=row["attempts"],
            last_error=row["last_error"],
            created_at=rfc3339(row["created_at"]),
            next_attempt_at=rfc3339(row["next_attempt_at"]) if row["status"] == "pending" else None,
            delivered_at=rfc3339(row["delivered_at"]) if row["delivered_at"] else None,
        )
        for row in services.db.webhooks.deliveries(prediction_id)
    ]
    return Envelope(data=WebhookDeliveries(prediction_id=prediction_id, deliveries=deliveries))
