"""Orders: creation, the admin view, stored notifications, and the payment state machine."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from mallgate.clock import show_time
from mallgate.db.models import (
    DuplicatePayment,
    Money,
    Order,
    PaymentNotification,
    Refund,
    RefundRequest,
    User,
    WalletEntry,
    table_of,
)
from mallgate.envelope import ApiError
from mallgate.services import outbox

KINDS = ("goods", "recharge")


def new_order_no(now: datetime) -> str:
    # Time first so order numbers sort by creation; random tail so two workers never collide.
    return now.strftime("%Y%m%d%H%M%S") + f"{secrets.randbelow(10**8):08d}"


def _money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01'))}"


def order_view(order: Order, *, zone: tzinfo) -> dict[str, Any]:
    """An order as the admin API shows it; `paid_at` in `zone` (the settings')."""
    return {
        "order_no": order.order_no,
        "kind": order.kind,
        "status": order.status,
        "amount": _money(order.amount),
        "paid_amount": _money(order.paid_amount),
        "refunded_amount": _money(order.refunded_amount),
        "channel": order.channel,
        "trade_no": order.trade_no,
        "paid_at": show_time(order.paid_at, zone) if order.paid_at else None,
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


def notification_view(row: PaymentNotification, *, zone: tzinfo) -> dict[str, Any]:
    """A stored notice as the admin API and the CLI show it; `received_at` in `zone`."""
    return {
        "id": row.id,
        "channel": row.channel,
        "kind": row.kind,
        "order_no": row.order_no,
        "trade_no": row.trade_no,
        "received_at": show_time(row.received_at, zone),
        "source_ip": row.source_ip,
        "verified": row.verified,
        "outcome": row.outcome,
        "reason": row.reason,
        "repeats": row.repeats,
        "last_repeat_at": show_time(row.last_repeat_at, zone) if row.last_repeat_at else None,
    }


async def notifications_for(session: AsyncSession, order_no: str, *, zone: tzinfo) -> list[dict[str, Any]]:
    rows = (
        await session.scalars(
            select(PaymentNotification)
            .where(PaymentNotification.order_no == order_no)
            .order_by(PaymentNotification.received_at, PaymentNotification.id)
        )
    ).all()
    return [notification_view(r, zone=zone) for r in rows]


# ---------------------------------------------------------------------------
# The payment state machine, shared by every channel.
#
#   unpaid --pay--> paid --refund--> partially_refunded --refund--> refunded
#   unpaid --close--> closed --pay (money arrived after all)--> paid
#
# Every transition is one conditional UPDATE on the state it leaves, so a
# duplicate, concurrent or late notification finds nothing to change. A refund
# of an unpaid or closed order is answered failure: its payment is still on the
# way, and the platform sends the refund again. A second payment of a paid order
# is recorded once per (channel, trade_no) in duplicate_payments; refunds are
# matched by trade, so one naming that trade pays it back, not the order.
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
    # Our number of the refund request behind a refund (out_refund_no / out_request_no), if any.
    request_no: str = ""


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
_refunds = table_of(Refund)
_duplicates = table_of(DuplicatePayment)
_users = table_of(User)
_REFUND_SEEN = select(_refunds.c.id).where(
    _refunds.c.channel == bindparam("channel"), _refunds.c.refund_no == bindparam("refund_no")
)
_INSERT_REFUND = insert(_refunds)
_SELECT_DUPLICATE = select(_duplicates).where(
    _duplicates.c.channel == bindparam("channel"), _duplicates.c.trade_no == bindparam("trade_no")
)
_INSERT_DUPLICATE = insert(_duplicates)
_REFUND_DUPLICATE = (
    update(_duplicates)
    .where(
        _duplicates.c.id == bindparam("duplicate_id"),
        _duplicates.c.refunded_amount == bindparam("current"),
    )
    .values(refunded_amount=bindparam("new_total"))
)
_requests = table_of(RefundRequest)
# A refund the state machine recorded settles the request behind it, whatever said so first
# (a request given up as failed included: the money moved after all).
_SETTLE_REQUEST = (
    update(_requests)
    .where(
        _requests.c.request_no == bindparam("settle_no"),
        _requests.c.status.in_(("requesting", "pending", "failed")),
    )
    .values(status="succeeded", platform_refund_id=bindparam("settle_refund_id"), updated_at=bindparam("now"))
)
_INSERT_WALLET_ENTRY = insert(table_of(WalletEntry))
_MOVE_BALANCE = (
    update(_users)
    .where(_users.c.id == bindparam("user_id"))
    .values(balance=_users.c.balance + bindparam("amount", type_=Money))
)
_BALANCE = select(_users.c.balance).where(_users.c.id == bindparam("user_id"))


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
        result = _refund(conn, order, event, now)
        if event.request_no and result.accepted:
            conn.execute(
                _SETTLE_REQUEST,
                {"settle_no": event.request_no, "settle_refund_id": event.refund_no[:64], "now": now},
            )
        return result
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
        # The ledger row's unique entry_key is a second lock on "credit once", should the status check fail.
        _move_wallet(conn, order.user_id, order.order_no, f"credit:{order.order_no}", order.amount, now)
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
    # Paid twice (two channels, or two trades): the money is real, so accept it and raise it for a
    # refund, once per second trade however often the platform delivers it.
    due = f"already {order.status} by {order.channel} {order.trade_no}: refund due"
    if not _record_duplicate(conn, order, event, now):
        return Applied(True, "duplicate", f"second payment recorded before; {due}")
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
    return Applied(True, "duplicate", due)


def _record_duplicate(conn: Connection, order: Row[Any], event: PaymentEvent, now: datetime) -> bool:
    """Record a second payment once per (channel, trade_no); False when it already was."""
    trade = {"channel": event.channel, "trade_no": event.trade_no}
    if conn.execute(_SELECT_DUPLICATE, trade).first() is not None:
        return False
    try:
        # Another transaction may be recording the same trade right now: the unique key then refuses
        # this insert (PostgreSQL once the other commits; MySQL also when our snapshot predates it),
        # and the savepoint undoes just the insert instead of spoiling the whole batch.
        with conn.begin_nested():
            conn.execute(
                _INSERT_DUPLICATE,
                {
                    **trade,
                    "order_no": order.order_no,
                    "amount": event.amount,
                    "refunded_amount": Decimal("0.00"),
                    "created_at": now,
                },
            )
    except IntegrityError:
        return False
    return True


def _close(conn: Connection, order: Row[Any], now: datetime) -> Applied:
    if conn.execute(_CLOSE, {"order_id": order.id, "now": now}).rowcount == 1:
        return Applied(True, "applied", "closed")
    return Applied(True, "duplicate", f"order is {order.status}")


def _refund(conn: Connection, order: Row[Any], event: PaymentEvent, now: datetime) -> Applied:
    if event.refund_total is None and (event.refund_amount is None or not event.refund_no):
        return Applied(False, "rejected", "refund without amount or id")
    if event.trade_no and (event.channel, event.trade_no) != (order.channel, order.trade_no):
        # Refunds are matched by trade: one of a recorded second payment pays back that trade.
        duplicate = conn.execute(
            _SELECT_DUPLICATE, {"channel": event.channel, "trade_no": event.trade_no}
        ).first()
        if duplicate is not None and duplicate.order_no == order.order_no:
            return _refund_duplicate(conn, duplicate, event, now)
    if order.status in PAYABLE:
        # Platforms do not promise order: a refund can outrun its payment's notice. Failure makes
        # the platform send it again, by when the payment (its notice, or `mallgate reconcile`) is in.
        return Applied(False, "rejected", f"refund before payment: order is {order.status}")
    if order.channel != event.channel:
        return Applied(False, "rejected", f"order was paid by {order.channel}")
    current: Decimal = order.refunded_amount
    step = _next_refund(conn, event, current, order.amount, "order")
    if isinstance(step, Applied):
        return step
    new_total, refund_no = step
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
    _record_refund(conn, order.order_no, event, refund_no, new_total - current, now)
    if order.kind == "recharge" and order.user_id is not None:
        _debit_wallet(conn, order, event.channel, refund_no, new_total - current, now)
    outbox.add_event(
        conn,
        "order.refunded",
        {"order_no": order.order_no, "refunded_amount": _money(new_total), "channel": event.channel},
        now,
    )
    return Applied(True, "applied", f"refunded {_money(new_total)} in all")


def _next_refund(
    conn: Connection, event: PaymentEvent, current: Decimal, limit: Decimal, what: str
) -> tuple[Decimal, str] | Applied:
    """The refunded total after this refund and the key recording it, or why nothing changes."""
    if event.refund_total is not None:
        # Alipay reports the trade's running total: an older or repeated total changes nothing,
        # and a trade reaches each total once, so (trade, total) names the refund.
        new_total = max(current, event.refund_total)
        refund_no = f"{event.trade_no or event.refund_no}@{new_total}"
    else:
        assert event.refund_amount is not None
        new_total = current + event.refund_amount
        refund_no = event.refund_no
    if (
        new_total == current
        or conn.execute(_REFUND_SEEN, {"channel": event.channel, "refund_no": refund_no}).first()
    ):
        return Applied(True, "duplicate", "refund already recorded")
    if new_total > limit:
        return Applied(False, "rejected", f"refunds {new_total} exceed the {what}'s {limit}")
    return new_total, refund_no


def _record_refund(
    conn: Connection, order_no: str, event: PaymentEvent, refund_no: str, amount: Decimal, now: datetime
) -> None:
    # Unique (channel, refund_no): should two transactions get here with the same refund, one fails.
    conn.execute(
        _INSERT_REFUND,
        {
            "order_no": order_no,
            "channel": event.channel,
            "refund_no": refund_no,
            "amount": amount,
            "created_at": now,
        },
    )


def _refund_duplicate(conn: Connection, duplicate: Row[Any], event: PaymentEvent, now: datetime) -> Applied:
    """A refund of a second payment pays back that trade; the order's own refunds stay as they are."""
    current: Decimal = duplicate.refunded_amount
    step = _next_refund(conn, event, current, duplicate.amount, "duplicate payment")
    if isinstance(step, Applied):
        return step
    new_total, refund_no = step
    changed = conn.execute(
        _REFUND_DUPLICATE, {"duplicate_id": duplicate.id, "current": current, "new_total": new_total}
    )
    if changed.rowcount != 1:
        return Applied(False, "rejected", "refund raced another update; will be retried")
    _record_refund(conn, duplicate.order_no, event, refund_no, new_total - current, now)
    outbox.add_event(
        conn,
        "order.duplicate_refunded",
        {
            "order_no": duplicate.order_no,
            "channel": event.channel,
            "trade_no": duplicate.trade_no,
            "amount": _money(duplicate.amount),
            "refunded_amount": _money(new_total),
        },
        now,
    )
    return Applied(True, "applied", f"second payment refunded {_money(new_total)} in all")


def _move_wallet(
    conn: Connection, user_id: int, order_no: str, entry_key: str, amount: Decimal, now: datetime
) -> None:
    """One ledger row and the balance it moves; the row's unique key lets each cause move it once."""
    conn.execute(
        _INSERT_WALLET_ENTRY,
        {
            "user_id": user_id,
            "order_no": order_no,
            "entry_key": entry_key,
            "amount": amount,
            "created_at": now,
        },
    )
    conn.execute(_MOVE_BALANCE, {"user_id": user_id, "amount": amount})


def _debit_wallet(
    conn: Connection, order: Row[Any], channel: str, refund_no: str, amount: Decimal, now: datetime
) -> None:
    """A refunded recharge takes its money back out of the wallet, below zero if it was spent."""
    _move_wallet(conn, order.user_id, order.order_no, f"refund:{channel}:{refund_no}", -amount, now)
    balance: Decimal = conn.execute(_BALANCE, {"user_id": order.user_id}).scalar_one()
    outbox.add_event(
        conn,
        "wallet.debited",
        {
            "user_id": order.user_id,
            "order_no": order.order_no,
            "amount": _money(amount),
            "balance_after": _money(balance),
            "channel": channel,
            "refund_no": refund_no,
        },
        now,
    )
    if balance < 0:
        # The buyer has the money back and spent it too: someone has to collect the difference.
        outbox.add_event(
            conn,
            "wallet.negative",
            {"user_id": order.user_id, "order_no": order.order_no, "balance": _money(balance)},
            now,
        )
