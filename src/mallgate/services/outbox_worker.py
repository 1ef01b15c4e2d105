"""The outbox worker: sends each outbox event through every sender that wants it.

A sender is one way out (the mall's webhook, a WeChat subscribe message). Each
(event, sender) pair is a delivery with its own attempts and backoff, recorded in
``outbox_deliveries``, so one event's webhook and subscribe message are retried
independently. Delivery is at least once: a crash between send and record sends
again, so every delivery carries the event id for the receiver to deduplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased

from mallgate.db.models import CacheEntry, OutboxDelivery, OutboxEvent, table_of
from mallgate.services.outbox_errors import DeliveryError, FinalError, TransientError

if TYPE_CHECKING:
    from mallgate.runtime import Runtime
    from mallgate.settings import OutboxSettings

__all__ = [
    "DeliveryError",
    "Event",
    "FinalError",
    "Sender",
    "TransientError",
    "register_sender",
    "registered_senders",
    "unregister_sender",
]


@dataclass(frozen=True)
class Event:
    """One outbox row as a sender sees it."""

    id: int
    topic: str
    payload: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, id: int, topic: str, payload: str, created_at: datetime) -> Event:
        return cls(id=id, topic=topic, payload=json.loads(payload), created_at=created_at)


@runtime_checkable
class Sender(Protocol):
    """One way out. `name` is stored with each delivery: keep it short and stable."""

    name: str

    def wants(self, event: Event) -> bool:
        """Whether this event is for this sender (usually by `event.topic`); no I/O."""
        ...

    async def send(self, runtime: Runtime, event: Event) -> None:
        """Deliver once; raise TransientError (retried with backoff) or FinalError (given up)."""
        ...


# Senders are plugged in at import time by the modules that provide them; the worker reads
# this registry at each pass, so a sender registered later is used from the next pass on.
_SENDERS: dict[str, Sender] = {}


def register_sender(sender: Sender) -> None:
    """Adds (or replaces, by name) a sender."""
    _SENDERS[sender.name] = sender


def unregister_sender(name: str) -> None:
    _SENDERS.pop(name, None)


def registered_senders() -> list[Sender]:
    return list(_SENDERS.values())


# --- the worker ---

RUNNER_KEY: Final = "outbox:runner"
SERVICE_KEY: Final = "outbox_worker"
PENDING: Final = "pending"
SENT: Final = "sent"
FAILED: Final = "failed"
# After a first full scan of the retry window, each pass looks back only this far for new events:
# an event's transaction may commit a little after a later one's, never minutes after.
_RESCAN_SECONDS: Final = 300.0
_PLAN_PAGE: Final = 500
_ID_PAGE: Final = 5000
# "Due now" is written a second early: MySQL's DATETIME keeps whole seconds and may round up.
_DUE_SLACK: Final = 1.0
log = logging.getLogger("mallgate.outbox")


def naive(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC).replace(tzinfo=None)


def seconds(at: datetime) -> float:
    return at.replace(tzinfo=UTC).timestamp()


def backoff(settings: OutboxSettings, attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Exponential from `backoff_first_seconds`, capped, with jitter so retries do not march in step."""
    delay = min(settings.backoff_max_seconds, settings.backoff_first_seconds * 2.0 ** max(attempts - 1, 0))
    return delay * (0.5 + rand() / 2)


def ordering_key(event: Event) -> str:
    order_no = event.payload.get("order_no")
    return str(order_no)[:64] if order_no else ""


def configured_senders(runtime: Runtime) -> list[Sender]:
    """The registry's senders plus the webhook, when the operator (or the sandbox) gave its URL."""
    from mallgate.channels.webhook import WebhookSender

    senders = registered_senders()
    hook = runtime.settings.webhook
    if hook.url:
        senders.append(WebhookSender(hook.url, hook.secret, hook.timeout_seconds))
    return senders


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    sender: str
    attempts: int
    give_up_at: datetime
    event: Event


@dataclass(frozen=True)
class Outcome:
    delivery_id: int
    state: str
    error: str
    retry_at: float | None = None


D = OutboxDelivery
_EVENT = select(OutboxEvent.id, OutboxEvent.topic, OutboxEvent.payload, OutboxEvent.created_at)


def _insert_one(statement: Any, row: dict[str, Any], session: Session) -> None:
    session.execute(statement, [row])


_EARLIER = aliased(OutboxDelivery)


class OutboxWorker:
    """Plans, claims and sends deliveries. `run` is the loop `serve` starts in every process;
    only the holder of the runner lease does any work."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        senders: Callable[[], list[Sender]] | None = None,
        lease_key: str = RUNNER_KEY,
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings.outbox
        self._senders = senders or (lambda: configured_senders(runtime))
        self.lease_key = lease_key
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._scanned_from: float | None = None
        # Event id -> created_at of the events in the rescan window this worker has planned
        # for every sender in `_planned_for`.
        self._planned: dict[int, datetime] = {}
        self._planned_for: frozenset[str] = frozenset()
        self._row_made = False

    def now(self) -> float:
        return self.runtime.clock.now()

    # --- the loop ---

    async def run(self) -> None:
        try:
            while True:
                busy = False
                try:
                    if await self.take_lease():
                        busy = await self._renewing(self.run_once()) >= self.settings.batch
                except asyncio.CancelledError:
                    raise
                except Exception:  # a database blip must not end the worker for the process's life
                    log.exception("outbox pass failed")
                if not busy:
                    await asyncio.sleep(self.settings.poll_seconds)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.release_lease())

    async def _renewing(self, work: Awaitable[int]) -> int:
        """`work` with the lease renewed beside it: a pass of slow receivers outlasts one lease."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.settings.lease_seconds / 3)
                with contextlib.suppress(Exception):  # lost or unreachable: the claims still hold
                    await self.take_lease()

        renewer = asyncio.create_task(renew())
        try:
            return await work
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def run_once(self) -> int:
        """One pass: new events become deliveries, due ones are claimed and sent. Returns how many."""
        senders = {s.name: s for s in self._senders()}
        if not senders:
            return 0
        await self.plan(list(senders.values()))
        claimed = await self.claim(list(senders))
        if claimed:
            limit = asyncio.Semaphore(self.settings.concurrency)

            async def one(item: Claimed) -> Outcome:
                async with limit:
                    return await self.attempt(senders[item.sender], item)

            # One write records the whole pass: a crash before it sends these again (at least once).
            await self.record(await asyncio.gather(*(one(item) for item in claimed)))
        return len(claimed)

    # --- the runner lease (a cache_entries row) ---

    async def _ensure_row(self) -> None:
        if self._row_made:
            return

        def insert(session: Session) -> None:
            if session.get(CacheEntry, self.lease_key) is None:
                session.add(CacheEntry(key=self.lease_key, value="", expires_at=None))

        with contextlib.suppress(IntegrityError):  # another worker made it first
            await self.runtime.db.run_write(insert)
        self._row_made = True

    async def take_lease(self) -> bool:
        """Takes or renews the lease; False while another live runner holds it."""
        await self._ensure_row()
        now = self.now()
        free = (
            CacheEntry.lease_until.is_(None)
            | (CacheEntry.lease_until < naive(now))
            | (CacheEntry.lease_owner == self.owner)
        )
        statement = (
            update(CacheEntry)
            .where(CacheEntry.key == self.lease_key, free)
            .values(lease_owner=self.owner, lease_until=naive(now + self.settings.lease_seconds))
            .execution_options(synchronize_session=False)
        )

        def take(session: Session) -> bool:
            return session.execute(statement).rowcount == 1  # type: ignore[attr-defined, no-any-return]

        return await self.runtime.db.run_write(take)

    async def release_lease(self) -> None:
        statement = (
            update(CacheEntry)
            .where(CacheEntry.key == self.lease_key, CacheEntry.lease_owner == self.owner)
            .values(lease_owner=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        await self.runtime.db.run_write(lambda session: session.execute(statement))

    # --- planning: one delivery per (event, sender that wants it) ---

    async def plan(self, senders: list[Sender]) -> None:
        now = self.now()
        floor = now - self.settings.retry_for_seconds
        if self._scanned_from is not None:
            # min(): a clock set back finds its events too.
            floor = max(floor, min(self._scanned_from, now - _RESCAN_SECONDS))
        names = [s.name for s in senders]
        if frozenset(names) != self._planned_for:
            # A sender came (or went): every event in the window is looked at again, for it.
            self._planned.clear()
            self._planned_for = frozenset(names)
        after = 0
        while True:
            # Ids first: the events this worker already planned are passed over without their
            # payloads or deliveries read again, each pass rescanning minutes of events.
            async with self.runtime.db.read() as session:
                page = list(
                    (
                        await session.execute(
                            select(OutboxEvent.id)
                            .where(OutboxEvent.created_at >= naive(floor), OutboxEvent.id > after)
                            .order_by(OutboxEvent.id)
                            .limit(_ID_PAGE)
                        )
                    ).scalars()
                )
            if not page:
                break
            fresh = [i for i in page if i not in self._planned]
            for start in range(0, len(fresh), _PLAN_PAGE):
                await self._plan_events(fresh[start : start + _PLAN_PAGE], senders, names, now)
            after = page[-1]
            if len(page) < _ID_PAGE:
                break
        self._scanned_from = now - _RESCAN_SECONDS
        # Below the next pass's floor they are not read again anyway (and a clock set back only
        # costs a full reading of those events, the deliveries being the truth).
        horizon = naive(self._scanned_from)
        self._planned = {i: at for i, at in self._planned.items() if at >= horizon}

    async def _plan_events(self, ids: list[int], senders: list[Sender], names: list[str], now: float) -> None:
        async with self.runtime.db.read() as session:
            rows = (
                await session.execute(_EVENT.where(OutboxEvent.id.in_(ids)).order_by(OutboxEvent.id))
            ).all()
            found = await session.execute(
                select(D.event_id, D.sender).where(D.event_id.in_(ids), D.sender.in_(names))
            )
            known = {(row[0], row[1]) for row in found}
        new = []
        for row in rows:
            event = Event.from_row(*row)
            for sender in senders:
                if (event.id, sender.name) not in known and sender.wants(event):
                    new.append(self._delivery(event, sender.name, now))
        await self._insert(new)
        # Only once its deliveries are written: a failed insert leaves the events to the next pass.
        self._planned.update((row[0], row[3]) for row in rows)

    def _delivery(self, event: Event, sender: str, now: float) -> dict[str, Any]:
        return {
            "event_id": event.id,
            "sender": sender,
            "ordering_key": ordering_key(event),
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": naive(now - _DUE_SLACK),
            "give_up_at": naive(seconds(event.created_at) + self.settings.retry_for_seconds),
            "last_error": "",
            "created_at": naive(now),
            "sent_at": None,
        }

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        statement = insert(table_of(OutboxDelivery))
        try:
            await self.runtime.db.run_write(lambda session: session.execute(statement, rows))
        except IntegrityError:
            # Planned meanwhile by a worker that briefly held the lease too: row by row, the rest.
            for row in rows:
                with contextlib.suppress(IntegrityError):
                    await self.runtime.db.run_write(functools.partial(_insert_one, statement, row))

    # --- claiming: due deliveries, pushed out of reach for `claim_seconds` ---

    async def claim(self, names: list[str]) -> list[Claimed]:
        now = naive(self.now())
        until = naive(self.now() + self.settings.claim_seconds)
        earlier_pending = (
            select(_EARLIER.id)
            .where(
                _EARLIER.sender == D.sender,
                _EARLIER.ordering_key == D.ordering_key,
                _EARLIER.event_id < D.event_id,
                _EARLIER.state == PENDING,
            )
            .exists()
        )
        query = (
            select(D.id, D.event_id, D.sender, D.attempts, D.give_up_at)
            .where(
                D.state == PENDING,
                D.next_attempt_at <= now,
                D.sender.in_(names),
                (D.ordering_key == "") | ~earlier_pending,
            )
            .order_by(D.id)
            .limit(self.settings.batch)
        )

        def take(session: Session) -> list[tuple[int, int, str, int, datetime]]:
            bound = query
            dialect = session.get_bind().dialect.name
            # Rows another runner is claiming are passed over, not waited for (MariaDB 10.6+ too).
            if dialect == "postgresql":
                bound = query.with_for_update(skip_locked=True, of=D)
            elif dialect in ("mysql", "mariadb"):
                bound = query.with_for_update(skip_locked=True)
            taken = []
            for row in session.execute(bound):
                # The conditional UPDATE is the claim on every database: of two workers, one wins.
                won = session.execute(
                    update(D)
                    .where(D.id == row[0], D.state == PENDING, D.next_attempt_at <= now)
                    .values(attempts=D.attempts + 1, next_attempt_at=until)
                    .execution_options(synchronize_session=False)
                )
                if won.rowcount == 1:  # type: ignore[attr-defined]
                    taken.append((row[0], row[1], row[2], row[3] + 1, row[4]))
            return taken

        try:
            taken = await self.runtime.db.run_write(take)
        except OperationalError as exc:
            # A deadlock with a runner that briefly held the lease too: its claims stand, ours wait.
            log.info("outbox claim gave way: %s", type(exc.orig).__name__)
            return []
        if not taken:
            return []
        async with self.runtime.db.read() as session:
            events = {
                row[0]: Event.from_row(*row)
                for row in await session.execute(_EVENT.where(OutboxEvent.id.in_({t[1] for t in taken})))
            }
        return [Claimed(t[0], t[2], t[3], t[4], events[t[1]]) for t in taken if t[1] in events]

    # --- sending and recording ---

    async def deliver(self, sender: Sender, item: Claimed) -> str:
        """Sends one claimed delivery and records the outcome; returns the new state."""
        outcome = await self.attempt(sender, item)
        await self.record([outcome])
        return outcome.state

    async def attempt(self, sender: Sender, item: Claimed) -> Outcome:
        try:
            await sender.send(self.runtime, item.event)
        except FinalError as exc:
            return Outcome(item.delivery_id, FAILED, str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            raise  # the claim runs out and another pass sends it
        except Exception as exc:
            reason = str(exc) if isinstance(exc, TransientError) else f"{type(exc).__name__} (unexpected)"
            if not isinstance(exc, TransientError):
                log.exception("outbox sender %s raised", sender.name)
            if self.now() >= seconds(item.give_up_at):
                return Outcome(item.delivery_id, FAILED, f"gave up after {item.attempts} attempts: {reason}")
            retry_at = self.now() + backoff(self.settings, item.attempts)
            return Outcome(item.delivery_id, PENDING, reason or "transient", retry_at)
        return Outcome(item.delivery_id, SENT, "")

    async def record(self, outcomes: list[Outcome]) -> None:
        now = naive(self.now())
        statements = []
        for outcome in outcomes:
            values: dict[str, Any] = {"state": outcome.state, "last_error": outcome.error[:255]}
            if outcome.state == SENT:
                values["sent_at"] = now
            if outcome.retry_at is not None:
                values["next_attempt_at"] = naive(outcome.retry_at)
            statements.append(
                update(D)
                .where(D.id == outcome.delivery_id, D.state == PENDING)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

        def write(session: Session) -> None:
            for statement in statements:
                session.execute(statement)

        await self.runtime.db.run_write(write)


# --- started by the app's lifespan ---


def start(runtime: Runtime) -> asyncio.Task[None] | None:
    if not runtime.settings.outbox.enabled:
        return None
    worker = OutboxWorker(runtime)
    runtime.services[SERVICE_KEY] = worker
    return asyncio.create_task(worker.run(), name="mallgate-outbox")


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- what the operator sees (`mallgate outbox list|show|retry`) ---


def _delivery_row(row: OutboxDelivery, topic: str) -> dict[str, Any]:
    return {
        "event_id": row.event_id,
        "topic": topic,
        "sender": row.sender,
        "state": row.state,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at if row.state == PENDING else None,
        "sent_at": row.sent_at,
        "last_error": row.last_error,
    }


async def list_deliveries(runtime: Runtime, *, state: str = "", limit: int = 50) -> list[dict[str, Any]]:
    """The newest deliveries, optionally of one state."""
    query = select(D, OutboxEvent.topic).join(OutboxEvent, OutboxEvent.id == D.event_id)
    if state:
        query = query.where(D.state == state)
    async with runtime.db.read() as session:
        rows = (await session.execute(query.order_by(D.event_id.desc(), D.sender).limit(limit))).all()
    return [_delivery_row(row[0], row[1]) for row in rows]


async def show_event(runtime: Runtime, event_id: int) -> dict[str, Any] | None:
    """One event, its payload and each sender's delivery; None when there is no such event."""
    async with runtime.db.read() as session:
        event = await session.get(OutboxEvent, event_id)
        if event is None:
            return None
        rows = (await session.execute(select(D).where(D.event_id == event_id).order_by(D.sender))).scalars()
        return {
            "id": event.id,
            "topic": event.topic,
            "created_at": event.created_at,
            "payload": json.loads(event.payload),
            "deliveries": [_delivery_row(row, event.topic) for row in rows],
        }


async def retry_event(runtime: Runtime, event_id: int) -> int:
    """Its failed deliveries are due again now, with a new retry window; returns how many.

    Pending ones are left alone: one may be on its way right now, and a second send beside
    it is what the claim exists to prevent.
    """
    now = runtime.clock.now()
    statement = (
        update(D)
        .where(D.event_id == event_id, D.state == FAILED)
        .values(
            state=PENDING,
            next_attempt_at=naive(now - _DUE_SLACK),
            give_up_at=naive(now + runtime.settings.outbox.retry_for_seconds),
        )
        .execution_options(synchronize_session=False)
    )

    def reset(session: Session) -> int:
        return session.execute(statement).rowcount  # type: ignore[attr-defined, no-any-return]

    return await runtime.db.run_write(reset)
