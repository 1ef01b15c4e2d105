"""Small writes that arrive together, committed in one transaction: one commit, one fsync.

A durable commit costs far more than the work inside it (an fsync, 0.3–5 ms on SQLite),
and SQLite takes one writer at a time, so one commit per request caps a server at a few
hundred to a few thousand writes a second however many workers it has. While one batch
commits, the next requests queue; the following batch takes them all. If a batch's
transaction fails, each of its items is tried again in a transaction of its own, so one
that spoils the batch (a constraint, a race with another worker) leaves the others to go
through. No caller hears its result before the commit, and every caller hears something:
whatever fails, each waiting future is resolved.

The queue is bounded: past `limit` items waiting (the batch being written not counted) an
item is answered `busy` at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mallgate.runtime import Runtime

log = logging.getLogger("mallgate.db")

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Outcomes(Generic[Result]):
    """What a caller hears when its item was not written as asked."""

    unavailable: Result  # the database failed (or a bug): nothing of the item was stored
    busy: Result  # the queue was full: turned away without trying
    stopped: Result  # the group commit was cancelled (the loop shutting down)


class GroupCommit(Generic[Item, Result]):
    MAX_BATCH = 128

    def __init__(
        self,
        runtime: Runtime,
        what: str,
        write: Callable[[Session, list[Item]], Sequence[Result]],
        outcomes: Outcomes[Result],
        *,
        limit: int,
        on_busy: Callable[[Item], None] | None = None,
        alone_failed: Callable[[Item, Exception], Result | None] | None = None,
        durable: bool = True,
    ) -> None:
        """`write(session, batch)` does the batch's work in the caller's transaction, one result each.

        `what` names the items in log lines ("notification(s)"). `alone_failed` maps an
        exception of an item retried alone to its result (None: it is unavailable).
        `durable` as in `Database.run_write`.
        """
        self.runtime = runtime
        self.what = what
        self.write = write
        self.outcomes = outcomes
        self.limit = limit
        self.on_busy = on_busy
        self.alone_failed = alone_failed
        self.durable = durable
        self.queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self.draining = False
        # The loop keeps only a weak reference to a task: this one must not vanish mid-batch.
        self.task: asyncio.Task[None] | None = None
        self.busy_reported_at = float("-inf")

    async def submit(self, item: Item) -> Result:
        if len(self.queue) >= self.limit:
            if self.on_busy is not None:
                self.on_busy(item)
            now = asyncio.get_running_loop().time()
            if now - self.busy_reported_at >= 60:  # one line a minute, not one per item turned away
                log.warning("%s queue full (%d waiting): answering busy", self.what, len(self.queue))
                self.busy_reported_at = now
            return self.outcomes.busy
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Result] = loop.create_future()
        self.queue.append((item, done))
        if not self.draining:
            self.draining = True
            self.task = loop.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self.queue:
                batch, self.queue = self.queue[: self.MAX_BATCH], self.queue[self.MAX_BATCH :]
                _resolve(batch, await self._commit([item for item, _ in batch]))
                batch = []
        except BaseException as exc:
            # Cancelled (the loop shutting down) or a bug: nobody may wait for an answer forever.
            log.error("%s group commit stopped: %s", self.what, type(exc).__name__)
            waiting, self.queue = batch + self.queue, []
            _resolve(waiting, [self.outcomes.stopped] * len(waiting))
            if not isinstance(exc, Exception):
                raise
        finally:
            self.draining = False

    async def _commit(self, batch: list[Item]) -> list[Result]:
        write = self.write
        try:
            # Connect timeouts bound a dead database; this bounds a wedged one, so the caller
            # hears "unavailable" instead of hanging on us.
            async with asyncio.timeout(self.runtime.settings.db_timeout_seconds + 3):
                try:
                    done = await self.runtime.db.run_write(lambda s: write(s, batch), durable=self.durable)
                    return list(done)
                except (TimeoutError, OSError):
                    raise  # the database is unreachable: one transaction each would only wait longer
                except Exception as exc:
                    if len(batch) == 1:
                        return [self._alone(batch[0], exc)]
                # One item spoiled the batch: give each its own transaction.
                return [await self._commit_one(item) for item in batch]
        except (TimeoutError, SQLAlchemyError, OSError) as exc:
            log.warning("%d %s not stored: %s", len(batch), self.what, type(exc).__name__)
        except Exception as exc:
            # Not a database failure: a bug. The type only; the message may carry SQL parameters.
            log.error("%d %s not stored: unexpected %s", len(batch), self.what, type(exc).__name__)
        return [self.outcomes.unavailable] * len(batch)

    async def _commit_one(self, item: Item) -> Result:
        write = self.write
        try:
            return (await self.runtime.db.run_write(lambda s: write(s, [item]), durable=self.durable))[0]
        except Exception as exc:
            return self._alone(item, exc)

    def _alone(self, item: Item, exc: Exception) -> Result:
        mapped = self.alone_failed(item, exc) if self.alone_failed is not None else None
        if mapped is not None:
            return mapped
        # The type only, as above. A bug in one item must not undo the others' answers.
        log.warning("1 of %s not stored: %s", self.what, type(exc).__name__)
        return self.outcomes.unavailable


def shared(
    runtime: Runtime, name: str, make: Callable[[], GroupCommit[Item, Result]]
) -> GroupCommit[Item, Result]:
    """The process's group commit called `name`, made by `make` on first use."""
    found = runtime.services.get(name)
    if isinstance(found, GroupCommit):
        return found
    made = runtime.services[name] = make()
    return made


def _resolve(items: list[tuple[Item, asyncio.Future[Result]]], results: list[Result]) -> None:
    for (_, done), result in zip(items, results, strict=True):
        if not done.done():  # a caller that went away cancelled its future
            done.set_result(result)
