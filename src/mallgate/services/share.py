"""`share/config`: what the page passes to ``wx.config`` (JS-SDK), signed with the shared jsapi_ticket."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mallgate.channels.errors import ChannelError
from mallgate.channels.wechat_api import (
    PageUrlRefused,
    WechatApiError,
    jsapi_signature,
    jsapi_string,
    mask,
    normalize_page_url,
)
from mallgate.envelope import ApiError
from mallgate.services.wechat_tokens import WechatApp, WechatBusy, WechatTokens

if TYPE_CHECKING:
    from mallgate.runtime import Runtime

# 16 characters, as WeChat's own examples (Wm3WZYTPz0wzccnW); any string up to 32 is taken.
NONCE_BYTES = 8


def official_account(runtime: Runtime) -> WechatApp:
    """The Official Account's app; refused when it is not configured (the sandbox fills it when on)."""
    mp = runtime.settings.wechat_mp
    if not (mp.app_id and mp.app_secret):
        raise ApiError("微信公众号未配置", "wechat_mp.not_configured")
    return WechatApp(mp.app_id, mp.app_secret)


def wechat_failure(exc: ChannelError) -> ApiError:
    """What a client reads when WeChat could not give the ticket: never the token or secret."""
    if isinstance(exc, WechatBusy):
        return ApiError("微信接口繁忙，请稍后再试", "wechat.busy")
    if isinstance(exc, WechatApiError):
        return ApiError(f"微信接口返回错误 {exc.errcode}", "wechat.api_error", errcode=exc.errcode)
    return ApiError("微信接口暂时无法访问，请稍后再试", "wechat.unavailable")


async def share_config(runtime: Runtime, url: str, *, debug: bool) -> dict[str, Any]:
    app = official_account(runtime)
    mp = runtime.settings.wechat_mp
    try:
        page = normalize_page_url(url, mp.js_domains)
    except PageUrlRefused as exc:
        # debug: the URL as received, so the page can see what it actually sent.
        extra: dict[str, Any] = {"url": url} if debug else {}
        raise ApiError(exc.reason, exc.code, **extra) from None
    try:
        ticket = await WechatTokens.of(runtime).jsapi_ticket(app)
    except ChannelError as exc:
        raise wechat_failure(exc) from exc
    nonce = runtime.clock.nonce(NONCE_BYTES)
    timestamp = int(runtime.clock.now())
    config: dict[str, Any] = {
        "appId": app.app_id,
        "timestamp": timestamp,
        "nonceStr": nonce,
        "signature": jsapi_signature(ticket, nonce, timestamp, page),
        "jsApiList": list(mp.js_api_list),
    }
    if debug:
        config["debug"] = {
            "url": page,
            "received_url": url,
            "signed": jsapi_string(mask(ticket), nonce, timestamp, page),
            "ticket": mask(ticket),
            "js_domains": list(mp.js_domains),
        }
    return config
