"""order/payment on WeChat Pay APIv3: each trade type, its app id, both signatures, over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from test_order_payment import add_wechat_identity, login, start
from test_sandbox_payments import effective, service_payments

from conftest import Server
from mallgate.channels import wechat_pay
from mallgate.keys import load_private_key
from mallgate.sandbox.app import WECHATPAY_MCH_ID
from mallgate.sandbox.keys import SandboxKeys
from mallgate.settings import Settings
from support import admin_create_order, admin_get_order


def merchant_public(server: Server) -> rsa.RSAPublicKey:
    keys = SandboxKeys.load_or_create(server.settings.var_dir / "sandbox")
    return load_private_key(keys.wechatpay_merchant_private).public_key()


def verify_rsa(public: rsa.RSAPublicKey, signature: str, *lines: str) -> None:
    """WeChat's client-side rule: RSA-SHA256 over each value on its own line, each line ending in \\n."""
    message = "".join(f"{line}\n" for line in lines).encode()
    public.verify(base64.b64decode(signature), message, padding.PKCS1v15(), hashes.SHA256())


def standin_trade(server: Server, order_no: str) -> tuple[str, str]:
    trade = service_payments(server).book.get("wechat", order_no)
    assert trade is not None
    return trade.appid, trade.trade_type


async def test_each_trade_type_on_v3_under_its_app_id(client: httpx.AsyncClient, server: Server) -> None:
    settings = effective(server)
    assert settings.wechat_pay.order_api == "v3"  # the sandbox holds the v3 credentials: auto chooses v3
    public = merchant_public(server)
    user_id, token = await login(server)
    mp_openid = await add_wechat_identity(server, user_id, settings.wechat_mp.app_id)
    mini_openid = await add_wechat_identity(server, user_id, settings.wechat_mini.app_id)
    expected = {
        "JSAPI": (settings.wechat_mp.app_id, "JSAPI"),
        "MINI": (settings.wechat_mini.app_id, "JSAPI"),
        "APP": (settings.wechat_app.app_id, "APP"),
        "H5": (settings.wechat_pay.app_id, "MWEB"),
        "NATIVE": (settings.wechat_pay.app_id, "NATIVE"),
    }
    for trade_type, (app_id, platform_type) in expected.items():
        order = await admin_create_order(client, amount="12.34", user_id=int(user_id))
        no = order["order_no"]
        _, answer = await start(client, server, token, order_no=no, channel="wechat", trade_type=trade_type)
        assert answer["status"] == 1, (trade_type, answer)
        data = answer["data"]
        # The stand-in accepted our Authorization and recorded the trade under the trade type's app.
        assert standin_trade(server, no) == (app_id, platform_type), trade_type
        if trade_type in ("JSAPI", "MINI"):
            assert set(data) == {"appId", "timeStamp", "nonceStr", "package", "signType", "paySign"}
            assert (data["appId"], data["signType"]) == (app_id, "RSA")
            assert data["package"].startswith("prepay_id=wx")
            verify_rsa(
                public, data["paySign"], data["appId"], data["timeStamp"], data["nonceStr"], data["package"]
            )
            trade = service_payments(server).book.get("wechat", no)
            assert trade is not None
            # The payer is the logged-in user at that app, never a client-chosen openid.
            assert trade.buyer_id == (mp_openid if trade_type == "JSAPI" else mini_openid)
        elif trade_type == "APP":
            assert set(data) == {"appid", "partnerid", "prepayid", "package", "noncestr", "timestamp", "sign"}
            assert (data["appid"], data["partnerid"], data["package"]) == (
                app_id,
                WECHATPAY_MCH_ID,
                "Sign=WXPay",
            )
            verify_rsa(
                public, data["sign"], data["appid"], data["timestamp"], data["noncestr"], data["prepayid"]
            )
        elif trade_type == "H5":
            assert set(data) == {"h5_url"} and "/_sandbox/wechatpay/cashier?prepay_id=wx" in data["h5_url"]
        else:
            assert set(data) == {"code_url", "qr_png"} and data["code_url"].startswith("weixin://wxpay/")
            png_url = urlsplit(data["qr_png"])
            assert dict(parse_qsl(png_url.query)) == {"data": data["code_url"]}
            png = await client.get(png_url.path + "?" + png_url.query)
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


async def test_v3_payment_completes_with_the_v3_notice(client: httpx.AsyncClient, server: Server) -> None:
    user_id, token = await login(server)
    await add_wechat_identity(server, user_id, effective(server).wechat_mp.app_id)
    order = await admin_create_order(client, amount="5.00", user_id=int(user_id))
    no = order["order_no"]
    _, answer = await start(client, server, token, order_no=no, channel="wechat", trade_type="JSAPI")
    assert answer["status"] == 1, answer
    # The notice carries the Official Account's app id, not wechat_pay.app_id: still ours.
    paid = await client.post(
        "/_sandbox/pay", json={"channel": "wechat", "order_no": no, "wechat_version": "v3"}
    )
    assert paid.json()["data"]["delivered"] is True, paid.json()
    assert (await admin_get_order(client, no))["status"] == "paid"


async def prepay(server: Server, no: str, **changes: object) -> dict[str, str]:
    """A v3 Native order made by the channel client itself, with some of its settings changed."""
    settings = effective(server)
    pay = settings.wechat_pay.model_copy(update=changes)
    keys = changes.pop("keys", None)
    async with httpx.AsyncClient() as http:
        client = wechat_pay.WechatPayClient(pay, http=http, keys=keys)  # type: ignore[arg-type]
        return await client.prepay_v3(
            "native",
            app_id=settings.wechat_pay.app_id,
            out_trade_no=no,
            total=100,
            description="test",
            notify_url=server.url + "/wechat/notify",
            client_ip="127.0.0.1",
        )


async def test_the_standin_refuses_a_request_signed_with_another_key(
    client: httpx.AsyncClient, server: Server
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    order = await admin_create_order(client, amount="1.00")
    no = order["order_no"]
    with pytest.raises(wechat_pay.WechatPayApiError) as refused:
        await prepay(server, no, mch_private_key=pem)
    assert refused.value.code == "SIGN_ERROR"
    assert service_payments(server).book.get("wechat", no) is None
    assert "code_url" in await prepay(server, no)  # the same call, signed with our key, is accepted


async def test_an_answer_not_signed_by_wechat_pay_is_not_believed(
    client: httpx.AsyncClient, server: Server
) -> None:
    # mallgate expects another WeChat Pay key than the one the stand-in signs its answers with.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    keys = wechat_pay.V3KeyStore(
        public_key_id=effective(server).wechat_pay.public_key_id, public_key=stranger
    )
    order = await admin_create_order(client, amount="1.00")
    no = order["order_no"]
    with pytest.raises(wechat_pay.NotAuthentic):
        await prepay(server, no, keys=keys)
    # The stand-in did make the trade: only its answer was refused.
    assert service_payments(server).book.get("wechat", no) is not None


async def test_a_trade_type_the_channel_cannot_serve(client: httpx.AsyncClient, server: Server) -> None:
    _, token = await login(server)
    order = await admin_create_order(client, amount="1.00")
    no = order["order_no"]
    _, answer = await start(client, server, token, order_no=no, channel="alipay", trade_type="NATIVE")
    assert (answer["status"], answer["code"]) == (0, "pay.trade_type_unsupported") and answer["info"]
    assert service_payments(server).book.get("alipay", no) is None


def test_the_app_id_follows_the_trade_type() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        wechat_pay={"app_id": "wx00000000000000d4"},
        wechat_mp={"app_id": "wx00000000000000a1"},
        wechat_mini={"app_id": "wx00000000000000b2"},
    )
    assert [settings.wechat_pay_app_id(t) for t in ("JSAPI", "MINI", "APP", "H5", "NATIVE")] == [
        "wx00000000000000a1",
        "wx00000000000000b2",
        "",
        "wx00000000000000d4",
        "wx00000000000000d4",
    ]
    assert settings.wechat_pay_app_ids == {"wx00000000000000a1", "wx00000000000000b2", "wx00000000000000d4"}


# ---------------------------------------------------------------------------------------------
# cross-checked with wechatpayv3 (minibear2021/wechatpayv3, a test-only dependency)


def official_client(server: Server, pay_type: Any) -> Any:
    """wechatpayv3's client with the sandbox merchant's credentials, pointed at the stand-in."""
    from wechatpayv3 import WeChatPay

    pay = effective(server).wechat_pay
    keys = SandboxKeys.load_or_create(server.settings.var_dir / "sandbox")
    client = WeChatPay(
        wechatpay_type=pay_type,
        mchid=pay.mch_id,
        private_key=keys.wechatpay_merchant_private,
        cert_serial_no=pay.mch_serial_no,
        appid=pay.app_id,
        apiv3_key=pay.api_v3_key,
        notify_url=server.url + "/wechat/notify",
        public_key=pay.public_key,
        public_key_id=pay.public_key_id,
    )
    client._core._gate_way = server.url + "/_sandbox/wechatpay"  # the SDK has no setting for it
    return client


async def test_what_wechatpayv3_signs_the_standin_accepts_and_its_answers_verify(
    client: httpx.AsyncClient, server: Server
) -> None:
    from wechatpayv3 import WeChatPayType

    no = (await admin_create_order(client, amount="2.00"))["order_no"]
    official = official_client(server, WeChatPayType.NATIVE)
    # requests is synchronous and the service runs on this loop: the SDK gets a thread.
    code, message = await asyncio.to_thread(
        official.pay,
        description="测试商品",
        out_trade_no=no,
        amount={"total": 200},
        scene_info={"payer_client_ip": "127.0.0.1"},
    )
    # 200 only once the stand-in accepted the SDK's Authorization and the SDK verified the answer.
    assert code == 200, message
    assert json.loads(message)["code_url"].startswith("weixin://wxpay/")
    assert standin_trade(server, no) == (effective(server).wechat_pay.app_id, "NATIVE")

    # Its refund and close calls, too.
    paid = await client.post(
        "/_sandbox/pay", json={"channel": "wechat", "order_no": no, "wechat_version": "v3"}
    )
    assert paid.json()["status"] == 1
    code, message = await asyncio.to_thread(
        official.refund,
        out_refund_no="SDK" + no,
        amount={"refund": 50, "total": 200, "currency": "CNY"},
        out_trade_no=no,
    )
    assert code == 200 and json.loads(message)["out_refund_no"] == "SDK" + no, message
    other = (await admin_create_order(client, amount="1.00"))["order_no"]
    await asyncio.to_thread(
        official.pay,
        description="x",
        out_trade_no=other,
        amount={"total": 100},
        scene_info={"payer_client_ip": "127.0.0.1"},
    )
    code, _ = await asyncio.to_thread(official.close, out_trade_no=other)
    assert code == 204


def test_what_we_sign_wechatpayv3_signs_alike_and_verifies(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wechatpayv3 import WeChatPayType, utils

    pay = effective(server).wechat_pay
    official = official_client(server, WeChatPayType.JSAPI)
    keys = SandboxKeys.load_or_create(server.settings.var_dir / "sandbox")
    body = json.dumps({"appid": pay.app_id, "amount": {"total": 1}})
    # The SDK takes the time itself: hold it still so both sign the very same message.
    monkeypatch.setattr(utils.time, "time", lambda: 1700000000.5)
    theirs = utils.build_authorization(
        "/v3/pay/transactions/jsapi",
        "POST",
        pay.mch_id,
        pay.mch_serial_no,
        official._core._private_key,
        data=body,
        nonce_str="N0NCE",
    )
    ours = wechat_pay.v3_authorization(
        "POST",
        "/v3/pay/transactions/jsapi",
        body,
        mch_id=pay.mch_id,
        serial_no=pay.mch_serial_no,
        private_key=keys.wechatpay_merchant_private,
        timestamp=1700000000,
        nonce="N0NCE",
    )
    assert ours == theirs  # RSA PKCS#1 v1.5 is deterministic: the same message, the same signature

    # The client parameters: the SDK's own sign of appId, timeStamp, nonceStr, package.
    params = wechat_pay.v3_jsapi_params(
        pay.app_id, "wx123", keys.wechatpay_merchant_private, timestamp=1700000000, nonce="abc"
    )
    assert params["paySign"] == official.sign([pay.app_id, "1700000000", "abc", "prepay_id=wx123"])
    app = wechat_pay.v3_app_params(
        pay.app_id, pay.mch_id, "wx123", keys.wechatpay_merchant_private, timestamp=1700000000, nonce="abc"
    )
    assert app["sign"] == official.sign([pay.app_id, "1700000000", "abc", "wx123"])

    # A notice signed and sealed as the stand-in (and WeChat Pay) does: the SDK verifies and opens it.
    platform = SandboxKeys.load_or_create(server.settings.var_dir / "sandbox").wechatpay_platform_private
    headers, notice = wechat_pay.sign_v3_notification(
        "REFUND.SUCCESS",
        {"mchid": pay.mch_id, "out_trade_no": "T1", "out_refund_no": "R1", "refund_status": "SUCCESS"},
        private_key=platform,
        serial=pay.public_key_id,
        api_v3_key=pay.api_v3_key,
        now=time.time(),
        nonce="n" * 16,
    )
    opened = official.callback(headers, notice)
    assert opened and opened["resource"]["out_refund_no"] == "R1"
