"""The WeChat open API (api.weixin.qq.com): one client base, the token and ticket calls, the JS-SDK signature.

Every WeChat API answers HTTP 200 with JSON; an error is ``errcode`` present and not 0
(``errmsg`` carries suffixes such as ``rid: ...``, so it is never compared). Such an
answer raises `WechatApiError`; a network failure or an answer that is not JSON raises
`WechatUnavailable`. Callers that hold an access_token look at
`WechatApiError.token_rejected` to know when to refresh it (40001, 40014, 42001).

Other WeChat modules (OAuth, the Mini Program) build on `WechatApi.get_json` and
`WechatApi.post_json`; secrets go in ``params`` or ``body`` and are never logged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from mallgate.channels.errors import ChannelError
from mallgate.channels.http import PlatformClient

# An access_token the platform no longer takes: invalid or "not latest" (40001), malformed
# (40014), expired (42001). Only these make a caller drop its token and fetch another.
TOKEN_REJECTED: Final = frozenset({40001, 40014, 42001})
DEFAULT_TIMEOUT: Final = 10.0


class WechatUnavailable(ChannelError):
    """WeChat could not be reached, or answered something that is not its JSON."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, when there was an answer


class WechatApiError(ChannelError):
    """WeChat answered an error code."""

    def __init__(self, errcode: int, errmsg: str, path: str = "") -> None:
        super().__init__(f"{path or 'wechat'}: errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg
        self.path = path

    @property
    def token_rejected(self) -> bool:
        return self.errcode in TOKEN_REJECTED


@dataclass(frozen=True)
class Credential:
    """An access_token or a jsapi_ticket, with the lifetime WeChat gave it (seconds)."""

    value: str
    expires_in: int


def _checked(path: str, response: httpx.Response) -> dict[str, Any]:
    status = response.status_code
    try:
        answer = response.json()
    except ValueError as exc:
        raise WechatUnavailable(f"{path}: HTTP {status}, not JSON", status) from exc
    if not isinstance(answer, dict):
        raise WechatUnavailable(f"{path}: HTTP {status}, not a JSON object", status)
    errcode = answer.get("errcode", 0)
    if errcode not in (0, None):
        code = errcode if isinstance(errcode, int) else -1
        raise WechatApiError(code, str(answer.get("errmsg", "")), path)
    return answer


def _credential(path: str, answer: dict[str, Any], field: str) -> Credential:
    value, expires_in = answer.get(field), answer.get("expires_in")
    if not isinstance(value, str) or not value or not isinstance(expires_in, int) or expires_in <= 0:
        raise WechatUnavailable(f"{path}: answer without {field} and expires_in")
    return Credential(value, expires_in)


class WechatApi(PlatformClient):
    """Calls to ``api_base`` (https://api.weixin.qq.com, or the sandbox's ``/wechat``)."""

    def __init__(
        self, api_base: str, http: httpx.AsyncClient | None = None, timeout: float = DEFAULT_TIMEOUT
    ):
        super().__init__(http, timeout)
        self.api_base = api_base.rstrip("/")

    def url(self, path: str) -> str:
        return f"{self.api_base}/{path.lstrip('/')}"

    async def get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            response = await self._http.get(self.url(path), params=params)
        except httpx.HTTPError as exc:
            raise WechatUnavailable(f"{path}: {type(exc).__name__}") from exc
        return _checked(path, response)

    async def post_json(self, path: str, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        # Real JSON, UTF-8 unescaped: WeChat refuses a form post (47001) and shows \uXXXX literally.
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        try:
            response = await self._http.post(self.url(path), params=params, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise WechatUnavailable(f"{path}: {type(exc).__name__}") from exc
        return _checked(path, response)

    async def stable_token(self, app_id: str, secret: str, *, force_refresh: bool = False) -> Credential:
        """POST cgi-bin/stable_token: the same token while valid; forced: a new one, the old one dead."""
        path = "cgi-bin/stable_token"
        body = {
            "grant_type": "client_credential",
            "appid": app_id,
            "secret": secret,
            "force_refresh": force_refresh,
        }
        return _credential(path, await self.post_json(path, {}, body), "access_token")

    async def classic_token(self, app_id: str, secret: str) -> Credential:
        """GET cgi-bin/token: every call makes a new token (the previous one lives about 5 more minutes)."""
        path = "cgi-bin/token"
        params = {"grant_type": "client_credential", "appid": app_id, "secret": secret}
        return _credential(path, await self.get_json(path, params), "access_token")

    async def jsapi_ticket(self, access_token: str) -> Credential:
        path = "cgi-bin/ticket/getticket"
        answer = await self.get_json(path, {"access_token": access_token, "type": "jsapi"})
        return _credential(path, answer, "ticket")


# --- JS-SDK wx.config ---------------------------------------------------------------------------


def jsapi_string(ticket: str, nonce: str, timestamp: int | str, url: str) -> str:
    """What wx.config's signature signs: four keys in ASCII order, values as given (no encoding)."""
    return f"jsapi_ticket={ticket}&noncestr={nonce}&timestamp={timestamp}&url={url}"


def jsapi_signature(ticket: str, nonce: str, timestamp: int | str, url: str) -> str:
    return hashlib.sha1(jsapi_string(ticket, nonce, timestamp, url).encode()).hexdigest()  # noqa: S324 - the protocol's


def mask(secret: str, keep: int = 6) -> str:
    """A ticket or token shown in a debug answer: enough to tell two apart, not enough to use."""
    if len(secret) <= 2 * keep:
        return "*" * len(secret)
    return f"{secret[:keep]}…{secret[-keep:]}({len(secret)} chars)"


class PageUrlRefused(ValueError):
    """The page URL cannot be signed for; `code` is the stable code, `reason` says why in words."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


MAX_PAGE_URL: Final = 2048


def normalize_page_url(url: str, allowed_hosts: list[str] | tuple[str, ...] = ()) -> str:
    """The URL WeChat's JS-SDK will sign against: the page's own, without ``#`` and what follows.

    Nothing else is changed (no decoding, no re-encoding, no default port dropped): the
    front end signs ``location.href.split('#')[0]`` verbatim, and any rewrite here would be an
    "invalid signature" there. `allowed_hosts` (lower case; empty: any host) are the
    OA's JS interface safe domains; a host matches one exactly (WeChat's rule: no wildcard,
    a port not part of it).
    """
    page = url.split("#", 1)[0]
    if not page:
        raise PageUrlRefused("share.url_missing", "url 为空（# 之前没有内容）")
    if len(page) > MAX_PAGE_URL:
        raise PageUrlRefused("share.url_too_long", f"url 超过 {MAX_PAGE_URL} 个字符")
    if any(c.isspace() or ord(c) < 0x20 for c in page):
        raise PageUrlRefused(
            "share.url_invalid", "url 含有空白或控制字符：请传 location.href.split('#')[0] 原样"
        )
    try:
        parts = urlsplit(page)
        host = parts.hostname
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise PageUrlRefused("share.url_invalid", "url 无法解析") from None
    if parts.scheme not in ("http", "https"):
        shown = parts.scheme or "（无）"
        raise PageUrlRefused("share.url_scheme", f"url 协议为 {shown}：只能为 http 或 https 页面签名")
    if not host:
        raise PageUrlRefused("share.url_invalid", "url 缺少域名")
    if allowed_hosts and host not in allowed_hosts:
        raise PageUrlRefused(
            "share.url_domain",
            f"域名 {host} 不在 JS 接口安全域名 MALLGATE_WECHAT_MP__JS_DOMAINS 中"
            f"（{', '.join(allowed_hosts)}）",
        )
    return page
