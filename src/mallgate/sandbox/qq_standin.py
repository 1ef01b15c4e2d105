"""The QQ Connect stand-in: ``oauth2.0/me`` and ``user/get_user_info`` at ``/qq/``; tokens minted on its page.

- ``GET /qq/oauth2.0/me?access_token[&unionid=1][&fmt=json]``: by default the historic JSONP
  form ``callback( {"client_id":"…","openid":"…"} );`` as text, with ``fmt=json`` plain JSON;
  ``unionid`` only with ``unionid=1``. Errors as QQ writes them:
  ``{"error":100016,"error_description":"access token check failed"}`` for a token it never
  issued, 100014 once expired, 100013 once revoked, 100007 without a token.
- ``GET /qq/user/get_user_info?access_token&oauth_consumer_key&openid``: ``{"ret":0,…}`` or
  ``{"ret":<code>,"msg":"…"}``: the token errors above, 100016 when the consumer key or openid is
  not the token's, 100030 when the user did not allow ``get_user_info``.

A token is minted on the stand-in's page (``/qq``) for a chosen person (a name: the openid of
the chosen QQ app id and a unionid shared by every app are derived from it) and QQ app id (our
``QQ_APP_ID`` or any other: a "foreign" token). Tokens and calls live in a SQLite file under the
sandbox folder. Test hooks: ``POST /qq/_test/mint`` (JSON in, JSON out), ``POST
/qq/_test/expire`` and ``/qq/_test/revoke`` (JSON ``{"access_token": …}``), ``GET /qq/_test/counts``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mallgate.sandbox.book import SqliteBook
from mallgate.sandbox.pages import render

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY: Final = "qq"
PREFIX: Final = "/qq"
TOKEN_LIFETIME: Final = 7776000  # 90 days, QQ's expires_in
SECTION_ROWS: Final = 5

MISSING_TOKEN: Final = (100007, "param access token is wrong or lost")
TOKEN_INVALID: Final = (100013, "access token is invalid")
TOKEN_EXPIRED: Final = (100014, "access token is expired")
CHECK_FAILED: Final = (100016, "access token check failed")
NO_PERMISSION: Final = (100030, "this api without user authorization")

ME: Final = "oauth2.0/me"
USER_INFO: Final = "user/get_user_info"


def openid_of(client_id: str, name: str) -> str:
    """QQ's openid shape: 32 upper-case hex digits, per app and person."""
    return hashlib.sha256(f"qq-openid\0{client_id}\0{name}".encode()).hexdigest()[:32].upper()


def unionid_of(name: str) -> str:
    return "UID_" + hashlib.sha256(f"qq-unionid\0{name}".encode()).hexdigest()[:28].upper()


@dataclass(frozen=True)
class Minted:
    access_token: str
    client_id: str
    openid: str
    unionid: str
    nickname: str
    at: float


class QQBook(SqliteBook):
    """Tokens and calls, in one SQLite file shared by the sandbox's workers."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, client_id TEXT, openid TEXT,"
                " unionid TEXT, nickname TEXT, userinfo INTEGER, at REAL, expires REAL, revoked INTEGER)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY AUTOINCREMENT, endpoint TEXT,"
                " error INTEGER, at REAL)"
            )

    def mint(self, form: Mapping[str, str], default_client: str, now: float) -> Minted:
        name = form.get("name", "").strip()[:64] or "sandbox-user"
        client_id = form.get("client_id", "").strip()[:20] or default_client
        unionid = "" if form.get("no_unionid") else unionid_of(name)
        minted = Minted(
            access_token=secrets.token_hex(16).upper(),
            client_id=client_id,
            openid=openid_of(client_id, name),
            unionid=unionid,
            nickname=form.get("nickname", "").strip()[:64] or name,
            at=now,
        )
        with self._write() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (
                    minted.access_token,
                    client_id,
                    minted.openid,
                    unionid,
                    minted.nickname,
                    0 if form.get("no_userinfo") else 1,
                    now,
                    now + TOKEN_LIFETIME,
                ),
            )
        return minted

    def _find(
        self, db: sqlite3.Connection, token: str, now: float
    ) -> tuple[tuple[Any, ...] | None, tuple[int, str] | None]:
        if not token:
            return None, MISSING_TOKEN
        row = db.execute(
            "SELECT client_id, openid, unionid, nickname, userinfo, expires, revoked FROM tokens"
            " WHERE token = ?",
            (token,),
        ).fetchone()
        if row is None:
            return None, CHECK_FAILED
        if row[6]:
            return None, TOKEN_INVALID
        if now >= row[5]:
            return None, TOKEN_EXPIRED
        return row, None

    def me(self, token: str, with_unionid: bool, now: float) -> dict[str, Any]:
        with self._write() as db:
            row, problem = self._find(db, token, now)
            if problem:
                answer: dict[str, Any] = {"error": problem[0], "error_description": problem[1]}
            else:
                assert row is not None
                answer = {"client_id": row[0], "openid": row[1]}
                if with_unionid and row[2]:
                    answer["unionid"] = row[2]
            db.execute(
                "INSERT INTO calls (endpoint, error, at) VALUES (?, ?, ?)", (ME, answer.get("error", 0), now)
            )
        return answer

    def user_info(self, params: Mapping[str, str], now: float) -> dict[str, Any]:
        with self._write() as db:
            row, problem = self._find(db, params.get("access_token", ""), now)
            if problem is None and row is not None:
                if params.get("oauth_consumer_key") != row[0] or params.get("openid") != row[1]:
                    problem = CHECK_FAILED
                elif not row[4]:
                    problem = NO_PERMISSION
            answer = {"ret": problem[0], "msg": problem[1]} if problem else _profile(row)
            db.execute(
                "INSERT INTO calls (endpoint, error, at) VALUES (?, ?, ?)", (USER_INFO, answer["ret"], now)
            )
        return answer

    def age(self, token: str, *, revoke: bool) -> int:
        with self._write() as db:
            sql = (
                "UPDATE tokens SET revoked = 1 WHERE token = ?"
                if revoke
                else "UPDATE tokens SET expires = 0 WHERE token = ?"
            )
            return int(db.execute(sql, (token,)).rowcount)

    def counts(self) -> dict[str, int]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute("SELECT endpoint, COUNT(*) FROM calls GROUP BY endpoint").fetchall()
        found = {str(e): int(n) for e, n in rows}
        return {e: found.get(e, 0) for e in (ME, USER_INFO)}

    def recent(self, limit: int) -> list[Minted]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute(
                "SELECT token, client_id, openid, unionid, nickname, at FROM tokens ORDER BY at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [Minted(*row) for row in rows]


def _profile(row: tuple[Any, ...] | None) -> dict[str, Any]:
    assert row is not None
    avatar = f"https://thirdqq.qlogo.cn/sandbox/{row[1]}"
    return {
        "ret": 0,
        "msg": "",
        "is_lost": 0,
        "nickname": row[3],
        "gender": "男",  # QQ's answer when it does not know
        "gender_type": 2,
        "province": "",
        "city": "",
        "figureurl": avatar + "/30",
        "figureurl_1": avatar + "/50",
        "figureurl_2": avatar + "/100",
        "figureurl_qq_1": avatar + "/40",
        "figureurl_qq_2": avatar + "/100",
        "is_yellow_vip": "0",
        "vip": "0",
    }


def _jsonp(answer: dict[str, Any]) -> Response:
    # What graph.qq.com answers without fmt=json: a JSONP call, served as text.
    body = f"callback( {json.dumps(answer, separators=(',', ':'))} );\n"
    return Response(body, media_type="text/html")


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        body = {}
    return {k: str(v) for k, v in body.items()} if isinstance(body, dict) else {}


class QQStandIn:
    def __init__(self, book: QQBook, app_id: str) -> None:
        self.book = book
        self.app_id = app_id
        self.router = APIRouter(prefix=PREFIX)
        self._routes()

    async def aclose(self) -> None:
        return None

    async def _page(self, request: Request, minted: Minted | None = None) -> Response:
        recent, counts = await asyncio.gather(
            asyncio.to_thread(self.book.recent, 20), asyncio.to_thread(self.book.counts)
        )
        return render(
            request,
            "qq.html",
            title="QQ Connect",
            app_id=self.app_id,
            minted=minted,
            tokens=recent,
            counts=counts,
        )

    def _routes(self) -> None:
        book = self.book

        @self.router.get("/oauth2.0/me")
        async def me(request: Request) -> Response:
            q = request.query_params
            answer = await asyncio.to_thread(
                book.me, q.get("access_token", ""), q.get("unionid") == "1", time.time()
            )
            return JSONResponse(answer) if q.get("fmt") == "json" else _jsonp(answer)

        @self.router.get("/user/get_user_info")
        async def user_info(request: Request) -> Response:
            answer = await asyncio.to_thread(book.user_info, dict(request.query_params), time.time())
            # QQ serves this JSON as text/html too.
            return Response(json.dumps(answer, ensure_ascii=False), media_type="text/html")

        @self.router.get("")
        async def page(request: Request) -> Response:
            return await self._page(request)

        @self.router.post("/mint")
        async def mint_form(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
            minted = await asyncio.to_thread(book.mint, form, self.app_id, time.time())
            return await self._page(request, minted)

        @self.router.post("/_test/mint")
        async def mint(request: Request) -> JSONResponse:
            minted = await asyncio.to_thread(book.mint, await _json_body(request), self.app_id, time.time())
            return JSONResponse(
                {
                    "access_token": minted.access_token,
                    "client_id": minted.client_id,
                    "openid": minted.openid,
                    "unionid": minted.unionid,
                    "expires_in": TOKEN_LIFETIME,
                }
            )

        @self.router.post("/_test/expire")
        async def expire(request: Request) -> JSONResponse:
            token = (await _json_body(request)).get("access_token", "")
            return JSONResponse({"expired": await asyncio.to_thread(book.age, token, revoke=False)})

        @self.router.post("/_test/revoke")
        async def revoke(request: Request) -> JSONResponse:
            token = (await _json_body(request)).get("access_token", "")
            return JSONResponse({"revoked": await asyncio.to_thread(book.age, token, revoke=True)})

        @self.router.get("/_test/counts")
        async def counts() -> JSONResponse:
            return JSONResponse(await asyncio.to_thread(book.counts))


def qq_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import QQ_APP_ID, StandIn

    standin = QQStandIn(QQBook(state.folder / "qq.sqlite3"), QQ_APP_ID)
    state.resources[RESOURCE_KEY] = standin

    async def recent() -> dict[str, Any]:
        tokens, counts = await asyncio.gather(
            asyncio.to_thread(standin.book.recent, SECTION_ROWS), asyncio.to_thread(standin.book.counts)
        )
        return {"tokens": tokens, "counts": counts, "app_id": QQ_APP_ID}

    return StandIn(
        name="QQ Connect",
        summary="graph.qq.com oauth2.0/me (JSONP and JSON) and user/get_user_info at /qq/, "
        "APP access tokens minted here",
        router=standin.router,
        links=[("mint a token", "/qq"), ("call counts", "/qq/_test/counts")],
        section="sections/qq.html",
        context=recent,
        page="/qq",
    )
