"""pay/notify (Alipay) end to end: signed notifications over HTTP into the real app and database."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy import delete, func, select

from conftest import Server, other_server
from mallgate.channels import alipay
from mallgate.db.models import PaymentNotification
from mallgate.sandbox.keys import SandboxKeys
from mallgate.settings import AlipaySettings, Settings
from support import ADMIN, admin_create_order, admin_create_user, admin_get_order, admin_get_user, unique

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def keys_of(server: Server) -> SandboxKeys:
    return SandboxKeys.load_or_create(server.settings.var_dir / "sandbox")


def effective(server: Server) -> Settings:
    settings: Settings = server.app.state.runtime.settings
    return settings


def fields(settings: Settings, order_no: str, amount: str, **extra: str) -> dict[str, str]:
    base = {
        "notify_time": "2024-05-20 10:15:09",
        "notify_type": "trade_status_sync",
        "notify_id": unique("N"),
        "app_id": settings.alipay.app_id,
        "auth_app_id": settings.alipay.app_id,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": "2024052022001" + unique("")[:12],
        "out_trade_no": order_no,
        "trade_status": "TRADE_SUCCESS",
        "total_amount": amount,
        "receipt_amount": amount,
        "seller_id": settings.alipay.seller_id,
        "buyer_id": "2088102177846880",
        "subject": "测试订单",
        "gmt_payment": "2024-05-20 10:15:08",
        "fund_bill_list": json.dumps([{"amount": amount, "fundChannel": "ALIPAYACCOUNT"}]),
    }
    return {**base, **extra}


def signed(
    server: Server, order_no: str, amount: str, sign_type: alipay.SignType = "RSA2", **extra: str
) -> dict[str, str]:
    return alipay.sign_notification(
        fields(effective(server), order_no, amount, **extra),
        keys_of(server).alipay_platform_private,
        sign_type,
    )


def path(server: Server) -> str:
    return effective(server).base_path + "/pay/notify"


async def post(
    client: httpx.AsyncClient, server: Server, form: dict[str, str], encoding: str = "utf-8"
) -> str:
    response = await client.post(path(server), content=urlencode(form, encoding=encoding), headers=FORM)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def audit(client: httpx.AsyncClient, order_no: str) -> list[dict[str, Any]]:
    payload = (await client.get("/admin/notifications", params={"order_no": order_no}, headers=ADMIN)).json()
    assert payload["status"] == 1
    rows: list[dict[str, Any]] = payload["data"]
    return rows


async def last_id(server: Server) -> int:
    async with server.app.state.runtime.db.read() as session:
        return int(await session.scalar(select(func.max(PaymentNotification.id))) or 0)


async def stored_since(server: Server, mark: int) -> list[tuple[bool, str, str]]:
    """(verified, outcome, reason) of every notice stored after `mark`, oldest first.

    Notices refused before verification carry no trusted order number, so they are
    found by id rather than through /admin/notifications?order_no=.
    """
    async with server.app.state.runtime.db.read() as session:
        rows = await session.scalars(
            select(PaymentNotification).where(PaymentNotification.id > mark).order_by(PaymentNotification.id)
        )
        return [(r.verified, r.outcome, r.reason) for r in rows]


async def test_valid_rsa2_notification_pays_once(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="88.00")
    form = signed(server, order["order_no"], "88.00")
    assert await post(client, server, form) == "success"
    paid = await admin_get_order(client, order["order_no"])
    assert (paid["status"], paid["channel"], paid["trade_no"], paid["paid_amount"]) == (
        "paid",
        "alipay",
        form["trade_no"],
        "88.00",
    )
    for _ in range(3):
        assert await post(client, server, form) == "success"  # Alipay resends until it hears success
    assert await admin_get_order(client, order["order_no"]) == paid
    rows = await audit(client, order["order_no"])
    # The same bytes again are counted on the notice's row, not stored again.
    assert [(r["channel"], r["verified"], r["outcome"], r["repeats"]) for r in rows] == [
        ("alipay", True, "applied", 3)
    ]
    assert rows[0]["last_repeat_at"] is not None
    # A distinct notice of the same payment (another notify_id) is a row of its own.
    other = signed(server, order["order_no"], "88.00", trade_no=form["trade_no"], notify_id="another-notice")
    assert await post(client, server, other) == "success"
    rows = await audit(client, order["order_no"])
    assert [(r["outcome"], r["repeats"]) for r in rows] == [("applied", 3), ("duplicate", 0)]


async def test_a_repeat_is_counted_by_any_worker_and_stored_again_once_its_row_is_gone(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="9.00")
    form = signed(server, order["order_no"], "9.00")
    assert await post(client, server, form) == "success"
    runtime = server.app.state.runtime
    # A worker that never saw the notice accepted: the repeat goes the full way, and the
    # transaction counts it on the stored row instead of storing the same bytes again.
    runtime.services.pop("notifications.accepted", None)
    assert await post(client, server, form) == "success"
    assert [(r["outcome"], r["repeats"]) for r in await audit(client, order["order_no"])] == [("applied", 1)]
    # Its row pruned, a repeat is stored again in full (and still changes nothing).
    gone = delete(PaymentNotification).where(PaymentNotification.order_no == order["order_no"])
    async with runtime.db.transaction() as session:
        await session.execute(gone)
    assert await post(client, server, form) == "success"
    assert await post(client, server, form) == "success"
    rows = await audit(client, order["order_no"])
    assert [(r["outcome"], r["repeats"]) for r in rows] == [("duplicate", 1)]
    assert (await admin_get_order(client, order["order_no"]))["paid_amount"] == "9.00"


async def test_amount_written_without_decimals_still_matches(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="20.00")
    assert await post(client, server, signed(server, order["order_no"], "20")) == "success"
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"


async def test_tampered_amount_is_refused_and_kept(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="0.01")
    form = signed(server, order["order_no"], "100.00")
    form["total_amount"] = "0.01"  # the attacker's edit after signing
    mark = await last_id(server)
    assert await post(client, server, form) == "failure"
    assert (await admin_get_order(client, order["order_no"]))["status"] == "unpaid"
    assert await stored_since(server, mark) == [(False, "rejected", "NotAuthentic: bad signature")]


async def test_tampering_with_any_field_breaks_the_signature(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="3.00")
    original = signed(server, order["order_no"], "3.00")
    edits: list[dict[str, str]] = [
        {"subject": "别的"},
        {"buyer_id": "2088000000000002"},
        {"gmt_payment": "2024-05-20 10:15:07"},
        {"trade_no": original["trade_no"] + "1"},
        {"passback_params": "extra"},  # a field added in transit
        {"sign": original["sign"][:-8] + "AAAAAAA="},
    ]
    mark = await last_id(server)
    for edit in edits:
        assert await post(client, server, {**original, **edit}) == "failure", edit
    assert [r[:2] for r in await stored_since(server, mark)] == [(False, "rejected")] * len(edits)
    assert (await admin_get_order(client, order["order_no"]))["status"] == "unpaid"
    assert await post(client, server, original) == "success"  # the untouched one still works


async def test_wrong_app_seller_unknown_order_and_amount_change_nothing(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="12.34")
    no = order["order_no"]
    cases = {
        "ForeignNotification": signed(server, no, "12.34", app_id="2021000000009999"),
        "seller": signed(server, no, "12.34", seller_id="2088000000009999"),
        "amount mismatch": signed(server, no, "12.35"),
    }
    mark = await last_id(server)
    for form in cases.values():
        assert await post(client, server, form) == "failure"
    assert (await admin_get_order(client, no))["status"] == "unpaid"
    reasons = [r[2] for r in await stored_since(server, mark)]
    assert reasons[0] == "ForeignNotification: notification for another app_id"
    assert reasons[1] == "ForeignNotification: notification for another seller_id"
    rows = await audit(client, no)
    # Refused ones are filed under the order they claim (unverified); the wrong amount is authentic.
    assert [(r["verified"], r["outcome"]) for r in rows] == [
        (False, "rejected"),
        (False, "rejected"),
        (True, "rejected"),
    ]
    assert rows[2]["reason"].startswith("amount mismatch: notified 12.35, order 12.34")

    ghost = unique("GHOST")
    assert await post(client, server, signed(server, ghost, "1.00")) == "failure"
    assert [(r["verified"], r["outcome"], r["reason"]) for r in await audit(client, ghost)] == [
        (True, "rejected", "unknown order")
    ]


async def test_missing_sign_and_downgrade_are_refused(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="5.00")
    no = order["order_no"]
    mark = await last_id(server)
    unsigned = {k: v for k, v in signed(server, no, "5.00").items() if k != "sign"}
    assert await post(client, server, unsigned) == "failure"
    # A genuine SHA-1 signature by Alipay's own key: refused, because we are configured for RSA2.
    downgraded = signed(server, no, "5.00", sign_type="RSA")
    assert await post(client, server, downgraded) == "failure"
    # Claiming RSA2 over a SHA-1 signature fails the SHA-256 check.
    assert await post(client, server, {**downgraded, "sign_type": "RSA2"}) == "failure"
    assert (await admin_get_order(client, no))["status"] == "unpaid"
    assert [r[2] for r in await stored_since(server, mark)] == [
        "NotAuthentic: missing sign",
        "NotAuthentic: sign_type 'RSA' differs from the configured RSA2",
        "NotAuthentic: bad signature",
    ]


async def test_get_notification_and_gbk_charset(client: httpx.AsyncClient, server: Server) -> None:
    by_get = await admin_create_order(client, amount="1.50")
    form = signed(server, by_get["order_no"], "1.50")
    response = await client.get(path(server) + "?" + urlencode(form))
    assert (response.status_code, response.text) == (200, "success")
    assert (await admin_get_order(client, by_get["order_no"]))["status"] == "paid"

    gbk = await admin_create_order(client, amount="2.50")
    form = signed(server, gbk["order_no"], "2.50", charset="gbk", subject="中文商品·测试", body="苹果")
    assert await post(client, server, form, encoding="gbk") == "success"
    assert (await admin_get_order(client, gbk["order_no"]))["status"] == "paid"
    # The same GBK notice read as UTF-8 would not be what was signed.
    assert await post(client, server, {**form, "charset": "utf-8"}, encoding="gbk") == "failure"


async def test_refund_close_and_waiting_notices(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="50.00")
    no = order["order_no"]
    paid = signed(server, no, "50.00")
    assert await post(client, server, paid) == "success"
    partial = signed(
        server,
        no,
        "50.00",
        trade_no=paid["trade_no"],
        refund_fee="20.00",
        gmt_refund="2024-05-21 09:00:00.123",
        out_biz_no="R1",
    )
    assert await post(client, server, partial) == "success"
    assert await post(client, server, partial) == "success"  # cumulative: counted once
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("partially_refunded", "20.00")
    full = signed(
        server,
        no,
        "50.00",
        trade_no=paid["trade_no"],
        trade_status="TRADE_CLOSED",
        refund_fee="50.00",
        gmt_refund="2024-05-22 09:00:00.456",
        out_biz_no="R2",
    )
    assert await post(client, server, full) == "success"
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("refunded", "50.00")

    waiting = await admin_create_order(client, amount="7.00")
    assert (
        await post(client, server, signed(server, waiting["order_no"], "7.00", trade_status="WAIT_BUYER_PAY"))
        == "success"
    )
    assert (await admin_get_order(client, waiting["order_no"]))["status"] == "unpaid"
    closed = signed(server, waiting["order_no"], "7.00", trade_status="TRADE_CLOSED")
    assert await post(client, server, closed) == "success"
    assert (await admin_get_order(client, waiting["order_no"]))["status"] == "closed"


async def _fifty(client: httpx.AsyncClient, server: Server, kind: str) -> None:
    user = await admin_create_user(client)
    order = await admin_create_order(client, amount="30.00", kind=kind, user_id=int(user["id"]))
    body = urlencode(signed(server, order["order_no"], "30.00"))
    answers = await asyncio.gather(
        *(client.post(path(server), content=body, headers=FORM) for _ in range(50))
    )
    assert [a.text for a in answers] == ["success"] * 50
    state = await admin_get_order(client, order["order_no"])
    assert (state["status"], state["paid_amount"]) == ("paid", "30.00")
    assert (await admin_get_user(client, user["id"]))["amount"] == ("30.00" if kind == "recharge" else "0.00")
    rows = await audit(client, order["order_no"])
    outcomes = [r["outcome"] for r in rows]
    # Every one of the fifty is on record: as a row, or counted on the row of the same bytes.
    assert len(rows) + sum(r["repeats"] for r in rows) == 50 and outcomes.count("applied") == 1


async def test_fifty_concurrent_notifications_change_a_goods_order_once(
    client: httpx.AsyncClient, server: Server
) -> None:
    await _fifty(client, server, "goods")


async def test_fifty_concurrent_notifications_credit_a_recharge_once(
    client: httpx.AsyncClient, server: Server
) -> None:
    await _fifty(client, server, "recharge")


async def test_oversized_body_is_refused(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="1.00")
    form = signed(server, order["order_no"], "1.00", body="x" * (65 * 1024))
    response = await client.post(path(server), content=urlencode(form), headers=FORM)
    assert response.status_code == 413
    assert (await admin_get_order(client, order["order_no"]))["status"] == "unpaid"


async def test_legacy_rsa_merchant_and_unconfigured_alipay(client: httpx.AsyncClient, server: Server) -> None:
    live = effective(server).alipay
    rsa_settings = AlipaySettings(
        app_id=live.app_id, public_key=live.public_key, sign_type="RSA", seller_id=live.seller_id
    )
    async with other_server(server, sandbox=False, alipay=rsa_settings) as rsa_client:
        order = await admin_create_order(rsa_client, amount="6.60")
        assert await post(rsa_client, server, signed(server, order["order_no"], "6.60")) == "failure"
        assert (
            await post(rsa_client, server, signed(server, order["order_no"], "6.60", sign_type="RSA"))
            == "success"
        )
        assert (await admin_get_order(rsa_client, order["order_no"]))["status"] == "paid"

    async with other_server(server, sandbox=False) as bare:
        order = await admin_create_order(bare, amount="1.00")
        mark = await last_id(server)
        assert await post(bare, server, signed(server, order["order_no"], "1.00")) == "failure"
        assert (await admin_get_order(bare, order["order_no"]))["status"] == "unpaid"
        assert [r[2] for r in await stored_since(server, mark)] == [
            "NotConfigured: Alipay is not configured (app_id / public key)"
        ]


async def test_a_forged_notice_is_filed_under_the_order_it_claims(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="9.00")
    forged = signed(server, order["order_no"], "9.00")
    forged["total_amount"] = "0.01"
    assert await post(client, server, forged) == "failure"
    trail = await audit(client, order["order_no"])
    assert [(n["verified"], n["outcome"]) for n in trail] == [(False, "rejected")]
    assert "NotAuthentic" in trail[0]["reason"]
    assert (await admin_get_order(client, order["order_no"]))["status"] == "unpaid"
