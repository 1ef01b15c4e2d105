"""Tencent Cloud SMS `SendSms` (API 3.0, version 2021-01-11), signed with TC3-HMAC-SHA256.

`authorization_header` is what the client uses; `verify_request` is what the
sandbox stand-in uses on the requests it receives. Both build the same
canonical request, and the published vectors pin it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from mallgate.channels.errors import NotAuthentic
from mallgate.channels.sms import SmsErrorCode, SmsSendError, json_object, normalize_mobile, post_within
from mallgate.clock import Clock, default_clock
from mallgate.settings import TencentSmsSettings

ALGORITHM = "TC3-HMAC-SHA256"
SERVICE = "sms"
API_VERSION = "2021-01-11"
CONTENT_TYPE = "application/json; charset=utf-8"
SIGNED_HEADERS: tuple[str, ...] = ("content-type", "host")
# The code's lifetime in minutes is the second variable of the usual template
# "验证码{1}，{2}分钟内有效"; the provider is told it from the code TTL setting.
DEFAULT_CODE_MINUTES = 5

_AUTHORIZATION = re.compile(
    r"TC3-HMAC-SHA256 Credential=(?P<secret_id>[^/\s,]+)/(?P<date>\d{4}-\d{2}-\d{2})/(?P<service>[^/\s,]+)"
    r"/tc3_request, ?SignedHeaders=(?P<signed>[a-z0-9;\-]+), ?Signature=(?P<signature>[0-9a-f]{64})"
)


class TencentAuthError(NotAuthentic):
    """A request failed verification; `code` is what Tencent Cloud would answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac_sha256(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def utc_date(timestamp: int) -> str:
    """The UTC date of the timestamp: a request signed just after midnight in Beijing is still yesterday."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def canonical_request(
    method: str,
    headers: Mapping[str, str],
    payload: bytes,
    *,
    signed_headers: Sequence[str] = SIGNED_HEADERS,
    path: str = "/",
    query: str = "",
) -> str:
    """Method, path, query, `name:value` lines of the signed headers, their names, hex sha256 of the body."""
    lowered = {k.lower(): v for k, v in headers.items()}
    names = sorted(h.lower() for h in signed_headers)
    missing = [n for n in names if n not in lowered]
    if missing:
        raise KeyError(f"signed headers missing from the request: {', '.join(missing)}")
    canonical_headers = "".join(f"{n}:{lowered[n].strip().lower()}\n" for n in names)
    return "\n".join([method.upper(), path, query, canonical_headers, ";".join(names), _sha256_hex(payload)])


def credential_scope(date: str, service: str) -> str:
    return f"{date}/{service}/tc3_request"


def string_to_sign(timestamp: int, service: str, canonical: str) -> str:
    scope = credential_scope(utc_date(timestamp), service)
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{_sha256_hex(canonical.encode())}"


def signature(secret_key: str, date: str, service: str, to_sign: str) -> str:
    k_date = _hmac_sha256(f"TC3{secret_key}".encode(), date)
    k_service = _hmac_sha256(k_date, service)
    k_signing = _hmac_sha256(k_service, "tc3_request")
    return hmac.new(k_signing, to_sign.encode(), hashlib.sha256).hexdigest()


def authorization_header(
    secret_id: str,
    secret_key: str,
    *,
    timestamp: int,
    service: str,
    method: str,
    headers: Mapping[str, str],
    payload: bytes,
    signed_headers: Sequence[str] = SIGNED_HEADERS,
    path: str = "/",
    query: str = "",
) -> str:
    canonical = canonical_request(
        method, headers, payload, signed_headers=signed_headers, path=path, query=query
    )
    date = utc_date(timestamp)
    sig = signature(secret_key, date, service, string_to_sign(timestamp, service, canonical))
    names = ";".join(sorted(h.lower() for h in signed_headers))
    return (
        f"{ALGORITHM} Credential={secret_id}/{credential_scope(date, service)}, "
        f"SignedHeaders={names}, Signature={sig}"
    )


def verify_request(
    method: str,
    headers: Mapping[str, str],
    body: bytes,
    secret_key_for: Callable[[str], str | None],
    now: float,
    tolerance: int = 300,
    *,
    service: str = SERVICE,
    path: str = "/",
    query: str = "",
) -> str:
    """Raise TencentAuthError unless the request is signed by a known key within `tolerance` s.

    Returns the SecretId that signed it.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    match = _AUTHORIZATION.fullmatch(lowered.get("authorization", "").strip())
    if match is None:
        raise TencentAuthError("AuthFailure.SignatureFailure", "malformed or missing TC3 Authorization")
    try:
        timestamp = int(lowered.get("x-tc-timestamp", ""))
    except ValueError as exc:
        raise TencentAuthError("AuthFailure.SignatureFailure", "X-TC-Timestamp is not an integer") from exc
    if abs(now - timestamp) > tolerance:
        raise TencentAuthError("AuthFailure.SignatureExpire", "the request timestamp is too far from now")
    if match["service"] != service or match["date"] != utc_date(timestamp):
        raise TencentAuthError("AuthFailure.SignatureFailure", "credential scope does not match the request")
    signed = match["signed"].split(";")
    if not {"content-type", "host"} <= set(signed):
        raise TencentAuthError("AuthFailure.SignatureFailure", "content-type and host must be signed")
    secret_key = secret_key_for(match["secret_id"])
    if secret_key is None:
        raise TencentAuthError("AuthFailure.SecretIdNotFound", "unknown SecretId")
    try:
        canonical = canonical_request(method, lowered, body, signed_headers=signed, path=path, query=query)
    except KeyError as exc:
        raise TencentAuthError("AuthFailure.SignatureFailure", str(exc)) from exc
    expected = signature(secret_key, match["date"], service, string_to_sign(timestamp, service, canonical))
    if not hmac.compare_digest(expected, match["signature"]):
        raise TencentAuthError("AuthFailure.SignatureFailure", "the signature does not match")
    return match["secret_id"]


def build_send_body(
    settings: TencentSmsSettings, mobile: str, code: str, code_minutes: int = DEFAULT_CODE_MINUTES
) -> bytes:
    """The exact bytes sent and signed."""
    payload = {
        "PhoneNumberSet": [f"+86{normalize_mobile(mobile)}"],
        "SmsSdkAppId": settings.sdk_app_id,
        "TemplateId": settings.template_id,
        "SignName": settings.sign_name,
        "TemplateParamSet": [code, str(code_minutes)],
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def build_send_headers(settings: TencentSmsSettings, body: bytes, timestamp: int) -> dict[str, str]:
    # Host must be the one the request really goes to (port included), since it is signed.
    host = urlsplit(settings.endpoint).netloc
    headers = {
        "Content-Type": CONTENT_TYPE,
        "Host": host,
        "X-TC-Action": "SendSms",
        "X-TC-Version": API_VERSION,
        "X-TC-Region": settings.region,
        "X-TC-Timestamp": str(timestamp),
    }
    headers["Authorization"] = authorization_header(
        settings.secret_id,
        settings.secret_key,
        timestamp=timestamp,
        service=SERVICE,
        method="POST",
        headers=headers,
        payload=body,
    )
    return headers


def error_code_for(provider_code: str) -> SmsErrorCode:
    if provider_code.startswith("LimitExceeded."):
        return "sms.provider_limited"
    if provider_code == "InvalidParameterValue.IncorrectPhoneNumber":
        return "sms.bad_number"
    return "sms.provider_error"


def success_response(serial_no: str, phone_number: str, request_id: str) -> dict[str, Any]:
    """What SendSms answers when the number was accepted (for the stand-in)."""
    return {
        "Response": {
            "SendStatusSet": [
                {
                    "SerialNo": serial_no,
                    "PhoneNumber": phone_number,
                    "Fee": 1,
                    "SessionContext": "",
                    "Code": "Ok",
                    "Message": "send success",
                    "IsoCode": "CN",
                }
            ],
            "RequestId": request_id,
        }
    }


def status_error_response(code: str, message: str, phone_number: str, request_id: str) -> dict[str, Any]:
    """A per-number failure: the request succeeded, the number did not (for the stand-in)."""
    return {
        "Response": {
            "SendStatusSet": [
                {
                    "SerialNo": "",
                    "PhoneNumber": phone_number,
                    "Fee": 0,
                    "SessionContext": "",
                    "Code": code,
                    "Message": message,
                    "IsoCode": "CN",
                }
            ],
            "RequestId": request_id,
        }
    }


def error_response(code: str, message: str, request_id: str) -> dict[str, Any]:
    """A whole-request failure, e.g. AuthFailure.SignatureFailure (for the stand-in; sent with HTTP 200)."""
    return {"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id}}


class TencentSmsProvider:
    def __init__(
        self,
        settings: TencentSmsSettings,
        http: httpx.AsyncClient,
        *,
        timeout: float,
        clock: Clock = default_clock,
        name: str = "tencent",
        code_minutes: int = DEFAULT_CODE_MINUTES,
    ) -> None:
        self.settings = settings
        self.code_minutes = code_minutes
        self.http = http
        self.timeout = timeout
        self.clock = clock
        self.name = name

    async def send_code(self, mobile: str, code: str) -> str:
        body = build_send_body(self.settings, mobile, code, self.code_minutes)
        headers = build_send_headers(self.settings, body, int(self.clock.now()))
        response = await post_within(
            self.http, self.name, self.timeout, self.settings.endpoint, content=body, headers=headers
        )
        answer = json_object(response, self.name).get("Response")
        if not isinstance(answer, dict):
            raise SmsSendError("sms.provider_error", f"http.{response.status_code}", "no Response object")
        error = answer.get("Error")
        if isinstance(error, dict):
            provider_code = str(error.get("Code", ""))
            raise SmsSendError(error_code_for(provider_code), provider_code, str(error.get("Message", "")))
        statuses = answer.get("SendStatusSet")
        if not isinstance(statuses, list) or not statuses or not isinstance(statuses[0], dict):
            raise SmsSendError("sms.provider_error", "", "no SendStatusSet in the answer")
        status = statuses[0]
        provider_code = str(status.get("Code", ""))
        if provider_code == "Ok":
            return str(status.get("SerialNo") or answer.get("RequestId") or "")
        raise SmsSendError(error_code_for(provider_code), provider_code, str(status.get("Message", "")))
