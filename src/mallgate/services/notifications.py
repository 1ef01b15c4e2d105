"""Payment notifications: store the raw request first, then apply it, in one transaction.

The channel-specific part is a decoder: raw request -> verified PaymentEvent,
raising NotAuthentic / ChannelError when the request must not be believed. A
rejected notification is stored too (for audit), with its reason. The caller
answers success only when `accepted` is true, which happens only after commit.

What a forger can make us store is bounded: a refused (unverified) notice keeps
only the first `notify.refused_body_bytes` of its body and query string, with the
full body's length and SHA-256; each source address has a budget of refused rows
a minute (beyond it the notice is answered failure and not stored); and the
group commit's queue is bounded (beyond it: failure at once, "busy").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from prometheus_client import Counter
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mallgate.channels.errors import ChannelError
from mallgate.db.models import PaymentNotification, table_of
from mallgate.forwarded import rate_key
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
# A refused notice's kept headers, each cut to this many characters: enough for an RSA-4096
# Wechatpay-Signature, so a notice refused only as stale can still be replayed.
REFUSED_HEADER_CHARS = 1024

DROPPED = Counter(
    "mallgate_notifications_dropped_total",
    "Notices answered failure without being stored: over a source's budget of refused rows, or queue full",
    ["channel", "reason"],
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
BUSY = Applied(False, "error", "busy")
NOT_STORED = Applied(False, "error", "not stored")
OVER_BUDGET = Applied(False, "rejected", "too many refused notices from this address")


class Acknowledged(Exception):
    """Raised by a decoder for an authentic notice mallgate does not act on (a v3 event of another kind).

    It is answered success, so the platform stops sending it, and stored as verified, "ignored".
    """

    def __init__(self, reason: str, *, order_no: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.order_no = order_no


# ----------------------------------------------------------------------------------------------
# text the databases keep

# PostgreSQL's text refuses NUL, and no UTF-8 encoding holds a lone surrogate: one such
# character in a batch's INSERT would fail the whole batch.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with what a text column cannot hold replaced by U+FFFD (same length)."""
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def _is_storable(text: str) -> bool:
    return (text.isascii() and "\x00" not in text) or _UNSTORABLE.search(text) is None


_KEPT = frozenset(KEPT_HEADERS)
# Built once: json.dumps with options builds an encoder per call, a measurable share of a notice.
_to_json = json.JSONEncoder(sort_keys=True).encode


def _kept_headers(headers: dict[str, str], value_chars: int | None = None) -> str:
    # The encoder escapes NUL and everything non-ASCII: the result is always storable.
    return _to_json({k: v[:value_chars] for k, v in headers.items() if k.lower() in _KEPT})


def _row(
    runtime: Runtime,
    raw: RawNotification,
    received_at: datetime,
    *,
    verified: bool,
    kind: str = "",
    order_no: str | None = None,
    trade_no: str | None = None,
) -> dict[str, Any]:
    """The audit row of a notice, but for its outcome and reason.

    A verified body is kept whole (replay verifies it again); a refused one only in part,
    its length and hash still identifying it.
    """
    body = raw.body
    if verified:
        kept_body, query, headers = body, storable(raw.query_string), _kept_headers(raw.headers)
    else:
        keep = runtime.settings.notify.refused_body_bytes
        kept_body = body[:keep]
        query = storable(raw.query_string[:keep])
        headers = _kept_headers(raw.headers, REFUSED_HEADER_CHARS)
    return {
        "channel": raw.channel[:16],
        "kind": kind[:24],
        "order_no": storable(order_no[:64]) if order_no else None,
        "trade_no": storable(trade_no[:64]) if trade_no else None,
        "received_at": received_at,
        "source_ip": storable(raw.source_ip[:64]),
        "method": storable(raw.method[:8]),
        "query_string": query,
        "headers": headers,
        "body": kept_body,
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "verified": verified,
    }


# ----------------------------------------------------------------------------------------------
# the budget of refused rows per source


@dataclass
class _Bucket:
    tokens: float
    at: float
    dropped: int = 0
    reported_at: float = float("-inf")


class RefusalBudget:
    """A token bucket of refused rows per source address: `per_minute`, refilled continuously.

    In-process on purpose: a flood must not cost a database round trip per notice. So
    it is per worker: with W workers a source may have up to W times the rate stored.
    Only refused notices spend it; an authentic one is never held back.
    """

    MAX_SOURCES = 10_000

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.buckets: dict[str, _Bucket] = {}

    def take(self, source: str, now: float) -> bool:
        bucket = self.buckets.pop(source, None)
        if bucket is None:
            if len(self.buckets) >= self.MAX_SOURCES:
                del self.buckets[next(iter(self.buckets))]  # the source seen least recently
            bucket = _Bucket(self.capacity, now)
        else:
            bucket.tokens = min(self.capacity, bucket.tokens + max(0.0, now - bucket.at) * self.rate)
            bucket.at = now
        self.buckets[source] = bucket  # re-inserted: the dict's order is the order of last use
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        bucket.dropped += 1
        if now - bucket.reported_at >= 60:
            # At most one line a minute per source, however hard it floods.
            log.warning(
                "%d refused notification(s) from %s not stored: over %d a minute (per worker)",
                bucket.dropped,
                source,
                int(self.capacity),
            )
            bucket.dropped, bucket.reported_at = 0, now
        return False


def _budget(runtime: Runtime) -> RefusalBudget:
    budget = runtime.services.get("notifications.refusal_budget")
    if not isinstance(budget, RefusalBudget):
        per_minute = runtime.settings.notify.refused_per_ip_per_minute
        budget = runtime.services["notifications.refusal_budget"] = RefusalBudget(per_minute)
    return budget


# ----------------------------------------------------------------------------------------------
# the group commit


@dataclass
class _Pending:
    row: dict[str, Any]  # the audit row, but for outcome and reason
    event: PaymentEvent | None  # to apply; None when `result` is already the outcome
    result: Applied
    received_at: datetime
    done: asyncio.Future[Applied]


def _resolve(items: list[_Pending], results: list[Applied]) -> None:
    for item, result in zip(items, results, strict=True):
        if not item.done.done():  # a caller that went away cancelled its future
            item.done.set_result(result)


class GroupCommit:
    """Applies the notifications that arrive together in one transaction: one commit, one fsync.

    A durable commit costs far more than the work inside it (about 0.3 ms of
    fsync on SQLite), so one commit per notification caps a server near 3,000/s.
    While one batch commits, the next requests queue; the following batch takes
    them all. If a batch's transaction fails, each of its notifications is tried
    again in a transaction of its own, so one that spoils the batch leaves the
    others to go through. No caller hears "accepted" before the commit, and every
    caller hears something: whatever fails, each future is resolved.

    The queue holds at most `notify.queue_limit` notices (the batch being written not
    counted); beyond that a notice is answered failure ("busy") at once, and the
    platform sends it again later.
    """

    MAX_BATCH = 128

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limit = runtime.settings.notify.queue_limit
        self.queue: list[_Pending] = []
        self.draining = False
        # The loop keeps only a weak reference to a task: this one must not vanish mid-batch.
        self.task: asyncio.Task[None] | None = None
        self.busy_reported_at = float("-inf")

    async def submit(self, item: _Pending) -> Applied:
        if len(self.queue) >= self.limit:
            DROPPED.labels(item.row["channel"], "busy").inc()
            now = asyncio.get_running_loop().time()
            if now - self.busy_reported_at >= 60:  # one line a minute, not one per notice turned away
                log.warning("notification queue full (%d waiting): answering busy", len(self.queue))
                self.busy_reported_at = now
            return BUSY
        self.queue.append(item)
        if not self.draining:
            self.draining = True
            self.task = asyncio.get_running_loop().create_task(self._drain())
        return await item.done

    async def _drain(self) -> None:
        batch: list[_Pending] = []
        try:
            while self.queue:
                batch, self.queue = self.queue[: self.MAX_BATCH], self.queue[self.MAX_BATCH :]
                _resolve(batch, await self._commit(batch))
                batch = []
        except BaseException as exc:
            # Cancelled (the loop shutting down) or a bug: nobody may wait for an answer forever.
            log.error("notification group commit stopped: %s", type(exc).__name__)
            waiting, self.queue = batch + self.queue, []
            _resolve(waiting, [NOT_STORED] * len(waiting))
            if not isinstance(exc, Exception):
                raise
        finally:
            self.draining = False

    async def _commit(self, batch: list[_Pending]) -> list[Applied]:
        try:
            # Connect timeouts bound a dead database; this bounds a wedged one, so the platform
            # hears "failure" and retries instead of hanging on us.
            async with asyncio.timeout(self.runtime.settings.db_timeout_seconds + 3):
                try:
                    return await self.runtime.db.run_write(lambda s: _store_and_apply(s, batch))
                except (TimeoutError, OSError):
                    raise  # the database is unreachable: one transaction each would only wait longer
                except Exception:
                    if len(batch) == 1:
                        raise
                # One notification spoiled the batch (a constraint, a race): give each its own
                # transaction so the others still go through.
                return [await self._commit_one(item) for item in batch]
        except (TimeoutError, SQLAlchemyError, OSError) as exc:
            log.warning("%d notification(s) not stored: %s", len(batch), type(exc).__name__)
        except Exception as exc:
            # Not a database failure: a bug. The type only; the message may carry SQL parameters.
            log.error("%d notification(s) not stored: unexpected %s", len(batch), type(exc).__name__)
        return [UNAVAILABLE] * len(batch)

    async def _commit_one(self, item: _Pending) -> Applied:
        try:
            return (await self.runtime.db.run_write(lambda s: _store_and_apply(s, [item])))[0]
        except Exception as exc:
            log.warning("%s notification failed to apply: %s", item.row["channel"], type(exc).__name__)
            return UNAVAILABLE


_INSERT_NOTIFICATION = insert(table_of(PaymentNotification))


def _store_and_apply(session: Session, batch: list[_Pending]) -> list[Applied]:
    """Apply each notification, then store them all with their outcomes, in the caller's transaction.

    The raw rows and the changes they cause commit together or not at all, so a
    notification is never applied without its audit row, nor stored as applied
    when it was not; one multi-row INSERT keeps a batch cheap.
    """
    results = [item.result for item in batch]
    verified = [(i, item.event, item.received_at) for i, item in enumerate(batch) if item.event is not None]
    if verified:
        applied = apply_events(session, [(event, now) for _, event, now in verified])
        for (index, _, _), result in zip(verified, applied, strict=True):
            results[index] = result
    session.connection().execute(
        _INSERT_NOTIFICATION,
        [
            {**item.row, "outcome": result.outcome, "reason": storable(result.reason[:255])}
            for item, result in zip(batch, results, strict=True)
        ],
    )
    return results


def _group_commit(runtime: Runtime) -> GroupCommit:
    committer = runtime.services.get("notifications.group_commit")
    if not isinstance(committer, GroupCommit):
        committer = runtime.services["notifications.group_commit"] = GroupCommit(runtime)
    return committer


# ----------------------------------------------------------------------------------------------
# the intake


def _unstorable_id(event: PaymentEvent) -> str:
    """The identifier of a verified event no database could look up or keep ("" when all are fine)."""
    for name in ("order_no", "trade_no", "refund_no"):
        if not _is_storable(getattr(event, name)):
            return name
    return ""


def _claimed(raw: RawNotification, claim: Callable[[RawNotification], str | None] | None) -> str | None:
    if claim is None:
        return None
    try:
        return claim(raw)
    except Exception:  # the claim is read from a notice already refused: any failure means "none"
        return None


async def receive(
    runtime: Runtime,
    raw: RawNotification,
    decode: Decoder,
    claim: Callable[[RawNotification], str | None] | None = None,
) -> Applied:
    """Verify, store and apply one notification; answers after the commit; never raises.

    `claim` reads the order number a notice claims without trusting it, for filing refused ones.
    """
    now = runtime.clock.utcnow().replace(tzinfo=None)
    judged = _judge(runtime, raw, decode, claim, now)
    if isinstance(judged, Applied):  # OVER_BUDGET
        DROPPED.labels(raw.channel, "rate_limited").inc()
        return judged
    row, event, result = judged
    result = await _group_commit(runtime).submit(
        _Pending(row, event, result, now, asyncio.get_running_loop().create_future())
    )
    if not result.accepted and result is not BUSY:  # busy is counted, and logged by the group commit
        log.warning("%s notification refused: %s %s", raw.channel, result.outcome, result.reason)
    return result


def _judge(
    runtime: Runtime,
    raw: RawNotification,
    decode: Decoder,
    claim: Callable[[RawNotification], str | None] | None,
    now: datetime,
) -> tuple[dict[str, Any], PaymentEvent | None, Applied] | Applied:
    """(audit row, event to apply, outcome if none), or OVER_BUDGET for a refusal not to be stored."""
    try:
        event = decode(raw)
    except Acknowledged as ack:
        row = _row(runtime, raw, now, verified=True, kind="none", order_no=ack.order_no)
        return row, None, Applied(True, "ignored", ack.reason)
    except ChannelError as exc:
        return _refused(runtime, raw, now, f"{type(exc).__name__}: {exc}", claim)
    except Exception as exc:
        # A decoder bug or input it did not foresee: still a refusal, and kept. The type only:
        # the message may quote the attacker's bytes.
        log.warning("%s decoder raised %s", raw.channel, type(exc).__name__)
        return _refused(runtime, raw, now, f"unexpected {type(exc).__name__}", claim)
    row = _row(
        runtime, raw, now, verified=True, kind=event.action, order_no=event.order_no, trade_no=event.trade_no
    )
    bad = _unstorable_id(event)
    if bad:
        # Signed, but no order can have such a number: refused like an unknown order.
        return row, None, Applied(False, "rejected", f"{bad} holds NUL or unpaired surrogates")
    return row, event, Applied(False, "rejected", "not applied")  # the state machine decides


def _refused(
    runtime: Runtime,
    raw: RawNotification,
    now: datetime,
    refusal: str,
    claim: Callable[[RawNotification], str | None] | None,
) -> tuple[dict[str, Any], None, Applied] | Applied:
    """The row of a refused notice, or OVER_BUDGET when its source has had enough stored."""
    if not _budget(runtime).take(rate_key(raw.source_ip), runtime.clock.now()):
        return OVER_BUDGET
    # A refused notice is filed under the order it claims, so an order's audit trail shows
    # the forgeries aimed at it too (verified=False marks them).
    row = _row(runtime, raw, now, verified=False, order_no=_claimed(raw, claim))
    return row, None, Applied(False, "rejected", refusal[:255])


@dataclass(frozen=True)
class StoredRaw:
    raw: RawNotification
    # False for a refused notice kept in part: there is nothing to verify again.
    whole: bool


async def load_raw(runtime: Runtime, notification_id: int) -> StoredRaw | None:
    """A stored notice as it was received, or None."""
    async with runtime.db.read() as session:
        row = (
            await session.scalars(
                select(PaymentNotification).where(PaymentNotification.id == notification_id)
            )
        ).first()
        if row is None:
            return None
        raw = RawNotification(
            channel=row.channel,
            method=row.method,
            query_string=row.query_string,
            body=row.body,
            source_ip=row.source_ip,
            headers=json.loads(row.headers or "{}"),
        )
        # Rows stored before the length was recorded have 0 there, and their body whole.
        return StoredRaw(raw, whole=row.body_length in (0, len(row.body)))


# ----------------------------------------------------------------------------------------------
# pruning (mallgate notifications prune)

PRUNE_BATCH = 1000


def _prune_batch(
    session: Session, *, cutoff: datetime, after_id: int, refused_only: bool, batch: int
) -> list[int]:
    table = table_of(PaymentNotification)
    query = (
        select(table.c.id)
        .where(table.c.id > after_id, table.c.received_at < cutoff)
        .order_by(table.c.id)
        .limit(batch)
    )
    if refused_only:
        query = query.where(table.c.verified.is_(False))
    ids = list(session.connection().scalars(query))
    if ids:
        session.connection().execute(delete(table).where(table.c.id.in_(ids)))
    return ids


async def prune(
    runtime: Runtime, *, older_than: timedelta, refused_only: bool = False, batch: int = PRUNE_BATCH
) -> int:
    """Delete stored notices received longer than `older_than` ago; how many were deleted.

    A transaction per `batch` rows, walking up the ids, so the table is never locked for
    long and the notify path keeps committing in between.
    """
    cutoff = runtime.clock.utcnow().replace(tzinfo=None) - older_than
    deleted, after_id = 0, 0
    while True:
        work = partial(_prune_batch, cutoff=cutoff, after_id=after_id, refused_only=refused_only, batch=batch)
        ids = await runtime.db.run_write(work)
        if not ids:
            return deleted
        deleted += len(ids)
        after_id = ids[-1]
