"""Users, their profile as the clients read it, identities and login tokens."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.db.models import Identity, User
from mallgate.envelope import ApiError
from mallgate.runtime import Runtime
from mallgate.services import tokens

_hasher = PasswordHasher()  # argon2id, memory-hard, with the library's current defaults

MIN_PASSWORD = 6
MAX_PASSWORD = 64


def hash_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ApiError(f"密码长度应为 {MIN_PASSWORD}-{MAX_PASSWORD} 位", "password.invalid")
    return _hasher.hash(password)


def check_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def profile(user: User, token: str = "") -> dict[str, str]:
    """The user profile of CONTRACT §1: every value a string."""
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
        "last_login": _fmt_time(user.last_login),
    }


async def create_user(
    session: AsyncSession,
    now: datetime,
    *,
    mobile: str | None = None,
    nickname: str = "",
    password: str | None = None,
    spread_id: int | None = None,
    avatar: str = "",
    sex: int = 0,
) -> User:
    user = User(
        username=mobile,
        mobile=mobile,
        nickname=nickname or (f"用户{mobile[-4:]}" if mobile else "微信用户"),
        avatar=avatar,
        sex=sex,
        password_hash=hash_password(password) if password else None,
        spread_id=await _valid_referrer(session, spread_id),
        balance=Decimal("0.00"),
        created_at=now,
    )
    session.add(user)
    await session.flush()
    return user


async def _valid_referrer(session: AsyncSession, spread_id: int | None) -> int | None:
    """A referrer is kept only if it names an existing user: a typo must not credit a stranger."""
    if not spread_id:
        return None
    return spread_id if await session.get(User, spread_id) is not None else None


async def login(runtime: Runtime, session: AsyncSession, user: User, ip: str) -> dict[str, str]:
    """Mark the login and hand out a fresh token with the profile."""
    now = runtime.clock.utcnow().replace(tzinfo=None)
    user.last_login = now
    user.last_ip = ip[:64]
    token = await tokens.issue(session, user.id, now, timedelta(days=runtime.settings.token_ttl_days))
    await session.flush()
    return profile(user, token)


async def identities_of(session: AsyncSession, user_id: int) -> list[dict[str, Any]]:
    rows = (await session.scalars(select(Identity).where(Identity.user_id == user_id))).all()
    return [
        {"provider": i.provider, "app_id": i.app_id, "openid": i.openid, "unionid": i.unionid} for i in rows
    ]


async def admin_view(session: AsyncSession, user: User) -> dict[str, Any]:
    view: dict[str, Any] = dict(profile(user))
    view["spread_id"] = str(user.spread_id) if user.spread_id else ""
    view["identities"] = await identities_of(session, user.id)
    return view


async def find_by_mobile(session: AsyncSession, mobile: str) -> User | None:
    return (await session.scalars(select(User).where(User.mobile == mobile))).first()
