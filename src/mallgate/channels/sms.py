"""What the SMS-code service needs from a provider, and the choice of provider.

A send is not idempotent at either provider (a retried timeout can deliver two
codes), so nothing here retries: a failure is reported once, with a stable
code the service can turn into a user message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

from mallgate.channels.errors import ChannelError
from mallgate.mobile import mask_mobile, parse_mobile
from mallgate.settings import AliyunSmsSettings, SmsSettings

logger = logging.getLogger("mallgate.sms")

SmsErrorCode = Literal["sms.provider_limited", "sms.bad_number", "sms.provider_error", "sms.provider_timeout"]

# The stand-in's own fixed credentials: it verifies requests with these, so the
# `sandbox` provider is the real Aliyun protocol end to end.
SANDBOX_ALIYUN = AliyunSmsSettings(
    access_key_id="sandbox-ak",
    access_key_secret="sandbox-secret",  # noqa: S106 - a published test value, not a secret
    sign_name="mallgate",
    template_code="SMS_SANDBOX",
    endpoint="",
)


class SmsSendError(ChannelError):
    """A send failed; `code` is ours and stable, `provider_code` is the provider's."""

    def __init__(self, code: SmsErrorCode, provider_code: str, message: str) -> None:
        super().__init__(f"{code} ({provider_code}): {message}")
        self.code: SmsErrorCode = code
        self.provider_code = provider_code
        self.message = message


@runtime_checkable
class SmsProvider(Protocol):
    name: str

    async def send_code(self, mobile: str, code: str) -> str:
        """Send `code` to `mobile`; return the provider's id of the send, or raise SmsSendError."""
        ...


def normalize_mobile(mobile: str) -> str:
    """The bare 11 digits of a mainland mobile number, or SmsSendError("sms.bad_number")."""
    number = parse_mobile(mobile)
    if number is None:
        raise SmsSendError("sms.bad_number", "", "not a mainland China mobile number")
    return number


class ConsoleProvider:
    """Development provider: the code goes to the log instead of a phone."""

    name = "console"

    async def send_code(self, mobile: str, code: str) -> str:
        number = normalize_mobile(mobile)
        serial = f"console-{uuid.uuid4().hex}"
        logger.info("SMS code for %s: %s (%s)", mask_mobile(number), code, serial)
        return serial


async def post_within(
    http: httpx.AsyncClient, provider: str, seconds: float, url: str, **kwargs: Any
) -> httpx.Response:
    """POST that fails as a whole within `seconds`.

    httpx's timeout bounds each phase (connect, each read), not the total, so a
    provider trickling bytes could hold a send far longer; asyncio.timeout
    bounds the sum.
    """
    try:
        async with asyncio.timeout(seconds):
            return await http.post(url, timeout=httpx.Timeout(seconds), **kwargs)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise SmsSendError(
            "sms.provider_timeout", "timeout", f"{provider} did not answer in {seconds:g} s"
        ) from exc
    except httpx.HTTPError as exc:
        raise SmsSendError("sms.provider_error", "network", f"{provider}: {type(exc).__name__}") from exc


def json_object(response: httpx.Response, provider: str) -> dict[str, Any]:
    """The response body as a JSON object, or SmsSendError naming the HTTP status."""
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise SmsSendError(
            "sms.provider_error", f"http.{response.status_code}", f"{provider} answered no JSON object"
        )
    return body


def build_provider(settings: SmsSettings, http: httpx.AsyncClient, sandbox_url: str | None) -> SmsProvider:
    # Imported here because both modules import SmsSendError from this one.
    from mallgate.channels.sms_aliyun import AliyunSmsProvider
    from mallgate.channels.sms_tencent import TencentSmsProvider

    if settings.provider is None:
        raise ValueError("no SMS provider is configured")
    if settings.provider == "console":
        return ConsoleProvider()
    if settings.provider == "aliyun":
        return AliyunSmsProvider(settings.aliyun, http, timeout=settings.timeout_seconds)
    if settings.provider == "tencent":
        minutes = max(1, settings.code_ttl_seconds // 60)
        return TencentSmsProvider(
            settings.tencent, http, timeout=settings.timeout_seconds, code_minutes=minutes
        )
    if settings.provider == "sandbox":
        if not sandbox_url:
            raise ValueError("the sandbox SMS provider needs the sandbox URL")
        # The operator's choice of signature holds in the sandbox too, so either can be tried there.
        endpoint = f"{sandbox_url.rstrip('/')}/aliyun-sms/"
        signature = settings.aliyun.signature
        sandbox = SANDBOX_ALIYUN.model_copy(update={"endpoint": endpoint, "signature": signature})
        return AliyunSmsProvider(sandbox, http, timeout=settings.timeout_seconds, name="sandbox")
    raise ValueError(f"unknown SMS provider {settings.provider!r}")
