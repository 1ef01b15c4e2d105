"""`mallgate notifications list|show|replay` and `mallgate reconcile`, against the running test service.

The commands run in-process (typer's runner, in a thread so they can start their
own event loop) with the environment an operator would set: the service's
database, var folder (sandbox keys) and public URL (where the sandbox answers).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urlencode

import httpx
from test_notify_alipay import FORM, effective, signed
from test_notify_wechat import transaction, v3_notice
from typer.testing import CliRunner, Result

from conftest import Server
from mallgate.cli import app
from support import ADMIN, admin_create_order, admin_get_order, unique


async def cli(server: Server, *args: str) -> Result:
    env = {
        "MALLGATE_DATABASE_URL": server.backend.url,
        "MALLGATE_VAR_DIR": str(server.settings.var_dir),
        "MALLGATE_PUBLIC_URL": server.url,
        "MALLGATE_SANDBOX": "true",
    }
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def notification_ids(client: httpx.AsyncClient, order_no: str) -> list[int]:
    payload = (await client.get("/admin/notifications", params={"order_no": order_no}, headers=ADMIN)).json()
    return [int(row["id"]) for row in payload["data"]]


async def test_list_show_and_replay(client: httpx.AsyncClient, server: Server) -> None:
    no = unique("LATE")
    notify = effective(server).base_path + "/pay/notify"
    # The notice arrives before the order exists (say, a restore from backup lost it): rejected, kept.
    form = signed(server, no, "9.00")
    assert (await client.post(notify, content=urlencode(form), headers=FORM)).text == "failure"
    [first] = await notification_ids(client, no)

    listed = await cli(server, "notifications", "list", "--order-no", no)
    assert listed.exit_code == 0, listed.output
    assert re.search(rf"#{first} .* alipay +POST +{no} +verified +rejected +unknown order", listed.output)

    shown = await cli(server, "notifications", "show", str(first))
    assert shown.exit_code == 0, shown.output
    assert f"out_trade_no={no}" in shown.output and "content-type" in shown.output
    assert "application/x-www-form-urlencoded" in shown.output

    await admin_create_order(client, amount="9.00", order_no=no)
    replayed = await cli(server, "notifications", "replay", str(first))
    assert (replayed.exit_code, replayed.output.strip()) == (0, f"#{first}: applied")
    state = await admin_get_order(client, no)
    assert (state["status"], state["trade_no"]) == ("paid", form["trade_no"])
    again = await cli(server, "notifications", "replay", str(first))
    assert (again.exit_code, again.output.strip()) == (0, f"#{first}: duplicate (already paid)")
    assert await admin_get_order(client, no) == state

    # The replay is a row of its own; the same bytes posted again are counted on the one accepted.
    assert (await client.post(notify, content=urlencode(form), headers=FORM)).text == "success"
    assert (await client.post(notify, content=urlencode(form), headers=FORM)).text == "success"
    listed = await cli(server, "notifications", "list", "--order-no", no)
    assert re.search(r" applied +\(\+2 repeats, last [0-9-]+ [0-9:]+\)$", listed.output, re.M), listed.output

    missing = await cli(server, "notifications", "show", "999999999")
    assert missing.exit_code == 1 and "no notification #999999999" in missing.output


async def test_replay_keeps_the_signature_check_but_not_the_timestamp_window(
    client: httpx.AsyncClient, server: Server
) -> None:
    order = await admin_create_order(client, amount="2.00")
    no = order["order_no"]
    path = effective(server).base_path + "/wechat/notify"
    headers, body = v3_notice(
        server, "TRANSACTION.SUCCESS", transaction(effective(server), no, 200), age=3600
    )
    assert (await client.post(path, content=body, headers=headers)).status_code == 400  # stale when live
    forged_headers = {**headers, "Wechatpay-Signature": headers["Wechatpay-Signature"][::-1]}
    assert (await client.post(path, content=body, headers=forged_headers)).status_code == 400
    assert (await admin_get_order(client, no))["status"] == "unpaid"
    stale, forged = sorted(await _ids_since_with_body(server, body))

    assert (await cli(server, "notifications", "replay", str(forged))).exit_code == 1
    assert (await admin_get_order(client, no))["status"] == "unpaid"
    result = await cli(server, "notifications", "replay", str(stale))
    assert (result.exit_code, result.output.strip()) == (0, f"#{stale}: applied")
    assert (await admin_get_order(client, no))["status"] == "paid"


async def _ids_since_with_body(server: Server, body: bytes) -> list[int]:
    from sqlalchemy import select

    from mallgate.db.models import PaymentNotification

    async with server.app.state.runtime.db.read() as session:
        rows = await session.scalars(
            select(PaymentNotification).order_by(PaymentNotification.id.desc()).limit(20)
        )
        return [r.id for r in rows if r.body == body]


async def _pay_at_sandbox(client: httpx.AsyncClient, **call: Any) -> None:
    """The payer pays (or the trade closes) at the platform, and the notice never reaches us."""
    answer = (await client.post("/_sandbox/pay", json={**call, "notify": False})).json()
    assert answer["status"] == 1, answer


async def test_reconcile_applies_what_the_platforms_report(client: httpx.AsyncClient, server: Server) -> None:
    server.clock.advance(-20 * 60)  # these orders were created twenty minutes ago
    by_alipay = await admin_create_order(client, amount="11.00")
    by_wechat = await admin_create_order(client, amount="12.00")
    closed = await admin_create_order(client, amount="13.00")
    untouched = await admin_create_order(client, amount="14.00")
    server.clock.offset = 0
    young = await admin_create_order(client, amount="15.00")

    await _pay_at_sandbox(client, channel="alipay", order_no=by_alipay["order_no"], amount="11.00")
    await _pay_at_sandbox(client, channel="wechat", order_no=by_wechat["order_no"], amount="12.00")
    await _pay_at_sandbox(client, channel="alipay", order_no=closed["order_no"], amount="13.00", kind="close")
    await _pay_at_sandbox(client, channel="alipay", order_no=young["order_no"], amount="15.00")

    result = await cli(server, "reconcile", "--older-than", "10m")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{by_alipay['order_no']} alipay: TRADE_SUCCESS -> applied" in out
    assert f"{by_wechat['order_no']} wechat: SUCCESS -> applied" in out
    assert f"{closed['order_no']} alipay: TRADE_CLOSED -> applied (closed)" in out
    assert f"{untouched['order_no']} alipay: NOT_EXIST, nothing to change" in out
    assert f"{untouched['order_no']} wechat: NOT_EXIST, nothing to change" in out
    assert young["order_no"] not in out

    states = {
        o["order_no"]: (await admin_get_order(client, o["order_no"]))
        for o in (by_alipay, by_wechat, closed, untouched, young)
    }
    assert [(s["status"], s["channel"]) for s in states.values()] == [
        ("paid", "alipay"),
        ("paid", "wechat"),
        ("closed", None),
        ("unpaid", None),
        ("unpaid", None),
    ]
    assert states[by_alipay["order_no"]]["paid_amount"] == "11.00"

    # The audit trail shows where the payment came from; a query answer is not replayable.
    listed = await cli(server, "notifications", "list", "--order-no", by_wechat["order_no"])
    assert re.search(r"wechat +QUERY +\S+ +verified +applied", listed.output), listed.output
    [query_id] = await notification_ids(client, by_wechat["order_no"])
    replay = await cli(server, "notifications", "replay", str(query_id))
    assert replay.exit_code == 1 and "reconcile" in replay.output

    # Running it again finds the paid ones settled and changes nothing.
    again = await cli(server, "reconcile", "--older-than", "10m")
    assert (
        by_alipay["order_no"] not in again.output
        and f"{untouched['order_no']} alipay: NOT_EXIST" in again.output
    )

    bad = await cli(server, "reconcile", "--older-than", "soon")
    assert bad.exit_code == 2 and "10m" in bad.output
