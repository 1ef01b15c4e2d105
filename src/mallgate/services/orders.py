"""Orders: creation, the view the admin API shows, and stored payment notifications."""

from __future__ import annotations

import secrets
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.db.models import Order, PaymentNotification, User
from mallgate.envelope import ApiError

KINDS = ("goods", "recharge")


def new_order_no(now: datetime) -> str:
    # Time first so order numbers sort by creation; random tail so two workers never collide.
    return now.strftime("%Y%m%d%H%M%S") + f"{secrets.randbelow(10**8):08d}"


def _money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01'))}"


def order_view(order: Order) -> dict[str, Any]:
    return {
        "order_no": order.order_no,
        "kind": order.kind,
        "status": order.status,
        "amount": _money(order.amount),
        "paid_amount": _money(order.paid_amount),
        "refunded_amount": _money(order.refunded_amount),
        "channel": order.channel,
        "trade_no": order.trade_no,
        "paid_at": order.paid_at.strftime("%Y-%m-%d %H:%M:%S") if order.paid_at else None,
        "user_id": str(order.user_id) if order.user_id else None,
        "subject": order.subject,
    }


async def create_order(
    session: AsyncSession,
    now: datetime,
    *,
    amount: Decimal,
    kind: str,
    order_no: str | None = None,
    user_id: int | None = None,
    subject: str = "",
    recharge_max: Decimal | None = None,
) -> Order:
    if kind not in KINDS:
        raise ApiError("kind 应为 goods 或 recharge", "order.invalid_kind", field="kind")
    if user_id is not None and await session.get(User, user_id) is None:
        raise ApiError("用户不存在", "user.not_found", field="user_id")
    if kind == "recharge":
        if user_id is None:
            raise ApiError("充值订单需要 user_id", "order.recharge_needs_user", field="user_id")
        if recharge_max is not None and amount > recharge_max:
            raise ApiError(f"单笔充值不能超过 {recharge_max}", "order.amount_too_large", field="amount")
    order = Order(
        order_no=order_no or new_order_no(now),
        user_id=user_id,
        kind=kind,
        subject=subject or ("余额充值" if kind == "recharge" else "商城订单"),
        amount=amount,
        status="unpaid",
        paid_amount=Decimal("0.00"),
        refunded_amount=Decimal("0.00"),
        created_at=now,
        updated_at=now,
    )
    session.add(order)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise ApiError("订单号已存在", "order.duplicate", field="order_no") from exc
    return order


async def find_order(session: AsyncSession, order_no: str) -> Order | None:
    return (await session.scalars(select(Order).where(Order.order_no == order_no))).first()


def notification_view(row: PaymentNotification) -> dict[str, Any]:
    return {
        "id": row.id,
        "channel": row.channel,
        "kind": row.kind,
        "order_no": row.order_no,
        "trade_no": row.trade_no,
        "received_at": row.received_at.strftime("%Y-%m-%d %H:%M:%S"),
        "source_ip": row.source_ip,
        "verified": row.verified,
        "outcome": row.outcome,
        "reason": row.reason,
    }


async def notifications_for(session: AsyncSession, order_no: str) -> list[dict[str, Any]]:
    rows = (
        await session.scalars(
            select(PaymentNotification)
            .where(PaymentNotification.order_no == order_no)
            .order_by(PaymentNotification.received_at, PaymentNotification.id)
        )
    ).all()
    return [notification_view(r) for r in rows]
