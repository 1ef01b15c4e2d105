"""The Mini Program login stand-in at ``/wechat/``: jscode2session and getuserphonenumber.

- ``GET /wechat/sns/jscode2session?appid&secret&js_code&grant_type=authorization_code``: a
  login code works once (40163 ``code been used``) and for 5 minutes (then 40029 ``invalid
  code``, as for a code never minted or minted for another app); more than 100 exchanges
  for one openid in a minute answer 45011. The answer has ``unionid`` when the code was
  minted with one, and a new ``session_key`` per code.
- ``POST /wechat/wxa/business/getuserphonenumber?access_token`` JSON ``{"code"}``: the token
  is checked by the WeChat API stand-in (40001, 42001); a phone code works once, for
  5 minutes and for the token's app only (else 40029, what WeChat answers for all three).

What the phone would have: the console page ``/wechat/mini`` (and the test hooks
``POST /wechat/_test/mini/code`` → ``{"code", "session_key", "openid", "unionid"}`` and
``POST /wechat/_test/mini/phone_code`` → ``{"code"}``; ``POST /wechat/_test/mini/encrypt``
seals open data under a code's session_key as ``wx.getUserInfo`` would). ``POST
/wechat/_test/mini/fail_next`` JSON ``{"endpoint", "errcode", "delay"}`` makes the next call
of an endpoint answer that error (-1 busy, 45011...) or wait ``delay`` seconds first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import string
import time
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from mallgate.channels.wechat_mini import encrypt_open_data
from mallgate.sandbox.book import SqliteBook
from mallgate.sandbox.pages import render
from mallgate.sandbox.wechat_oauth_standin import openid_of, unionid_of
from mallgate.sandbox.wechat_standin import (
    INVALID_APPID,
    INVALID_GRANT,
    INVALID_SECRET,
    MINUTE_QUOTA,
    NOT_JSON,
    error,
    sandbox_apps,
)

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY: Final = "wechat_mini"
PREFIX: Final = "/wechat"
CODE_LIFETIME: Final = 300
PER_USER_PER_MINUTE: Final = 100
SECTION_ROWS: Final = 5
_ALNUM: Final = string.ascii_letters + string.digits

INVALID_CODE: Final = (40029, "invalid code")
CODE_USED: Final = (40163, "code been used")
BUSY: Final = (-1, "system error")
MISSING_CODE: Final = (41008, "missing code")

SESSION: Final = "jscode2session"
PHONE: Final = "getuserphonenumber"
ENDPOINTS: Final = (SESSION, PHONE)
KNOWN_ERRORS: Final = {
    -1: BUSY[1],
    40029: INVALID_CODE[1],
    40163: CODE_USED[1],
    40226: "code blocked",  # a high-risk user, refused by WeChat's login interception
    45011: MINUTE_QUOTA[1],
}


def _new_code() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(32))


@dataclass(frozen=True)
class Minted:
    kind: str
    code: str
    app_id: str
    who: str  # the openid, or the phone number
    at: float
    used: bool


class MiniBook(SqliteBook):
    """Minted codes and calls, in one SQLite file shared by the sandbox's workers."""

    def __init__(self, path: Path, apps: Mapping[str, str]) -> None:
        super().__init__(path)
        self.apps = dict(apps)
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS logins (code TEXT PRIMARY KEY, app_id TEXT, openid TEXT,"
                " unionid TEXT, session_key TEXT, at REAL, used_at REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS phones (code TEXT PRIMARY KEY, app_id TEXT, phone TEXT,"
                " country TEXT, at REAL, used_at REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY AUTOINCREMENT, endpoint TEXT,"
                " app_id TEXT, openid TEXT, errcode INTEGER, at REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS fail_next (endpoint TEXT PRIMARY KEY, errcode INTEGER,"
                " delay REAL)"
            )

    # --- what the phone has ---

    def mint_login(self, app_id: str, openid: str, unionid: str, now: float) -> dict[str, str]:
        code, session_key = _new_code(), base64.b64encode(secrets.token_bytes(16)).decode()
        with self._write() as db:
            db.execute(
                "INSERT INTO logins VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (code, app_id, openid, unionid, session_key, now),
            )
        return {"code": code, "session_key": session_key, "openid": openid, "unionid": unionid}

    def mint_phone(self, app_id: str, phone: str, country: str, now: float) -> str:
        code = _new_code()
        with self._write() as db:
            db.execute("INSERT INTO phones VALUES (?, ?, ?, ?, ?, NULL)", (code, app_id, phone, country, now))
        return code

    def session_key_of(self, code: str) -> tuple[str, str]:
        """(app_id, session_key) of a minted login code; ("", "") when unknown."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            row = db.execute("SELECT app_id, session_key FROM logins WHERE code = ?", (code,)).fetchone()
        return (str(row[0]), str(row[1])) if row else ("", "")

    def fail_next(self, endpoint: str, errcode: int, delay: float) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO fail_next VALUES (?, ?, ?)", (endpoint, errcode, delay))

    def take_failure(self, endpoint: str) -> tuple[int, float] | None:
        with self._write() as db:
            row = db.execute(
                "SELECT errcode, delay FROM fail_next WHERE endpoint = ?", (endpoint,)
            ).fetchone()
            db.execute("DELETE FROM fail_next WHERE endpoint = ?", (endpoint,))
        return (int(row[0]), float(row[1])) if row else None

    # --- WeChat's side ---

    @staticmethod
    def _log(
        db: sqlite3.Connection, endpoint: str, app_id: str, openid: str, answer: dict[str, Any], now: float
    ) -> None:
        db.execute(
            "INSERT INTO calls (endpoint, app_id, openid, errcode, at) VALUES (?, ?, ?, ?, ?)",
            (endpoint, app_id, openid, int(answer.get("errcode", 0)), now),
        )

    def code2session(self, params: Mapping[str, str], now: float) -> dict[str, Any]:
        app_id = params.get("appid", "")
        with self._write() as db:
            answer, openid = self._code2session(db, app_id, params, now)
            self._log(db, SESSION, app_id, openid, answer, now)
        return answer

    def _code2session(
        self, db: sqlite3.Connection, app_id: str, params: Mapping[str, str], now: float
    ) -> tuple[dict[str, Any], str]:
        if params.get("grant_type") != "authorization_code":
            return error(*INVALID_GRANT), ""
        secret = self.apps.get(app_id)
        if secret is None:
            return error(*INVALID_APPID), ""
        if not secrets.compare_digest(params.get("secret", "").encode(), secret.encode()):
            return error(*INVALID_SECRET), ""
        code = params.get("js_code", "")
        if not code:
            return error(*MISSING_CODE), ""
        row = db.execute(
            "SELECT app_id, openid, unionid, session_key, at, used_at FROM logins WHERE code = ?", (code,)
        ).fetchone()
        if row is None or row[0] != app_id or now - row[4] > CODE_LIFETIME:
            return error(*INVALID_CODE), ""
        _app, openid, unionid, session_key, _at, used_at = row
        if used_at is not None:
            return error(*CODE_USED), openid
        (recent,) = db.execute(
            "SELECT COUNT(*) FROM calls WHERE endpoint = ? AND app_id = ? AND openid = ? AND at > ?",
            (SESSION, app_id, openid, now - 60),
        ).fetchone()
        if recent >= PER_USER_PER_MINUTE:
            return error(*MINUTE_QUOTA), openid
        db.execute("UPDATE logins SET used_at = ? WHERE code = ?", (now, code))
        answer: dict[str, Any] = {"session_key": session_key, "openid": openid}
        if unionid:
            answer["unionid"] = unionid
        return answer, openid

    def phone_number(self, token_app: str, body: Any, now: float) -> dict[str, Any]:
        with self._write() as db:
            answer = self._phone_number(db, token_app, body, now)
            self._log(db, PHONE, token_app, "", answer, now)
        return answer

    def _phone_number(self, db: sqlite3.Connection, token_app: str, body: Any, now: float) -> dict[str, Any]:
        if not isinstance(body, dict):
            return error(*NOT_JSON)
        code = body.get("code")
        if not isinstance(code, str) or not code:
            return error(*MISSING_CODE)
        row = db.execute(
            "SELECT app_id, phone, country, at, used_at FROM phones WHERE code = ?", (code,)
        ).fetchone()
        # WeChat answers 40029 for a wrong, used or expired code, and for another app's.
        if row is None or row[0] != token_app or row[4] is not None or now - row[3] > CODE_LIFETIME:
            return error(*INVALID_CODE)
        db.execute("UPDATE phones SET used_at = ? WHERE code = ?", (now, code))
        phone, country = str(row[1]), str(row[2])
        shown = phone if country == "86" else f"+{country}{phone}"
        return {
            "errcode": 0,
            "errmsg": "ok",
            "phone_info": {
                "phoneNumber": shown,
                "purePhoneNumber": phone,
                "countryCode": int(country) if country.isdigit() else country,  # a number, as in the sample
                "watermark": {"timestamp": int(now), "appid": token_app},
            },
        }

    # --- for tests and the console ---

    def counts(self) -> dict[str, int]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute("SELECT endpoint, COUNT(*) FROM calls GROUP BY endpoint").fetchall()
        found = {str(endpoint): int(n) for endpoint, n in rows}
        return {endpoint: found.get(endpoint, 0) for endpoint in ENDPOINTS}

    def recent(self, limit: int) -> list[Minted]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute(
                "SELECT 'login', code, app_id, openid, at, used_at FROM logins UNION ALL"
                " SELECT 'phone', code, app_id, phone, at, used_at FROM phones ORDER BY 5 DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [Minted(r[0], r[1], r[2], r[3], r[4], r[5] is not None) for r in rows]


def _form(body: bytes) -> dict[str, str]:
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class WechatMiniStandIn:
    def __init__(self, book: MiniBook, state: SandboxState, app_id: str) -> None:
        self.book = book
        self.state = state
        self.app_id = app_id
        self.router = APIRouter(prefix=PREFIX)
        self._routes()

    async def aclose(self) -> None:
        return None

    def _token_app(self, access_token: str) -> tuple[str, dict[str, Any] | None]:
        from mallgate.sandbox.wechat_standin import RESOURCE_KEY as API_KEY
        from mallgate.sandbox.wechat_standin import WechatStandIn

        api = self.state.resources.get(API_KEY)
        assert isinstance(api, WechatStandIn)  # registered before this stand-in
        return api.check_token(access_token)

    def mint_login(self, values: Mapping[str, Any]) -> dict[str, str]:
        name = str(values.get("name") or "").strip() or "sandbox-user"
        openid = str(values.get("openid") or "").strip() or openid_of(self.app_id, name)
        unionid = (
            "" if values.get("no_unionid") else (str(values.get("unionid") or "").strip() or unionid_of(name))
        )
        return self.book.mint_login(self.app_id, openid, unionid, time.time())

    async def _failure(self, endpoint: str) -> dict[str, Any] | None:
        failure = await asyncio.to_thread(self.book.take_failure, endpoint)
        if failure is None:
            return None
        errcode, delay = failure
        if delay > 0:
            await asyncio.sleep(delay)
        return error(errcode, KNOWN_ERRORS.get(errcode, "system error")) if errcode else None

    def _routes(self) -> None:
        book = self.book

        @self.router.get("/sns/jscode2session")
        async def code2session(request: Request) -> JSONResponse:
            forced = await self._failure(SESSION)
            if forced is not None:
                return JSONResponse(forced)
            params = dict(request.query_params)
            return JSONResponse(await asyncio.to_thread(book.code2session, params, time.time()))

        @self.router.post("/wxa/business/getuserphonenumber")
        async def phone_number(request: Request) -> JSONResponse:
            forced = await self._failure(PHONE)
            if forced is not None:
                return JSONResponse(forced)
            app_id, problem = await asyncio.to_thread(
                self._token_app, request.query_params.get("access_token", "")
            )
            if problem is not None:
                return JSONResponse(problem)
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            return JSONResponse(await asyncio.to_thread(book.phone_number, app_id, body, time.time()))

        @self.router.get("/mini")
        async def page(request: Request, shown: str = "", kind: str = "") -> Response:
            minted = await asyncio.to_thread(book.recent, 20)
            return render(
                request,
                "wechat_mini.html",
                title="Mini Program login · 小程序登录",
                minted=minted,
                shown=shown,
                kind=kind,
                app_id=self.app_id,
                now=time.time(),
            )

        @self.router.post("/mini/code")
        async def mint_code_form(request: Request) -> Response:
            minted = await asyncio.to_thread(self.mint_login, _form(await request.body()))
            return RedirectResponse(f"../mini?kind=login&shown={minted['code']}", status_code=303)

        @self.router.post("/mini/phone_code")
        async def mint_phone_form(request: Request) -> Response:
            form = _form(await request.body())
            phone, country = form.get("phone", "").strip(), form.get("country", "86").strip() or "86"
            if not phone.isdigit() or not country.isdigit():
                return RedirectResponse("../mini?kind=refused", status_code=303)
            code = await asyncio.to_thread(book.mint_phone, self.app_id, phone, country, time.time())
            return RedirectResponse(f"../mini?kind=phone&shown={code}", status_code=303)

        @self.router.post("/_test/mini/code")
        async def mint_code(request: Request) -> JSONResponse:
            return JSONResponse(await asyncio.to_thread(self.mint_login, await _json(request)))

        @self.router.post("/_test/mini/phone_code")
        async def mint_phone(request: Request) -> JSONResponse:
            body = await _json(request)
            app_id = str(body.get("appid") or self.app_id)
            code = await asyncio.to_thread(
                book.mint_phone,
                app_id,
                str(body.get("phone", "")),
                str(body.get("country", "86")),
                time.time(),
            )
            return JSONResponse({"code": code})

        @self.router.post("/_test/mini/encrypt")
        async def encrypt(request: Request) -> JSONResponse:
            """Open data as wx.getUserInfo gives it: sealed under the session_key of `code`."""
            body = await _json(request)
            app_id, session_key = await asyncio.to_thread(book.session_key_of, str(body.get("code", "")))
            if not session_key:
                return JSONResponse({"error": "unknown code"}, 404)
            data = body.get("data")
            data = data if isinstance(data, dict) else {}
            watermark = {"appid": app_id, "timestamp": int(time.time())}
            # A test may age the watermark or name another appid: what the service must refuse.
            given = body.get("watermark")
            sealed = {**data, "watermark": {**watermark, **(given if isinstance(given, dict) else {})}}
            iv = base64.b64encode(secrets.token_bytes(16)).decode()
            return JSONResponse({"encryptedData": encrypt_open_data(session_key, iv, sealed), "iv": iv})

        @self.router.post("/_test/mini/fail_next")
        async def fail_next(request: Request) -> JSONResponse:
            body = await _json(request)
            endpoint = str(body.get("endpoint", SESSION))
            if endpoint not in ENDPOINTS:
                return JSONResponse({"error": f"endpoint is one of {ENDPOINTS}"}, 400)
            await asyncio.to_thread(
                book.fail_next, endpoint, int(body.get("errcode", 0)), float(body.get("delay", 0))
            )
            return JSONResponse({"ok": True})

        @self.router.get("/_test/mini/counts")
        async def counts() -> JSONResponse:
            return JSONResponse(await asyncio.to_thread(book.counts))


def wechat_mini_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import WECHAT_MINI_APP_ID, StandIn

    standin = WechatMiniStandIn(
        MiniBook(state.folder / "wechat_mini.sqlite3", sandbox_apps(state)), state, WECHAT_MINI_APP_ID
    )
    state.resources[RESOURCE_KEY] = standin

    async def recent() -> dict[str, Any]:
        minted, counts = await asyncio.gather(
            asyncio.to_thread(standin.book.recent, SECTION_ROWS), asyncio.to_thread(standin.book.counts)
        )
        return {"minted": minted, "counts": counts, "now": time.time()}

    return StandIn(
        name="WeChat Mini Program",
        summary="sns/jscode2session and wxa/business/getuserphonenumber at /wechat/, "
        "and the wx.login and getPhoneNumber codes a phone would have",
        router=standin.router,
        links=[("mint codes", "/wechat/mini"), ("call counts", "/wechat/_test/mini/counts")],
        section="sections/wechat_mini.html",
        context=recent,
        page="/wechat/mini",
    )
