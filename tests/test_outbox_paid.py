"""The outbox end to end: real payments, a running worker, a real receiver, a worker process killed.

Each test here has a database of its own: the shared server's worker holds the runner
lease on the shared database (so no other runner would ever work there) and has no
templates configured (so it would take the subscribe delivery and end it unsent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_spread import login

from conftest import BACKENDS, Backend, TestClock, free_port, make_settings, start_server
from mallgate.clock import show_time
from mallgate.db.migrate import upgrade
from mallgate.db.models import Identity, Order, OutboxDelivery, OutboxEvent, SubscribeGrant
from mallgate.db.servers import create_database, drop_database
from mallgate.runtime import Runtime
from mallgate.sandbox.app import MOUNT, WECHAT_MINI_APP_ID
from mallgate.services import outbox
from mallgate.services.accounts import WECHAT
from mallgate.services.outbox_worker import naive
from mallgate.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_webhook
from support import admin_create_order, unique

SECRET = "test-outbox-webhook-secret-0123"
TEMPLATES = {
    "delivery_notice": "tmpl-delivery-0101",
    "order_complete": "tmpl-complete-0102",
    "order_pay_success": "tmpl-paid-0103",
    "refund_notice": "tmpl-refund-0104",
}
PAGE = "pages/order/detail?order_no={order_no}"
POLL = 0.05
CLAIM_SECONDS = 5  # the least the setting allows: a short test


@contextlib.asynccontextmanager
async def fresh_database(backend: Backend, folder: Path) -> AsyncIterator[str]:
    """A migrated, empty database of `backend`'s kind; dropped afterwards."""
    if backend.name == "sqlite":
        url = f"sqlite+aiosqlite:///{folder / 'mallgate.db'}"
        await asyncio.to_thread(upgrade, url)
        yield url
        return
    name = f"mallgate_o_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(BACKENDS[backend.name], name)
    try:
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await drop_database(BACKENDS[backend.name], name)


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 0


@dataclass
class Receiver:
    """The mall's backend on a port of its own. While `hang` is set it takes a request and never answers."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    hang: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def endpoint(self, request: Request) -> JSONResponse:
        hit = Hit(dict(request.headers), await request.body(), time.monotonic())
        self.hits.append(hit)
        self.arrived.set()
        if self.hang:
            await self.released.wait()  # set at teardown; the sender was killed long before
        hit.status = 200
        return JSONResponse({"ok": True})

    def of(self, order_no: str) -> list[Hit]:
        return [h for h in self.hits if json.loads(h.body)["data"].get("order_no") == order_no]


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    port = free_port()
    app = Starlette(routes=[Route("/hook", receiver.endpoint, methods=["POST"])])
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(uv.serve())
    for _ in range(500):
        if uv.started:
            break
        await asyncio.sleep(0.02)
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        receiver.released.set()
        uv.should_exit = True
        await task


async def eventually(check: Any, seconds: float = 20.0) -> Any:
    """`await check()` until it is truthy; its last value otherwise (for the assert to show)."""
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(POLL)


# --- paying an order through the payment path, the server's own worker sending ----------------


@dataclass
class PaidServer:
    http: httpx.AsyncClient
    runtime: Runtime
    receiver: Receiver


@pytest.fixture(scope="module")
async def paid_server(
    backend: Backend, sandbox_var: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PaidServer]:
    folder = tmp_path_factory.mktemp("outbox_paid")
    async with fresh_database(backend, folder) as url, receiving() as receiver:
        port = free_port()
        settings = make_settings(
            Backend(backend.name, url),
            sandbox_var,  # the shared sandbox key set; its books are told apart by openid and order
            port,
            templates=TEMPLATES,
            subscribe={"page": PAGE},
            webhook={"url": receiver.url, "secret": SECRET},
            outbox={"poll_seconds": POLL},
        )
        app, uv, task = await start_server(settings, TestClock(), port)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                yield PaidServer(http, app.state.runtime, receiver)
        finally:
            uv.should_exit = True
            await task


async def mini_buyer(paid: PaidServer, grants: int) -> tuple[int, str]:
    """A user with a Mini Program openid who accepted the paid template `grants` times."""
    token, user_id = await login(paid.http)
    openid = unique("o")
    async with paid.runtime.db.transaction() as session:
        session.add(
            Identity(
                user_id=user_id,
                provider=WECHAT,
                app_id=WECHAT_MINI_APP_ID,
                openid=openid,
                created_at=paid.runtime.clock.utcnow().replace(tzinfo=None),
            )
        )
    accept = {"data": {TEMPLATES["order_pay_success"]: "accept"}, "token": token}
    for _ in range(grants):
        answer = (await paid.http.post("/api/template/accept", json=accept)).json()
        assert answer["status"] == 1, answer
    return user_id, openid


@pytest.mark.parametrize(("channel", "version"), [("alipay", "v2"), ("wechat", "v3")])
async def test_paying_an_order_sends_one_subscribe_message_and_one_signed_webhook(
    paid_server: PaidServer, channel: str, version: str
) -> None:
    paid = paid_server
    # Two grants: a second send of the same event would find one and go out, not be refused.
    user_id, openid = await mini_buyer(paid, grants=2)
    order = await admin_create_order(paid.http, amount="12.50", user_id=str(user_id), subject="测试商品")
    order_no = order["order_no"]
    # Paid at the sandbox, whose signed notices (and two duplicates) reach the notify route over HTTP.
    body = {
        "channel": channel,
        "order_no": order_no,
        "amount": "12.50",
        "wechat_version": version,
        "duplicates": 2,
    }
    answer = (await paid.http.post(f"{MOUNT}/pay", json=body)).json()
    assert answer["status"] == 1 and answer["data"]["delivered"] is True, answer

    async def states() -> dict[str, tuple[str, int]]:
        async with paid.runtime.db.read() as session:
            rows = await session.execute(
                select(OutboxDelivery.sender, OutboxDelivery.state, OutboxDelivery.attempts)
                .join(OutboxEvent, OutboxEvent.id == OutboxDelivery.event_id)
                .where(OutboxEvent.payload.contains(order_no))
            )
            found = {sender: (state, attempts) for sender, state, attempts in rows}
        return found if set(found.values()) == {("sent", 1)} and len(found) == 2 else {}

    assert await eventually(states) == {"subscribe": ("sent", 1), "webhook": ("sent", 1)}
    await asyncio.sleep(10 * POLL)  # passes enough for a second send, were one coming

    async with paid.runtime.db.read() as session:
        events = (
            await session.execute(select(OutboxEvent).where(OutboxEvent.payload.contains(order_no)))
        ).scalars()
        [event] = [e for e in events if e.topic == "order.paid"]
        stored = (await session.execute(select(Order).where(Order.order_no == order_no))).scalar_one()
        grants = (
            await session.execute(select(SubscribeGrant.used_at).where(SubscribeGrant.user_id == user_id))
        ).scalars()
        assert sorted(used is None for used in grants) == [False, True]  # one spent, one left
    assert stored.paid_at is not None

    sent = (await paid.http.get(f"{MOUNT}/wechat/_test/subscribe/sent", params={"touser": openid})).json()
    assert len(sent) == 1, sent
    [message] = sent
    assert (message["app_id"], message["template_id"], message["errcode"]) == (
        WECHAT_MINI_APP_ID,
        TEMPLATES["order_pay_success"],
        0,
    )
    assert message["page"] == f"pages/order/detail?order_no={order_no}"
    paid_at = show_time(stored.paid_at, paid.runtime.settings.zone)[:16]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", paid_at)
    assert message["data"] == {
        "character_string1": {"value": order_no},
        "amount2": {"value": "¥12.50"},
        "time3": {"value": paid_at},
    }

    [hit] = paid.receiver.of(order_no)
    assert hit.headers[EVENT_ID_HEADER.lower()] == str(event.id)
    verify_webhook(hit.body, hit.headers[SIGNATURE_HEADER.lower()], SECRET)
    document = json.loads(hit.body)
    assert (document["id"], document["topic"]) == (event.id, "order.paid")
    assert document["data"] == {
        "order_no": order_no,
        "kind": "goods",
        "amount": "12.50",
        "channel": channel,
        "trade_no": answer["data"]["trade_no"],
        "user_id": user_id,
    }


# --- a worker process killed between its claim and the send's record ------------------------


def mallgate_env(url: str, var: Path, receiver: Receiver) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}
    env.update(
        {
            "MALLGATE_DATABASE_URL": url,
            "MALLGATE_VAR_DIR": str(var),
            "MALLGATE_SANDBOX": "false",
            "MALLGATE_WEBHOOK__URL": receiver.url,
            "MALLGATE_WEBHOOK__SECRET": SECRET,
            "MALLGATE_WEBHOOK__TIMEOUT_SECONDS": "60",  # the hung send outlives the kill
            "MALLGATE_OUTBOX__POLL_SECONDS": str(POLL),
            "MALLGATE_OUTBOX__LEASE_SECONDS": "2",
            "MALLGATE_OUTBOX__CLAIM_SECONDS": str(CLAIM_SECONDS),
        }
    )
    return env


async def start_mallgate(env: dict[str, str], folder: Path) -> tuple[asyncio.subprocess.Process, int]:
    """`mallgate serve` in a process group of its own (so a kill ends all of it), once it answers."""
    port = free_port()
    mallgate = str(Path(sys.executable).parent / "mallgate")
    proc = await asyncio.create_subprocess_exec(
        mallgate,
        "serve",
        "--port",
        str(port),
        env=env,
        cwd=folder,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            assert proc.returncode is None, "mallgate serve exited"
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return proc, port
            await asyncio.sleep(0.1)
    raise AssertionError("mallgate serve did not come up")


async def end(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        # Seen once in CI under load, after every assertion had passed: the server took over 30 s
        # to stop on SIGTERM. Shutdown is not what this file tests; it is said, and the server ended.
        warnings.warn(f"mallgate serve took over 30 s to stop on {sig.name}", stacklevel=1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)


async def test_a_worker_process_killed_mid_delivery_loses_nothing(backend: Backend, tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir()
    async with fresh_database(backend, tmp_path) as url, receiving() as receiver:
        env = mallgate_env(url, var, receiver)
        runtime = Runtime.create(make_settings(Backend(backend.name, url), var, 1), TestClock())
        try:
            topic = unique("test.killed.")
            now = naive(runtime.clock.now())

            def write(session: Session) -> None:
                outbox.add_event(session.connection(), topic, {"order_no": unique("T")}, now)

            await runtime.db.run_write(write)

            async def delivery() -> OutboxDelivery | None:
                async with runtime.db.read() as session:
                    return (
                        await session.execute(
                            select(OutboxDelivery)
                            .join(OutboxEvent, OutboxEvent.id == OutboxDelivery.event_id)
                            .where(OutboxEvent.topic == topic)
                        )
                    ).scalar_one_or_none()

            receiver.hang = True
            first, _port = await start_mallgate(env, tmp_path)
            try:
                await asyncio.wait_for(receiver.arrived.wait(), 30)
                claimed = await delivery()
                assert claimed is not None and (claimed.state, claimed.attempts) == ("pending", 1)
            finally:
                await end(first, signal.SIGKILL)  # no lease given back, no outcome recorded
            assert [h.status for h in receiver.hits] == [0]  # never answered
            receiver.hang = False
            second, _port = await start_mallgate(env, tmp_path)
            try:

                async def sent() -> OutboxDelivery | None:
                    row = await delivery()
                    return row if row is not None and row.state == "sent" else None

                done = await eventually(sent, 30)
                assert done is not None and done.attempts == 2 and done.last_error == ""
                # Sent again, once: only when the dead worker's claim ran out, never beside it.
                assert [h.status for h in receiver.hits] == [0, 200]
                assert receiver.hits[1].at - receiver.hits[0].at >= CLAIM_SECONDS - 1.1
                assert receiver.hits[0].body == receiver.hits[1].body
                for hit in receiver.hits:
                    verify_webhook(hit.body, hit.headers[SIGNATURE_HEADER.lower()], SECRET)
                await asyncio.sleep(10 * POLL)
                assert len(receiver.hits) == 2
            finally:
                await end(second, signal.SIGTERM)
        finally:
            await runtime.close()
