"""The Mini Program server API stand-in at ``/wechat/``: getwxacodeunlimit and subscribe/send.

- ``POST /wechat/wxa/getwxacodeunlimit?access_token=`` (JSON body, else 40169): the
  token checked as every WeChat API checks it (`WechatStandIn.check_token`); ``scene``
  required, at most 32 characters of WeChat's set (40169 too long, 40129 other
  characters); ``page`` without a leading ``/`` or a query (41030). The answer is a real
  PNG: a QR code (not WeChat's round code, which only WeChat can draw) of
  ``<page>?scene=<scene>``, so a test or a phone reads back what the code carries.
- ``POST /wechat/cgi-bin/message/subscribe/send?access_token=``: ``touser`` (40003),
  ``template_id`` (40037) and ``data`` of ``{"keyword": {"value": ...}}`` (47003) checked;
  43101 when the user has not consented. Only WeChat knows consent; here every openid
  consents unless a test or the console says otherwise (``POST
  /wechat/_test/subscribe/consent``, JSON or form ``openid`` and ``consent`` 0/1).

Codes, messages, consent and a queued failure live in a SQLite file under the sandbox
folder, so the workers of one sandbox agree. Test hooks: ``POST /wechat/_test/wxa/fail``
(JSON ``{"errcode", "errmsg"}``: the next code request answers it), ``GET
/wechat/_test/wxa/codes`` and ``GET /wechat/_test/subscribe/sent?touser=``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from mallgate.channels.qr import render_png
from mallgate.channels.wechat_wxa import SCENE_MAX, SCENE_SHAPE
from mallgate.sandbox.book import SqliteBook
from mallgate.sandbox.wechat_standin import INVALID_ARGS, NOT_JSON, WechatStandIn, error

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY: Final = "wechat_wxa"
PREFIX: Final = "/wechat"
SECTION_ROWS: Final = 8
SCENE_TOO_LONG: Final = (40169, "invalid length for scene, or the data is not json string")
SCENE_INVALID: Final = (40129, "invalid scene")
INVALID_PAGE: Final = (41030, "invalid page")
INVALID_OPENID: Final = (40003, "invalid openid")
INVALID_TEMPLATE: Final = (40037, "invalid template_id")
INVALID_DATA: Final = (47003, "argument invalid! data.")
USER_REFUSED: Final = (43101, "user refuse to accept the msg")


@dataclass(frozen=True)
class Sent:
    id: int
    app_id: str
    touser: str
    template_id: str
    page: str
    data: dict[str, Any]
    errcode: int
    at: float


@dataclass(frozen=True)
class Code:
    id: int
    app_id: str
    scene: str
    page: str
    errcode: int
    at: float


def code_content(page: str, scene: str) -> str:
    """What the sandbox's code image encodes."""
    return f"{page}?scene={scene}"


class WxaBook(SqliteBook):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS codes (id INTEGER PRIMARY KEY AUTOINCREMENT, app_id TEXT,"
                " scene TEXT, page TEXT, errcode INTEGER, at REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS sent (id INTEGER PRIMARY KEY AUTOINCREMENT, app_id TEXT,"
                " touser TEXT, template_id TEXT, page TEXT, data TEXT, errcode INTEGER, at REAL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS refusing (openid TEXT PRIMARY KEY)")
            db.execute("CREATE TABLE IF NOT EXISTS faults (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT)")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            return db.execute(sql, args).fetchall()

    # --- codes ---

    def queue_fault(self, answer: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("INSERT INTO faults (body) VALUES (?)", (json.dumps(answer),))

    def code(self, app_id: str, body: Any, now: float) -> bytes | dict[str, Any]:
        with self._write() as db:
            answer = self._code_problem(db, body)
            scene = str(body.get("scene", "")) if isinstance(body, dict) else ""
            page = str(body.get("page", "")) if isinstance(body, dict) else ""
            errcode = int(answer["errcode"]) if answer else 0
            db.execute(
                "INSERT INTO codes (app_id, scene, page, errcode, at) VALUES (?, ?, ?, ?, ?)",
                (app_id, scene, page, errcode, now),
            )
        if answer:
            return answer
        return render_png(code_content(page, scene), scale=8, border=4)

    @staticmethod
    def _code_problem(db: sqlite3.Connection, body: Any) -> dict[str, Any] | None:
        fault = db.execute("SELECT id, body FROM faults ORDER BY id LIMIT 1").fetchone()
        if fault is not None:
            db.execute("DELETE FROM faults WHERE id = ?", (fault[0],))
            queued: dict[str, Any] = json.loads(fault[1])
            return error(int(queued.get("errcode", -1)), str(queued.get("errmsg", "system error")))
        if not isinstance(body, dict):
            return error(*SCENE_TOO_LONG)
        scene, page = body.get("scene"), body.get("page", "")
        if not isinstance(scene, str) or not scene or len(scene) > SCENE_MAX:
            return error(*SCENE_TOO_LONG)
        if not SCENE_SHAPE.fullmatch(scene):
            return error(*SCENE_INVALID)
        if not isinstance(page, str) or page.startswith("/") or "?" in page:
            return error(*INVALID_PAGE)
        if body.get("env_version", "release") not in ("release", "trial", "develop"):
            return error(*INVALID_ARGS)
        return None

    def codes(self, limit: int = 100) -> list[Code]:
        rows = self._read(
            "SELECT id, app_id, scene, page, errcode, at FROM codes ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [Code(*row) for row in rows]

    # --- subscribe messages ---

    def set_consent(self, openid: str, consent: bool) -> None:
        with self._write() as db:
            if consent:
                db.execute("DELETE FROM refusing WHERE openid = ?", (openid,))
            else:
                db.execute("INSERT OR IGNORE INTO refusing (openid) VALUES (?)", (openid,))

    def refusing(self) -> list[str]:
        return [row[0] for row in self._read("SELECT openid FROM refusing ORDER BY openid")]

    def send(self, app_id: str, body: Any, now: float) -> dict[str, Any]:
        with self._write() as db:
            answer = self._send_problem(db, body)
            fields = body if isinstance(body, dict) else {}
            cursor = db.execute(
                "INSERT INTO sent (app_id, touser, template_id, page, data, errcode, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    app_id,
                    str(fields.get("touser", "")),
                    str(fields.get("template_id", "")),
                    str(fields.get("page", "")),
                    json.dumps(fields.get("data", {}), ensure_ascii=False),
                    int(answer["errcode"]) if answer else 0,
                    now,
                ),
            )
        return answer or {"errcode": 0, "errmsg": "ok", "msgid": 2_000_000_000 + int(cursor.lastrowid or 0)}

    @staticmethod
    def _send_problem(db: sqlite3.Connection, body: Any) -> dict[str, Any] | None:
        if not isinstance(body, dict):
            return error(*NOT_JSON)
        touser, template_id, data = body.get("touser"), body.get("template_id"), body.get("data")
        if not isinstance(touser, str) or not touser:
            return error(*INVALID_OPENID)
        if not isinstance(template_id, str) or not template_id:
            return error(*INVALID_TEMPLATE)
        if not isinstance(data, dict) or not data:
            return error(*INVALID_DATA)
        for keyword, value in data.items():
            if not isinstance(value, dict) or not isinstance(value.get("value"), str):
                return error(INVALID_DATA[0], f"{INVALID_DATA[1]}{keyword}.value")
        if db.execute("SELECT 1 FROM refusing WHERE openid = ?", (touser,)).fetchone():
            return error(*USER_REFUSED)
        return None

    def sent(self, touser: str = "", limit: int = 100) -> list[Sent]:
        where, args = ("WHERE touser = ?", (touser, limit)) if touser else ("", (limit,))
        rows = self._read(
            f"SELECT id, app_id, touser, template_id, page, data, errcode, at FROM sent {where}"  # noqa: S608
            " ORDER BY id DESC LIMIT ?",
            args,
        )
        return [Sent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]


class WxaStandIn:
    def __init__(self, book: WxaBook, state: SandboxState) -> None:
        self.book = book
        self.state = state
        self.router = APIRouter(prefix=PREFIX)
        self._routes()

    async def aclose(self) -> None:
        return None

    def _app_of(self, access_token: str) -> tuple[str, dict[str, Any] | None]:
        api = self.state.resources["wechat"]
        assert isinstance(api, WechatStandIn)
        return api.check_token(access_token)

    def _routes(self) -> None:
        book = self.book

        async def checked(request: Request) -> tuple[str, Any, dict[str, Any] | None]:
            token = request.query_params.get("access_token", "")
            app_id, problem = await asyncio.to_thread(self._app_of, token)
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            return app_id, body, problem

        @self.router.post("/wxa/getwxacodeunlimit")
        async def getwxacodeunlimit(request: Request) -> Response:
            app_id, body, problem = await checked(request)
            if problem:
                return JSONResponse(problem)
            answer = await asyncio.to_thread(book.code, app_id, body, time.time())
            if isinstance(answer, dict):
                return JSONResponse(answer)
            return Response(answer, media_type="image/png")

        @self.router.post("/cgi-bin/message/subscribe/send")
        async def subscribe_send(request: Request) -> JSONResponse:
            app_id, body, problem = await checked(request)
            if problem:
                return JSONResponse(problem)
            return JSONResponse(await asyncio.to_thread(book.send, app_id, body, time.time()))

        @self.router.post("/_test/wxa/fail")
        async def fail(request: Request) -> JSONResponse:
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                body = {}
            await asyncio.to_thread(book.queue_fault, body if isinstance(body, dict) else {})
            return JSONResponse({"queued": True})

        @self.router.get("/_test/wxa/codes")
        async def codes() -> JSONResponse:
            found = await asyncio.to_thread(book.codes)
            return JSONResponse([c.__dict__ for c in found])

        @self.router.get("/_test/subscribe/sent")
        async def sent(request: Request) -> JSONResponse:
            found = await asyncio.to_thread(book.sent, request.query_params.get("touser", ""))
            return JSONResponse([s.__dict__ for s in found])

        @self.router.post("/_test/subscribe/consent", response_model=None)
        async def consent(request: Request) -> JSONResponse | RedirectResponse:
            raw = await request.body()
            form = request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
            try:
                body = dict(parse_qsl(raw.decode())) if form else json.loads(raw or b"{}")
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            openid = str(body.get("openid", "")).strip()
            allowed = str(body.get("consent", "1")).lower() not in ("0", "false", "no", "off")
            if openid:
                await asyncio.to_thread(book.set_consent, openid, allowed)
            if form:
                # Back to the console (redirect after POST: a refresh changes nothing more).
                console = f"{request.scope.get('root_path', '')}/#wechat-wxa-codes-and-subscribe-messages"
                return RedirectResponse(console, 303)
            return JSONResponse({"openid": openid, "consent": allowed})


def wechat_wxa_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import StandIn

    standin = WxaStandIn(WxaBook(state.folder / "wechat_wxa.sqlite3"), state)
    state.resources[RESOURCE_KEY] = standin

    async def recent() -> dict[str, Any]:
        codes, sent, refusing = await asyncio.gather(
            asyncio.to_thread(standin.book.codes, SECTION_ROWS),
            asyncio.to_thread(standin.book.sent, "", SECTION_ROWS),
            asyncio.to_thread(standin.book.refusing),
        )
        return {"codes": codes, "sent": sent, "refusing": refusing}

    return StandIn(
        name="WeChat wxa codes and subscribe messages",
        summary="wxa/getwxacodeunlimit (a QR of page?scene=) and cgi-bin/message/subscribe/send "
        "(43101 without consent) at /wechat/",
        router=standin.router,
        links=[("codes made", "/wechat/_test/wxa/codes"), ("messages sent", "/wechat/_test/subscribe/sent")],
        section="sections/wechat_wxa.html",
        context=recent,
    )
