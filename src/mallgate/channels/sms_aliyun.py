"""Aliyun Dysms `SendSms`, RPC style, signature version 1.0 (HMAC-SHA1).

`sign` is what the client uses; `verify` is what the sandbox stand-in uses on
the requests it receives. Both go through the same `string_to_sign`, and the
published vectors pin it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from calendar import timegm
from collections.abc import Mapping
from time import strptime
from typing import Any
from urllib.parse import quote

import httpx

from mallgate.channels.errors import NotAuthentic
from mallgate.channels.sms import SmsErrorCode, SmsSendError, json_object, normalize_mobile, post_within
from mallgate.clock import Clock, default_clock
from mallgate.settings import AliyunSmsSettings

API_VERSION = "2017-05-25"
REGION_ID = "cn-hangzhou"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# The Aliyun gateway refuses requests whose Timestamp is 15 minutes off.
TIMESTAMP_TOLERANCE = 15 * 60

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

# Gateway errors answer with an HTTP error status; business (isv./isp.) errors with 200.
GATEWAY_ERROR_STATUS: dict[str, int] = {
    "SignatureDoesNotMatch": 400,
    "IncompleteSignature": 400,
    "SignatureNonceUsed": 400,
    "InvalidTimeStamp.Expired": 400,
    "InvalidTimeStamp.Format": 400,
    "MissingParameter": 400,
    "InvalidAccessKeyId.NotFound": 404,
    "Throttling.User": 400,
}


class AliyunAuthError(NotAuthentic):
    """A request failed verification; `code` is what the Aliyun gateway would answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def percent_encode(value: str) -> str:
    """RFC 3986 percent-encoding of the UTF-8 bytes: space is %20, `*` is %2A, `~` stays."""
    return quote(value, safe="-_.~")


def canonical_query(params: Mapping[str, str]) -> str:
    pairs = sorted((percent_encode(k), percent_encode(v)) for k, v in params.items() if k != "Signature")
    return "&".join(f"{k}={v}" for k, v in pairs)


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
    """Raise AliyunAuthError unless `params` carry a valid Signature (and, given `now`, a fresh Timestamp)."""
    given = params.get("Signature")
    if not given:
        raise AliyunAuthError("IncompleteSignature", "the request has no Signature")
    if params.get("SignatureMethod") != "HMAC-SHA1" or params.get("SignatureVersion") != "1.0":
        raise AliyunAuthError("IncompleteSignature", "only HMAC-SHA1 signature version 1.0 is supported")
    expected = sign(method, params, secret)
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise AliyunAuthError(
            "SignatureDoesNotMatch", "Specified signature is not matched with our calculation."
        )
    if now is not None:
        try:
            sent = timegm(strptime(params.get("Timestamp", ""), TIMESTAMP_FORMAT))
        except ValueError as exc:
            raise AliyunAuthError("InvalidTimeStamp.Format", "Timestamp is not yyyy-MM-ddTHH:mm:ssZ") from exc
        if abs(now - sent) > tolerance:
            raise AliyunAuthError(
                "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired."
            )


def build_send_params(
    settings: AliyunSmsSettings, mobile: str, code: str, clock: Clock = default_clock
) -> dict[str, str]:
    """The SendSms parameters, without Signature (add `sign("POST", params, secret)`)."""
    return {
        "AccessKeyId": settings.access_key_id,
        "Action": "SendSms",
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
        # Compact JSON: values must be strings, and the text is what gets signed.
        "TemplateParam": json.dumps({"code": code}, separators=(",", ":")),
    }


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
    """What Aliyun answers for `code` (for the stand-in); gateway errors carry HostId and Recommend.

    Send it with HTTP status `GATEWAY_ERROR_STATUS.get(code, 200)`.
    """
    body = {"RequestId": request_id or str(uuid.uuid4()).upper(), "Code": code, "Message": message}
    if code in GATEWAY_ERROR_STATUS:
        body["HostId"] = "dysmsapi.aliyuncs.com"
        body["Recommend"] = f"https://api.aliyun.com/troubleshoot?q={code}&product=Dysms"
    return body


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
        params = build_send_params(self.settings, mobile, code, self.clock)
        params["Signature"] = sign("POST", params, self.settings.access_key_secret)
        response = await post_within(self.http, self.name, self.timeout, self.settings.endpoint, data=params)
        body: dict[str, Any] = json_object(response, self.name)
        provider_code = str(body.get("Code", ""))
        if provider_code == "OK":
            return str(body.get("BizId") or body.get("RequestId") or "")
        if not provider_code:
            provider_code = f"http.{response.status_code}"
        raise SmsSendError(error_code_for(provider_code), provider_code, str(body.get("Message", "")))
