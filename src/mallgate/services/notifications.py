"""Payment notifications: store the raw request first, then apply it, in one transaction.

The channel-specific part is a decoder: raw request -> verified PaymentEvent,
raising NotAuthentic / ChannelError when the request must not be believed. A
rejected notification is stored too (for audit), with its reason. The caller
answers success only when `accepted` is true, which happens only after commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mallgate.channels.errors import ChannelError
from mallgate.db.models import PaymentNotification, table_of
from mallgate.runtime import Runtime
from mallgate.services.orders import Applied, PaymentEvent, apply_events

log = logging.getLogger("mallgate.notify")

# Headers worth keeping for audit and replay; cookies and authorisation never are.
KEPT_HEADERS = (
    "content-type",
    "user-agent",
    "wechatpay-timestamp",
    "wechatpay-nonce",
    "wechatpay-signature",
    "wechatpay-serial",
    "wechatpay-signature-type",
    "request-id",
    "x-forwarded-for",
)


@dataclass(frozen=True)
class RawNotification:
    channel: str
    method: str
    query_string: str
    body: bytes
    source_ip: str
    headers: dict[str, str] = field(default_factory=dict)


Decoder = Callable[[RawNotification], PaymentEvent]

UNAVAILABLE = Applied(False, "error", "database unavailable")


def _kept_headers(headers: dict[str, str]) -> str:
    return json.dumps({k: v for k, v in headers.items() if k.lower() in KEPT_HEADERS}, sort_keys=True)


@dataclass
class _Pending:
    raw: RawNotification
    event: PaymentEvent | None
    refusal: str
    received_at: datetime
    done: asyncio.Future[Applied]
    claimed_order_no: str | None = None


class GroupCommit:
    """Applies the notifications that arrive together in one transaction: one commit, one fsync.

    A durable commit costs far more than the work inside it (about 0.3 ms of
    fsync on SQLite), so one commit per notification caps a server near 3,000/s.
    While one batch commits, the next requests queue; the following batch takes
    them all. Each notification runs in its own savepoint, so one that fails
    leaves the others intact, and no caller hears "accepted" before the commit.
    """

    MAX_BATCH = 128

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.queue: list[_Pending] = []
        self.draining = False

    async def submit(self, item: _Pending) -> Applied:
        self.queue.append(item)
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await item.done

    async def _drain(self) -> None:
        try:
            while self.queue:
                batch, self.queue = self.queue[: self.MAX_BATCH], self.queue[self.MAX_BATCH :]
                results = await self._commit(batch)
                for item, result in zip(batch, results, strict=True):
                    if not item.done.done():
                        item.done.set_result(result)
        finally:
            self.draining = False

    async def _commit(self, batch: list[_Pending]) -> list[Applied]:
        try:
            # Connect timeouts bound a dead database; this bounds a wedged one, so the platform
            # hears "failure" and retries instead of hanging on us.
            async with asyncio.timeout(self.runtime.settings.db_timeout_seconds + 3):
                try:
                    return await self.runtime.db.run_write(lambda s: _store_and_apply(s, batch))
                except SQLAlchemyError:
                    if len(batch) == 1:
                        raise
                # One notification spoiled the batch (a constraint, a race): give each its own
                # transaction so the others still go through.
                return [await self._commit_one(item) for item in batch]
        except (TimeoutError, SQLAlchemyError, OSError) as exc:
            log.warning("%d notification(s) not stored: %s", len(batch), type(exc).__name__)
            return [UNAVAILABLE] * len(batch)

    async def _commit_one(self, item: _Pending) -> Applied:
        try:
            return (await self.runtime.db.run_write(lambda s: _store_and_apply(s, [item])))[0]
        except SQLAlchemyError as exc:
            log.warning("%s notification failed to apply: %s", item.raw.channel, type(exc).__name__)
            return UNAVAILABLE


_INSERT_NOTIFICATION = insert(table_of(PaymentNotification))


def _store_and_apply(session: Session, batch: list[_Pending]) -> list[Applied]:
    """Apply each notification, then store them all with their outcomes, in the caller's transaction.

    The raw rows and the changes they cause commit together or not at all, so a
    notification is never applied without its audit row, nor stored as applied
    when it was not; one multi-row INSERT keeps a batch cheap.
    """
    results: list[Applied] = [Applied(False, "rejected", item.refusal) for item in batch]
    verified = [(i, item.event, item.received_at) for i, item in enumerate(batch) if item.event is not None]
    applied = apply_events(session, [(event, now) for _, event, now in verified])
    for (index, _, _), result in zip(verified, applied, strict=True):
        results[index] = result
    session.connection().execute(
        _INSERT_NOTIFICATION,
        [
            {
                "channel": item.raw.channel,
                "kind": item.event.action if item.event else "",
                # A refused notice is filed under the order it claims, so an order's audit
                # trail shows the forgeries aimed at it too (verified=False marks them).
                "order_no": item.event.order_no if item.event else (item.claimed_order_no or "")[:64] or None,
                "trade_no": (item.event.trade_no or None) if item.event else None,
                "received_at": item.received_at,
                "source_ip": item.raw.source_ip[:64],
                "method": item.raw.method[:8],
                "query_string": item.raw.query_string,
                "headers": _kept_headers(item.raw.headers),
                "body": item.raw.body,
                "verified": item.event is not None,
                "outcome": result.outcome,
                "reason": result.reason[:255],
            }
            for item, result in zip(batch, results, strict=True)
        ],
    )
    return results


def _group_commit(runtime: Runtime) -> GroupCommit:
    committer = runtime.services.get("notifications.group_commit")
    if not isinstance(committer, GroupCommit):
        committer = runtime.services["notifications.group_commit"] = GroupCommit(runtime)
    return committer


async def receive(
    runtime: Runtime,
    raw: RawNotification,
    decode: Decoder,
    claim: Callable[[RawNotification], str | None] | None = None,
) -> Applied:
    """Verify, store and apply one notification; answers after the commit; never raises.

    `claim` reads the order number a notice claims without trusting it, for filing refused ones.
    """
    claimed: str | None = None
    try:
        event: PaymentEvent | None = decode(raw)
        refusal = ""
    except ChannelError as exc:
        event, refusal = None, f"{type(exc).__name__}: {exc}"[:255]
        if claim is not None:
            try:
                claimed = claim(raw)
            except ValueError:
                claimed = None
    pending = _Pending(
        raw,
        event,
        refusal,
        runtime.clock.utcnow().replace(tzinfo=None),
        asyncio.get_running_loop().create_future(),
        claimed,
    )
    result = await _group_commit(runtime).submit(pending)
    if not result.accepted:
        log.warning("%s notification refused: %s %s", raw.channel, result.outcome, result.reason)
    return result


async def load_raw(runtime: Runtime, notification_id: int) -> RawNotification | None:
    async with runtime.db.read() as session:
        row = (
            await session.scalars(
                select(PaymentNotification).where(PaymentNotification.id == notification_id)
            )
        ).first()
        if row is None:
            return None
        return RawNotification(
            channel=row.channel,
            method=row.method,
            query_string=row.query_string,
            body=row.body,
            source_ip=row.source_ip,
            headers=json.loads(row.headers or "{}"),
        )
