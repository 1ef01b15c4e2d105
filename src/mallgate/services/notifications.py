"""Payment notifications: store the raw request first, then apply it, in one transaction.

The channel-specific part is a decoder: raw request -> verified PaymentEvent,
raising NotAuthentic / ChannelError when the request must not be believed. A
rejected notification is stored too (for audit), with its reason. The caller
answers success only when `accepted` is true, which happens only after commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from mallgate.channels.errors import ChannelError
from mallgate.db.models import PaymentNotification
from mallgate.runtime import Runtime
from mallgate.services.orders import Applied, PaymentEvent, apply_event

log = logging.getLogger("mallgate.notify")

# Headers worth keeping for audit and replay; cookies and authorisation never are.
KEPT_HEADERS = (
    "content-type",
    "user-agent",
    "wechatpay-timestamp",
    "wechatpay-nonce",
    "wechatpay-signature",
    "wechatpay-serial",
    "wechatpay-signature-type",
    "request-id",
    "x-forwarded-for",
)


@dataclass(frozen=True)
class RawNotification:
    channel: str
    method: str
    query_string: str
    body: bytes
    source_ip: str
    headers: dict[str, str] = field(default_factory=dict)


Decoder = Callable[[RawNotification], PaymentEvent]

UNAVAILABLE = Applied(False, "error", "database unavailable")


def _kept_headers(headers: dict[str, str]) -> str:
    return json.dumps({k: v for k, v in headers.items() if k.lower() in KEPT_HEADERS}, sort_keys=True)


async def receive(runtime: Runtime, raw: RawNotification, decode: Decoder) -> Applied:
    """Verify, store and apply one notification; never raises."""
    try:
        event: PaymentEvent | None = decode(raw)
        refusal = ""
    except ChannelError as exc:
        event, refusal = None, f"{type(exc).__name__}: {exc}"[:255]
    now = runtime.clock.utcnow().replace(tzinfo=None)
    try:
        # Connect timeouts bound a dead database; this bounds a wedged one, so the platform
        # hears "failure" and retries instead of hanging on us.
        async with asyncio.timeout(runtime.settings.db_timeout_seconds + 3):
            async with runtime.db.transaction() as session:
                row = PaymentNotification(
                    channel=raw.channel,
                    kind=event.action if event else "",
                    order_no=event.order_no if event else None,
                    trade_no=(event.trade_no or None) if event else None,
                    received_at=now,
                    source_ip=raw.source_ip[:64],
                    method=raw.method[:8],
                    query_string=raw.query_string,
                    headers=_kept_headers(raw.headers),
                    body=raw.body,
                    verified=event is not None,
                )
                session.add(row)
                result = (
                    await apply_event(session, event, now) if event else Applied(False, "rejected", refusal)
                )
                row.outcome, row.reason = result.outcome, result.reason[:255]
    except (TimeoutError, SQLAlchemyError, OSError) as exc:
        log.warning("%s notification not stored: %s", raw.channel, type(exc).__name__)
        return UNAVAILABLE
    if not result.accepted:
        log.warning("%s notification refused: %s %s", raw.channel, result.outcome, result.reason)
    return result


async def load_raw(runtime: Runtime, notification_id: int) -> RawNotification | None:
    async with runtime.db.read() as session:
        row = (
            await session.scalars(
                select(PaymentNotification).where(PaymentNotification.id == notification_id)
            )
        ).first()
        if row is None:
            return None
        return RawNotification(
            channel=row.channel,
            method=row.method,
            query_string=row.query_string,
            body=row.body,
            source_ip=row.source_ip,
            headers=json.loads(row.headers or "{}"),
        )
