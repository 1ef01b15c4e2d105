"""Rate limits kept in the database, checked and counted atomically.

Each limit is its own counter row (key, count, expiry): the per-IP limit never
reads the per-number counter. A hit on several limits is all-or-nothing: if one
refuses, the transaction rolls back and no counter moves. Rows are locked in key
order so that two requests never deadlock on each other's counters. A window
starts at its first hit and lasts `window` seconds.

On MySQL/MariaDB a counter is bumped with one upsert: looking for a row that is not
there yet takes a gap lock in InnoDB, and two requests that both found no row and
then both insert it deadlock (seen as 500s from concurrent logins from one new IP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.db.models import Counter


@dataclass(frozen=True)
class Limit:
    key: str
    limit: int
    window_seconds: int


class RateLimited(Exception):
    def __init__(self, limit: Limit, retry_after: int) -> None:
        super().__init__(f"{limit.key} over {limit.limit} per {limit.window_seconds}s")
        self.limit = limit
        # Clocks of concurrent requests differ by a hair; never ask for more than one window.
        self.retry_after = min(max(1, retry_after), max(1, limit.window_seconds))


async def _hit_one_mysql(session: AsyncSession, limit: Limit, now: datetime) -> None:
    live = Counter.expires_at > now
    upsert = mysql_insert(Counter).values(
        key=limit.key, count=1, expires_at=now + timedelta(seconds=limit.window_seconds)
    )
    # A list, not keywords: MySQL assigns in order, and `count` must still see the old expiry.
    upsert = upsert.on_duplicate_key_update(
        [
            ("count", case((live, Counter.count + 1), else_=1)),
            ("expires_at", case((live, Counter.expires_at), else_=upsert.inserted.expires_at)),
        ]
    )
    await session.execute(upsert)
    count, expires_at = (
        await session.execute(select(Counter.count, Counter.expires_at).where(Counter.key == limit.key))
    ).one()
    if count > limit.limit:  # the caller rolls back, and the bump with it
        raise RateLimited(limit, int((expires_at - now).total_seconds() + 0.999))


async def _hit_one(session: AsyncSession, limit: Limit, now: datetime) -> None:
    if session.get_bind().dialect.name in ("mysql", "mariadb"):
        await _hit_one_mysql(session, limit, now)
        return
    for _ in range(3):
        bumped = await session.execute(
            update(Counter)
            .where(Counter.key == limit.key, Counter.expires_at > now, Counter.count < limit.limit)
            .values(count=Counter.count + 1)
        )
        if bumped.rowcount == 1:  # type: ignore[attr-defined]
            return
        row = (
            await session.execute(
                select(Counter.expires_at).where(Counter.key == limit.key).with_for_update()
            )
        ).first()
        if row is not None and row.expires_at > now:
            raise RateLimited(limit, int((row.expires_at - now).total_seconds() + 0.999))
        await session.execute(delete(Counter).where(Counter.key == limit.key, Counter.expires_at <= now))
        try:
            async with session.begin_nested():
                session.add(
                    Counter(key=limit.key, count=1, expires_at=now + timedelta(seconds=limit.window_seconds))
                )
            return
        except IntegrityError:
            continue  # another request created the window first: count against it
    raise RateLimited(limit, 1)


async def hit(session: AsyncSession, limits: Sequence[Limit], now: datetime) -> None:
    """Count one event against every limit, or raise RateLimited (the caller rolls back)."""
    for limit in sorted(limits, key=lambda item: item.key):
        if limit.limit <= 0:
            raise RateLimited(limit, limit.window_seconds)
        await _hit_one(session, limit, now)


async def release(session: AsyncSession, limits: Sequence[Limit], now: datetime) -> None:
    """Give back one event (the thing counted did not happen, e.g. the provider refused the SMS)."""
    for limit in sorted(limits, key=lambda item: item.key):
        await session.execute(
            update(Counter)
            .where(Counter.key == limit.key, Counter.expires_at > now, Counter.count > 0)
            .values(count=Counter.count - 1)
        )


def wait_text(seconds: int) -> str:
    """How long to wait, as the clients show it: seconds up to two minutes, then minutes."""
    if seconds <= 120:
        return f"{seconds} 秒"
    return f"{-(-seconds // 60)} 分钟"
