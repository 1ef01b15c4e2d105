"""Money rules of issue 7: refunds before payments, second payments once, wallet debits, duplicate refunds.

Signed notices go over HTTP into the real app; the races use several runtimes (each with its
own group commit, so their batches are concurrent transactions) on the same database.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from test_notify_alipay import audit, effective, post, signed
from test_notify_wechat import post_v2, post_v3, refund_resource, transaction, v2_payment, v3_notice
from test_notify_wechat import v2_refund as wechat_v2_refund

from conftest import Server
from mallgate.channels import wechat_pay
from mallgate.db.models import DuplicatePayment, OutboxEvent, User, WalletEntry
from mallgate.runtime import Runtime
from mallgate.services.notifications import RawNotification, receive
from mallgate.services.orders import PaymentEvent
from support import admin_create_order, admin_create_user, admin_get_order, admin_get_user, unique

# ---------------------------------------------------------------------------------------------
# notices: a payment and a refund of the same trade, per channel, and whether each was accepted


def alipay_trade_no() -> str:
    return "2024052022001" + secrets.token_hex(6)


def wechat_trade_no() -> str:
    return "4200" + secrets.token_hex(12)


def alipay_refund(server: Server, order_no: str, amount: str, trade_no: str, total: str) -> dict[str, str]:
    """Alipay's refund notice: refund_fee is the trade's running total; a full refund closes it."""
    return signed(
        server,
        order_no,
        amount,
        trade_no=trade_no,
        trade_status="TRADE_CLOSED" if Decimal(total) == Decimal(amount) else "TRADE_SUCCESS",
        refund_fee=total,
        gmt_refund="2024-05-21 09:00:00.123",
        out_biz_no=unique("RB"),
    )


def v2_refund(
    server: Server, order_no: str, trade_no: str, refund_id: str, refund_fee: int, total: int
) -> bytes:
    return wechat_v2_refund(server, order_no, refund_id, refund_fee, total, trade_no=trade_no)


Send = Callable[[], Awaitable[bool]]


def fen(amount: str) -> int:
    return int(Decimal(amount) * 100)


def payment_of(
    client: httpx.AsyncClient, server: Server, channel: str, order_no: str, amount: str, trade_no: str
) -> Send:
    """A coroutine factory posting one signed payment notice; True when the service accepted it."""

    async def send() -> bool:
        if channel == "alipay":
            return (
                await post(client, server, signed(server, order_no, amount, trade_no=trade_no)) == "success"
            )
        if channel == "wechat_v2":
            body = wechat_pay.to_xml(v2_payment(server, order_no, fen(amount), transaction_id=trade_no))
            return await post_v2(client, server, body) == "SUCCESS"
        resource = {**transaction(effective(server), order_no, fen(amount)), "transaction_id": trade_no}
        return await post_v3(client, server, v3_notice(server, "TRANSACTION.SUCCESS", resource)) == 204

    return send


def refund_of(
    client: httpx.AsyncClient,
    server: Server,
    channel: str,
    order_no: str,
    amount: str,
    trade_no: str,
    refund: str,
    refund_id: str = "",
) -> Send:
    """A refund notice of `refund` yuan (Alipay: the running total; WeChat: this refund alone)."""
    refund_id = refund_id or "5030" + secrets.token_hex(12)

    async def send() -> bool:
        if channel == "alipay":
            form = alipay_refund(server, order_no, amount, trade_no, refund)
            return await post(client, server, form) == "success"
        if channel == "wechat_v2":
            body = v2_refund(server, order_no, trade_no, refund_id, fen(refund), fen(amount))
            return await post_v2(client, server, body) == "SUCCESS"
        resource = {
            **refund_resource(effective(server), order_no, refund_id, fen(refund), fen(amount)),
            "transaction_id": trade_no,
        }
        return await post_v3(client, server, v3_notice(server, "REFUND.SUCCESS", resource)) == 204

    return send


def trade_no_for(channel: str) -> str:
    return alipay_trade_no() if channel == "alipay" else wechat_trade_no()


# ---------------------------------------------------------------------------------------------
# database reads


async def topic_payloads(server: Server, topic: str, order_no: str) -> list[dict[str, Any]]:
    async with server.app.state.runtime.db.read() as session:
        rows = await session.scalars(
            select(OutboxEvent.payload).where(OutboxEvent.topic == topic).order_by(OutboxEvent.id)
        )
        payloads = [json.loads(p) for p in rows]
    return [p for p in payloads if p.get("order_no") == order_no]


async def duplicates_of(server: Server, order_no: str) -> list[tuple[str, str, Decimal, Decimal]]:
    async with server.app.state.runtime.db.read() as session:
        rows = await session.execute(
            select(
                DuplicatePayment.channel,
                DuplicatePayment.trade_no,
                DuplicatePayment.amount,
                DuplicatePayment.refunded_amount,
            )
            .where(DuplicatePayment.order_no == order_no)
            .order_by(DuplicatePayment.id)
        )
        return [(c, t, a, r) for c, t, a, r in rows.all()]


async def ledger_of(server: Server, order_no: str) -> list[tuple[str, Decimal]]:
    async with server.app.state.runtime.db.read() as session:
        rows = await session.execute(
            select(WalletEntry.entry_key, WalletEntry.amount)
            .where(WalletEntry.order_no == order_no)
            .order_by(WalletEntry.id)
        )
        return [(k, a) for k, a in rows.all()]


async def set_balance(server: Server, user_id: str, balance: str) -> None:
    """Stands in for spending: there is no spend API yet."""
    async with server.app.state.runtime.db.transaction() as session:
        await session.execute(update(User).where(User.id == int(user_id)).values(balance=Decimal(balance)))


async def recharge(client: httpx.AsyncClient, amount: str) -> tuple[dict[str, Any], dict[str, Any]]:
    user = await admin_create_user(client)
    order = await admin_create_order(client, amount=amount, kind="recharge", user_id=int(user["id"]))
    return user, order


# ---------------------------------------------------------------------------------------------
# item 2: a refund that arrives before its payment


@pytest.mark.parametrize("channel", ["alipay", "wechat_v2", "wechat_v3"])
async def test_refund_before_payment_is_refused_then_applied_after_it(
    client: httpx.AsyncClient, server: Server, channel: str
) -> None:
    user, order = await recharge(client, "100.00")
    no, trade_no = order["order_no"], trade_no_for(channel)
    refund = refund_of(client, server, channel, no, "100.00", trade_no, "100.00")
    # Platforms do not promise order: the refund is answered failure, so it comes again.
    assert await refund() is False
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("unpaid", "0.00")
    rows = await audit(client, no)
    assert [(r["verified"], r["outcome"]) for r in rows] == [(True, "rejected")]
    assert "before" in rows[0]["reason"]

    assert await payment_of(client, server, channel, no, "100.00", trade_no)() is True
    assert (await admin_get_user(client, user["id"]))["amount"] == "100.00"
    assert await refund() is True  # the platform's retry
    assert await refund() is True  # and a redelivery of it changes nothing
    state = await admin_get_order(client, no)
    assert (state["status"], state["paid_amount"], state["refunded_amount"]) == (
        "refunded",
        "100.00",
        "100.00",
    )
    assert (await admin_get_user(client, user["id"]))["amount"] == "0.00"
    assert [amount for _, amount in await ledger_of(server, no)] == [Decimal("100.00"), Decimal("-100.00")]


async def test_refund_of_a_closed_order_is_refused_too(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="7.00")
    no, trade_no = order["order_no"], alipay_trade_no()
    closed = signed(server, no, "7.00", trade_no=trade_no, trade_status="TRADE_CLOSED")
    assert await post(client, server, closed) == "success"
    refund = refund_of(client, server, "alipay", no, "7.00", trade_no, "7.00")
    assert await refund() is False  # the money may still arrive
    assert (await admin_get_order(client, no))["status"] == "closed"
    assert await payment_of(client, server, "alipay", no, "7.00", trade_no)() is True
    assert await refund() is True
    assert (await admin_get_order(client, no))["status"] == "refunded"


# ---------------------------------------------------------------------------------------------
# item 5: a second payment is recorded once, however often it is delivered


async def test_a_redelivered_second_payment_raises_one_event(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="5.00")
    no = order["order_no"]
    assert await payment_of(client, server, "alipay", no, "5.00", alipay_trade_no())() is True
    second = wechat_trade_no()
    body = wechat_pay.to_xml(v2_payment(server, no, 500, transaction_id=second))
    for _ in range(3):
        assert await post_v2(client, server, body) == "SUCCESS"
    answers = await asyncio.gather(*(post_v2(client, server, body) for _ in range(20)))
    assert answers == ["SUCCESS"] * 20
    assert [p["trade_no"] for p in await topic_payloads(server, "order.paid_twice", no)] == [second]
    assert await duplicates_of(server, no) == [("wechat", second, Decimal("5.00"), Decimal("0.00"))]
    # Another second trade is another debt: one more event.
    third = wechat_trade_no()
    assert await payment_of(client, server, "wechat_v3", no, "5.00", third)() is True
    assert [p["trade_no"] for p in await topic_payloads(server, "order.paid_twice", no)] == [second, third]
    state = await admin_get_order(client, no)
    assert (state["status"], state["channel"]) == ("paid", "alipay")


async def test_concurrent_transactions_record_a_second_payment_once(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="6.00")
    no = order["order_no"]
    assert await payment_of(client, server, "alipay", no, "6.00", alipay_trade_no())() is True
    event = PaymentEvent("wechat", no, "pay", trade_no=wechat_trade_no(), amount=Decimal("6.00"))
    raw = RawNotification(channel="wechat", method="POST", query_string="", body=b"x", source_ip="127.0.0.1")
    # Four runtimes: four group commits whose batches are concurrent transactions (two workers' worth).
    runtimes = [Runtime.create(server.settings, server.clock) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(receive(rt, raw, lambda _r: event) for rt in runtimes for _ in range(5))
        )
    finally:
        for rt in runtimes:
            await rt.close()
    assert {(r.accepted, r.outcome) for r in results} == {(True, "duplicate")}, {r.reason for r in results}
    assert len(await topic_payloads(server, "order.paid_twice", no)) == 1
    assert len(await duplicates_of(server, no)) == 1


# ---------------------------------------------------------------------------------------------
# item 5: refunding a recharge takes the money back out of the wallet


async def test_refunding_a_recharge_debits_the_wallet_once(client: httpx.AsyncClient, server: Server) -> None:
    user, order = await recharge(client, "50.00")
    no, trade_no = order["order_no"], alipay_trade_no()
    assert await payment_of(client, server, "alipay", no, "50.00", trade_no)() is True
    await set_balance(server, user["id"], "10.00")  # most of it was spent
    partial = refund_of(client, server, "alipay", no, "50.00", trade_no, "30.00")
    assert await partial() is True
    assert await asyncio.gather(*(partial() for _ in range(5))) == [True] * 5
    assert (await admin_get_user(client, user["id"]))["amount"] == "-20.00"
    assert await refund_of(client, server, "alipay", no, "50.00", trade_no, "50.00")() is True
    assert (await admin_get_user(client, user["id"]))["amount"] == "-40.00"
    ledger = await ledger_of(server, no)
    assert [amount for _, amount in ledger] == [Decimal("50.00"), Decimal("-30.00"), Decimal("-20.00")]
    assert all(key.startswith("refund:alipay:") for key, _ in ledger[1:])
    debited = await topic_payloads(server, "wallet.debited", no)
    assert [(p["user_id"], p["amount"], p["balance_after"]) for p in debited] == [
        (int(user["id"]), "30.00", "-20.00"),
        (int(user["id"]), "20.00", "-40.00"),
    ]
    assert [p["balance"] for p in await topic_payloads(server, "wallet.negative", no)] == ["-20.00", "-40.00"]


async def test_wechat_refunds_of_a_recharge_debit_once_each(
    client: httpx.AsyncClient, server: Server
) -> None:
    user, order = await recharge(client, "30.00")
    no, trade_no = order["order_no"], wechat_trade_no()
    assert await payment_of(client, server, "wechat_v2", no, "30.00", trade_no)() is True
    first = refund_of(client, server, "wechat_v2", no, "30.00", trade_no, "10.00")
    assert await asyncio.gather(*(first() for _ in range(10))) == [True] * 10
    assert (await admin_get_user(client, user["id"]))["amount"] == "20.00"
    assert await refund_of(client, server, "wechat_v3", no, "30.00", trade_no, "20.00")() is True
    assert (await admin_get_user(client, user["id"]))["amount"] == "0.00"
    assert (await admin_get_order(client, no))["status"] == "refunded"
    assert [p["balance_after"] for p in await topic_payloads(server, "wallet.debited", no)] == [
        "20.00",
        "0.00",
    ]
    assert await topic_payloads(server, "wallet.negative", no) == []


# ---------------------------------------------------------------------------------------------
# item 6: a refund of the second payment, on its own channel


@pytest.mark.parametrize(("first", "second"), [("alipay", "wechat_v2"), ("wechat_v3", "alipay")])
async def test_refund_of_a_duplicate_payment_is_applied_to_it(
    client: httpx.AsyncClient, server: Server, first: str, second: str
) -> None:
    user, order = await recharge(client, "20.00")
    no, own, other = order["order_no"], trade_no_for(first), trade_no_for(second)
    assert await payment_of(client, server, first, no, "20.00", own)() is True
    refund = refund_of(client, server, second, no, "20.00", other, "20.00")
    # Its payment notice is not in yet: nothing to refund, so failure until it is.
    assert await refund() is False
    assert await payment_of(client, server, second, no, "20.00", other)() is True
    assert await refund() is True
    assert await refund() is True
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("paid", "0.00")
    channel = "alipay" if second == "alipay" else "wechat"
    assert await duplicates_of(server, no) == [(channel, other, Decimal("20.00"), Decimal("20.00"))]
    events = await topic_payloads(server, "order.duplicate_refunded", no)
    assert [(p["trade_no"], p["refunded_amount"]) for p in events] == [(other, "20.00")]
    # The duplicate never reached the wallet, so its refund takes nothing from it.
    assert (await admin_get_user(client, user["id"]))["amount"] == "20.00"
    # A refund naming a trade that is neither the order's nor a recorded duplicate is still refused.
    stranger = trade_no_for(second)
    assert await refund_of(client, server, second, no, "20.00", stranger, "1.00")() is False
    # The order's own trade is refunded as before.
    assert await refund_of(client, server, first, no, "20.00", own, "20.00")() is True
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("refunded", "20.00")
    assert (await admin_get_user(client, user["id"]))["amount"] == "0.00"
