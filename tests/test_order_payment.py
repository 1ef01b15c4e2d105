"""order/payment: what a logged-in client gets to open the cashier, against the sandbox over HTTP."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from test_notify_alipay import effective, keys_of

from conftest import Server, other_server
from mallgate.channels import alipay, wechat_pay
from mallgate.db.models import Identity
from mallgate.keys import load_private_key, public_pem
from mallgate.services import tokens
from support import admin_create_order, admin_create_user, admin_get_order, unique


async def login(server: Server) -> tuple[str, str]:
    """A fresh user and a live token for them (the login routes belong to another part)."""
    runtime = server.app.state.runtime
    async with httpx.AsyncClient(base_url=server.url) as http:
        user = await admin_create_user(http)
    now = runtime.clock.utcnow().replace(tzinfo=None)
    async with runtime.db.transaction() as session:
        token = await tokens.issue(session, int(user["id"]), now, timedelta(days=1))
    return user["id"], token


async def add_wechat_identity(server: Server, user_id: str, app_id: str) -> str:
    runtime = server.app.state.runtime
    openid = unique("o")
    async with runtime.db.transaction() as session:
        session.add(
            Identity(
                user_id=int(user_id),
                provider="wechat",
                app_id=app_id,
                openid=openid,
                created_at=runtime.clock.utcnow().replace(tzinfo=None),
            )
        )
    return openid


async def start(
    client: httpx.AsyncClient, server: Server, token: str | None, **params: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Auth-Token": token} if token else {}
    response = await client.post(effective(server).base_path + "/order/payment", json=params, headers=headers)
    payload: dict[str, Any] = response.json()
    return response.status_code, payload


async def test_alipay_app_and_h5(client: httpx.AsyncClient, server: Server) -> None:
    settings = effective(server)
    user_id, token = await login(server)
    order = await admin_create_order(client, amount="19.90", user_id=int(user_id), subject="苹果")
    no = order["order_no"]
    notify_url = settings.public_url.rstrip("/") + settings.base_path + "/pay/notify"
    merchant_public = public_pem(load_private_key(keys_of(server).alipay_merchant_private).public_key())

    _, app = await start(client, server, token, order_no=no, channel="alipay", trade_type="APP")
    assert app["status"] == 1, app
    params = dict(parse_qsl(app["data"]["order_string"]))
    alipay.verify_request(params, merchant_public, "RSA2")  # signed with the merchant key
    biz = json.loads(params["biz_content"])
    assert (params["method"], params["app_id"], params["notify_url"]) == (
        "alipay.trade.app.pay",
        settings.alipay.app_id,
        notify_url,
    )
    assert (biz["out_trade_no"], biz["total_amount"], biz["subject"]) == (no, "19.90", "苹果")

    _, h5 = await start(client, server, token, order_no=no, channel="alipay", trade_type="h5")
    url = urlsplit(h5["data"]["pay_url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == settings.alipay.gateway_url
    query = dict(parse_qsl(url.query))
    alipay.verify_request(query, merchant_public, "RSA2")
    assert (
        query["method"] == "alipay.trade.wap.pay" and json.loads(query["biz_content"])["out_trade_no"] == no
    )

    _, jsapi = await start(client, server, token, order_no=no, channel="alipay", trade_type="JSAPI")
    assert (jsapi["status"], jsapi["code"]) == (0, "pay.trade_type_unsupported")


async def test_wechat_jsapi_needs_the_openid_of_the_paying_app(server: Server) -> None:
    """v2 (a merchant with the v2 key only): each trade type under its own app's id and openid."""
    settings = effective(server)
    pay = settings.wechat_pay
    user_id, token = await login(server)
    async with other_server(server, wechat_pay={"api_version": "v2"}) as client:
        order = await admin_create_order(client, amount="9.90", user_id=int(user_id))
        no = order["order_no"]
        _, missing = await start(client, server, token, order_no=no, channel="wechat", trade_type="MINI")
        assert (missing["status"], missing["code"]) == (0, "pay.openid_missing") and missing["info"]
        await add_wechat_identity(server, user_id, "wx_some_other_app")
        _, still = await start(client, server, token, order_no=no, channel="wechat", trade_type="JSAPI")
        assert still["code"] == "pay.openid_missing"

        # The Mini Program's openid pays in the Mini Program, not on the Official Account's pages.
        await add_wechat_identity(server, user_id, settings.wechat_mini.app_id)
        _, mini = await start(client, server, token, order_no=no, channel="wechat", trade_type="MINI")
        assert mini["status"] == 1, mini
        _, jsapi = await start(client, server, token, order_no=no, channel="wechat", trade_type="JSAPI")
        assert jsapi["code"] == "pay.openid_missing"
        await add_wechat_identity(server, user_id, settings.wechat_mp.app_id)
        _, jsapi = await start(client, server, token, order_no=no, channel="wechat", trade_type="JSAPI")
        for answer, app_id in ((mini, settings.wechat_mini.app_id), (jsapi, settings.wechat_mp.app_id)):
            assert answer["status"] == 1, answer
            data = answer["data"]
            assert set(data) == {"appId", "timeStamp", "nonceStr", "package", "signType", "paySign"}
            assert data["appId"] == app_id and data["package"].startswith("prepay_id=wx")
            signed = {k: v for k, v in data.items() if k != "paySign"}
            wechat_pay.verify_v2_sign({**signed, "sign": data["paySign"]}, pay.api_key, "MD5")


async def test_wechat_app_and_h5(server: Server) -> None:
    settings = effective(server)
    pay = settings.wechat_pay
    user_id, token = await login(server)
    async with other_server(server, wechat_pay={"api_version": "v2"}) as client:
        app_order = await admin_create_order(client, amount="0.01", user_id=int(user_id))
        _, app = await start(
            client, server, token, order_no=app_order["order_no"], channel="wechat", trade_type="APP"
        )
        assert app["status"] == 1, app
        data = app["data"]
        assert (data["appid"], data["partnerid"], data["package"]) == (
            settings.wechat_app.app_id,
            pay.mch_id,
            "Sign=WXPay",
        )
        wechat_pay.verify_v2_sign(data, pay.api_key, "MD5")

        h5_order = await admin_create_order(
            client, amount="3.00"
        )  # an order without a user may be paid by anyone
        _, h5 = await start(
            client, server, token, order_no=h5_order["order_no"], channel="wechat", trade_type="H5"
        )
        assert h5["status"] == 1, h5
        assert set(h5["data"]) == {"h5_url", "mweb_url"}
        assert h5["data"]["h5_url"] == h5["data"]["mweb_url"]
        assert h5["data"]["mweb_url"].startswith(str(client.base_url).rstrip("/") + "/_sandbox/")


async def test_refusals(client: httpx.AsyncClient, server: Server) -> None:
    owner_id, _ = await login(server)
    _, token = await login(server)
    theirs = await admin_create_order(client, amount="5.00", user_id=int(owner_id))
    status, no_token = await start(
        client, server, None, order_no=theirs["order_no"], channel="alipay", trade_type="H5"
    )
    assert (status, no_token["status"]) == (401, 0)
    _, foreign = await start(
        client, server, token, order_no=theirs["order_no"], channel="alipay", trade_type="H5"
    )
    assert (foreign["status"], foreign["code"]) == (0, "order.not_found")
    _, ghost = await start(client, server, token, order_no=unique("NO"), channel="alipay", trade_type="H5")
    assert ghost["code"] == "order.not_found"
    mine = await admin_create_order(client, amount="5.00")
    _, channel = await start(
        client, server, token, order_no=mine["order_no"], channel="paypal", trade_type="H5"
    )
    assert (channel["code"], channel["field"]) == ("param.invalid", "channel")
    _, kind = await start(
        client, server, token, order_no=mine["order_no"], channel="wechat", trade_type="MICROPAY"
    )
    assert (kind["code"], kind["field"]) == ("param.invalid", "trade_type")
    _, missing = await start(client, server, token, channel="wechat", trade_type="H5")
    assert (missing["code"], missing["field"]) == ("param.missing", "order_no")


async def test_paid_orders_and_channel_errors(client: httpx.AsyncClient, server: Server) -> None:
    _, token = await login(server)
    order = await admin_create_order(client, amount="8.00")
    no = order["order_no"]
    # The payer pays at the stand-in, but the notice is lost: WeChat Pay knows, we don't yet.
    paid = await client.post(
        "/_sandbox/pay",
        json={"channel": "wechat", "order_no": no, "amount": "8.00", "notify": False},
    )
    assert paid.json()["status"] == 1, paid.json()
    _, answer = await start(client, server, token, order_no=no, channel="wechat", trade_type="H5")
    assert (answer["status"], answer["code"]) == (0, "pay.channel_error")
    assert "Traceback" not in json.dumps(answer) and "ORDERPAID" not in answer["info"]

    # Once we know it is paid, the client is told so plainly.
    notified = await client.post("/_sandbox/pay", json={"channel": "wechat", "order_no": no})
    assert notified.json()["data"]["delivered"] is True
    assert (await admin_get_order(client, no))["status"] == "paid"
    _, again = await start(client, server, token, order_no=no, channel="alipay", trade_type="H5")
    assert (again["status"], again["code"], again["order_status"]) == (0, "order.not_payable", "paid")


async def test_started_payments_complete_through_the_sandbox(
    client: httpx.AsyncClient, server: Server
) -> None:
    _, token = await login(server)
    for channel, extra in (
        ("alipay", {}),
        ("wechat", {"wechat_version": "v2"}),
        ("wechat", {"wechat_version": "v3"}),
    ):
        order = await admin_create_order(client, amount="6.00")
        no = order["order_no"]
        _, started = await start(client, server, token, order_no=no, channel=channel, trade_type="H5")
        assert started["status"] == 1, started
        paid = await client.post(
            "/_sandbox/pay", json={"channel": channel, "order_no": no, "amount": "6.00", **extra}
        )
        assert paid.json()["data"]["delivered"] is True, paid.json()
        state = await admin_get_order(client, no)
        assert (state["status"], state["channel"], state["paid_amount"]) == ("paid", channel, "6.00")
