"""Issue 7, the notification intake: what a forged notice may cost, and the corners that answered 500.

Refused notices are kept for audit but bounded (truncated body, per-IP row budget,
`notifications prune`); the group commit's queue is bounded and every request it
takes is answered whatever fails; odd input (a non-ASCII `sign`, NUL bytes, a wrong
HTTP method, an authentic v3 event of another kind) is answered, never a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlencode

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_cli_payments import cli
from test_notify_alipay import FORM, effective, signed
from test_notify_wechat import XML, transaction, v2_payment, v3_notice

from conftest import Server, TestClock, other_server
from mallgate.channels import wechat_pay
from mallgate.db.models import PaymentNotification
from mallgate.runtime import Runtime
from mallgate.services import notifications
from mallgate.services.notifications import RawNotification, receive
from mallgate.services.orders import PaymentEvent
from mallgate.settings import Settings
from support import admin_create_order, admin_get_order, unique


def alipay_path(server: Server) -> str:
    return effective(server).base_path + "/pay/notify"


def wechat_path(server: Server) -> str:
    return effective(server).base_path + "/wechat/notify"


def forged(server: Server, order_no: str, **extra: str) -> dict[str, str]:
    form = signed(server, order_no, "1.00", **extra)
    form["sign"] = form["sign"][::-1]
    return form


async def rows_of(server: Server, order_no: str) -> list[PaymentNotification]:
    async with server.app.state.runtime.db.read() as session:
        query = (
            select(PaymentNotification)
            .where(PaymentNotification.order_no == order_no)
            .order_by(PaymentNotification.id)
        )
        return list((await session.scalars(query)).all())


async def rows_with_body(server: Server, body: bytes) -> list[PaymentNotification]:
    async with server.app.state.runtime.db.read() as session:
        query = select(PaymentNotification).order_by(PaymentNotification.id.desc()).limit(50)
        return [r for r in await session.scalars(query) if r.body == body]


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """A Prometheus sample summed over the series matching `labels` (0 when absent)."""
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------------------------------------
# refused bodies: truncated, with their length and hash


async def test_refused_notice_is_stored_truncated_with_length_and_hash(
    client: httpx.AsyncClient, server: Server
) -> None:
    no = unique("BIG")
    body = urlencode(forged(server, no, passback_params="x" * 60_000)).encode()
    assert 60_000 < len(body) <= effective(server).notify_body_limit
    query = "pad=" + "q" * 6000
    headers = {**FORM, "User-Agent": "u" * 6000}
    answer = await client.post(f"{alipay_path(server)}?{query}", content=body, headers=headers)
    assert answer.text == "failure"
    [row] = await rows_of(server, no)
    assert (row.verified, row.outcome) == (False, "rejected")
    assert row.body == body[:4096]
    assert (row.body_length, row.body_sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert len(row.query_string) <= 4096 and row.query_string.startswith("pad=qqq")
    assert len(row.headers) <= 4096 and "uuuu" in row.headers

    # A verified notice is kept whole, and carries its length and hash too.
    order = await admin_create_order(client, amount="1.00")
    good = urlencode(signed(server, order["order_no"], "1.00")).encode()
    assert (await client.post(alipay_path(server), content=good, headers=FORM)).text == "success"
    [kept] = await rows_of(server, order["order_no"])
    assert (kept.verified, kept.body) == (True, good)
    assert (kept.body_length, kept.body_sha256) == (len(good), hashlib.sha256(good).hexdigest())


# ----------------------------------------------------------------------------------------------
# the per-IP budget of refused rows


async def test_refused_notices_beyond_the_per_ip_budget_are_answered_failure_and_not_stored(
    server: Server,
) -> None:
    prefix = unique("FLOOD")
    async with other_server(server, notify={"refused_per_ip_per_minute": 3}) as http:
        before = await metric(http, "mallgate_notifications_dropped_total", reason="rate_limited")
        answers = [
            (
                await http.post(
                    alipay_path(server), content=urlencode(forged(server, f"{prefix}{i}")), headers=FORM
                )
            ).text
            for i in range(7)
        ]
        assert answers == ["failure"] * 7
        stored = [len(await rows_of(server, f"{prefix}{i}")) for i in range(7)]
        assert stored == [1, 1, 1, 0, 0, 0, 0]
        after = await metric(http, "mallgate_notifications_dropped_total", reason="rate_limited")
        assert after - before == 4
        # Authentic notices are never held back by the budget of refused ones.
        order = await admin_create_order(http, amount="1.00")
        good = urlencode(signed(server, order["order_no"], "1.00"))
        assert (await http.post(alipay_path(server), content=good, headers=FORM)).text == "success"
        assert (await admin_get_order(http, order["order_no"]))["status"] == "paid"


# ----------------------------------------------------------------------------------------------
# notifications prune


async def test_prune_deletes_old_notices(client: httpx.AsyncClient, server: Server) -> None:
    old_forged, old_verified, fresh = unique("OLDF"), unique("OLDV"), unique("NEW")
    server.clock.advance(-100 * 86400)
    form = urlencode(forged(server, old_forged))
    assert (await client.post(alipay_path(server), content=form, headers=FORM)).text == "failure"
    # Authentic but for an order we do not have: verified, rejected, kept.
    unknown = urlencode(signed(server, old_verified, "1.00"))
    assert (await client.post(alipay_path(server), content=unknown, headers=FORM)).text == "failure"
    server.clock.offset = 0
    form = urlencode(forged(server, fresh))
    assert (await client.post(alipay_path(server), content=form, headers=FORM)).text == "failure"

    refused = await cli(server, "notifications", "prune", "--older-than", "90d", "--refused-only")
    assert refused.exit_code == 0, refused.output
    assert re.search(r"\b[1-9]\d* notifications? deleted", refused.output), refused.output
    assert (len(await rows_of(server, old_forged)), len(await rows_of(server, old_verified))) == (0, 1)
    everything = await cli(server, "notifications", "prune", "--older-than", "90d")
    assert everything.exit_code == 0, everything.output
    assert (len(await rows_of(server, old_verified)), len(await rows_of(server, fresh))) == (0, 1)

    bad = await cli(server, "notifications", "prune", "--older-than", "soon")
    assert bad.exit_code == 2


async def test_prune_works_through_many_batches(client: httpx.AsyncClient, server: Server) -> None:
    prefix = unique("BATCH")
    server.clock.advance(-400 * 86400)
    for i in range(5):
        form = urlencode(forged(server, f"{prefix}{i}"))
        assert (await client.post(alipay_path(server), content=form, headers=FORM)).text == "failure"
    server.clock.offset = 0
    runtime: Runtime = server.app.state.runtime
    deleted = await notifications.prune(runtime, older_than=timedelta(days=399), refused_only=True, batch=2)
    assert deleted >= 5
    assert [len(await rows_of(server, f"{prefix}{i}")) for i in range(5)] == [0] * 5


# ----------------------------------------------------------------------------------------------
# the group-commit queue is bounded


async def test_a_full_queue_answers_busy_at_once_and_every_accepted_notice_is_stored(
    server: Server,
) -> None:
    async with other_server(server, notify={"queue_limit": 1}) as http:
        orders = [await admin_create_order(http, amount="1.00") for _ in range(60)]
        before = await metric(http, "mallgate_notifications_dropped_total", reason="busy")
        forms = [urlencode(signed(server, o["order_no"], "1.00")) for o in orders]
        answers = await asyncio.gather(
            *(http.post(alipay_path(server), content=f, headers=FORM) for f in forms)
        )
        texts = [a.text for a in answers]
        assert set(texts) <= {"success", "failure"} and "failure" in texts, texts
        for order, text in zip(orders, texts, strict=True):
            state = await admin_get_order(http, order["order_no"])
            rows = await rows_of(server, order["order_no"])
            if text == "success":
                assert state["status"] == "paid" and [r.outcome for r in rows] == ["applied"]
            else:  # busy: answered before anything was stored; the platform sends it again
                assert state["status"] == "unpaid" and rows == []
        busy = await metric(http, "mallgate_notifications_dropped_total", reason="busy")
        assert busy - before == texts.count("failure")


# ----------------------------------------------------------------------------------------------
# a v2 sign that is not ASCII


async def test_non_ascii_v2_sign_is_refused_and_stored(client: httpx.AsyncClient, server: Server) -> None:
    no = unique("SIGN")
    fields = {**v2_payment(server, no, 100), "sign": "签名" * 16}
    response = await client.post(wechat_path(server), content=wechat_pay.to_xml(fields), headers=XML)
    assert response.status_code == 200
    assert wechat_pay.parse_xml(response.content)["return_code"] == "FAIL"
    [row] = await rows_of(server, no)
    assert (row.verified, row.outcome, row.reason) == (False, "rejected", "NotAuthentic: bad signature")


async def test_an_unexpected_decoder_error_is_a_refused_stored_notice(server: Server) -> None:
    marker = unique("DECODER").encode()

    def broken(_raw: RawNotification) -> PaymentEvent:
        raise KeyError("a decoder bug, quoting the attacker's bytes")

    result = await receive(server.app.state.runtime, _raw(0, body=marker), broken)
    assert (result.accepted, result.outcome, result.reason) == (False, "rejected", "unexpected KeyError")
    [row] = await rows_with_body(server, marker)
    assert (row.verified, row.outcome, row.reason) == (False, "rejected", "unexpected KeyError")


# ----------------------------------------------------------------------------------------------
# wrong HTTP methods on the notify URLs


async def test_wrong_methods_on_the_notify_urls_answer_405_with_allow(
    client: httpx.AsyncClient, server: Server
) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = await client.request(method, wechat_path(server))
        assert response.status_code == 405, (method, response.status_code)
        assert response.headers["allow"] == "POST"
    response = await client.put(alipay_path(server), content=b"x=1", headers=FORM)
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    # The right methods still reach the handlers.
    assert (await client.get(alipay_path(server))).text == "failure"


# ----------------------------------------------------------------------------------------------
# NUL bytes


async def test_nul_in_out_trade_no_is_stored_as_a_refused_notice(
    client: httpx.AsyncClient, server: Server
) -> None:
    head, tail = unique("NUL"), unique("")
    claimed = f"{head}\x00{tail}"
    order = await admin_create_order(client, amount="1.00")
    good = urlencode(signed(server, order["order_no"], "1.00"))
    nul_forged = urlencode(forged(server, claimed))
    assert "%00" in nul_forged
    # Authentic, signed over the NUL: no order can have such a number.
    nul_signed = urlencode(signed(server, claimed, "1.00"))
    answers = await asyncio.gather(
        *(client.post(alipay_path(server), content=f, headers=FORM) for f in (nul_forged, nul_signed, good))
    )
    assert [a.text for a in answers] == ["failure", "failure", "success"]
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"
    rows = await rows_of(server, f"{head}\ufffd{tail}")
    assert sorted((r.verified, r.outcome) for r in rows) == [(False, "rejected"), (True, "rejected")]
    assert {r.body for r in rows} == {nul_forged.encode(), nul_signed.encode()}


# ----------------------------------------------------------------------------------------------
# an authentic v3 event of a type mallgate does not handle


async def test_unknown_authentic_v3_event_is_acknowledged_and_stored(
    client: httpx.AsyncClient, server: Server
) -> None:
    resource = {
        "mchid": effective(server).wechat_pay.mch_id,
        "out_bill_no": unique("BILL"),
        "state": "SUCCESS",
    }
    headers, body = v3_notice(server, "MCHTRANSFER.BILL.FINISHED", resource)
    response = await client.post(wechat_path(server), content=body, headers=headers)
    assert response.status_code == 204
    [row] = await rows_with_body(server, body)
    assert (row.verified, row.outcome) == (True, "ignored")
    assert "MCHTRANSFER.BILL.FINISHED" in row.reason
    # Payment events are still read as such.
    order = await admin_create_order(client, amount="1.00")
    paid = v3_notice(server, "TRANSACTION.SUCCESS", transaction(effective(server), order["order_no"], 100))
    assert (await client.post(wechat_path(server), content=paid[1], headers=paid[0])).status_code == 204


# ----------------------------------------------------------------------------------------------
# the group commit answers every request whatever fails (a stand-in database: the mechanism itself)


class _FailingDb:
    """A database whose writes raise what no driver would, or block until released."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.release = asyncio.Event()
        self.called = asyncio.Event()
        self.calls = 0

    async def run_write(self, work: Callable[[Session], Any], *, durable: bool = True) -> Any:
        self.calls += 1
        self.called.set()
        if self.error is not None:
            raise self.error
        await self.release.wait()
        raise RuntimeError("released")


def _stub_runtime(db: _FailingDb, **notify: Any) -> Runtime:
    settings = Settings(_env_file=None, notify=notify)  # type: ignore[call-arg]
    return cast(Runtime, SimpleNamespace(settings=settings, db=db, clock=TestClock(), services={}))


def _raw(i: int, body: bytes = b"") -> RawNotification:
    return RawNotification("alipay", "POST", "", body or f"n={i}".encode(), "192.0.2.1")


def _event(i: int) -> PaymentEvent:
    return PaymentEvent("alipay", f"GC{i}", "pay", trade_no=f"T{i}", amount=Decimal("1.00"))


async def test_an_unexpected_commit_error_answers_every_request() -> None:
    db = _FailingDb(RuntimeError("not a database error"))
    runtime = _stub_runtime(db)
    results = await asyncio.wait_for(
        asyncio.gather(*(receive(runtime, _raw(i), lambda _r, i=i: _event(i)) for i in range(300))), 10
    )
    assert {(r.accepted, r.outcome) for r in results} == {(False, "error")}
    assert db.calls >= 3  # several batches: the first failure did not stop the drain


async def test_a_dying_drain_answers_the_batch_in_flight_and_everything_queued() -> None:
    db = _FailingDb()
    runtime = _stub_runtime(db)
    pending = [
        asyncio.ensure_future(receive(runtime, _raw(i), lambda _r, i=i: _event(i))) for i in range(200)
    ]
    await db.called.wait()
    runtime.services["notifications.group_commit"].task.cancel()
    results = await asyncio.wait_for(asyncio.gather(*pending), 10)
    assert {(r.accepted, r.outcome) for r in results} == {(False, "error")}


async def test_the_queue_bound_answers_busy_without_queueing() -> None:
    db = _FailingDb()
    runtime = _stub_runtime(db, queue_limit=5)
    writing = [asyncio.ensure_future(receive(runtime, _raw(i), lambda _r, i=i: _event(i))) for i in range(5)]
    await db.called.wait()
    # The first five are being written and the queue is empty again: five more wait, the rest hear busy.
    late = [asyncio.ensure_future(receive(runtime, _raw(i), lambda _r, i=i: _event(i))) for i in range(5, 15)]
    busy = await asyncio.wait_for(asyncio.gather(*late[5:]), 10)
    assert {(r.accepted, r.outcome, r.reason) for r in busy} == {(False, "error", "busy")}
    assert not any(p.done() for p in writing + late[:5])
    db.release.set()
    results = await asyncio.wait_for(asyncio.gather(*writing, *late[:5]), 10)
    assert all(not r.accepted and r.reason != "busy" for r in results)


async def test_a_repeat_answers_success_only_once_it_is_counted() -> None:
    """A repeat of an accepted notice is still answered after a commit: with the database
    failing, it hears failure (the platform sends it again), never success."""
    runtime = _stub_runtime(_FailingDb(OSError("disk gone")))
    raw, event = _raw(7), _event(7)
    row = ("alipay", event.order_no, hashlib.sha256(raw.body).hexdigest(), "")
    seen = (notifications._raw_key(raw), event)
    notifications._accepted(runtime).add(seen, row, notifications.Applied(True, "applied", ""))
    result = await asyncio.wait_for(receive(runtime, raw, lambda _r: event), 10)
    assert (result.accepted, result.outcome) == (False, "error")
    # The repeat was verified and looked up: without the memory it would go the full way.
    assert runtime.db.calls == 1  # type: ignore[attr-defined]
