"""The WeChat open API stand-in at ``/wechat/``: access_token, stable_token and jsapi_ticket.

It answers as api.weixin.qq.com does (HTTP 200, ``{"errcode", "errmsg"}`` with a
``rid`` suffix on errors), for the sandbox's three apps (Official Account, Mini
Program, APP), all with the sandbox's app secret:

- Credentials: an unknown appid answers 40013; a secret that is not 32 hex digits 40125
  (invalid appsecret); a well-formed but wrong one 40001, as the getAccessToken
  reference lists it ("AppSecret错误").
- ``GET cgi-bin/token``: a new token on every call; the previous one keeps working for
  5 minutes (WeChat's grace window). 2000 a day per app, then 45009.
- ``POST cgi-bin/stable_token`` (JSON only, else 47001): normal mode returns the same
  token until its last 5 minutes, then a new one (the old one lives out its time);
  ``force_refresh: true`` kills the current token at once and issues a new one, 20
  times a day per app (then 45009); a forced call within 30 s of the last one does
  not refresh (WeChat's rule) and returns the current token. Classic and stable
  tokens are separate, as at WeChat: neither call invalidates the other's tokens.
  10,000 calls a minute per app, then 45011.
- ``GET cgi-bin/ticket/getticket?access_token&type=jsapi``: the app's jsapi_ticket (the
  same one until its last 5 minutes); 40001 for a token that is unknown or was
  invalidated, 42001 for one that expired.

Tokens, tickets and every call are kept in a SQLite file under the sandbox folder, so
that the uvicorn workers of one sandbox agree (a token one worker issued works at the
others) and tests can count upstream fetches across processes. Other WeChat stand-ins
(OAuth, the Mini Program) mount their routes on `WechatStandIn.router` or their own
router, and check the tokens their callers present with `WechatStandIn.check_token`.

Test hooks: ``POST /wechat/_test/invalidate`` (JSON ``{"appid": ...}`` or
``{"access_token": ...}``) makes tokens invalid as a forced refresh elsewhere would:
the next call with them answers 40001, and stable_token's normal mode issues a new
one. With ``"mode": "refuse"`` the token answers 40001 but normal mode still hands
it out (a token only ``force_refresh`` replaces). Either clears the app's
forced-refresh window, so a test may force again at once. ``GET /wechat/_test/counts?appid=``
gives the successful calls per endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import sqlite3
import string
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mallgate.sandbox.book import SqliteBook

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY: Final = "wechat"
PREFIX: Final = "/wechat"
LIFETIME: Final = 7200
# WeChat rotates a stable token (and a ticket) in its last 5 minutes; a replaced token lives 5 more.
ROTATE_BEFORE: Final = 300
GRACE: Final = 300
CLASSIC_DAILY: Final = 2000
FORCE_INTERVAL: Final = 30
FORCE_DAILY: Final = 20
STABLE_PER_MINUTE: Final = 10000
DAY: Final = 86400
SECTION_ROWS: Final = 8
_TOKEN_ALPHABET: Final = string.ascii_letters + string.digits + "_-"

# tokens.revoked: 0 live; 1 dead (refused, never handed out again); 2 refused on use, but still what
# stable_token's normal mode returns.
REVOKED: Final = 1
REFUSED: Final = 2

# Endpoint names as counted in `fetches` and shown on the console.
TOKEN: Final = "token"  # noqa: S105 - an endpoint name
STABLE: Final = "stable_token"
STABLE_FORCED: Final = "stable_token_forced"
TICKET: Final = "getticket"


_SECRET_SHAPE: Final = re.compile(r"[0-9a-fA-F]{32}")


def _rid() -> str:
    return f"rid: {secrets.token_hex(4)}-{secrets.token_hex(4)}-{secrets.token_hex(6)}"


def error(errcode: int, errmsg: str) -> dict[str, Any]:
    """An error body as WeChat writes it: its text, then a request id nobody may compare."""
    return {"errcode": errcode, "errmsg": f"{errmsg} {_rid()}"}


INVALID_APPID: Final = (40013, "invalid appid")
INVALID_SECRET: Final = (40125, "invalid appsecret, view more at http://t.cn/RAEkdVq")
INVALID_GRANT: Final = (40002, "invalid grant_type")
INVALID_CREDENTIAL: Final = (40001, "invalid credential, access_token is invalid or not latest")
EXPIRED: Final = (42001, "access_token expired")
DAILY_QUOTA: Final = (45009, "reach max api daily quota limit")
MINUTE_QUOTA: Final = (45011, "api minute-quota reach limit  mustslower  retry next time")
NOT_JSON: Final = (47001, "data format error")
INVALID_ARGS: Final = (40097, "invalid args")


def _new_value(length: int) -> str:
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class Call:
    id: int
    app_id: str
    endpoint: str
    answer: str
    at: float


class WechatBook(SqliteBook):
    """Apps, tokens, tickets and calls, in one SQLite file the sandbox's workers share."""

    def __init__(self, path: Path, apps: dict[str, str]) -> None:
        super().__init__(path)
        self.apps = apps
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, app_id TEXT, kind TEXT,"
                " issued_at REAL, expires_at REAL, revoked INTEGER DEFAULT 0)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS tokens_app ON tokens (app_id, kind, issued_at)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS tickets (ticket TEXT PRIMARY KEY, app_id TEXT, issued_at REAL,"
                " expires_at REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY AUTOINCREMENT, app_id TEXT,"
                " endpoint TEXT, answer TEXT, ok INTEGER, at REAL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS calls_app ON calls (app_id, endpoint, at)")
            db.execute("CREATE TABLE IF NOT EXISTS force_reset (app_id TEXT PRIMARY KEY, at REAL)")

    # --- checks shared by the endpoints ---

    def _app_problem(self, app_id: str, secret: str) -> tuple[int, str] | None:
        expected = self.apps.get(app_id)
        if expected is None:
            return INVALID_APPID
        if not _SECRET_SHAPE.fullmatch(secret):
            return INVALID_SECRET
        if not hmac.compare_digest(secret.encode(), expected.encode()):
            return INVALID_CREDENTIAL
        return None

    @staticmethod
    def _log(db: sqlite3.Connection, app_id: str, endpoint: str, answer: dict[str, Any], now: float) -> None:
        shown = {k: v for k, v in answer.items() if k not in ("access_token", "ticket")}
        db.execute(
            "INSERT INTO calls (app_id, endpoint, answer, ok, at) VALUES (?, ?, ?, ?, ?)",
            (
                app_id,
                endpoint,
                json.dumps(shown, ensure_ascii=False),
                int("errcode" not in shown or not shown["errcode"]),
                now,
            ),
        )

    @staticmethod
    def _issue(db: sqlite3.Connection, app_id: str, kind: str, now: float) -> dict[str, Any]:
        token = _new_value(136)
        db.execute(
            "INSERT INTO tokens (token, app_id, kind, issued_at, expires_at) VALUES (?, ?, ?, ?, ?)",
            (token, app_id, kind, now, now + LIFETIME),
        )
        return {"access_token": token, "expires_in": LIFETIME}

    # --- the endpoints ---

    def classic_token(self, grant_type: str, app_id: str, secret: str, now: float) -> dict[str, Any]:
        with self._write() as db:
            answer = self._classic(db, grant_type, app_id, secret, now)
            self._log(db, app_id, TOKEN, answer, now)
            return answer

    def _classic(
        self, db: sqlite3.Connection, grant_type: str, app_id: str, secret: str, now: float
    ) -> dict[str, Any]:
        if grant_type != "client_credential":
            return error(*INVALID_GRANT)
        if problem := self._app_problem(app_id, secret):
            return error(*problem)
        (today,) = db.execute(
            "SELECT COUNT(*) FROM calls WHERE app_id = ? AND endpoint = ? AND ok = 1 AND at > ?",
            (app_id, TOKEN, now - DAY),
        ).fetchone()
        if today >= CLASSIC_DAILY:
            return error(*DAILY_QUOTA)
        # Every classic fetch replaces the app's classic token; the old ones get WeChat's grace.
        db.execute(
            "UPDATE tokens SET expires_at = MIN(expires_at, ?) WHERE app_id = ? AND kind = 'classic'",
            (now + GRACE, app_id),
        )
        return self._issue(db, app_id, "classic", now)

    def stable_token(self, body: Any, now: float) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        app_id = str(body.get("appid", ""))
        forced = body.get("force_refresh") is True
        endpoint = STABLE_FORCED if forced else STABLE
        with self._write() as db:
            answer = self._stable(db, body, app_id, forced, now)
            self._log(db, app_id, endpoint, answer, now)
            return answer

    def _stable(
        self, db: sqlite3.Connection, body: dict[str, Any], app_id: str, forced: bool, now: float
    ) -> dict[str, Any]:
        if body.get("grant_type") != "client_credential":
            return error(*INVALID_GRANT)
        if problem := self._app_problem(app_id, str(body.get("secret", ""))):
            return error(*problem)
        (last_minute,) = db.execute(
            "SELECT COUNT(*) FROM calls WHERE app_id = ? AND endpoint IN (?, ?) AND at > ?",
            (app_id, STABLE, STABLE_FORCED, now - 60),
        ).fetchone()
        if last_minute >= STABLE_PER_MINUTE:
            return error(*MINUTE_QUOTA)
        if forced:
            return self._forced(db, app_id, now)
        return self._current_stable(db, app_id, now, before=ROTATE_BEFORE) or self._issue(
            db, app_id, "stable", now
        )

    @staticmethod
    def _current_stable(
        db: sqlite3.Connection, app_id: str, now: float, before: float = 0
    ) -> dict[str, Any] | None:
        """The app's newest stable token still valid `before` seconds from now (refused ones included)."""
        row = db.execute(
            "SELECT token, expires_at FROM tokens WHERE app_id = ? AND kind = 'stable' AND revoked IN (0, 2)"
            " AND expires_at > ? ORDER BY issued_at DESC LIMIT 1",
            (app_id, now + before),
        ).fetchone()
        return {"access_token": row[0], "expires_in": int(row[1] - now)} if row is not None else None

    def _forced(self, db: sqlite3.Connection, app_id: str, now: float) -> dict[str, Any]:
        reset = db.execute("SELECT at FROM force_reset WHERE app_id = ?", (app_id,)).fetchone()
        since = max(now - DAY, reset[0] if reset else 0.0)
        forced = [
            at
            for (at,) in db.execute(
                "SELECT at FROM calls WHERE app_id = ? AND endpoint = ? AND ok = 1 AND at > ?",
                (app_id, STABLE_FORCED, since),
            )
        ]
        if len(forced) >= FORCE_DAILY:
            return error(*DAILY_QUOTA)
        if forced and now - max(forced) < FORCE_INTERVAL:
            # "请保证调用时间隔至少为30s，否则不会刷新": the current token, not refreshed.
            return self._current_stable(db, app_id, now) or self._issue(db, app_id, "stable", now)
        db.execute("UPDATE tokens SET revoked = 1 WHERE app_id = ? AND kind = 'stable'", (app_id,))
        return self._issue(db, app_id, "stable", now)

    def check_token(self, access_token: str, now: float) -> tuple[str, dict[str, Any] | None]:
        """The app a token belongs to ("" when unknown), and the error WeChat answers a call with it."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            row = db.execute(
                "SELECT app_id, expires_at, revoked FROM tokens WHERE token = ?", (access_token,)
            ).fetchone()
        if row is None:
            return "", error(*INVALID_CREDENTIAL)
        if row[2]:
            return str(row[0]), error(*INVALID_CREDENTIAL)
        if row[1] <= now:
            return str(row[0]), error(*EXPIRED)
        return str(row[0]), None

    def ticket(self, access_token: str, kind: str, now: float) -> dict[str, Any]:
        app_id, problem = self.check_token(access_token, now)
        with self._write() as db:
            answer = problem or self._ticket(db, app_id, kind, now)
            self._log(db, app_id, TICKET, answer, now)
            return answer

    def _ticket(self, db: sqlite3.Connection, app_id: str, kind: str, now: float) -> dict[str, Any]:
        if kind != "jsapi":
            return error(*INVALID_ARGS)
        row = db.execute(
            "SELECT ticket, expires_at FROM tickets WHERE app_id = ? AND expires_at > ?"
            " ORDER BY issued_at DESC LIMIT 1",
            (app_id, now + ROTATE_BEFORE),
        ).fetchone()
        if row is not None:
            ticket, expires_in = row[0], int(row[1] - now)
        else:
            ticket, expires_in = _new_value(86), LIFETIME
            db.execute(
                "INSERT INTO tickets (ticket, app_id, issued_at, expires_at) VALUES (?, ?, ?, ?)",
                (ticket, app_id, now, now + LIFETIME),
            )
        return {"errcode": 0, "errmsg": "ok", "ticket": ticket, "expires_in": expires_in}

    # --- for tests and the console ---

    def invalidate(
        self, *, app_id: str = "", access_token: str = "", refuse_only: bool = False, now: float | None = None
    ) -> int:
        """Kills the given token, or every token of the app; how many were alive."""
        now = time.time() if now is None else now
        state = REFUSED if refuse_only else REVOKED
        with self._write() as db:
            if access_token:
                cursor = db.execute(
                    "UPDATE tokens SET revoked = ? WHERE token = ? AND revoked = 0", (state, access_token)
                )
                row = db.execute("SELECT app_id FROM tokens WHERE token = ?", (access_token,)).fetchone()
                app_id = row[0] if row else ""
            else:
                cursor = db.execute(
                    "UPDATE tokens SET revoked = ? WHERE app_id = ? AND revoked = 0", (state, app_id)
                )
            if app_id:
                db.execute("INSERT OR REPLACE INTO force_reset (app_id, at) VALUES (?, ?)", (app_id, now))
            return cursor.rowcount

    def current_ticket(self, app_id: str) -> str:
        """The app's newest jsapi_ticket ("" when none): what a test checks a signature with."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            row = db.execute(
                "SELECT ticket FROM tickets WHERE app_id = ? ORDER BY issued_at DESC LIMIT 1", (app_id,)
            ).fetchone()
        return str(row[0]) if row else ""

    def count(self, app_id: str, endpoint: str, *, ok_only: bool = True) -> int:
        """How many calls an app made to one endpoint (successful ones unless said otherwise)."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            (total,) = db.execute(
                "SELECT COUNT(*) FROM calls WHERE app_id = ? AND endpoint = ? AND ok >= ?",
                (app_id, endpoint, int(ok_only)),
            ).fetchone()
        return int(total)

    def counts(self, app_id: str) -> dict[str, int]:
        return {e: self.count(app_id, e) for e in (TOKEN, STABLE, STABLE_FORCED, TICKET)}

    def recent(self, limit: int = SECTION_ROWS) -> list[Call]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute(
                "SELECT id, app_id, endpoint, answer, at FROM calls ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [Call(*row) for row in rows]

    def live(self, now: float) -> list[dict[str, Any]]:
        """Per app and kind: live tokens and tickets, masked, for the console."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            tokens = db.execute(
                "SELECT app_id, kind, token, expires_at FROM tokens WHERE revoked = 0 AND expires_at > ?"
                " ORDER BY issued_at DESC LIMIT 20",
                (now,),
            ).fetchall()
            tickets = db.execute(
                "SELECT app_id, 'jsapi_ticket', ticket, expires_at FROM tickets WHERE expires_at > ?"
                " ORDER BY issued_at DESC LIMIT 20",
                (now,),
            ).fetchall()
        return [
            {"app_id": a, "kind": k, "value": f"{v[:8]}…", "expires_in": int(e - now)}
            for a, k, v, e in [*tokens, *tickets]
        ]


class WechatStandIn:
    """The routes over one book; also what `state.resources["wechat"]` holds for tests."""

    def __init__(self, book: WechatBook) -> None:
        self.book = book
        self.router = APIRouter(prefix=PREFIX)
        self._routes()

    async def aclose(self) -> None:
        return None

    def check_token(self, access_token: str) -> tuple[str, dict[str, Any] | None]:
        return self.book.check_token(access_token, time.time())

    def _routes(self) -> None:
        book = self.book

        @self.router.get("/cgi-bin/token")
        async def token(request: Request) -> JSONResponse:
            q = request.query_params
            answer = await asyncio.to_thread(
                book.classic_token,
                q.get("grant_type", ""),
                q.get("appid", ""),
                q.get("secret", ""),
                time.time(),
            )
            return JSONResponse(answer)

        @self.router.post("/cgi-bin/stable_token")
        async def stable_token(request: Request) -> JSONResponse:
            try:
                body = json.loads(await request.body())
            except ValueError:
                return JSONResponse(error(*NOT_JSON))
            return JSONResponse(await asyncio.to_thread(book.stable_token, body, time.time()))

        @self.router.get("/cgi-bin/ticket/getticket")
        async def getticket(request: Request) -> JSONResponse:
            q = request.query_params
            answer = await asyncio.to_thread(
                book.ticket, q.get("access_token", ""), q.get("type", ""), time.time()
            )
            return JSONResponse(answer)

        @self.router.post("/_test/invalidate")
        async def invalidate(request: Request) -> JSONResponse:
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            killed = await asyncio.to_thread(
                book.invalidate,
                app_id=str(body.get("appid", "")),
                access_token=str(body.get("access_token", "")),
                refuse_only=body.get("mode") == "refuse",
            )
            return JSONResponse({"invalidated": killed})

        @self.router.get("/_test/counts")
        async def counts(request: Request) -> JSONResponse:
            return JSONResponse(await asyncio.to_thread(book.counts, request.query_params.get("appid", "")))


def sandbox_apps(state: SandboxState) -> dict[str, str]:
    from mallgate.sandbox.app import WECHAT_APP_APP_ID, WECHAT_MINI_APP_ID, WECHAT_MP_APP_ID

    secret = state.keys.wechat_app_secret
    return {WECHAT_MP_APP_ID: secret, WECHAT_MINI_APP_ID: secret, WECHAT_APP_APP_ID: secret}


def wechat_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import StandIn

    standin = WechatStandIn(WechatBook(state.folder / "wechat_api.sqlite3", sandbox_apps(state)))
    state.resources[RESOURCE_KEY] = standin

    async def recent() -> dict[str, Any]:
        now = time.time()
        calls, live = await asyncio.gather(
            asyncio.to_thread(standin.book.recent), asyncio.to_thread(standin.book.live, now)
        )
        return {"calls": calls, "live": live}

    return StandIn(
        name="WeChat API",
        summary="access_token, stable_token and jsapi_ticket at /wechat/cgi-bin/ (api.weixin.qq.com)",
        router=standin.router,
        links=[],
        section="sections/wechat_api.html",
        context=recent,
    )
