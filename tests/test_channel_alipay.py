"""Alipay channel: the V1 check string, charsets, signatures both ways, calls against a fake gateway."""

from __future__ import annotations

import json
from base64 import b64encode
from collections.abc import Mapping
from decimal import Decimal
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mallgate.channels import alipay
from mallgate.channels.alipay import (
    AlipayApiError,
    AlipayClient,
    AlipayNotification,
    ForeignNotification,
    MalformedNotification,
    canonical_string,
    parse_form,
    sign_notification,
    sign_params,
    sign_request,
    sign_response,
    verify_notification,
    verify_request,
    verify_response,
)
from mallgate.channels.errors import ChannelError, NotAuthentic
from mallgate.clock import Clock
from mallgate.keys import private_pem, public_pem
from mallgate.settings import AlipaySettings

APP_ID = "2021000123456789"
SELLER = "2088101122136241"


@pytest.fixture(scope="module")
def alipay_key() -> rsa.RSAPrivateKey:
    """Stands in for Alipay's own key pair (its public half is "the Alipay public key")."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def merchant_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def paid_notice(**overrides: str) -> dict[str, str]:
    params = {
        "notify_time": "2024-05-20 10:15:09",
        "notify_type": "trade_status_sync",
        "notify_id": "2024052000222101509055331449999999",
        "app_id": APP_ID,
        "auth_app_id": APP_ID,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": "2024052022001455331449999999",
        "out_trade_no": "M2405201015030001",
        "buyer_id": "2088102177846875",
        "seller_id": SELLER,
        "trade_status": "TRADE_SUCCESS",
        "total_amount": "88.00",
        "receipt_amount": "88.00",
        "subject": "商品 A",
        "gmt_create": "2024-05-20 10:15:03",
        "gmt_payment": "2024-05-20 10:15:08",
        "fund_bill_list": '[{"amount":"88.00","fundChannel":"ALIPAYACCOUNT"}]',
    }
    params.update(overrides)
    return params


def check(params: dict[str, str], key: rsa.RSAPrivateKey, **kwargs: str) -> AlipayNotification:
    options: dict[str, str] = {"sign_type": "RSA2", "app_id": APP_ID, "seller_id": SELLER, **kwargs}
    return verify_notification(
        params,
        public_key=key.public_key(),
        sign_type=options["sign_type"],  # type: ignore[arg-type]
        app_id=options["app_id"],
        seller_id=options["seller_id"],
    )


# ---------------------------------------------------------------------------------------------
# the check string


def test_canonical_string_follows_v1() -> None:
    params = {
        "total_amount": "88.00",
        "sign": "xxx",
        "sign_type": "RSA2",
        "app_id": "2021000123456789",
        "empty": "",
        "fund_bill_list": '[{"amount":"88.00","fundChannel":"ALIPAYACCOUNT"}]',
        "gmt_create": "2024-05-20 10:15:03",
    }
    assert canonical_string(params) == (
        "app_id=2021000123456789"
        '&fund_bill_list=[{"amount":"88.00","fundChannel":"ALIPAYACCOUNT"}]'
        "&gmt_create=2024-05-20 10:15:03&total_amount=88.00"
    )
    # requests keep sign_type in the signed text
    assert canonical_string(params, drop_sign_type=False) == (
        "app_id=2021000123456789"
        '&fund_bill_list=[{"amount":"88.00","fundChannel":"ALIPAYACCOUNT"}]'
        "&gmt_create=2024-05-20 10:15:03&sign_type=RSA2&total_amount=88.00"
    )


def test_canonical_string_sorts_by_byte_order() -> None:
    assert canonical_string({"b": "1", "B": "2", "a_b": "3", "aB": "4"}) == "B=2&aB=4&a_b=3&b=1"


# ---------------------------------------------------------------------------------------------
# parse_form


def test_parse_form_decodes_once() -> None:
    body = b"a=1+2&b=%2B%26%3D&c=%25252B&d="
    assert parse_form(body) == {"a": "1 2", "b": "+&=", "c": "%252B", "d": ""}


def test_parse_form_merges_query_and_refuses_repeats() -> None:
    assert parse_form(b"a=1", "b=2") == {"a": "1", "b": "2"}
    with pytest.raises(MalformedNotification):
        parse_form(b"a=1&a=2")
    with pytest.raises(MalformedNotification):
        parse_form(b"a=1", "a=1")


def test_parse_form_refuses_unknown_charset_and_bad_bytes() -> None:
    with pytest.raises(MalformedNotification):
        parse_form(b"charset=latin-9&a=1")
    with pytest.raises(MalformedNotification):
        parse_form(b"charset=utf-8&a=%B2%E2")


def test_gbk_notification_verifies_after_parse_form(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(
        paid_notice(charset="gbk", subject="测试商品", body="中文描述 + 符号"), alipay_key
    )
    body = urlencode(notice, encoding="gbk").encode("ascii")
    # 测 is B2E2 in GBK (E6B58B in UTF-8): the body really is GBK
    assert b"%B2%E2" in body and b"%E6%B5%8B" not in body
    parsed = parse_form(body)
    assert parsed["subject"] == "测试商品"
    assert parsed["body"] == "中文描述 + 符号"
    note = check(parsed, alipay_key)
    assert note.raw["subject"] == "测试商品"
    # the same text signed as UTF-8 bytes does not pass for a GBK notice
    forged = dict(parsed)
    forged["sign"] = sign_params({**parsed, "charset": "utf-8"}, alipay_key, "RSA2")
    with pytest.raises(NotAuthentic):
        check(forged, alipay_key)


def test_gb2312_label_is_read_as_gbk(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(charset="gb2312", subject="订单"), alipay_key)
    parsed = parse_form(urlencode(notice, encoding="gbk").encode())
    assert check(parsed, alipay_key).raw["subject"] == "订单"


def test_escaped_json_and_passback_params_survive(alipay_key: rsa.RSAPrivateKey) -> None:
    passback = "a=1&b=2+3 %41"
    vouchers = '[{"id":"x&y=z","name":"满100减10 +","memo":"&quot;q&quot; <b>"}]'
    notice = sign_notification(
        paid_notice(passback_params=passback, voucher_detail_list=vouchers), alipay_key
    )
    parsed = parse_form(urlencode(notice).encode())
    note = check(parsed, alipay_key)
    assert note.raw["passback_params"] == passback
    assert note.raw["voucher_detail_list"] == vouchers
    assert note.raw["fund_bill_list"] == '[{"amount":"88.00","fundChannel":"ALIPAYACCOUNT"}]'


def test_query_string_notification(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    # a GET notification: the framework hands over the raw query as latin-1 text
    raw_query = urlencode(notice).encode("ascii").decode("latin-1")
    assert check(parse_form(b"", raw_query), alipay_key).out_trade_no == "M2405201015030001"


# ---------------------------------------------------------------------------------------------
# verify_notification


def test_valid_rsa2_notification(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), alipay_key, "RSA2")
    assert notice["sign_type"] == "RSA2"
    assert len(notice["sign"]) == 344  # 2048-bit signature in base64
    note = check(notice, alipay_key)
    assert note.out_trade_no == "M2405201015030001"
    assert note.trade_no == "2024052022001455331449999999"
    assert note.trade_status == "TRADE_SUCCESS"
    assert note.total_amount == Decimal("88.00")
    assert note.refund_fee is None
    assert note.is_refund is False
    assert note.is_paid is True
    assert note.app_id == APP_ID and note.seller_id == SELLER
    assert note.buyer_id == "2088102177846875"
    assert note.notify_id == "2024052000222101509055331449999999"
    assert note.gmt_payment == "2024-05-20 10:15:08"
    assert note.raw["subject"] == "商品 A"


def test_valid_legacy_rsa_notification(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(total_amount="20"), alipay_key, "RSA")
    note = check(notice, alipay_key, sign_type="RSA")
    assert note.total_amount == Decimal("20.00")


def test_string_key_is_accepted(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    pem = public_pem(alipay_key.public_key())
    bare = "".join(pem.splitlines()[1:-1])  # the one-line base64 the console shows
    for key in (pem, bare):
        note = verify_notification(notice, public_key=key, sign_type="RSA2", app_id=APP_ID)
        assert note.total_amount == Decimal("88.00")


def test_tampered_amount_is_refused(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    notice["total_amount"] = "0.01"
    with pytest.raises(NotAuthentic):
        check(notice, alipay_key)


def test_added_field_is_refused(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    notice["refund_fee"] = "88.00"
    with pytest.raises(NotAuthentic):
        check(notice, alipay_key)


def test_wrong_key_is_refused(alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), merchant_key)
    with pytest.raises(NotAuthentic):
        check(notice, alipay_key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_changing_any_one_field_is_refused(alipay_key: rsa.RSAPrivateKey, data: st.DataObject) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    name = data.draw(st.sampled_from(sorted(k for k in notice if k not in ("sign", "sign_type", "charset"))))
    value = data.draw(st.text(max_size=30).filter(lambda v: v != notice[name]))
    notice[name] = value
    with pytest.raises(NotAuthentic):
        check(notice, alipay_key)


def test_sign_type_downgrade_is_refused(alipay_key: rsa.RSAPrivateKey) -> None:
    sha1_notice = sign_notification(paid_notice(), alipay_key, "RSA")
    # honest label: refused because it differs from our configuration
    with pytest.raises(NotAuthentic, match="sign_type"):
        check(sha1_notice, alipay_key, sign_type="RSA2")
    # lying label: the SHA-1 signature does not pass as SHA-256
    relabelled = {**sha1_notice, "sign_type": "RSA2"}
    with pytest.raises(NotAuthentic):
        check(relabelled, alipay_key, sign_type="RSA2")
    # without any label the configured hash still rules
    unlabelled = {k: v for k, v in sha1_notice.items() if k != "sign_type"}
    with pytest.raises(NotAuthentic):
        check(unlabelled, alipay_key, sign_type="RSA2")
    # and the label is not a way in the other direction either
    sha256_notice = sign_notification(paid_notice(), alipay_key, "RSA2")
    with pytest.raises(NotAuthentic):
        check(sha256_notice, alipay_key, sign_type="RSA")


@pytest.mark.parametrize("sign", [None, "", "not base64!", "AAAA"])
def test_missing_or_broken_sign_is_refused(alipay_key: rsa.RSAPrivateKey, sign: str | None) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    if sign is None:
        del notice["sign"]
    else:
        notice["sign"] = sign
    with pytest.raises(NotAuthentic):
        check(notice, alipay_key)


def test_foreign_app_id_is_its_own_error(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(app_id="2021009999999999"), alipay_key)
    with pytest.raises(ForeignNotification) as caught:
        check(notice, alipay_key)
    assert not isinstance(caught.value, NotAuthentic)
    assert isinstance(caught.value, ChannelError)


def test_foreign_seller_is_refused_and_missing_seller_is_not(alipay_key: rsa.RSAPrivateKey) -> None:
    foreign = sign_notification(paid_notice(seller_id="2088000000000001"), alipay_key)
    with pytest.raises(ForeignNotification):
        check(foreign, alipay_key)
    # not configured: any seller of our app is accepted
    assert check(foreign, alipay_key, seller_id="").seller_id == "2088000000000001"
    without = paid_notice()
    del without["seller_id"]
    assert check(sign_notification(without, alipay_key), alipay_key).seller_id == ""


def test_foreign_is_only_reported_for_authentic_notices(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    notice["app_id"] = "2021009999999999"
    with pytest.raises(NotAuthentic):
        check(notice, alipay_key)


@pytest.mark.parametrize("amount", ["88.001", "-1.00", "1e3", "NaN", "88,00", " 88.00", "８８"])
def test_malformed_amount(alipay_key: rsa.RSAPrivateKey, amount: str) -> None:
    notice = sign_notification(paid_notice(total_amount=amount), alipay_key)
    with pytest.raises(MalformedNotification):
        check(notice, alipay_key)


def test_refund_notice(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(
        paid_notice(refund_fee="10.50", gmt_refund="2024-05-21 09:00:00.123", out_biz_no="R1"), alipay_key
    )
    note = check(notice, alipay_key)
    assert note.is_refund is True
    assert note.is_paid is False
    assert note.refund_fee == Decimal("10.50")
    assert note.gmt_refund == "2024-05-21 09:00:00.123"
    closed = sign_notification(
        paid_notice(trade_status="TRADE_CLOSED", gmt_refund="2024-05-21 09:00:00.123"), alipay_key
    )
    assert check(closed, alipay_key).is_refund is True


def test_notification_objects_only_come_from_verification() -> None:
    with pytest.raises(TypeError):
        AlipayNotification(
            out_trade_no="x",
            trade_no="y",
            trade_status="TRADE_SUCCESS",
            total_amount=Decimal("1"),
            refund_fee=None,
            gmt_refund="",
            gmt_payment="",
            notify_id="",
            app_id=APP_ID,
            seller_id="",
            buyer_id="",
            is_refund=False,
            raw={},
        )


def test_answers() -> None:
    assert alipay.success() == alipay.SUCCESS_BODY == "success"
    assert alipay.failure() == alipay.FAILURE_BODY == "failure"


def test_app_id_must_be_configured(alipay_key: rsa.RSAPrivateKey) -> None:
    notice = sign_notification(paid_notice(), alipay_key)
    with pytest.raises(ValueError):
        verify_notification(notice, public_key=alipay_key.public_key(), sign_type="RSA2", app_id="")


# ---------------------------------------------------------------------------------------------
# requests and synchronous responses


def test_sign_request_includes_sign_type(merchant_key: rsa.RSAPrivateKey) -> None:
    params = {"app_id": APP_ID, "method": "alipay.trade.query", "charset": "utf-8", "biz_content": "{}"}
    signed = sign_request(params, merchant_key, "RSA2")
    assert signed["sign_type"] == "RSA2"
    verify_request(signed, merchant_key.public_key(), "RSA2")
    # a V1 (notification) signature over the same params is not a request signature
    wrong = {**signed, "sign": sign_params(signed, merchant_key, "RSA2")}
    with pytest.raises(NotAuthentic):
        verify_request(wrong, merchant_key.public_key(), "RSA2")
    with pytest.raises(NotAuthentic):
        verify_request({**signed, "biz_content": '{"x":1}'}, merchant_key.public_key(), "RSA2")


def test_response_round_trip(alipay_key: rsa.RSAPrivateKey) -> None:
    payload = {"code": "10000", "msg": "Success", "trade_status": "TRADE_SUCCESS", "total_amount": "88.00"}
    text = sign_response("alipay.trade.query", payload, alipay_key)
    assert text.startswith('{"alipay_trade_query_response":{')
    assert verify_response(text, "alipay.trade.query", alipay_key.public_key(), "RSA2") == payload
    tampered = text.replace("88.00", "88.01")
    with pytest.raises(NotAuthentic):
        verify_response(tampered, "alipay.trade.query", alipay_key.public_key(), "RSA2")


def test_response_is_checked_over_the_text_as_received(alipay_key: rsa.RSAPrivateKey) -> None:
    # spacing, escapes and key order that re-serialising would change
    inner = '{ "code" : "10000", "subject":"\\u5546\\u54c1", "total_amount" : 88.00 ,"msg":"Success"}'
    signature = b64encode(alipay_key.sign(inner.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()
    text = f'{{\n  "alipay_trade_query_response" :  {inner} ,\n  "sign": "{signature}"\n}}'
    result = verify_response(text, "alipay.trade.query", alipay_key.public_key(), "RSA2")
    assert result["subject"] == "商品"
    assert result["total_amount"] == 88.0
    # the same content re-serialised compactly is another byte string, so it fails
    compact = json.dumps({"alipay_trade_query_response": json.loads(inner), "sign": signature})
    with pytest.raises(NotAuthentic):
        verify_response(compact, "alipay.trade.query", alipay_key.public_key(), "RSA2")


def test_response_without_sign_or_with_repeated_key(alipay_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(NotAuthentic):
        verify_response(
            '{"alipay_trade_query_response":{"code":"10000"}}',
            "alipay.trade.query",
            alipay_key.public_key(),
            "RSA2",
        )
    text = sign_response("alipay.trade.query", {"code": "10000"}, alipay_key)
    doubled = text[:-1] + ',"alipay_trade_query_response":{"code":"40004"}}'
    with pytest.raises(ChannelError):
        verify_response(doubled, "alipay.trade.query", alipay_key.public_key(), "RSA2")


# ---------------------------------------------------------------------------------------------
# the client against a fake gateway

PINNED = Clock(now=lambda: 1716171303.0, nonce=lambda n: "n" * (2 * n))


def make_settings(alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey) -> AlipaySettings:
    return AlipaySettings(
        app_id=APP_ID,
        public_key=public_pem(alipay_key.public_key()),
        private_key=private_pem(merchant_key),
        seller_id=SELLER,
        gateway_url="https://gateway.test/gateway.do",
    )


def fake_gateway(
    alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey, answer: Mapping[str, object] | str
) -> httpx.AsyncClient:
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        form = parse_form(request.content, request.url.query)
        verify_request(form, merchant_key.public_key(), "RSA2")
        seen.append(form)
        if isinstance(answer, str):
            return httpx.Response(200, text=answer)
        return httpx.Response(200, text=sign_response(form["method"], answer, alipay_key))

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client.seen = seen  # type: ignore[attr-defined]
    return client


async def test_trade_query_paid(alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey) -> None:
    answer = {
        "code": "10000",
        "msg": "Success",
        "trade_no": "2024052022001455331449999999",
        "out_trade_no": "M1",
        "trade_status": "TRADE_SUCCESS",
        "total_amount": "88.00",
    }
    http = fake_gateway(alipay_key, merchant_key, answer)
    async with AlipayClient(make_settings(alipay_key, merchant_key), http=http, clock=PINNED) as client:
        result = await client.trade_query("M1")
    assert result.code == "10000"
    assert result.trade_status == "TRADE_SUCCESS"
    assert result.trade_no == "2024052022001455331449999999"
    assert result.total_amount == Decimal("88.00")
    sent = http.seen[0]  # type: ignore[attr-defined]
    assert sent["method"] == "alipay.trade.query"
    assert sent["timestamp"] == "2024-05-20 10:15:03"
    assert json.loads(sent["biz_content"]) == {"out_trade_no": "M1"}


async def test_trade_query_not_exist(alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey) -> None:
    answer = {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST", "sub_msg": "x"}
    http = fake_gateway(alipay_key, merchant_key, answer)
    async with AlipayClient(make_settings(alipay_key, merchant_key), http=http, clock=PINNED) as client:
        result = await client.trade_query("M1")
    assert result.trade_status == "NOT_EXIST"
    assert result.total_amount is None


async def test_trade_query_refuses_forged_answer(
    alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey
) -> None:
    # signed by the merchant key instead of Alipay's
    forged = sign_response(
        "alipay.trade.query", {"code": "10000", "trade_status": "TRADE_SUCCESS"}, merchant_key
    )
    http = fake_gateway(alipay_key, merchant_key, forged)
    async with AlipayClient(make_settings(alipay_key, merchant_key), http=http, clock=PINNED) as client:
        with pytest.raises(NotAuthentic):
            await client.trade_query("M1")


async def test_trade_query_unsigned_error(
    alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey
) -> None:
    unsigned = '{"error_response":{"code":"40002","msg":"Invalid Arguments","sub_code":"isv.invalid-app-id"}}'
    http = fake_gateway(alipay_key, merchant_key, unsigned)
    async with AlipayClient(make_settings(alipay_key, merchant_key), http=http, clock=PINNED) as client:
        with pytest.raises(AlipayApiError) as caught:
            await client.trade_query("M1")
    assert caught.value.code == "40002"
    assert caught.value.sub_code == "isv.invalid-app-id"
    # an unsigned "success" is never believed
    http = fake_gateway(alipay_key, merchant_key, '{"alipay_trade_query_response":{"code":"10000"}}')
    async with AlipayClient(make_settings(alipay_key, merchant_key), http=http, clock=PINNED) as client:
        with pytest.raises(NotAuthentic):
            await client.trade_query("M1")


async def test_trade_query_other_business_error(
    alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey
) -> None:
    answer = {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.SYSTEM_ERROR"}
    http = fake_gateway(alipay_key, merchant_key, answer)
    async with AlipayClient(make_settings(alipay_key, merchant_key), http=http, clock=PINNED) as client:
        with pytest.raises(AlipayApiError) as caught:
            await client.trade_query("M1")
    assert caught.value.sub_code == "ACQ.SYSTEM_ERROR"


async def test_unreachable_gateway(alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    async with AlipayClient(make_settings(alipay_key, merchant_key), http=http) as client:
        with pytest.raises(AlipayApiError):
            await client.trade_query("M1")


# ---------------------------------------------------------------------------------------------
# starting a payment


def test_app_order_string(alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey) -> None:
    order = alipay.app_order_string(
        make_settings(alipay_key, merchant_key),
        notify_url="https://mall.test/api/pay/notify",
        out_trade_no="M1",
        total_amount=Decimal("88"),
        subject="商品 & 服务",
        clock=PINNED,
    )
    params = dict(parse_qsl(order, keep_blank_values=True))
    verify_request(params, merchant_key.public_key(), "RSA2")
    assert params["method"] == "alipay.trade.app.pay"
    assert params["timestamp"] == "2024-05-20 10:15:03"
    assert params["notify_url"] == "https://mall.test/api/pay/notify"
    biz = json.loads(params["biz_content"])
    assert biz == {
        "out_trade_no": "M1",
        "total_amount": "88.00",
        "subject": "商品 & 服务",
        "product_code": "QUICK_MSECURITY_PAY",
    }


def test_wap_pay_url(alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey) -> None:
    url = alipay.wap_pay_url(
        make_settings(alipay_key, merchant_key),
        notify_url="https://mall.test/api/pay/notify",
        out_trade_no="M2",
        total_amount=Decimal("0.01"),
        subject="充值",
        return_url="https://mall.test/return",
        clock=PINNED,
    )
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://gateway.test/gateway.do"
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    verify_request(params, merchant_key.public_key(), "RSA2")
    assert params["method"] == "alipay.trade.wap.pay"
    assert params["return_url"] == "https://mall.test/return"
    assert json.loads(params["biz_content"])["product_code"] == "QUICK_WAP_WAY"
    assert json.loads(params["biz_content"])["total_amount"] == "0.01"


@pytest.mark.parametrize("amount", ["0", "-1", "1.001", "NaN"])
def test_pay_amount_must_be_exact(
    alipay_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey, amount: str
) -> None:
    with pytest.raises(ValueError):
        alipay.wap_pay_url(
            make_settings(alipay_key, merchant_key),
            notify_url="https://mall.test/n",
            out_trade_no="M3",
            total_amount=Decimal(amount),
            subject="x",
        )
