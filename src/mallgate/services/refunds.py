"""Refunds and closes the mall starts, and the automatic refund of a second payment.

A refund is recorded (refund_requests, status "requesting") before the platform is
called, under the caller's idempotency key: the same key is one request, so one call,
however often and however concurrently it is sent. What the platform then says moves
the request on (pending, failed), and the money is counted only by the state machine
(services.orders), fed by the refund notice, a synchronous success (Alipay) or a query
(`mallgate reconcile`), all through the notifications intake, so every change is also
in the audit trail. A close is applied only once every platform that could hold a
trade has confirmed it closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.channels import alipay, wechat_pay
from mallgate.channels.errors import ChannelError
from mallgate.db.models import DuplicatePayment, Order, RefundRequest
from mallgate.envelope import ApiError
from mallgate.runtime import Runtime
from mallgate.services.notifications import RawNotification, receive
from mallgate.services.orders import REFUNDABLE, Applied, PaymentEvent, find_order
from mallgate.services.payment_decoders import ALIPAY, QUERY_METHOD, WECHAT, fen_to_yuan, yuan_to_fen

log = logging.getLogger("mallgate.refunds")

IN_FLIGHT = ("requesting", "pending")
REASON_MAX = 80  # WeChat Pay's limit for a refund reason
DUPLICATE_REASON = "重复支付退款"
# Longer than any platform call takes (the HTTP client gives up after 10 s).
CALL_GRACE_SECONDS = 60


def _money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01'))}"


def request_view(row: RefundRequest) -> dict[str, Any]:
    return {
        "order_no": row.order_no,
        "channel": row.channel,
        "trade_no": row.trade_no,
        "idempotency_key": row.idempotency_key,
        "request_no": row.request_no,
        "amount": _money(row.amount),
        "reason": row.reason,
        "status": row.status,
        "refund_id": row.platform_refund_id,
        "error": row.error,
    }


@dataclass(frozen=True)
class Target:
    """The trade a refund pays back: the order's own payment, or a recorded second one."""

    order_no: str
    channel: str
    trade_no: str
    paid: Decimal  # what that trade took
    refunded: Decimal  # what has come back of it so far


def _request_no(now: datetime) -> str:
    # What the platform knows the refund by: <= 64 of [A-Za-z0-9], unique per merchant.
    return "RF" + now.strftime("%Y%m%d%H%M%S") + secrets.token_hex(8)


def _now(runtime: Runtime) -> datetime:
    return runtime.clock.utcnow().replace(tzinfo=None)


# ----------------------------------------------------------------------------------------------
# configuration


def _channel_ready(runtime: Runtime, channel: str) -> bool:
    settings = runtime.settings
    if channel == ALIPAY:
        return bool(settings.alipay.configured and settings.alipay.private_key)
    pay = settings.wechat_pay
    if pay.order_api == "v3":
        return pay.v3_ready
    # v2 refunds go through secapi, which WeChat Pay opens only to the merchant's client certificate.
    return bool(pay.mch_id and pay.api_key and pay.app_id and (pay.api_client_cert or settings.sandbox))


def _require_channel(runtime: Runtime, channel: str) -> None:
    if not _channel_ready(runtime, channel):
        raise ApiError(
            f"{'支付宝' if channel == ALIPAY else '微信支付'}退款未配置", "refund.channel_not_configured"
        )


# ----------------------------------------------------------------------------------------------
# recording a request


async def _target(session: AsyncSession, order: Order, trade: tuple[str, str] | None) -> Target:
    if trade is None or trade == (order.channel, order.trade_no):
        if order.status not in REFUNDABLE:
            if order.status == "refunded":
                raise ApiError("订单已全额退款", "refund.nothing_left", order_status=order.status)
            raise ApiError("订单未支付，不能退款", "refund.not_paid", order_status=order.status)
        assert order.channel is not None and order.trade_no is not None
        return Target(order.order_no, order.channel, order.trade_no, order.amount, order.refunded_amount)
    duplicate = (
        await session.scalars(
            select(DuplicatePayment).where(
                DuplicatePayment.channel == trade[0], DuplicatePayment.trade_no == trade[1]
            )
        )
    ).first()
    if duplicate is None or duplicate.order_no != order.order_no:
        raise ApiError("该订单没有这笔支付", "refund.trade_unknown")
    return Target(
        order.order_no, duplicate.channel, duplicate.trade_no, duplicate.amount, duplicate.refunded_amount
    )


async def _in_flight(session: AsyncSession, target: Target) -> Decimal:
    total = await session.scalar(
        select(func.coalesce(func.sum(RefundRequest.amount), 0)).where(
            RefundRequest.channel == target.channel,
            RefundRequest.trade_no == target.trade_no,
            RefundRequest.status.in_(IN_FLIGHT),
        )
    )
    return Decimal(total or 0)


async def _existing(session: AsyncSession, key: str) -> RefundRequest | None:
    return (await session.scalars(select(RefundRequest).where(RefundRequest.idempotency_key == key))).first()


def _same_request(row: RefundRequest, order_no: str, amount: Decimal) -> RefundRequest:
    if row.order_no != order_no or row.amount != amount:
        raise ApiError("该幂等键已用于另一笔退款", "refund.key_reused", field="idempotency_key")
    return row


async def _record(
    runtime: Runtime,
    *,
    order_no: str,
    amount: Decimal,
    reason: str,
    key: str,
    trade: tuple[str, str] | None,
) -> tuple[RefundRequest, bool]:
    """The request under `key`, and whether this call created it (only then is the platform called)."""
    now = _now(runtime)
    try:
        async with runtime.db.transaction() as session:
            # The order row is locked first (PostgreSQL, MySQL; SQLite writes one at a time anyway), so
            # two requests for one order count each other's amounts against what remains; first, too,
            # so that MySQL's snapshot for the reads below is taken once the other has committed.
            order = (
                await session.scalars(select(Order).where(Order.order_no == order_no).with_for_update())
            ).first()
            if order is None:
                raise ApiError("订单不存在", "order.not_found")
            existing = await _existing(session, key)
            if existing is not None:
                return _same_request(existing, order_no, amount), False
            target = await _target(session, order, trade)
            _require_channel(runtime, target.channel)
            remaining = target.paid - target.refunded - await _in_flight(session, target)
            if amount > remaining:
                raise ApiError(
                    f"退款金额超过可退金额 {_money(max(remaining, Decimal(0)))}",
                    "refund.exceeds_remaining",
                    field="amount",
                    remaining=_money(max(remaining, Decimal(0))),
                )
            row = RefundRequest(
                order_no=order_no,
                channel=target.channel,
                trade_no=target.trade_no,
                idempotency_key=key,
                request_no=_request_no(now),
                amount=amount,
                reason=reason,
                status="requesting",
                platform_refund_id="",
                error="",
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            await session.flush()
            return row, True
    except IntegrityError:
        # The same key, sent concurrently, was recorded by the other request first.
        async with runtime.db.read() as session:
            found = await _existing(session, key)
        if found is None:
            raise
        return _same_request(found, order_no, amount), False


async def _move(
    runtime: Runtime, request_no: str, status: str, *, error: str = "", refund_id: str = ""
) -> None:
    """Move a request on from "requesting"/"pending"; one the state machine settled stays settled."""
    values: dict[str, Any] = {"status": status, "updated_at": _now(runtime)}
    if error:
        values["error"] = error[:255]
    if refund_id:
        values["platform_refund_id"] = refund_id[:64]
    async with runtime.db.transaction() as session:
        await session.execute(
            update(RefundRequest)
            .where(RefundRequest.request_no == request_no, RefundRequest.status.in_(IN_FLIGHT))
            .values(**values)
        )


async def _reload(runtime: Runtime, request_no: str) -> RefundRequest:
    async with runtime.db.read() as session:
        row = (
            await session.scalars(select(RefundRequest).where(RefundRequest.request_no == request_no))
        ).one()
        session.expunge(row)
        return row


async def apply_report(runtime: Runtime, event: PaymentEvent, answer: dict[str, Any]) -> Applied:
    """What a platform answered, through the notifications intake (stored for audit, method QUERY)."""
    raw = RawNotification(
        channel=event.channel,
        method=QUERY_METHOD,
        query_string="",
        body=json.dumps(answer, ensure_ascii=False, sort_keys=True, default=str).encode(),
        source_ip="mallgate",
    )
    return await receive(runtime, raw, lambda _raw: event)


# ----------------------------------------------------------------------------------------------
# the platform calls


def _definite(exc: Exception) -> bool:
    """A refusal the platform stated (nothing happened), as opposed to not knowing (timeout, 5xx)."""
    if isinstance(exc, alipay.AlipayApiError):
        return exc.code not in ("", "20000")  # 20000: Alipay's "service unavailable", outcome unknown
    if isinstance(exc, wechat_pay.WechatPayApiError):
        return exc.code not in ("", "HTTP", "SYSTEM_ERROR", "SYSTEMERROR", "FREQUENCY_LIMITED")
    return isinstance(exc, ValueError)


async def _call_alipay(runtime: Runtime, row: RefundRequest) -> None:
    client = alipay.AlipayClient(runtime.settings.alipay, http=runtime.http, clock=runtime.clock)
    result = await client.trade_refund(
        trade_no=row.trade_no,
        out_trade_no=row.order_no,
        refund_amount=row.amount,
        out_request_no=row.request_no,
        reason=row.reason,
    )
    # Alipay refunds synchronously: the answer is the confirmation (its notice, if any, repeats it).
    event = PaymentEvent(
        ALIPAY,
        row.order_no,
        "refund",
        trade_no=result.trade_no or row.trade_no,
        refund_no=row.request_no,
        refund_total=result.refund_total,
        request_no=row.request_no,
    )
    await apply_report(runtime, event, result.raw)


async def _wechat_amounts(runtime: Runtime, row: RefundRequest) -> tuple[int, int]:
    async with runtime.db.read() as session:
        order = await find_order(session, row.order_no)
        assert order is not None
        # A second payment took the order's amount too: the state machine refuses any other.
        return yuan_to_fen(order.amount), yuan_to_fen(row.amount)


def _notify_url(runtime: Runtime) -> str:
    settings = runtime.settings
    return settings.public_url.rstrip("/") + settings.base_path + "/wechat/notify"


async def _call_wechat(runtime: Runtime, row: RefundRequest) -> None:
    settings = runtime.settings.wechat_pay
    client = wechat_pay.WechatPayClient(settings, http=runtime.http, clock=runtime.clock)
    total, refund = await _wechat_amounts(runtime, row)
    common = {
        "out_trade_no": row.order_no,
        "out_refund_no": row.request_no,
        "reason": row.reason,
        "notify_url": _notify_url(runtime),
    }
    if settings.order_api == "v3":
        answer = await client.refund_v3(total=total, refund=refund, **common)
    else:
        answer = await client.refund_v2(total_fee=total, refund_fee=refund, **common)
    await _settle_wechat(runtime, row, answer)


async def _settle_wechat(runtime: Runtime, row: RefundRequest, answer: wechat_pay.RefundAnswer) -> None:
    if answer.status == "SUCCESS":
        event = PaymentEvent(
            WECHAT,
            row.order_no,
            "refund",
            trade_no=row.trade_no,
            refund_no=answer.refund_id,
            refund_amount=fen_to_yuan(answer.refund_fen) if answer.refund_fen is not None else row.amount,
            request_no=row.request_no,
        )
        await apply_report(runtime, event, answer.raw)
    elif answer.failed:
        await _move(runtime, row.request_no, "failed", error=f"WeChat Pay refund {answer.status}")
        return
    await _move(runtime, row.request_no, "pending", refund_id=answer.refund_id)


async def _call(runtime: Runtime, row: RefundRequest) -> None:
    try:
        if row.channel == ALIPAY:
            await _call_alipay(runtime, row)
        else:
            await _call_wechat(runtime, row)
    except (ChannelError, ValueError) as exc:
        log.warning("refund %s of %s at %s failed: %s", row.request_no, row.order_no, row.channel, exc)
        if _definite(exc):
            await _move(runtime, row.request_no, "failed", error=str(exc))
        else:
            # The refund may or may not have happened: `mallgate reconcile` asks.
            await _move(runtime, row.request_no, "pending", error=str(exc))
        return
    await _move(runtime, row.request_no, "pending")


async def request_refund(
    runtime: Runtime,
    *,
    order_no: str,
    amount: Decimal,
    reason: str,
    idempotency_key: str,
    trade: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Refund `amount` of an order's payment (or of the second payment `trade`), once per key."""
    row, created = await _record(
        runtime, order_no=order_no, amount=amount, reason=reason, key=idempotency_key, trade=trade
    )
    if created:
        await _call(runtime, row)
        row = await _reload(runtime, row.request_no)
    if row.status == "failed" and created:
        raise ApiError("退款被支付平台拒绝，未退款", "refund.refused", refund=request_view(row))
    return request_view(row)


async def refunds_of(runtime: Runtime, order_no: str) -> list[dict[str, Any]]:
    async with runtime.db.read() as session:
        if await find_order(session, order_no) is None:
            raise ApiError("订单不存在", "order.not_found")
        rows = (
            await session.scalars(
                select(RefundRequest).where(RefundRequest.order_no == order_no).order_by(RefundRequest.id)
            )
        ).all()
        return [request_view(r) for r in rows]


# ----------------------------------------------------------------------------------------------
# settling what is still pending (mallgate reconcile)


async def _ask_wechat(runtime: Runtime, row: RefundRequest) -> None:
    settings = runtime.settings.wechat_pay
    client = wechat_pay.WechatPayClient(settings, http=runtime.http, clock=runtime.clock)
    if settings.order_api == "v3":
        answer = await client.refund_query_v3(row.request_no)
    else:
        answer = await client.refund_query_v2(row.request_no)
    if answer.status == "NOT_EXIST":
        await _move(runtime, row.request_no, "failed", error="WeChat Pay has no such refund")
        return
    await _settle_wechat(runtime, row, answer)


@dataclass(frozen=True)
class Settled:
    """What `mallgate reconcile` learnt of one refund request."""

    order_no: str
    channel: str
    request_no: str
    before: str
    after: str
    error: str = ""


async def settle_pending(runtime: Runtime, *, limit: int = 200) -> list[Settled]:
    """Ask the platforms about refund requests not yet settled."""
    # A request still "requesting" may be in the middle of its call: asking about it now could
    # find nothing and fail it just before the platform makes it.
    settled_calls = _now(runtime) - timedelta(seconds=CALL_GRACE_SECONDS)
    async with runtime.db.read() as session:
        rows = (
            await session.scalars(
                select(RefundRequest)
                .where(
                    (RefundRequest.status == "pending")
                    | ((RefundRequest.status == "requesting") & (RefundRequest.updated_at <= settled_calls))
                )
                .order_by(RefundRequest.id)
                .limit(limit)
            )
        ).all()
        for row in rows:
            session.expunge(row)
    found = []
    for row in rows:
        error = ""
        if not _channel_ready(runtime, row.channel):
            error = f"{row.channel} refunds not configured"
        else:
            try:
                if row.channel == ALIPAY:
                    # Alipay's refund is idempotent on out_request_no: asking again answers with the
                    # trade's refunded total, and makes the refund if the first call never arrived.
                    await _call_alipay(runtime, row)
                else:
                    await _ask_wechat(runtime, row)
            except (ChannelError, ValueError) as exc:
                if _definite(exc):
                    await _move(runtime, row.request_no, "failed", error=str(exc))
                error = str(exc)[:200]
        after = (await _reload(runtime, row.request_no)).status
        found.append(Settled(row.order_no, row.channel, row.request_no, row.status, after, error))
    return found


# ----------------------------------------------------------------------------------------------
# second payments


def duplicate_key(channel: str, trade_no: str) -> str:
    """The idempotency key of a second payment's automatic refund: one per trade, ever."""
    return f"duplicate:{channel}:{trade_no}"


async def refund_duplicates(runtime: Runtime) -> list[dict[str, Any]]:
    """Refund every recorded second payment not yet refunded (MALLGATE_AUTO_REFUND_DUPLICATES)."""
    async with runtime.db.read() as session:
        owed = (
            await session.execute(
                select(
                    DuplicatePayment.order_no,
                    DuplicatePayment.channel,
                    DuplicatePayment.trade_no,
                    DuplicatePayment.amount - DuplicatePayment.refunded_amount,
                ).where(DuplicatePayment.refunded_amount < DuplicatePayment.amount)
            )
        ).all()
        asked = set(
            (
                await session.scalars(
                    select(RefundRequest.idempotency_key).where(
                        RefundRequest.idempotency_key.in_([duplicate_key(c, t) for _, c, t, _ in owed])
                    )
                )
            ).all()
        )
    done = []
    for order_no, channel, trade_no, amount in owed:
        key = duplicate_key(channel, trade_no)
        if key in asked:
            continue  # asked once already: that request settles it (or an operator does)
        try:
            done.append(
                await request_refund(
                    runtime,
                    order_no=order_no,
                    amount=Decimal(amount),
                    reason=DUPLICATE_REASON,
                    idempotency_key=key,
                    trade=(channel, trade_no),
                )
            )
        except ApiError as exc:
            log.warning("automatic refund of %s %s (order %s): %s", channel, trade_no, order_no, exc.code)
    return done


@dataclass
class _Sweeper:
    task: asyncio.Task[None] | None = None
    again: bool = False


def schedule_duplicate_refunds(runtime: Runtime) -> None:
    """Start (or queue one more) sweep of second payments, apart from the notice's own answer.

    However many redeliveries ask at once, one sweep runs at a time and at most one more
    follows it; the idempotency key is what makes each trade's refund one platform call.
    """
    if not runtime.settings.auto_refund_duplicates:
        return
    sweeper: _Sweeper = runtime.services.setdefault("duplicate_refunds", _Sweeper())
    if sweeper.task is not None and not sweeper.task.done():
        sweeper.again = True
        return
    sweeper.task = asyncio.get_running_loop().create_task(
        _sweep(runtime, sweeper), name="mallgate-duplicate-refunds"
    )


async def _sweep(runtime: Runtime, sweeper: _Sweeper) -> None:
    while True:
        sweeper.again = False
        try:
            await refund_duplicates(runtime)
        except Exception:
            log.exception("automatic refund of second payments failed; `mallgate reconcile` retries")
        if not sweeper.again:
            return


# ----------------------------------------------------------------------------------------------
# closes


async def _close_at(runtime: Runtime, channel: str, order_no: str) -> str:
    """Close the trade at one platform: "closed", "not_exist" (none to close), or ApiError."""
    try:
        if channel == ALIPAY:
            client = alipay.AlipayClient(runtime.settings.alipay, http=runtime.http, clock=runtime.clock)
            return await client.trade_close(order_no)
        settings = runtime.settings.wechat_pay
        pay = wechat_pay.WechatPayClient(settings, http=runtime.http, clock=runtime.clock)
        if settings.order_api == "v3":
            await pay.close_v3(order_no)
        else:
            await pay.close_order(order_no)
        return "closed"
    except (alipay.AlipayApiError, wechat_pay.WechatPayApiError) as exc:
        sub = getattr(exc, "sub_code", "") or getattr(exc, "code", "")
        if sub in ("ORDER_NOT_EXIST", "ORDERNOTEXIST"):
            return "not_exist"
        if sub in ("ACQ.TRADE_STATUS_ERROR", "ORDERPAID"):
            raise ApiError(
                "支付平台显示该订单已支付，不能关闭", "order.close_refused", channel=channel
            ) from None
        log.warning("close of %s at %s failed: %s", order_no, channel, exc)
        raise ApiError("支付渠道暂时不可用，订单未关闭", "pay.channel_error", channel=channel) from None
    except (ChannelError, ValueError) as exc:
        log.warning("close of %s at %s failed: %s", order_no, channel, exc)
        raise ApiError("支付渠道暂时不可用，订单未关闭", "pay.channel_error", channel=channel) from None


def _closable_channels(runtime: Runtime) -> list[str]:
    settings = runtime.settings
    found = []
    if settings.alipay.configured and settings.alipay.private_key:
        found.append(ALIPAY)
    pay = settings.wechat_pay
    if (pay.order_api == "v3" and pay.v3_ready) or (pay.order_api == "v2" and pay.api_key and pay.mch_id):
        found.append(WECHAT)
    return found


async def close_order(runtime: Runtime, order_no: str) -> dict[str, Any]:
    """Close an unpaid order at every platform that may hold a trade for it, then here.

    The order is marked closed only when each platform confirmed it (closed, or no trade
    there); a platform that reports it paid refuses the close. Money that arrives after all
    still pays the order (the state machine's "paid after close").
    """
    async with runtime.db.read() as session:
        order = await find_order(session, order_no)
        if order is None:
            raise ApiError("订单不存在", "order.not_found")
        status = order.status
    if status == "closed":
        return {"order_no": order_no, "status": "closed", "platforms": {}}
    if status != "unpaid":
        raise ApiError("订单已支付，不能关闭", "order.not_closable", order_status=status)
    channels = _closable_channels(runtime)
    if not channels:
        raise ApiError("没有已配置的支付渠道", "pay.not_configured")
    confirmed = {channel: await _close_at(runtime, channel, order_no) for channel in channels}
    applied = await apply_report(
        runtime, PaymentEvent(channels[0], order_no, "close"), {"close": confirmed, "order_no": order_no}
    )
    async with runtime.db.read() as session:
        order = await find_order(session, order_no)
        assert order is not None
        if order.status != "closed":
            # Paid by a notice while we were closing: the platforms' word came too late.
            raise ApiError("订单已支付，不能关闭", "order.not_closable", order_status=order.status)
    return {"order_no": order_no, "status": "closed", "platforms": confirmed, "outcome": applied.outcome}
