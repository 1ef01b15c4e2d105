"""Refunds and closes the mall starts (POST /admin/orders/{no}/refund|close), and second payments
refunded automatically, against the stand-ins over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from test_cli_payments import cli
from test_sandbox_payments import service_payments

from conftest import Server, other_server
from mallgate.sandbox.trades import Trade
from support import ADMIN, admin_create_order, admin_get_order, unique


async def sandbox(client: httpx.AsyncClient, **call: Any) -> dict[str, Any]:
    answer = (await client.post("/_sandbox/pay", json=call)).json()
    assert answer["status"] == 1, answer
    data: dict[str, Any] = answer["data"]
    return data


async def paid_order(client: httpx.AsyncClient, channel: str, amount: str, version: str = "v3") -> str:
    no = (await admin_create_order(client, amount=amount))["order_no"]
    extra = {"wechat_version": version} if channel == "wechat" else {}
    paid = await sandbox(client, channel=channel, order_no=no, amount=amount, **extra)
    assert paid["delivered"] is True, paid
    assert (await admin_get_order(client, no))["status"] == "paid"
    return no


async def refund(
    client: httpx.AsyncClient, no: str, amount: Any, key: str | None, **extra: Any
) -> dict[str, Any]:
    body = {"amount": amount, **({"idempotency_key": key} if key is not None else {}), **extra}
    answer: dict[str, Any] = (
        await client.post(f"/admin/orders/{no}/refund", json=body, headers=ADMIN)
    ).json()
    return answer


async def requests_of(client: httpx.AsyncClient, no: str) -> list[dict[str, Any]]:
    answer = (await client.get(f"/admin/orders/{no}/refunds", headers=ADMIN)).json()
    assert answer["status"] == 1, answer
    rows: list[dict[str, Any]] = answer["data"]
    return rows


def trade_at(server: Server, channel: str, no: str) -> Trade:
    trade = service_payments(server).book.get(channel, no)  # type: ignore[arg-type]
    assert trade is not None
    return trade


@pytest.mark.parametrize("channel", ["alipay", "wechat"])
async def test_partial_then_full_refund_once_per_key(
    client: httpx.AsyncClient, server: Server, channel: str
) -> None:
    no = await paid_order(client, channel, "10.00")
    first = await refund(client, no, "3.00", "k-" + no, reason="缺货")
    assert first["status"] == 1, first
    assert (first["data"]["status"], first["data"]["amount"], first["data"]["channel"]) == (
        "succeeded",
        "3.00",
        channel,
    )
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("partially_refunded", "3.00")

    # The same key again, even concurrently: the same request, no second call to the platform.
    again = await asyncio.gather(*(refund(client, no, "3.00", "k-" + no) for _ in range(10)))
    assert {a["data"]["request_no"] for a in again} == {first["data"]["request_no"]}
    assert len(trade_at(server, channel, no).refunds) == 1
    assert (await admin_get_order(client, no))["refunded_amount"] == "3.00"
    reused = await refund(client, no, "2.00", "k-" + no)
    assert (reused["status"], reused["code"]) == (0, "refund.key_reused")

    # More than what remains: refused before any call, nothing stored.
    over = await refund(client, no, "7.01", "over-" + no)
    assert (over["status"], over["code"], over["remaining"]) == (0, "refund.exceeds_remaining", "7.00")
    assert over["info"] and len(trade_at(server, channel, no).refunds) == 1
    assert len(await requests_of(client, no)) == 1

    rest = await refund(client, no, "7.00", "rest-" + no)
    assert rest["data"]["status"] == "succeeded", rest
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("refunded", "10.00")
    nothing = await refund(client, no, "0.01", "more-" + no)
    assert (nothing["status"], nothing["code"]) == (0, "refund.nothing_left")
    assert [r["status"] for r in await requests_of(client, no)] == ["succeeded", "succeeded"]


async def test_a_wechat_refund_is_completed_by_its_notice(client: httpx.AsyncClient, server: Server) -> None:
    no = await paid_order(client, "wechat", "8.00")
    answer = await refund(client, no, "8.00", "n-" + no)
    assert answer["data"]["status"] == "succeeded", answer
    stored = (await client.get("/admin/notifications", params={"order_no": no}, headers=ADMIN)).json()["data"]
    # The v3 REFUND.SUCCESS notice (a POST, verified) is what recorded it, not our own call.
    refunds = [n for n in stored if n["reason"].startswith("refunded")]
    assert len(refunds) == 1 and refunds[0]["verified"] is True and refunds[0]["outcome"] == "applied"
    trade = trade_at(server, "wechat", no)
    (request_no,) = trade.refunds
    assert request_no == answer["data"]["request_no"]
    assert answer["data"]["refund_id"] == trade.refunds[request_no][0]


async def test_wechat_v2_refund_through_secapi(server: Server) -> None:
    async with other_server(server, wechat_pay={"api_version": "v2"}) as client:
        no = await paid_order(client, "wechat", "6.00", version="v2")
        answer = await refund(client, no, "2.50", "v2-" + no)
        assert answer["data"]["status"] == "succeeded", answer
        state = await admin_get_order(client, no)
        assert (state["status"], state["refunded_amount"]) == ("partially_refunded", "2.50")
        # pay/closeorder: an unpaid order closes; one paid at WeChat Pay (notice lost) is refused.
        unpaid = (await admin_create_order(client, amount="1.00"))["order_no"]
        closed = (await client.post(f"/admin/orders/{unpaid}/close", headers=ADMIN)).json()
        assert closed["data"]["status"] == "closed", closed
        lost = (await admin_create_order(client, amount="1.00"))["order_no"]
        await sandbox(client, channel="wechat", order_no=lost, amount="1.00", notify=False)
        refused = (await client.post(f"/admin/orders/{lost}/close", headers=ADMIN)).json()
        assert (refused["code"], refused["channel"]) == ("order.close_refused", "wechat")


@pytest.mark.parametrize("channel", ["alipay", "wechat"])
async def test_a_refused_refund_refunds_nothing(
    client: httpx.AsyncClient, server: Server, channel: str
) -> None:
    no = await paid_order(client, channel, "5.00")
    await sandbox(client, channel=channel, order_no=no, kind="fail_next_refund")
    refused = await refund(client, no, "5.00", "f-" + no)
    assert (refused["status"], refused["code"]) == (0, "refund.refused") and refused["info"]
    assert refused["refund"]["status"] == "failed"
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("paid", "0.00")
    assert trade_at(server, channel, no).refunds == {}
    # The failed request holds nothing back: the whole amount can be asked for again, under a new key.
    retried = await refund(client, no, "5.00", "f2-" + no)
    assert retried["data"]["status"] == "succeeded", retried
    assert (await admin_get_order(client, no))["status"] == "refunded"


async def test_bad_refunds_call_nothing_and_store_nothing(client: httpx.AsyncClient, server: Server) -> None:
    no = await paid_order(client, "alipay", "4.00")
    for amount in ("1.234", "0", "0.00", "-1", 1.5, "abc"):
        answer = await refund(client, no, amount, unique("bad"))
        assert (answer["status"], answer["code"], answer["field"]) == (0, "param.invalid", "amount"), amount
    missing = await refund(client, no, "1.00", None)
    assert (missing["code"], missing["field"]) == ("param.missing", "idempotency_key")
    ghost = await refund(client, unique("NO"), "1.00", unique("k"))
    assert ghost["code"] == "order.not_found"
    unpaid = (await admin_create_order(client, amount="4.00"))["order_no"]
    not_paid = await refund(client, unpaid, "1.00", unique("k"))
    assert (not_paid["code"], not_paid["order_status"]) == ("refund.not_paid", "unpaid") and not_paid["info"]
    assert await requests_of(client, no) == [] and await requests_of(client, unpaid) == []
    assert trade_at(server, "alipay", no).refunds == {}


async def test_reconcile_settles_a_refund_left_pending(client: httpx.AsyncClient, server: Server) -> None:
    no = await paid_order(client, "wechat", "9.00")
    await sandbox(client, channel="wechat", order_no=no, kind="silence_next_refund")
    answer = await refund(client, no, "4.00", "p-" + no)
    # Accepted, PROCESSING, no notice: counted against what remains, not yet as refunded.
    assert answer["data"]["status"] == "pending", answer
    assert (await admin_get_order(client, no))["refunded_amount"] == "0.00"
    over = await refund(client, no, "5.01", "p2-" + no)
    assert (over["code"], over["remaining"]) == ("refund.exceeds_remaining", "5.00")

    result = await cli(server, "reconcile", "--older-than", "10m")
    assert f"{no} wechat: refund {answer['data']['request_no']} pending -> succeeded" in result.output, (
        result.output
    )
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("partially_refunded", "4.00")


async def test_close_confirmed_by_the_platforms(client: httpx.AsyncClient, server: Server) -> None:
    no = (await admin_create_order(client, amount="3.00"))["order_no"]
    answer = (await client.post(f"/admin/orders/{no}/close", headers=ADMIN)).json()
    assert answer["status"] == 1, answer
    assert answer["data"]["status"] == "closed" and set(answer["data"]["platforms"]) == {"alipay", "wechat"}
    assert (await admin_get_order(client, no))["status"] == "closed"
    again = (await client.post(f"/admin/orders/{no}/close", headers=ADMIN)).json()
    assert (again["status"], again["data"]["status"]) == (1, "closed")


async def test_close_refused_when_already_paid(client: httpx.AsyncClient, server: Server) -> None:
    # Paid at WeChat Pay, the notice not in yet: WeChat refuses the close, the order stays unpaid.
    no = (await admin_create_order(client, amount="3.00"))["order_no"]
    await sandbox(client, channel="wechat", order_no=no, amount="3.00", notify=False, wechat_version="v3")
    refused = (await client.post(f"/admin/orders/{no}/close", headers=ADMIN)).json()
    assert (refused["status"], refused["code"], refused["channel"]) == (0, "order.close_refused", "wechat")
    assert (await admin_get_order(client, no))["status"] == "unpaid"
    # Paid here too: refused before any call.
    paid = await paid_order(client, "alipay", "2.00")
    answer = (await client.post(f"/admin/orders/{paid}/close", headers=ADMIN)).json()
    assert (answer["code"], answer["order_status"]) == ("order.not_closable", "paid")
    ghost = (await client.post(f"/admin/orders/{unique('NO')}/close", headers=ADMIN)).json()
    assert ghost["code"] == "order.not_found"


async def wait_for(check: Any, tries: int = 300) -> None:
    """The automatic refund runs beside the notice's answer: wait (bounded) for it to finish."""
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not settled in time")


async def sweeps_done(server: Server) -> None:
    """Wait for the service's sweep of second payments (started by the notices) to finish."""
    sweeper = server.app.state.runtime.services.get("duplicate_refunds")

    async def idle() -> bool:
        return sweeper is None or sweeper.task is None or sweeper.task.done()

    await wait_for(idle)


async def test_a_second_payment_is_refunded_once_under_twenty_redeliveries(
    client: httpx.AsyncClient, server: Server
) -> None:
    no = await paid_order(client, "alipay", "7.00")
    # Paid again at WeChat Pay, its notice delivered 21 times at once.
    second = await sandbox(
        client, channel="wechat", order_no=no, amount="7.00", wechat_version="v3", duplicates=20
    )
    assert len(second["deliveries"]) == 21 and all(d["delivered"] for d in second["deliveries"]), second

    async def refunded() -> bool:
        rows = await requests_of(client, no)
        return bool(rows) and all(r["status"] == "succeeded" for r in rows)

    await wait_for(refunded)
    rows = await requests_of(client, no)
    trade = trade_at(server, "wechat", no)
    assert [(r["channel"], r["trade_no"], r["amount"], r["idempotency_key"]) for r in rows] == [
        ("wechat", trade.trade_no, "7.00", f"duplicate:wechat:{trade.trade_no}")
    ]
    assert len(trade.refunds) == 1 and trade.refunded == trade.amount  # one platform call, all of it
    state = await admin_get_order(client, no)
    # The order's own payment (Alipay) is untouched.
    assert (state["status"], state["channel"], state["refunded_amount"]) == ("paid", "alipay", "0.00")
    # More redeliveries later change nothing.
    await sandbox(client, channel="wechat", order_no=no, wechat_version="v3", duplicates=5)
    await sweeps_done(server)
    assert len(await requests_of(client, no)) == 1 and len(trade.refunds) == 1


async def test_no_automatic_refund_when_turned_off(server: Server) -> None:
    async with other_server(server, auto_refund_duplicates=False) as client:
        no = await paid_order(client, "alipay", "2.00")
        await sandbox(client, channel="wechat", order_no=no, amount="2.00", wechat_version="v3")
        await asyncio.sleep(0.3)
        assert await requests_of(client, no) == []


@pytest.mark.parametrize("channel", ["alipay", "wechat"])
async def test_concurrent_refunds_never_ask_for_more_than_was_paid(
    client: httpx.AsyncClient, server: Server, channel: str
) -> None:
    no = await paid_order(client, channel, "10.00")
    answers = await asyncio.gather(*(refund(client, no, "3.00", f"c{i}-{no}") for i in range(5)))
    assert sorted(a.get("code", "ok") for a in answers) == ["ok"] * 3 + ["refund.exceeds_remaining"] * 2
    # The two refused ones were refused here, before any call: the platform saw three.
    assert len(trade_at(server, channel, no).refunds) == 3
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("partially_refunded", "9.00")
