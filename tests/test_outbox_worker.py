"""The outbox worker: leases, claims, retries and the webhook, on every database.

The shared server runs its own worker (sending to the sandbox's receiver). The tests
here drive their own workers in-process, each with its own senders and lease key,
so they neither wait for nor disturb the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
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
from test_outbox_paid import fresh_database

from conftest import Backend, Server, TestClock, free_port, make_settings
from mallgate.channels.webhook import WebhookSender
from mallgate.db.models import OutboxDelivery, OutboxEvent
from mallgate.runtime import Runtime
from mallgate.services import outbox
from mallgate.services.notifications import RawNotification, receive
from mallgate.services.orders import PaymentEvent
from mallgate.services.outbox_worker import Event, OutboxWorker, Sender, TransientError, naive
from mallgate.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_webhook
from support import admin_create_order, unique


@pytest.fixture
async def runtime(server: Server) -> AsyncIterator[Runtime]:
    # Its own clock: the tests move it without moving the shared server's.
    rt = Runtime.create(server.settings, TestClock())
    yield rt
    await rt.close()


@dataclass
class Recorder:
    """A sender for one test's topic: records each send, can be slow, can fail the first N."""

    topic: str
    name: str = field(default_factory=lambda: unique("rec")[:16])
    pause: float = 0.0
    fail_first: int = 0
    sent: list[int] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)
    overlaps: list[int] = field(default_factory=list)

    def wants(self, event: Event) -> bool:
        return event.topic == self.topic

    async def send(self, runtime: Runtime, event: Event) -> None:
        if event.id in self.in_flight:
            self.overlaps.append(event.id)
        self.in_flight.add(event.id)
        try:
            await asyncio.sleep(self.pause)
            if self.fail_first > 0:
                self.fail_first -= 1
                raise TransientError("HTTP 500")
            self.sent.append(event.id)
        finally:
            self.in_flight.discard(event.id)


def worker(runtime: Runtime, *senders: Sender, lease_key: str = "") -> OutboxWorker:
    return OutboxWorker(runtime, senders=lambda: list(senders), lease_key=lease_key or unique("outbox:t:"))


async def add_events(runtime: Runtime, topic: str, count: int = 1, **payload: Any) -> list[int]:
    now = naive(runtime.clock.now())

    def write(session: Session) -> list[int]:
        for n in range(count):
            outbox.add_event(session.connection(), topic, {"n": n, **payload}, now)
        rows = session.execute(
            select(OutboxEvent.id).where(OutboxEvent.topic == topic).order_by(OutboxEvent.id)
        )
        return list(rows.scalars())

    return await runtime.db.run_write(write)


async def deliveries(runtime: Runtime, sender: str) -> list[OutboxDelivery]:
    async with runtime.db.read() as session:
        rows = await session.execute(
            select(OutboxDelivery).where(OutboxDelivery.sender == sender).order_by(OutboxDelivery.event_id)
        )
        return list(rows.scalars())


def clock_of(runtime: Runtime) -> TestClock:
    assert isinstance(runtime.clock, TestClock)
    return runtime.clock


async def test_a_worker_killed_between_claim_and_send_loses_nothing(runtime: Runtime) -> None:
    recorder = Recorder(unique("test.killed."))
    [event_id] = await add_events(runtime, recorder.topic)
    first = worker(runtime, recorder)
    await first.plan([recorder])
    claimed = await first.claim([recorder.name])
    assert [c.event.id for c in claimed] == [event_id]
    # `first` dies here: claimed, never sent, never recorded. A new worker after a restart:
    second = worker(runtime, recorder)
    assert await second.run_once() == 0  # the claim still stands: not sent twice at once
    assert recorder.sent == []
    clock_of(runtime).advance(runtime.settings.outbox.claim_seconds + 1)
    assert await second.run_once() == 1
    assert recorder.sent == [event_id]
    [row] = await deliveries(runtime, recorder.name)
    assert (row.state, row.attempts, row.last_error) == ("sent", 2, "")
    clock_of(runtime).advance(runtime.settings.outbox.claim_seconds + 1)
    assert await second.run_once() == 0 and recorder.sent == [event_id]


async def test_two_workers_never_send_the_same_event_at_the_same_time(runtime: Runtime) -> None:
    recorder = Recorder(unique("test.race."), pause=0.01)
    ids = await add_events(runtime, recorder.topic, count=30)
    # Each with a runtime of its own, as two processes: its own engine, pool and connections.
    other = Runtime.create(runtime.settings, runtime.clock)
    one, two = worker(runtime, recorder), worker(other, recorder)
    try:
        await race(one, two, recorder, ids)
    finally:
        await other.close()
    assert {row.state for row in await deliveries(runtime, recorder.name)} == {"sent"}


async def race(one: OutboxWorker, two: OutboxWorker, recorder: Recorder, ids: list[int]) -> None:
    await one.plan([recorder])
    # Even without the lease (both passes at once), each delivery is claimed by one of them.
    total = 0
    for _ in range(30):  # a claim that gave way (a deadlock on MySQL) is taken at a later pass
        total += sum(await asyncio.gather(one.run_once(), two.run_once(), one.run_once(), two.run_once()))
        if total >= 30:
            break
    assert total == 30
    assert sorted(recorder.sent) == ids and recorder.overlaps == []


async def test_a_sender_added_later_gets_the_events_already_planned(runtime: Runtime) -> None:
    first = Recorder(unique("test.added."))
    later = Recorder(first.topic)
    senders: list[Sender] = [first]
    ids = await add_events(runtime, first.topic, count=3)
    runner = OutboxWorker(runtime, senders=lambda: list(senders), lease_key=unique("outbox:t:"))
    assert await runner.run_once() == 3 and first.sent == ids
    assert await runner.run_once() == 0  # planned once: nothing new for `first`
    senders.append(later)
    assert await runner.run_once() == 3
    assert later.sent == ids and first.sent == ids


async def test_an_event_committed_after_later_ones_is_still_planned(backend: Backend, tmp_path: Path) -> None:
    # A database of its own: the ids are chosen here, as no other test's rows may be disturbed.
    async with fresh_database(backend, tmp_path) as url:
        own = Runtime.create(make_settings(Backend(backend.name, url), tmp_path, 1), TestClock())
        try:
            recorder = Recorder(unique("test.late."))
            runner = worker(own, recorder)

            async def add(event_id: int) -> None:
                now = naive(own.clock.now())
                row = OutboxEvent(
                    id=event_id,
                    topic=recorder.topic,
                    payload="{}",
                    created_at=now,
                    available_at=now,
                    attempts=0,
                    last_error="",
                )
                await own.db.run_write(lambda session: session.add(row))

            await add(2000)
            assert await runner.run_once() == 1
            # 1000: a transaction that took its id first and committed after 2000's did.
            await add(1000)
            assert await runner.run_once() == 1
            assert recorder.sent == [2000, 1000]
        finally:
            await own.close()


async def test_one_runner_holds_the_lease_until_it_stops_renewing(runtime: Runtime) -> None:
    key = unique("outbox:lease:")
    one, two = worker(runtime, lease_key=key), worker(runtime, lease_key=key)
    assert await one.take_lease() and not await two.take_lease()
    assert await one.take_lease()  # renewed by its holder
    clock_of(runtime).advance(runtime.settings.outbox.lease_seconds / 2)
    assert not await two.take_lease()
    clock_of(runtime).advance(runtime.settings.outbox.lease_seconds + 1)  # `one` died: not renewed
    assert await two.take_lease() and not await one.take_lease()
    await two.release_lease()
    assert await one.take_lease()


async def test_later_events_of_an_order_wait_for_its_earlier_ones(runtime: Runtime) -> None:
    recorder = Recorder(unique("test.order."), fail_first=1)
    order_no = unique("T")
    first, second = await add_events(runtime, recorder.topic, count=2, order_no=order_no)
    other = (await add_events(runtime, recorder.topic, count=1, order_no=unique("T")))[-1]
    runner = worker(runtime, recorder)
    await runner.run_once()  # `first` fails once; `second` waits behind it, the other order does not
    assert recorder.sent == [other]
    clock_of(runtime).advance(runtime.settings.outbox.backoff_max_seconds)
    await runner.run_once()
    assert recorder.sent == [other, first]
    await runner.run_once()
    assert recorder.sent == [other, first, second]


@dataclass
class Receiver:
    """The mall's backend, played on a port of its own: answers 500 to the first N."""

    fail_first: int
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def endpoint(self, request: Request) -> JSONResponse:
        self.seen.append((dict(request.headers), await request.body()))
        if self.fail_first > 0:
            self.fail_first -= 1
            return JSONResponse({"error": "down"}, status_code=500)
        return JSONResponse({"ok": True})


@pytest.fixture
async def receiver_url() -> AsyncIterator[Callable[[int], tuple[str, Receiver]]]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    def start(fail_first: int) -> tuple[str, Receiver]:
        receiver = Receiver(fail_first)
        port = free_port()
        app = Starlette(routes=[Route("/hook", receiver.endpoint, methods=["POST"])])
        uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        servers.append((uv, asyncio.create_task(uv.serve())))
        return f"http://127.0.0.1:{port}/hook", receiver

    yield start
    for uv, task in servers:
        uv.should_exit = True
        await task


async def wait_started(url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            try:
                await http.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.02)


async def test_a_receiver_answering_500_gets_retries_with_backoff_then_success_ends_them(
    runtime: Runtime, receiver_url: Callable[[int], tuple[str, Receiver]]
) -> None:
    url, receiver = receiver_url(3)
    await wait_started(url)
    secret = "test-webhook-secret-0123456789"
    topic = unique("test.hook.")
    sender = WebhookSender(url, secret, 5.0)
    sender.name = unique("hook")[:16]
    sender.wants = lambda event: event.topic == topic  # type: ignore[method-assign]
    [event_id] = await add_events(runtime, topic, order_no=unique("T"))
    runner = worker(runtime, sender)
    clock = clock_of(runtime)
    waits = []
    for attempt in (1, 2, 3):
        assert await runner.run_once() == 1
        [row] = await deliveries(runtime, sender.name)
        assert (row.state, row.attempts, row.last_error) == ("pending", attempt, "HTTP 500")
        wait = (row.next_attempt_at - naive(clock.now())).total_seconds()
        waits.append(wait)
        assert await runner.run_once() == 0  # not due yet: no request
        assert len(receiver.seen) == attempt
        clock.advance(wait + 0.01)
    first = runtime.settings.outbox.backoff_first_seconds
    # Exponential with jitter: attempt n waits between half and all of first * 2**(n-1).
    for n, wait in enumerate(waits, start=1):
        # (MySQL's DATETIME keeps whole seconds: up to one less.)
        assert first * 2 ** (n - 1) / 2 - 1.1 <= wait <= first * 2 ** (n - 1) + 0.1
    assert await runner.run_once() == 1
    [row] = await deliveries(runtime, sender.name)
    assert (row.state, row.attempts) == ("sent", 4) and row.sent_at is not None
    checked_at = clock.now()
    clock.advance(runtime.settings.outbox.backoff_max_seconds)
    assert await runner.run_once() == 0 and len(receiver.seen) == 4  # a 2xx ended it
    for headers, body in receiver.seen:
        assert headers[EVENT_ID_HEADER.lower()] == str(event_id)
        # Each signed when it was sent: the clock moved on since, by the waits.
        verify_webhook(
            body, headers[SIGNATURE_HEADER.lower()], secret, tolerance=sum(waits) + 5, now=checked_at
        )
        document = json.loads(body)
        assert document["id"] == event_id and document["topic"] == topic


async def test_a_delivery_failing_for_a_day_is_given_up(runtime: Runtime) -> None:
    recorder = Recorder(unique("test.day."), fail_first=1000)
    await add_events(runtime, recorder.topic)
    runner = worker(runtime, recorder)
    await runner.run_once()
    clock_of(runtime).advance(runtime.settings.outbox.retry_for_seconds + 1)
    await runner.run_once()
    [row] = await deliveries(runtime, recorder.name)
    assert row.state == "failed" and row.last_error.startswith("gave up after 2 attempts")


async def test_paying_an_order_leads_to_one_signed_webhook(server: Server, client: httpx.AsyncClient) -> None:
    """Through the payment path; the shared server's own worker sends to the sandbox's receiver."""
    runtime = Runtime.create(server.settings, server.clock)
    try:
        order = await admin_create_order(client, amount="12.30")
        raw = RawNotification(
            channel="alipay", method="POST", query_string="", body=b"x", source_ip="127.0.0.1"
        )
        event = PaymentEvent(
            channel="alipay",
            order_no=order["order_no"],
            action="pay",
            trade_no=unique("TR"),
            amount=Decimal("12.30"),
        )
        assert (await receive(runtime, raw, lambda _r: event)).outcome == "applied"
        async with runtime.db.read() as session:
            rows = await session.execute(
                select(OutboxEvent.id, OutboxEvent.payload).where(OutboxEvent.topic == "order.paid")
            )
            [event_id] = [i for i, payload in rows if json.loads(payload)["order_no"] == order["order_no"]]
        received: list[dict[str, Any]] = []
        for _ in range(300):
            answer = await client.get("/_sandbox/webhooks/received", params={"event_id": str(event_id)})
            # The receiver's book is shared by the runs on every database: its ids repeat across them.
            received = [r for r in answer.json()["received"] if order["order_no"] in r["body"]]
            if received:
                break
            await asyncio.sleep(0.05)
        [one] = received
        assert (one["signature"], one["status"], one["topic"]) == ("ok", 200, "order.paid")
        body = json.loads(one["body"])
        assert body["data"]["order_no"] == order["order_no"] and body["data"]["amount"] == "12.30"
        for _ in range(300):  # recorded once the worker's whole pass is done
            async with runtime.db.read() as session:
                [state] = (
                    await session.execute(
                        select(OutboxDelivery.state).where(
                            OutboxDelivery.event_id == event_id, OutboxDelivery.sender == "webhook"
                        )
                    )
                ).scalars()
            if state == "sent":
                break
            await asyncio.sleep(0.05)
        assert state == "sent"
    finally:
        await runtime.close()


def test_event_time_is_utc_text() -> None:
    event = Event(id=1, topic="order.paid", payload={}, created_at=datetime(2026, 12, 1, 8, 0, 0))
    from mallgate.channels.webhook import body_of

    assert json.loads(body_of(event))["created_at"] == "2026-12-01T08:00:00Z"


async def test_the_loop_sends_and_gives_the_lease_up_when_stopped(runtime: Runtime) -> None:
    recorder = Recorder(unique("test.loop."))
    key = unique("outbox:loop:")
    running = worker(runtime, recorder, lease_key=key)
    task = asyncio.create_task(running.run())
    try:
        [event_id] = await add_events(runtime, recorder.topic)
        for _ in range(300):
            if recorder.sent:
                break
            await asyncio.sleep(0.05)
        assert recorder.sent == [event_id]
        assert not await worker(runtime, lease_key=key).take_lease()  # held while it runs
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await worker(runtime, lease_key=key).take_lease()  # released at once, not after it runs out
