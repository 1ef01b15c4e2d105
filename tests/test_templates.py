"""template, template/accept and the subscribe messages the outbox sends against the grants."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from test_payment_state import pay, raw
from test_spread import login, runtime_of, wxa

from conftest import Server, other_server
from mallgate.db.models import Identity, OutboxEvent, SubscribeGrant
from mallgate.runtime import Runtime
from mallgate.services import subscribe
from mallgate.services.accounts import WECHAT
from mallgate.services.notifications import receive
from mallgate.services.orders import PaymentEvent
from mallgate.services.outbox_worker import Event, FinalError, registered_senders
from mallgate.settings import Settings
from support import admin_create_order, unique

TEMPLATES = {
    "delivery_notice": "tmpl-delivery-0001",
    "order_complete": "tmpl-complete-0002",
    "order_pay_success": "tmpl-paid-0003",
    "refund_notice": "tmpl-refund-0004",
}


@pytest.fixture
async def templated(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    # Its outbox worker off: the test's own runtime below is what sends, so nothing races it.
    async with other_server(server, templates=TEMPLATES, outbox={"enabled": False}) as http:
        yield http


@pytest.fixture
async def sending(server: Server) -> AsyncIterator[Runtime]:
    """A runtime with the templates set and no worker running: the sender is called on it directly."""
    runtime = Runtime.create(with_templates(server), server.clock)
    yield runtime
    await runtime.close()


async def grants(server: Server, user_id: int) -> list[tuple[str, bool]]:
    async with runtime_of(server).db.read() as session:
        rows = await session.execute(
            select(SubscribeGrant.template_id, SubscribeGrant.used_at)
            .where(SubscribeGrant.user_id == user_id)
            .order_by(SubscribeGrant.id)
        )
        return [(t, used is not None) for t, used in rows.all()]


async def test_template_lists_the_four_ids(client: httpx.AsyncClient, templated: httpx.AsyncClient) -> None:
    for method in ("GET", "POST"):
        answer = (await templated.request(method, "/api/template")).json()
        assert answer == {"info": "ok", "status": 1, "data": TEMPLATES}
    unset = (await client.get("/api/template")).json()
    assert unset["data"] == dict.fromkeys(TEMPLATES, "")


async def test_accept_records_one_grant_per_accept(server: Server, templated: httpx.AsyncClient) -> None:
    token, user_id = await login(templated)
    result = {
        "errMsg": "requestSubscribeMessage:ok",
        TEMPLATES["order_pay_success"]: "accept",
        TEMPLATES["refund_notice"]: "reject",
    }
    # As a JSON object in `data`, as a JSON string, and wx.requestSubscribeMessage's result as is.
    first = (await templated.post("/api/template/accept", json={"token": token, "data": result})).json()
    assert first["status"] == 1, first
    assert first["data"]["accepted"] == [TEMPLATES["order_pay_success"]]
    await templated.post("/api/template/accept", data={"token": token, "data": json.dumps(result)})
    await templated.post(f"/api/template/accept?token={token}", json=result)
    assert await grants(server, user_id) == [(TEMPLATES["order_pay_success"], False)] * 3


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"tmpl-unknown": "accept"}, "template.unknown"),
        ({TEMPLATES["order_pay_success"]: "accept", "tmpl-unknown": "accept"}, "template.unknown"),
        ({TEMPLATES["order_pay_success"]: "yes"}, "template.invalid_answer"),
        (
            {TEMPLATES["order_pay_success"]: "accept", TEMPLATES["refund_notice"]: 1},
            "template.invalid_answer",
        ),
        ("not json", "template.invalid_map"),
        ("[1, 2]", "template.invalid_map"),
        ({}, "param.missing"),
    ],
)
async def test_a_bad_accept_map_stores_nothing(
    server: Server, templated: httpx.AsyncClient, data: Any, code: str
) -> None:
    token, user_id = await login(templated)
    answer = (await templated.post("/api/template/accept", json={"token": token, "data": data})).json()
    assert answer["status"] == 0 and answer["code"] == code and answer["info"], answer
    assert await grants(server, user_id) == []


async def test_accept_needs_a_token(templated: httpx.AsyncClient) -> None:
    body = {"data": {TEMPLATES["refund_notice"]: "accept"}}
    answer = (await templated.post("/api/template/accept", json=body)).json()
    assert answer["status"] == 0 and answer["code"] == "auth.required"


# --- the subscribe message, through the payment path -----------------------------------------


async def mini_buyer(server: Server, templated: httpx.AsyncClient) -> tuple[str, int, str]:
    token, user_id = await login(templated)
    openid = unique("o")
    runtime = runtime_of(server)
    async with runtime.db.transaction() as session:
        session.add(
            Identity(
                user_id=user_id,
                provider=WECHAT,
                app_id=runtime.settings.wechat_mini.app_id,
                openid=openid,
                created_at=runtime.clock.utcnow().replace(tzinfo=None),
            )
        )
    return token, user_id, openid


async def outbox_event(server: Server, topic: str, order_no: str) -> Event:
    async with runtime_of(server).db.read() as session:
        rows = (await session.execute(select(OutboxEvent).where(OutboxEvent.topic == topic))).scalars()
        row = next(r for r in rows if order_no in r.payload)
    return Event.from_row(row.id, row.topic, row.payload, row.created_at)


async def paid_event(server: Server, templated: httpx.AsyncClient, user_id: int, amount: str) -> Event:
    order = await admin_create_order(templated, amount=amount, user_id=str(user_id), subject="测试商品")
    applied = await receive(runtime_of(server), raw(), lambda _r: pay(order["order_no"], amount))
    assert applied.accepted
    return await outbox_event(server, "order.paid", order["order_no"])


def with_templates(server: Server) -> Settings:
    settings = runtime_of(server).settings
    return settings.model_copy(update={"templates": settings.templates.model_copy(update=TEMPLATES)})


async def test_paying_an_order_sends_one_subscribe_message(
    server: Server, templated: httpx.AsyncClient, sending: Runtime
) -> None:
    token, user_id, openid = await mini_buyer(server, templated)
    accept = {TEMPLATES["order_pay_success"]: "accept"}
    await templated.post("/api/template/accept", json={"token": token, "data": accept})
    event = await paid_event(server, templated, user_id, "12.50")
    assert subscribe.SENDER in registered_senders() and subscribe.SENDER.wants(event)
    await subscribe.SENDER.send(sending, event)
    sent = wxa(server).book.sent(openid)
    assert len(sent) == 1 and sent[0].errcode == 0
    message = sent[0]
    assert message.template_id == TEMPLATES["order_pay_success"]
    assert set(message.data) == {"character_string1", "amount2", "time3"}
    assert message.data["character_string1"]["value"] == event.payload["order_no"]
    assert message.data["amount2"]["value"] == "¥12.50"
    assert len(message.data["time3"]["value"]) == 16  # YYYY-MM-DD HH:MM
    assert await grants(server, user_id) == [(TEMPLATES["order_pay_success"], True)]
    # The grant is spent: the same event again is refused before any call.
    with pytest.raises(FinalError, match="no unused grant"):
        await subscribe.SENDER.send(sending, event)
    assert len(wxa(server).book.sent(openid)) == 1


async def test_a_user_who_refused_at_wechat_ends_the_delivery(
    server: Server, templated: httpx.AsyncClient, sending: Runtime
) -> None:
    token, user_id, openid = await mini_buyer(server, templated)
    accept = {TEMPLATES["order_pay_success"]: "accept"}
    await templated.post("/api/template/accept", json={"token": token, "data": accept})
    event = await paid_event(server, templated, user_id, "3.00")
    wxa(server).book.set_consent(openid, False)
    with pytest.raises(FinalError, match="43101"):
        await subscribe.SENDER.send(sending, event)
    assert [s.errcode for s in wxa(server).book.sent(openid)] == [43101]


def test_message_data_follows_the_mapping_setting(server: Server) -> None:
    from datetime import datetime

    from mallgate.db.models import Order

    mapping = {"order_pay_success": {"thing1": "subject", "amount9": "amount"}}
    settings = with_templates(server).model_copy(
        update={"subscribe": server.settings.subscribe.model_copy(update={"data": mapping})}
    )
    paid_at = datetime(2026, 1, 2, 3, 4)
    order = Order(
        order_no="N1", subject="好东西", amount=Decimal("5"), refunded_amount=Decimal(0), paid_at=paid_at
    )
    event = Event(1, "order.paid", {"order_no": "N1", "amount": "5.00"}, datetime(2026, 1, 2, 3, 4))
    values = subscribe.message_values(settings, event, order)
    assert subscribe.build_data(settings, "order_pay_success", values) == {
        "thing1": "好东西",
        "amount9": "¥5.00",
    }
    assert values["paid_at"] == "2026-01-02 11:04"  # Asia/Shanghai


async def test_a_refund_sends_the_refund_notice(
    server: Server, templated: httpx.AsyncClient, sending: Runtime
) -> None:
    token, user_id, openid = await mini_buyer(server, templated)
    accept = {TEMPLATES["refund_notice"]: "accept"}
    await templated.post("/api/template/accept", json={"token": token, "data": accept})
    paid = await paid_event(server, templated, user_id, "20.00")
    order_no = paid.payload["order_no"]
    refund = PaymentEvent(
        channel="alipay",
        order_no=order_no,
        action="refund",
        trade_no=paid.payload["trade_no"],
        refund_total=Decimal("7.50"),
    )
    assert (await receive(runtime_of(server), raw(), lambda _r: refund)).accepted
    event = await outbox_event(server, "order.refunded", order_no)
    # No grant of order_pay_success: the paid event's message is refused before any call.
    with pytest.raises(FinalError, match="no unused grant"):
        await subscribe.SENDER.send(sending, paid)
    await subscribe.SENDER.send(sending, event)
    [message] = wxa(server).book.sent(openid)
    assert message.template_id == TEMPLATES["refund_notice"]
    assert message.data["character_string1"] == {"value": order_no}
    assert message.data["amount2"] == {"value": "¥7.50"}


async def test_the_stand_in_checks_the_token_and_the_console_sets_consent(
    server: Server, client: httpx.AsyncClient
) -> None:
    body = {"touser": "o-nobody", "template_id": "t", "data": {"thing1": {"value": "x"}}}
    refused = await client.post(
        "/_sandbox/wechat/cgi-bin/message/subscribe/send?access_token=forged", json=body
    )
    assert refused.json()["errcode"] == 40001
    openid = unique("o")
    form = await client.post(
        "/_sandbox/wechat/_test/subscribe/consent",
        data={"openid": openid, "consent": "0"},
        follow_redirects=False,
    )
    assert form.status_code == 303 and form.headers["location"].startswith("/_sandbox/")
    assert openid in wxa(server).book.refusing()
    console = (await client.get("/_sandbox/")).text
    assert openid in console and 'action="./wechat/_test/subscribe/consent"' in console
    await client.post("/_sandbox/wechat/_test/subscribe/consent", json={"openid": openid, "consent": True})
    assert openid not in wxa(server).book.refusing()
