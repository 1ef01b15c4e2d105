"""The group commit, the non-durable write and the push claims built on them, on every database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from conftest import Backend, TestClock, free_port, make_settings
from mallgate.channels.wechat_messages import from_fields
from mallgate.db.group_commit import GroupCommit, Outcomes
from mallgate.runtime import Runtime
from mallgate.services import replies, wechat_push


@pytest.fixture
async def runtimes(backend: Backend, tmp_path: Path) -> AsyncIterator[list[Runtime]]:
    """Two runtimes on one database, as two worker processes have: each its own pool and queue."""
    made = [
        Runtime.create(make_settings(backend, tmp_path / f"var{n}", free_port(), sandbox=False), TestClock())
        for n in (1, 2)
    ]
    yield made
    for runtime in made:
        await runtime.close()


def _text_push(msg_id: int, content: str = "hello") -> Any:
    return from_fields(
        {
            "ToUserName": "gh_group_commit",
            "FromUserName": f"oGroup{msg_id}",
            "CreateTime": "1700000000",
            "MsgType": "text",
            "Content": content,
            "MsgId": str(msg_id),
        }
    )


def _count_writes(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    writes: list[int] = []
    real = runtime.db.run_write

    async def counted(work: Any, **kwargs: Any) -> Any:
        writes.append(1)
        return await real(work, **kwargs)

    monkeypatch.setattr(runtime.db, "run_write", counted)
    return writes


async def test_pushes_arriving_together_are_claimed_in_few_transactions(
    runtimes: list[Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtimes[0]
    writes = _count_writes(runtime, monkeypatch)
    base = 9_100_000_000 + free_port() * 1000
    pushes = [_text_push(base + n) for n in range(40)]
    claimed = await asyncio.gather(*(wechat_push.claim(runtime, wechat_push.key_hash(p), p) for p in pushes))
    assert claimed == [True] * 40
    # One commit per push would be 40; the first takes one push, the next all that waited.
    assert len(writes) <= 3, writes
    again = await asyncio.gather(*(wechat_push.claim(runtime, wechat_push.key_hash(p), p) for p in pushes))
    assert again == [False] * 40


async def test_one_push_twice_in_one_batch_is_claimed_once(runtimes: list[Runtime]) -> None:
    runtime = runtimes[0]
    push = _text_push(9_200_000_000 + free_port())
    key = wechat_push.key_hash(push)
    claimed = await asyncio.gather(*(wechat_push.claim(runtime, key, push) for _ in range(6)))
    assert sorted(claimed) == [False] * 5 + [True]


async def test_two_workers_racing_for_the_same_pushes_claim_each_once(runtimes: list[Runtime]) -> None:
    """The other worker's batch may insert a key between this batch's read and its insert
    (PostgreSQL, MySQL): that batch fails, its pushes are claimed alone, and the loser hears retry."""
    base = 9_300_000_000 + free_port() * 1000
    pushes = [_text_push(base + n) for n in range(30)]
    keys = [wechat_push.key_hash(p) for p in pushes]
    first, second = runtimes

    async def all_of(runtime: Runtime) -> list[bool]:
        claims = (wechat_push.claim(runtime, k, p) for k, p in zip(keys, pushes, strict=True))
        return list(await asyncio.gather(*claims))

    a, b = await asyncio.gather(all_of(first), all_of(second))
    assert [x + y for x, y in zip(a, b, strict=True)] == [1] * 30, (a, b)


async def test_a_key_inserted_between_the_read_and_the_insert_is_a_retry(
    runtimes: list[Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race above, made certain: the read misses a key the other worker has just committed."""
    first, second = runtimes
    base = 9_400_000_000 + free_port() * 1000
    pushes = [_text_push(base + n) for n in range(5)]
    keys = [wechat_push.key_hash(p) for p in pushes]
    assert await wechat_push.claim(first, keys[2], pushes[2])
    monkeypatch.setattr(wechat_push, "_taken", lambda _session, _keys: set())
    claims = (wechat_push.claim(second, k, p) for k, p in zip(keys, pushes, strict=True))
    assert list(await asyncio.gather(*claims)) == [True, True, False, True, True]


async def test_a_batch_spoiled_by_one_item_still_writes_the_others(runtimes: list[Runtime]) -> None:
    runtime = runtimes[0]

    def write(session: Session, batch: list[int]) -> list[str]:
        if -1 in batch:
            raise ValueError("spoils the batch")
        session.execute(text("SELECT 1"))
        return [f"ok {n}" for n in batch]

    outcomes = Outcomes(unavailable="unavailable", busy="busy", stopped="stopped")
    committer: GroupCommit[int, str] = GroupCommit(runtime, "test item(s)", write, outcomes, limit=100)
    got = await asyncio.gather(*(committer.submit(n) for n in (1, 2, -1, 3, 4)))
    assert got == ["ok 1", "ok 2", "unavailable", "ok 3", "ok 4"]
    full: GroupCommit[int, str] = GroupCommit(runtime, "test item(s)", write, outcomes, limit=2)
    answers = await asyncio.gather(*(full.submit(n) for n in range(6)))
    assert "busy" in answers and answers.count("busy") < 6


async def test_a_non_durable_write_does_not_wait_for_the_disk_and_leaves_the_pool_durable(
    runtimes: list[Runtime], backend: Backend
) -> None:
    db = runtimes[0].db
    if backend.name == "sqlite":
        ask = "PRAGMA synchronous"  # 1 NORMAL, 2 FULL
        lax, strict = 1, 2
    elif backend.name == "postgresql":
        ask = "SHOW synchronous_commit"
        lax, strict = "off", "on"
    else:
        pytest.skip("MySQL has no per-transaction durability switch: every commit stays durable")

    def setting(session: Session) -> Any:
        return session.execute(text(ask)).scalar()

    assert await db.run_write(setting, durable=False) == lax
    # Several rounds: every pooled connection must be back to durable after a lax one.
    for _ in range(5):
        assert await db.run_write(setting) == strict
        assert await db.run_write(setting, durable=False) == lax
    assert await asyncio.gather(*(db.run_write(setting) for _ in range(8))) == [strict] * 8


async def test_reply_rules_are_read_once_per_ttl_and_forgotten_on_change(runtimes: list[Runtime]) -> None:
    """Another worker's new rule shows here within RULES_TTL; this worker's own change at once."""
    here, other = runtimes
    word = f"ttl{free_port()}"
    clock = here.clock
    assert isinstance(clock, TestClock)
    assert (await replies.current_rules(here)).keyword_reply(word) is None
    async with other.db.transaction() as session:
        row = await replies.create_reply(
            session,
            other.clock.utcnow().replace(tzinfo=None),
            kind="keyword",
            match="exact",
            keyword=word,
            reply=replies.Reply("text", {"text": "new"}),
        )
    try:
        clock.advance(replies.RULES_TTL - 0.5)
        assert (await replies.current_rules(here)).keyword_reply(word) is None  # not read again yet
        clock.advance(1)
        found = (await replies.current_rules(here)).keyword_reply(word)
        assert found is not None and found.content == {"text": "new"}
        async with here.db.transaction() as session:
            await replies.delete_reply(session, row.id)
        replies.forget_rules(here)
        assert (await replies.current_rules(here)).keyword_reply(word) is None
    finally:
        async with other.db.transaction() as session:
            await replies.delete_reply(session, row.id)
