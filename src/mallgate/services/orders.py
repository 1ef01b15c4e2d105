"""Orders: creation, the admin view, stored notifications, and the payment state machine."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from mallgate.db.models import Money, Order, PaymentNotification, Refund, User, WalletEntry, table_of
from mallgate.envelope import ApiError
from mallgate.services import outbox

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


# ---------------------------------------------------------------------------
# The payment state machine, shared by every channel.
#
#   unpaid --pay--> paid --refund--> partially_refunded --refund--> refunded
#   unpaid --close--> closed --pay (money arrived after all)--> paid
#
# Every transition is one conditional UPDATE on the state it leaves, so a
# duplicate, concurrent or late notification finds nothing to change.
# ---------------------------------------------------------------------------

PAYABLE = ("unpaid", "closed")
REFUNDABLE = ("paid", "partially_refunded")


@dataclass(frozen=True)
class PaymentEvent:
    """What a verified notification (or a query answer) says happened, channel-neutral."""

    channel: str
    order_no: str
    action: str  # "pay", "close", "refund" or "none"
    trade_no: str = ""
    amount: Decimal | None = None  # the paid total, in yuan, for "pay"
    refund_no: str = ""  # the platform's id of one refund, for "refund"
    refund_amount: Decimal | None = None  # that refund alone (WeChat Pay)
    refund_total: Decimal | None = None  # all refunds so far (Alipay's cumulative refund_fee)


@dataclass(frozen=True)
class Applied:
    """The fate of an event: `accepted` means the platform may stop resending it."""

    accepted: bool
    outcome: str  # applied, duplicate, ignored, rejected
    reason: str = ""


# Statements built once: the notify path runs them thousands of times a second, and
# building a statement costs more than SQLite takes to run it.
_orders = table_of(Order)
_SELECT_ORDER = select(_orders).where(_orders.c.order_no == bindparam("order_no"))
_SELECT_ORDERS = select(_orders).where(_orders.c.order_no.in_(bindparam("order_nos", expanding=True)))
_REFRESH_ORDER = select(_orders).where(_orders.c.id == bindparam("order_id"))
_TRADE_CLASH = select(_orders.c.order_no).where(
    _orders.c.channel == bindparam("channel"),
    _orders.c.trade_no == bindparam("trade_no"),
    _orders.c.id != bindparam("order_id"),
)
_PAY = (
    update(_orders)
    .where(_orders.c.id == bindparam("order_id"), _orders.c.status.in_(PAYABLE))
    .values(
        status="paid",
        channel=bindparam("pay_channel"),
        trade_no=bindparam("pay_trade_no"),
        paid_amount=bindparam("pay_amount"),
        paid_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
)
_CLOSE = (
    update(_orders)
    .where(_orders.c.id == bindparam("order_id"), _orders.c.status == "unpaid")
    .values(status="closed", closed_at=bindparam("now"), updated_at=bindparam("now"))
)
_REFUND = (
    update(_orders)
    .where(
        _orders.c.id == bindparam("order_id"),
        _orders.c.refunded_amount == bindparam("current"),
        _orders.c.status.in_(REFUNDABLE),
    )
    .values(
        refunded_amount=bindparam("new_total"), status=bindparam("new_status"), updated_at=bindparam("now")
    )
)
_REFUND_SEEN = select(table_of(Refund).c.id).where(
    table_of(Refund).c.channel == bindparam("channel"), table_of(Refund).c.refund_no == bindparam("refund_no")
)
_CREDIT = (
    update(table_of(User))
    .where(table_of(User).c.id == bindparam("user_id"))
    .values(balance=table_of(User).c.balance + bindparam("amount", type_=Money))
)


def apply_events(session: Session, events: Sequence[tuple[PaymentEvent, datetime]]) -> list[Applied]:
    """Apply verified events, in order-number order, inside the caller's transaction.

    Synchronous on purpose: the group commit runs a whole batch in one call (on a
    worker thread for SQLite, through `AsyncSession.run_sync` for the others)
    instead of paying an event-loop round trip per statement. The batch's orders
    are read with one query; an order an event has changed is read again for the
    next event about it. Orders are taken in one global order (by number), so two
    batches in two processes never wait on each other's rows in a cycle.
    """
    conn = session.connection()
    numbers = sorted({event.order_no for event, _ in events})
    known: dict[str, Row[Any] | None] = {
        row.order_no: row for row in conn.execute(_SELECT_ORDERS, {"order_nos": numbers})
    }
    results: list[Applied] = [Applied(False, "rejected", "not applied")] * len(events)
    for index in sorted(range(len(events)), key=lambda i: events[i][0].order_no):
        event, now = events[index]
        order = known.get(event.order_no)
        if order is None and event.order_no in known:
            order = conn.execute(_SELECT_ORDER, {"order_no": event.order_no}).first()
        results[index] = result = _apply(conn, order, event, now)
        if result.outcome == "applied":
            known[event.order_no] = None  # changed: read it again if the batch names it again
    return results


def _apply(conn: Connection, order: Row[Any] | None, event: PaymentEvent, now: datetime) -> Applied:
    if order is None:
        return Applied(False, "rejected", "unknown order")
    if event.action == "pay":
        return _pay(conn, order, event, now)
    if event.action == "close":
        return _close(conn, order, now)
    if event.action == "refund":
        return _refund(conn, order, event, now)
    return Applied(True, "ignored", "nothing to change")


def _pay(conn: Connection, order: Row[Any], event: PaymentEvent, now: datetime) -> Applied:
    if event.amount is None or event.amount != order.amount:
        return Applied(False, "rejected", f"amount mismatch: notified {event.amount}, order {order.amount}")
    if not event.trade_no:
        return Applied(False, "rejected", "no trade number")
    if order.status not in PAYABLE:
        return _already_paid(conn, order, event, now)
    clash = conn.execute(
        _TRADE_CLASH, {"channel": event.channel, "trade_no": event.trade_no, "order_id": order.id}
    ).first()
    if clash is not None:
        return Applied(False, "rejected", "trade number already belongs to another order")
    changed = conn.execute(
        _PAY,
        {
            "order_id": order.id,
            "pay_channel": event.channel,
            "pay_trade_no": event.trade_no,
            "pay_amount": event.amount,
            "now": now,
        },
    )
    if changed.rowcount != 1:
        # Another transaction paid it between our read and our write.
        return _already_paid(conn, conn.execute(_REFRESH_ORDER, {"order_id": order.id}).one(), event, now)
    if order.kind == "recharge" and order.user_id is not None:
        # The ledger row's unique order_no is a second lock on "credit once", should the status check fail.
        conn.execute(
            insert(table_of(WalletEntry)),
            {
                "user_id": order.user_id,
                "order_no": order.order_no,
                "entry_key": f"credit:{order.order_no}",
                "amount": order.amount,
                "created_at": now,
            },
        )
        conn.execute(_CREDIT, {"user_id": order.user_id, "amount": order.amount})
    outbox.add_event(
        conn,
        "order.paid",
        {
            "order_no": order.order_no,
            "kind": order.kind,
            "amount": _money(order.amount),
            "channel": event.channel,
            "trade_no": event.trade_no,
            "user_id": order.user_id,
        },
        now,
    )
    return Applied(True, "applied", "paid after close" if order.status == "closed" else "")


def _already_paid(conn: Connection, order: Row[Any], event: PaymentEvent, now: datetime) -> Applied:
    if order.channel == event.channel and order.trade_no == event.trade_no:
        return Applied(True, "duplicate", "already paid")
    # Paid twice (two channels, or two trades): the money is real, so accept it and raise it for a refund.
    outbox.add_event(
        conn,
        "order.paid_twice",
        {
            "order_no": order.order_no,
            "channel": event.channel,
            "trade_no": event.trade_no,
            "amount": _money(event.amount or Decimal(0)),
        },
        now,
    )
    return Applied(
        True, "duplicate", f"already {order.status} by {order.channel} {order.trade_no}: refund due"
    )


def _close(conn: Connection, order: Row[Any], now: datetime) -> Applied:
    if conn.execute(_CLOSE, {"order_id": order.id, "now": now}).rowcount == 1:
        return Applied(True, "applied", "closed")
    return Applied(True, "duplicate", f"order is {order.status}")


def _refund(conn: Connection, order: Row[Any], event: PaymentEvent, now: datetime) -> Applied:
    if order.channel is not None and order.channel != event.channel:
        return Applied(False, "rejected", f"order was paid by {order.channel}")
    if event.refund_total is None and (event.refund_amount is None or not event.refund_no):
        return Applied(False, "rejected", "refund without amount or id")
    if order.status not in REFUNDABLE:
        return Applied(True, "ignored", f"order is {order.status}")
    current: Decimal = order.refunded_amount
    if event.refund_total is not None:
        # Alipay reports the running total: an older or repeated total changes nothing.
        new_total = max(current, event.refund_total)
        refund_no = f"{event.refund_no or event.trade_no}@{new_total}"
    else:
        assert event.refund_amount is not None
        new_total = current + event.refund_amount
        refund_no = event.refund_no
    if (
        new_total == current
        or conn.execute(_REFUND_SEEN, {"channel": event.channel, "refund_no": refund_no}).first()
    ):
        return Applied(True, "duplicate", "refund already recorded")
    if new_total > order.amount:
        return Applied(False, "rejected", f"refunds {new_total} exceed the order's {order.amount}")
    new_status = "refunded" if new_total == order.amount else "partially_refunded"
    changed = conn.execute(
        _REFUND,
        {
            "order_id": order.id,
            "current": current,
            "new_total": new_total,
            "new_status": new_status,
            "now": now,
        },
    )
    if changed.rowcount != 1:
        # A concurrent refund moved the total: fail this one; the platform sends it again.
        return Applied(False, "rejected", "refund raced another update; will be retried")
    # Unique (channel, refund_no): should two transactions get here with the same refund, one fails.
    conn.execute(
        insert(table_of(Refund)),
        {
            "order_no": order.order_no,
            "channel": event.channel,
            "refund_no": refund_no,
            "amount": new_total - current,
            "created_at": now,
        },
    )
    outbox.add_event(
        conn,
        "order.refunded",
        {"order_no": order.order_no, "refunded_amount": _money(new_total), "channel": event.channel},
        now,
    )
    return Applied(True, "applied", f"refunded {_money(new_total)} in all")
