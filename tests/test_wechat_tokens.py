"""The shared access_token / jsapi_ticket: one fetch for many workers, compare-and-expire, one refresh.

The WeChat side is the sandbox's WeChat API stand-in in the test server, which counts
every call per app and endpoint in a file all processes share. Several workers are
real processes (``mallgate serve --workers 2``) pointed at that stand-in, on the test
server's database; two managers in this process stand for two workers at unit level.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update
from test_sandbox_payments import sandbox_state

from conftest import Server, free_port, other_server
from mallgate.channels.wechat_api import WechatApi, WechatApiError
from mallgate.db.models import CacheEntry
from mallgate.runtime import Runtime
from mallgate.sandbox.app import MOUNT, WECHAT_MP_APP_ID
from mallgate.sandbox.wechat_standin import (
    RESOURCE_KEY,
    STABLE,
    STABLE_FORCED,
    TICKET,
    TOKEN,
    WechatStandIn,
)
from mallgate.services.wechat_tokens import SERVICE_KEY, WechatApp, WechatTokens, ticket_key, token_key

MALLGATE = [sys.executable, "-m", "mallgate.cli"]
CONCURRENT = 20

# ---------------------------------------------------------------------------------------------
# helpers (test_share_config uses them too)


def standin(server: Server) -> WechatStandIn:
    found = sandbox_state(server).resources[RESOURCE_KEY]
    assert isinstance(found, WechatStandIn)
    return found


def runtime_of(server: Server) -> Runtime:
    runtime: Runtime = server.app.state.runtime
    return runtime


def oa_app(server: Server) -> WechatApp:
    mp = runtime_of(server).settings.wechat_mp
    return WechatApp(mp.app_id, mp.app_secret)


def counts(server: Server) -> dict[str, int]:
    return standin(server).book.counts(WECHAT_MP_APP_ID)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


async def cold_cache(server: Server) -> None:
    """No token or ticket anywhere: not in the shared store, not in the test server's memory."""
    runtime = runtime_of(server)
    runtime.services.pop(SERVICE_KEY, None)
    async with runtime.db.transaction() as session:
        await session.execute(delete(CacheEntry).where(CacheEntry.key.like("wechat:%")))


async def stored(server: Server, key: str) -> CacheEntry | None:
    async with runtime_of(server).db.read() as session:
        return (await session.execute(select(CacheEntry).where(CacheEntry.key == key))).scalar_one_or_none()


async def invalidate(client: httpx.AsyncClient, **body: Any) -> int:
    answer = await client.post(f"{MOUNT}/wechat/_test/invalidate", json=body)
    assert answer.status_code == 200
    killed: int = answer.json()["invalidated"]
    return killed


def manager(server: Server) -> WechatTokens:
    """A manager of its own (own memory, own locks): what another worker process would hold."""
    return WechatTokens(runtime_of(server))


@contextmanager
def workers(server: Server, tmp_path: Path, **extra: str) -> Iterator[str]:
    """`mallgate serve --workers 2` on the test server's database, its WeChat the test server's stand-in."""
    port = free_port()
    mp = runtime_of(server).settings.wechat_mp
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}
    env.update(
        {
            "MALLGATE_VAR_DIR": str(tmp_path / "var"),
            "MALLGATE_DATABASE_URL": server.backend.url
            or f"sqlite+aiosqlite:///{(server.settings.var_dir / 'mallgate.db').as_posix()}",
            "MALLGATE_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "MALLGATE_WECHAT__API_BASE": f"{server.url}{MOUNT}/wechat",
            "MALLGATE_WECHAT_MP__APP_ID": mp.app_id,
            "MALLGATE_WECHAT_MP__APP_SECRET": mp.app_secret,
            **extra,
        }
    )
    proc = subprocess.Popen(
        [*MALLGATE, "serve", "--port", str(port), "--workers", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {proc.stdout.read() if proc.stdout else b''!r}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("serve did not come up")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


async def many_share_configs(url: str, n: int = CONCURRENT) -> list[dict[str, Any]]:
    """n concurrent share/config requests, each on its own connection (so both workers get some)."""

    async def one(i: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await http.get("/api/share/config", params={"url": f"https://shop.example.com/p/{i}"})

    answers = await asyncio.gather(*(one(i) for i in range(n)))
    return [a.json() for a in answers]


# ---------------------------------------------------------------------------------------------
# several worker processes


async def test_twenty_requests_on_a_cold_cache_through_two_workers_fetch_once(
    server: Server, tmp_path: Path
) -> None:
    await cold_cache(server)
    before = counts(server)
    with workers(server, tmp_path) as url:
        bodies = await many_share_configs(url)
        assert all(b["status"] == 1 for b in bodies), bodies
        # The same ticket signed every page: the one the stand-in issued.
        ticket = standin(server).book.current_ticket(WECHAT_MP_APP_ID)
        from mallgate.channels.wechat_api import jsapi_signature

        for i, body in enumerate(bodies):
            data = body["data"]
            page = f"https://shop.example.com/p/{i}"
            assert data["signature"] == jsapi_signature(ticket, data["nonceStr"], data["timestamp"], page)
        # More requests on the warm cache fetch nothing.
        again = await many_share_configs(url)
        assert all(b["status"] == 1 for b in again)
    assert delta(before, counts(server)) == {STABLE: 1, TICKET: 1}


async def test_an_invalidated_token_is_refreshed_once_for_all_workers(
    server: Server, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    await cold_cache(server)
    # No memory copy in the workers: every request reads the shared store, as after the copies ran out.
    with workers(server, tmp_path, MALLGATE_WECHAT__TOKEN_LOCAL_SECONDS="0") as url:
        bodies = await many_share_configs(url)
        assert all(b["status"] == 1 for b in bodies)
        old = await stored(server, token_key(WECHAT_MP_APP_ID))
        assert old is not None and old.value
        # WeChat drops the token (someone forced a refresh); the ticket comes due at the same time.
        assert await invalidate(client, appid=WECHAT_MP_APP_ID) >= 1
        async with runtime_of(server).db.transaction() as session:
            await session.execute(
                update(CacheEntry)
                .where(CacheEntry.key == ticket_key(WECHAT_MP_APP_ID))
                .values(expires_at=datetime(1970, 1, 1))
            )
        before = counts(server)
        tickets_asked = standin(server).book.count(WECHAT_MP_APP_ID, TICKET, ok_only=False)
        bodies = await many_share_configs(url)
        assert all(b["status"] == 1 for b in bodies), bodies
        after = counts(server)
    # One getticket was refused (40001, not counted as a success), one token fetched, one ticket.
    assert delta(before, after) == {STABLE: 1, TICKET: 1}
    new = await stored(server, token_key(WECHAT_MP_APP_ID))
    assert new is not None and new.value != old.value
    assert standin(server).book.count(WECHAT_MP_APP_ID, TICKET, ok_only=False) - tickets_asked == 2


# ---------------------------------------------------------------------------------------------
# one process, two managers (two workers' memories)


async def test_two_concurrent_calls_failing_with_the_same_token_refresh_it_once(
    server: Server, client: httpx.AsyncClient
) -> None:
    await cold_cache(server)
    app = oa_app(server)
    first, second = manager(server), manager(server)
    token = await first.access_token(app)
    assert await second.access_token(app) == token  # from the store: no second fetch
    await invalidate(client, access_token=token)
    before = counts(server)
    used: list[str] = []

    async def work(access_token: str) -> str:
        used.append(access_token)
        return (await first.api.jsapi_ticket(access_token)).value

    results = await asyncio.gather(first.call(app, work), second.call(app, work))
    assert results[0] == results[1]
    assert delta(before, counts(server)) == {STABLE: 1, TICKET: 2}
    # Each failed once with the old token and succeeded with the one new token.
    new = [t for t in used if t != token]
    assert used.count(token) == 2 and len(set(new)) == 1 and len(new) == 2


async def test_compare_and_expire_leaves_a_newer_token_alone(server: Server) -> None:
    await cold_cache(server)
    app = oa_app(server)
    tokens = manager(server)
    current = await tokens.access_token(app)
    row = await stored(server, token_key(app.app_id))
    assert row is not None
    assert await tokens.expire_token(app, "an-older-token-another-worker-failed-with") is False
    kept = await stored(server, token_key(app.app_id))
    assert kept is not None and kept.value == current and kept.expires_at == row.expires_at
    assert await tokens.expire_token(app, current) is True
    expired = await stored(server, token_key(app.app_id))
    assert expired is not None and expired.expires_at is not None and expired.expires_at.year == 1970


async def test_a_token_wechat_still_hands_out_but_refuses_is_force_refreshed_once(
    server: Server, client: httpx.AsyncClient
) -> None:
    await cold_cache(server)
    app = oa_app(server)
    tokens = manager(server)
    token = await tokens.access_token(app)
    await invalidate(client, access_token=token, mode="refuse")
    before = counts(server)
    ticket = await tokens.call(app, lambda t: tokens.api.jsapi_ticket(t))
    assert ticket.value
    # Normal mode gave back the refused token, so the one forced refresh replaced it.
    assert delta(before, counts(server)) == {STABLE: 1, STABLE_FORCED: 1, TICKET: 1}
    assert await tokens.access_token(app) != token


async def test_an_error_other_than_a_refused_token_is_not_retried(server: Server) -> None:
    await cold_cache(server)
    app = oa_app(server)
    tokens = manager(server)
    calls: list[str] = []

    async def work(access_token: str) -> None:
        calls.append(access_token)
        raise WechatApiError(45009, "reach max api daily quota limit")

    with pytest.raises(WechatApiError):
        await tokens.call(app, work)
    assert len(calls) == 1


async def test_a_fresh_token_in_the_store_is_used_and_a_due_one_refreshed(server: Server) -> None:
    await cold_cache(server)
    app = oa_app(server)
    token = await manager(server).access_token(app)
    before = counts(server)
    assert await manager(server).access_token(app) == token
    assert delta(before, counts(server)) == {}
    # Inside the refresh margin: the next reader refreshes (stable_token's normal mode: same token).
    margin = runtime_of(server).settings.wechat.token_refresh_margin_seconds
    soon = runtime_of(server).clock.utcnow().replace(tzinfo=None).timestamp() + margin - 10
    async with runtime_of(server).db.transaction() as session:
        await session.execute(
            update(CacheEntry)
            .where(CacheEntry.key == token_key(app.app_id))
            .values(expires_at=datetime.fromtimestamp(soon, UTC).replace(tzinfo=None))
        )
    await manager(server).access_token(app)
    assert delta(before, counts(server)) == {STABLE: 1}


async def test_a_lease_held_by_another_worker_is_waited_for(server: Server) -> None:
    await cold_cache(server)
    app = oa_app(server)
    holder, waiter = manager(server), manager(server)
    started = asyncio.Event()
    release = asyncio.Event()
    real = holder.api.stable_token

    async def slow(app_id: str, secret: str, *, force_refresh: bool = False) -> Any:
        started.set()
        await release.wait()
        return await real(app_id, secret, force_refresh=force_refresh)

    holder.api.stable_token = slow  # type: ignore[method-assign]
    before = counts(server)
    first = asyncio.create_task(holder.access_token(app))
    await started.wait()
    second = asyncio.create_task(waiter.access_token(app))
    await asyncio.sleep(0.2)
    assert not second.done()  # waiting on the lease, not fetching
    release.set()
    assert await first == await second
    assert delta(before, counts(server)) == {STABLE: 1}


# ---------------------------------------------------------------------------------------------
# the stand-in as WeChat answers


async def test_the_standin_answers_as_wechat(server: Server, client: httpx.AsyncClient) -> None:
    base = f"{MOUNT}/wechat/cgi-bin"
    secret = runtime_of(server).settings.wechat_mp.app_secret
    api = WechatApi(f"{server.url}{MOUNT}/wechat", client)

    async def code(call: Any) -> int:
        with pytest.raises(WechatApiError) as caught:
            await call
        return caught.value.errcode

    assert await code(api.stable_token("wx00000000000000ff", secret)) == 40013
    assert await code(api.stable_token(WECHAT_MP_APP_ID, "not-a-secret")) == 40125
    # A well-formed but wrong secret: 40001, as getAccessToken's reference says.
    assert await code(api.stable_token(WECHAT_MP_APP_ID, "0" * 32)) == 40001
    assert await code(api.classic_token(WECHAT_MP_APP_ID, "0" * 32)) == 40001
    assert await code(api.classic_token("wx00000000000000ff", secret)) == 40013
    assert await code(api.jsapi_ticket("not-a-token")) == 40001
    refused = await client.post(
        f"{base}/stable_token", content=b"appid=x", headers={"Content-Type": "text/plain"}
    )
    assert refused.json()["errcode"] == 47001
    # An errmsg carries a request id: never compared literally.
    bad = (await client.get(f"{base}/token", params={"grant_type": "client_credential", "appid": "x"})).json()
    assert bad["errcode"] == 40013 and "rid:" in bad["errmsg"]
    # stable_token's normal mode: the same token; classic tokens are separate from it.
    await invalidate(client, appid=WECHAT_MP_APP_ID)  # a clean start, the forced-refresh window cleared
    one = await api.stable_token(WECHAT_MP_APP_ID, secret)
    two = await api.stable_token(WECHAT_MP_APP_ID, secret)
    classic = await api.classic_token(WECHAT_MP_APP_ID, secret)
    assert one.value == two.value != classic.value and 300 < two.expires_in <= 7200
    assert (await api.jsapi_ticket(classic.value)).value
    # Forced: a new token, the previous one dead at once; a second force within 30 s refreshes nothing.
    forced = await api.stable_token(WECHAT_MP_APP_ID, secret, force_refresh=True)
    assert forced.value != one.value
    assert await code(api.jsapi_ticket(one.value)) == 40001
    assert (await api.stable_token(WECHAT_MP_APP_ID, secret, force_refresh=True)).value == forced.value
    assert (await api.jsapi_ticket(forced.value)).value
    await invalidate(client, appid=WECHAT_MP_APP_ID)  # and the window is cleared for later tests
    assert TOKEN in counts(server)


async def test_the_console_shows_the_wechat_api_traffic(server: Server, client: httpx.AsyncClient) -> None:
    await cold_cache(server)
    await manager(server).access_token(oa_app(server))
    page = await client.get(f"{MOUNT}/")
    assert page.status_code == 200
    assert "WeChat API" in page.text and "stable_token" in page.text and WECHAT_MP_APP_ID in page.text
    # Tokens are shown cut short, never whole.
    token = await stored(server, token_key(WECHAT_MP_APP_ID))
    assert token is not None and token.value not in page.text


async def hold_lease(server: Server, key: str, *, value: str, expires_in: float, lease_for: float) -> None:
    """The row as another worker leaves it while it refreshes (or after it died, lease_for < 0)."""
    now = runtime_of(server).clock.now()

    def at(offset: float) -> datetime:
        return datetime.fromtimestamp(now + offset, UTC).replace(tzinfo=None)

    async with runtime_of(server).db.transaction() as session:
        await session.execute(delete(CacheEntry).where(CacheEntry.key == key))
        session.add(
            CacheEntry(
                key=key,
                value=value,
                expires_at=at(expires_in),
                lease_owner="elsewhere:1:dead",
                lease_until=at(lease_for),
            )
        )


async def test_while_another_worker_refreshes_the_old_token_still_serves(server: Server) -> None:
    await cold_cache(server)
    app = oa_app(server)
    # Inside the refresh margin but not expired, and someone holds the lease: no wait, no fetch.
    await hold_lease(server, token_key(app.app_id), value="old-but-valid", expires_in=100, lease_for=30)
    before = counts(server)
    assert await manager(server).access_token(app) == "old-but-valid"
    assert delta(before, counts(server)) == {}


async def test_a_lease_whose_holder_died_is_taken_over(server: Server) -> None:
    await cold_cache(server)
    app = oa_app(server)
    await hold_lease(server, token_key(app.app_id), value="", expires_in=-1, lease_for=-1)
    before = counts(server)
    token = await manager(server).access_token(app)
    assert token and delta(before, counts(server)) == {STABLE: 1}
    row = await stored(server, token_key(app.app_id))
    assert row is not None and row.value == token and row.lease_owner is None


async def test_a_refresh_that_never_finishes_answers_busy(server: Server) -> None:
    await cold_cache(server)
    await hold_lease(server, ticket_key(WECHAT_MP_APP_ID), value="", expires_in=-1, lease_for=60)
    try:
        async with other_server(server, wechat={"token_wait_seconds": 0.3}) as other:
            body = (await other.get("/api/share/config", params={"url": "https://shop.example.com/"})).json()
    finally:
        await cold_cache(server)
    assert body["status"] == 0 and body["code"] == "wechat.busy"


async def test_without_stable_token_the_classic_endpoint_is_used(server: Server) -> None:
    await cold_cache(server)
    app = oa_app(server)
    tokens = manager(server)

    async def not_offered(app_id: str, secret: str, *, force_refresh: bool = False) -> Any:
        raise WechatApiError(48001, "api unauthorized")

    tokens.api.stable_token = not_offered  # type: ignore[method-assign]
    before = counts(server)
    token = await tokens.access_token(app)
    assert token and delta(before, counts(server)) == {TOKEN: 1}
