"""Mini Program login (`auth`): a ``wx.login`` code becomes a mall user with a token.

1. ``sns/jscode2session`` gives openid, session_key and (Open Platform bound) unionid.
2. The user is found or made by (wechat, Mini Program appid, openid), linked by a non-empty
   unionid to the same person's Official Account and APP identities (`accounts.find_for_login`).
3. The session_key is kept on the identity, sealed with a key derived from the server secret
   (`secret_key.seal_session_key`), replaced at each login; it is in no answer and no log.
4. Profile data: ``userInfo`` (object or JSON string, each field taken only when well typed),
   then ``encryptedData`` + ``iv`` decrypted with the new session_key (watermark appid and age
   checked). Open data that does not decrypt is ignored: the login stands on the code alone,
   and a stale ``encryptedData`` (sealed before the client's latest ``wx.login``) is common.
5. ``phone_code`` binds the mobile WeChat confirms (``wxa/business/getuserphonenumber``); a
   mobile bound to another user refuses the whole login (nothing is created or merged).
6. ``scene`` (a share code) names the referrer of a user made now: through
   ``mallgate.services.spread.resolve_scene`` when that exists, else a numeric scene is a user id.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from mallgate.channels.errors import ChannelError
from mallgate.channels.wechat_api import WechatApiError
from mallgate.channels.wechat_mini import (
    BUSY,
    CODE_USED,
    INVALID_CODE,
    TOO_FREQUENT,
    MiniSession,
    OpenDataRefused,
    PhoneInfo,
    WechatMini,
    decrypt_open_data,
)
from mallgate.db.models import User
from mallgate.envelope import ApiError
from mallgate.params import ascii_int
from mallgate.runtime import Runtime
from mallgate.secret_key import seal_session_key
from mallgate.services import accounts
from mallgate.services.wechat_tokens import WechatApp, WechatTokens
from mallgate.settings import WechatAppCredentials

log = logging.getLogger("mallgate.wechat.mini")

# Every upstream call of one login together within this: the client waits for nobody longer.
UPSTREAM_DEADLINE: Final = 4.5
MAX_USER_INFO: Final = 4096
# Open data is made on the phone just before the login; older is a replay.
OPEN_DATA_MAX_AGE: Final = 600
MAX_SCENE: Final = 32  # WeChat's limit for a Mini Program code's scene
# wx.login's codes are 32 letters and digits; `-` and `_` are allowed for other shapes seen.
CODE_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class MiniLogin:
    code: str
    user_info: str = ""
    encrypted_data: str = ""
    iv: str = ""
    phone_code: str = ""
    scene: str = ""
    spread_id: int | None = None


@dataclass(frozen=True)
class _Profile:
    nickname: str = ""
    avatar: str = ""
    sex: int = 0
    unionid: str = ""


def _configured(runtime: Runtime) -> WechatAppCredentials:
    settings = runtime.settings.wechat_mini
    if not (settings.app_id and settings.app_secret):
        raise ApiError("小程序未配置", "wechat_mini.not_configured")
    return settings


# ------------------------------------------------------------------ client-sent profile


def _field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    return value if isinstance(value, str) else ""


def _gender(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, str) and value in ("1", "2"):
        return int(value)
    return value if isinstance(value, int) and value in (1, 2) else 0


# What wx.getUserProfile / getUserInfo answer for everyone since late 2022 (basic library
# 2.27.1): a placeholder, never the person's name, so it never overwrites a stored one.
ANONYMOUS_NICKNAME: Final = "微信用户"


def _profile_of(data: dict[str, Any]) -> _Profile:
    nickname = _field(data, "nickName")
    return _Profile(
        nickname="" if nickname.strip() == ANONYMOUS_NICKNAME else nickname,
        avatar=_field(data, "avatarUrl"),
        sex=_gender(data.get("gender")),
        unionid=_field(data, "unionId"),
    )


def parse_user_info(raw: str | dict[str, Any]) -> _Profile:
    """`userInfo` as the client sent it; anything not an object of well-typed fields counts for nothing."""
    if isinstance(raw, dict):
        data: Any = raw
    elif not raw or len(raw) > MAX_USER_INFO:
        return _Profile()
    else:
        try:
            data = json.loads(raw)
        except ValueError:
            return _Profile()
    if not isinstance(data, dict):
        return _Profile()
    # The unionid is never taken from what the client says: only WeChat's own answers link users.
    found = _profile_of(data)
    return _Profile(found.nickname, found.avatar, found.sex)


def _open_data(runtime: Runtime, app_id: str, wx: MiniSession, request: MiniLogin) -> _Profile:
    if not (request.encrypted_data and request.iv):
        return _Profile()
    try:
        data = decrypt_open_data(
            wx.session_key,
            request.encrypted_data,
            request.iv,
            app_id=app_id,
            now=runtime.clock.now(),
            max_age=OPEN_DATA_MAX_AGE,
        )
    except OpenDataRefused as exc:
        log.info("Mini Program open data ignored: %s", exc)
        return _Profile()
    found = _profile_of(data)
    if _field(data, "openId") not in ("", wx.openid):
        log.warning("Mini Program open data of another openid ignored")
        return _Profile()
    return found


# ------------------------------------------------------------------ referrers


Resolver = Callable[[AsyncSession, str], Awaitable[int | None]]


def _scene_resolver() -> Resolver | None:
    """The share issue's resolver, when it is built (``services.spread.resolve_scene``)."""
    try:
        module = importlib.import_module("mallgate.services.spread")
    except ImportError:
        return None
    found = getattr(module, "resolve_scene", None)
    return found if callable(found) else None


async def _referrer(runtime: Runtime, request: MiniLogin) -> int | None:
    """The referrer a new user would get: a scene costs one read, a spread_id none (the write checks it)."""
    scene = request.scene.strip()
    if scene and len(scene) <= MAX_SCENE:
        resolver = _scene_resolver()
        if resolver is not None:
            async with runtime.db.read() as session:
                found = await resolver(session, scene)
            if found:
                return found
        else:
            found = ascii_int(scene)
            if found:
                return found
    return request.spread_id


# ------------------------------------------------------------------ WeChat


def _platform_error(exc: WechatApiError, what: str) -> ApiError:
    if exc.errcode == TOO_FREQUENT:
        return ApiError("登录过于频繁，请稍后再试", "auth.too_frequent", retry_after=60)
    if exc.errcode == BUSY:
        return ApiError("微信系统繁忙，请稍后再试", "auth.busy", retry_after=1)
    log.warning("WeChat refused %s: errcode %s", what, exc.errcode)
    return ApiError(
        f"微信登录失败（错误码 {exc.errcode}），请稍后再试", "auth.platform_error", errcode=exc.errcode
    )


async def _code2session(client: WechatMini, settings: WechatAppCredentials, code: str) -> MiniSession:
    try:
        return await client.code2session(settings.app_id, settings.app_secret, code)
    except WechatApiError as exc:
        if exc.errcode == INVALID_CODE:
            raise ApiError(
                "登录凭证 code 无效或已过期，请重新登录", "auth.code_invalid", field="code"
            ) from None
        if exc.errcode == CODE_USED:
            raise ApiError(
                "登录凭证 code 已被使用，请重新调用 wx.login", "auth.code_used", field="code"
            ) from None
        raise _platform_error(exc, "jscode2session") from None


async def _phone(
    runtime: Runtime, client: WechatMini, settings: WechatAppCredentials, code: str
) -> PhoneInfo:
    app = WechatApp(settings.app_id, settings.app_secret)
    try:
        info = await WechatTokens.of(runtime).call(app, lambda token: client.phone_number(token, code))
    except WechatApiError as exc:
        if exc.errcode == INVALID_CODE:
            raise ApiError(
                "手机号授权 code 无效、已使用或已过期，请重新点击获取手机号",
                "auth.phone_code_invalid",
                field="phone_code",
            ) from None
        raise _platform_error(exc, "getuserphonenumber") from None
    if not info.pure_phone_number.isdigit() or info.watermark_appid not in ("", settings.app_id):
        raise ApiError("微信返回的手机号无法使用", "auth.phone_invalid", field="phone_code")
    return info


async def _ask_wechat(
    runtime: Runtime, settings: WechatAppCredentials, request: MiniLogin
) -> tuple[MiniSession, PhoneInfo | None]:
    client = WechatMini(runtime.settings.wechat.api_base, runtime.http)
    try:
        async with asyncio.timeout(UPSTREAM_DEADLINE):
            wx = await _code2session(client, settings, request.code)
            phone = (
                await _phone(runtime, client, settings, request.phone_code) if request.phone_code else None
            )
    except (ChannelError, TimeoutError) as exc:
        log.warning("WeChat Mini Program login unavailable: %s", exc or type(exc).__name__)
        raise ApiError("微信服务暂时无法访问，请稍后再试", "auth.unavailable") from None
    return wx, phone


# ------------------------------------------------------------------ the login


def _mobile(phone: PhoneInfo) -> str:
    # A mainland number is stored as the 11 digits the SMS login uses, so both find one user.
    if phone.country_code in ("", "86"):
        return phone.pure_phone_number
    return f"+{phone.country_code}{phone.pure_phone_number}"


def _bind_mobile(session: Session, user: User, mobile: str) -> None:
    owner = session.connection().execute(select(User.id).where(User.mobile == mobile)).scalar()
    if owner is not None and owner != user.id:
        raise ApiError(
            "该手机号已绑定其他账号，请使用该手机号登录，或在微信中更换手机号",
            "auth.mobile_taken",
            field="phone_code",
        )
    if user.username is None or user.username == user.mobile:
        user.username = mobile
    user.mobile = mobile


def session_key_binding(provider: str, app_id: str, openid: str) -> str:
    """What a sealed session_key is bound to: its own identity, nowhere else."""
    return f"{provider}:{app_id}:{openid}"


async def _login_once(
    runtime: Runtime,
    app_id: str,
    wx: MiniSession,
    profile: _Profile,
    phone: PhoneInfo | None,
    referrer: int | None,
    ip: str,
) -> tuple[dict[str, str], bool]:
    """The whole login in one write transaction: one database unit, whichever the backend.

    On SQLite `run_write` runs it on a thread over plain sqlite3 under the write lock, so
    only database work belongs inside: the session_key is sealed before, the profile
    rendered after. A refused mobile raises inside, and the transaction (a user made
    by this very login included) is rolled back whole. Not waited onto the disk
    (`accounts.LOGIN_DURABLE`).
    """
    now: datetime = runtime.clock.utcnow().replace(tzinfo=None)
    ttl = accounts.token_ttl(runtime)
    binding = session_key_binding(accounts.WECHAT, app_id, wx.openid)
    sealed = seal_session_key(runtime.secret_key, wx.session_key, binding)
    mobile = _mobile(phone) if phone is not None else None

    def write(session: Session) -> tuple[User, str, bool]:
        who = accounts.Who(
            accounts.WECHAT,
            app_id,
            wx.openid,
            unionid=wx.unionid or profile.unionid,
            spread_id=referrer,
            session_key=sealed,
        )
        found = accounts.find_for_login(session, now, who)
        accounts.update_wechat_profile(
            found.user, nickname=profile.nickname, avatar=profile.avatar, sex=profile.sex
        )
        if mobile is not None:
            _bind_mobile(session, found.user, mobile)
        return found.user, accounts.record_login(session, found.user, now, ip, ttl), found.created

    user, token, created = await runtime.db.run_write(write, durable=accounts.LOGIN_DURABLE)
    return accounts.profile(user, token, zone=runtime.settings.zone), created


def _merged(first: _Profile, second: _Profile) -> _Profile:
    """`second` (WeChat-sealed) over `first` (client-sent), field by field."""
    return _Profile(
        nickname=second.nickname or first.nickname,
        avatar=second.avatar or first.avatar,
        sex=second.sex or first.sex,
        unionid=second.unionid,
    )


def _check_codes(request: MiniLogin) -> None:
    # Checked before any call: WeChat would only answer 40029, one round trip later.
    if not CODE_SHAPE.fullmatch(request.code):
        raise ApiError("登录凭证 code 无效或已过期，请重新登录", "auth.code_invalid", field="code")
    if request.phone_code and not CODE_SHAPE.fullmatch(request.phone_code):
        raise ApiError(
            "手机号授权 code 无效、已使用或已过期，请重新点击获取手机号",
            "auth.phone_code_invalid",
            field="phone_code",
        )


async def login(
    runtime: Runtime, request: MiniLogin, user_info: str | dict[str, Any], ip: str
) -> dict[str, str]:
    """The profile, with a new token, of the user `request.code` belongs to."""
    settings = _configured(runtime)
    _check_codes(request)
    wx, phone = await _ask_wechat(runtime, settings, request)
    profile = _merged(parse_user_info(user_info), _open_data(runtime, settings.app_id, wx, request))
    referrer = await _referrer(runtime, request)
    for attempt in (1, 2):
        try:
            answer, created = await _login_once(runtime, settings.app_id, wx, profile, phone, referrer, ip)
        except IntegrityError:
            # Two first logins of one openid, or one mobile bound twice at once: look again.
            if attempt == 2:
                raise
            log.info("concurrent Mini Program login; looking again")
            continue
        log.info("wechat mini login user=%s created=%s phone=%s", answer["id"], created, phone is not None)
        return answer
    raise AssertionError("unreachable")
