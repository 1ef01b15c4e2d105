"""The payment state machine and notification intake, on every database.

End-to-end tests through signed notifications live with each channel's route;
these pin the exactly-once rules themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import func, select

from conftest import Server
from mallgate.db.models import OutboxEvent, PaymentNotification, WalletEntry
from mallgate.runtime import Runtime
from mallgate.services.notifications import RawNotification, receive
from mallgate.services.orders import PaymentEvent
from support import admin_create_order, admin_create_user, admin_get_order, admin_get_user, unique


@pytest.fixture
async def runtime(server: Server) -> AsyncIterator[Runtime]:
    rt = Runtime.create(server.settings, server.clock)
    yield rt
    await rt.close()


def raw(body: bytes = b"x") -> RawNotification:
    return RawNotification(channel="alipay", method="POST", query_string="", body=body, source_ip="127.0.0.1")


def pay(order_no: str, amount: str, trade_no: str = "", channel: str = "alipay") -> PaymentEvent:
    return PaymentEvent(
        channel=channel,
        order_no=order_no,
        action="pay",
        trade_no=trade_no or unique("TR"),
        amount=Decimal(amount),
    )


async def test_pay_once_then_duplicates_change_nothing(client: httpx.AsyncClient, runtime: Runtime) -> None:
    order = await admin_create_order(client, amount="88.00")
    event = pay(order["order_no"], "88")
    first = await receive(runtime, raw(), lambda _r: event)
    assert (first.accepted, first.outcome) == (True, "applied")
    paid = await admin_get_order(client, order["order_no"])
    assert paid["status"] == "paid" and paid["paid_amount"] == "88.00" and paid["trade_no"] == event.trade_no
    again = await receive(runtime, raw(), lambda _r: event)
    assert (again.accepted, again.outcome) == (True, "duplicate")
    assert await admin_get_order(client, order["order_no"]) == paid


async def test_amount_mismatch_and_unknown_order_change_nothing(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    order = await admin_create_order(client, amount="10.00")
    wrong = await receive(runtime, raw(), lambda _r: pay(order["order_no"], "10.01"))
    assert (wrong.accepted, wrong.outcome) == (False, "rejected") and "amount" in wrong.reason
    ghost = await receive(runtime, raw(), lambda _r: pay(unique("NOPE"), "10.00"))
    assert (ghost.accepted, ghost.reason) == (False, "unknown order")
    assert (await admin_get_order(client, order["order_no"]))["status"] == "unpaid"
    async with runtime.db.read() as session:
        rows = (
            await session.scalars(
                select(PaymentNotification).where(PaymentNotification.order_no == order["order_no"])
            )
        ).all()
        assert [(r.verified, r.outcome) for r in rows] == [(True, "rejected")]


async def test_refused_decoding_is_stored_for_audit(client: httpx.AsyncClient, runtime: Runtime) -> None:
    from mallgate.channels.errors import NotAuthentic

    marker = unique("forged").encode()

    def forged(_r: RawNotification) -> PaymentEvent:
        raise NotAuthentic("bad signature")

    result = await receive(runtime, raw(marker), forged)
    assert (result.accepted, result.outcome) == (False, "rejected") and "bad signature" in result.reason
    async with runtime.db.read() as session:
        row = (
            await session.scalars(select(PaymentNotification).where(PaymentNotification.body == marker))
        ).one()
        assert row.verified is False and row.outcome == "rejected"


@pytest.mark.parametrize("kind", ["goods", "recharge"])
async def test_fifty_concurrent_notifications_apply_once(
    client: httpx.AsyncClient, runtime: Runtime, kind: str
) -> None:
    user = await admin_create_user(client)
    order = await admin_create_order(client, amount="30.00", kind=kind, user_id=int(user["id"]))
    event = pay(order["order_no"], "30.00")
    results = await asyncio.gather(*(receive(runtime, raw(), lambda _r: event) for _ in range(50)))
    assert all(r.accepted for r in results), {r.reason for r in results if not r.accepted}
    assert sorted(r.outcome for r in results).count("applied") == 1
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"
    expected = "30.00" if kind == "recharge" else "0.00"
    assert (await admin_get_user(client, user["id"]))["amount"] == expected
    async with runtime.db.read() as session:
        credits = await session.scalar(
            select(func.count()).select_from(WalletEntry).where(WalletEntry.order_no == order["order_no"])
        )
        assert credits == (1 if kind == "recharge" else 0)
        events = await session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .where(OutboxEvent.topic == "order.paid", OutboxEvent.payload.contains(order["order_no"]))
        )
        assert events == 1
        stored = await session.scalar(
            select(func.count())
            .select_from(PaymentNotification)
            .where(PaymentNotification.order_no == order["order_no"])
        )
        assert stored == 50


async def test_close_then_late_payment_and_refunds(client: httpx.AsyncClient, runtime: Runtime) -> None:
    order = await admin_create_order(client, amount="100.00")
    no = order["order_no"]
    close = PaymentEvent(channel="alipay", order_no=no, action="close")
    assert (await receive(runtime, raw(), lambda _r: close)).outcome == "applied"
    assert (await admin_get_order(client, no))["status"] == "closed"
    # The buyer paid after all: the money is real, the order becomes paid.
    late = pay(no, "100.00")
    assert (await receive(runtime, raw(), lambda _r: late)).reason == "paid after close"
    # Alipay reports refunds cumulatively; a repeat or an older total changes nothing.
    for total, status in (
        ("30.00", "partially_refunded"),
        ("30.00", "partially_refunded"),
        ("20.00", "partially_refunded"),
        ("100.00", "refunded"),
    ):
        event = PaymentEvent(
            channel="alipay",
            order_no=no,
            action="refund",
            trade_no=late.trade_no,
            refund_no="R1",
            refund_total=Decimal(total),
        )
        assert (await receive(runtime, raw(), lambda _r, e=event: e)).accepted
        state = await admin_get_order(client, no)
        assert state["status"] == status
    assert state["refunded_amount"] == "100.00"
    # A payment notice arriving after the refund does not resurrect the order.
    assert (await receive(runtime, raw(), lambda _r: late)).outcome == "duplicate"
    assert (await admin_get_order(client, no))["status"] == "refunded"


async def test_incremental_refunds_are_counted_once_each(client: httpx.AsyncClient, runtime: Runtime) -> None:
    order = await admin_create_order(client, amount="50.00")
    no = order["order_no"]
    await receive(runtime, raw(), lambda _r: pay(no, "50.00", channel="wechat"))

    def refund(refund_no: str, amount: str) -> PaymentEvent:
        return PaymentEvent(
            channel="wechat", order_no=no, action="refund", refund_no=refund_no, refund_amount=Decimal(amount)
        )

    results = await asyncio.gather(
        *(receive(runtime, raw(), lambda _r: refund("W1", "20.00")) for _ in range(10))
    )
    assert all(r.accepted for r in results)
    assert (await admin_get_order(client, no))["refunded_amount"] == "20.00"
    too_much = await receive(runtime, raw(), lambda _r: refund("W2", "40.00"))
    assert not too_much.accepted and "exceed" in too_much.reason
    assert (await receive(runtime, raw(), lambda _r: refund("W3", "30.00"))).outcome == "applied"
    final = await admin_get_order(client, no)
    assert (final["status"], final["refunded_amount"]) == ("refunded", "50.00")


async def test_a_second_trade_for_a_paid_order_is_accepted_and_flagged(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    order = await admin_create_order(client, amount="5.00")
    no = order["order_no"]
    await receive(runtime, raw(), lambda _r: pay(no, "5.00", channel="alipay"))
    second = await receive(runtime, raw(), lambda _r: pay(no, "5.00", channel="wechat"))
    assert second.accepted and "refund due" in second.reason
    state = await admin_get_order(client, no)
    assert state["channel"] == "alipay"
    async with runtime.db.read() as session:
        flagged = await session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .where(OutboxEvent.topic == "order.paid_twice", OutboxEvent.payload.contains(no))
        )
        assert flagged == 1


async def test_database_down_answers_failure_quickly(server: Server) -> None:
    import time

    from mallgate.settings import Settings

    dead = {
        "sqlite": "sqlite+aiosqlite:////nonexistent-dir/x/y.db",
        "postgresql": "postgresql+asyncpg://postgres@127.0.0.1:1/test",
        "mysql": "mysql+asyncmy://root@127.0.0.1:1/test",
    }[server.backend.name]
    settings = Settings(_env_file=None, database_url=dead)  # type: ignore[call-arg]
    rt = Runtime.create(settings, server.clock)
    try:
        started = time.perf_counter()
        result = await receive(rt, raw(), lambda _r: pay("X", "1.00"))
        assert time.perf_counter() - started < 2.0
        assert (result.accepted, result.outcome) == (False, "error")
    finally:
        await rt.close()
