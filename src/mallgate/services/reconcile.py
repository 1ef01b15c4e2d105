"""Reconciliation: ask the platforms about orders still unpaid, for notices that never arrived.

What a platform reports goes through the same intake as a notification
(notifications.receive, with method "QUERY"), so it is stored for audit and
applied by the one state machine; a paid order found here looks in the audit
trail exactly like one paid by a notice, except for that method.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from mallgate.channels import alipay, wechat_pay
from mallgate.channels.errors import ChannelError
from mallgate.db.models import Order
from mallgate.runtime import Runtime
from mallgate.services import refunds
from mallgate.services.notifications import RawNotification, receive
from mallgate.services.orders import Applied, PaymentEvent
from mallgate.services.payment_decoders import ALIPAY, QUERY_METHOD, WECHAT, fen_to_yuan

log = logging.getLogger("mallgate.reconcile")

# Older unpaid orders are abandoned carts; the platforms close their trades after a day or two.
DEFAULT_MAX_AGE = timedelta(days=2)

WECHAT_CLOSED = ("CLOSED", "REVOKED")


@dataclass(frozen=True)
class Report:
    """What one platform said about one order, as it will be applied."""

    channel: str
    order_no: str
    state: str  # the platform's own word: TRADE_SUCCESS, NOTPAY, NOT_EXIST, ...
    event: PaymentEvent | None  # None: nothing to change
    answer: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    order_no: str
    channel: str
    state: str
    applied: Applied | None = None
    error: str = ""
    note: str = ""  # a refund request's move, said as is

    def line(self) -> str:
        if self.error:
            return f"{self.order_no} {self.channel}: error: {self.error}"
        if self.note:
            return f"{self.order_no} {self.channel}: {self.note}"
        if self.applied is None:
            return f"{self.order_no} {self.channel}: {self.state}, nothing to change"
        reason = f" ({self.applied.reason})" if self.applied.reason else ""
        return f"{self.order_no} {self.channel}: {self.state} -> {self.applied.outcome}{reason}"


def configured_channels(runtime: Runtime) -> list[str]:
    settings = runtime.settings
    found = []
    if settings.alipay.configured and settings.alipay.private_key:
        found.append(ALIPAY)
    pay = settings.wechat_pay
    if (pay.order_api == "v3" and pay.v3_ready) or (pay.app_id and pay.mch_id and pay.api_key):
        found.append(WECHAT)
    return found


async def _ask_alipay(runtime: Runtime, order_no: str) -> Report:
    client = alipay.AlipayClient(runtime.settings.alipay, http=runtime.http, clock=runtime.clock)
    result = await client.trade_query(order_no)
    event: PaymentEvent | None = None
    if result.trade_status in alipay.PAID_STATUSES:
        event = PaymentEvent(ALIPAY, order_no, "pay", trade_no=result.trade_no, amount=result.total_amount)
    elif result.trade_status == "TRADE_CLOSED":
        event = PaymentEvent(ALIPAY, order_no, "close", trade_no=result.trade_no)
    return Report(ALIPAY, order_no, result.trade_status, event, result.raw)


async def _ask_wechat(runtime: Runtime, order_no: str) -> Report:
    settings = runtime.settings.wechat_pay
    client = wechat_pay.WechatPayClient(settings, http=runtime.http, clock=runtime.clock)
    # v3 for the merchants it is configured for (some have no v2 key at all).
    result = await (
        client.order_query_v3(order_no) if settings.order_api == "v3" else client.order_query(order_no)
    )
    event: PaymentEvent | None = None
    if result.paid and result.total_fee is not None:
        amount = fen_to_yuan(result.total_fee)
        event = PaymentEvent(WECHAT, order_no, "pay", trade_no=result.transaction_id, amount=amount)
    elif result.trade_state in WECHAT_CLOSED:
        event = PaymentEvent(WECHAT, order_no, "close", trade_no=result.transaction_id)
    return Report(WECHAT, order_no, result.trade_state, event, result.raw)


ASK = {ALIPAY: _ask_alipay, WECHAT: _ask_wechat}


async def _apply(runtime: Runtime, report: Report) -> Applied:
    assert report.event is not None
    event = report.event
    raw = RawNotification(
        channel=report.channel,
        method=QUERY_METHOD,
        query_string="",
        body=json.dumps(report.answer, ensure_ascii=False, sort_keys=True, default=str).encode(),
        source_ip="reconcile",
    )
    return await receive(runtime, raw, lambda _raw: event)


async def due_orders(
    runtime: Runtime, *, older_than: timedelta, max_age: timedelta = DEFAULT_MAX_AGE, limit: int = 500
) -> list[tuple[str, str | None]]:
    """(order_no, channel) of unpaid orders created between max_age and older_than ago, oldest first."""
    now = runtime.clock.utcnow().replace(tzinfo=None)
    async with runtime.db.read() as session:
        rows = await session.execute(
            select(Order.order_no, Order.channel)
            .where(
                Order.status == "unpaid",
                Order.created_at <= now - older_than,
                Order.created_at >= now - max_age,
            )
            .order_by(Order.created_at, Order.id)
            .limit(limit)
        )
        return [(order_no, channel) for order_no, channel in rows.all()]


async def reconcile(
    runtime: Runtime, *, older_than: timedelta, max_age: timedelta = DEFAULT_MAX_AGE, limit: int = 500
) -> list[Outcome]:
    """Ask every relevant platform about each due order and apply what they report.

    A payment reported by any platform is applied before a closure reported by
    another, so a trade that timed out at Alipay cannot hide a WeChat payment.
    """
    channels = configured_channels(runtime)
    outcomes: list[Outcome] = []
    for order_no, known in await due_orders(runtime, older_than=older_than, max_age=max_age, limit=limit):
        reports: list[Report] = []
        for channel in [known] if known in channels else channels:
            try:
                reports.append(await ASK[channel](runtime, order_no))
            except (ChannelError, ValueError) as exc:
                log.warning("query of %s at %s failed: %s", order_no, channel, exc)
                outcomes.append(Outcome(order_no, channel, "", error=str(exc)[:200]))
        reports.sort(key=lambda r: 0 if r.event is not None and r.event.action == "pay" else 1)
        for report in reports:
            if report.event is None:
                outcomes.append(Outcome(order_no, report.channel, report.state))
                continue
            applied = await _apply(runtime, report)
            outcomes.append(Outcome(order_no, report.channel, report.state, applied))
            if applied.accepted and report.event.action == "pay":
                break  # paid: a closure reported elsewhere no longer matters
    outcomes.extend(await _settle_refunds(runtime))
    return outcomes


async def _settle_refunds(runtime: Runtime) -> list[Outcome]:
    """Refund requests still pending are asked about; second payments still owed are refunded."""
    if runtime.settings.auto_refund_duplicates:
        await refunds.refund_duplicates(runtime)
    return [
        Outcome(
            s.order_no,
            s.channel,
            "refund",
            error=s.error,
            note=f"refund {s.request_no} {s.before} -> {s.after}",
        )
        for s in await refunds.settle_pending(runtime)
    ]
