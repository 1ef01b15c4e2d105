"""The access_token and jsapi_ticket of every WeChat app, shared by all workers on all machines.

WeChat gives each app one access_token at a time, and each new fetch can knock out the
tokens other servers hold ("40001 ... not latest"); the ticket's daily quota is small.
So both live in the shared store, the ``cache_entries`` table, keyed by app id
(``wechat:access_token:<appid>``, ``wechat:jsapi_ticket:<appid>``), with their expiry:

- Read: a short in-process copy (``MALLGATE_WECHAT__TOKEN_LOCAL_SECONDS``), then the row.
- Refresh, ``MALLGATE_WECHAT__TOKEN_REFRESH_MARGIN_SECONDS`` before expiry, under a lease
  taken with a conditional UPDATE (``lease_until`` in the past): one worker of one
  machine fetches; the others keep using the old value while it is still valid, or
  poll the row (bounded by ``TOKEN_WAIT_SECONDS``) and take the new one. A lease whose
  holder died runs out after ``TOKEN_LEASE_SECONDS`` and is taken over. Inside one
  process, one coroutine per key does this; the others wait for it.
- Fetch: ``cgi-bin/stable_token`` in normal mode (the same token while valid, so a
  second fetch by a racing machine does no harm). Only where stable_token is not
  offered at all (48001 api unauthorized, or no such endpoint: HTTP 404) does it fall
  back to ``cgi-bin/token``, which replaces the token at every call.
- A call answered 40001/40014/42001: the token is expired in the store only if it is
  still the one that failed (``UPDATE ... WHERE value = <that token>``: compare-and-expire),
  and the in-process copy is dropped; the next read refreshes once (a concurrent
  failure of the same token finds the row already replaced and just reads it) and
  the call is retried once. When the normal-mode fetch gives back the very token that
  was refused, that token is dead at WeChat: only then ``force_refresh=true`` (WeChat
  allows 20 a day).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mallgate.channels.wechat_api import Credential, WechatApi, WechatApiError, WechatUnavailable
from mallgate.db.models import CacheEntry

if TYPE_CHECKING:
    from mallgate.runtime import Runtime

T = TypeVar("T")
SERVICE_KEY: Final = "wechat_tokens"
# Answers that mean "this app has no stable_token": then the classic endpoint is used.
NO_STABLE_TOKEN: Final = frozenset({48001})
_POLL_FIRST: Final = 0.02
_POLL_MAX: Final = 0.25
_EPOCH: Final = datetime(1970, 1, 1)


class WechatBusy(WechatUnavailable):
    """Another worker holds the refresh and did not finish within the wait."""


@dataclass(frozen=True)
class WechatApp:
    app_id: str
    secret: str


@dataclass(frozen=True)
class _Row:
    value: str
    expires_at: float  # Unix seconds; 0 when never filled


@dataclass(frozen=True)
class _Local:
    value: str
    expires_at: float
    keep_until: float


def _naive(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC).replace(tzinfo=None)


def _seconds(at: datetime | None) -> float:
    return at.replace(tzinfo=UTC).timestamp() if at is not None else 0.0


def token_key(app_id: str) -> str:
    return f"wechat:access_token:{app_id}"


def ticket_key(app_id: str) -> str:
    return f"wechat:jsapi_ticket:{app_id}"


Fetch = Callable[[str | None], Awaitable[Credential]]


class WechatTokens:
    """One per process (``runtime.services``); every app's token and ticket go through it."""

    def __init__(self, runtime: Runtime, api: WechatApi | None = None) -> None:
        self.db = runtime.db
        self.clock = runtime.clock
        self.settings = runtime.settings.wechat
        self.api = api or WechatApi(self.settings.api_base, runtime.http)
        self._local: dict[str, _Local] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._rows_made: set[str] = set()
        self._owner = f"{socket.gethostname()[:40]}:{os.getpid()}"

    @classmethod
    def of(cls, runtime: Runtime) -> WechatTokens:
        service = runtime.services.get(SERVICE_KEY)
        if not isinstance(service, WechatTokens):
            service = runtime.services[SERVICE_KEY] = cls(runtime)
        return service

    # --- what callers use ---

    async def access_token(self, app: WechatApp, *, rejected: str | None = None) -> str:
        return await self._get(token_key(app.app_id), lambda bad: self._fetch_token(app, bad), rejected)

    async def jsapi_ticket(self, app: WechatApp) -> str:
        return await self._get(
            ticket_key(app.app_id), lambda _bad: self.call(app, self.api.jsapi_ticket), None
        )

    async def call(self, app: WechatApp, work: Callable[[str], Awaitable[T]]) -> T:
        """`work(access_token)`; once more with a new token if WeChat refused this one."""
        token = await self.access_token(app)
        try:
            return await work(token)
        except WechatApiError as exc:
            if not exc.token_rejected:
                raise
        await self.expire_token(app, token)
        return await work(await self.access_token(app, rejected=token))

    async def expire_token(self, app: WechatApp, token: str) -> bool:
        """Compare-and-expire: marks the stored token expired only if it is still `token`."""
        return await self._expire(token_key(app.app_id), token)

    # --- the shared cache ---

    async def _get(self, key: str, fetch: Fetch, rejected: str | None) -> str:
        local = self._local.get(key)
        if local is not None and local.value != rejected and self.clock.now() < local.keep_until:
            return local.value
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            # A coroutine that held the lock before us may have just refreshed it.
            local = self._local.get(key)
            if local is not None and local.value != rejected and self.clock.now() < local.keep_until:
                return local.value
            return await self._shared(key, fetch, rejected)

    def _fresh(self, row: _Row | None, rejected: str | None, now: float) -> bool:
        return (
            row is not None
            and bool(row.value)
            and row.value != rejected
            and row.expires_at - self.settings.token_refresh_margin_seconds > now
        )

    async def _shared(self, key: str, fetch: Fetch, rejected: str | None) -> str:
        deadline = self.clock.now() + self.settings.token_wait_seconds
        pause = _POLL_FIRST
        while True:
            row = await self._read(key)
            now = self.clock.now()
            if self._fresh(row, rejected, now):
                assert row is not None
                return self._remember(key, row, now)
            if row is None:
                self._rows_made.discard(key)  # deleted since (an operator's clean-up): made again
            lease = await self._take_lease(key, now)
            if lease is not None:
                return await self._refresh(key, fetch, rejected, lease)
            # Another worker is refreshing: the old value serves until it really expires.
            if row is not None and row.value and row.value != rejected and row.expires_at > now:
                return row.value
            if now >= deadline:
                raise WechatBusy(f"{key}: another worker's refresh did not finish in time")
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)

    async def _refresh(self, key: str, fetch: Fetch, rejected: str | None, lease: str) -> str:
        stored = False
        try:
            # Between our read and the lease, the previous holder may have finished.
            row = await self._read(key)
            now = self.clock.now()
            if self._fresh(row, rejected, now):
                assert row is not None
                return self._remember(key, row, now)
            credential = await fetch(rejected)
            now = self.clock.now()
            row = _Row(credential.value, now + credential.expires_in)
            await self._store(key, row, lease)
            stored = True
            return self._remember(key, row, now)
        finally:
            if not stored:
                await self._release(key, lease)

    def _remember(self, key: str, row: _Row, now: float) -> str:
        keep = min(
            now + self.settings.token_local_seconds,
            row.expires_at - self.settings.token_refresh_margin_seconds,
        )
        if keep > now:
            self._local[key] = _Local(row.value, row.expires_at, keep)
        else:
            self._local.pop(key, None)
        return row.value

    async def _read(self, key: str) -> _Row | None:
        async with self.db.read() as session:
            found = (
                await session.execute(
                    select(CacheEntry.value, CacheEntry.expires_at).where(CacheEntry.key == key)
                )
            ).first()
        return _Row(found[0] or "", _seconds(found[1])) if found is not None else None

    async def _ensure_row(self, key: str) -> None:
        """The row the lease lives on; made once, so the lease is always a plain UPDATE.

        (An UPDATE that finds no row and then an INSERT would, on MySQL, take gap locks
        two workers deadlock on.)
        """
        if key in self._rows_made:
            return

        def insert(session: Session) -> None:
            if session.get(CacheEntry, key) is None:
                session.add(CacheEntry(key=key, value="", expires_at=None))

        try:
            await self.db.run_write(insert)
        except IntegrityError:
            pass  # another worker made it first
        self._rows_made.add(key)

    async def _take_lease(self, key: str, now: float) -> str | None:
        await self._ensure_row(key)
        lease = f"{self._owner}:{secrets.token_hex(4)}"
        free = (CacheEntry.lease_until.is_(None)) | (CacheEntry.lease_until < _naive(now))
        statement = (
            update(CacheEntry)
            .where(CacheEntry.key == key, free)
            .values(lease_owner=lease, lease_until=_naive(now + self.settings.token_lease_seconds))
            .execution_options(synchronize_session=False)
        )

        def take(session: Session) -> bool:
            return session.execute(statement).rowcount == 1  # type: ignore[attr-defined, no-any-return]

        return lease if await self.db.run_write(take) else None

    async def _store(self, key: str, row: _Row, lease: str) -> None:
        statement = (
            update(CacheEntry)
            .where(CacheEntry.key == key, CacheEntry.lease_owner == lease)
            .values(value=row.value, expires_at=_naive(row.expires_at), lease_owner=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        # Value and lease in one write. A lease that ran out was taken over: the new holder's value
        # stands, ours is only used.
        await self.db.run_write(lambda session: session.execute(statement))

    async def _release(self, key: str, lease: str) -> None:
        statement = (
            update(CacheEntry)
            .where(CacheEntry.key == key, CacheEntry.lease_owner == lease)
            .values(lease_owner=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        await self.db.run_write(lambda session: session.execute(statement))

    async def _expire(self, key: str, value: str) -> bool:
        local = self._local.get(key)
        if local is not None and local.value == value:
            del self._local[key]
        statement = (
            update(CacheEntry)
            .where(CacheEntry.key == key, CacheEntry.value == value)
            .values(expires_at=_EPOCH)
            .execution_options(synchronize_session=False)
        )

        def expire(session: Session) -> bool:
            return session.execute(statement).rowcount == 1  # type: ignore[attr-defined, no-any-return]

        return await self.db.run_write(expire)

    # --- WeChat ---

    async def _fetch_token(self, app: WechatApp, rejected: str | None) -> Credential:
        try:
            credential = await self.api.stable_token(app.app_id, app.secret)
        except WechatApiError as exc:
            if exc.errcode not in NO_STABLE_TOKEN:
                raise
            return await self.api.classic_token(app.app_id, app.secret)
        except WechatUnavailable as exc:
            if exc.status != 404:
                raise
            return await self.api.classic_token(app.app_id, app.secret)
        if rejected is not None and credential.value == rejected:
            credential = await self.api.stable_token(app.app_id, app.secret, force_refresh=True)
        return credential
