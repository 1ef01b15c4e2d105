"""order/payment on WeChat Pay APIv3: each trade type, its app id, both signatures, over HTTP."""

from __future__ import annotations

import base64
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
