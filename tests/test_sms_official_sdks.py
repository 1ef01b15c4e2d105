"""The Aliyun SMS channel and stand-in against code nobody here wrote: Aliyun's official Python SDKs.

- aliyun-python-sdk-core (CommonRequest, the legacy RPC HMAC-SHA1 signature) and
  alibabacloud-dysmsapi20170525 (Client.send_sms, the V3 ACS3-HMAC-SHA256 signature) send
  SendSms to the running sandbox, which must accept them and whose refusals they must parse;
- what our client signs must be what the SDKs' own signers compute for the same request.

The SDKs are test-only dependencies. Their calls are blocking, so they run in a thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from alibabacloud_dysmsapi20170525 import models as dysms_models
from alibabacloud_dysmsapi20170525.client import Client as DysmsClient
from alibabacloud_tea_openapi import models as openapi_models
from alibabacloud_tea_openapi.exceptions import ClientException
from alibabacloud_tea_openapi.utils import Utils as OpenApiUtils
from aliyunsdkcore.acs_exception.exceptions import ServerException
from aliyunsdkcore.auth.composer import rpc_signature_composer
from aliyunsdkcore.client import AcsClient
from aliyunsdkcore.request import CommonRequest, RpcRequest
from darabonba.request import DaraRequest
from test_sms import messages

from conftest import Server
from mallgate.channels import sms_aliyun
from mallgate.channels.sms import SANDBOX_ALIYUN
from mallgate.channels.sms_aliyun import AliyunSmsProvider
from mallgate.clock import Clock
from mallgate.settings import AliyunSmsSettings
from support import unique_mobile

KEY_ID = SANDBOX_ALIYUN.access_key_id
SECRET = SANDBOX_ALIYUN.access_key_secret


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both SDKs take a proxy from the environment; the sandbox is on loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def sandbox_endpoint(server: Server) -> str:
    """The sandbox's Aliyun stand-in as the SDKs take an endpoint: host[:port] and path, no scheme.

    Neither SDK has a setting for a path: both append theirs ("/" for SendSms) to the endpoint,
    so the stand-in's path goes with the host. The V3 SDK then also sends (and signs) that text as
    its Host header; the stand-in verifies the Host it receives, so it holds.
    """
    return f"{urlsplit(server.url).netloc}/_sandbox/aliyun-sms"


# ---------------------------------------------------------------- aliyun-python-sdk-core (RPC)


def core_send(
    server: Server, mobile: str, *, key_id: str = KEY_ID, secret: str = SECRET, kind: str = "common"
) -> dict[str, Any]:
    """SendSms through the SDK as a CommonRequest, or (kind "rpc") as the RpcRequest its generated
    request classes (aliyun-python-sdk-dysmsapi's SendSmsRequest) are."""
    client = AcsClient(key_id, secret, "cn-hangzhou", auto_retry=False)
    request: CommonRequest | RpcRequest
    if kind == "common":
        request = CommonRequest(
            domain=sandbox_endpoint(server), version=sms_aliyun.API_VERSION, action_name="SendSms"
        )
    else:
        request = RpcRequest("Dysmsapi", sms_aliyun.API_VERSION, "SendSms")
        request.set_endpoint(sandbox_endpoint(server))
    request.set_method("POST")
    request.set_protocol_type("http")
    request.set_accept_format("json")
    request.add_query_param("PhoneNumbers", mobile)
    request.add_query_param("SignName", SANDBOX_ALIYUN.sign_name)
    request.add_query_param("TemplateCode", SANDBOX_ALIYUN.template_code)
    request.add_query_param("TemplateParam", json.dumps({"code": "731902"}))
    answer: dict[str, Any] = json.loads(client.do_action_with_exception(request))
    return answer


async def core_refusal(server: Server, mobile: str, **options: str) -> ServerException:
    with pytest.raises(ServerException) as caught:
        await asyncio.to_thread(core_send, server, mobile, **options)
    return caught.value


@pytest.mark.parametrize("kind", ["common", "rpc"])
async def test_core_sdk_rpc_request_is_accepted(server: Server, client: httpx.AsyncClient, kind: str) -> None:
    mobile = unique_mobile()
    answer = await asyncio.to_thread(core_send, server, mobile, kind=kind)
    assert answer["Code"] == "OK" and answer["BizId"] and answer["RequestId"]
    [message] = await messages(client, mobile)
    assert (message["provider"], message["code"]) == ("aliyun", "731902")


async def test_core_sdk_reads_the_bad_signature_answer(server: Server) -> None:
    """On a 400 SignatureDoesNotMatch the SDK takes the text after the first ":" as the gateway's
    string to sign (the stand-in's short text made that an IndexError) and compares it with its own.
    """
    common = await core_refusal(server, unique_mobile(), secret="not-the-secret")
    assert (common.get_http_status(), common.get_error_code()) == (400, "SignatureDoesNotMatch")
    assert common.get_error_msg().startswith(
        "Specified signature is not matched with our calculation."
        " server string to sign is:POST&%2F&AccessKeyId%3Dsandbox-ak%26Action%3DSendSms%26"
    )
    assert common.get_request_id()
    # An RpcRequest keeps its string to sign: equal to the stand-in's, with the signature refused,
    # the SDK concludes the secret is wrong.
    rpc = await core_refusal(server, unique_mobile(), secret="not-the-secret", kind="rpc")
    assert (rpc.get_http_status(), rpc.get_error_code()) == (400, "InvalidAccessKeySecret")


async def test_core_sdk_reads_gateway_and_business_answers(server: Server) -> None:
    unknown = await core_refusal(server, unique_mobile(), key_id="nobody")
    assert (unknown.get_http_status(), unknown.get_error_code()) == (404, "InvalidAccessKeyId.NotFound")
    assert unknown.get_error_msg() == "Specified access key is not found."
    # A business refusal is a 200 the SDK hands back as the answer.
    illegal = await asyncio.to_thread(core_send, server, "19990000001")
    assert (illegal["Code"], illegal["Message"]) == ("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")


# ---------------------------------------------------------------- alibabacloud-dysmsapi20170525 (V3)


def dysms_send(
    server: Server, mobile: str, *, key_id: str = KEY_ID, secret: str = SECRET
) -> dysms_models.SendSmsResponseBody:
    config = openapi_models.Config(
        access_key_id=key_id, access_key_secret=secret, endpoint=sandbox_endpoint(server), protocol="http"
    )
    request = dysms_models.SendSmsRequest(
        phone_numbers=mobile,
        sign_name=SANDBOX_ALIYUN.sign_name,
        template_code=SANDBOX_ALIYUN.template_code,
        template_param=json.dumps({"code": "864201"}),
    )
    body: dysms_models.SendSmsResponseBody = DysmsClient(config).send_sms(request).body
    return body


async def test_dysms_sdk_v3_request_is_accepted(server: Server, client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    body = await asyncio.to_thread(dysms_send, server, mobile)
    assert (body.code, body.message) == ("OK", "OK")
    assert body.biz_id and body.request_id
    [message] = await messages(client, mobile)
    assert (message["provider"], message["code"]) == ("aliyun", "864201")
    # Flow control answers as Dysms does: a 200 with the business code in the body.
    again = await asyncio.to_thread(dysms_send, server, mobile)
    assert (again.code, again.message) == ("isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控Permits:1")


async def test_dysms_sdk_reads_gateway_refusals(server: Server) -> None:
    with pytest.raises(ClientException) as wrong:
        await asyncio.to_thread(dysms_send, server, unique_mobile(), secret="not-the-secret")
    assert (wrong.value.status_code, wrong.value.code) == (400, "SignatureDoesNotMatch")
    assert "Specified signature does not match our calculation." in str(wrong.value.message)
    assert wrong.value.request_id and wrong.value.request_id in str(wrong.value.message)
    assert wrong.value.data["HostId"] == "dysmsapi.aliyuncs.com"
    assert wrong.value.data["Recommend"].endswith(f"requestId={wrong.value.request_id}")
    with pytest.raises(ClientException) as unknown:
        await asyncio.to_thread(dysms_send, server, unique_mobile(), key_id="nobody")
    assert (unknown.value.status_code, unknown.value.code) == (404, "InvalidAccessKeyId.NotFound")


# ---------------------------------------------------------------- our signatures, the SDKs' signers

SETTINGS = AliyunSmsSettings(
    access_key_id="LTAI-test",
    access_key_secret="test-secret",
    sign_name="阿里云短信测试",
    template_code="SMS_154950909",
    endpoint="https://dysmsapi.aliyuncs.com/",
)


async def sent_by_our_client(signature: str) -> httpx.Request:
    requests: list[httpx.Request] = []

    async def capture(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=sms_aliyun.success_response("biz-1"))

    settings = SETTINGS.model_copy(update={"signature": signature})
    async with httpx.AsyncClient(transport=httpx.MockTransport(capture)) as http:
        provider = AliyunSmsProvider(settings, http, timeout=2, clock=Clock(now=lambda: 1_700_000_000.0))
        await provider.send_code("13800138000", "a b*c~é")
    [request] = requests
    return request


async def test_our_v3_signature_is_the_dysms_sdk_signature() -> None:
    request = await sent_by_our_client("v3")
    authorization = request.headers["authorization"]
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    sdk_request = DaraRequest()
    sdk_request.method = request.method
    sdk_request.pathname = "/"
    sdk_request.query = dict(request.url.params.multi_items())
    sdk_request.headers = {name: request.headers[name] for name in signed}
    payload_hash = request.headers["x-acs-content-sha256"]
    sdk_authorization: Callable[..., str] = OpenApiUtils.get_authorization
    expected = sdk_authorization(sdk_request, "ACS3-HMAC-SHA256", payload_hash, "LTAI-test", "test-secret")
    assert authorization == expected
    assert request.headers["host"] == "dysmsapi.aliyuncs.com" and request.content == b""


async def test_our_rpc_signature_is_the_core_sdk_signature() -> None:
    request = await sent_by_our_client("rpc")
    params = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
    ours = params.pop("Signature")
    composer = vars(rpc_signature_composer)
    sdk_string_to_sign = composer["__compose_string_to_sign"]("POST", params)
    assert sdk_string_to_sign == sms_aliyun.string_to_sign("POST", params)
    assert composer["__get_signature"](sdk_string_to_sign, "test-secret") == ours
