"""Users, their profile as the clients read it, identities and login tokens."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, Final, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import bindparam, insert, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from mallgate.clock import show_time
from mallgate.db.models import Identity, Token, User
from mallgate.envelope import ApiError
from mallgate.runtime import Runtime
from mallgate.services import tokens
from mallgate.settings import LoginSettings

_hasher = PasswordHasher()  # argon2id, memory-hard, with the library's current defaults

MIN_PASSWORD = 6
MAX_PASSWORD = 64
_HASHER_KEY: Final = "accounts.hasher"

T = TypeVar("T")


def validate_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ApiError(f"密码长度应为 {MIN_PASSWORD}-{MAX_PASSWORD} 位", "password.invalid")


def check_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


_dummy_hash: str | None = None
_dummy_lock = threading.Lock()


def _check_unknown(password: str) -> bool:
    """Check against a throw-away hash, so that an unknown account costs what a wrong password does."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash(secrets.token_hex(16))
    check_password(_dummy_hash, password)
    return False


class Hasher:
    """argon2 on worker threads, at most `hash_concurrency` at a time per process.

    Each hash takes about 0.2 s of CPU and 64 MiB: on the event loop a handful of them
    stalls every request, and an unbounded queue of them is a denial of service that
    only moves. So a request waits for a slot only while fewer than `hash_queue` others
    wait, and for at most `hash_wait_seconds`; otherwise it is answered "busy" at once.
    A slot is given back when its thread is done, not when the request gives up, so
    abandoned requests never let more hashes run than the limit.
    """

    def __init__(self, settings: LoginSettings) -> None:
        self._slots = asyncio.Semaphore(settings.hash_concurrency)
        self._executor = ThreadPoolExecutor(settings.hash_concurrency, thread_name_prefix="mallgate-argon2")
        self._queue = settings.hash_queue
        self._wait = settings.hash_wait_seconds
        self._waiting = 0

    async def hash(self, password: str) -> str:
        validate_password(password)
        return await self._run(_hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether `password` matches; a missing hash costs a check all the same, and is False."""
        if not password_hash:
            return await self._run(_check_unknown, password)
        return await self._run(check_password, password_hash, password)

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        await self._take_slot()
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, work, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _done: self._slots.release())
        return await asyncio.shield(future)

    async def _take_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns without waiting
            return
        if self._waiting >= self._queue or self._wait <= 0:
            raise busy()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self._wait)
        except TimeoutError:
            raise busy() from None
        finally:
            self._waiting -= 1


def busy() -> ApiError:
    # HTTP 200 like every business failure: the clients read `status` and show `info`.
    return ApiError("系统繁忙，请稍后再试", "password.busy", retry_after=1)


def hasher(runtime: Runtime) -> Hasher:
    """The runtime's hasher, made on first use (inside the event loop that will use it)."""
    found = runtime.services.get(_HASHER_KEY)
    if found is None:
        found = runtime.services[_HASHER_KEY] = Hasher(runtime.settings.login)
        weakref.finalize(runtime, found.close)
    assert isinstance(found, Hasher)
    return found


def _fmt_time(value: datetime | None, zone: tzinfo) -> str:
    return show_time(value, zone) if value else ""


def profile(user: User, token: str = "", *, zone: tzinfo) -> dict[str, str]:
    """The user profile of CONTRACT §1: every value a string, times in `zone` (the settings')."""
    balance = user.balance if user.balance is not None else Decimal("0")
    return {
        "id": str(user.id),
        "token": token,
        "username": user.username or user.mobile or "",
        "nickname": user.nickname or "",
        "group_name": user.group_name or "",
        "shop_count": str(user.shop_count or 0),
        "coupon_count": str(user.coupon_count or 0),
        "mobile": user.mobile or "",
        "sex": str(user.sex or 0),
        "point": str(user.point or 0),
        "amount": f"{balance.quantize(Decimal('0.01'))}",
        "last_ip": user.last_ip or "",
        "last_login": _fmt_time(user.last_login, zone),
    }


def new_user(
    session: Session,
    now: datetime,
    *,
    mobile: str | None = None,
    nickname: str = "",
    password_hash: str | None = None,
    spread_id: int | None = None,
    avatar: str = "",
    sex: int = 0,
) -> User:
    """A user added and flushed (it has its id), in the caller's transaction."""
    user = User(
        username=mobile,
        mobile=mobile,
        nickname=nickname or (f"用户{mobile[-4:]}" if mobile else "微信用户"),
        avatar=avatar,
        sex=sex,
        # Hashed by the caller through `hasher(runtime)`: argon2 must not run on the event loop.
        password_hash=password_hash,
        spread_id=_valid_referrer(session, spread_id),
        balance=Decimal("0.00"),
        created_at=now,
    )
    session.add(user)
    session.flush()
    return user


def _valid_referrer(session: Session, spread_id: int | None) -> int | None:
    """A referrer is kept only if it names an existing user: a typo must not credit a stranger."""
    if not spread_id:
        return None
    return spread_id if session.get(User, spread_id) is not None else None


def _new_token(user_id: int, now: datetime, ttl: timedelta) -> tuple[str, dict[str, Any]]:
    """A fresh token and the values of its row (only its hash is stored)."""
    token = secrets.token_hex(tokens.TOKEN_BYTES)
    row = {
        "user_id": user_id,
        "token_hash": tokens.token_hash(token),
        "created_at": now,
        "expires_at": now + ttl,
    }
    return token, row


def mark_login(session: Session, user: User, now: datetime, ip: str, ttl: timedelta) -> str:
    """Mark the login on `user` (in the session) and add a fresh token; the token."""
    user.last_login = now
    user.last_ip = ip[:64]
    token, row = _new_token(user.id, now, ttl)
    session.add(Token(**row))
    return token


def token_ttl(runtime: Runtime) -> timedelta:
    return timedelta(days=runtime.settings.token_ttl_days)


async def login(runtime: Runtime, session: AsyncSession, user: User, ip: str) -> dict[str, str]:
    """Mark the login and hand out a fresh token with the profile."""
    now = runtime.clock.utcnow().replace(tzinfo=None)
    ttl = token_ttl(runtime)

    def mark(sync: Session) -> str:
        token = mark_login(sync, user, now, ip, ttl)
        sync.flush()
        return token

    return profile(user, await session.run_sync(mark), zone=runtime.settings.zone)


async def identities_of(session: AsyncSession, user_id: int) -> list[dict[str, Any]]:
    rows = (await session.scalars(select(Identity).where(Identity.user_id == user_id))).all()
    return [
        {"provider": i.provider, "app_id": i.app_id, "openid": i.openid, "unionid": i.unionid} for i in rows
    ]


async def admin_view(session: AsyncSession, user: User, *, zone: tzinfo) -> dict[str, Any]:
    view: dict[str, Any] = dict(profile(user, zone=zone))
    view["spread_id"] = str(user.spread_id) if user.spread_id else ""
    view["identities"] = await identities_of(session, user.id)
    return view


async def find_by_mobile(session: AsyncSession, mobile: str) -> User | None:
    return (await session.scalars(select(User).where(User.mobile == mobile))).first()


# Every WeChat app (Official Account, Mini Program, APP) logs in as provider "wechat", told
# apart by app_id; a unionid links only these (QQ has unionids of its own, another namespace).
WECHAT: Final = "wechat"


@dataclass(frozen=True)
class Who:
    """A login: the identity at (`provider`, `app_id`), and what a user made by it starts with.

    `unionid` links the same person's identities of one provider (never when empty); `email`
    is Apple's, when the token has one; `session_key` is the Mini Program's, sealed by the
    caller; `spread_id`, the profile fields, only for a user made now.
    """

    provider: str
    app_id: str
    openid: str
    unionid: str = ""
    email: str = ""
    spread_id: int | None = None
    nickname: str = ""
    avatar: str = ""
    sex: int = 0
    session_key: str | None = None


async def wechat_user(
    session: AsyncSession,
    now: datetime,
    *,
    app_id: str,
    openid: str,
    unionid: str = "",
    spread_id: int | None = None,
    nickname: str = "",
    avatar: str = "",
    sex: int = 0,
) -> tuple[User, bool]:
    """The user of a WeChat login at `app_id`, and whether it was created now (`platform_user`)."""
    who = Who(WECHAT, app_id, openid, unionid, spread_id=spread_id, nickname=nickname, avatar=avatar, sex=sex)
    return await platform_user(session, now, who)


async def platform_user(session: AsyncSession, now: datetime, who: Who) -> tuple[User, bool]:
    """`find_or_create` in an async transaction: the user, and whether it was created now."""
    found = await session.run_sync(lambda sync: find_or_create(sync, now, who))
    return found.user, found.created


@dataclass(frozen=True)
class Found:
    user: User
    created: bool  # the user was made by this login


def _identity_changes(
    stored_unionid: str | None, unionid: str, email: str, session_key: str | None
) -> dict[str, str]:
    """What a login changes on its stored identity."""
    changes: dict[str, str] = {}
    if unionid and not stored_unionid:
        changes["unionid"] = unionid  # learnt later: snsapi_base first, snsapi_userinfo now
    if email:
        changes["email"] = email
    if session_key is not None:
        changes["session_key"] = session_key
    return changes


def find_or_create(session: Session, now: datetime, who: Who) -> Found:
    """The user of a login at (`provider`, `app_id`), in the session, and whether it is new.

    Found by (provider, app_id, openid), identity and user in one query; else, when
    `unionid` is not empty, the same person's identity at another app of the same provider
    gives the user and this identity is added to it (a unionid is one provider's: WeChat's
    and QQ's never link); else a new user (with `spread_id` when it names an existing
    user). An empty unionid never links: every app without an Open Platform binding would
    otherwise be one person. `email` (Apple's, when the token has one) replaces the
    identity's; `session_key` (sealed by the caller) the Mini Program's. Concurrent first
    logins of one openid meet the unique (provider, app_id, openid): the loser's
    transaction raises IntegrityError and is retried by the caller.
    """
    found = find_for_login(session, now, who)
    # The login's own path hands the user back detached; the ORM callers change it in place.
    user = session.get(User, found.user.id)
    assert user is not None  # found or made in this very transaction
    return Found(user, created=found.created)


def _add_identity(session: Session, now: datetime, who: Who, unionid: str) -> Found:
    """The identity of a first login at this app, on the unionid's user or a new one (`find_or_create`)."""
    linked = _user_of_unionid(session, unionid, who.provider) if unionid else None
    user = linked or new_user(
        session, now, nickname=who.nickname, avatar=who.avatar, sex=who.sex, spread_id=who.spread_id
    )
    session.add(
        Identity(
            user_id=user.id,
            provider=who.provider,
            app_id=who.app_id,
            openid=who.openid,
            unionid=unionid or None,
            email=who.email or None,
            session_key=who.session_key,
            created_at=now,
        )
    )
    session.flush()
    return Found(user, created=linked is None)


# The login's own path (`find_for_login` then `record_login`) is plain Core over statements
# built once: a returning user, nearly every login, costs one SELECT and three writes with
# none of the ORM's loading and unit of work: about a third of the ORM path's CPU (SQLite).
_USER_COLUMNS: Final = tuple(inspect(User).columns)
_BY_OPENID: Final = (
    select(Identity.id.label("identity_id"), Identity.unionid.label("identity_unionid"), *_USER_COLUMNS)
    .join(User, User.id == Identity.user_id)
    .where(
        Identity.provider == bindparam("provider"),
        Identity.app_id == bindparam("app_id"),
        Identity.openid == bindparam("openid"),
    )
    # The row is written back whole (`record_login`): locked from this read on, so that a
    # concurrent change (an admin's, another login's) waits instead of being overwritten
    # with what was read. SQLite has no FOR UPDATE and needs none: BEGIN IMMEDIATE.
    .with_for_update()
)
# Every field a login may change, written in one UPDATE whichever changed.
_LOGIN_FIELDS: Final = ("username", "mobile", "nickname", "avatar", "sex", "last_login", "last_ip")
_WRITE_LOGIN: Final = (
    update(User)
    .where(User.id == bindparam("w_id"))
    .values({name: bindparam(f"w_{name}") for name in _LOGIN_FIELDS})
)
_ADD_TOKEN: Final = insert(Token)

# A login's write is not waited onto the disk (`Database.run_write(durable=False)`): a power
# cut may forget the last logins, and then their tokens fail and the client logs in again
# (a spent wx.login code included: the client asks wx.login for a new one on any failure).
# Whatever the user does next that counts (an order, a payment) commits durably, and that
# makes the login before it durable too: SQLite's WAL and PostgreSQL's WAL are written in order.
LOGIN_DURABLE: Final = False


def find_for_login(session: Session, now: datetime, who: Who) -> Found:
    """`find_or_create` for a login that `record_login` finishes; the same rules.

    The user comes back detached from the session: what the caller changes on it
    (profile, mobile) is written by `record_login`, with the login.
    """
    unionid = who.unionid.strip()
    connection = session.connection()
    keys = {"provider": who.provider, "app_id": who.app_id, "openid": who.openid}
    row = connection.execute(_BY_OPENID, keys).first()
    if row is None:
        found = _add_identity(session, now, who, unionid)
        session.expunge(found.user)
        return found
    values = row._mapping
    changes = _identity_changes(values["identity_unionid"], unionid, who.email, who.session_key)
    if changes:
        connection.execute(update(Identity).where(Identity.id == values["identity_id"]).values(changes))
    return Found(User(**{column.key: values[column.key] for column in _USER_COLUMNS}), created=False)


def record_login(session: Session, user: User, now: datetime, ip: str, ttl: timedelta) -> str:
    """Write the login of a user `find_for_login` gave (as the caller left it) and a new token; the token."""
    user.last_login = now
    user.last_ip = ip[:64]
    connection = session.connection()
    connection.execute(
        _WRITE_LOGIN, {"w_id": user.id, **{f"w_{name}": getattr(user, name) for name in _LOGIN_FIELDS}}
    )
    token, row = _new_token(user.id, now, ttl)
    connection.execute(_ADD_TOKEN, row)
    return token


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _clean(text: str, limit: int) -> str:
    # NUL breaks PostgreSQL, and no nickname needs a control character.
    return _CONTROL.sub("", text).strip()[:limit]


def update_wechat_profile(user: User, *, nickname: str = "", avatar: str = "", sex: int = 0) -> None:
    """WeChat's current profile over the stored one; what WeChat leaves empty is kept.

    sex 0 is WeChat's "unknown", what it answers for everyone since late 2021: it never
    overwrites a known one. An avatar that is not an http(s) URL is ignored.
    """
    nickname, avatar = _clean(nickname, 64), _clean(avatar, 512)
    if nickname:
        user.nickname = nickname
    if avatar.startswith(("https://", "http://")):
        user.avatar = avatar
    if sex in (1, 2):
        user.sex = sex


def _user_of_unionid(session: Session, unionid: str, provider: str = WECHAT) -> User | None:
    # The person's first identity of this provider decides, in one query with its user.
    return session.scalars(
        select(User)
        .join(Identity, Identity.user_id == User.id)
        .where(Identity.provider == provider, Identity.unionid == unionid)
        .order_by(Identity.id)
        .limit(1)
    ).first()
