"""Events to the mall's backend: the signature, the sandbox's receiver page, the settings, the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select, update
from typer.testing import CliRunner, Result

from conftest import Server
from mallgate.cli import app
from mallgate.db.models import OutboxDelivery
from mallgate.runtime import Runtime
from mallgate.sandbox.app import service_settings
from mallgate.sandbox.keys import SandboxKeys
from mallgate.sandbox.webhook_standin import webhook_secret
from mallgate.services.outbox_worker import naive
from mallgate.settings import Settings
from mallgate.webhooks import WebhookRejected, signature, verify_webhook
from support import unique

SECRET = "whsec-test-0123456789abcdef"
BODY = b'{"id":7,"topic":"order.paid","data":{"order_no":"T1"}}'


def test_verify_webhook_takes_a_good_signature_and_returns_its_time() -> None:
    now = int(time.time())
    assert verify_webhook(BODY, signature(BODY, SECRET, now), SECRET) == now


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "no signature"),
        ("", "no signature"),
        ("v1=abc", "no timestamp"),
        ("t=abc,v1=abc", "no timestamp"),
        ("t=1,t=2,v1=abc", "no timestamp"),
    ],
)
def test_verify_webhook_refuses_a_malformed_header(header: str | None, why: str) -> None:
    with pytest.raises(WebhookRejected, match=why):
        verify_webhook(BODY, header, SECRET)


def test_verify_webhook_refuses_a_changed_body_another_secret_and_an_old_time() -> None:
    now = int(time.time())
    good = signature(BODY, SECRET, now)
    with pytest.raises(WebhookRejected, match="does not match"):
        verify_webhook(BODY.replace(b"T1", b"T2"), good, SECRET)
    with pytest.raises(WebhookRejected, match="does not match"):
        verify_webhook(BODY, good, SECRET + "x")
    with pytest.raises(WebhookRejected, match="does not match"):
        verify_webhook(BODY, f"t={now + 1},{good.split(',')[1]}", SECRET)  # the time is signed too
    with pytest.raises(WebhookRejected, match="tolerance"):
        verify_webhook(BODY, signature(BODY, SECRET, now - 301), SECRET)
    assert verify_webhook(BODY, signature(BODY, SECRET, now - 301), SECRET, tolerance=600) == now - 301


def test_verify_webhook_takes_any_of_two_signatures_while_a_secret_is_rotated() -> None:
    now = int(time.time())
    old = signature(BODY, "old-secret-0123456789", now).split(",")[1]
    assert verify_webhook(BODY, f"{signature(BODY, SECRET, now)},{old}", SECRET) == now


def test_a_webhook_url_without_a_secret_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="needs MALLGATE_WEBHOOK__SECRET"):
        Settings(_env_file=None, webhook={"url": "https://mall.example.com/hook"})
    with pytest.raises(ValidationError, match="needs MALLGATE_WEBHOOK__SECRET"):
        Settings(_env_file=None, webhook={"url": "https://mall.example.com/hook", "secret": "short"})
    with pytest.raises(ValidationError, match="http"):
        Settings(_env_file=None, webhook={"url": "ftp://mall.example.com", "secret": SECRET})


def test_the_sandbox_plays_the_receiver_and_a_webhook_setting_is_no_credential(sandbox_var: Path) -> None:
    keys = SandboxKeys.load_or_create(sandbox_var / "sandbox")
    unset = Settings(_env_file=None, var_dir=sandbox_var)
    filled, url = service_settings(unset, keys)
    assert url is not None and filled.webhook.url == f"{url}/webhooks/receive"
    assert filled.webhook.secret == webhook_secret(keys)
    # The mall's own URL and secret: the sandbox stays on (they tie to no third party) and keeps them.
    given = Settings(
        _env_file=None,
        var_dir=sandbox_var,
        webhook={"url": "https://mall.example.com/hook", "secret": SECRET},
    )
    filled, url = service_settings(given, keys)
    assert url is not None
    assert (filled.webhook.url, filled.webhook.secret) == ("https://mall.example.com/hook", SECRET)


async def post(client: httpx.AsyncClient, body: bytes, header: str, event_id: str) -> httpx.Response:
    return await client.post(
        "/_sandbox/webhooks/receive",
        content=body,
        headers={
            "Mallgate-Signature": header,
            "Mallgate-Event-Id": event_id,
            "Content-Type": "application/json",
        },
    )


async def test_the_receiver_page_checks_signatures_and_can_answer_500(
    client: httpx.AsyncClient, server: Server
) -> None:
    secret = webhook_secret(SandboxKeys.load_or_create(server.settings.var_dir / "sandbox"))
    topic = unique("test.page.")
    body = json.dumps({"id": 1, "topic": topic, "data": {}}).encode()
    good, forged = unique("E"), unique("E")
    assert (await post(client, body, signature(body, secret, int(time.time())), good)).status_code == 200
    assert (
        await post(client, body, signature(body, "not-the-secret", int(time.time())), forged)
    ).status_code == 401
    # Told to fail the next two of this topic (a topic's own counter, so nothing else uses it up).
    set_fail = await client.post("/_sandbox/webhooks/fail", data={"count": "2", "topic": topic})
    assert set_fail.status_code in (200, 303)
    answers = [
        (await post(client, body, signature(body, secret, int(time.time())), unique("E"))).status_code
        for _ in range(3)
    ]
    assert answers == [500, 500, 200]
    [seen] = (await client.get("/_sandbox/webhooks/received", params={"event_id": good})).json()["received"]
    assert (seen["signature"], seen["status"], seen["topic"]) == ("ok", 200, topic)
    [bad] = (await client.get("/_sandbox/webhooks/received", params={"event_id": forged})).json()["received"]
    assert (bad["signature"], bad["status"]) == ("signature does not match", 401)
    page = await client.get("/_sandbox/webhooks")
    assert page.status_code == 200 and forged in page.text and "signature does not match" in page.text
    console = await client.get("/_sandbox/")
    assert "Webhooks" in console.text and "webhooks" in console.text


async def cli(server: Server, *args: str) -> Result:
    env = {
        "MALLGATE_DATABASE_URL": server.backend.url,
        "MALLGATE_VAR_DIR": str(server.settings.var_dir),
        "MALLGATE_PUBLIC_URL": server.url,
        "MALLGATE_SANDBOX": "true",
    }
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_outbox_list_show_and_retry(client: httpx.AsyncClient, server: Server) -> None:
    from test_outbox_worker import add_events

    runtime = Runtime.create(server.settings, server.clock)
    try:
        topic = unique("test.cli.")
        [event_id] = await add_events(runtime, topic, order_no=unique("T"))
        # The shared server's worker sends it to the sandbox's receiver.
        for _ in range(300):
            shown = await cli(server, "outbox", "show", str(event_id))
            if "webhook: sent" in shown.output:
                break
            await asyncio.sleep(0.05)
        assert shown.exit_code == 0 and topic in shown.output and "webhook: sent, 1 attempts" in shown.output
        listed = await cli(server, "outbox", "list", "--state", "sent", "--limit", "500")
        assert re.search(rf"#{event_id}\s+{re.escape(topic)}\s+webhook\s+sent", listed.output), listed.output
        # Given up (as after a day of 500s): `retry` makes it due again and the worker sends it.
        await runtime.db.run_write(
            lambda session: session.execute(
                update(OutboxDelivery)
                .where(OutboxDelivery.event_id == event_id)
                .values(state="failed", last_error="gave up after 40 attempts: HTTP 500")
            )
        )
        failed = await cli(server, "outbox", "list", "--state", "failed", "--limit", "500")
        assert f"#{event_id}" in failed.output and "HTTP 500" in failed.output
        retried = await cli(server, "outbox", "retry", str(event_id))
        assert retried.exit_code == 0 and "1 failed delivery due again" in retried.output, retried.output
        for _ in range(300):
            async with runtime.db.read() as session:
                state, attempts = (
                    await session.execute(
                        select(OutboxDelivery.state, OutboxDelivery.attempts).where(
                            OutboxDelivery.event_id == event_id, OutboxDelivery.sender == "webhook"
                        )
                    )
                ).one()
            if state == "sent":
                break
            await asyncio.sleep(0.05)
        assert (state, attempts) == ("sent", 2)
        received = await client.get("/_sandbox/webhooks/received", params={"event_id": str(event_id)})
        # (The receiver's book is shared by the runs on every database: its ids repeat across them.)
        mine = [r for r in received.json()["received"] if r["topic"] == topic]
        assert len(mine) == 2  # at least once: the receiver deduplicates on the id
        missing = await cli(server, "outbox", "show", "999999999")
        assert missing.exit_code == 1 and "no outbox event" in missing.output
        assert (await cli(server, "outbox", "retry", "999999999")).exit_code == 1
        assert (await cli(server, "outbox", "list", "--state", "lost")).exit_code != 0
    finally:
        await runtime.close()


def test_naive_is_utc() -> None:
    assert naive(0).isoformat() == "1970-01-01T00:00:00"
