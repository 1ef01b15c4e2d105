"""Official Account web login: an OAuth code becomes a mall user with a token.

The code is exchanged once at WeChat (``sns/oauth2/access_token``), then, for
``snsapi_userinfo``, the profile is fetched (``sns/userinfo``). The user is found or
made by (wechat, OA appid, openid), linked by a non-empty unionid to the same person's
identities at the other WeChat apps (`accounts.wechat_user`), and logged in.

Two short-lived things live in the shared ``cache_entries`` table, so every worker and
machine agrees:

- ``oauth.state:<state>``: a state `authorize_url` issued; with
  ``MALLGATE_WECHAT_MP__REQUIRE_STATE`` a login must spend one (CSRF guard), each once.
- ``oauth.code:<HMAC of appid and code>``: the user a code logged in, for `MEMORY_SECONDS`.
  A page reloaded after the redirect posts the same code again; WeChat would answer 40163,
  so the same code with the same state is answered from here, without a call to WeChat.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final
from urllib.parse import urlsplit

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.channels.errors import ChannelError
from mallgate.channels.wechat_api import WechatApiError
from mallgate.channels.wechat_oauth import (
    CODE_USED,
    INVALID_CODE,
    SCOPES,
    Grant,
    Scope,
    UserInfo,
    WechatOAuth,
    authorize_url,
)
from mallgate.db.models import CacheEntry, User
from mallgate.envelope import ApiError
from mallgate.forwarded import rate_key
from mallgate.runtime import Runtime
from mallgate.services import accounts, ratelimit
from mallgate.settings import WechatMpSettings

log = logging.getLogger("mallgate.wechat.oauth")

STATE_SECONDS: Final = 600  # long enough to read the consent page
MEMORY_SECONDS: Final = 300  # a code lives 5 minutes at WeChat: no reload comes later than that
# WeChat waits for nobody here, but the user does: both calls together within this.
UPSTREAM_DEADLINE: Final = 4.5
URL_PER_IP_PER_MINUTE: Final = 60  # each issued state is a row until it expires
MAX_REDIRECT_URI: Final = 1024
STATE_SHAPE: Final = re.compile(r"[A-Za-z0-9]{1,128}")  # WeChat's rule for state
# WeChat's codes are 32 letters and digits; `-` and `_` are allowed for other issuers' shapes.
CODE_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_STATE_KEY: Final = "oauth.state:"
_CODE_KEY: Final = "oauth.code:"
_SWEEP_ONE_IN: Final = 64


def _now(runtime: Runtime) -> datetime:
    return runtime.clock.utcnow().replace(tzinfo=None)


def _configured(runtime: Runtime) -> WechatMpSettings:
    settings = runtime.settings.wechat_mp
    if not (settings.app_id and settings.app_secret):
        raise ApiError("公众号未配置", "wechat_mp.not_configured")
    return settings


def check_state(state: str) -> None:
    if state and not STATE_SHAPE.fullmatch(state):
        raise ApiError("state 只能由字母和数字组成，最长 128 个字符", "oauth.state_invalid", field="state")


def check_code(code: str) -> None:
    if not CODE_SHAPE.fullmatch(code):
        raise ApiError("code 格式不正确，请重新授权", "oauth.code_invalid", field="code")


def check_redirect_uri(uri: str) -> None:
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        host = None
    if (
        len(uri) > MAX_REDIRECT_URI
        or not uri.isascii()
        or any(c.isspace() for c in uri)
        or "#" in uri  # WeChat appends ?code=&state=; a fragment would swallow them
        or not host
        or parts.scheme not in ("http", "https")
    ):
        raise ApiError(
            f"redirect_uri 应为 http(s) 地址（不含 #，最长 {MAX_REDIRECT_URI} 个字符）",
            "oauth.redirect_uri_invalid",
            field="redirect_uri",
        )


def parse_scope(scope: str) -> Scope:
    for known in SCOPES:
        if scope == known:
            return known
    raise ApiError("scope 应为 snsapi_base 或 snsapi_userinfo", "oauth.scope_invalid", field="scope")


# ------------------------------------------------------------------ the authorize URL


async def issue_url(runtime: Runtime, redirect_uri: str, scope: Scope, ip: str) -> dict[str, str]:
    """The consent page's URL with a fresh single-use state (kept `STATE_SECONDS`)."""
    settings = _configured(runtime)
    check_redirect_uri(redirect_uri)
    now = _now(runtime)
    state = secrets.token_hex(16)
    limit = ratelimit.Limit(f"oauth:url:{rate_key(ip)}", URL_PER_IP_PER_MINUTE, 60)
    try:
        async with runtime.db.transaction() as session:
            await ratelimit.hit(session, [limit], now)
            expires_at = now + timedelta(seconds=STATE_SECONDS)
            session.add(CacheEntry(key=_STATE_KEY + state, value="", expires_at=expires_at))
    except ratelimit.RateLimited as exc:
        raise ApiError(
            f"请求过于频繁，请 {ratelimit.wait_text(exc.retry_after)}后再试",
            "oauth.too_frequent",
            retry_after=exc.retry_after,
        ) from None
    await _sweep_now_and_then(runtime, now)
    url = authorize_url(runtime.settings.wechat.oauth_base, settings.app_id, redirect_uri, scope, state)
    return {"url": url, "state": state, "expires_in": str(STATE_SECONDS)}


async def _state_live(session: AsyncSession, state: str, now: datetime) -> bool:
    found = await session.scalar(
        select(CacheEntry.key).where(CacheEntry.key == _STATE_KEY + state, CacheEntry.expires_at > now)
    )
    return found is not None


async def _spend_state(session: AsyncSession, state: str, now: datetime) -> None:
    spent = await session.execute(
        delete(CacheEntry).where(CacheEntry.key == _STATE_KEY + state, CacheEntry.expires_at > now)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        raise _state_unknown()


def _state_unknown() -> ApiError:
    return ApiError("state 无效、已过期或已使用，请重新进入授权页面", "oauth.state_unknown", field="state")


async def _sweep_now_and_then(runtime: Runtime, now: datetime) -> None:
    """Expired states and codes go, now and then, in a transaction of their own.

    Never in a login's transaction: a range delete there would lock what concurrent
    logins insert. A failure only leaves rows for the next sweep.
    """
    if secrets.randbelow(_SWEEP_ONE_IN):
        return
    try:
        async with runtime.db.transaction() as session:
            await session.execute(
                delete(CacheEntry).where(
                    CacheEntry.key >= "oauth.", CacheEntry.key < "oauth/", CacheEntry.expires_at <= now
                )
            )
    except Exception:  # housekeeping must never fail a request
        log.warning("sweeping expired OAuth states failed", exc_info=True)


# ------------------------------------------------------------------ the login


@dataclass(frozen=True)
class _Remembered:
    user_id: int
    state: str


def _code_key(runtime: Runtime, app_id: str, code: str) -> str:
    # Keyed by the server secret: the table holds no code, not even one that can be guessed back.
    digest = hmac.new(runtime.secret_key, f"{app_id}:{code}".encode(), hashlib.sha256).hexdigest()
    return _CODE_KEY + digest


async def _remembered(runtime: Runtime, key: str, now: datetime) -> _Remembered | None:
    async with runtime.db.read() as session:
        value = await session.scalar(
            select(CacheEntry.value).where(CacheEntry.key == key, CacheEntry.expires_at > now)
        )
    if value is None:
        return None
    try:
        data = json.loads(value)
        return _Remembered(int(data["user_id"]), str(data["state"]))
    except (ValueError, KeyError, TypeError):
        return None


async def _remember(session: AsyncSession, key: str, user_id: int, state: str, now: datetime) -> None:
    # merge: a plain read, then insert (or overwrite an expired row). A DELETE of a row that is
    # not there would take an InnoDB gap lock, and concurrent logins would deadlock on them.
    await session.merge(
        CacheEntry(
            key=key,
            value=json.dumps({"user_id": user_id, "state": state}),
            expires_at=now + timedelta(seconds=MEMORY_SECONDS),
        )
    )


async def login(runtime: Runtime, code: str, state: str, spread_id: int | None, ip: str) -> dict[str, str]:
    """The profile, with a new token, of the user `code` belongs to."""
    settings = _configured(runtime)
    check_code(code)
    check_state(state)
    now = _now(runtime)
    key = _code_key(runtime, settings.app_id, code)
    remembered = await _remembered(runtime, key, now)
    if remembered is not None and remembered.state == state:
        return await _login_again(runtime, remembered.user_id, ip)
    if settings.require_state:
        if not state:
            raise ApiError("缺少参数 state", "param.missing", field="state")
        async with runtime.db.read() as session:
            if not await _state_live(session, state, now):
                raise _state_unknown()
    try:
        grant, info = await _ask_wechat(runtime, settings, code)
    except _CodeUsed:
        # Two posts of one code at once: the other one may have logged the user in meanwhile.
        remembered = await _remembered(runtime, key, _now(runtime))
        if remembered is not None and remembered.state == state:
            return await _login_again(runtime, remembered.user_id, ip)
        raise ApiError("授权码已被使用，请重新进入授权页面", "oauth.code_used", field="code") from None
    for attempt in (1, 2):
        try:
            return await _login_new(runtime, settings, grant, info, spread_id, state, key, ip)
        except IntegrityError:
            if attempt == 2:
                raise
            log.info("concurrent first login of one openid; looking again")
    raise AssertionError("unreachable")


class _CodeUsed(Exception):
    """WeChat answered 40163: this code was exchanged already."""


async def _ask_wechat(
    runtime: Runtime, settings: WechatMpSettings, code: str
) -> tuple[Grant, UserInfo | None]:
    client = WechatOAuth(runtime.settings.wechat.api_base, runtime.http)
    try:
        async with asyncio.timeout(UPSTREAM_DEADLINE):
            grant = await client.exchange_code(settings.app_id, settings.app_secret, code)
            info = await _userinfo(client, grant) if grant.userinfo_allowed else None
    except WechatApiError as exc:
        if exc.errcode == CODE_USED:
            raise _CodeUsed() from None
        if exc.errcode == INVALID_CODE:
            raise ApiError(
                "授权码无效或已过期，请重新进入授权页面", "oauth.code_invalid", field="code"
            ) from None
        log.warning("WeChat refused the OAuth code exchange: %s", exc)
        raise ApiError(
            f"微信登录失败（错误码 {exc.errcode}），请稍后再试", "oauth.platform_error", errcode=exc.errcode
        ) from None
    except (ChannelError, TimeoutError) as exc:
        log.warning("WeChat OAuth unavailable: %s", exc or type(exc).__name__)
        raise ApiError("微信服务暂时无法访问，请稍后再试", "oauth.unavailable") from None
    if grant.snapshot_user:
        raise ApiError("请在微信中打开页面并同意授权后再登录", "oauth.snapshot_user")
    return grant, info


async def _userinfo(client: WechatOAuth, grant: Grant) -> UserInfo | None:
    """The profile; without it the login still stands on the openid (the profile is a bonus)."""
    try:
        return await client.userinfo(grant.access_token, grant.openid)
    except ChannelError as exc:
        log.warning("WeChat sns/userinfo failed, logging in without the profile: %s", exc)
        return None


async def _login_new(
    runtime: Runtime,
    settings: WechatMpSettings,
    grant: Grant,
    info: UserInfo | None,
    spread_id: int | None,
    state: str,
    key: str,
    ip: str,
) -> dict[str, str]:
    now = _now(runtime)
    async with runtime.db.transaction() as session:
        if settings.require_state:
            await _spend_state(session, state, now)
        user, created = await accounts.wechat_user(
            session,
            now,
            app_id=settings.app_id,
            openid=grant.openid,
            unionid=grant.unionid or (info.unionid if info else ""),
            spread_id=spread_id,
        )
        if info is not None:
            accounts.update_wechat_profile(user, nickname=info.nickname, avatar=info.headimgurl, sex=info.sex)
        profile = await accounts.login(runtime, session, user, ip)
        await _remember(session, key, user.id, state, now)
    scopes = ",".join(sorted(grant.scopes))
    log.info("wechat oauth login user=%s created=%s scopes=%s", user.id, created, scopes)
    return profile


async def _login_again(runtime: Runtime, user_id: int, ip: str) -> dict[str, str]:
    async with runtime.db.transaction() as session:
        user = await session.get(User, user_id)
        if user is None:
            raise ApiError("授权码已被使用，请重新进入授权页面", "oauth.code_used", field="code")
        return await accounts.login(runtime, session, user, ip)
