"""Handling an Official Account push once, within WeChat's deadline: dedupe, referrer, reply.

WeChat re-sends a push it got no answer to within 5 s, three times. Each push is claimed by
inserting its dedupe key (MsgId, or FromUserName + CreateTime for events) into
``wechat_pushes`` under a unique constraint, so exactly one worker on one machine handles it;
a retry that loses the race answers the reply stored for the first delivery once there is one,
else ``success``. The handling runs as a task: past ``reply_deadline_seconds`` the push is
answered ``success`` and the task finishes in the background (the customer-service API would
carry a late reply; this service sends none).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mallgate.channels.wechat_messages import (
    Event,
    Push,
    ScanEvent,
    SubscribeEvent,
    TextMessage,
    UnsubscribeEvent,
    reply_xml,
)
from mallgate.db.group_commit import GroupCommit, Outcomes, shared
from mallgate.db.models import WechatFollower, WechatPush, table_of
from mallgate.runtime import Runtime
from mallgate.services import replies
from mallgate.services.replies import Reply

log = logging.getLogger("mallgate.wechat_push")

KEEP: Final = timedelta(days=2)  # far beyond WeChat's retries (about 15 s)
PRUNE_EVERY: Final = 256
_SERVICE: Final = "wechat_push"


@dataclass
class _State:
    """Per process: the handling tasks still running, and when to prune old keys."""

    tasks: set[asyncio.Task[str]] = field(default_factory=set)
    claims: int = 0


def _state(runtime: Runtime) -> _State:
    state = runtime.services.get(_SERVICE)
    if state is None:
        state = runtime.services[_SERVICE] = _State()
    assert isinstance(state, _State)
    return state


def _now(runtime: Runtime) -> datetime:
    return runtime.clock.utcnow().replace(tzinfo=None)


def push_type(push: Push) -> str:
    return f"event:{push.event}" if isinstance(push, Event) else push.msg_type


def key_hash(push: Push) -> str:
    return hashlib.sha256(push.dedupe_key().encode("utf-8")).hexdigest()


class NotClaimed(Exception):
    """The push could not be claimed (the database failed, or the queue was full): not handled."""


_FIRST, _RETRY, _UNAVAILABLE, _BUSY, _STOPPED = "first", "retry", "unavailable", "busy", "stopped"


_PUSHES = table_of(WechatPush)
_INSERT_PUSH = insert(_PUSHES)


def _claim_batch(session: Session, rows: list[dict[str, Any]]) -> list[str]:
    """Claims each row's key not taken yet, in the caller's transaction: first or retry, in order.

    On SQLite the write transaction excludes every other writer, so the read of the keys taken
    holds until the commit. On PostgreSQL and MySQL another worker may insert one of these keys
    meanwhile: the INSERT then fails, and the group commit claims each push alone, where that
    failure means the other worker has it (`_lost_race`).
    """
    taken = _taken(session, [row["dedupe_key"] for row in rows])
    fresh: list[dict[str, Any]] = []
    results: list[str] = []
    for row in rows:
        if row["dedupe_key"] in taken:  # a retry, perhaps of a push in this very batch
            results.append(_RETRY)
            continue
        taken.add(row["dedupe_key"])
        fresh.append(row)
        results.append(_FIRST)
    if fresh:
        session.connection().execute(_INSERT_PUSH, fresh)
    return results


# Built once: constructing the statement cost more than running it.
_TAKEN = select(_PUSHES.c.dedupe_key).where(_PUSHES.c.dedupe_key.in_(bindparam("keys", expanding=True)))


def _taken(session: Session, keys: list[str]) -> set[str]:
    return set(session.connection().scalars(_TAKEN, {"keys": keys}))


def _lost_race(_row: dict[str, Any], exc: Exception) -> str | None:
    return _RETRY if isinstance(exc, IntegrityError) else None


def _claims(runtime: Runtime) -> GroupCommit[dict[str, Any], str]:
    """This process's claims, committed in batches, without waiting for the disk (bookkeeping)."""
    return shared(
        runtime,
        "wechat_push.claims",
        lambda: GroupCommit(
            runtime,
            "wechat push claim(s)",
            _claim_batch,
            Outcomes(unavailable=_UNAVAILABLE, busy=_BUSY, stopped=_STOPPED),
            limit=runtime.settings.notify.queue_limit,
            alone_failed=_lost_race,
            durable=False,
        ),
    )


async def claim(
    runtime: Runtime, key: str, push: Push, *, reply: str | None = None, outcome: str = "handling"
) -> bool:
    """True for the first delivery of `key` on any worker or machine; False for a retry.

    With `reply`, the push is claimed already answered (one write instead of two). Raises
    `NotClaimed` when the database could not say: the push is then not handled, and the
    answer is not `success`, so WeChat sends it again.
    """
    now = _now(runtime)
    row = {
        "dedupe_key": key,
        # The registry's name of its class: "generic:<type>" when the registry had none.
        "msg_type": (push.type_key or "generic:" + push_type(push))[:32],
        "from_user": push.from_user[:64],
        "received_at": now,
        "outcome": outcome,
        "reply": reply,
        "finished_at": now if reply is not None else None,
    }
    result = await _claims(runtime).submit(row)
    if result not in (_FIRST, _RETRY):
        raise NotClaimed(result)
    if result == _RETRY:
        return False
    state = _state(runtime)
    state.claims += 1
    if state.claims % PRUNE_EVERY == 0:
        cutoff = _now(runtime) - KEEP
        await runtime.db.run_write(
            lambda session: session.execute(delete(WechatPush).where(WechatPush.received_at < cutoff)),
            durable=False,
        )
    return True


async def earlier_reply(runtime: Runtime, key: str) -> str:
    """The reply the first delivery of `key` got; "" (success) while it is still being handled."""
    async with runtime.db.read() as session:
        reply = await session.scalar(select(WechatPush.reply).where(WechatPush.dedupe_key == key))
    return reply or ""


async def _finish(runtime: Runtime, key: str, reply: str, outcome: str) -> None:
    change = (
        update(WechatPush)
        .where(WechatPush.dedupe_key == key)
        .values(reply=reply, outcome=outcome, finished_at=_now(runtime))
    )
    await runtime.db.run_write(lambda session: session.execute(change), durable=False)


# ---------------------------------------------------------------------------------------------
# what a push does


async def record_follower(runtime: Runtime, push: Push, scene: str) -> bool:
    """Notes a follower; a new one keeps `scene` as its referrer. True when the follower is new.

    A follower seen before keeps the referrer it came with: a later QR never rewrites it.
    """
    app_id = runtime.settings.wechat_mp.app_id or push.to_user
    now = _now(runtime)
    try:
        async with runtime.db.transaction() as session:
            session.add(
                WechatFollower(
                    app_id=app_id, openid=push.from_user[:64], referrer=scene[:128], subscribed_at=now
                )
            )
        return True
    except IntegrityError:
        pass
    if isinstance(push, SubscribeEvent):
        async with runtime.db.transaction() as session:
            await session.execute(
                update(WechatFollower)
                .where(WechatFollower.app_id == app_id, WechatFollower.openid == push.from_user[:64])
                .values(unsubscribed_at=None)
            )
    return False


async def record_unfollow(runtime: Runtime, push: Push) -> None:
    app_id = runtime.settings.wechat_mp.app_id or push.to_user
    async with runtime.db.transaction() as session:
        await session.execute(
            update(WechatFollower)
            .where(WechatFollower.app_id == app_id, WechatFollower.openid == push.from_user[:64])
            .values(unsubscribed_at=_now(runtime))
        )


async def find_reply(runtime: Runtime, push: Push) -> Reply | None:
    """The auto-reply for `push`: a keyword rule for a text, the welcome for a follow."""
    if isinstance(push, TextMessage):
        return (await replies.current_rules(runtime)).keyword_reply(push.content)
    if isinstance(push, SubscribeEvent):
        return (await replies.current_rules(runtime)).welcome
    return None


async def handle(runtime: Runtime, push: Push) -> str:
    """What `push` does, and the plaintext reply XML to it ("" for `success`)."""
    if isinstance(push, SubscribeEvent | ScanEvent):
        # A SCAN comes from someone already following: a referrer only when we never saw them.
        await record_follower(runtime, push, push.scene)
    elif isinstance(push, UnsubscribeEvent):
        await record_unfollow(runtime, push)
    reply = await find_reply(runtime, push)
    if reply is None:
        return ""
    return reply_xml(push, reply.reply_type, reply.content, now=runtime.clock.now())


@dataclass
class _Late:
    answered: bool = False


async def _receive_message(runtime: Runtime, key: str, push: Push, late: _Late) -> str:
    """A user's message changes nothing but its reply, so the reply is found first and the push
    claimed with it in one write: under SQLite's single writer, one commit a push instead of two."""
    name = push_type(push)
    try:
        reply, outcome = await handle(runtime, push), "replied"
    except Exception:
        log.exception("wechat push %s from %s: handling failed, answered success", name, push.from_user)
        reply, outcome = "", "failed"
    if not await claim(runtime, key, push, reply=reply, outcome=outcome):
        return await earlier_reply(runtime, key)
    if late.answered and reply:
        # As below: WeChat got `success`, and so do its retries (rare: only past the deadline).
        log.info("wechat push %s: handled after the deadline (answered success)", name)
        await _finish(runtime, key, "", "late")
        return ""
    return reply


async def _receive_once(runtime: Runtime, key: str, push: Push, late: _Late) -> str:
    if not isinstance(push, Event):
        return await _receive_message(runtime, key, push, late)
    if not await claim(runtime, key, push):
        return await earlier_reply(runtime, key)
    name = push_type(push)
    try:
        reply = await handle(runtime, push)
    except Exception:
        log.exception("wechat push %s from %s: handling failed, answered success", name, push.from_user)
        await _finish(runtime, key, "", "failed")
        return ""
    # A reply made after the deadline was never delivered: WeChat got `success`, and so do retries.
    if late.answered:
        log.info("wechat push %s: handled after the deadline (answered success)", name)
        reply = ""
    await _finish(runtime, key, reply, "late" if late.answered else "replied")
    return reply


def _settled(tasks: set[asyncio.Task[str]]) -> Callable[[asyncio.Task[str]], None]:
    def settled(task: asyncio.Task[str]) -> None:
        tasks.discard(task)
        # Failing after the deadline (the database gone), nobody awaits it: said here, not lost.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("wechat push: not handled (%s: %s)", type(exc).__name__, exc)

    return settled


async def receive(runtime: Runtime, push: Push) -> str:
    """The plaintext reply to `push` ("" = `success`), within the deadline, handled once.

    The deadline covers the claim too: a database slow to take it must not hold the answer.
    """
    key = key_hash(push)
    late = _Late()
    task = asyncio.create_task(_receive_once(runtime, key, push, late))
    tasks = _state(runtime).tasks
    tasks.add(task)  # a task nobody references may be collected before it is done
    task.add_done_callback(_settled(tasks))
    try:
        return await asyncio.wait_for(asyncio.shield(task), runtime.settings.wechat_mp.reply_deadline_seconds)
    except TimeoutError:
        late.answered = True
        return ""


async def drain(runtime: Runtime, *, within: float) -> None:
    """Waits up to `within` seconds for the handling still running in the background (shutdown)."""
    tasks = list(_state(runtime).tasks)
    if tasks:
        await asyncio.wait(tasks, timeout=within)
