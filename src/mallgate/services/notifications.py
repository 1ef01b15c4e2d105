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

import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Final

from prometheus_client import Counter
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from mallgate.channels.errors import ChannelError
from mallgate.db.group_commit import GroupCommit, Outcomes, shared
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
    # False for a replay: it is stored as a notice of its own even when its bytes are a repeat.
    compact: bool = True


_INSERT_NOTIFICATION = insert(table_of(PaymentNotification))


def _store_and_apply(session: Session, batch: list[_Pending]) -> list[Applied]:
    """Apply each notification, then store them all with their outcomes, in the caller's transaction.

    The raw rows and the changes they cause commit together or not at all, so a
    notification is never applied without its audit row, nor stored as applied
    when it was not; one multi-row INSERT keeps a batch cheap. A duplicate that is a
    byte-for-byte repeat of a notice already stored is counted on that notice's row.
    """
    results = [item.result for item in batch]
    verified = [(i, item.event, item.received_at) for i, item in enumerate(batch) if item.event is not None]
    if verified:
        applied = apply_events(session, [(event, now) for _, event, now in verified])
        for (index, _, _), result in zip(verified, applied, strict=True):
            results[index] = result
    repeats = [
        i
        for i, (item, result) in enumerate(zip(batch, results, strict=True))
        if item.compact and item.event is not None and result.outcome == "duplicate" and _repeat_key(item.row)
    ]
    counted: set[int] = set()
    if repeats:
        found = _count_repeats(session, [(_repeat_key(batch[i].row), batch[i].received_at) for i in repeats])
        counted = {i for i, hit in zip(repeats, found, strict=True) if hit}
    rows = [
        {**item.row, "outcome": result.outcome, "reason": storable(result.reason[:255])}
        for i, (item, result) in enumerate(zip(batch, results, strict=True))
        if i not in counted
    ]
    if rows:
        session.connection().execute(_INSERT_NOTIFICATION, rows)
    return results


# ----------------------------------------------------------------------------------------------
# repeats: the same accepted notice again, byte for byte
#
# Alipay and WeChat Pay send a notice again until they read "success", and a lost answer
# or an impatient platform makes many repeats. A repeat changes nothing, so its bytes are
# not stored again: it is counted on the first row of the same notice (`repeats`,
# `last_repeat_at`). Every distinct notice and every refusal still has a row of its own.
# Each worker remembers the notices it saw accepted; a repeat of one is still verified in
# full, then only counted, in a transaction that does not wait for the disk: the notice's
# own row, and the change it made, were durable before its first "success", and a count
# lost in a power cut loses no money.

RepeatKey = tuple[str, str, str, str]  # channel, order_no, body_sha256, query_string


def _repeat_key(row: dict[str, Any]) -> RepeatKey | None:
    if not row.get("order_no") or not row.get("verified"):
        return None
    return (row["channel"], row["order_no"], row["body_sha256"], row["query_string"])


_NOTICES = table_of(PaymentNotification)
ACCEPTED_OUTCOMES: Final = ("applied", "duplicate", "ignored")  # the outcomes of Applied(True, ...)
# Built once: constructing a statement costs more than running it (a batch runs both).
_FIRST_ROWS = (
    select(*(_NOTICES.c[name] for name in ("id", "channel", "order_no", "body_sha256", "query_string")))
    .where(
        _NOTICES.c.order_no.in_(bindparam("orders", expanding=True)),
        _NOTICES.c.body_sha256.in_(bindparam("hashes", expanding=True)),
        _NOTICES.c.verified.is_(True),
        # Counted on a row that was accepted: the same bytes refused once (before their order
        # existed, say) and accepted later by a replay are counted on the replay's row.
        _NOTICES.c.outcome.in_(ACCEPTED_OUTCOMES),
    )
    .order_by(_NOTICES.c.id)
)
_COUNT = (
    update(_NOTICES)
    .where(_NOTICES.c.id == bindparam("row_id"))
    .values(repeats=_NOTICES.c.repeats + bindparam("n"), last_repeat_at=bindparam("last"))
)


def _count_repeats(session: Session, repeats: Sequence[tuple[RepeatKey | None, datetime]]) -> list[bool]:
    """Counts each repeat on the first stored row of its notice; False where there is none (pruned)."""
    keys = [key for key, _ in repeats if key is not None]
    connection = session.connection()
    found = connection.execute(
        _FIRST_ROWS, {"orders": sorted({k[1] for k in keys}), "hashes": sorted({k[2] for k in keys})}
    )
    first: dict[RepeatKey, int] = {}
    for row_id, channel, order_no, sha, query_string in found:
        first.setdefault((channel, order_no, sha, query_string), row_id)
    counts: dict[int, tuple[int, datetime]] = {}
    for key, at in repeats:
        row_id = first.get(key) if key is not None else None
        if row_id is not None:
            n, last = counts.get(row_id, (0, at))
            counts[row_id] = (n + 1, max(last, at))
    if counts:
        connection.execute(_COUNT, [{"row_id": i, "n": n, "last": last} for i, (n, last) in counts.items()])
    return [key is not None and key in first for key, _ in repeats]


REPEAT = "repeat of a notice already accepted"
# A request's bytes: method, query string, body (by its hash) and the headers that sign it.
RawKey = tuple[str, str, str, str, tuple[str, ...]]
# Its bytes alone where they carry their own signature (Alipay, WeChat Pay v2): remembered
# before decoding. Else with what they were verified to say (WeChat Pay v3, whose signature
# and timestamp are headers checked anew each time): remembered only after decoding.
_Seen = tuple[RawKey, PaymentEvent | None]
_SIGNING_HEADERS = ("wechatpay-signature", "wechatpay-timestamp", "wechatpay-nonce", "wechatpay-serial")


def _raw_key(raw: RawNotification) -> RawKey:
    signing = tuple(raw.headers.get(name, "") for name in _SIGNING_HEADERS)
    return (raw.channel, raw.method, raw.query_string, hashlib.sha256(raw.body).hexdigest(), signing)


class AcceptedNotices:
    """The notices this process saw accepted, by their exact bytes: where their row is, and the
    answer a repeat gets.

    Bounded, least recently used first out. Filled only after a commit, so a notice is in it
    only once its row and its effect are stored.
    """

    MAX = 10_000

    def __init__(self) -> None:
        self.entries: OrderedDict[_Seen, tuple[RepeatKey, Applied]] = OrderedDict()

    def get(self, key: _Seen) -> tuple[RepeatKey, Applied] | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def add(self, key: _Seen, row: RepeatKey, result: Applied) -> None:
        # An applied notice's repeat is a duplicate; a duplicate's repeat says what it said.
        answer = Applied(True, "duplicate", REPEAT) if result.outcome != "duplicate" else result
        self.entries[key] = (row, answer)
        self.entries.move_to_end(key)
        if len(self.entries) > self.MAX:
            self.entries.popitem(last=False)

    def forget(self, key: _Seen) -> None:
        self.entries.pop(key, None)


def _accepted(runtime: Runtime) -> AcceptedNotices:
    seen = runtime.services.get("notifications.accepted")
    if not isinstance(seen, AcceptedNotices):
        seen = runtime.services["notifications.accepted"] = AcceptedNotices()
    return seen


def _repeat_counter(runtime: Runtime) -> GroupCommit[tuple[RepeatKey, datetime], bool | Applied]:
    return shared(
        runtime,
        "notifications.repeats",
        lambda: GroupCommit(
            runtime,
            "notification repeat(s)",
            _count_repeats,
            Outcomes(unavailable=UNAVAILABLE, busy=BUSY, stopped=NOT_STORED),
            limit=runtime.settings.notify.queue_limit,
            on_busy=lambda _item: DROPPED.labels("repeat", "busy").inc(),
            durable=False,
        ),
    )


def _count_busy(item: _Pending) -> None:
    DROPPED.labels(item.row["channel"], "busy").inc()


def _group_commit(runtime: Runtime) -> GroupCommit[_Pending, Applied]:
    """The notices of this process, applied in batches (`mallgate.db.group_commit`).

    The queue holds at most `notify.queue_limit` notices; beyond that a notice is answered
    failure ("busy") at once, and the platform sends it again later.
    """
    return shared(
        runtime,
        "notifications.group_commit",
        lambda: GroupCommit(
            runtime,
            "notification(s)",
            _store_and_apply,
            Outcomes(unavailable=UNAVAILABLE, busy=BUSY, stopped=NOT_STORED),
            limit=runtime.settings.notify.queue_limit,
            on_busy=_count_busy,
        ),
    )


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
    *,
    compact: bool = True,
    signed_in_bytes: bool = False,
) -> Applied:
    """Verify, store and apply one notification; answers after the commit; never raises.

    `claim` reads the order number a notice claims without trusting it, for filing refused ones.
    `compact=False` (a replay) stores the notice in full even when it repeats one stored before.
    `signed_in_bytes`: the signature is inside the query string and body, and nothing else
    (no timestamp header) decides whether the notice is believed.
    """
    now = runtime.clock.utcnow().replace(tzinfo=None)
    raw_key = _raw_key(raw) if compact else None
    if raw_key is not None and signed_in_bytes:
        # The same bytes as a notice verified and accepted before: the same signature, so
        # verifying them again could only say what it said then.
        repeated = await _repeat(runtime, (raw_key, None), now)
        if repeated is not None:
            return repeated
    judged = _judge(runtime, raw, decode, claim, now)
    if isinstance(judged, Applied):  # OVER_BUDGET
        DROPPED.labels(raw.channel, "rate_limited").inc()
        return judged
    row, event, result = judged
    seen: _Seen | None = None
    if raw_key is not None and event is not None:
        seen = (raw_key, None) if signed_in_bytes else (raw_key, event)
        if not signed_in_bytes and (repeated := await _repeat(runtime, seen, now)) is not None:
            return repeated
    result = await _group_commit(runtime).submit(_Pending(row, event, result, now, compact))
    if seen is not None and result.accepted and (stored := _repeat_key(row)) is not None:
        _accepted(runtime).add(seen, stored, result)
    if not result.accepted and result is not BUSY:  # busy is counted, and logged by the group commit
        log.warning("%s notification refused: %s %s", raw.channel, result.outcome, result.reason)
    return result


async def _repeat(runtime: Runtime, seen: _Seen, now: datetime) -> Applied | None:
    """The answer to a repeat of an accepted notice once it is counted; None if it is not one."""
    found = _accepted(runtime).get(seen)
    if found is None:
        return None
    row, answer = found
    counted = await _repeat_counter(runtime).submit((row, now))
    if counted is True:
        return answer
    if isinstance(counted, Applied):  # the database failed or the queue is full: not counted
        return counted
    _accepted(runtime).forget(seen)  # its row is gone (pruned): stored again, in full
    return None


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
