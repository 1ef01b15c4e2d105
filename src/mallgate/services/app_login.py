"""APP login (`users`): a token from the WeChat, QQ or Apple SDK becomes a mall user with a token.

Nothing the APP says about who the user is counts until the platform confirms it: the
openid it sends is only compared with the platform's answer (an APP login that trusted a
client-sent openid is CRMEB's account takeover, CVE-2023-3232).

- ``weixin``: ``sns/auth?access_token&openid`` (the token is good for this openid), then
  ``sns/userinfo`` (nickname, avatar, unionid). Identity (wechat, APP app id, openid);
  a unionid links it to the person's Official Account and Mini Program identities.
- ``qq``: ``oauth2.0/me?unionid=1`` says whose token it is; its ``client_id`` must be our
  QQ app id (else any QQ app's token would log in here) and its openid the one sent. Then
  ``user/get_user_info``. Identity (qq, app id, openid); a QQ unionid links QQ identities only.
- ``apple``: the identity token, checked against Apple's keys (`mallgate.channels.apple`);
  identity (apple, bundle id, sub), the email kept when the token has one.

Every platform call of one login runs under `UPSTREAM_DEADLINE`: a slow platform is answered
``users.unavailable`` well within the APP's 5 seconds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mallgate.channels import apple, qq
from mallgate.channels.errors import ChannelError
from mallgate.channels.wechat_api import WechatApiError
from mallgate.channels.wechat_oauth import INVALID_OPENID, TOKEN_EXPIRED, WechatOAuth
from mallgate.db.models import User
from mallgate.envelope import ApiError
from mallgate.runtime import Runtime
from mallgate.services import accounts

log = logging.getLogger("mallgate.app_login")

UPSTREAM_DEADLINE: Final = 4.5
TYPES: Final = ("weixin", "qq", "apple")
QQ: Final = "qq"
APPLE: Final = "apple"
_KEYS: Final = "app_login.apple_keys"
# WeChat's "this is not a token for that openid / not a token at all".
_WECHAT_TOKEN_REJECTED: Final = frozenset({40001, 40014, INVALID_OPENID, TOKEN_EXPIRED})


@dataclass(frozen=True)
class Verified:
    """Who the platform says the user is."""

    provider: str
    app_id: str
    openid: str
    unionid: str = ""
    nickname: str = ""
    avatar: str = ""
    sex: int = 0
    email: str = ""


def parse_type(value: str) -> str:
    if value not in TYPES:
        raise ApiError("type 应为 weixin、qq 或 apple", "users.type_invalid", field="type")
    return value


def _not_configured(what: str, setting: str) -> ApiError:
    return ApiError(f"{what}登录未配置（{setting}）", "users.not_configured")


def _token_refused(info: str) -> ApiError:
    return ApiError(info, "users.token_invalid", field="access_token")


def _openid_mismatch() -> ApiError:
    return ApiError("openid 与平台返回的不一致，请重新登录", "users.openid_mismatch", field="openid")


# ------------------------------------------------------------------ WeChat


async def _weixin(runtime: Runtime, openid: str, token: str) -> Verified:
    app = runtime.settings.wechat_app
    if not app.app_id:
        raise _not_configured("微信", "MALLGATE_WECHAT_APP__APP_ID")
    if not openid:
        raise ApiError("缺少参数 openid", "param.missing", field="openid")
    client = WechatOAuth(runtime.settings.wechat.api_base, runtime.http)
    try:
        await client.check_token(token, openid)
        info = await client.userinfo(token, openid)
    except WechatApiError as exc:
        if exc.errcode == TOKEN_EXPIRED:
            raise _token_refused("微信授权已过期，请重新登录") from None
        if exc.errcode in _WECHAT_TOKEN_REJECTED:
            raise _token_refused("微信授权无效（access_token 与 openid 不匹配），请重新登录") from None
        raise _platform_error("微信", exc.errcode, exc) from None
    if info.openid != openid:
        raise _openid_mismatch()
    return Verified(
        accounts.WECHAT, app.app_id, openid, info.unionid, info.nickname, info.headimgurl, info.sex
    )


# ------------------------------------------------------------------ QQ


async def _qq(runtime: Runtime, openid: str, token: str) -> Verified:
    app_id = runtime.settings.qq.app_id
    if not app_id:
        raise _not_configured("QQ ", "MALLGATE_QQ__APP_ID")
    client = qq.QQConnect(runtime.settings.qq.api_base, runtime.http)
    try:
        owner = await client.me(token)
    except qq.QQApiError as exc:
        if exc.code == qq.TOKEN_EXPIRED:
            raise _token_refused("QQ 授权已过期，请重新登录") from None
        if exc.token_rejected:
            raise _token_refused(f"QQ 授权无效（错误码 {exc.code}），请重新登录") from None
        raise _platform_error("QQ ", exc.code, exc) from None
    if owner.client_id != app_id:
        log.warning("QQ token of app %s offered to app %s", owner.client_id[:20], app_id)
        raise ApiError("该 QQ 授权不属于本应用，请重新登录", "users.foreign_app", field="access_token")
    if openid and owner.openid != openid:
        raise _openid_mismatch()
    nickname = avatar = ""
    try:
        profile = await client.user_info(token, app_id, owner.openid)
        nickname, avatar = profile.nickname, profile.avatar
    except qq.QQApiError as exc:  # the login stands on the token's owner; the profile is a bonus
        log.warning("QQ get_user_info failed, logging in without the profile: %s", exc)
    # QQ's gender answers 男 for "unknown", so it tells nothing: sex is left as it is.
    return Verified(QQ, app_id, owner.openid, owner.unionid, nickname, avatar)


# ------------------------------------------------------------------ Apple


def apple_keys(runtime: Runtime) -> apple.AppleKeys:
    """The process's cache of Apple's keys (fetched through the service's HTTP client)."""
    found = runtime.services.get(_KEYS)
    if found is None:
        found = runtime.services[_KEYS] = apple.AppleKeys(
            runtime.http, runtime.settings.apple.keys_url, lambda: runtime.clock.utcnow().timestamp()
        )
    assert isinstance(found, apple.AppleKeys)
    return found


_APPLE_REFUSALS: Final = {
    "expired": "Apple 登录凭证已过期，请重新登录",
    "audience": "该 Apple 登录凭证不属于本应用（aud），请重新登录",
    "issuer": "该凭证不是 Apple 签发的（iss），请重新登录",
    "algorithm": "Apple 登录凭证的签名算法不是 RS256",
    "unknown_kid": "Apple 登录凭证的签名密钥未知，请稍后重新登录",
    "signature": "Apple 登录凭证签名无效",
    "future": "Apple 登录凭证的签发时间在未来",
}


async def _apple(runtime: Runtime, openid: str, token: str) -> Verified:
    bundle_id = runtime.settings.apple.bundle_id
    if not bundle_id:
        raise _not_configured("Apple ", "MALLGATE_APPLE__BUNDLE_ID")
    now = runtime.clock.utcnow().timestamp()
    try:
        identity = await apple.verify_identity_token(token, apple_keys(runtime), bundle_id, now)
    except apple.AppleTokenRefused as exc:
        log.info("Apple identity token refused: %s", exc.reason)
        raise _token_refused(_APPLE_REFUSALS.get(exc.reason, "Apple 登录凭证无效，请重新登录")) from None
    if openid and openid != identity.sub:
        raise _openid_mismatch()
    return Verified(APPLE, bundle_id, identity.sub, email=identity.email[:191])


# ------------------------------------------------------------------ the login


def _platform_error(name: str, errcode: int, exc: Exception) -> ApiError:
    log.warning("%s APP login refused: %s", name.strip(), exc)
    return ApiError(
        f"{name}登录失败（错误码 {errcode}），请稍后再试", "users.platform_error", errcode=errcode
    )


_VERIFIERS: Final = {"weixin": _weixin, "qq": _qq, "apple": _apple}


async def _verify(runtime: Runtime, kind: str, openid: str, token: str) -> Verified:
    try:
        async with asyncio.timeout(UPSTREAM_DEADLINE):
            return await _VERIFIERS[kind](runtime, openid, token)
    except (ChannelError, TimeoutError) as exc:
        log.warning("%s login: platform unavailable: %s", kind, exc or type(exc).__name__)
        raise ApiError("登录服务暂时无法访问，请稍后再试", "users.unavailable") from None


async def login(
    runtime: Runtime, kind: str, openid: str, access_token: str, spread_id: int | None, ip: str
) -> dict[str, str]:
    """The profile, with a new token, of the user the platform says `access_token` belongs to."""
    verified = await _verify(runtime, parse_type(kind), openid, access_token)
    for attempt in (1, 2):
        try:
            return await _login_verified(runtime, verified, spread_id, ip)
        except IntegrityError:
            if attempt == 2:
                raise
            log.info("concurrent first login of one %s openid; looking again", verified.provider)
    raise AssertionError("unreachable")


async def _login_verified(
    runtime: Runtime, verified: Verified, spread_id: int | None, ip: str
) -> dict[str, str]:
    now = runtime.clock.utcnow().replace(tzinfo=None)
    ttl = accounts.token_ttl(runtime)

    # Find or make the user, take the platform's profile, mark the login: one write transaction.
    def write(session: Session) -> tuple[User, str, bool]:
        who = accounts.Who(
            verified.provider,
            verified.app_id,
            verified.openid,
            unionid=verified.unionid,
            email=verified.email,
            spread_id=spread_id,
            nickname=verified.nickname or ("Apple 用户" if verified.provider == APPLE else ""),
        )
        found = accounts.find_for_login(session, now, who)
        accounts.update_wechat_profile(
            found.user, nickname=verified.nickname, avatar=verified.avatar, sex=verified.sex
        )
        return found.user, accounts.record_login(session, found.user, now, ip, ttl), found.created

    user, token, created = await runtime.db.run_write(write, durable=accounts.LOGIN_DURABLE)
    log.info("app login provider=%s user=%s created=%s", verified.provider, user.id, created)
    return accounts.profile(user, token, zone=runtime.settings.zone)
