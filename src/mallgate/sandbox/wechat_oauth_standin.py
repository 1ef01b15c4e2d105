"""The WeChat web OAuth stand-in: the consent page and ``sns/*`` at ``/wechat/``.

- ``GET /wechat/connect/oauth2/authorize?appid&redirect_uri&response_type=code&scope&state``
  plays open.weixin.qq.com's consent page: choose who the user is (a name, from which the
  openid of this app and a unionid shared by every app are derived, or explicit values)
  and allow or deny. Allowing redirects (302) to ``redirect_uri?code=CODE&state=STATE``;
  denying, to ``redirect_uri?state=STATE`` (what WeChat does for ``snsapi_userinfo``).
- ``GET /wechat/sns/oauth2/access_token``: a code works once (40163 ``code been used``
  afterwards) and for 5 minutes (then 40029 ``invalid code``, as for a code never issued
  or issued to another app); the answer has ``unionid`` only for ``snsapi_userinfo``.
- ``GET /wechat/sns/userinfo`` (48001 for a ``snsapi_base`` token, 40003 for another
  openid, 42001 once the 2-hour web token expired, 40001 for an unknown token) and
  ``GET /wechat/sns/auth`` (``{"errcode":0,"errmsg":"ok"}`` or the same errors).

Codes, web tokens and every call are kept in a SQLite file under the sandbox folder, so
the workers of one sandbox agree and tests can count upstream calls. Test hooks:
``GET /wechat/_test/oauth/counts`` (calls per endpoint) and ``POST
/wechat/_test/oauth/expire`` (JSON ``{"code": ...}`` or ``{"access_token": ...}``: ages it
past its lifetime).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from mallgate.sandbox.book import SqliteBook
from mallgate.sandbox.pages import render
from mallgate.sandbox.wechat_standin import (
    EXPIRED,
    INVALID_APPID,
    INVALID_CREDENTIAL,
    INVALID_GRANT,
    INVALID_SECRET,
    error,
    sandbox_apps,
)

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY: Final = "wechat_oauth"
PREFIX: Final = "/wechat"
CODE_LIFETIME: Final = 300
TOKEN_LIFETIME: Final = 7200
SECTION_ROWS: Final = 5
SCOPES: Final = ("snsapi_base", "snsapi_userinfo")
_ALNUM: Final = string.ascii_letters + string.digits

INVALID_CODE: Final = (40029, "invalid code")
CODE_USED: Final = (40163, "code been used")
INVALID_OPENID: Final = (40003, "invalid openid")
UNAUTHORIZED: Final = (48001, "api unauthorized")
MISSING_CODE: Final = (41008, "missing code")

EXCHANGE: Final = "sns/oauth2/access_token"
USERINFO: Final = "sns/userinfo"
AUTH: Final = "sns/auth"


def _derived(prefix: str, *parts: str) -> str:
    """A stable id of WeChat's shape (28 characters) for a name: the same name, the same id."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return prefix + base64.urlsafe_b64encode(digest).decode()[:27]


def openid_of(app_id: str, name: str) -> str:
    return _derived("o", "openid", app_id, name)


def unionid_of(name: str) -> str:
    return _derived("u", "unionid", name)


@dataclass(frozen=True)
class Person:
    """Who allows on the consent page."""

    openid: str
    unionid: str
    nickname: str
    sex: int
    headimgurl: str
    snapshot_user: bool = False


@dataclass(frozen=True)
class IssuedCode:
    code: str
    app_id: str
    openid: str
    nickname: str
    scope: str
    at: float
    used: bool

    def state_at(self, now: float) -> str:
        if self.used:
            return "used"
        return "expired" if now - self.at > CODE_LIFETIME else "unused"


class OAuthBook(SqliteBook):
    """Codes, web tokens and calls, in one SQLite file shared by the sandbox's workers."""

    def __init__(self, path: Path, apps: Mapping[str, str]) -> None:
        super().__init__(path)
        self.apps = dict(apps)
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS codes (code TEXT PRIMARY KEY, app_id TEXT, openid TEXT,"
                " unionid TEXT, nickname TEXT, sex INTEGER, headimgurl TEXT, scope TEXT, snapshot INTEGER,"
                " at REAL, used_at REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, app_id TEXT, openid TEXT,"
                " code TEXT, expires REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY AUTOINCREMENT, endpoint TEXT,"
                " app_id TEXT, errcode INTEGER, at REAL)"
            )

    @staticmethod
    def _log(db: sqlite3.Connection, endpoint: str, app_id: str, answer: dict[str, Any], now: float) -> None:
        db.execute(
            "INSERT INTO calls (endpoint, app_id, errcode, at) VALUES (?, ?, ?, ?)",
            (endpoint, app_id, int(answer.get("errcode", 0)), now),
        )

    def issue_code(self, app_id: str, person: Person, scope: str, now: float) -> str:
        code = "".join(secrets.choice(_ALNUM) for _ in range(32))
        with self._write() as db:
            db.execute(
                "INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    code,
                    app_id,
                    person.openid,
                    person.unionid,
                    person.nickname,
                    person.sex,
                    person.headimgurl,
                    scope,
                    int(person.snapshot_user),
                    now,
                ),
            )
        return code

    def exchange(self, params: Mapping[str, str], now: float) -> dict[str, Any]:
        app_id = params.get("appid", "")
        with self._write() as db:
            answer = self._exchange(db, app_id, params, now)
            self._log(db, EXCHANGE, app_id, answer, now)
        return answer

    def _exchange(
        self, db: sqlite3.Connection, app_id: str, params: Mapping[str, str], now: float
    ) -> dict[str, Any]:
        if params.get("grant_type") != "authorization_code":
            return error(*INVALID_GRANT)
        secret = self.apps.get(app_id)
        if secret is None:
            return error(*INVALID_APPID)
        if not hmac.compare_digest(params.get("secret", "").encode(), secret.encode()):
            return error(*INVALID_SECRET)
        code = params.get("code", "")
        if not code:
            return error(*MISSING_CODE)
        row = db.execute(
            "SELECT app_id, openid, unionid, scope, snapshot, at, used_at FROM codes WHERE code = ?", (code,)
        ).fetchone()
        if row is None or row[0] != app_id:
            return error(*INVALID_CODE)
        _app, openid, unionid, scope, snapshot, at, used_at = row
        if used_at is not None:
            return error(*CODE_USED)
        if now - at > CODE_LIFETIME:
            return error(*INVALID_CODE)
        db.execute("UPDATE codes SET used_at = ? WHERE code = ?", (now, code))
        token = "".join(secrets.choice(_ALNUM + "_-") for _ in range(88))
        db.execute(
            "INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (token, app_id, openid, code, now + TOKEN_LIFETIME)
        )
        answer: dict[str, Any] = {
            "access_token": token,
            "expires_in": TOKEN_LIFETIME,
            "refresh_token": "".join(secrets.choice(_ALNUM + "_-") for _ in range(88)),
            "openid": openid,
            "scope": scope,
        }
        if scope == "snsapi_userinfo" and unionid:
            answer["unionid"] = unionid
        if snapshot:
            answer["is_snapshotuser"] = 1
        return answer

    def _token(
        self, db: sqlite3.Connection, token: str, openid: str, now: float
    ) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
        """The code row behind a web token, or the error WeChat answers for it."""
        row = db.execute(
            "SELECT app_id, openid, code, expires FROM tokens WHERE token = ?", (token,)
        ).fetchone()
        if row is None:
            return None, error(*INVALID_CREDENTIAL)
        if now >= row[3]:
            return None, error(*EXPIRED)
        if openid != row[1]:
            return None, error(*INVALID_OPENID)
        found = db.execute(
            "SELECT app_id, openid, unionid, nickname, sex, headimgurl, scope FROM codes WHERE code = ?",
            (row[2],),
        ).fetchone()
        return found, None

    def userinfo(self, token: str, openid: str, now: float) -> dict[str, Any]:
        with self._write() as db:
            found, problem = self._token(db, token, openid, now)
            answer = problem or self._profile(found)
            self._log(db, USERINFO, found[0] if found else "", answer, now)
        return answer

    @staticmethod
    def _profile(found: tuple[Any, ...] | None) -> dict[str, Any]:
        assert found is not None
        _app_id, openid, unionid, nickname, sex, headimgurl, scope = found
        if scope != "snsapi_userinfo":
            return error(*UNAUTHORIZED)
        answer: dict[str, Any] = {
            "openid": openid,
            "nickname": nickname,
            "sex": sex,
            "province": "",
            "city": "",
            "country": "",
            "headimgurl": headimgurl,
            "privilege": [],
        }
        if unionid:
            answer["unionid"] = unionid
        return answer

    def auth(self, token: str, openid: str, now: float) -> dict[str, Any]:
        with self._write() as db:
            found, problem = self._token(db, token, openid, now)
            answer = problem or {"errcode": 0, "errmsg": "ok"}
            self._log(db, AUTH, found[0] if found else "", answer, now)
        return answer

    def expire(self, *, code: str = "", access_token: str = "") -> int:
        """Ages a code or web token past its lifetime (a test hook); how many rows it touched."""
        with self._write() as db:
            touched = db.execute(
                "UPDATE codes SET at = at - ? WHERE code = ?", (CODE_LIFETIME + 1, code)
            ).rowcount
            touched += db.execute("UPDATE tokens SET expires = 0 WHERE token = ?", (access_token,)).rowcount
        return int(touched)

    def counts(self) -> dict[str, int]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute("SELECT endpoint, COUNT(*) FROM calls GROUP BY endpoint").fetchall()
        found = {str(endpoint): int(n) for endpoint, n in rows}
        return {endpoint: found.get(endpoint, 0) for endpoint in (EXCHANGE, USERINFO, AUTH)}

    def recent_codes(self, limit: int) -> list[IssuedCode]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute(
                "SELECT code, app_id, openid, nickname, scope, at, used_at FROM codes"
                " ORDER BY at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [IssuedCode(r[0], r[1], r[2], r[3], r[4], r[5], r[6] is not None) for r in rows]


def with_query(url: str, values: Mapping[str, str]) -> str:
    """`url` with `values` added to its query string (WeChat keeps the query it was given)."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *values.items()]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def _person(form: Mapping[str, str], app_id: str) -> Person:
    name = form.get("name", "").strip() or "sandbox-user"
    sex = form.get("sex", "0")
    unionid = "" if form.get("no_unionid") else (form.get("unionid", "").strip() or unionid_of(name))
    return Person(
        openid=form.get("openid", "").strip() or openid_of(app_id, name),
        unionid=unionid,
        nickname=form.get("nickname", "").strip() or name,
        sex=int(sex) if sex in ("0", "1", "2") else 0,
        headimgurl=form.get("headimgurl", "").strip(),
        snapshot_user=bool(form.get("snapshot")),
    )


class WechatOAuthStandIn:
    def __init__(self, book: OAuthBook, consent_apps: tuple[str, ...]) -> None:
        self.book = book
        # Web OAuth is for Official Accounts and (through the SDK) APPs, not Mini Programs.
        self.consent_apps = consent_apps
        self.router = APIRouter(prefix=PREFIX)
        self._routes()

    async def aclose(self) -> None:
        return None

    def _refusal(self, query: Mapping[str, str]) -> str:
        """What WeChat's consent page would show instead of itself (it never redirects then)."""
        if not query.get("appid"):
            return "10012: 缺少 appid 参数"
        if query["appid"] not in self.consent_apps:
            return "10016: 该 appid 不能用于网页授权（不是本沙箱的公众号或 APP）"
        if query.get("response_type") != "code":
            return "10002: response_type 应为 code"
        if query.get("scope") not in SCOPES:
            return "10005: scope 参数错误，应为 snsapi_base 或 snsapi_userinfo"
        redirect = query.get("redirect_uri", "")
        if not redirect:
            return "10011: 缺少 redirect_uri 参数"
        if urlsplit(redirect).scheme not in ("http", "https"):
            return "10003: redirect_uri 应为 http(s) 地址"
        return ""

    def _consent_page(self, request: Request, query: dict[str, str]) -> Response:
        refusal = self._refusal(query)
        return render(
            request,
            "wechat_oauth.html",
            title="WeChat authorization · 微信授权",
            refusal=refusal,
            query=query,
            status_code=400 if refusal else 200,
        )

    def _routes(self) -> None:
        book = self.book

        @self.router.get("/connect/oauth2/authorize")
        async def consent(request: Request) -> Response:
            return self._consent_page(request, dict(request.query_params))

        @self.router.post("/connect/oauth2/authorize")
        async def decide(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
            refusal = self._refusal(form)
            if refusal:
                return JSONResponse({"error": refusal}, 400)
            redirect, state = form["redirect_uri"], form.get("state", "")
            if form.get("decision") == "deny":
                return RedirectResponse(with_query(redirect, {"state": state}), status_code=302)
            person = _person(form, form["appid"])
            code = await asyncio.to_thread(book.issue_code, form["appid"], person, form["scope"], time.time())
            return RedirectResponse(with_query(redirect, {"code": code, "state": state}), status_code=302)

        @self.router.get("/sns/oauth2/access_token")
        async def access_token(request: Request) -> JSONResponse:
            params = dict(request.query_params)
            return JSONResponse(await asyncio.to_thread(book.exchange, params, time.time()))

        @self.router.get("/sns/userinfo")
        async def userinfo(request: Request) -> JSONResponse:
            q = request.query_params
            answer = await asyncio.to_thread(
                book.userinfo, q.get("access_token", ""), q.get("openid", ""), time.time()
            )
            return JSONResponse(answer)

        @self.router.get("/sns/auth")
        async def auth(request: Request) -> JSONResponse:
            q = request.query_params
            answer = await asyncio.to_thread(
                book.auth, q.get("access_token", ""), q.get("openid", ""), time.time()
            )
            return JSONResponse(answer)

        @self.router.get("/oauth/start")
        async def start(request: Request, scope: str = "snsapi_userinfo", appid: str = "") -> Response:
            """The console's "log in": the consent page, sending the user back to the landing page below."""
            landing = str(request.url.replace(query="")).removesuffix("/start") + "/landing"
            query = {
                "appid": appid or self.consent_apps[0],
                "redirect_uri": landing,
                "response_type": "code",
                "scope": scope,
                "state": secrets.token_hex(8),
            }
            return self._consent_page(request, query)

        @self.router.get("/oauth/landing")
        async def landing(request: Request, code: str = "", state: str = "") -> Response:
            service = getattr(request.app.state, "sandbox", None)
            service_url = service.service_url if service is not None else ""
            return render(
                request,
                "wechat_oauth_landing.html",
                title="Back from WeChat authorization",
                code=code,
                state=state,
                service_url=service_url,
            )

        @self.router.get("/_test/oauth/counts")
        async def counts() -> JSONResponse:
            return JSONResponse(await asyncio.to_thread(book.counts))

        @self.router.post("/_test/oauth/expire")
        async def expire(request: Request) -> JSONResponse:
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            touched = await asyncio.to_thread(
                book.expire, code=str(body.get("code", "")), access_token=str(body.get("access_token", ""))
            )
            return JSONResponse({"expired": touched})


def wechat_oauth_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import WECHAT_APP_APP_ID, WECHAT_MP_APP_ID, StandIn

    standin = WechatOAuthStandIn(
        OAuthBook(state.folder / "wechat_oauth.sqlite3", sandbox_apps(state)),
        (WECHAT_MP_APP_ID, WECHAT_APP_APP_ID),
    )
    state.resources[RESOURCE_KEY] = standin

    async def recent() -> dict[str, Any]:
        codes, counts = await asyncio.gather(
            asyncio.to_thread(standin.book.recent_codes, SECTION_ROWS), asyncio.to_thread(standin.book.counts)
        )
        return {"codes": codes, "counts": counts, "now": time.time()}

    return StandIn(
        name="WeChat OAuth",
        summary="the consent page (open.weixin.qq.com/connect/oauth2/authorize) and sns/oauth2/access_token, "
        "sns/userinfo, sns/auth at /wechat/",
        router=standin.router,
        links=[
            ("log in (snsapi_userinfo)", "/wechat/oauth/start"),
            ("call counts", "/wechat/_test/oauth/counts"),
        ],
        section="sections/wechat_oauth.html",
        context=recent,
    )
