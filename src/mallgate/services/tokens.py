"""User tokens: 40 lowercase hex characters from `secrets`, stored only as SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.db.models import Token, User

TOKEN_BYTES = 20  # 40 hex characters, the length the clients were written for


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(token: str) -> bool:
    return len(token) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in token)


async def issue(session: AsyncSession, user_id: int, now: datetime, ttl: timedelta) -> str:
    token = secrets.token_hex(TOKEN_BYTES)
    session.add(Token(user_id=user_id, token_hash=token_hash(token), created_at=now, expires_at=now + ttl))
    return token


async def resolve(session: AsyncSession, token: str, now: datetime) -> tuple[User, Token] | None:
    """The user a live token belongs to, with the token row (read only)."""
    if not looks_like_token(token):
        return None
    row = (
        await session.execute(
            select(Token, User)
            .join(User, User.id == Token.user_id)
            .where(Token.token_hash == token_hash(token), Token.revoked_at.is_(None), Token.expires_at > now)
        )
    ).first()
    if row is None:
        return None
    stored, user = row
    return user, stored


def needs_touch(stored: Token, now: datetime) -> bool:
    # Writing last use on every request would make every request a writer; a minute's precision is plenty.
    return stored.last_used_at is None or now - stored.last_used_at > timedelta(minutes=1)


async def touch(session: AsyncSession, token_id: int, now: datetime) -> None:
    await session.execute(update(Token).where(Token.id == token_id).values(last_used_at=now))


async def revoke_all(session: AsyncSession, user_id: int, now: datetime) -> None:
    await session.execute(
        update(Token).where(Token.user_id == user_id, Token.revoked_at.is_(None)).values(revoked_at=now)
    )
