"""The mall's backend, played: a webhook receiver at ``/webhooks/receive``.

With the sandbox on and ``MALLGATE_WEBHOOK__URL`` unset, the outbox worker POSTs every
event here, signed with the sandbox's webhook secret. ``/webhooks`` shows what arrived,
each with its signature checked by `mallgate.webhooks.verify_webhook` (the helper the
mall's backend uses), and can be told to answer 500 to the next N deliveries, to watch
the retries with backoff; ``/webhooks/received`` gives the same as JSON (tests).

The deliveries live in a SQLite file under the sandbox folder, so that every worker of
``serve --workers N`` shows the same and one "fail the next N" counter holds for all.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from mallgate.sandbox.book import SqliteBook
from mallgate.sandbox.pages import render
from mallgate.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, WebhookRejected, verify_webhook

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn
    from mallgate.sandbox.keys import SandboxKeys

RECEIVE_PATH: Final = "/webhooks/receive"
SECTION_ROWS: Final = 5
KEEP_ROWS: Final = 2000
_BODY_LIMIT: Final = 256 * 1024


def webhook_secret(keys: SandboxKeys) -> str:
    """The sandbox's webhook secret, derived from its key set so both sides agree without storing it."""
    return hmac.new(keys.wechatpay_api_key.encode(), b"mallgate sandbox webhook", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Received:
    id: int
    event_id: str
    topic: str
    signature: str  # "ok" or why not
    status: int  # what the receiver answered
    body: str
    at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "topic": self.topic,
            "signature": self.signature,
            "status": self.status,
            "body": self.body,
            "at": self.at,
        }


class WebhookBook(SqliteBook):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS received (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT,"
                " topic TEXT, signature TEXT, status INTEGER, body TEXT, at REAL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value INTEGER)")

    def record(self, event_id: str, topic: str, signature: str, body: str, at: float) -> int:
        """Stores a delivery; answers 500 while the fail counter lasts (and counts it down), else 200."""
        with self._write() as db:
            failing = False
            # A topic's own counter first (a test's), then the one for every delivery (the page's).
            for name in (f"fail_next:{topic}", "fail_next"):
                row = db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
                if row and row[0] > 0:
                    db.execute("UPDATE settings SET value = value - 1 WHERE name = ?", (name,))
                    failing = True
                    break
            status = 500 if failing else (200 if signature == "ok" else 401)
            db.execute(
                "INSERT INTO received (event_id, topic, signature, status, body, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (event_id, topic, signature, status, body, at),
            )
            db.execute("DELETE FROM received WHERE id <= (SELECT MAX(id) FROM received) - ?", (KEEP_ROWS,))
        return status

    def set_fail_next(self, count: int, topic: str = "") -> None:
        name = f"fail_next:{topic}" if topic else "fail_next"
        with self._write() as db:
            db.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, max(count, 0)),
            )

    def fail_next(self) -> int:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            row = db.execute("SELECT value FROM settings WHERE name = 'fail_next'").fetchone()
        return int(row[0]) if row else 0

    def received(self, event_id: str | None = None, limit: int = 200) -> list[Received]:
        query = "SELECT id, event_id, topic, signature, status, body, at FROM received"
        args: tuple[Any, ...] = ()
        if event_id:
            query += " WHERE event_id = ?"
            args = (event_id,)
        query += " ORDER BY id DESC LIMIT ?"
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute(query, (*args, limit)).fetchall()
        return [Received(*row) for row in rows]


def _topic(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    topic = document.get("topic") if isinstance(document, dict) else None
    return str(topic) if topic else ""


def webhook_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import StandIn

    book = WebhookBook(state.folder / "webhooks.sqlite3")
    secret = webhook_secret(state.keys)
    router = APIRouter()

    @router.post(RECEIVE_PATH)
    async def receive(request: Request) -> Response:
        body = await request.body()
        if len(body) > _BODY_LIMIT:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            verify_webhook(body, request.headers.get(SIGNATURE_HEADER), secret)
            signature = "ok"
        except WebhookRejected as exc:
            signature = str(exc)
        status = await asyncio.to_thread(
            book.record,
            request.headers.get(EVENT_ID_HEADER, ""),
            _topic(body),
            signature,
            body.decode("utf-8", "replace"),
            time.time(),
        )
        return JSONResponse({"received": status == 200}, status_code=status)

    @router.get("/webhooks")
    async def page(request: Request) -> Response:
        rows = await asyncio.to_thread(book.received)
        return render(
            request,
            "webhooks.html",
            title="Webhooks",
            received=rows,
            fail_next=await asyncio.to_thread(book.fail_next),
        )

    @router.get("/webhooks/received")
    async def received(event_id: str = "") -> Response:
        rows = await asyncio.to_thread(book.received, event_id or None)
        return JSONResponse({"received": [r.as_json() for r in rows]})

    @router.post("/webhooks/fail")
    async def fail(request: Request) -> Response:
        form = await request.form()
        raw = str(form.get("count", "0")).strip()
        topic = str(form.get("topic", "")).strip()[:64]
        await asyncio.to_thread(book.set_fail_next, int(raw) if raw.isdigit() else 0, topic)
        return RedirectResponse("../webhooks", status_code=303)

    async def recent() -> dict[str, Any]:
        return {
            "received": await asyncio.to_thread(book.received, None, SECTION_ROWS),
            "fail_next": await asyncio.to_thread(book.fail_next),
        }

    return StandIn(
        name="Webhooks",
        summary="the mall's backend: the signed events the outbox worker POSTs, with their signature checked",
        router=router,
        links=[("received", "/webhooks"), ("received (JSON)", "/webhooks/received")],
        section="sections/webhooks.html",
        context=recent,
        page="/webhooks",
    )
