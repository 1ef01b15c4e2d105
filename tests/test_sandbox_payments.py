"""The Alipay and WeChat Pay stand-ins: the whole loop through the service, and the stand-ins alone.

The loop: an order made with the admin API is paid at the sandbox (``POST
/_sandbox/pay``), whose signed notification reaches the service's notify route
over real HTTP. Alone: the notifier is pointed at a small receiver that checks
every signature with the channel's ``verify_*`` functions and answers as told.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import Mount

from conftest import Server, free_port
from mallgate.channels import alipay, wechat_pay
from mallgate.channels.alipay import AlipayApiError, AlipayClient
from mallgate.channels.errors import ChannelError
from mallgate.channels.wechat_pay import V3KeyStore, WechatPayApiError, WechatPayClient
from mallgate.keys import private_pem, public_pem
from mallgate.sandbox.app import (
    ALIPAY_APP_ID,
    ALIPAY_SELLER_ID,
    MOUNT,
    WECHAT_MINI_APP_ID,
    WECHATPAY_MCH_ID,
    SandboxState,
)
from mallgate.sandbox.keys import SandboxKeys
from mallgate.sandbox.notifier import ALIPAY_RETRY_INTERVALS, WECHAT_RETRY_INTERVALS, Notifier, accepted
from mallgate.sandbox.payments import RESOURCE_KEY, Payments, PayRequest
from mallgate.sandbox.trades import SandboxError, fen, parse_yuan
from mallgate.sandbox.wechatpay_standin import CERT_FILE
from mallgate.settings import Settings
from support import admin_create_order, admin_get_order, unique

# ---------------------------------------------------------------------------------------------
# helpers


def sandbox_state(server: Server) -> SandboxState:
    for route in server.app.routes:
        if isinstance(route, Mount) and route.path == MOUNT:
            state: SandboxState = route.app.state.sandbox  # type: ignore[attr-defined]
            return state
    raise AssertionError("the sandbox is not mounted")


def service_payments(server: Server) -> Payments:
    payments = sandbox_state(server).resources[RESOURCE_KEY]
    assert isinstance(payments, Payments)
    return payments


def effective(server: Server) -> Settings:
    """The settings the service runs with: the sandbox's ids and keys."""
    settings: Settings = server.app.state.runtime.settings
    return settings


@pytest.fixture
async def quiet_retries(server: Server) -> AsyncIterator[Payments]:
    """The service's stand-in; retries a test left running are stopped after it."""
    payments = service_payments(server)
    yield payments
    await payments.notifier.cancel_pending()


async def sandbox_pay(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post(f"{MOUNT}/pay", json=body)
    payload: dict[str, Any] = response.json()
    assert response.status_code == 200 and payload["status"] == 1, payload
    data: dict[str, Any] = payload["data"]
    return data


def first_answers(data: dict[str, Any]) -> list[tuple[int | None, str]]:
    return [(d["attempts"][0]["status"], d["attempts"][0]["body"]) for d in data["deliveries"]]


# ---------------------------------------------------------------------------------------------
# a receiver that plays the service: verifies with the channel, fails as often as told


@dataclass
class Received:
    path: str
    fields: dict[str, Any]
    at: float


@dataclass
class Receiver:
    keys: SandboxKeys
    url: str = ""
    fail_first: int = 0
    always_fail: bool = False
    received: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def reset(self, fail_first: int = 0, always_fail: bool = False) -> None:
        self.fail_first, self.always_fail = fail_first, always_fail
        self.received.clear()
        self.errors.clear()

    def _succeeds(self) -> bool:
        return not self.always_fail and len(self.received) > self.fail_first

    def app(self) -> FastAPI:
        app = FastAPI()
        keys = self.keys

        @app.post("/api/pay/notify")
        async def alipay_notify(request: Request) -> Response:
            try:
                notice = alipay.verify_notification(
                    alipay.parse_form(await request.body()),
                    public_key=keys.alipay_platform_public,
                    sign_type="RSA2",
                    app_id=ALIPAY_APP_ID,
                    seller_id=ALIPAY_SELLER_ID,
                )
            except ChannelError as exc:
                self.errors.append(f"alipay: {exc}")
                return Response(alipay.failure())
            self.received.append(Received("alipay", dict(notice.raw), time.monotonic()))
            return Response(alipay.success() if self._succeeds() else alipay.failure())

        @app.post("/api/wechat/notify")
        async def wechat_notify(request: Request) -> Response:
            body = await request.body()
            if body.startswith(b"<xml>"):
                try:
                    if b"<req_info>" in body:
                        refund = wechat_pay.verify_v2_refund(
                            body,
                            api_key=keys.wechatpay_api_key,
                            app_id=WECHAT_MINI_APP_ID,
                            mch_id=WECHATPAY_MCH_ID,
                        )
                        fields: dict[str, Any] = dict(refund.raw)
                    else:
                        payment = wechat_pay.verify_v2_payment(
                            body,
                            api_key=keys.wechatpay_api_key,
                            app_id=WECHAT_MINI_APP_ID,
                            mch_id=WECHATPAY_MCH_ID,
                        )
                        fields = dict(payment.raw)
                except ChannelError as exc:
                    self.errors.append(f"v2: {exc}")
                    return Response(wechat_pay.v2_fail("bad"))
                self.received.append(Received("v2", fields, time.monotonic()))
                answer = wechat_pay.v2_success() if self._succeeds() else wechat_pay.v2_fail("try again")
                return Response(answer, media_type="application/xml")
            store = V3KeyStore(
                public_key_id=keys.wechatpay_public_key_id, public_key=keys.wechatpay_platform_public
            )
            try:
                event = wechat_pay.verify_v3_notification(
                    dict(request.headers),
                    body,
                    keys=store,
                    api_v3_key=keys.wechatpay_api_v3_key,
                    app_id=WECHAT_MINI_APP_ID,
                    mch_id=WECHATPAY_MCH_ID,
                    now=time.time(),
                )
            except ChannelError as exc:
                self.errors.append(f"v3: {exc}")
                status, content = wechat_pay.v3_fail("bad", 401)
                return Response(content, status_code=status)
            self.received.append(
                Received(
                    "v3",
                    {**event.raw, "_event_id": event.event_id, "_type": event.event_type},
                    time.monotonic(),
                )
            )
            status, content = wechat_pay.v3_success() if self._succeeds() else wechat_pay.v3_fail("later")
            return Response(content, status_code=status)

        return app


@pytest.fixture(scope="module")
def keys(sandbox_var: Path) -> SandboxKeys:
    # The same folder as the service's sandbox: key generation is the slow part.
    return SandboxKeys.load_or_create(sandbox_var / "sandbox")


@pytest.fixture(scope="module")
async def receiver(keys: SandboxKeys) -> AsyncIterator[Receiver]:
    recv = Receiver(keys)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(recv.app(), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    recv.url = f"http://127.0.0.1:{port}"
    yield recv
    server.should_exit = True
    await task


MINUTE = 0.002  # one real minute: Alipay's whole day of retries takes about 3 s


@pytest.fixture
async def alone(keys: SandboxKeys, sandbox_var: Path, receiver: Receiver) -> AsyncIterator[Payments]:
    """The payment stand-ins outside the service, notifying the receiver, with time squeezed."""
    receiver.reset()
    state = SandboxState(keys=keys, folder=sandbox_var / "sandbox", service_url=f"{receiver.url}/api")
    payments = Payments(state, notifier=Notifier(minute=MINUTE))
    yield payments
    await payments.aclose()


async def settle_all(payments: Payments) -> None:
    async with asyncio.timeout(10):
        await payments.notifier.wait_idle()


# ---------------------------------------------------------------------------------------------
# the stand-ins alone: signatures, retries, duplicates


@pytest.mark.parametrize("fails", [0, 2])
async def test_alipay_notification_verifies_and_retries_until_success(
    alone: Payments, receiver: Receiver, fails: int
) -> None:
    receiver.reset(fail_first=fails)
    outcome = await alone.pay(PayRequest(channel="alipay", order_no="A-" + unique(), amount="19.99"))
    (delivery,) = outcome.deliveries
    assert delivery.attempts[0].ok is (fails == 0)
    await settle_all(alone)
    await asyncio.sleep(20 * MINUTE)  # longer than the next interval: nothing more may come
    assert receiver.errors == []
    assert len(receiver.received) == fails + 1 == len(delivery.attempts)
    assert delivery.state == "delivered" and [a.ok for a in delivery.attempts] == [False] * fails + [True]
    assert [a.body for a in delivery.attempts] == ["failure"] * fails + ["success"]
    notices = [r.fields for r in receiver.received]
    assert {n["notify_id"] for n in notices} == {notices[0]["notify_id"]}  # one id across re-sends
    first = notices[0]
    assert first["trade_status"] == "TRADE_SUCCESS" and first["total_amount"] == "19.99"
    assert first["trade_no"] == outcome.trade.trade_no and len(first["trade_no"]) == 28
    assert first["out_trade_no"] == outcome.trade.out_trade_no
    assert first["notify_type"] == "trade_status_sync" and first["charset"] == "utf-8"
    assert json.loads(first["fund_bill_list"]) == [{"amount": "19.99", "fundChannel": "ALIPAYACCOUNT"}]
    assert first["buyer_id"].startswith("2088") and first["gmt_payment"] and first["notify_time"]
    if fails:
        # The gaps follow Alipay's schedule, compressed: 4 min, then 10 min.
        gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
        assert gaps[0] >= 4 * MINUTE * 0.9 and gaps[1] >= 10 * MINUTE * 0.9


@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_wechat_notification_verifies_and_retries_until_success(
    alone: Payments, receiver: Receiver, version: str
) -> None:
    receiver.reset(fail_first=2)
    outcome = await alone.pay(
        PayRequest(channel="wechat", order_no="W-" + unique(), amount="19.99", wechat_version=version)
    )
    await settle_all(alone)
    await asyncio.sleep(20 * MINUTE)
    assert receiver.errors == []
    (delivery,) = outcome.deliveries
    assert len(receiver.received) == 3 == len(delivery.attempts)
    assert delivery.state == "delivered" and [a.ok for a in delivery.attempts] == [False, False, True]
    assert delivery.protocol == f"wechat_{version}"
    fields = receiver.received[0].fields
    assert fields["out_trade_no"] == outcome.trade.out_trade_no
    assert fields["transaction_id"] == outcome.trade.trade_no and fields["transaction_id"].startswith("4200")
    if version == "v2":
        assert fields["total_fee"] == "1999" and fields["result_code"] == "SUCCESS"
        assert fields["appid"] == WECHAT_MINI_APP_ID and fields["mch_id"] == WECHATPAY_MCH_ID
        assert delivery.attempts[-1].status == 200 and "SUCCESS" in delivery.attempts[-1].body
    else:
        assert fields["amount"]["total"] == 1999 and fields["trade_state"] == "SUCCESS"
        assert fields["_type"] == "TRANSACTION.SUCCESS"
        assert {r.fields["_event_id"] for r in receiver.received} == {fields["_event_id"]}
        assert [a.status for a in delivery.attempts] == [500, 500, 204]


@pytest.mark.parametrize(
    ("protocol", "channel", "version"), [("alipay", "alipay", "v2"), ("v3", "wechat", "v3")]
)
async def test_delivery_gives_up_after_the_whole_schedule(
    keys: SandboxKeys, sandbox_var: Path, receiver: Receiver, protocol: str, channel: str, version: str
) -> None:
    receiver.reset(always_fail=True)
    state = SandboxState(keys=keys, folder=sandbox_var / "sandbox", service_url=f"{receiver.url}/api")
    payments = Payments(state, notifier=Notifier(minute=0.0002))
    try:
        outcome = await payments.pay(
            PayRequest(channel=channel, order_no=unique(), amount="1.00", wechat_version=version)
        )
        await settle_all(payments)
    finally:
        await payments.aclose()
    expected = 1 + len(ALIPAY_RETRY_INTERVALS if channel == "alipay" else WECHAT_RETRY_INTERVALS)
    assert expected == (8 if channel == "alipay" else 16)
    (delivery,) = outcome.deliveries
    assert delivery.state == "failed" and len(delivery.attempts) == expected
    assert len(receiver.received) == expected and receiver.errors == []
    assert not any(a.ok for a in delivery.attempts)


@pytest.mark.parametrize(("channel", "version"), [("alipay", "v2"), ("wechat", "v2"), ("wechat", "v3")])
async def test_duplicates_are_delivered_n_plus_one_times(
    alone: Payments, receiver: Receiver, channel: str, version: str
) -> None:
    outcome = await alone.pay(
        PayRequest(channel=channel, order_no=unique(), amount="5.00", wechat_version=version, duplicates=3)
    )
    assert len(outcome.deliveries) == 4 and [d.copy for d in outcome.deliveries] == [0, 1, 2, 3]
    assert all(d.delivered and len(d.attempts) == 1 for d in outcome.deliveries)
    await settle_all(alone)
    assert len(receiver.received) == 4 and receiver.errors == []
    trade_ids = {r.fields.get("trade_no") or r.fields.get("transaction_id") for r in receiver.received}
    assert trade_ids == {outcome.trade.trade_no}


async def test_refund_notifications_verify(alone: Payments, receiver: Receiver) -> None:
    order = unique()
    await alone.pay(PayRequest(channel="alipay", order_no=order, amount="10.00"))
    partial = await alone.pay(
        PayRequest(channel="alipay", order_no=order, kind="refund", refund_amount="3.00")
    )
    rest = await alone.pay(PayRequest(channel="alipay", order_no=order, kind="refund"))
    assert partial.refund_amount == Decimal("3.00") and rest.refund_amount == Decimal("7.00")
    pay_notice, partial_notice, full_notice = (r.fields for r in receiver.received)
    assert partial_notice["trade_status"] == "TRADE_SUCCESS" and partial_notice["refund_fee"] == "3.00"
    # refund_fee is cumulative at Alipay; the full refund closes the trade.
    assert full_notice["trade_status"] == "TRADE_CLOSED" and full_notice["refund_fee"] == "10.00"
    assert partial_notice["gmt_refund"] and partial_notice["out_biz_no"] != full_notice["out_biz_no"]
    assert pay_notice["notify_id"] != partial_notice["notify_id"] != full_notice["notify_id"]
    with pytest.raises(SandboxError):
        await alone.pay(PayRequest(channel="alipay", order_no=order, kind="refund"))

    receiver.reset()
    for version in ("v2", "v3"):
        order = unique()
        await alone.pay(PayRequest(channel="wechat", order_no=order, amount="10.00", wechat_version=version))
        for amount in ("2.50", "1.50"):
            await alone.pay(
                PayRequest(
                    channel="wechat",
                    order_no=order,
                    kind="refund",
                    refund_amount=amount,
                    wechat_version=version,
                )
            )
    v2_pay, v2_refund, v2_second, v3_pay, v3_refund, v3_second = (r.fields for r in receiver.received)
    assert receiver.errors == []
    # WeChat's refund_fee is the one refund's amount, not the running total.
    assert (
        v2_refund["refund_fee"] == "250"
        and v2_second["refund_fee"] == "150"
        and v2_refund["total_fee"] == "1000"
    )
    assert v2_refund["refund_status"] == "SUCCESS" and v2_refund["transaction_id"] == v2_pay["transaction_id"]
    assert v2_refund["out_refund_no"] != v2_second["out_refund_no"]
    assert v3_refund["_type"] == "REFUND.SUCCESS" and v3_refund["amount"]["refund"] == 250
    assert v3_second["amount"]["refund"] == 150 and v3_refund["transaction_id"] == v3_pay["transaction_id"]


async def test_close(alone: Payments, receiver: Receiver) -> None:
    order = unique()
    closed = await alone.pay(PayRequest(channel="alipay", order_no=order, amount="3.00", kind="close"))
    (notice,) = (r.fields for r in receiver.received)
    assert notice["trade_status"] == "TRADE_CLOSED" and "refund_fee" not in notice and notice["gmt_close"]
    assert closed.deliveries[0].delivered
    with pytest.raises(SandboxError, match="closed"):
        await alone.pay(PayRequest(channel="alipay", order_no=order))
    wechat = await alone.pay(PayRequest(channel="wechat", order_no=unique(), amount="3.00", kind="close"))
    assert wechat.deliveries == [] and "no notification" in wechat.note


def test_only_the_exact_answers_end_the_retries() -> None:
    assert accepted("alipay", 200, b"success")
    for body in (b"success\n", b"SUCCESS", b" success", b"<html>success</html>", b'"success"'):
        assert not accepted("alipay", 200, body), body
    assert not accepted("alipay", 500, b"success")
    assert accepted("wechat_v2", 200, wechat_pay.v2_success())
    assert not accepted("wechat_v2", 200, wechat_pay.v2_fail("x"))
    assert not accepted("wechat_v2", 200, b"SUCCESS")
    assert not accepted("wechat_v2", 500, wechat_pay.v2_success())
    assert accepted("wechat_v3", 204, b"") and accepted("wechat_v3", 200, b"")
    assert not accepted("wechat_v3", 500, b'{"code":"FAIL"}') and not accepted("wechat_v3", 302, b"")


def test_retry_schedules_are_compressed() -> None:
    notifier = Notifier(minute=0.05)
    assert notifier.delay("alipay", 0) == pytest.approx(0.2)  # 4 min
    assert notifier.delay("wechat_v2", 0) == pytest.approx(0.0125)  # 15 s
    assert sum(notifier.delay("alipay", i) for i in range(7)) == pytest.approx(1464 * 0.05)
    assert sum(notifier.delay("wechat_v3", i) for i in range(15)) == pytest.approx(1444 * 0.05)


def test_yuan_to_fen_is_exact() -> None:
    assert [fen(parse_yuan(v)) for v in ("0.01", "9.9", "9.90", "19.99", "1", "1234567.89")] == [
        1,
        990,
        990,
        1999,
        100,
        123456789,
    ]
    for bad in ("0", "0.00", "9.999", "-1", "1e3", "１２", "", "NaN", "1,00"):
        with pytest.raises(SandboxError):
            parse_yuan(bad)


# ---------------------------------------------------------------------------------------------
# the whole loop through the service


async def test_alipay_payment_reaches_the_service(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments
) -> None:
    order = await admin_create_order(client, amount="12.34")
    data = await sandbox_pay(client, channel="alipay", order_no=order["order_no"], amount="12.34")
    assert first_answers(data) == [(200, "success")] and data["delivered"] is True
    paid = await admin_get_order(client, order["order_no"])
    assert paid["status"] == "paid" and paid["channel"] == "alipay"
    assert paid["trade_no"] == data["trade_no"] and Decimal(paid["paid_amount"]) == Decimal("12.34")


@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_wechat_payment_reaches_the_service(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments, version: str
) -> None:
    order = await admin_create_order(client, amount="0.01")
    data = await sandbox_pay(
        client, channel="wechat", order_no=order["order_no"], amount="0.01", wechat_version=version
    )
    ((status, body),) = first_answers(data)
    if version == "v2":
        assert status == 200 and wechat_pay.parse_xml(body)["return_code"] == "SUCCESS"
    else:
        assert status in (200, 204)
    paid = await admin_get_order(client, order["order_no"])
    assert paid["status"] == "paid" and paid["channel"] == "wechat" and paid["trade_no"] == data["trade_no"]


@pytest.mark.parametrize(("channel", "version"), [("alipay", "v2"), ("wechat", "v3")])
async def test_duplicates_through_the_service_pay_once(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments, channel: str, version: str
) -> None:
    order = await admin_create_order(client, amount="8.00")
    data = await sandbox_pay(
        client,
        channel=channel,
        order_no=order["order_no"],
        amount="8.00",
        wechat_version=version,
        duplicates=4,
    )
    assert len(data["deliveries"]) == 5
    assert all(d["delivered"] and len(d["attempts"]) == 1 for d in data["deliveries"]), data["deliveries"]
    paid = await admin_get_order(client, order["order_no"])
    assert paid["status"] == "paid" and Decimal(paid["paid_amount"]) == Decimal("8.00")


async def test_refund_through_the_service(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments
) -> None:
    order = await admin_create_order(client, amount="10.00")
    await sandbox_pay(client, channel="alipay", order_no=order["order_no"], amount="10.00")
    data = await sandbox_pay(
        client, channel="alipay", order_no=order["order_no"], kind="refund", refund_amount="4.00"
    )
    assert first_answers(data) == [(200, "success")]
    after = await admin_get_order(client, order["order_no"])
    assert after["status"] == "partially_refunded" and Decimal(after["refunded_amount"]) == Decimal("4.00")


async def test_a_notification_the_service_refuses_is_retried(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments
) -> None:
    # The service knows no such order: it must not answer success, so the stand-in keeps trying
    # through the whole (squeezed) schedule and then gives up.
    quiet_retries.notifier.minute = 0.0005
    try:
        data = await sandbox_pay(client, channel="alipay", order_no=unique("NONE"), amount="1.00")
        assert data["delivered"] is False and first_answers(data)[0][1] != "success"
        await settle_all(quiet_retries)
    finally:
        quiet_retries.notifier.minute = 0.05
    log = (await client.get(f"{MOUNT}/pay/deliveries", params={"order_no": data["order_no"]})).json()
    assert log["status"] == 1
    ((delivery,),) = [log["data"]]
    assert delivery["state"] == "failed" and len(delivery["attempts"]) == 8
    assert all(a["status"] == 200 and a["body"] == "failure" for a in delivery["attempts"])


# ---------------------------------------------------------------------------------------------
# the platforms' APIs, called with the service's own clients


async def test_alipay_trade_query(server: Server, client: httpx.AsyncClient, quiet_retries: Payments) -> None:
    order = await admin_create_order(client, amount="7.70")
    async with AlipayClient(effective(server).alipay) as api:
        before = await api.trade_query(order["order_no"])
        assert before.trade_status == "NOT_EXIST" and before.sub_code == "ACQ.TRADE_NOT_EXIST"
        data = await sandbox_pay(client, channel="alipay", order_no=order["order_no"], amount="7.70")
        after = await api.trade_query(order["order_no"])
    assert after.code == "10000" and after.trade_status == "TRADE_SUCCESS"
    assert after.total_amount == Decimal("7.70") and after.trade_no == data["trade_no"]
    assert after.raw["fund_bill_list"] == [{"amount": "7.70", "fund_channel": "ALIPAYACCOUNT"}]


async def test_alipay_gateway_refuses_bad_signatures_and_other_apps(server: Server) -> None:
    settings = effective(server).alipay
    stranger = private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    async with AlipayClient(settings.model_copy(update={"private_key": stranger})) as api:
        with pytest.raises(AlipayApiError) as bad_sign:
            await api.trade_query("X1")
    assert bad_sign.value.sub_code == "isv.invalid-signature"
    async with AlipayClient(settings.model_copy(update={"app_id": "2021000000009999"})) as api:
        with pytest.raises(AlipayApiError) as other_app:
            await api.trade_query("X1")
    assert other_app.value.sub_code == "isv.invalid-app-id"


async def test_alipay_wap_cashier_pays(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments
) -> None:
    order = await admin_create_order(client, amount="3.30", subject="苹果")
    url = alipay.wap_pay_url(
        effective(server).alipay,
        notify_url=f"{server.api}/pay/notify",
        out_trade_no=order["order_no"],
        total_amount=Decimal("3.30"),
        subject="苹果",
        return_url="https://shop.example/done",
    )
    cashier = await client.get(url)
    assert cashier.status_code == 200 and order["order_no"] in cashier.text and "3.30" in cashier.text
    # The same link with the amount changed no longer matches its signature.
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["biz_content"] = query["biz_content"].replace("3.30", "0.01")
    forged = await client.get(f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}")
    assert forged.status_code == 400 and "isv.invalid-signature" in forged.text
    paid = await client.post(f"{MOUNT}/alipay/cashier/pay", data={"out_trade_no": order["order_no"]})
    assert paid.status_code == 303  # redirect after POST: a refresh shows the result, it pays nothing
    paid_page = await client.get(f"{MOUNT}/alipay/cashier/{paid.headers['location']}")
    assert paid_page.status_code == 200 and "https://shop.example/done?" in paid_page.text
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"


async def test_wechat_unifiedorder_and_orderquery(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments
) -> None:
    order = await admin_create_order(client, amount="6.66")
    async with WechatPayClient(effective(server).wechat_pay) as api:
        unknown = await api.order_query(order["order_no"])
        assert unknown.trade_state == "NOT_EXIST"
        prepay = await api.unified_order(
            out_trade_no=order["order_no"],
            total_fee=666,
            body="测试",
            trade_type="JSAPI",
            notify_url=f"{server.api}/wechat/notify",
            client_ip="127.0.0.1",
            openid="oUser0000000000000000000001",
        )
        assert prepay.prepay_id.startswith("wx") and prepay.trade_type == "JSAPI"
        waiting = await api.order_query(order["order_no"])
        assert waiting.trade_state == "NOTPAY" and waiting.total_fee == 666 and not waiting.paid
        data = await sandbox_pay(
            client, channel="wechat", order_no=order["order_no"]
        )  # amount known from prepay
        paid = await api.order_query(order["order_no"])
    assert paid.paid and paid.total_fee == 666 and paid.transaction_id == data["trade_no"]
    assert paid.raw["openid"] == "oUser0000000000000000000001"
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"


async def test_wechat_native_and_mweb(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments
) -> None:
    order = await admin_create_order(client, amount="1.00")
    common: dict[str, Any] = {
        "body": "b",
        "notify_url": f"{server.api}/wechat/notify",
        "client_ip": "127.0.0.1",
    }
    async with WechatPayClient(effective(server).wechat_pay) as api:
        native = await api.unified_order(out_trade_no=unique(), total_fee=100, trade_type="NATIVE", **common)
        assert native.code_url.startswith("weixin://wxpay/bizpayurl?pr=")
        mweb = await api.unified_order(
            out_trade_no=order["order_no"], total_fee=100, trade_type="MWEB", **common
        )
    assert mweb.mweb_url.startswith(f"{server.url}{MOUNT}/wechatpay/cashier?prepay_id={mweb.prepay_id}")
    page = await client.get(mweb.mweb_url)
    assert page.status_code == 200 and order["order_no"] in page.text and "1.00" in page.text
    paid = await client.post(f"{MOUNT}/wechatpay/cashier/pay", data={"prepay_id": mweb.prepay_id})
    assert paid.status_code == 303
    paid_page = await client.get(f"{MOUNT}/wechatpay/cashier/{paid.headers['location']}")
    assert paid_page.status_code == 200 and order["order_no"] in paid_page.text
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"


async def test_wechat_v2_refuses_a_bad_signature(server: Server) -> None:
    settings = effective(server).wechat_pay.model_copy(update={"api_key": "0" * 32})
    async with WechatPayClient(settings) as api:
        with pytest.raises(WechatPayApiError, match="签名错误"):
            await api.order_query("X1")
        with pytest.raises(WechatPayApiError):
            await api.unified_order(
                out_trade_no="X1",
                total_fee=1,
                body="b",
                trade_type="NATIVE",
                notify_url="http://x/",
                client_ip="1.1.1.1",
            )


async def test_wechat_v3_certificates(server: Server) -> None:
    settings = effective(server).wechat_pay
    store = V3KeyStore()
    async with WechatPayClient(settings, keys=store) as api:
        ((serial, pem),) = await api.fetch_certificates()
    kept = (sandbox_state(server).folder / CERT_FILE).read_text()
    assert pem == kept and store.serials == [serial]
    key = store.get(serial)
    # The certificate carries WeChat Pay's key: the one v3 notifications are signed with.
    assert key is not None and public_pem(key) == sandbox_state(server).keys.wechatpay_platform_public
    # A caller without the merchant's key is refused.
    stranger = private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    async with WechatPayClient(settings.model_copy(update={"mch_private_key": stranger})) as api:
        with pytest.raises(WechatPayApiError) as refused:
            await api.fetch_certificates()
    assert refused.value.code == "SIGN_ERROR"


# ---------------------------------------------------------------------------------------------
# the page and the JSON call's refusals


async def test_pay_page_form_and_delivery_log(
    server: Server, client: httpx.AsyncClient, quiet_retries: Payments
) -> None:
    index = await client.get(f"{MOUNT}/")
    assert "Alipay" in index.text and "WeChat Pay" in index.text and 'href="./pay"' in index.text
    form_page = await client.get(f"{MOUNT}/pay")
    assert form_page.status_code == 200 and "<form" in form_page.text and 'name="order_no"' in form_page.text
    order = await admin_create_order(client, amount="2.00")
    sent = await client.post(
        f"{MOUNT}/pay",
        data={"channel": "wechat", "order_no": order["order_no"], "amount": "2.00", "wechat_version": "v3"},
    )
    assert sent.status_code == 303
    shown = await client.get(f"{MOUNT}/{sent.headers['location']}")
    assert shown.status_code == 200 and order["order_no"] in shown.text
    log = (await client.get(f"{MOUNT}/pay/deliveries", params={"order_no": order["order_no"]})).json()
    assert log["status"] == 1 and [d["protocol"] for d in log["data"]] == ["wechat_v3"]
    assert log["data"][0]["attempts"][0]["status"] in (200, 204)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"channel": "alipay", "order_no": "X", "amount": 9.9}, "amount"),
        ({"channel": "paypal", "order_no": "X", "amount": "1.00"}, "channel"),
        ({"channel": "alipay", "order_no": "X", "amount": "1.001"}, "two decimals"),
        ({"channel": "alipay", "order_no": unique(), "kind": "pay"}, "give its amount"),
        ({"channel": "wechat", "order_no": unique(), "amount": "1.00", "kind": "refund"}, "not paid"),
        ({"channel": "alipay", "order_no": "X", "amount": "1.00", "duplicates": 1000}, "duplicates"),
    ],
)
async def test_pay_call_refuses_bad_input(
    server: Server, client: httpx.AsyncClient, body: dict[str, Any], reason: str
) -> None:
    response = await client.post(f"{MOUNT}/pay", json=body)
    payload = response.json()
    assert response.status_code == 400 and payload["status"] == 0 and reason in payload["info"], payload
