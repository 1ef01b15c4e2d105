"""SMS channels: signatures against the published vectors, sign/verify pairs, providers over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mallgate.channels import aliyun_v3, sms_aliyun, sms_tencent
from mallgate.channels.errors import NotAuthentic
from mallgate.channels.sms import (
    SANDBOX_ALIYUN,
    ConsoleProvider,
    SmsProvider,
    SmsSendError,
    build_provider,
    mask_mobile,
    normalize_mobile,
)
from mallgate.channels.sms_aliyun import AliyunSmsProvider
from mallgate.channels.sms_tencent import TencentSmsProvider
from mallgate.clock import Clock
from mallgate.settings import AliyunSmsSettings, SmsSettings, TencentSmsSettings

# ---------------------------------------------------------------- Aliyun vectors

ALIYUN_SENDSMS_PARAMS = {
    "AccessKeyId": "testId",
    "Action": "SendSms",
    "Format": "XML",
    "OutId": "123",
    "PhoneNumbers": "15300000001",
    "RegionId": "cn-hangzhou",
    "SignName": "阿里云短信测试专用",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
    "SignatureVersion": "1.0",
    "TemplateCode": "SMS_71390007",
    "TemplateParam": '{"customer":"test"}',
    "Timestamp": "2017-07-12T02:42:19Z",
    "Version": "2017-05-25",
}
ALIYUN_SENDSMS_CQS = (
    "AccessKeyId=testId&Action=SendSms&Format=XML&OutId=123&PhoneNumbers=15300000001&RegionId=cn-hangzhou"
    "&SignName=%E9%98%BF%E9%87%8C%E4%BA%91%E7%9F%AD%E4%BF%A1%E6%B5%8B%E8%AF%95%E4%B8%93%E7%94%A8"
    "&SignatureMethod=HMAC-SHA1&SignatureNonce=45e25e9b-0a6f-4070-8c85-2956eda1b466&SignatureVersion=1.0"
    "&TemplateCode=SMS_71390007&TemplateParam=%7B%22customer%22%3A%22test%22%7D"
    "&Timestamp=2017-07-12T02%3A42%3A19Z&Version=2017-05-25"
)
ALIYUN_SENDSMS_STS = (
    "GET&%2F&AccessKeyId%3DtestId%26Action%3DSendSms%26Format%3DXML%26OutId%3D123%26PhoneNumbers%3D15300000001"
    "%26RegionId%3Dcn-hangzhou%26SignName%3D%25E9%2598%25BF%25E9%2587%258C%25E4%25BA%2591%25E7%259F%25AD"
    "%25E4%25BF%25A1%25E6%25B5%258B%25E8%25AF%2595%25E4%25B8%2593%25E7%2594%25A8%26SignatureMethod%3DHMAC-SHA1"
    "%26SignatureNonce%3D45e25e9b-0a6f-4070-8c85-2956eda1b466%26SignatureVersion%3D1.0"
    "%26TemplateCode%3DSMS_71390007%26TemplateParam%3D%257B%2522customer%2522%253A%2522test%2522%257D"
    "%26Timestamp%3D2017-07-12T02%253A42%253A19Z%26Version%3D2017-05-25"
)

DESCRIBE_REGIONS = {
    "AccessKeyId": "testid",
    "Action": "DescribeRegions",
    "Format": "XML",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
    "SignatureVersion": "1.0",
    "Timestamp": "2016-02-23T12:46:24Z",
    "Version": "2014-05-26",
}


def test_aliyun_sendsms_vector() -> None:
    assert sms_aliyun.canonical_query(ALIYUN_SENDSMS_PARAMS) == ALIYUN_SENDSMS_CQS
    assert sms_aliyun.string_to_sign("GET", ALIYUN_SENDSMS_PARAMS) == ALIYUN_SENDSMS_STS
    signature = sms_aliyun.sign("GET", ALIYUN_SENDSMS_PARAMS, "testSecret")
    assert signature == "zJDF+Lrzhj/ThnlvIToysFRq6t4="
    assert sms_aliyun.percent_encode(signature) == "zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D"
    sms_aliyun.verify("GET", {**ALIYUN_SENDSMS_PARAMS, "Signature": signature}, "testSecret")


def test_aliyun_describe_regions_vectors() -> None:
    assert sms_aliyun.sign("GET", DESCRIBE_REGIONS, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    old_spelling = dict(DESCRIBE_REGIONS)
    old_spelling["TimeStamp"] = old_spelling.pop("Timestamp")
    assert sms_aliyun.sign("GET", old_spelling, "testsecret") == "CT9X0VtwR86fNWSnsc6v8YGOjuE="


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        (" ", "%20"),
        ("*", "%2A"),
        ("~", "~"),
        ("+", "%2B"),
        ("/", "%2F"),
        ("a-_.Z9", "a-_.Z9"),
        ("é", "%C3%A9"),
    ],
)
def test_aliyun_percent_encode(raw: str, encoded: str) -> None:
    assert sms_aliyun.percent_encode(raw) == encoded


def test_aliyun_method_is_signed() -> None:
    signature = sms_aliyun.sign("GET", DESCRIBE_REGIONS, "testsecret")
    with pytest.raises(NotAuthentic):
        sms_aliyun.verify("POST", {**DESCRIBE_REGIONS, "Signature": signature}, "testsecret")


def test_aliyun_verify_rejects_missing_signature_and_stale_timestamp() -> None:
    with pytest.raises(sms_aliyun.AliyunAuthError) as missing:
        sms_aliyun.verify("GET", DESCRIBE_REGIONS, "testsecret")
    assert (missing.value.code, missing.value.message) == (
        "MissingSignature",
        "Signature is mandatory for this action.",
    )
    signed = {**DESCRIBE_REGIONS, "Signature": sms_aliyun.sign("GET", DESCRIBE_REGIONS, "testsecret")}
    signed_at = 1456231584.0  # 2016-02-23T12:46:24Z
    sms_aliyun.verify("GET", signed, "testsecret", now=signed_at + 899)
    with pytest.raises(sms_aliyun.AliyunAuthError) as stale:
        sms_aliyun.verify("GET", signed, "testsecret", now=signed_at + 901)
    assert stale.value.code == "InvalidTimeStamp.Expired"
    assert stale.value.message == "Specified time stamp or date value is expired."


def test_aliyun_refusals_carry_the_gateway_string_to_sign() -> None:
    """The gateway's text ends with its string to sign, which aliyun-python-sdk-core reads after ':'."""
    wrong = {**DESCRIBE_REGIONS, "Signature": sms_aliyun.sign("GET", DESCRIBE_REGIONS, "other")}
    with pytest.raises(sms_aliyun.AliyunAuthError) as mismatch:
        sms_aliyun.verify("GET", wrong, "testsecret")
    server_string = sms_aliyun.string_to_sign("GET", DESCRIBE_REGIONS)
    assert mismatch.value.code == "SignatureDoesNotMatch"
    assert mismatch.value.message == (
        f"Specified signature is not matched with our calculation. server string to sign is:{server_string}"
    )
    assert mismatch.value.message.split(":")[1] == server_string
    version_2 = {**DESCRIBE_REGIONS, "SignatureVersion": "2.0"}
    version_2["Signature"] = sms_aliyun.sign("GET", version_2, "testsecret")
    with pytest.raises(sms_aliyun.AliyunAuthError) as incomplete:
        sms_aliyun.verify("GET", version_2, "testsecret")
    assert incomplete.value.code == "IncompleteSignature"
    assert incomplete.value.message.startswith(
        "The request signature does not conform to Aliyun standards. server string to sign is:GET&%2F&"
    )
    sha256 = {**DESCRIBE_REGIONS, "SignatureMethod": "HMAC-SHA256", "Signature": "x"}
    with pytest.raises(sms_aliyun.AliyunAuthError) as method:
        sms_aliyun.verify("GET", sha256, "testsecret")
    assert method.value.code == "InvalidSignatureMethod"


def test_aliyun_error_answers_have_the_gateway_shape() -> None:
    gateway = sms_aliyun.error_response(
        "SignatureNonceUsed", "Specified signature nonce was used already.", "R-1"
    )
    assert list(gateway) == ["RequestId", "Message", "HostId", "Code", "Recommend"]
    assert gateway["HostId"] == "dysmsapi.aliyuncs.com"
    assert gateway["Recommend"] == (
        "https://api.aliyun.com/troubleshoot?q=SignatureNonceUsed&product=Dysmsapi&requestId=R-1"
    )
    assert sms_aliyun.error_status("SignatureNonceUsed") == 400
    assert sms_aliyun.error_status("InvalidAccessKeyId.NotFound") == 404
    assert sms_aliyun.error_status("MissingTemplateCode") == 400
    business = sms_aliyun.error_response("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号", "R-2")
    assert business == {"RequestId": "R-2", "Message": "非法手机号", "Code": "isv.MOBILE_NUMBER_ILLEGAL"}
    assert sms_aliyun.error_status("isv.MOBILE_NUMBER_ILLEGAL") == 200


param_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12
).filter(lambda k: k != "Signature")
param_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
param_sets = st.dictionaries(param_names, param_values, min_size=1, max_size=8)
secrets_ = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30)


def _v1(params: dict[str, str]) -> dict[str, str]:
    return {**params, "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0"}


@given(params=param_sets, secret=secrets_, method=st.sampled_from(["GET", "POST"]))
def test_aliyun_sign_verify_round_trip(params: dict[str, str], secret: str, method: str) -> None:
    params = _v1(params)
    signed = {**params, "Signature": sms_aliyun.sign(method, params, secret)}
    sms_aliyun.verify(method, signed, secret)


@given(params=param_sets, secret=secrets_, data=st.data())
def test_aliyun_tampered_parameter_rejected(params: dict[str, str], secret: str, data: st.DataObject) -> None:
    params = _v1(params)
    signed = {**params, "Signature": sms_aliyun.sign("POST", params, secret)}
    name = data.draw(st.sampled_from(sorted(params)))
    new_value = data.draw(param_values.filter(lambda v: v != params[name]))
    tampered = {**signed, name: new_value}
    with pytest.raises(sms_aliyun.AliyunAuthError):
        sms_aliyun.verify("POST", tampered, secret)
    with pytest.raises(NotAuthentic):
        sms_aliyun.verify("POST", {**signed, "Extra": "1"}, secret)
    with pytest.raises(NotAuthentic):
        sms_aliyun.verify("POST", signed, secret + "x")


def test_aliyun_build_send_params() -> None:
    settings = AliyunSmsSettings(
        access_key_id="ak", access_key_secret="sk", sign_name="商城", template_code="SMS_1"
    )
    params = sms_aliyun.build_send_params(settings, "+86 138-0013-8000", "012345", Clock(now=lambda: 0.0))
    assert params["PhoneNumbers"] == "13800138000"
    assert params["TemplateParam"] == '{"code":"012345"}'
    assert params["Timestamp"] == "1970-01-01T00:00:00Z"
    assert params["Action"] == "SendSms"
    assert params["Version"] == "2017-05-25"
    assert params["RegionId"] == "cn-hangzhou"
    assert params["Format"] == "JSON"
    assert params["SignatureMethod"] == "HMAC-SHA1"
    assert params["SignatureVersion"] == "1.0"
    assert "Signature" not in params
    other = sms_aliyun.build_send_params(settings, "13800138000", "012345", Clock(now=lambda: 0.0))
    assert other["SignatureNonce"] != params["SignatureNonce"]


# ---------------------------------------------------------------- Aliyun V3 (ACS3-HMAC-SHA256)

# The signature example of Aliyun's "V3版本请求体&签名机制" document
# (help.aliyun.com/zh/sdk/product-overview/v3-request-structure-and-signature): ECS RunInstances,
# fixed nonce and date, key "YourAccessKeyId" / "YourAccessKeySecret", empty body.
V3_DOC_PARAMS = {"ImageId": "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd", "RegionId": "cn-shanghai"}
V3_DOC_QUERY = "ImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai"
V3_DOC_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
V3_DOC_SIGNED = "host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version"
V3_DOC_CANONICAL = (
    "POST\n"
    "/\n"
    f"{V3_DOC_QUERY}\n"
    "host:ecs.cn-shanghai.aliyuncs.com\n"
    "x-acs-action:RunInstances\n"
    f"x-acs-content-sha256:{V3_DOC_EMPTY_SHA256}\n"
    "x-acs-date:2023-10-26T10:22:32Z\n"
    "x-acs-signature-nonce:3156853299f313e23d1673dc12e1703d\n"
    "x-acs-version:2014-05-26\n"
    "\n"
    f"{V3_DOC_SIGNED}\n"
    f"{V3_DOC_EMPTY_SHA256}"
)
V3_DOC_STRING_TO_SIGN = "ACS3-HMAC-SHA256\n7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
V3_DOC_SIGNATURE = "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
V3_DOC_AUTHORIZATION = (
    f"ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders={V3_DOC_SIGNED},Signature={V3_DOC_SIGNATURE}"
)
V3_DOC_AT = datetime(2023, 10, 26, 10, 22, 32, tzinfo=UTC)


def v3_doc_headers() -> dict[str, str]:
    return aliyun_v3.request_headers(
        "YourAccessKeyId",
        "YourAccessKeySecret",
        host="ecs.cn-shanghai.aliyuncs.com",
        action="RunInstances",
        version="2014-05-26",
        query=aliyun_v3.canonical_query(V3_DOC_PARAMS.items()),
        payload=b"",
        now=V3_DOC_AT,
        nonce="3156853299f313e23d1673dc12e1703d",
    )


def v3_verify(
    headers: dict[str, str],
    *,
    body: bytes = b"",
    params: dict[str, str] = V3_DOC_PARAMS,
    now: float | None = None,
    secret: str = "YourAccessKeySecret",
) -> aliyun_v3.Verified:
    return aliyun_v3.verify_request(
        "POST",
        params.items(),
        aliyun_v3.header_values(headers.items()),
        body,
        {"YourAccessKeyId": secret}.get,
        V3_DOC_AT.timestamp() if now is None else now,
    )


def test_aliyun_v3_published_example() -> None:
    headers = v3_doc_headers()
    assert aliyun_v3.canonical_query(V3_DOC_PARAMS.items()) == V3_DOC_QUERY
    assert headers["x-acs-content-sha256"] == V3_DOC_EMPTY_SHA256
    canonical = aliyun_v3.canonical_request(
        "POST", V3_DOC_QUERY, headers, V3_DOC_SIGNED.split(";"), V3_DOC_EMPTY_SHA256
    )
    assert canonical == V3_DOC_CANONICAL
    assert aliyun_v3.string_to_sign(canonical) == V3_DOC_STRING_TO_SIGN
    assert aliyun_v3.signature("YourAccessKeySecret", V3_DOC_STRING_TO_SIGN) == V3_DOC_SIGNATURE
    assert headers["Authorization"] == V3_DOC_AUTHORIZATION
    # The verifying side takes the documented request as it is.
    assert v3_verify(headers) == aliyun_v3.Verified("YourAccessKeyId", "3156853299f313e23d1673dc12e1703d")


def test_aliyun_v3_refusals() -> None:
    headers = v3_doc_headers()
    with pytest.raises(aliyun_v3.AliyunAuthError) as mismatch:
        v3_verify(headers, secret="another secret")
    assert mismatch.value.code == "SignatureDoesNotMatch"
    assert mismatch.value.message == (
        "Specified signature does not match our calculation."
        f" server StringToSign is [{V3_DOC_STRING_TO_SIGN}] server CanonicalRequest is [{V3_DOC_CANONICAL}]"
    )
    # The body is hashed by the verifier: one that is not what x-acs-content-sha256 says fails.
    with pytest.raises(aliyun_v3.AliyunAuthError, match="does not match") as body:
        v3_verify(headers, body=b"PhoneNumbers=13800138000")
    assert body.value.code == "SignatureDoesNotMatch"
    with pytest.raises(aliyun_v3.AliyunAuthError, match="does not match"):
        v3_verify(headers, params={**V3_DOC_PARAMS, "RegionId": "cn-hangzhou"})
    with pytest.raises(aliyun_v3.AliyunAuthError, match="does not match"):
        v3_verify({**headers, "x-acs-action": "StopInstances"})
    with pytest.raises(aliyun_v3.AliyunAuthError) as stale:
        v3_verify(headers, now=V3_DOC_AT.timestamp() + 901)
    assert (stale.value.code, stale.value.message) == (
        "InvalidTimeStamp.Expired",
        "Specified time stamp or date value is expired.",
    )
    v3_verify(headers, now=V3_DOC_AT.timestamp() - 899)
    with pytest.raises(aliyun_v3.AliyunAuthError) as malformed:
        v3_verify({**headers, "x-acs-date": "2023-10-26 10:22:32"})
    assert malformed.value.code == "InvalidTimeStamp.Format"
    with pytest.raises(aliyun_v3.AliyunAuthError) as unknown:
        v3_verify({**headers, "Authorization": headers["Authorization"].replace("YourAccessKeyId", "nobody")})
    assert (unknown.value.code, unknown.value.message) == (
        "InvalidAccessKeyId.NotFound",
        "Specified access key is not found.",
    )


@pytest.mark.parametrize(
    "change",
    [
        # an x-acs- header sent but left out of the signature
        {"x-acs-security-token": "t"},
        # a required header left out of SignedHeaders
        {"Authorization": V3_DOC_AUTHORIZATION.replace("x-acs-action;", "")},
        # a signed header that is not in the request
        {"Authorization": V3_DOC_AUTHORIZATION.replace("host;", "content-type;host;")},
        {"Authorization": V3_DOC_AUTHORIZATION.replace("ACS3-HMAC-SHA256", "ACS3-HMAC-SM3")},
        {"Authorization": V3_DOC_AUTHORIZATION.replace("Signature=06", "Signature=")},
    ],
)
def test_aliyun_v3_incomplete_signature(change: dict[str, str]) -> None:
    with pytest.raises(aliyun_v3.AliyunAuthError) as refused:
        v3_verify({**v3_doc_headers(), **change})
    assert (refused.value.code, refused.value.message) == (
        "IncompleteSignature",
        "The request signature does not conform to Aliyun standards.",
    )


def _v3_signed(params: dict[str, str], secret: str, body: bytes) -> dict[str, str]:
    return aliyun_v3.request_headers(
        "ak",
        secret,
        host="dysmsapi.aliyuncs.com",
        action="SendSms",
        version="2017-05-25",
        query=aliyun_v3.canonical_query(params.items()),
        payload=body,
        now=V3_DOC_AT,
        nonce="n-1",
    )


@given(params=param_sets, secret=secrets_, body=st.binary(max_size=64))
def test_aliyun_v3_sign_verify_round_trip(params: dict[str, str], secret: str, body: bytes) -> None:
    headers = aliyun_v3.header_values(_v3_signed(params, secret, body).items())
    aliyun_v3.verify_request("POST", params.items(), headers, body, {"ak": secret}.get, V3_DOC_AT.timestamp())


@given(params=param_sets, secret=secrets_, data=st.data())
def test_aliyun_v3_tampered_request_rejected(
    params: dict[str, str], secret: str, data: st.DataObject
) -> None:
    headers = aliyun_v3.header_values(_v3_signed(params, secret, b"").items())
    name = data.draw(st.sampled_from(sorted(params)))
    tampered = {**params, name: data.draw(param_values.filter(lambda v: v != params[name]))}
    for query, secret_for in (
        (tampered, {"ak": secret}.get),
        ({**params, "Extra": "1"}, {"ak": secret}.get),
        (params, {"ak": secret + "x"}.get),
    ):
        with pytest.raises(NotAuthentic):
            aliyun_v3.verify_request("POST", query.items(), headers, b"", secret_for, V3_DOC_AT.timestamp())


def test_aliyun_build_v3_request() -> None:
    settings = AliyunSmsSettings(
        access_key_id="ak",
        access_key_secret="sk",
        sign_name="商城",
        template_code="SMS_1",
        endpoint="http://127.0.0.1:8123/_sandbox/aliyun-sms/",
    )
    url, headers = sms_aliyun.build_v3_request(
        settings, "+86 138-0013-8000", "012345", Clock(now=lambda: 0.0)
    )
    sent = httpx.URL(url)
    assert (sent.host, sent.port, sent.path) == ("127.0.0.1", 8123, "/_sandbox/aliyun-sms/")
    assert dict(sent.params) == {
        "PhoneNumbers": "13800138000",
        "SignName": "商城",
        "TemplateCode": "SMS_1",
        "TemplateParam": '{"code":"012345"}',
    }
    assert headers["host"] == "127.0.0.1:8123"
    assert (headers["x-acs-action"], headers["x-acs-version"]) == ("SendSms", "2017-05-25")
    assert headers["x-acs-date"] == "1970-01-01T00:00:00Z"
    assert headers["Authorization"].startswith(
        f"ACS3-HMAC-SHA256 Credential=ak,SignedHeaders={V3_DOC_SIGNED},"
    )
    _, again = sms_aliyun.build_v3_request(settings, "13800138000", "012345", Clock(now=lambda: 0.0))
    assert again["x-acs-signature-nonce"] != headers["x-acs-signature-nonce"]


# ---------------------------------------------------------------- Tencent vectors

TC_PAYLOAD = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
TC_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Host": "cvm.tencentcloudapi.com"}
TC_TIMESTAMP = 1551113065
TC_SECRET_ID = "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE"


def test_tencent_doc_vector() -> None:
    assert hashlib.sha256(TC_PAYLOAD).hexdigest() == (
        "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    )
    canonical = sms_tencent.canonical_request("POST", TC_HEADERS, TC_PAYLOAD)
    assert canonical == (
        "POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:cvm.tencentcloudapi.com\n\n"
        "content-type;host\n35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    )
    assert hashlib.sha256(canonical.encode()).hexdigest() == (
        "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
    )
    assert sms_tencent.utc_date(TC_TIMESTAMP) == "2019-02-25"
    to_sign = sms_tencent.string_to_sign(TC_TIMESTAMP, "cvm", canonical)
    assert to_sign == (
        "TC3-HMAC-SHA256\n1551113065\n2019-02-25/cvm/tc3_request\n"
        "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
    )
    assert sms_tencent.signature("Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", "2019-02-25", "cvm", to_sign) == (
        "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
    )
    assert sms_tencent.signature("Gu5t9xGARNpq86cd98joQYCN3*******", "2019-02-25", "cvm", to_sign) == (
        "2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c"
    )


def test_tencent_authorization_header_vector_and_verify() -> None:
    header = sms_tencent.authorization_header(
        TC_SECRET_ID,
        "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
        timestamp=TC_TIMESTAMP,
        service="cvm",
        method="POST",
        headers=TC_HEADERS,
        payload=TC_PAYLOAD,
    )
    assert header == (
        "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/tc3_request, "
        "SignedHeaders=content-type;host, "
        "Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
    )
    request_headers = {**TC_HEADERS, "X-TC-Timestamp": str(TC_TIMESTAMP), "Authorization": header}
    keys = {TC_SECRET_ID: "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"}
    assert (
        sms_tencent.verify_request(
            "POST", request_headers, TC_PAYLOAD, keys.get, TC_TIMESTAMP + 10, service="cvm"
        )
        == TC_SECRET_ID
    )
    with pytest.raises(sms_tencent.TencentAuthError) as stale:
        sms_tencent.verify_request(
            "POST", request_headers, TC_PAYLOAD, keys.get, TC_TIMESTAMP + 301, service="cvm"
        )
    assert stale.value.code == "AuthFailure.SignatureExpire"
    no_keys: dict[str, str] = {}
    with pytest.raises(sms_tencent.TencentAuthError) as unknown:
        sms_tencent.verify_request(
            "POST", request_headers, TC_PAYLOAD, no_keys.get, TC_TIMESTAMP, service="cvm"
        )
    assert unknown.value.code == "AuthFailure.SecretIdNotFound"
    with pytest.raises(NotAuthentic):  # a cvm signature is no sms signature
        sms_tencent.verify_request("POST", request_headers, TC_PAYLOAD, keys.get, TC_TIMESTAMP)


header_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30
)


@given(
    body=st.binary(max_size=300),
    host=header_values,
    timestamp=st.integers(min_value=0, max_value=4_000_000_000),
    secret_key=header_values,
    skew=st.integers(min_value=-300, max_value=300),
)
def test_tencent_sign_verify_round_trip(
    body: bytes, host: str, timestamp: int, secret_key: str, skew: int
) -> None:
    headers = {"Content-Type": sms_tencent.CONTENT_TYPE, "Host": host, "X-TC-Timestamp": str(timestamp)}
    headers["Authorization"] = sms_tencent.authorization_header(
        "AKIDtest",
        secret_key,
        timestamp=timestamp,
        service="sms",
        method="POST",
        headers=headers,
        payload=body,
    )
    keys = {"AKIDtest": secret_key}
    sms_tencent.verify_request("POST", headers, body, keys.get, timestamp + skew)


@given(
    body=st.binary(max_size=300),
    timestamp=st.integers(min_value=0, max_value=4_000_000_000),
    data=st.data(),
)
def test_tencent_tampered_request_rejected(body: bytes, timestamp: int, data: st.DataObject) -> None:
    headers = {
        "Content-Type": sms_tencent.CONTENT_TYPE,
        "Host": "sms.tencentcloudapi.com",
        "X-TC-Timestamp": str(timestamp),
    }
    headers["Authorization"] = sms_tencent.authorization_header(
        "AKIDtest", "key", timestamp=timestamp, service="sms", method="POST", headers=headers, payload=body
    )
    keys = {"AKIDtest": "key"}
    what = data.draw(st.sampled_from(["body", "host", "content-type", "timestamp", "key"]))
    tampered_headers, tampered_body, lookup = dict(headers), body, keys.get
    if what == "body":
        tampered_body = data.draw(st.binary(max_size=300).filter(lambda b: b != body))
    elif what == "host":
        tampered_headers["Host"] = "evil.example.com"
    elif what == "content-type":
        tampered_headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif what == "timestamp":
        shift = data.draw(st.integers(min_value=1, max_value=200))
        tampered_headers["X-TC-Timestamp"] = str(timestamp + shift)
    else:
        lookup = {"AKIDtest": "other"}.get
    with pytest.raises(NotAuthentic):
        sms_tencent.verify_request("POST", tampered_headers, tampered_body, lookup, timestamp)


# ---------------------------------------------------------------- mobile numbers


@pytest.mark.parametrize(
    "raw", ["13800138000", "+8613800138000", "008613800138000", "8613800138000", "138 0013-8000"]
)
def test_normalize_mobile_accepts(raw: str) -> None:
    assert normalize_mobile(raw) == "13800138000"


@pytest.mark.parametrize("raw", ["", "12800138000", "1380013800", "138001380001", "+8513800138000", "abc"])
def test_normalize_mobile_rejects(raw: str) -> None:
    with pytest.raises(SmsSendError) as err:
        normalize_mobile(raw)
    assert err.value.code == "sms.bad_number"


def test_mask_mobile() -> None:
    assert mask_mobile("13800000000") == "138****0000"


async def test_console_provider_logs_masked_number(caplog: pytest.LogCaptureFixture) -> None:
    provider = ConsoleProvider()
    assert isinstance(provider, SmsProvider)
    with caplog.at_level(logging.INFO, logger="mallgate.sms"):
        serial = await provider.send_code("13812345678", "246810")
    assert serial.startswith("console-")
    text = caplog.text
    assert "138****5678" in text
    assert "246810" in text
    assert "13812345678" not in text


# ---------------------------------------------------------------- providers over HTTP

Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]

ALIYUN = AliyunSmsSettings(
    access_key_id="ak-test",
    access_key_secret="sk-test",
    sign_name="商城",
    template_code="SMS_123",
    endpoint="https://dysms.test/",
)
TENCENT = TencentSmsSettings(
    secret_id="AKIDtest",
    secret_key="sk-test",
    sdk_app_id="1400006666",
    sign_name="商城",
    template_id="1234",
    endpoint="https://sms.test:8443/",
    region="ap-beijing",
)
NOW = 1_700_000_000.0


def aliyun_params(request: httpx.Request, secret: str = "sk-test") -> dict[str, str]:
    """The SendSms parameters, once the request verified as Aliyun would (either signature)."""
    assert request.method == "POST"
    headers = aliyun_v3.header_values(request.headers.items())
    if aliyun_v3.is_v3(headers):
        assert request.content == b""
        query = request.url.params.multi_items()
        aliyun_v3.verify_request("POST", query, headers, request.content, {"ak-test": secret}.get, NOW)
        return dict(query)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    params = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
    sms_aliyun.verify("POST", params, secret, now=NOW)
    return params


def aliyun_stand_in(answer: Callable[[dict[str, str]], tuple[int, dict[str, Any]]]) -> Handler:
    """Verifies the request as Aliyun would, then answers `answer(params)`."""

    async def handle(request: httpx.Request) -> httpx.Response:
        try:
            params = aliyun_params(request)
        except sms_aliyun.AliyunAuthError as exc:
            body = sms_aliyun.error_response(exc.code, exc.message)
            return httpx.Response(sms_aliyun.error_status(exc.code), json=body)
        status, body = answer(params)
        return httpx.Response(status, json=body)

    return handle


def aliyun_provider(
    handler: Handler, settings: AliyunSmsSettings = ALIYUN, timeout: float = 2.0
) -> AliyunSmsProvider:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return AliyunSmsProvider(settings, http, timeout=timeout, clock=Clock(now=lambda: NOW))


@pytest.mark.parametrize("signature", ["v3", "rpc"])
async def test_aliyun_provider_success(signature: str) -> None:
    seen: list[dict[str, str]] = []

    def answer(params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        seen.append(params)
        return 200, sms_aliyun.success_response(
            "900619746936498440^0", "F655A8D5-B967-440B-8683-DAD6FF8DE990"
        )

    provider = aliyun_provider(aliyun_stand_in(answer), ALIYUN.model_copy(update={"signature": signature}))
    assert provider.settings.signature == signature
    assert await provider.send_code("+8613800138000", "482913") == "900619746936498440^0"
    (params,) = seen
    assert params["PhoneNumbers"] == "13800138000"
    assert params["TemplateParam"] == '{"code":"482913"}'
    assert params["SignName"] == "商城"
    assert params["TemplateCode"] == "SMS_123"
    assert ("AccessKeyId" in params) == (signature == "rpc")


@pytest.mark.parametrize(
    ("provider_code", "message", "ours"),
    [
        ("isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控Permits:1", "sms.provider_limited"),
        ("isv.DAY_LIMIT_CONTROL", "触发日发送限额", "sms.provider_limited"),
        ("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号", "sms.bad_number"),
        ("isv.AMOUNT_NOT_ENOUGH", "账户余额不足", "sms.provider_error"),
        ("isp.SYSTEM_ERROR", "系统错误", "sms.provider_error"),
    ],
)
async def test_aliyun_provider_error_mapping(provider_code: str, message: str, ours: str) -> None:
    provider = aliyun_provider(
        aliyun_stand_in(lambda _: (200, sms_aliyun.error_response(provider_code, message)))
    )
    with pytest.raises(SmsSendError) as err:
        await provider.send_code("13800138000", "482913")
    assert err.value.code == ours
    assert err.value.provider_code == provider_code
    assert err.value.message == message


@pytest.mark.parametrize("signature", ["v3", "rpc"])
async def test_aliyun_provider_wrong_secret_is_refused_by_stand_in(signature: str) -> None:
    wrong = ALIYUN.model_copy(update={"access_key_secret": "not-it", "signature": signature})
    provider = aliyun_provider(aliyun_stand_in(lambda _: (200, sms_aliyun.success_response("x"))), wrong)
    with pytest.raises(SmsSendError) as err:
        await provider.send_code("13800138000", "482913")
    assert err.value.provider_code == "SignatureDoesNotMatch"
    assert err.value.code == "sms.provider_error"
    assert "server string to sign is:" in err.value.message or "server StringToSign is [" in err.value.message


async def test_aliyun_provider_non_json_answer() -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with pytest.raises(SmsSendError) as err:
        await aliyun_provider(handle).send_code("13800138000", "482913")
    assert (err.value.code, err.value.provider_code) == ("sms.provider_error", "http.502")


async def test_bad_number_is_refused_before_any_request() -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with pytest.raises(SmsSendError) as err:
        await aliyun_provider(handle).send_code("12345", "482913")
    assert err.value.code == "sms.bad_number"


async def hang(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(5)
    return httpx.Response(200, json={})


async def test_aliyun_provider_timeout() -> None:
    provider = aliyun_provider(hang, timeout=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SmsSendError) as err:
        await provider.send_code("13800138000", "482913")
    assert loop.time() - started < 1.0
    assert err.value.code == "sms.provider_timeout"


async def test_aliyun_provider_network_error() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(SmsSendError) as err:
        await aliyun_provider(refuse).send_code("13800138000", "482913")
    assert (err.value.code, err.value.provider_code) == ("sms.provider_error", "network")


def tencent_stand_in(answer: Callable[[dict[str, Any]], dict[str, Any]]) -> Handler:
    """Verifies the request as Tencent Cloud would, then answers `answer(body)`."""

    async def handle(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.headers["X-TC-Action"] == "SendSms"
        assert request.headers["X-TC-Version"] == "2021-01-11"
        assert request.headers["X-TC-Region"] == "ap-beijing"
        try:
            sms_tencent.verify_request(
                "POST", request.headers, request.content, {"AKIDtest": "sk-test"}.get, NOW
            )
        except sms_tencent.TencentAuthError as exc:
            return httpx.Response(200, json=sms_tencent.error_response(exc.code, exc.message, "req-1"))
        return httpx.Response(200, json=answer(json.loads(request.content)))

    return handle


def tencent_provider(
    handler: Handler, settings: TencentSmsSettings = TENCENT, timeout: float = 2.0
) -> TencentSmsProvider:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return TencentSmsProvider(settings, http, timeout=timeout, clock=Clock(now=lambda: NOW))


async def test_tencent_provider_success() -> None:
    seen: list[dict[str, Any]] = []

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return sms_tencent.success_response(
            "5000:1045710669157053657849499619", body["PhoneNumberSet"][0], "req-1"
        )

    provider = tencent_provider(tencent_stand_in(answer))
    assert await provider.send_code("13800138000", "482913") == "5000:1045710669157053657849499619"
    assert seen == [
        {
            "PhoneNumberSet": ["+8613800138000"],
            "SmsSdkAppId": "1400006666",
            "TemplateId": "1234",
            "SignName": "商城",
            "TemplateParamSet": ["482913", "5"],
        }
    ]


def test_tencent_host_header_comes_from_endpoint() -> None:
    headers = sms_tencent.build_send_headers(TENCENT, b"{}", int(NOW))
    assert headers["Host"] == "sms.test:8443"
    assert headers["X-TC-Timestamp"] == str(int(NOW))


@pytest.mark.parametrize(
    ("provider_code", "ours"),
    [
        ("LimitExceeded.PhoneNumberThirtySecondLimit", "sms.provider_limited"),
        ("LimitExceeded.PhoneNumberDailyLimit", "sms.provider_limited"),
        ("LimitExceeded.DeliveryFrequencyLimit", "sms.provider_limited"),
        ("InvalidParameterValue.IncorrectPhoneNumber", "sms.bad_number"),
        ("FailedOperation.PhoneNumberInBlacklist", "sms.provider_error"),
    ],
)
async def test_tencent_provider_status_mapping(provider_code: str, ours: str) -> None:
    provider = tencent_provider(
        tencent_stand_in(
            lambda body: sms_tencent.status_error_response(
                provider_code, "msg", body["PhoneNumberSet"][0], "req-1"
            )
        )
    )
    with pytest.raises(SmsSendError) as err:
        await provider.send_code("13800138000", "482913")
    assert (err.value.code, err.value.provider_code) == (ours, provider_code)


async def test_tencent_provider_request_error() -> None:
    provider = tencent_provider(
        tencent_stand_in(lambda _: sms_tencent.error_response("InternalError.Timeout", "timeout", "req-1"))
    )
    with pytest.raises(SmsSendError) as err:
        await provider.send_code("13800138000", "482913")
    assert (err.value.code, err.value.provider_code) == ("sms.provider_error", "InternalError.Timeout")


async def test_tencent_provider_wrong_key_is_refused_by_stand_in() -> None:
    provider = tencent_provider(
        tencent_stand_in(lambda _: pytest.fail("the stand-in must refuse first")),
        TENCENT.model_copy(update={"secret_key": "wrong"}),
    )
    with pytest.raises(SmsSendError) as err:
        await provider.send_code("13800138000", "482913")
    assert (err.value.code, err.value.provider_code) == ("sms.provider_error", "AuthFailure.SignatureFailure")


async def test_tencent_provider_timeout() -> None:
    with pytest.raises(SmsSendError) as err:
        await tencent_provider(hang, timeout=0.05).send_code("13800138000", "482913")
    assert err.value.code == "sms.provider_timeout"


# ---------------------------------------------------------------- choosing a provider


async def test_build_provider() -> None:
    async with httpx.AsyncClient() as http:
        # Unset is no provider at all: the console one (codes in the log) only when chosen.
        with pytest.raises(ValueError, match="no SMS provider"):
            build_provider(SmsSettings(), http, None)
        assert isinstance(build_provider(SmsSettings(provider="console"), http, None), ConsoleProvider)
        aliyun = build_provider(SmsSettings(provider="aliyun", aliyun=ALIYUN), http, None)
        assert isinstance(aliyun, AliyunSmsProvider)
        assert aliyun.name == "aliyun"
        assert aliyun.settings.signature == "v3" == AliyunSmsSettings().signature
        tencent = build_provider(
            SmsSettings(provider="tencent", tencent=TENCENT, timeout_seconds=1.5), http, None
        )
        assert isinstance(tencent, TencentSmsProvider)
        assert tencent.timeout == 1.5
        with pytest.raises(ValueError, match="sandbox"):
            build_provider(SmsSettings(provider="sandbox"), http, None)
        sandbox = build_provider(SmsSettings(provider="sandbox"), http, "http://127.0.0.1:9000/")
        assert isinstance(sandbox, AliyunSmsProvider)
        assert sandbox.name == "sandbox"
        assert sandbox.settings.endpoint == "http://127.0.0.1:9000/aliyun-sms/"
        assert sandbox.settings.access_key_id == SANDBOX_ALIYUN.access_key_id == "sandbox-ak"
        assert sandbox.settings.access_key_secret == "sandbox-secret"
        assert sandbox.settings.sign_name == "mallgate"
        assert sandbox.settings.template_code == "SMS_SANDBOX"
        assert sandbox.settings.signature == "v3"
        legacy = build_provider(
            SmsSettings(provider="sandbox", aliyun=AliyunSmsSettings(signature="rpc")), http, "http://s.test"
        )
        assert isinstance(legacy, AliyunSmsProvider)
        assert legacy.settings.signature == "rpc"
        assert legacy.settings.access_key_id == "sandbox-ak"


async def test_sandbox_provider_speaks_aliyun_to_the_sandbox_url() -> None:
    requests: list[httpx.Request] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = aliyun_v3.header_values(request.headers.items())
        assert aliyun_v3.is_v3(headers)
        aliyun_v3.verify_request(
            "POST", request.url.params.multi_items(), headers, b"", {"sandbox-ak": "sandbox-secret"}.get, NOW
        )
        return httpx.Response(200, json=sms_aliyun.success_response("biz-1"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        provider = build_provider(SmsSettings(provider="sandbox"), http, "http://sandbox.test")
        assert isinstance(provider, AliyunSmsProvider)
        provider.clock = Clock(now=lambda: NOW)
        assert await provider.send_code("13800138000", "111111") == "biz-1"
    assert requests[0].url.copy_with(query=None) == "http://sandbox.test/aliyun-sms/"
    assert requests[0].headers["host"] == "sandbox.test"
