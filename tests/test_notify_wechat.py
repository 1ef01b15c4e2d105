"""wechat/notify end to end: v2 XML (payment, refund) and v3 JSON notices over HTTP into the real app."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_notify_alipay import effective, keys_of, last_id, signed, stored_since

from conftest import Server, free_port, make_settings, start_server
from mallgate.app import create_app
from mallgate.channels import wechat_pay
from mallgate.sandbox.app import WECHATPAY_MCH_ID
from mallgate.settings import Settings, WechatPaySettings
from support import admin_create_order, admin_create_user, admin_get_order, admin_get_user, unique

XML = {"Content-Type": "text/xml"}


def path(server: Server) -> str:
    return effective(server).base_path + "/wechat/notify"


def v2_payment(
    server: Server, order_no: str, total_fee: int, sign_type: str = "MD5", **extra: str
) -> dict[str, str]:
    pay = effective(server).wechat_pay
    fields = {
        "return_code": "SUCCESS",
        "appid": pay.app_id,
        "mch_id": pay.mch_id,
        "nonce_str": secrets.token_hex(8),
        "result_code": "SUCCESS",
        "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
        "is_subscribe": "N",
        "trade_type": "JSAPI",
        "bank_type": "OTHERS",
        "total_fee": str(total_fee),
        "fee_type": "CNY",
        "cash_fee": str(total_fee),
        "transaction_id": "4200" + secrets.token_hex(12)[:24],
        "out_trade_no": order_no,
        "time_end": "20240520101508",
        **extra,
    }
    if sign_type != "MD5":
        fields["sign_type"] = sign_type
    fields["sign"] = wechat_pay.sign_v2(fields, pay.api_key, sign_type)
    return fields


def v2_refund(
    server: Server, order_no: str, refund_id: str, refund_fee: int, total_fee: int, trade_no: str = ""
) -> bytes:
    pay = effective(server).wechat_pay
    inner = {
        "transaction_id": trade_no or "4200" + secrets.token_hex(12)[:24],
        "out_trade_no": order_no,
        "refund_id": refund_id,
        "out_refund_no": "R" + refund_id,
        "total_fee": str(total_fee),
        "refund_fee": str(refund_fee),
        "settlement_refund_fee": str(refund_fee),
        "refund_status": "SUCCESS",
        "success_time": "2024-05-21 09:00:00",
        "refund_recv_accout": "支付用户零钱",
        "refund_account": "REFUND_SOURCE_RECHARGE_FUNDS",
        "refund_request_source": "API",
    }
    outer = {
        "return_code": "SUCCESS",
        "appid": pay.app_id,
        "mch_id": pay.mch_id,
        "nonce_str": secrets.token_hex(8),
        "req_info": wechat_pay.encrypt_refund_req_info(inner, pay.api_key),
    }
    return wechat_pay.to_xml(outer)


async def post_v2(client: httpx.AsyncClient, server: Server, body: bytes) -> str:
    response = await client.post(path(server), content=body, headers=XML)
    assert response.status_code == 200
    return wechat_pay.parse_xml(response.content)["return_code"]


def v3_notice(
    server: Server,
    event_type: str,
    resource: dict[str, Any],
    *,
    age: float = 0,
    serial: str = "",
    private_key: str | rsa.RSAPrivateKey = "",
    settings: Settings | None = None,
) -> tuple[dict[str, str], bytes]:
    pay = (settings or effective(server)).wechat_pay
    return wechat_pay.sign_v3_notification(
        event_type,
        resource,
        private_key=private_key or keys_of(server).wechatpay_platform_private,
        serial=serial or pay.public_key_id,
        api_v3_key=pay.api_v3_key,
        now=server.clock.now() - age,
        nonce=secrets.token_hex(16),
    )


def transaction(settings: Settings, order_no: str, total: int) -> dict[str, Any]:
    return {
        "appid": settings.wechat_pay.app_id,
        "mchid": settings.wechat_pay.mch_id,
        "out_trade_no": order_no,
        "transaction_id": "4200" + secrets.token_hex(12)[:24],
        "trade_type": "JSAPI",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "OTHERS",
        "attach": "",
        "success_time": "2024-05-20T10:15:08+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {"total": total, "payer_total": total, "currency": "CNY", "payer_currency": "CNY"},
    }


def refund_resource(
    settings: Settings, order_no: str, refund_id: str, refund: int, total: int
) -> dict[str, Any]:
    return {
        "mchid": settings.wechat_pay.mch_id,
        "out_trade_no": order_no,
        "transaction_id": "4200" + secrets.token_hex(12)[:24],
        "out_refund_no": "R" + refund_id,
        "refund_id": refund_id,
        "refund_status": "SUCCESS",
        "success_time": "2024-05-21T09:00:00+08:00",
        "user_received_account": "支付用户零钱",
        "amount": {"total": total, "refund": refund, "payer_total": total, "payer_refund": refund},
    }


async def post_v3(client: httpx.AsyncClient, server: Server, notice: tuple[dict[str, str], bytes]) -> int:
    headers, body = notice
    response = await client.post(path(server), content=body, headers=headers)
    if response.status_code >= 400:
        assert response.json()["code"] == "FAIL"
    else:
        assert response.status_code in (200, 204)
    return response.status_code


# ----------------------------------------------------------------------------------------------
# v2


async def test_v2_md5_and_hmac_sha256_payments(client: httpx.AsyncClient, server: Server) -> None:
    for sign_type in ("MD5", "HMAC-SHA256"):
        order = await admin_create_order(client, amount="9.90")
        fields = v2_payment(server, order["order_no"], 990, sign_type)
        assert await post_v2(client, server, wechat_pay.to_xml(fields)) == "SUCCESS"
        state = await admin_get_order(client, order["order_no"])
        assert (state["status"], state["channel"], state["trade_no"], state["paid_amount"]) == (
            "paid",
            "wechat",
            fields["transaction_id"],
            "9.90",
        )
        assert await post_v2(client, server, wechat_pay.to_xml(fields)) == "SUCCESS"  # a resend


async def test_v2_hmac_without_sign_type_field_and_refusals(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="1.01")
    no = order["order_no"]
    # WeChat often leaves sign_type out of HMAC-signed notices.
    hmac_signed = v2_payment(server, no, 101, "HMAC-SHA256")
    del hmac_signed["sign_type"]
    hmac_signed["sign"] = wechat_pay.sign_v2(hmac_signed, effective(server).wechat_pay.api_key, "HMAC-SHA256")
    mark = await last_id(server)
    tampered = {**v2_payment(server, no, 101), "total_fee": "1"}
    assert await post_v2(client, server, wechat_pay.to_xml(tampered)) == "FAIL"
    wrong_key = v2_payment(server, no, 101)
    wrong_key["sign"] = wechat_pay.sign_v2(wrong_key, "0" * 32)
    assert await post_v2(client, server, wechat_pay.to_xml(wrong_key)) == "FAIL"
    other_mch = v2_payment(server, no, 101, mch_id="1900009999")
    assert await post_v2(client, server, wechat_pay.to_xml(other_mch)) == "FAIL"
    mismatch = v2_payment(server, no, 100)
    assert await post_v2(client, server, wechat_pay.to_xml(mismatch)) == "FAIL"
    assert (await admin_get_order(client, no))["status"] == "unpaid"
    assert [r[2].split(":")[0] for r in await stored_since(server, mark)] == [
        "NotAuthentic",
        "NotAuthentic",
        "ForeignNotification",
        "amount mismatch",
    ]
    assert await post_v2(client, server, wechat_pay.to_xml(hmac_signed)) == "SUCCESS"
    assert (await admin_get_order(client, no))["paid_amount"] == "1.01"


async def test_v2_refund_notice(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="30.00")
    no = order["order_no"]
    assert await post_v2(client, server, wechat_pay.to_xml(v2_payment(server, no, 3000))) == "SUCCESS"
    first = v2_refund(server, no, "50300103182020010413419046597", 1000, 3000)
    assert await post_v2(client, server, first) == "SUCCESS"
    assert await post_v2(client, server, first) == "SUCCESS"  # same refund_id: counted once
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("partially_refunded", "10.00")
    assert (
        await post_v2(client, server, v2_refund(server, no, "50300103182020010413419046598", 2000, 3000))
        == "SUCCESS"
    )
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("refunded", "30.00")
    # req_info under another key is no proof of origin.
    fields = wechat_pay.parse_xml(v2_refund(server, no, "50300103182020010413419046599", 1, 3000))
    fields["req_info"] = wechat_pay.encrypt_refund_req_info({"out_trade_no": no, "refund_fee": "1"}, "k" * 32)
    assert await post_v2(client, server, wechat_pay.to_xml(fields)) == "FAIL"


async def test_hostile_xml_is_refused_without_reading_anything(
    client: httpx.AsyncClient, server: Server
) -> None:
    bodies = [
        b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<xml><return_code>&x;</return_code></xml>",
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + b"".join(
            b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
            for i in range(1, 10)
        )
        + b"]><xml><return_code>&lol9;</return_code></xml>",
        b"<!DOCTYPE xml><xml><return_code>SUCCESS</return_code></xml>",
    ]
    mark = await last_id(server)
    for body in bodies:
        response = await client.post(path(server), content=body, headers=XML)
        assert (
            response.status_code == 200 and b"root:" not in response.content and len(response.content) < 200
        )
        assert wechat_pay.parse_xml(response.content)["return_code"] == "FAIL"
    stored = await stored_since(server, mark)
    assert [(verified, outcome) for verified, outcome, _ in stored] == [(False, "rejected")] * 3
    assert all(reason.startswith("MalformedNotification: unacceptable XML") for _, _, reason in stored)


async def test_oversized_notices_are_refused(client: httpx.AsyncClient, server: Server) -> None:
    order = await admin_create_order(client, amount="1.00")
    padded = wechat_pay.to_xml(v2_payment(server, order["order_no"], 100, attach="x" * (64 * 1024)))
    assert (await client.post(path(server), content=padded, headers=XML)).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while streaming
        for i in range(0, len(padded), 4096):
            yield padded[i : i + 4096]

    assert (await client.post(path(server), content=chunks(), headers=XML)).status_code == 413
    assert (await admin_get_order(client, order["order_no"]))["status"] == "unpaid"


# ----------------------------------------------------------------------------------------------
# v3, public-key mode


async def test_v3_payment_and_refund(client: httpx.AsyncClient, server: Server) -> None:
    settings = effective(server)
    order = await admin_create_order(client, amount="12.30")
    no = order["order_no"]
    resource = transaction(settings, no, 1230)
    assert await post_v3(client, server, v3_notice(server, "TRANSACTION.SUCCESS", resource)) == 204
    state = await admin_get_order(client, no)
    assert (state["status"], state["trade_no"], state["paid_amount"]) == (
        "paid",
        resource["transaction_id"],
        "12.30",
    )
    assert await post_v3(client, server, v3_notice(server, "TRANSACTION.SUCCESS", resource)) == 204
    refund = refund_resource(settings, no, "50300000000000000000000000001", 230, 1230)
    assert await post_v3(client, server, v3_notice(server, "REFUND.SUCCESS", refund)) == 204
    assert await post_v3(client, server, v3_notice(server, "REFUND.SUCCESS", refund)) == 204
    state = await admin_get_order(client, no)
    assert (state["status"], state["refunded_amount"]) == ("partially_refunded", "2.30")


async def test_v3_refusals(client: httpx.AsyncClient, server: Server) -> None:
    settings = effective(server)
    order = await admin_create_order(client, amount="4.00")
    no = order["order_no"]
    resource = transaction(settings, no, 400)
    stale = v3_notice(server, "TRANSACTION.SUCCESS", resource, age=301)
    wrong_serial = v3_notice(
        server, "TRANSACTION.SUCCESS", resource, serial="PUB_KEY_ID_0114000000000000000000000000000001"
    )
    headers, body = v3_notice(server, "TRANSACTION.SUCCESS", resource)
    probe = ({**headers, "Wechatpay-Signature": "WECHATPAY/SIGNTEST/" + headers["Wechatpay-Signature"]}, body)
    other_key = v3_notice(
        server, "TRANSACTION.SUCCESS", resource, private_key=keys_of(server).alipay_platform_private
    )
    mismatch = v3_notice(server, "TRANSACTION.SUCCESS", transaction(settings, no, 399))
    mark = await last_id(server)
    for notice in (stale, wrong_serial, probe, other_key, mismatch):
        assert 400 <= await post_v3(client, server, notice) < 600
    assert (await admin_get_order(client, no))["status"] == "unpaid"
    reasons = [reason for _, _, reason in await stored_since(server, mark)]
    assert reasons[:4] == [
        "NotAuthentic: timestamp outside the accepted window",
        "UnknownSerial: unknown Wechatpay-Serial 'PUB_KEY_ID_0114000000000000000000000000000001'",
        "NotAuthentic: WeChat Pay signature probe",
        "NotAuthentic: bad signature",
    ]
    assert reasons[4].startswith("amount mismatch")
    assert await post_v3(client, server, (headers, body)) == 204


async def test_a_v3_repeat_is_verified_again_so_a_stale_one_is_refused(
    client: httpx.AsyncClient, server: Server
) -> None:
    """v3 signs in headers with a timestamp: the same bytes are believed only while it is fresh
    (Alipay and v2 carry their signature in the bytes, and nothing else decides)."""
    order = await admin_create_order(client, amount="6.00")
    notice = v3_notice(server, "TRANSACTION.SUCCESS", transaction(effective(server), order["order_no"], 600))
    assert await post_v3(client, server, notice) == 204
    assert await post_v3(client, server, notice) == 204  # a repeat: counted on the notice's row
    mark = await last_id(server)
    server.clock.advance(301)
    assert 400 <= await post_v3(client, server, notice) < 600
    assert [(verified, reason) for verified, _, reason in await stored_since(server, mark)] == [
        (False, "NotAuthentic: timestamp outside the accepted window")
    ]


async def test_fifty_concurrent_v3_notices_credit_a_recharge_once(
    client: httpx.AsyncClient, server: Server
) -> None:
    user = await admin_create_user(client)
    order = await admin_create_order(client, amount="15.00", kind="recharge", user_id=int(user["id"]))
    headers, body = v3_notice(
        server, "TRANSACTION.SUCCESS", transaction(effective(server), order["order_no"], 1500)
    )
    answers = await asyncio.gather(
        *(client.post(path(server), content=body, headers=headers) for _ in range(50))
    )
    assert [a.status_code for a in answers] == [204] * 50
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"
    assert (await admin_get_user(client, user["id"]))["amount"] == "15.00"


# ----------------------------------------------------------------------------------------------
# v3, certificate mode: a notice signed by a certificate we do not hold yet


def _certificate(key: rsa.RSAPrivateKey, serial: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


@asynccontextmanager
async def certificate_standin(
    api_v3_key: str, certs: list[x509.Certificate], signer: rsa.RSAPrivateKey
) -> AsyncIterator[tuple[str, list[str]]]:
    """A WeChat Pay stand-in that only serves /v3/certificates, counting the downloads."""
    calls: list[str] = []
    serial = format(certs[-1].serial_number, "X")

    async def certificates(request: Request) -> Response:
        calls.append(request.headers.get("authorization", ""))
        await asyncio.sleep(0.05)  # long enough for concurrent notices to pile up behind the lock
        body = wechat_pay.certificates_body(certs, api_v3_key)
        headers = wechat_pay.sign_v3_headers(
            body, private_key=signer, serial=serial, timestamp=int(time.time()), nonce=secrets.token_hex(16)
        )
        return Response(body, media_type="application/json", headers=headers)

    port = free_port()
    config = uvicorn.Config(
        Starlette(routes=[Route("/v3/certificates", certificates)]),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", calls
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def extra_server(server: Server, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    port = free_port()
    settings = make_settings(server.backend, server.settings.var_dir, port, **overrides)
    app, uv, task = await start_server(settings, server.clock, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http, app.state.runtime.settings
    finally:
        uv.should_exit = True
        await task


async def test_certificate_mode_refreshes_once_for_a_new_serial(
    client: httpx.AsyncClient, server: Server
) -> None:
    keys = keys_of(server)
    old_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    old_cert = _certificate(old_key, secrets.randbits(64) | 1 << 63)
    new_cert = _certificate(new_key, secrets.randbits(64) | 1 << 63)
    async with certificate_standin(keys.wechatpay_api_v3_key, [old_cert, new_cert], new_key) as (base, calls):
        pay = WechatPaySettings(
            app_id=effective(server).wechat_pay.app_id,
            mch_id=WECHATPAY_MCH_ID,
            api_v3_key=keys.wechatpay_api_v3_key,
            platform_certs=old_cert.public_bytes(serialization.Encoding.PEM).decode(),
            mch_private_key=keys.wechatpay_merchant_private,
            mch_serial_no="5A000000000000000000000000000000000000A1",
            api_base=base,
        )
        async with extra_server(server, sandbox=False, wechat_pay=pay) as (http, settings):
            orders = [await admin_create_order(http, amount="2.00") for _ in range(5)]
            notices = [
                v3_notice(
                    server,
                    "TRANSACTION.SUCCESS",
                    transaction(settings, o["order_no"], 200),
                    serial=format(new_cert.serial_number, "x"),  # serials compare case-insensitively
                    private_key=new_key,
                    settings=settings,
                )
                for o in orders
            ]
            statuses = await asyncio.gather(*(post_v3(http, server, n) for n in notices))
            assert statuses == [204] * 5
            assert len(calls) == 1 and calls[0].startswith("WECHATPAY2-SHA256-RSA2048 mchid=")
            for o in orders:
                assert (await admin_get_order(http, o["order_no"]))["status"] == "paid"
            # A serial nobody knows does not trigger another download (forged serials cost nothing).
            third_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            late = await admin_create_order(http, amount="2.00")
            forged = v3_notice(
                server,
                "TRANSACTION.SUCCESS",
                transaction(settings, late["order_no"], 200),
                serial="7A0000000000000000000000000000000000000F",
                private_key=third_key,
                settings=settings,
            )
            assert await post_v3(http, server, forged) == 400
            assert len(calls) == 1
            # The old certificate still verifies.
            old = v3_notice(
                server,
                "TRANSACTION.SUCCESS",
                transaction(settings, late["order_no"], 200),
                serial=format(old_cert.serial_number, "X"),
                private_key=old_key,
                settings=settings,
            )
            assert await post_v3(http, server, old) == 204


# ----------------------------------------------------------------------------------------------
# the database down


async def test_database_down_answers_failure_within_two_seconds(server: Server) -> None:
    dead = {
        "sqlite": "sqlite+aiosqlite:////nonexistent-dir/x/y.db",
        "postgresql": "postgresql+asyncpg://postgres@127.0.0.1:1/test",
        "mysql": "mysql+asyncmy://root@127.0.0.1:1/test",
    }[server.backend.name]
    settings = make_settings(
        server.backend, server.settings.var_dir, 8000, database_url=dead, db_timeout_seconds=1
    )
    app = create_app(settings, clock=server.clock)
    live = app.state.runtime.settings
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://mallgate"
        ) as http:
            base = live.base_path
            no = unique("DOWN")
            started = time.perf_counter()
            v2 = await http.post(
                base + "/wechat/notify", content=wechat_pay.to_xml(v2_payment(server, no, 100)), headers=XML
            )
            assert time.perf_counter() - started < 2.0
            assert (v2.status_code, wechat_pay.parse_xml(v2.content)["return_code"]) == (200, "FAIL")

            started = time.perf_counter()
            headers, body = v3_notice(server, "TRANSACTION.SUCCESS", transaction(live, no, 100))
            v3 = await http.post(base + "/wechat/notify", content=body, headers=headers)
            assert time.perf_counter() - started < 2.0
            assert v3.status_code >= 500 and v3.json()["code"] == "FAIL"

            started = time.perf_counter()
            ali = await http.post(base + "/pay/notify", data=signed(server, no, "1.00"))
            assert time.perf_counter() - started < 2.0
            assert (ali.status_code, ali.text) == (200, "failure")
    finally:
        await app.state.runtime.close()
