"""WeChat Pay channel: published vectors (spec §9), v2/v3 round trips, hostile XML, calls to a fake server."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from mallgate.channels import wechat_pay as wp
from mallgate.channels.errors import ChannelError, NotAuthentic
from mallgate.channels.wechat_pay import (
    ForeignNotification,
    MalformedNotification,
    UnknownSerial,
    UnsupportedEvent,
    V3KeyStore,
    WechatPayApiError,
    WechatPayClient,
    WechatV2Payment,
    WechatV3Payment,
    WechatV3Refund,
)
from mallgate.clock import Clock
from mallgate.keys import private_pem, public_pem
from mallgate.settings import WechatPaySettings

APP_ID = "wx2421b1c4370ec43b"
MCH_ID = "10000100"
API_KEY = "192006250b4c09247ec02edce69f6a2d"
API_V3_KEY = "0123456789abcdef0123456789abcdef"
PUB_KEY_ID = "PUB_KEY_ID_0000000000000024101100397200000006"
NOW = 1716171303.0


@pytest.fixture(scope="module")
def platform_key() -> rsa.RSAPrivateKey:
    """Stands in for WeChat Pay's signing key (public-key mode and certificate mode alike)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def merchant_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(key: rsa.RSAPrivateKey, serial: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA test")])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def platform_cert(platform_key: rsa.RSAPrivateKey) -> x509.Certificate:
    return self_signed(platform_key, 0x0A1B2C3D4E5F60718293A4B5C6D7E8F901234567)


@pytest.fixture(scope="module")
def pubkey_store(platform_key: rsa.RSAPrivateKey) -> V3KeyStore:
    return V3KeyStore(public_key_id=PUB_KEY_ID, public_key=public_pem(platform_key.public_key()))


# ---------------------------------------------------------------------------------------------
# v2 signatures: V-10, V-11


def test_v10_official_sign_example() -> None:
    params = {
        "appid": "wxd930ea5d5a258f4f",
        "mch_id": "10000100",
        "device_info": "1000",
        "body": "test",
        "nonce_str": "ibuaiVcKdpRxkhJA",
    }
    assert wp.sign_v2(params, API_KEY) == "9A0A8659F005D6984697E2CA0A9CF3B7"
    assert wp.sign_v2(params, API_KEY, "MD5") == "9A0A8659F005D6984697E2CA0A9CF3B7"
    assert (
        wp.sign_v2(params, API_KEY, "HMAC-SHA256")
        == "6A9AE1657590FD6257D693A078E1C3E4BB6BA4DC30B23E0EE2496E54170DACD6"
    )
    # a present sign field never takes part in its own signature
    assert wp.sign_v2({**params, "sign": "WHATEVER"}, API_KEY) == "9A0A8659F005D6984697E2CA0A9CF3B7"


def test_v11_empty_value_skipped() -> None:
    params = {"test1": "test1", "test2": "test2", "empty": ""}
    assert wp.sign_v2(params, API_KEY, "MD5") == "1E3A8D73B5A4AEE787C0F68B5DAB8520"
    hmac_sign = wp.sign_v2(params, API_KEY, "HMAC-SHA256")
    assert hmac_sign.startswith("EDAC6D70") and hmac_sign.endswith("0ACF659")  # as abridged in the spec
    assert hmac_sign == "EDAC6D70D2FDF5A2382F8204FC96A1918017E46ACC5297F565ED1A7610ACF659"


def test_sign_v2_rejects_unknown_type() -> None:
    with pytest.raises(ValueError):
        wp.sign_v2({"a": "1"}, API_KEY, "SHA1")


# ---------------------------------------------------------------------------------------------
# v2 refund req_info: V-12


def test_v12_refund_key_derivation_and_round_trip() -> None:
    key = "OF4Ne3znh8KqL0V4NqmALQa0uXMYKcEk"
    # the spec gives the key and its md5 but not the ciphertext: check the derivation, then round trip
    assert hashlib.md5(key.encode()).hexdigest() == "63dfc0c1f53d9bc83a8fdc365b8141da"  # noqa: S324
    inner = {
        "out_refund_no": "1234",
        "refund_id": "50300103182020010413419046597",
        "refund_status": "SUCCESS",
        "total_fee": "1",
        "refund_fee": "1",
    }
    encrypted = wp.encrypt_refund_req_info(inner, key)
    assert len(base64.b64decode(encrypted)) % 16 == 0
    assert wp.decrypt_refund_req_info(encrypted, key) == inner
    with pytest.raises(NotAuthentic):
        wp.decrypt_refund_req_info(encrypted, API_KEY)


# Community vector (rwscode/payutil wechat/payment_api_test.go): a real req_info and its key.
RWS_KEY = "ziR0QKsTUfMOuochC9RfCdmfHECorQAP"
RWS_REQ_INFO = (
    "YYwp8C48th0wnQzTqeI+41pflB26v+smFj9z6h9RPBgxTyZyxc+4YNEz7QEgZNWj/6rIb2MfyWMZmCc41CfjKSssoSZPXxOhUayb6KvN"
    "SZ1p6frOX1PDWzhyruXK7ouNND+gDsG4yZ0XXzsL4/pYNwLLba/71QrnkJ/BHcByk4EXnglju5DLup9pJQSnTxjomI9Rxu57m9jg5lLQ"
    "FxMWXyeASZJNvof0ulnHlWJswS4OxKOkmW7VEyKyLGV6npoOm03Qsx2wkRxLsSa9gPpg4hdaReeUqh1FMbm7aWjyrVYT/MEZWg98p4Go"
    "mEIYvz34XfDncTezX4bf/ZiSLXt79aE1/YTZrYfymXeCrGjlbe0rg/T2ezJHAC870u2vsVbY1/KcE2A443N+DEnAziXlBQ1AeWq3Rqk/"
    "O6/TMM0lomzgctAOiAMg+bh5+Gu1ubA9O3E+vehULydD5qx2o6i3+qA9ORbH415NyRrQdeFq5vmCiRikp5xYptWiGZA0tkoaLKMPQ4nd"
    "E5gWHqiBbGPfULZWokI+QjjhhBmwgbd6J0VqpRorwOuzC/BHdkP72DCdNcm7IDUpggnzBIy0+seWIkcHEryKjge3YDHpJeQCqrAH0Cgx"
    "XHDt1xtbQbST1VqFyuhPhUjDXMXrknrGPN/oE1t0rLRq+78cI+k8xe5E6seeUXQsEe8r3358mpcDYSmXWSXVZxK6er9EF98APqHwcndy"
    "EJD2YyCh/mMVhERuX+7kjlRXSiNUWa/Cv/XAKFQuvUYA5ea2eYWtPRHa4DpyuF1SNsaqVKfgqKXZrJHfAgslVpSVqUpX4zkKszHF4kwM"
    "ZO3M7J1P94Mxa7Tm9mTOJePOoHPXeEB+m9rX6pSfoi3mJDQ5inJ+Vc4gOkg/Wd/lqiy6TTyP/dHDN6/v+AuJx5AXBo/2NDD3fWhHjkqE"
    "KIuARr2ClZt9ZRQO4HkXdZo7CN06sGCHk48Tg8PmxnxKcMZm7Aoquv5yMIM2gWSWIRJhwJ8cUpafIHc+GesDlbF6Zbt+/KXkafJAQq2R"
    "klEN+WvZ/zFz113EPgWPjp16TwBoziq96MMekvWKY/vdhjol8VFtGH9F61Oy1Xwf6DJtPw=="
)


def test_published_refund_req_info_decrypts() -> None:
    inner = wp.decrypt_refund_req_info(RWS_REQ_INFO, RWS_KEY)
    assert inner["out_refund_no"] == "50fd012ed1b311e7af7800163e32c503"
    assert inner["refund_id"] == "50000404922017112502468056157"
    assert inner["transaction_id"] == "4200000015201711256947025404"
    assert inner["refund_status"] == "SUCCESS"
    assert inner["refund_fee"] == inner["total_fee"] == "6"
    assert inner["refund_recv_accout"] == "支付用户零钱"
    assert inner["success_time"] == "2017-11-25 15:36:17"


def test_published_refund_notification_verifies() -> None:
    body = wp.to_xml(
        {
            "return_code": "SUCCESS",
            "appid": APP_ID,
            "mch_id": MCH_ID,
            "nonce_str": "x",
            "req_info": RWS_REQ_INFO,
        }
    )
    refund = wp.verify_v2_refund(body, api_key=RWS_KEY, app_id=APP_ID, mch_id=MCH_ID)
    assert refund.refund_fee == 6 and refund.total_fee == 6
    assert refund.settlement_refund_fee == 6
    assert refund.out_trade_no == "4893e76d8c8b434cb64e9cd536338e33"
    assert refund.succeeded


# ---------------------------------------------------------------------------------------------
# v2 notifications


def v2_payment_fields(**overrides: str) -> dict[str, str]:
    fields = {
        "return_code": "SUCCESS",
        "appid": APP_ID,
        "mch_id": MCH_ID,
        "nonce_str": "5d2b6c2a8db53831f7eda20af46e531c",
        "result_code": "SUCCESS",
        "openid": "oUpF8uMEb4qRXf22hE3X68TekukE",
        "is_subscribe": "N",
        "trade_type": "JSAPI",
        "bank_type": "CFT",
        "total_fee": "8800",
        "cash_fee": "8800",
        "fee_type": "CNY",
        "transaction_id": "1004400740201409030005092168",
        "out_trade_no": "M1409811653",
        "attach": "a&b=c <x> ]]> end",
        "time_end": "20140903131540",
    }
    fields.update(overrides)
    return fields


def signed_v2(fields: dict[str, str], sign_type: str = "MD5", key: str = API_KEY) -> bytes:
    if sign_type != "MD5":
        fields = {**fields, "sign_type": sign_type}
    return wp.to_xml({**fields, "sign": wp.sign_v2(fields, key, sign_type)})


@pytest.mark.parametrize("sign_type", ["MD5", "HMAC-SHA256"])
def test_v2_payment_round_trip(sign_type: str) -> None:
    payment = wp.verify_v2_payment(
        signed_v2(v2_payment_fields(), sign_type), api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID
    )
    assert payment.result_ok is True
    assert payment.total_fee == 8800
    assert payment.cash_fee == 8800
    assert payment.out_trade_no == "M1409811653"
    assert payment.transaction_id == "1004400740201409030005092168"
    assert payment.time_end == "20140903131540"
    assert payment.raw["attach"] == "a&b=c <x> ]]> end"


def test_v2_hmac_notification_without_sign_type_field() -> None:
    # WeChat signs like the order was placed (here HMAC-SHA256) yet omits sign_type (WxJava #1585)
    fields = v2_payment_fields()
    body = wp.to_xml({**fields, "sign": wp.sign_v2(fields, API_KEY, "HMAC-SHA256")})
    assert b"sign_type" not in body
    payment = wp.verify_v2_payment(body, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    assert payment.total_fee == 8800
    # a 64-digit sign under MD5 rules, or a 32-digit one under HMAC rules, is still refused
    md5_as_hmac = wp.to_xml(
        {**fields, "sign_type": "HMAC-SHA256", "sign": wp.sign_v2(fields, API_KEY, "MD5")}
    )
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(md5_as_hmac, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    fields_md5 = {**fields, "sign_type": "MD5"}
    hmac_as_md5 = wp.to_xml({**fields_md5, "sign": wp.sign_v2(fields_md5, API_KEY, "HMAC-SHA256")})
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(hmac_as_md5, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)


def test_v2_payment_tampered_amount() -> None:
    body = signed_v2(v2_payment_fields()).replace(b"<total_fee><![CDATA[8800]]>", b"<total_fee><![CDATA[1]]>")
    assert b"[1]]" in body
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(body, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)


def test_v2_payment_missing_sign_and_wrong_key() -> None:
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(wp.to_xml(v2_payment_fields()), api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(
            signed_v2(v2_payment_fields(), key="0" * 32), api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID
        )
    # an unknown sign_type is not silently treated as MD5
    fields = v2_payment_fields(sign_type="HMAC-SHA1")
    body = wp.to_xml({**fields, "sign": wp.sign_v2(fields, API_KEY, "MD5")})
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(body, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)


def test_v2_sign_type_label_is_itself_signed() -> None:
    fields = v2_payment_fields()
    body = signed_v2(fields, "HMAC-SHA256").replace(b"HMAC-SHA256", b"MD5")
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(body, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_v2_changing_any_one_field_is_refused(data: st.DataObject) -> None:
    fields = v2_payment_fields()
    signed = {**fields, "sign": wp.sign_v2(fields, API_KEY)}
    name = data.draw(st.sampled_from(sorted(fields)))
    alphabet = st.characters(blacklist_categories=("Cs", "Cc"))
    value = data.draw(st.text(alphabet=alphabet, max_size=20).filter(lambda v: v != fields[name]))
    signed[name] = value
    with pytest.raises((NotAuthentic, ForeignNotification)) as caught:
        wp.verify_v2_payment(wp.to_xml(signed), api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    # the signature is checked first, so only a broken return_code is refused otherwise
    assert isinstance(caught.value, NotAuthentic)


def test_v2_foreign_merchant() -> None:
    for override in ({"appid": "wx0000000000000000"}, {"mch_id": "19999999"}):
        body = signed_v2(v2_payment_fields(**override))
        with pytest.raises(ForeignNotification) as caught:
            wp.verify_v2_payment(body, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
        assert not isinstance(caught.value, NotAuthentic)


def test_v2_result_fail_and_return_fail() -> None:
    fields = v2_payment_fields(result_code="FAIL", err_code="SYSTEMERROR", total_fee="")
    payment = wp.verify_v2_payment(signed_v2(fields), api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    assert payment.result_ok is False
    assert payment.err_code == "SYSTEMERROR"
    assert payment.total_fee is None
    with pytest.raises(NotAuthentic):
        wp.verify_v2_payment(
            wp.to_xml({"return_code": "FAIL", "return_msg": "x"}),
            api_key=API_KEY,
            app_id=APP_ID,
            mch_id=MCH_ID,
        )


@pytest.mark.parametrize("fee", ["88.00", "-1", "８８", "1e3", ""])
def test_v2_malformed_amount(fee: str) -> None:
    with pytest.raises(MalformedNotification):
        wp.verify_v2_payment(
            signed_v2(v2_payment_fields(total_fee=fee)), api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID
        )


def test_v2_refund_round_trip_and_checks() -> None:
    inner = {
        "transaction_id": "4200000015201711256947025404",
        "out_trade_no": "M1",
        "refund_id": "50000404922017112502468056157",
        "out_refund_no": "R1",
        "total_fee": "8800",
        "refund_fee": "800",
        "settlement_refund_fee": "800",
        "refund_status": "SUCCESS",
        "success_time": "2017-11-25 15:36:17",
    }
    outer = {"return_code": "SUCCESS", "appid": APP_ID, "mch_id": MCH_ID, "nonce_str": "n"}
    body = wp.to_xml({**outer, "req_info": wp.encrypt_refund_req_info(inner, API_KEY)})
    refund = wp.verify_v2_refund(body, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    assert (refund.out_trade_no, refund.out_refund_no, refund.refund_id) == ("M1", "R1", inner["refund_id"])
    assert (refund.refund_fee, refund.total_fee, refund.settlement_refund_fee) == (800, 8800, 800)
    assert refund.settlement_total_fee is None
    assert refund.refund_status == "SUCCESS"

    with pytest.raises(NotAuthentic):
        wp.verify_v2_refund(body, api_key="k" * 32, app_id=APP_ID, mch_id=MCH_ID)
    foreign = wp.to_xml({**outer, "mch_id": "1", "req_info": wp.encrypt_refund_req_info(inner, API_KEY)})
    with pytest.raises(ForeignNotification):
        wp.verify_v2_refund(foreign, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    with pytest.raises(NotAuthentic):
        wp.verify_v2_refund(wp.to_xml(outer), api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)
    for junk in ("not base64!", base64.b64encode(b"short").decode(), base64.b64encode(b"x" * 32).decode()):
        with pytest.raises(NotAuthentic):
            wp.decrypt_refund_req_info(junk, API_KEY)


def test_v2_objects_only_come_from_verification() -> None:
    with pytest.raises(TypeError):
        WechatV2Payment(
            out_trade_no="",
            transaction_id="",
            total_fee=1,
            cash_fee=None,
            time_end="",
            result_ok=True,
            err_code="",
            err_code_des="",
            appid=APP_ID,
            mch_id=MCH_ID,
            openid="",
            trade_type="",
            raw={},
        )


def test_v2_answers() -> None:
    assert wp.v2_success() == (
        b"<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>"
    )
    assert wp.parse_xml(wp.v2_fail("签名失败")) == {"return_code": "FAIL", "return_msg": "签名失败"}


# ---------------------------------------------------------------------------------------------
# hostile XML

_armed: list[str] = []
_opened: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _armed and event == "open" and args and isinstance(args[0], str | bytes):
        path = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if any(path.endswith(target) for target in _armed):
            _opened.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def watch_files() -> Iterator[list[str]]:
    _opened.clear()
    _armed.extend(["/etc/passwd", "secret.txt"])
    try:
        yield _opened
    finally:
        _armed.clear()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<xml><return_code>&lol9;</return_code></xml>"""


def test_billion_laughs_refused(watch_files: list[str]) -> None:
    with pytest.raises(MalformedNotification):
        wp.parse_xml(BILLION_LAUGHS)
    with pytest.raises(MalformedNotification):
        wp.verify_v2_payment(BILLION_LAUGHS, api_key=API_KEY, app_id=APP_ID, mch_id=MCH_ID)


def test_external_entity_refused_without_reading(watch_files: list[str], tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-MARKER")
    assert secret.read_text() == "TOP-SECRET-MARKER"
    assert watch_files, "the audit hook must see file opens, or the final check proves nothing"
    watch_files.clear()
    for target in ("file:///etc/passwd", secret.as_uri()):
        body = (
            f'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "{target}">]>'
            "<xml><return_code>&xxe;</return_code><attach>&xxe;</attach></xml>"
        ).encode()
        with pytest.raises(MalformedNotification) as caught:
            wp.parse_xml(body)
        assert "MARKER" not in str(caught.value) and "root:" not in str(caught.value)
    parameter_entity = (
        f'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY % p SYSTEM "{secret.as_uri()}"> %p;]><xml/>'
    ).encode()
    with pytest.raises(MalformedNotification):
        wp.parse_xml(parameter_entity)
    assert watch_files == []


def test_doctype_alone_and_odd_shapes_refused() -> None:
    bad = [
        b'<!DOCTYPE xml SYSTEM "http://127.0.0.1:1/x.dtd"><xml><a>1</a></xml>',
        b"<xml><a>1</a><a>2</a></xml>",  # repeated: one copy could be signed, the other read
        b"<xml><a><b>1</b></a></xml>",  # nested
        b"<root><a>1</a></root>",  # wrong root
        b"not xml",
        b"",
        b"<xml><a>1</a>",
    ]
    for body in bad:
        with pytest.raises(MalformedNotification):
            wp.parse_xml(body)


def test_to_xml_round_trip_with_cdata_breakers() -> None:
    fields = {"a": "x]]>y", "b": "<&>\"'", "c": "", "d": "中文"}
    assert wp.parse_xml(wp.to_xml(fields)) == fields
    with pytest.raises(ValueError):
        wp.to_xml({"bad name": "x"})


# ---------------------------------------------------------------------------------------------
# v3: AEAD vectors V-14, V-15


def test_v14_aead_with_16_byte_key() -> None:
    plain = wp.aead_decrypt(
        "testAPIv3Key0000",
        "wCq51qZv4Yfg",
        "Dl56FrqWQJF1t9LtC3vEUsniZKvbqdR8",
        "FsdXzxryWfKwvLJKf8LG/ToRPTRh8RN9wROC",
    )
    assert plain == b"Hello World"
    assert (
        wp.aead_encrypt(
            "testAPIv3Key0000", "wCq51qZv4Yfg", "Dl56FrqWQJF1t9LtC3vEUsniZKvbqdR8", b"Hello World"
        )
        == "FsdXzxryWfKwvLJKf8LG/ToRPTRh8RN9wROC"
    )
    with pytest.raises(NotAuthentic):
        wp.aead_decrypt(
            "testAPIv3Key0000", "wCq51qZv4Yfg", "other aad", "FsdXzxryWfKwvLJKf8LG/ToRPTRh8RN9wROC"
        )


def test_v15_aead_with_32_byte_key() -> None:
    ciphertext = "+tSNe9jYMjLZPNCTpMy0myvwjl+M2cype68g74EXbF2lhfqO8e5dkbYjnAme7TUu/uv5pRij0KZiJiyoMA=="
    plain = wp.aead_decrypt(API_V3_KEY, "abcdef012345", "transaction", ciphertext)
    assert json.loads(plain) == {"out_trade_no": "T1", "trade_state": "SUCCESS"}
    assert wp.aead_encrypt(API_V3_KEY, "abcdef012345", "transaction", plain) == ciphertext
    with pytest.raises(NotAuthentic):
        wp.aead_decrypt("1" * 32, "abcdef012345", "transaction", ciphertext)


# ---------------------------------------------------------------------------------------------
# v3: notification vector V-13 (wechatpay-go core/notify/notify_test.go)

V13_CERT = """-----BEGIN CERTIFICATE-----
MIIDVzCCAj+gAwIBAgIJANfOWdH1ItcBMA0GCSqGSIb3DQEBCwUAMEIxCzAJBgNV
BAYTAlhYMRUwEwYDVQQHDAxEZWZhdWx0IENpdHkxHDAaBgNVBAoME0RlZmF1bHQg
Q29tcGFueSBMdGQwHhcNMjEwNDI3MDg1NTIzWhcNMzEwNDI1MDg1NTIzWjBCMQsw
CQYDVQQGEwJYWDEVMBMGA1UEBwwMRGVmYXVsdCBDaXR5MRwwGgYDVQQKDBNEZWZh
dWx0IENvbXBhbnkgTHRkMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA
2VCTd91fnUn73Xy9DLvt/V62TVxRTEEstVdeRaZ3B3leO0pldE806mXO4RwdHXag
HQ4vGeZN0yqm++rDsGK+U3AH7kejyD2pXshNP9Cq5YwbptiLGtjcquw4HNxJQUOm
DeJf2vg6byms9RUipiq4SzbJKqJFlUpbuIPDpSpWz10PYmyCNeDGUUK65E5h2B83
4uxl1zNLYQCrkdBzb8oUxwYeP5a2DNxmjL5lsJML7DGr5znsevnoqGRwTm9fxCGf
y8wus7hwKz6clt3Whmmda7UAdb1c08hEQFVRbF14AR73xbnd8N0obCWJPCbzMCtk
aSef4FdEEgEXJiw0VAJT8wIDAQABo1AwTjAdBgNVHQ4EFgQUT1c7nd/SUO76HSoZ
umNUJv1R5PwwHwYDVR0jBBgwFoAUT1c7nd/SUO76HSoZumNUJv1R5PwwDAYDVR0T
BAUwAwEB/zANBgkqhkiG9w0BAQsFAAOCAQEAfTjxKRQMzNB/U6ZoCUS+BSNfa2Oh
0plMN6ZuzwiVVZwg1jywvv5yv04koS7Pd4i9E4gt9ZBUQXlpq+A3oOCEEHNRR6b2
kyazGRM7s0OP5X21WrbpSmKmU6K7hkfx30yYs08LVs/Q8DIhvaj1FCFeJzUCzYn/
fHMq4tsbKO0dKAeydPM/nrUZBmaYQVKMVOORGLFjFKVO7JV6Kq/R86ouhjEPgJOe
2xulNBUcjicqtZlBdEh/PWCYP2SpGVDclKm8jeo175T3EVAkdKzzmfpxtMmnMlmq
cTJOU9TxuGvNASMtjj7pYIerTx+xgZDXEVBWFW9PjJ0TV06tCRsgSHItgg==
-----END CERTIFICATE-----
"""
V13_HEADERS = {
    "Content-Type": "application/json",
    "Wechatpay-Nonce": "EcZ9Cmy4Xyx1i6RlJQzLcCyEqDa26NBz",
    "Wechatpay-Timestamp": "1624523846",
    "Wechatpay-Serial": "D7CE59D1F522D701",
    "Wechatpay-Signature": (
        "tJHIiIS9eB2hAYstmAmbbD3ZE5LiIm/Ug5tuL4fC0YOFRWIHV39UFIZXC0e9Wl6lBu6sKvkqDkzpqzBsVHyXF"
        "lbYZTOQrVdG4b6LfTnK4mikv9++ixJMd3vTf2yCqvBkh98zs3Ds5zsYQakzbcwhmw4fMJs4nPLws28H0UW9FjDR//rxELLwXvV1VEA1I"
        "BLX70xptjL8hrfUjEE8kkry6yNJTHZRU8CAc7qHli2Ng1V1qb9ARbK8A3ThmFmPQvRGrapI/jS2laKKgYUmfdEdkNO6B2Cke5e8VTxY4"
        "06ArAmQ90GAihDwIcb16TQMnzCMBoutnwZKNiKRACrFmtxw2Q=="
    ),
}
V13_BODY = (
    '{"id":"3119dfba-e649-5eec-ab1e-3412bc4d2e17","create_time":"2021-06-24T16:37:26+08:00",'
    '"resource_type":"encrypt-resource","event_type":"PAYSCORE.USER_OPEN_SERVICE","summary":"签约成功",'
    '"resource":{"original_type":"payscore","algorithm":"AEAD_AES_256_GCM","ciphertext":'
    '"YDS3lKPaC4Y52Gf3uhft5qUBlIa8b428AWTtTauHQfQrRw+X1WpiuHIDy0vo1Vd6VEq67aVyqPdDYMkRVSDaZL3iZt'
    "tevRMOoPKMifozg6XPWjIZumks/GpT48lI4NizyeaqLBokNebthah3o1H76qSlO9NkDjp9bzmKLEYYH9TEklFUpsvPqOTOcgSLgh21YJXYR"
    '7dEBXFgRLiNIKRgO5JdXh1hccRUAlyVWxE54PXpnQ==","associated_data":"payscore","nonce":"Kj7QIyUiYx1q"}}'
).encode()
V13_PLAIN = (
    '{"mchid":"1234567890","appid":"054aa7d7a2a54ab5898df65bd96f001c",'
    '"create_time":"2020-06-30T12:12:00+08:00","out_contract_code":"21640bdbd08e473e828f3206a2741c6e"}'
)
V13_NOW = 1624523846.0
V13_KEY = "testMchAPIv3Key0"


def test_v13_signature_and_resource() -> None:
    keys = V3KeyStore(certificates=V13_CERT)
    assert keys.serials == ["D7CE59D1F522D701"]
    wp.verify_v3_signature(V13_HEADERS, V13_BODY, keys=keys, now=V13_NOW)
    # header names are case-insensitive, serials are hex numbers
    lowered = {k.lower(): v for k, v in V13_HEADERS.items()}
    lowered["wechatpay-serial"] = "00d7ce59d1f522d701"
    wp.verify_v3_signature(lowered, V13_BODY, keys=keys, now=V13_NOW + 299)

    event = wp.parse_v3_notification(V13_BODY, V13_KEY)
    assert event.id == "3119dfba-e649-5eec-ab1e-3412bc4d2e17"
    assert event.event_type == "PAYSCORE.USER_OPEN_SERVICE"
    assert event.summary == "签约成功"
    assert event.original_type == "payscore"
    assert event.resource == json.loads(V13_PLAIN)
    plain = wp.aead_decrypt(
        V13_KEY, "Kj7QIyUiYx1q", "payscore", json.loads(V13_BODY)["resource"]["ciphertext"]
    )
    assert plain.decode() == V13_PLAIN


def test_v13_tampered_body_stale_and_unsupported() -> None:
    keys = V3KeyStore(certificates=V13_CERT)
    with pytest.raises(NotAuthentic):
        wp.verify_v3_signature(
            V13_HEADERS, V13_BODY.replace(b"2021-06-24", b"2021-06-25"), keys=keys, now=V13_NOW
        )
    with pytest.raises(NotAuthentic, match="window"):
        wp.verify_v3_signature(V13_HEADERS, V13_BODY, keys=keys, now=V13_NOW + 300)
    with pytest.raises(NotAuthentic, match="window"):
        wp.verify_v3_signature(V13_HEADERS, V13_BODY, keys=keys, now=V13_NOW - 301)
    # authentic but neither payment nor refund: reported with the decrypted event
    with pytest.raises(UnsupportedEvent) as caught:
        wp.verify_v3_notification(
            V13_HEADERS, V13_BODY, keys=keys, api_v3_key=V13_KEY, app_id="x", mch_id="1234567890", now=V13_NOW
        )
    assert caught.value.event.resource["out_contract_code"] == "21640bdbd08e473e828f3206a2741c6e"


def test_v3_message_layout_of_the_official_sample() -> None:
    body = b'{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}'
    assert wp.v3_message("1722850421", "d824f2e086d3c1df967785d13fcd22ef", body) == (
        b'1722850421\nd824f2e086d3c1df967785d13fcd22ef\n{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}\n'
    )
    assert wp.v3_message("1", "n", b"") == b"1\nn\n\n"


# ---------------------------------------------------------------------------------------------
# v3 notifications, round trips


def payment_resource(**overrides: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "mchid": MCH_ID,
        "appid": APP_ID,
        "out_trade_no": "M1",
        "transaction_id": "4200000848202101120290526543",
        "trade_type": "JSAPI",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "OTHERS",
        "attach": "",
        "success_time": "2024-05-20T10:15:08+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {"total": 8800, "payer_total": 8800, "currency": "CNY", "payer_currency": "CNY"},
    }
    resource.update(overrides)
    return resource


def refund_resource(**overrides: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "mchid": MCH_ID,
        "out_trade_no": "M1",
        "transaction_id": "4200000848202101120290526543",
        "out_refund_no": "R1",
        "refund_id": "50000000382019052709732678859",
        "refund_status": "SUCCESS",
        "success_time": "2024-05-21T10:00:00+08:00",
        "user_received_account": "支付用户零钱",
        "amount": {"total": 8800, "refund": 800, "payer_total": 8800, "payer_refund": 800},
    }
    resource.update(overrides)
    return resource


def notify(
    key: rsa.RSAPrivateKey,
    event_type: str,
    resource: dict[str, Any],
    *,
    serial: str = PUB_KEY_ID,
    now: float = NOW,
) -> tuple[dict[str, str], bytes]:
    return wp.sign_v3_notification(
        event_type,
        resource,
        private_key=key,
        serial=serial,
        api_v3_key=API_V3_KEY,
        now=now,
        nonce="fd8c7c2d9a9a4c3f9b2e0f3a1c5d7e9b",
        summary="支付成功",
    )


def verify(
    headers: dict[str, str], body: bytes, keys: V3KeyStore, *, now: float = NOW, api_v3_key: str = API_V3_KEY
) -> WechatV3Payment | WechatV3Refund:
    return wp.verify_v3_notification(
        headers, body, keys=keys, api_v3_key=api_v3_key, app_id=APP_ID, mch_id=MCH_ID, now=now
    )


def test_v3_payment_in_public_key_mode(platform_key: rsa.RSAPrivateKey, pubkey_store: V3KeyStore) -> None:
    headers, body = notify(platform_key, "TRANSACTION.SUCCESS", payment_resource())
    assert headers["Wechatpay-Serial"] == PUB_KEY_ID
    assert json.loads(body)["create_time"] == "2024-05-20T10:15:03+08:00"
    payment = verify(headers, body, pubkey_store)
    assert isinstance(payment, WechatV3Payment)
    assert payment.out_trade_no == "M1"
    assert payment.transaction_id == "4200000848202101120290526543"
    assert payment.trade_state == "SUCCESS" and payment.result_ok
    assert payment.total == 8800 and payment.payer_total == 8800
    assert payment.appid == APP_ID and payment.mchid == MCH_ID
    assert payment.payer_openid == "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
    assert payment.event_type == "TRANSACTION.SUCCESS"


def test_v3_refund_in_certificate_mode(
    platform_key: rsa.RSAPrivateKey, platform_cert: x509.Certificate
) -> None:
    keys = V3KeyStore(certificates=[platform_cert])
    serial = format(platform_cert.serial_number, "X")
    headers, body = notify(platform_key, "REFUND.SUCCESS", refund_resource(), serial=serial)
    refund = verify(headers, body, keys)
    assert isinstance(refund, WechatV3Refund)
    assert (refund.out_trade_no, refund.out_refund_no, refund.refund_id) == (
        "M1",
        "R1",
        "50000000382019052709732678859",
    )
    assert (refund.refund, refund.total, refund.payer_refund) == (800, 8800, 800)
    assert refund.succeeded
    abnormal_headers, abnormal = notify(
        platform_key, "REFUND.ABNORMAL", refund_resource(refund_status="ABNORMAL"), serial=serial
    )
    assert verify(abnormal_headers, abnormal, keys).succeeded is False  # type: ignore[union-attr]


def test_v3_stale_timestamps(platform_key: rsa.RSAPrivateKey, pubkey_store: V3KeyStore) -> None:
    headers, body = notify(platform_key, "TRANSACTION.SUCCESS", payment_resource())
    verify(headers, body, pubkey_store, now=NOW + 299)
    verify(headers, body, pubkey_store, now=NOW - 299)
    for now in (NOW + 300, NOW - 300, NOW + 86400):
        with pytest.raises(NotAuthentic):
            verify(headers, body, pubkey_store, now=now)


def test_v3_wrong_serial(platform_key: rsa.RSAPrivateKey, pubkey_store: V3KeyStore) -> None:
    for serial in ("PUB_KEY_ID_0000000000000000000000000000000001", "5157F09EFDC096DE15EBE81A47057A72"):
        headers, body = notify(platform_key, "TRANSACTION.SUCCESS", payment_resource(), serial=serial)
        with pytest.raises(UnknownSerial) as caught:
            verify(headers, body, pubkey_store)
        assert caught.value.serial == serial
        assert isinstance(caught.value, NotAuthentic)


def test_v3_signtest_probe_refused(platform_key: rsa.RSAPrivateKey, pubkey_store: V3KeyStore) -> None:
    headers, body = notify(platform_key, "TRANSACTION.SUCCESS", payment_resource())
    headers["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" + headers["Wechatpay-Signature"]
    with pytest.raises(NotAuthentic, match="probe"):
        verify(headers, body, pubkey_store)


def test_v3_tampered_body_and_wrong_keys(
    platform_key: rsa.RSAPrivateKey, merchant_key: rsa.RSAPrivateKey, pubkey_store: V3KeyStore
) -> None:
    headers, body = notify(platform_key, "TRANSACTION.SUCCESS", payment_resource())
    with pytest.raises(NotAuthentic):
        verify(headers, body.replace(b"TRANSACTION.SUCCESS", b"TRANSACTION.SUCCESs"), pubkey_store)
    with pytest.raises(NotAuthentic):
        verify(headers, body + b" ", pubkey_store)
    # signed by someone else under our key id
    forged_headers, forged = notify(merchant_key, "TRANSACTION.SUCCESS", payment_resource())
    with pytest.raises(NotAuthentic):
        verify(forged_headers, forged, pubkey_store)
    # authentic envelope, resource not encrypted under our APIv3 key
    with pytest.raises(NotAuthentic):
        verify(headers, body, pubkey_store, api_v3_key="f" * 32)
    for missing in ("Wechatpay-Timestamp", "Wechatpay-Nonce", "Wechatpay-Signature", "Wechatpay-Serial"):
        partial = {k: v for k, v in headers.items() if k != missing}
        with pytest.raises(NotAuthentic):
            verify(partial, body, pubkey_store)


def test_v3_foreign_merchant(platform_key: rsa.RSAPrivateKey, pubkey_store: V3KeyStore) -> None:
    cases = [
        ("TRANSACTION.SUCCESS", payment_resource(appid="wx0000000000000000")),
        ("TRANSACTION.SUCCESS", payment_resource(mchid="19999999")),
        ("REFUND.SUCCESS", refund_resource(mchid="19999999")),
    ]
    for event_type, resource in cases:
        headers, body = notify(platform_key, event_type, resource)
        with pytest.raises(ForeignNotification):
            verify(headers, body, pubkey_store)


@pytest.mark.parametrize("total", [-1, "8800", 88.0, True, None])
def test_v3_malformed_amount(platform_key: rsa.RSAPrivateKey, pubkey_store: V3KeyStore, total: Any) -> None:
    resource = payment_resource(amount={"total": total, "currency": "CNY"})
    headers, body = notify(platform_key, "TRANSACTION.SUCCESS", resource)
    with pytest.raises(MalformedNotification):
        verify(headers, body, pubkey_store)


def test_v3_objects_only_come_from_verification() -> None:
    with pytest.raises(TypeError):
        WechatV3Payment(
            event_id="",
            event_type="TRANSACTION.SUCCESS",
            out_trade_no="M1",
            transaction_id="",
            trade_state="SUCCESS",
            total=1,
            payer_total=None,
            currency="CNY",
            appid=APP_ID,
            mchid=MCH_ID,
            success_time="",
            payer_openid="",
            raw={},
        )


def test_key_store_sources(
    platform_key: rsa.RSAPrivateKey,
    merchant_key: rsa.RSAPrivateKey,
    platform_cert: x509.Certificate,
    tmp_path: Path,
) -> None:
    other = self_signed(merchant_key, 0x42)
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (platform_cert, other)]
    serial = format(platform_cert.serial_number, "X")

    from_bundle = V3KeyStore(certificates="".join(pems))
    assert sorted(from_bundle.serials) == sorted([serial, "42"])
    (tmp_path / "a.pem").write_text(pems[0])
    (tmp_path / "b.crt").write_text(pems[1])
    (tmp_path / "ignored.txt").write_text("not a certificate")
    from_folder = V3KeyStore(certificates=str(tmp_path))
    assert sorted(from_folder.serials) == sorted([serial, "42"])
    from_file = V3KeyStore(certificates=tmp_path / "a.pem")
    assert from_file.serials == [serial]

    key = from_bundle.get(serial.lower())
    assert key is not None and key.public_numbers() == platform_key.public_key().public_numbers()
    assert from_bundle.get("PUB_KEY_ID_X") is None
    assert from_bundle.get("DEADBEEF") is None

    both = V3KeyStore(public_key_id=PUB_KEY_ID, public_key=platform_key.public_key(), certificates=[other])
    assert both.get(PUB_KEY_ID) is not None and both.get("42") is not None
    assert both.get(PUB_KEY_ID.lower()) is None  # key ids are exact
    with pytest.raises(ValueError):
        V3KeyStore(public_key_id=PUB_KEY_ID)

    settings = WechatPaySettings(
        public_key=public_pem(platform_key.public_key()), public_key_id=PUB_KEY_ID, platform_certs=pems[1]
    )
    assert sorted(V3KeyStore.from_settings(settings).serials) == sorted([PUB_KEY_ID, "42"])


def test_v3_answers() -> None:
    assert wp.v3_success() == (204, b"")
    status, body = wp.v3_fail("验签失败", 401)
    assert status == 401
    assert json.loads(body) == {"code": "FAIL", "message": "验签失败"}
    assert wp.v3_fail("x")[0] == 500
    with pytest.raises(ValueError):
        wp.v3_fail("x", 200)


def test_v3_authorization_round_trip(merchant_key: rsa.RSAPrivateKey) -> None:
    header = wp.v3_authorization(
        "GET",
        "/v3/certificates",
        b"",
        mch_id=MCH_ID,
        serial_no="1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C",
        private_key=merchant_key,
        timestamp=int(NOW),
        nonce="593BEC0C930BF1AFEB40B4A08C8FB242",
    )
    assert header.startswith(
        'WECHATPAY2-SHA256-RSA2048 mchid="10000100",nonce_str="593BEC0C930BF1AFEB40B4A08C8FB242"'
    )
    fields = wp.verify_v3_authorization(
        header, "GET", "/v3/certificates", b"", public_key=merchant_key.public_key(), now=NOW
    )
    assert fields["serial_no"] == "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C"
    with pytest.raises(NotAuthentic):
        wp.verify_v3_authorization(
            header, "GET", "/v3/certificates?x=1", b"", public_key=merchant_key.public_key(), now=NOW
        )
    with pytest.raises(NotAuthentic):
        wp.verify_v3_authorization(
            header, "GET", "/v3/certificates", b"", public_key=merchant_key.public_key(), now=NOW + 600
        )


# ---------------------------------------------------------------------------------------------
# client-side pay parameters

PINNED = Clock(now=lambda: NOW, nonce=lambda n: "ab" * n)


def test_jsapi_params() -> None:
    params = wp.jsapi_params(APP_ID, "wx201410272009395522657a690389285100", API_KEY, PINNED)
    assert params["appId"] == APP_ID
    assert params["timeStamp"] == "1716171303"
    assert params["nonceStr"] == "ab" * 16
    assert params["package"] == "prepay_id=wx201410272009395522657a690389285100"
    assert params["signType"] == "MD5"
    expected = (
        hashlib.md5(  # noqa: S324 - recomputing the protocol's own digest
            (
                f"appId={APP_ID}&nonceStr={'ab' * 16}&package=prepay_id=wx201410272009395522657a690389285100"
                f"&signType=MD5&timeStamp=1716171303&key={API_KEY}"
            ).encode()
        )
        .hexdigest()
        .upper()
    )
    assert params["paySign"] == expected
    hmac_params = wp.jsapi_params(APP_ID, "wx1", API_KEY, PINNED, sign_type="HMAC-SHA256")
    assert len(hmac_params["paySign"]) == 64


def test_app_params() -> None:
    params = wp.app_params("wxb4ba3c02aa476ea1", MCH_ID, "wx2016", API_KEY, PINNED)
    assert {k: params[k] for k in ("appid", "partnerid", "prepayid", "package", "timestamp")} == {
        "appid": "wxb4ba3c02aa476ea1",
        "partnerid": MCH_ID,
        "prepayid": "wx2016",
        "package": "Sign=WXPay",
        "timestamp": "1716171303",
    }
    wp.verify_v2_sign(params, API_KEY, "MD5")


# ---------------------------------------------------------------------------------------------
# the client against a fake WeChat Pay


def client_settings(merchant_key: rsa.RSAPrivateKey) -> WechatPaySettings:
    return WechatPaySettings(
        app_id=APP_ID,
        mch_id=MCH_ID,
        api_key=API_KEY,
        api_v3_key=API_V3_KEY,
        mch_private_key=private_pem(merchant_key),
        mch_serial_no="1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C",
        api_base="https://pay.test/sandbox",
    )


def v2_server(answer: dict[str, str], *, sign_key: str = API_KEY) -> httpx.AsyncClient:
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fields = wp.parse_xml(request.content)
        wp.verify_v2_sign(fields, API_KEY)
        seen.append({"path": request.url.path, **fields})
        reply = {
            "return_code": "SUCCESS",
            "return_msg": "OK",
            "appid": APP_ID,
            "mch_id": MCH_ID,
            "nonce_str": "r",
        }
        reply.update(answer)
        return httpx.Response(200, content=wp.to_xml({**reply, "sign": wp.sign_v2(reply, sign_key)}))

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    http.seen = seen  # type: ignore[attr-defined]
    return http


async def test_order_query(merchant_key: rsa.RSAPrivateKey) -> None:
    answer = {
        "result_code": "SUCCESS",
        "trade_state": "SUCCESS",
        "out_trade_no": "M1",
        "transaction_id": "4200000848202101120290526543",
        "total_fee": "8800",
        "time_end": "20240520101508",
    }
    http = v2_server(answer)
    async with WechatPayClient(client_settings(merchant_key), http=http, clock=PINNED) as client:
        result = await client.order_query("M1")
    assert result.paid and result.trade_state == "SUCCESS"
    assert result.total_fee == 8800
    assert result.transaction_id == "4200000848202101120290526543"
    sent = http.seen[0]  # type: ignore[attr-defined]
    assert sent["path"] == "/sandbox/pay/orderquery"
    assert (sent["appid"], sent["mch_id"], sent["out_trade_no"]) == (APP_ID, MCH_ID, "M1")


async def test_order_query_not_exist_and_errors(merchant_key: rsa.RSAPrivateKey) -> None:
    settings_ = client_settings(merchant_key)
    async with WechatPayClient(
        settings_, http=v2_server({"result_code": "FAIL", "err_code": "ORDERNOTEXIST"}), clock=PINNED
    ) as client:
        assert (await client.order_query("M1")).trade_state == "NOT_EXIST"
    async with WechatPayClient(
        settings_, http=v2_server({"result_code": "FAIL", "err_code": "SYSTEMERROR"}), clock=PINNED
    ) as client:
        with pytest.raises(WechatPayApiError) as caught:
            await client.order_query("M1")
        assert caught.value.code == "SYSTEMERROR"
    forged = v2_server(
        {"result_code": "SUCCESS", "trade_state": "SUCCESS", "total_fee": "1"}, sign_key="x" * 32
    )
    async with WechatPayClient(settings_, http=forged, clock=PINNED) as client:
        with pytest.raises(NotAuthentic):
            await client.order_query("M1")
    async with WechatPayClient(
        settings_, http=v2_server({"return_code": "FAIL", "return_msg": "签名错误"}), clock=PINNED
    ) as client:
        with pytest.raises(WechatPayApiError):
            await client.order_query("M1")


async def test_unified_order(merchant_key: rsa.RSAPrivateKey) -> None:
    http = v2_server(
        {
            "result_code": "SUCCESS",
            "prepay_id": "wx201410272009395522657a690389285100",
            "trade_type": "NATIVE",
            "code_url": "weixin://wxpay/bizpayurl?pr=JyC91EIz1",
        }
    )
    async with WechatPayClient(client_settings(merchant_key), http=http, clock=PINNED) as client:
        result = await client.unified_order(
            out_trade_no="M1",
            total_fee=8800,
            body="商品",
            trade_type="NATIVE",
            notify_url="https://mall.test/api/wechat/notify",
            client_ip="203.0.113.7",
        )
        assert result.prepay_id == "wx201410272009395522657a690389285100"
        assert result.code_url == "weixin://wxpay/bizpayurl?pr=JyC91EIz1"
        with pytest.raises(ValueError):
            await client.unified_order(
                out_trade_no="M2",
                total_fee=1,
                body="x",
                trade_type="JSAPI",
                notify_url="n",
                client_ip="1.1.1.1",
            )
    sent = http.seen[0]  # type: ignore[attr-defined]
    assert sent["path"] == "/sandbox/pay/unifiedorder"
    assert sent["total_fee"] == "8800" and sent["product_id"] == "M1" and "openid" not in sent


async def test_fetch_certificates(
    merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey, platform_cert: x509.Certificate
) -> None:
    serial = format(platform_cert.serial_number, "X")

    def handler(request: httpx.Request) -> httpx.Response:
        wp.verify_v3_authorization(
            request.headers["Authorization"],
            request.method,
            # Signed from WeChat Pay's root: api_base's own path (/sandbox) is not part of it.
            request.url.raw_path.decode().removeprefix("/sandbox"),
            request.content,
            public_key=merchant_key.public_key(),
            now=NOW,
        )
        body = wp.certificates_body([platform_cert], API_V3_KEY)
        headers = wp.sign_v3_headers(
            body, private_key=platform_key, serial=serial, timestamp=int(NOW), nonce="n1"
        )
        return httpx.Response(200, content=body, headers={**headers, "Content-Type": "application/json"})

    keys = V3KeyStore()
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with WechatPayClient(client_settings(merchant_key), http=http, clock=PINNED, keys=keys) as client:
        certs = await client.fetch_certificates()
    assert [s for s, _ in certs] == [serial]
    assert x509.load_pem_x509_certificate(certs[0][1].encode()) == platform_cert
    assert keys.serials == [serial]


async def test_fetch_certificates_refuses_unsigned_or_foreign(
    merchant_key: rsa.RSAPrivateKey, platform_key: rsa.RSAPrivateKey, platform_cert: x509.Certificate
) -> None:
    serial = format(platform_cert.serial_number, "X")

    def handler(request: httpx.Request) -> httpx.Response:
        body = wp.certificates_body([platform_cert], API_V3_KEY)
        # signed by a key that is not the certificate's
        headers = wp.sign_v3_headers(
            body, private_key=merchant_key, serial=serial, timestamp=int(NOW), nonce="n"
        )
        return httpx.Response(200, content=body, headers=headers)

    keys = V3KeyStore()
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with WechatPayClient(client_settings(merchant_key), http=http, clock=PINNED, keys=keys) as client:
        with pytest.raises(NotAuthentic):
            await client.fetch_certificates()
    assert keys.serials == []

    def wrong_key(request: httpx.Request) -> httpx.Response:
        body = wp.certificates_body([platform_cert], "9" * 32)
        headers = wp.sign_v3_headers(
            body, private_key=platform_key, serial=serial, timestamp=int(NOW), nonce="n"
        )
        return httpx.Response(200, content=body, headers=headers)

    http = httpx.AsyncClient(transport=httpx.MockTransport(wrong_key))
    async with WechatPayClient(client_settings(merchant_key), http=http, clock=PINNED, keys=keys) as client:
        with pytest.raises(NotAuthentic):
            await client.fetch_certificates()


async def test_client_errors_are_channel_errors(merchant_key: rsa.RSAPrivateKey) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("slow", request=request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    async with WechatPayClient(client_settings(merchant_key), http=http, clock=PINNED) as client:
        with pytest.raises(ChannelError):
            await client.order_query("M1")
        with pytest.raises(ChannelError):
            await client.fetch_certificates()
