"""The SMS stand-ins on their own: the channel providers against them, their refusals and flow control,
the message store that several workers share, and the pages."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_sms import messages, set_rule

from conftest import Server
from mallgate.channels import aliyun_v3, sms_aliyun, sms_tencent
from mallgate.channels.sms import SANDBOX_ALIYUN, SmsSendError
from mallgate.channels.sms_aliyun import AliyunSmsProvider
from mallgate.channels.sms_tencent import TencentSmsProvider
from mallgate.clock import Clock, default_clock
from mallgate.sandbox.sms_standin import ALIYUN_WINDOW, SANDBOX_TENCENT, SmsBook
from support import unique_mobile


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def aliyun(server: Server, http: httpx.AsyncClient, **changes: str) -> AliyunSmsProvider:
    settings = SANDBOX_ALIYUN.model_copy(update={"endpoint": f"{server.url}/_sandbox/aliyun-sms/", **changes})
    return AliyunSmsProvider(settings, http, timeout=5)


def tencent(server: Server, http: httpx.AsyncClient, **changes: str) -> TencentSmsProvider:
    settings = SANDBOX_TENCENT.model_copy(
        update={"endpoint": f"{server.url}/_sandbox/tencent-sms/", **changes}
    )
    return TencentSmsProvider(settings, http, timeout=5)


async def failure(provider: AliyunSmsProvider | TencentSmsProvider, mobile: str) -> SmsSendError:
    with pytest.raises(SmsSendError) as caught:
        await provider.send_code(mobile, "123456")
    return caught.value


# ------------------------------------------------------------------ Aliyun


async def test_aliyun_sends_and_records_the_message(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    mobile = unique_mobile()
    biz_id = await aliyun(server, http).send_code(f"+86{mobile}", "482913")
    assert biz_id
    [message] = await messages(client, mobile)
    assert message["provider"] == "aliyun" and message["code"] == "482913"
    assert message["text"].startswith("【mallgate】") and "482913" in message["text"]


async def test_aliyun_flow_control_one_per_minute(server: Server, http: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    provider = aliyun(server, http)
    await provider.send_code(mobile, "111111")
    error = await failure(provider, mobile)
    assert (error.code, error.provider_code) == ("sms.provider_limited", "isv.BUSINESS_LIMIT_CONTROL")
    assert "Permits:1" in error.message


async def test_aliyun_illegal_numbers(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    provider = aliyun(server, http)
    error = await failure(provider, "19991234567")
    assert (error.code, error.provider_code) == ("sms.bad_number", "isv.MOBILE_NUMBER_ILLEGAL")
    mobile = unique_mobile()
    await set_rule(client, mobile, "fail")
    assert (await failure(provider, mobile)).provider_code == "isv.MOBILE_NUMBER_ILLEGAL"
    assert await messages(client, mobile) == []


async def test_aliyun_refuses_bad_credentials_and_config(server: Server, http: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    bad_secret = await failure(aliyun(server, http, access_key_secret="wrong"), mobile)
    assert (bad_secret.code, bad_secret.provider_code) == ("sms.provider_error", "SignatureDoesNotMatch")
    unknown = await failure(aliyun(server, http, access_key_id="nobody"), mobile)
    assert unknown.provider_code == "InvalidAccessKeyId.NotFound"
    assert (
        await failure(aliyun(server, http, sign_name="other"), mobile)
    ).provider_code == "isv.SMS_SIGNATURE_ILLEGAL"
    assert (
        await failure(aliyun(server, http, template_code="SMS_1"), mobile)
    ).provider_code == "isv.SMS_TEMPLATE_ILLEGAL"


async def test_aliyun_gateway_errors_have_the_real_shape(server: Server, http: httpx.AsyncClient) -> None:
    url = f"{server.url}/_sandbox/aliyun-sms/"
    params = sms_aliyun.build_send_params(SANDBOX_ALIYUN, unique_mobile(), "123456")
    params["Signature"] = sms_aliyun.sign("GET", params, SANDBOX_ALIYUN.access_key_secret)
    first = await http.get(url, params=params)  # GET with the query string is allowed too
    assert first.status_code == 200 and first.json()["Code"] == "OK"
    assert set(first.json()) == {"Code", "Message", "BizId", "RequestId"}
    replay = await http.get(url, params=params)
    assert replay.status_code == 400
    assert replay.json()["Code"] == "SignatureNonceUsed" and {"HostId", "Recommend"} <= set(replay.json())

    stale = sms_aliyun.build_send_params(SANDBOX_ALIYUN, unique_mobile(), "123456")
    stale["Timestamp"] = "2017-07-12T02:42:19Z"
    stale["Signature"] = sms_aliyun.sign("POST", stale, SANDBOX_ALIYUN.access_key_secret)
    assert (await http.post(url, data=stale)).json()["Code"] == "InvalidTimeStamp.Expired"

    missing = sms_aliyun.build_send_params(SANDBOX_ALIYUN, unique_mobile(), "123456")
    del missing["PhoneNumbers"]
    missing["Signature"] = sms_aliyun.sign("POST", missing, SANDBOX_ALIYUN.access_key_secret)
    answer = await http.post(url, data=missing)
    assert answer.status_code == 400 and answer.json()["Code"] == "MissingPhoneNumbers"


def assert_gateway_refusal(answer: httpx.Response, status: int, code: str, message: str) -> None:
    """A gateway refusal as Aliyun writes it: its status, the five fields, a Recommend naming the request."""
    body = answer.json()
    assert answer.status_code == status, body
    assert list(body) == ["RequestId", "Message", "HostId", "Code", "Recommend"]
    assert (body["Code"], body["HostId"]) == (code, "dysmsapi.aliyuncs.com")
    assert body["Message"].startswith(message), body["Message"]
    assert answer.headers["x-acs-request-id"] == body["RequestId"]
    assert body["Recommend"] == (
        f"https://api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi&requestId={body['RequestId']}"
    )


async def test_aliyun_rpc_bad_signature_answers_the_server_string_to_sign(
    server: Server, http: httpx.AsyncClient
) -> None:
    params = sms_aliyun.build_send_params(SANDBOX_ALIYUN, unique_mobile(), "123456")
    params["Signature"] = sms_aliyun.sign("POST", params, "not-the-secret")
    answer = await http.post(f"{server.url}/_sandbox/aliyun-sms/", data=params)
    server_string = sms_aliyun.string_to_sign("POST", params)
    assert_gateway_refusal(
        answer,
        400,
        "SignatureDoesNotMatch",
        f"Specified signature is not matched with our calculation. server string to sign is:{server_string}",
    )
    # What aliyun-python-sdk-core compares with its own string to sign (it crashed on the short text).
    assert answer.json()["Message"].split(":")[1] == server_string


@pytest.mark.parametrize("signature", ["v3", "rpc"])
async def test_aliyun_accepts_both_signatures(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient, signature: str
) -> None:
    mobile = unique_mobile()
    assert await aliyun(server, http, signature=signature).send_code(mobile, "246802")
    [message] = await messages(client, mobile)
    assert (message["provider"], message["code"]) == ("aliyun", "246802")


def v3_request(
    server: Server, mobile: str, clock: Clock = default_clock, **changes: str
) -> tuple[str, dict[str, str]]:
    settings = SANDBOX_ALIYUN.model_copy(update={"endpoint": f"{server.url}/_sandbox/aliyun-sms/", **changes})
    return sms_aliyun.build_v3_request(settings, mobile, "135246", clock)


async def test_aliyun_v3_refusals_have_the_real_shape(server: Server, http: httpx.AsyncClient) -> None:
    url, headers = v3_request(server, unique_mobile(), access_key_secret="not-the-secret")
    wrong = await http.post(url, headers=headers)
    assert_gateway_refusal(
        wrong,
        400,
        "SignatureDoesNotMatch",
        "Specified signature does not match our calculation. server StringToSign is [ACS3-HMAC-SHA256\n",
    )
    assert "server CanonicalRequest is [POST\n/\nPhoneNumbers=" in wrong.json()["Message"]

    url, headers = v3_request(server, unique_mobile(), access_key_id="nobody")
    unknown = await http.post(url, headers=headers)
    assert_gateway_refusal(unknown, 404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")

    sixteen_minutes_ago = Clock(now=lambda: time.time() - 16 * 60)
    url, headers = v3_request(server, unique_mobile(), sixteen_minutes_ago)
    assert_gateway_refusal(
        await http.post(url, headers=headers),
        400,
        "InvalidTimeStamp.Expired",
        "Specified time stamp or date value is expired.",
    )

    url, headers = v3_request(server, unique_mobile())
    first = await http.post(url, headers=headers)
    assert first.status_code == 200 and first.json()["Code"] == "OK", first.json()
    assert_gateway_refusal(
        await http.post(url, headers=headers),
        400,
        "SignatureNonceUsed",
        "Specified signature nonce was used already.",
    )

    # A body the x-acs-content-sha256 does not describe.
    url, headers = v3_request(server, unique_mobile())
    tampered = await http.post(url, headers=headers, content=b"PhoneNumbers=13800138000")
    assert_gateway_refusal(tampered, 400, "SignatureDoesNotMatch", "Specified signature does not match")

    url, headers = v3_request(server, unique_mobile())
    unsigned = await http.post(url, headers={**headers, "x-acs-security-token": "token"})
    assert_gateway_refusal(
        unsigned, 400, "IncompleteSignature", "The request signature does not conform to Aliyun standards."
    )


async def test_aliyun_v3_needs_a_nonce(server: Server, http: httpx.AsyncClient) -> None:
    url, headers = v3_request(server, unique_mobile())
    del headers["x-acs-signature-nonce"]
    query = url.partition("?")[2]
    headers["Authorization"] = aliyun_v3.authorization(
        SANDBOX_ALIYUN.access_key_id,
        SANDBOX_ALIYUN.access_key_secret,
        method="POST",
        query=query,
        headers={k: v for k, v in headers.items() if k not in ("Authorization", "accept")},
        payload_hash=aliyun_v3.sha256_hex(b""),
    )
    assert_gateway_refusal(
        await http.post(url, headers=headers),
        400,
        "MissingSignatureNonce",
        "SignatureNonce is mandatory for this action.",
    )


async def test_aliyun_business_errors_have_the_real_shape(server: Server, http: httpx.AsyncClient) -> None:
    url, headers = v3_request(server, "19990000000")
    answer = await http.post(url, headers=headers)
    assert answer.status_code == 200
    body = answer.json()
    assert list(body) == ["RequestId", "Message", "Code"]
    assert (body["Code"], body["Message"]) == ("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")


# ------------------------------------------------------------------ Tencent


async def test_tencent_sends_and_records_the_message(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    mobile = unique_mobile()
    serial = await tencent(server, http).send_code(mobile, "907312")
    assert serial
    [message] = await messages(client, mobile)
    assert message["provider"] == "tencent" and message["code"] == "907312"
    assert "907312" in message["text"] and "5分钟" in message["text"]


async def test_tencent_thirty_second_limit(server: Server, http: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    provider = tencent(server, http)
    await provider.send_code(mobile, "111111")
    error = await failure(provider, mobile)
    assert (error.code, error.provider_code) == (
        "sms.provider_limited",
        "LimitExceeded.PhoneNumberThirtySecondLimit",
    )


async def test_tencent_refusals(server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    bad_key = await failure(tencent(server, http, secret_key="wrong"), mobile)
    assert (bad_key.code, bad_key.provider_code) == ("sms.provider_error", "AuthFailure.SignatureFailure")
    unknown = await failure(tencent(server, http, secret_id="AKIDnobody"), mobile)
    assert unknown.provider_code == "AuthFailure.SecretIdNotFound"
    wrong_app = await failure(tencent(server, http, sdk_app_id="1400999999"), mobile)
    assert wrong_app.provider_code == "InvalidParameterValue.SdkAppIdNotExist"
    illegal = await failure(tencent(server, http), "19990001111")
    assert (illegal.code, illegal.provider_code) == (
        "sms.bad_number",
        "InvalidParameterValue.IncorrectPhoneNumber",
    )
    assert await messages(client, mobile) == []


async def test_tencent_answers_per_number(server: Server, http: httpx.AsyncClient) -> None:
    good, limited = unique_mobile(), unique_mobile()
    await tencent(server, http).send_code(limited, "111111")
    settings = SANDBOX_TENCENT.model_copy(update={"endpoint": f"{server.url}/_sandbox/tencent-sms/"})
    body = json.dumps(
        {
            "PhoneNumberSet": [f"+86{good}", f"+86{limited}", "+8612"],
            "SmsSdkAppId": settings.sdk_app_id,
            "TemplateId": settings.template_id,
            "SignName": settings.sign_name,
            "TemplateParamSet": ["222222", "5"],
        }
    ).encode()
    headers = sms_tencent.build_send_headers(settings, body, int(time.time()))
    answer = (await http.post(settings.endpoint, content=body, headers=headers)).json()["Response"]
    codes = [(s["PhoneNumber"], s["Code"]) for s in answer["SendStatusSet"]]
    assert codes == [
        (f"+86{good}", "Ok"),
        (f"+86{limited}", "LimitExceeded.PhoneNumberThirtySecondLimit"),
        ("+8612", "InvalidParameterValue.IncorrectPhoneNumber"),
    ]
    assert "RequestId" in answer


# ------------------------------------------------------------------ store and pages


def test_workers_sharing_the_store_send_one_message_per_window(tmp_path: Path) -> None:
    path = tmp_path / "sms.sqlite3"
    books = [SmsBook(path) for _ in range(8)]  # one per "worker", each with its own connections

    def submit(book: SmsBook) -> Any:
        return book.submit("aliyun", ["13800000000"], "text 123456", "123456", 1000.0, ALIYUN_WINDOW)

    with ThreadPoolExecutor(8) as pool:
        verdicts = [v["13800000000"] for v in pool.map(submit, books * 3)]
    assert sorted(verdicts) == ["limited"] * 23 + ["sent"]
    assert len(books[0].messages("13800000000")) == 1
    later = books[1].submit(
        "aliyun", ["13800000000"], "t", "654321", 1000.0 + ALIYUN_WINDOW + 1, ALIYUN_WINDOW
    )
    assert later == {"13800000000": "sent"}
    assert [m.code for m in books[2].messages("13800000000")] == ["654321", "123456"]  # newest first


async def test_pages_show_messages_newest_first(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    first, second = unique_mobile(), unique_mobile()
    await aliyun(server, http).send_code(first, "135790")
    await tencent(server, http).send_code(second, "246801")
    page = await client.get("/_sandbox/sms")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.index(second) < page.text.index(first)
    everything = (await client.get("/_sandbox/sms/messages")).json()["messages"]
    mine = [m["mobile"] for m in everything if m["mobile"] in (first, second)]
    assert mine == [second, first]
    assert (await client.get("/_sandbox/sms/messages", params={"mobile": "+86 " + first})).json()["messages"][
        0
    ]["code"] == "135790"
    index = await client.get("/_sandbox/")
    assert 'href="./sms"' in index.text


async def test_rules_from_the_page_form(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    mobile = unique_mobile()
    answer = await client.post("/_sandbox/sms/rules", data={"mobile": mobile, "rule": "fail"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "../sms"
    assert mobile in (await client.get("/_sandbox/sms")).text
    assert (await failure(aliyun(server, http), mobile)).code == "sms.bad_number"
    bad = await client.post("/_sandbox/sms/rules", json={"mobile": mobile, "rule": "explode"})
    assert bad.status_code == 400
    await set_rule(client, mobile, "")
    await aliyun(server, http).send_code(mobile, str(uuid.uuid4().int % 10**6).zfill(6))
