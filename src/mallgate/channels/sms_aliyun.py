"""Aliyun Dysms `SendSms`, signed with V3 (ACS3-HMAC-SHA256, the default) or the legacy RPC HMAC-SHA1.

`sign` and `verify` are the RPC signature (version 1.0); `aliyun_v3` holds the V3
one. The client uses the signing side, the sandbox stand-in the verifying side,
and the published vectors pin both. The stand-in's answers (`success_response`,
`error_response`, `error_status`) have the gateway's real shapes and texts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from mallgate.channels import aliyun_v3
from mallgate.channels.aliyun_v3 import INCOMPLETE, AliyunAuthError, percent_encode
from mallgate.channels.sms import SmsErrorCode, SmsSendError, json_object, normalize_mobile, post_within
from mallgate.clock import Clock, default_clock
from mallgate.settings import AliyunSmsSettings

__all__ = ["AliyunAuthError", "AliyunSmsProvider", "percent_encode"]

API_VERSION = "2017-05-25"
ACTION = "SendSms"
REGION_ID = "cn-hangzhou"
PRODUCT = "Dysmsapi"
HOST_ID = "dysmsapi.aliyuncs.com"
TIMESTAMP_FORMAT = aliyun_v3.DATE_FORMAT
TIMESTAMP_TOLERANCE = aliyun_v3.DATE_TOLERANCE
RPC_MISMATCH = "Specified signature is not matched with our calculation."
# After the texts of SignatureDoesNotMatch and IncompleteSignature the gateway appends this and
# its string to sign; aliyun-python-sdk-core splits the message at ":" to compare it with its own.
SERVER_STRING = " server string to sign is:"

_LIMITED = frozenset(
    {
        "isv.BUSINESS_LIMIT_CONTROL",
        "isv.DAY_LIMIT_CONTROL",
        "isv.MONTH_LIMIT_CONTROL",
        "Throttling",
        "Throttling.User",
        "Throttling.Api",
    }
)
_BAD_NUMBER = frozenset({"isv.MOBILE_NUMBER_ILLEGAL"})

# The gateway's own refusals and their HTTP statuses; they also carry HostId and Recommend.
# Dysms's business answers (isv./isp. codes) come with 200 and only RequestId, Code, Message.
GATEWAY_ERROR_STATUS: dict[str, int] = {
    "SignatureDoesNotMatch": 400,
    "IncompleteSignature": 400,
    "MissingSignature": 400,
    "InvalidSignatureMethod": 400,
    "MissingSignatureNonce": 400,
    "SignatureNonceUsed": 400,
    "InvalidTimeStamp.Expired": 400,
    "InvalidTimeStamp.Format": 400,
    "MissingParameter": 400,
    "InvalidParameter": 400,
    "MissingAccessKeyId": 400,
    "InvalidAccessKeyId.NotFound": 404,
    "InvalidAction.NotFound": 404,
    "Throttling.User": 400,
}


def is_business_error(code: str) -> bool:
    return code.startswith(("isv.", "isp."))


def error_status(code: str) -> int:
    """The HTTP status Aliyun answers `code` with (a gateway code not listed is a 400)."""
    return 200 if is_business_error(code) else GATEWAY_ERROR_STATUS.get(code, 400)


def canonical_query(params: Mapping[str, str]) -> str:
    return aliyun_v3.canonical_query((k, v) for k, v in params.items() if k != "Signature")


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    """METHOD&%2F&pe(canonical query): the query is encoded a second time, on purpose."""
    return f"{method.upper()}&{percent_encode('/')}&{percent_encode(canonical_query(params))}"


def sign(method: str, params: Mapping[str, str], secret: str) -> str:
    """Base64 HMAC-SHA1 with key `secret + "&"` (the empty token secret of the v1 scheme)."""
    digest = hmac.new(f"{secret}&".encode(), string_to_sign(method, params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def verify(
    method: str,
    params: Mapping[str, str],
    secret: str,
    *,
    now: float | None = None,
    tolerance: int = TIMESTAMP_TOLERANCE,
) -> None:
    """Raise AliyunAuthError unless `params` carry a valid Signature (and, given `now`, a fresh Timestamp).

    The refusals carry the gateway's texts, its string to sign included.
    """
    given = params.get("Signature")
    if not given:
        raise AliyunAuthError("MissingSignature", "Signature is mandatory for this action.")
    if params.get("SignatureMethod") != "HMAC-SHA1":
        raise AliyunAuthError("InvalidSignatureMethod", "Specified signature method is not supported.")
    server_string = string_to_sign(method, params)
    if params.get("SignatureVersion") != "1.0":
        raise AliyunAuthError("IncompleteSignature", f"{INCOMPLETE}{SERVER_STRING}{server_string}")
    if not hmac.compare_digest(sign(method, params, secret).encode(), given.encode()):
        raise AliyunAuthError("SignatureDoesNotMatch", f"{RPC_MISMATCH}{SERVER_STRING}{server_string}")
    if now is not None:
        aliyun_v3.check_fresh(params.get("Timestamp", ""), now, tolerance)


def template_param(code: str) -> str:
    # Compact JSON: values must be strings, and the text is what gets signed.
    return json.dumps({"code": code}, separators=(",", ":"))


def build_send_params(
    settings: AliyunSmsSettings, mobile: str, code: str, clock: Clock = default_clock
) -> dict[str, str]:
    """The RPC SendSms parameters, without Signature (add `sign("POST", params, secret)`)."""
    return {
        "AccessKeyId": settings.access_key_id,
        "Action": ACTION,
        "Format": "JSON",
        "RegionId": REGION_ID,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": str(uuid.uuid4()),
        "SignatureVersion": "1.0",
        "Timestamp": clock.utcnow().strftime(TIMESTAMP_FORMAT),
        "Version": API_VERSION,
        "PhoneNumbers": normalize_mobile(mobile),
        "SignName": settings.sign_name,
        "TemplateCode": settings.template_code,
        "TemplateParam": template_param(code),
    }


def build_v3_request(
    settings: AliyunSmsSettings,
    mobile: str,
    code: str,
    clock: Clock = default_clock,
    nonce: str | None = None,
) -> tuple[str, dict[str, str]]:
    """The V3 SendSms request: the URL (the parameters in its query, as the official SDK sends
    them, with an empty body) and its signed headers."""
    params = {
        "PhoneNumbers": normalize_mobile(mobile),
        "SignName": settings.sign_name,
        "TemplateCode": settings.template_code,
        "TemplateParam": template_param(code),
    }
    query = aliyun_v3.canonical_query(params.items())
    headers = aliyun_v3.request_headers(
        settings.access_key_id,
        settings.access_key_secret,
        # Host must be the one the request really goes to (port included), since it is signed.
        host=urlsplit(settings.endpoint).netloc,
        action=ACTION,
        version=API_VERSION,
        query=query,
        payload=b"",
        now=clock.utcnow(),
        nonce=nonce or uuid.uuid4().hex,
    )
    headers["accept"] = "application/json"
    return f"{settings.endpoint}?{query}", headers


def error_code_for(provider_code: str) -> SmsErrorCode:
    if provider_code in _LIMITED:
        return "sms.provider_limited"
    if provider_code in _BAD_NUMBER:
        return "sms.bad_number"
    return "sms.provider_error"


def success_response(biz_id: str, request_id: str | None = None) -> dict[str, str]:
    """What SendSms answers when it accepted the message (for the stand-in)."""
    return {
        "Code": "OK",
        "Message": "OK",
        "BizId": biz_id,
        "RequestId": request_id or str(uuid.uuid4()).upper(),
    }


def error_response(code: str, message: str, request_id: str | None = None) -> dict[str, str]:
    """What Aliyun answers for `code` (for the stand-in), to send with HTTP status `error_status(code)`.

    A gateway refusal carries HostId and a Recommend link naming the request, in the order the
    gateway writes them; a business answer only RequestId, Message and Code.
    """
    request_id = request_id or str(uuid.uuid4()).upper()
    if is_business_error(code):
        return {"RequestId": request_id, "Message": message, "Code": code}
    return {
        "RequestId": request_id,
        "Message": message,
        "HostId": HOST_ID,
        "Code": code,
        "Recommend": f"https://api.aliyun.com/troubleshoot?q={code}&product={PRODUCT}&requestId={request_id}",
    }


class AliyunSmsProvider:
    def __init__(
        self,
        settings: AliyunSmsSettings,
        http: httpx.AsyncClient,
        *,
        timeout: float,
        clock: Clock = default_clock,
        name: str = "aliyun",
    ) -> None:
        self.settings = settings
        self.http = http
        self.timeout = timeout
        self.clock = clock
        self.name = name

    async def send_code(self, mobile: str, code: str) -> str:
        if self.settings.signature == "rpc":
            params = build_send_params(self.settings, mobile, code, self.clock)
            params["Signature"] = sign("POST", params, self.settings.access_key_secret)
            response = await post_within(
                self.http, self.name, self.timeout, self.settings.endpoint, data=params
            )
        else:
            url, headers = build_v3_request(self.settings, mobile, code, self.clock)
            response = await post_within(self.http, self.name, self.timeout, url, headers=headers)
        body: dict[str, Any] = json_object(response, self.name)
        provider_code = str(body.get("Code", ""))
        if provider_code == "OK":
            return str(body.get("BizId") or body.get("RequestId") or "")
        if not provider_code:
            provider_code = f"http.{response.status_code}"
        raise SmsSendError(error_code_for(provider_code), provider_code, str(body.get("Message", "")))
