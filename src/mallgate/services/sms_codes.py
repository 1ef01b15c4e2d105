"""SMS verification codes: sending them under rate limits, and redeeming them to register or reset a password.

Sending: every limit is counted in one transaction before the provider is
called, so concurrent requests cannot slip past a limit and a refused request
never costs an SMS. The provider call runs outside any transaction (it may take
seconds, and a transaction would hold locks that long). A definite refusal by
the provider gives the counts back; a timeout does not, because the message may
still have been accepted (SendSms is not idempotent at either provider), so its
code is stored as if it had been sent and the number waits out its interval.

Checking: a code is stored only as HMAC(server secret, salt + code) (the
secret is not in the database, so a dump alone gives no code), lives
`code_ttl_seconds`, allows `max_checks` wrong guesses and one successful use.
A wrong guess is committed even though the request fails, or the attempt limit
would not hold.

Redeeming (register, forget) runs in this order, each step only if the last passed:
1. the password's length (tells nothing, costs nothing);
2. the per-IP and per-number attempt counters;
3. the code, in a transaction that locks its row and commits a wrong guess. Until the
   code is shown right, the answer depends on nothing but the code: whether the number
   is registered is told only to whoever holds its code;
4. argon2, on a worker thread behind the bounded hasher, with no transaction open;
5. a second transaction that locks the row again, uses the code only if it is still the
   one shown right and still unused, and writes the user in the same commit. Two
   requests with one code both reach step 5; the lock lets one use it. A failure at 4
   or 5 leaves the code unused: nothing is half-written.
A right code is not counted as an attempt, so a "busy" answer costs the user nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Final, Literal, TypeVar, cast

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.channels.sms import SmsErrorCode, SmsProvider, SmsSendError, build_provider
from mallgate.db.models import SmsCode, User
from mallgate.envelope import ApiError
from mallgate.forwarded import rate_key
from mallgate.mobile import mask_mobile, normalize_mobile, parse_mobile
from mallgate.runtime import Runtime
from mallgate.services import accounts, ratelimit, tokens
from mallgate.services.ratelimit import Limit, RateLimited, wait_text
from mallgate.settings import SmsSettings

log = logging.getLogger("mallgate.sms")

Purpose = Literal["register", "repassword"]
PURPOSES: Final[tuple[Purpose, ...]] = ("register", "repassword")
CODE_DIGITS: Final = 6
HOUR: Final = 3600
DAY: Final = 86400
_PROVIDER_KEY: Final = "sms.provider"
_SALT_BYTES: Final = 16
# The server secret keys more than this one thing: a code hash gets its own key from it.
_CODE_KEY_LABEL: Final = b"mallgate sms code hash v1"

T = TypeVar("T")


def _now(runtime: Runtime) -> datetime:
    return runtime.clock.utcnow().replace(tzinfo=None)


def parse_purpose(value: str) -> Purpose:
    if value not in PURPOSES:
        raise ApiError("验证码类型应为 register 或 repassword", "sms.bad_type", field="type")
    return value


def _purpose_refusal(purpose: Purpose, user: User | None) -> ApiError | None:
    """The one rule of CONTRACT §2: `register` needs a new number, `repassword` a registered one."""
    if purpose == "register" and user is not None:
        return ApiError("该手机号已注册", "sms.registered", field="username")
    if purpose == "repassword" and user is None:
        return ApiError("该手机号未注册", "sms.unregistered", field="username")
    return None


# ------------------------------------------------------------------ hashing


def new_code() -> str:
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def _code_key(secret: bytes) -> bytes:
    return hmac.new(secret, _CODE_KEY_LABEL, hashlib.sha256).digest()


def hash_code(secret: bytes, code: str, salt: bytes | None = None) -> str:
    """`salt$hmac` in hex, keyed by the server secret: equal codes hash differently, and a
    table dump without the secret gives no code (six digits are a million guesses otherwise)."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hmac.new(_code_key(secret), salt + code.encode(), hashlib.sha256).hexdigest()
    return f"{salt.hex()}${digest}"


def code_matches(secret: bytes, code_hash: str, code: str) -> bool:
    """Whether `code` is the one hashed; a hash made before the secret (HMAC keyed by its salt)
    never matches, so such a code fails closed as a wrong one and the user asks for a new code."""
    salt_hex, _, _digest = code_hash.partition("$")
    try:
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    return hmac.compare_digest(hash_code(secret, code, salt).encode(), code_hash.encode())


# ------------------------------------------------------------------ sending


@dataclass(frozen=True)
class _SendLimit:
    limit: Limit
    reason: str
    code: str


def _send_limits(settings: SmsSettings, mobile: str, ip: str) -> list[_SendLimit]:
    """Each limit its own counter key: the per-IP count never reads a number's count, nor the reverse."""
    limits = [
        _SendLimit(
            Limit(f"sms:day:{mobile}", settings.per_number_daily, DAY),
            "该手机号今日获取验证码次数已达上限",
            "sms.number_daily_limit",
        ),
        _SendLimit(
            Limit(f"sms:ip:{rate_key(ip)}", settings.per_ip_hourly, HOUR),
            "当前网络获取验证码过于频繁",
            "sms.ip_limit",
        ),
        _SendLimit(
            Limit("sms:all", settings.global_daily, DAY), "短信发送量已达今日上限", "sms.global_limit"
        ),
    ]
    if settings.per_number_interval_seconds > 0:
        interval = Limit(f"sms:interval:{mobile}", 1, settings.per_number_interval_seconds)
        limits.insert(0, _SendLimit(interval, "发送过于频繁", "sms.too_frequent"))
    return limits


def _rate_limited(limits: list[_SendLimit], exc: RateLimited) -> ApiError:
    which = next(item for item in limits if item.limit == exc.limit)
    if which.code == "sms.global_limit":
        log.warning("SMS global daily cap of %d reached", exc.limit.limit)
    return ApiError(
        f"{which.reason}，请 {wait_text(exc.retry_after)}后再试", which.code, retry_after=exc.retry_after
    )


_PROVIDER_INFO: Final[dict[SmsErrorCode, str]] = {
    "sms.provider_limited": "发送过于频繁，请稍后再试",
    "sms.bad_number": "该手机号无法接收短信，请检查号码",
    "sms.provider_error": "短信发送失败，请稍后再试",
    "sms.provider_timeout": "短信服务响应超时",
}


def provider(runtime: Runtime) -> SmsProvider:
    """One provider per runtime: it holds nothing but settings and the shared HTTP client."""
    cached = runtime.services.get(_PROVIDER_KEY)
    if cached is None:
        cached = build_provider(runtime.settings.sms, runtime.http, runtime.sandbox_url)
        runtime.services[_PROVIDER_KEY] = cached
    return cast(SmsProvider, cached)


async def send_code(runtime: Runtime, mobile: str, purpose: str, ip: str) -> None:
    """Send a new code for (mobile, purpose), replacing the old one; raise ApiError when refused."""
    if runtime.settings.sms.provider is None:
        # No provider and no sandbox: nothing may stand in for one (see mallgate.parties).
        raise ApiError("短信服务未配置", "sms.not_configured")
    number = normalize_mobile(mobile)
    kind = parse_purpose(purpose)
    settings = runtime.settings.sms
    limits = _send_limits(settings, number, ip)
    now = _now(runtime)
    refusal: ApiError | None = None
    try:
        async with runtime.db.transaction() as session:
            refusal = _purpose_refusal(kind, await accounts.find_by_mobile(session, number))
            # A refusal still counts against the caller's IP: it tells whether a number is
            # registered, and that lookup must be as limited as sending is.
            counted = [item.limit for item in limits if refusal is None or item.code == "sms.ip_limit"]
            await ratelimit.hit(session, counted, now)
    except RateLimited as exc:
        raise _rate_limited(limits, exc) from None
    if refusal is not None:
        raise refusal

    code = new_code()
    sender = provider(runtime)
    try:
        receipt = await sender.send_code(number, code)
    except SmsSendError as exc:
        log.warning(
            "SMS to %s failed at %s: %s %s", mask_mobile(number), sender.name, exc.code, exc.provider_code
        )
        if exc.code != "sms.provider_timeout":
            async with runtime.db.transaction() as session:
                await ratelimit.release(session, [item.limit for item in limits], now)
            raise ApiError(_PROVIDER_INFO[exc.code], exc.code) from None
        await _store_code(runtime, number, kind, code, now)
        retry = settings.per_number_interval_seconds
        raise ApiError(
            f"{_PROVIDER_INFO[exc.code]}，如未收到验证码请 {wait_text(max(retry, 1))}后重试",
            exc.code,
            retry_after=retry,
        ) from None
    await _store_code(runtime, number, kind, code, _now(runtime))
    log.info("SMS code for %s (%s) sent by %s: %s", mask_mobile(number), kind, sender.name, receipt)


async def _store_code(runtime: Runtime, mobile: str, purpose: Purpose, code: str, now: datetime) -> None:
    """Upsert on (mobile, purpose): a new code replaces the old one and its attempt count."""
    values = {
        "code_hash": hash_code(runtime.secret_key, code),
        "created_at": now,
        "expires_at": now + timedelta(seconds=runtime.settings.sms.code_ttl_seconds),
        "attempts": 0,
        "used_at": None,
    }
    replace = update(SmsCode).where(SmsCode.mobile == mobile, SmsCode.purpose == purpose).values(**values)
    async with runtime.db.transaction() as session:
        if (await session.execute(replace)).rowcount == 1:  # type: ignore[attr-defined]
            return
        try:
            async with session.begin_nested():
                session.add(SmsCode(mobile=mobile, purpose=purpose, **values))
        except IntegrityError:
            await session.execute(replace)  # another send for this number created the row first


# ------------------------------------------------------------------ checking


class CodeRejected(ApiError):
    """A code that does not open the door; what it changed (the attempt count) must still be committed."""


def _missing() -> CodeRejected:
    return CodeRejected("请先获取验证码", "sms.code_missing", field="code")


async def _locked_code(session: AsyncSession, mobile: str, purpose: Purpose) -> SmsCode | None:
    # Locked, so that concurrent checks count one by one and only one can use the code.
    query = select(SmsCode).where(SmsCode.mobile == mobile, SmsCode.purpose == purpose).with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def check_code(
    session: AsyncSession,
    secret: bytes,
    mobile: str,
    purpose: Purpose,
    code: str,
    now: datetime,
    *,
    max_checks: int,
) -> str:
    """Show that `code` is the live code of (mobile, purpose), without using it; its hash, for `use_code`.

    Raises CodeRejected; a wrong guess is counted (the caller commits it).
    """
    row = await _locked_code(session, mobile, purpose)
    if row is None:
        raise _missing()
    if row.used_at is not None or row.expires_at <= now:
        # Told only to whoever holds the code. To anyone else a spent code is no code at all:
        # "already used" would tell that the number registered with it.
        if not code_matches(secret, row.code_hash, code):
            raise _missing()
        if row.used_at is not None:
            raise CodeRejected("验证码已使用，请重新获取", "sms.code_used", field="code")
        raise CodeRejected("验证码已过期，请重新获取", "sms.code_expired", field="code")
    if row.attempts >= max_checks:
        raise CodeRejected("验证码错误次数过多，请重新获取", "sms.code_locked", field="code")
    if not code_matches(secret, row.code_hash, code):
        row.attempts += 1
        await session.flush()
        left = max_checks - row.attempts
        info = f"验证码错误，还可尝试 {left} 次" if left else "验证码错误次数过多，请重新获取"
        raise CodeRejected(info, "sms.code_wrong", field="code", attempts_left=left)
    return row.code_hash


async def use_code(
    session: AsyncSession, mobile: str, purpose: Purpose, code_hash: str, now: datetime
) -> None:
    """Use the code `check_code` accepted, if it is still that code and still unused."""
    row = await _locked_code(session, mobile, purpose)
    if row is None or row.code_hash != code_hash:
        raise CodeRejected("验证码已更新，请使用最新收到的验证码", "sms.code_replaced", field="code")
    if row.used_at is not None:
        raise CodeRejected("验证码已使用，请重新获取", "sms.code_used", field="code")
    row.used_at = now
    await session.flush()


def _check_limits(settings: SmsSettings, mobile: str, ip: str) -> list[_SendLimit]:
    """Attempts at register and forget together, counted before the code is read."""
    return [
        _SendLimit(
            Limit(f"sms:check:ip:{rate_key(ip)}", settings.check_per_ip_hourly, HOUR),
            "当前网络验证次数过多",
            "sms.check_ip_limit",
        ),
        _SendLimit(
            Limit(f"sms:check:number:{mobile}", settings.check_per_number_per_15min, 15 * 60),
            "该手机号验证次数过多",
            "sms.check_number_limit",
        ),
    ]


async def _accepted_code(runtime: Runtime, mobile: str, purpose: Purpose, code: str, ip: str) -> str:
    """Steps 2 and 3 of the module's order: the counters, then the code; the accepted code's hash.

    One transaction, committed whatever the code was (the counts and a wrong guess must
    hold), except when a limit refuses: then nothing moved.
    """
    settings = runtime.settings.sms
    limits = _check_limits(settings, mobile, ip)
    now = _now(runtime)
    refusal: ApiError | None = None
    code_hash = ""
    try:
        async with runtime.db.transaction() as session:
            await ratelimit.hit(session, [item.limit for item in limits], now)
            try:
                code_hash = await check_code(
                    session, runtime.secret_key, mobile, purpose, code, now, max_checks=settings.max_checks
                )
            except CodeRejected as exc:
                refusal = exc  # leave the block normally, so that the guess is committed
            else:
                # Now, and only now, may the answer depend on the number; it saves a hash that
                # the second transaction would refuse anyway.
                refusal = _purpose_refusal(purpose, await accounts.find_by_mobile(session, mobile))
    except RateLimited as exc:
        raise _rate_limited(limits, exc) from None
    if refusal is not None:
        raise refusal
    return code_hash


async def _redeem(
    runtime: Runtime,
    mobile: str,
    purpose: Purpose,
    code: str,
    password: str,
    ip: str,
    action: Callable[[AsyncSession, User | None, str, datetime], Awaitable[T]],
) -> T:
    """Check the code, hash the password, then use the code and run `action` in one transaction."""
    accounts.validate_password(password)
    code_hash = await _accepted_code(runtime, mobile, purpose, code, ip)
    password_hash = await accounts.hasher(runtime).hash(password)
    now = _now(runtime)
    async with runtime.db.transaction() as session:
        await use_code(session, mobile, purpose, code_hash, now)
        user = await accounts.find_by_mobile(session, mobile)
        refusal = _purpose_refusal(purpose, user)  # registered or removed meanwhile
        if refusal is not None:
            raise refusal  # rolls back: the code stays unused
        return await action(session, user, password_hash, now)


async def register(
    runtime: Runtime, mobile: str, code: str, password: str, spread_id: int | None, ip: str
) -> dict[str, str]:
    """Create the user of a new number from its `register` code; the profile with a token."""
    number = normalize_mobile(mobile)

    async def create(
        session: AsyncSession, _user: User | None, password_hash: str, now: datetime
    ) -> dict[str, str]:
        try:
            async with session.begin_nested():
                user = await session.run_sync(
                    partial(accounts.new_user, now=now, mobile=number, spread_id=spread_id)
                )
        except IntegrityError:
            raise ApiError("该手机号已注册", "sms.registered", field="username") from None
        user.password_hash = password_hash
        return await accounts.login(runtime, session, user, ip)

    return await _redeem(runtime, number, "register", code, password, ip, create)


async def reset_password(runtime: Runtime, mobile: str, code: str, password: str, ip: str) -> None:
    """Set a new password from a `repassword` code and log out every existing session."""
    number = normalize_mobile(mobile)

    async def reset(session: AsyncSession, user: User | None, password_hash: str, now: datetime) -> None:
        assert user is not None  # _purpose_refusal let `repassword` through only for a registered number
        user.password_hash = password_hash
        await tokens.revoke_all(session, user.id, now)
        await session.flush()

    await _redeem(runtime, number, "repassword", code, password, ip, reset)


# ------------------------------------------------------------------ password login


async def password_login(runtime: Runtime, username: str, password: str, ip: str) -> dict[str, str]:
    """The profile with a fresh token; one answer for an unknown account and a wrong password."""
    wrong = ApiError("账号或密码错误", "login.failed")
    number = parse_mobile(username)
    settings = runtime.settings.login
    limits = [
        Limit(f"login:account:{(number or username)[:64]}", settings.per_account_per_15min, 15 * 60),
        Limit(f"login:ip:{rate_key(ip)}", settings.per_ip_hourly, HOUR),
    ]
    try:
        async with runtime.db.transaction() as session:
            await ratelimit.hit(session, limits, _now(runtime))
    except RateLimited as exc:
        raise ApiError(
            f"登录尝试过于频繁，请 {wait_text(exc.retry_after)}后再试",
            "login.too_frequent",
            retry_after=exc.retry_after,
        ) from None
    async with runtime.db.read() as session:
        user = (
            await session.scalars(
                select(User).where(or_(User.username == username, User.mobile == (number or username)))
            )
        ).first()
        user_id, stored = (user.id, user.password_hash) if user is not None else (None, None)
    # An unknown account or one without a password is checked against a throw-away hash: same cost.
    if not await accounts.hasher(runtime).verify(stored, password) or user_id is None:
        raise wrong
    async with runtime.db.transaction() as session:
        current = await session.get(User, user_id, with_for_update=True)
        # The password checked must still be the one stored (a reset may have happened meanwhile).
        if current is None or current.password_hash != stored:
            raise wrong
        return await accounts.login(runtime, session, current, ip)
