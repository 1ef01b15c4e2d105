"""The SMS stand-ins: Aliyun ``SendSms`` at ``/aliyun-sms/``, Tencent Cloud ``SendSms`` at ``/tencent-sms/``.

Requests are verified with the channel modules' own `verify` functions against
the sandbox credentials, and answered with the providers' real shapes, flow
control included (Aliyun: 1 per number per 60 s; Tencent: 1 per 30 s), so the
service's provider code meets the same answers as in production. The Aliyun
stand-in takes both signatures the gateway takes, V3 (ACS3-HMAC-SHA256, the
official SDK's default) and the legacy RPC HMAC-SHA1, and refuses with the
gateway's codes, statuses and texts, which the official SDKs parse.

What the "phones" received is kept in a SQLite file under the sandbox folder:
several uvicorn workers share it, and its write lock makes "at most one
message per window" hold across them. ``/sms`` shows the messages to a person,
``/sms/messages?mobile=`` to a test, and ``/sms/rules`` sets per-number
behaviour: ``fail`` (the provider calls the number illegal, like every number
starting with 1999) or ``exempt`` (no flow control, like a provider's whitelisted
test number).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from mallgate.channels import aliyun_v3, sms_aliyun, sms_tencent
from mallgate.channels.sms import SANDBOX_ALIYUN
from mallgate.clock import Clock, default_clock
from mallgate.mobile import parse_mobile
from mallgate.sandbox.book import SqliteBook
from mallgate.sandbox.pages import render
from mallgate.settings import TencentSmsSettings

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

# The Tencent stand-in's fixed credentials, the counterpart of SANDBOX_ALIYUN.
SANDBOX_TENCENT: Final = TencentSmsSettings(
    secret_id="AKIDsandbox00000000000000000000000000",  # noqa: S106 - a published test value
    secret_key="sandbox-tencent-secret-key",  # noqa: S106 - a published test value, not a secret
    sdk_app_id="1400000001",
    sign_name="mallgate",
    template_id="100001",
    endpoint="",
)

ALIYUN_WINDOW: Final = 60
TENCENT_WINDOW: Final = 30
ILLEGAL_PREFIX: Final = "1999"
MAX_ALIYUN_NUMBERS: Final = 1000
MAX_TENCENT_NUMBERS: Final = 200
SECTION_ROWS: Final = 5
_BODY_LIMIT: Final = 64 * 1024
_NONCE_KEEP: Final = 2 * sms_aliyun.TIMESTAMP_TOLERANCE

Rule = Literal["fail", "exempt"]
# What a verified Aliyun request asks for: action, version and parameters.
_AliyunCall = tuple[str, str, dict[str, str]]
Verdict = Literal["sent", "illegal", "limited"]


@dataclass(frozen=True)
class Message:
    id: int
    provider: str
    mobile: str
    text: str
    code: str
    at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "mobile": self.mobile,
            "text": self.text,
            "code": self.code,
            "at": self.at,
            "sent_at": datetime.fromtimestamp(self.at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }


class SmsBook(SqliteBook):
    """The messages, per-number rules and used Aliyun nonces, in one SQLite file shared by workers."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, provider TEXT,"
                " mobile TEXT, text TEXT, code TEXT, at REAL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS messages_mobile ON messages (mobile, at)")
            db.execute("CREATE TABLE IF NOT EXISTS rules (mobile TEXT PRIMARY KEY, rule TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, at REAL)")

    def _read(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def submit(
        self, provider: str, mobiles: list[str], text: str, code: str, now: float, window: int
    ) -> dict[str, Verdict]:
        """Deliver to every number that is legal and outside its provider's flow-control window."""
        verdicts: dict[str, Verdict] = {}
        with self._write() as db:
            for mobile in mobiles:
                rule = db.execute("SELECT rule FROM rules WHERE mobile = ?", (mobile,)).fetchone()
                if mobile.startswith(ILLEGAL_PREFIX) or (rule and rule[0] == "fail"):
                    verdicts[mobile] = "illegal"
                    continue
                recent = db.execute(
                    "SELECT 1 FROM messages WHERE mobile = ? AND provider = ? AND at > ? LIMIT 1",
                    (mobile, provider, now - window),
                ).fetchone()
                if recent and not (rule and rule[0] == "exempt"):
                    verdicts[mobile] = "limited"
                    continue
                db.execute(
                    "INSERT INTO messages (provider, mobile, text, code, at) VALUES (?, ?, ?, ?, ?)",
                    (provider, mobile, text, code, now),
                )
                verdicts[mobile] = "sent"
        return verdicts

    def messages(self, mobile: str | None = None, limit: int = 200) -> list[Message]:
        query = "SELECT id, provider, mobile, text, code, at FROM messages"
        args: tuple[Any, ...] = ()
        if mobile:
            query += " WHERE mobile = ?"
            args = (mobile,)
        with closing(self._read()) as db:
            rows = db.execute(f"{query} ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Message(*row) for row in rows]

    def set_rule(self, mobile: str, rule: Rule | None) -> None:
        with self._write() as db:
            if rule is None:
                db.execute("DELETE FROM rules WHERE mobile = ?", (mobile,))
            else:
                db.execute("INSERT OR REPLACE INTO rules (mobile, rule) VALUES (?, ?)", (mobile, rule))

    def rules(self) -> dict[str, str]:
        with closing(self._read()) as db:
            return dict(db.execute("SELECT mobile, rule FROM rules ORDER BY mobile").fetchall())

    def use_nonce(self, nonce: str, now: float) -> bool:
        """False when the nonce was already used: Aliyun refuses a replayed request."""
        with self._write() as db:
            db.execute("DELETE FROM nonces WHERE at < ?", (now - _NONCE_KEEP,))
            try:
                db.execute("INSERT INTO nonces (nonce, at) VALUES (?, ?)", (nonce, now))
            except sqlite3.IntegrityError:
                return False
        return True


def aliyun_text(sign_name: str, code: str) -> str:
    return f"【{sign_name}】您的验证码为：{code}，该验证码 5 分钟内有效，请勿泄漏于他人！"


def tencent_text(sign_name: str, code: str, minutes: str) -> str:
    return f"【{sign_name}】{code}为您的验证码，请于{minutes}分钟内填写，如非本人操作，请忽略本短信。"


class _AliyunRefusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


class _TencentRefusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


class SmsStandIn:
    def __init__(self, book: SmsBook, clock: Clock = default_clock) -> None:
        self.book = book
        self.clock = clock
        self.router = self._routes()

    # ------------------------------------------------------------ Aliyun

    async def aliyun(self, request: Request) -> JSONResponse:
        """SendSms signed either way: V3 (an ACS3-HMAC-SHA256 Authorization) or RPC (a Signature)."""
        request_id = str(uuid.uuid4()).upper()
        try:
            body = await request.body()
            if len(body) > _BODY_LIMIT:
                raise _AliyunRefusal("InvalidParameter", "The request body is too large.")
            query = request.query_params.multi_items()
            form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True) if body else []
            headers = aliyun_v3.header_values(request.headers.items())
            now = self.clock.now()
            if aliyun_v3.is_v3(headers):
                call = await self._aliyun_v3(request.method, query, form, headers, body, now)
            else:
                call = await self._aliyun_rpc(request.method, dict([*query, *form]), now)
            answer = await self._aliyun_deliver(*call, now)
        except _AliyunRefusal as refusal:
            return JSONResponse(
                sms_aliyun.error_response(refusal.code, refusal.message, request_id),
                status_code=sms_aliyun.error_status(refusal.code),
                headers={"x-acs-request-id": request_id},
            )
        return JSONResponse(
            sms_aliyun.success_response(answer, request_id), headers={"x-acs-request-id": request_id}
        )

    async def _aliyun_rpc(self, method: str, params: dict[str, str], now: float) -> _AliyunCall:
        key_id = params.get("AccessKeyId", "")
        if not key_id:
            raise _AliyunRefusal("MissingAccessKeyId", "AccessKeyId is mandatory for this action.")
        if key_id != SANDBOX_ALIYUN.access_key_id:
            raise _AliyunRefusal("InvalidAccessKeyId.NotFound", aliyun_v3.KEY_NOT_FOUND)
        try:
            sms_aliyun.verify(method, params, SANDBOX_ALIYUN.access_key_secret, now=now)
        except aliyun_v3.AliyunAuthError as exc:
            raise _AliyunRefusal(exc.code, exc.message) from None
        await self._aliyun_nonce(params.get("SignatureNonce", ""), now)
        return params.get("Action", ""), params.get("Version", ""), params

    async def _aliyun_v3(
        self,
        method: str,
        query: list[tuple[str, str]],
        form: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
        now: float,
    ) -> _AliyunCall:
        try:
            verified = aliyun_v3.verify_request(
                method,
                query,
                headers,
                body,
                lambda key_id: (
                    SANDBOX_ALIYUN.access_key_secret if key_id == SANDBOX_ALIYUN.access_key_id else None
                ),
                now,
            )
        except aliyun_v3.AliyunAuthError as exc:
            raise _AliyunRefusal(exc.code, exc.message) from None
        await self._aliyun_nonce(verified.nonce, now)
        # Parameters travel in the query (as the SDK sends SendSms) or a form body (its formData APIs).
        return headers.get("x-acs-action", ""), headers.get("x-acs-version", ""), dict([*query, *form])

    async def _aliyun_nonce(self, nonce: str, now: float) -> None:
        if not nonce:
            raise _AliyunRefusal("MissingSignatureNonce", "SignatureNonce is mandatory for this action.")
        if not await asyncio.to_thread(self.book.use_nonce, nonce, now):
            raise _AliyunRefusal("SignatureNonceUsed", "Specified signature nonce was used already.")

    async def _aliyun_deliver(self, action: str, version: str, params: dict[str, str], now: float) -> str:
        if action != sms_aliyun.ACTION or version != sms_aliyun.API_VERSION:
            raise _AliyunRefusal(
                "InvalidAction.NotFound", "Specified api is not found, please check your url and method."
            )
        for name in ("PhoneNumbers", "SignName", "TemplateCode"):
            if not params.get(name):
                raise _AliyunRefusal(f"Missing{name}", f"{name} is mandatory for this action.")
        if params["SignName"] != SANDBOX_ALIYUN.sign_name:
            raise _AliyunRefusal("isv.SMS_SIGNATURE_ILLEGAL", "该账号下找不到对应签名")
        if params["TemplateCode"] != SANDBOX_ALIYUN.template_code:
            raise _AliyunRefusal("isv.SMS_TEMPLATE_ILLEGAL", "该账号下找不到对应模板")
        try:
            variables = json.loads(params.get("TemplateParam") or "{}")
        except ValueError:
            variables = None
        if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
            raise _AliyunRefusal("isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值")
        code = variables.get("code")
        if not code:
            raise _AliyunRefusal("isv.TEMPLATE_MISSING_PARAMETERS", "模板变量缺少对应参数值")
        raw = params["PhoneNumbers"].split(",")
        if len(raw) > MAX_ALIYUN_NUMBERS:
            raise _AliyunRefusal("isv.MOBILE_COUNT_OVER_LIMIT", "手机号码数量超过限制")
        mobiles = [parse_mobile(n) for n in raw]
        if any(m is None for m in mobiles):
            raise _AliyunRefusal("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
        numbers = [m for m in mobiles if m is not None]
        text = aliyun_text(params["SignName"], code)
        verdicts = await asyncio.to_thread(
            self.book.submit, "aliyun", numbers, text, code, now, ALIYUN_WINDOW
        )
        outcomes = set(verdicts.values())
        if "illegal" in outcomes:
            raise _AliyunRefusal("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
        if "limited" in outcomes:
            raise _AliyunRefusal("isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控Permits:1")
        return f"{int(now * 1000)}^{uuid.uuid4().int % 10**10}"

    # ------------------------------------------------------------ Tencent

    async def tencent(self, request: Request) -> JSONResponse:
        request_id = str(uuid.uuid4())
        try:
            statuses = await self._tencent_send(request)
        except _TencentRefusal as refusal:
            return JSONResponse(sms_tencent.error_response(refusal.code, refusal.message, request_id))
        return JSONResponse({"Response": {"SendStatusSet": statuses, "RequestId": request_id}})

    async def _tencent_send(self, request: Request) -> list[dict[str, Any]]:
        body = await request.body()
        if len(body) > _BODY_LIMIT:
            raise _TencentRefusal("InvalidParameter", "The request body is too large.")
        headers = dict(request.headers)
        now = self.clock.now()
        try:
            sms_tencent.verify_request(
                request.method,
                headers,
                body,
                lambda secret_id: (
                    SANDBOX_TENCENT.secret_key if secret_id == SANDBOX_TENCENT.secret_id else None
                ),
                now,
            )
        except sms_tencent.TencentAuthError as exc:
            raise _TencentRefusal(exc.code, exc.message) from None
        action = headers.get("x-tc-action", "")
        if action != "SendSms":
            raise _TencentRefusal("InvalidAction", f"The requested action `{action}` does not exist.")
        if headers.get("x-tc-version") != sms_tencent.API_VERSION:
            raise _TencentRefusal(
                "NoSuchVersion", "The requested version does not exist or is not supported."
            )
        if not headers.get("x-tc-region"):
            raise _TencentRefusal("MissingParameter", "The request is missing a required parameter `Region`.")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise _TencentRefusal("InvalidParameter", "The request body is not a JSON object.")
        if payload.get("SmsSdkAppId") != SANDBOX_TENCENT.sdk_app_id:
            raise _TencentRefusal("InvalidParameterValue.SdkAppIdNotExist", "SdkAppId not exist.")
        if payload.get("SignName") != SANDBOX_TENCENT.sign_name:
            raise _TencentRefusal(
                "FailedOperation.SignatureIncorrectOrUnapproved", "signature is not approved"
            )
        if payload.get("TemplateId") != SANDBOX_TENCENT.template_id:
            raise _TencentRefusal("FailedOperation.TemplateIncorrectOrUnapproved", "template is not approved")
        variables = payload.get("TemplateParamSet")
        if (
            not isinstance(variables, list)
            or len(variables) != 2
            or not all(isinstance(v, str) and v for v in variables)
        ):
            raise _TencentRefusal(
                "InvalidParameterValue.TemplateParameterFormatError",
                "the template takes two string parameters: the code and its minutes",
            )
        phones = payload.get("PhoneNumberSet")
        if not isinstance(phones, list) or not phones or not all(isinstance(p, str) for p in phones):
            raise _TencentRefusal(
                "MissingParameter", "The request is missing a required parameter `PhoneNumberSet`."
            )
        if len(phones) > MAX_TENCENT_NUMBERS:
            raise _TencentRefusal("LimitExceeded.PhoneNumberCountLimit", "too many numbers in one request")
        code, minutes = variables
        text = tencent_text(SANDBOX_TENCENT.sign_name, code, minutes)
        numbers = {phone: parse_mobile(phone) for phone in phones}
        legal = [n for n in numbers.values() if n is not None]
        verdicts = await asyncio.to_thread(
            self.book.submit, "tencent", legal, text, code, now, TENCENT_WINDOW
        )
        return [self._tencent_status(phone, number, verdicts, request) for phone, number in numbers.items()]

    @staticmethod
    def _tencent_status(
        phone: str, number: str | None, verdicts: dict[str, Verdict], request: Request
    ) -> dict[str, Any]:
        shown = f"+86{number}" if number else phone
        verdict = verdicts.get(number or "", "illegal")
        if verdict == "sent":
            answer = sms_tencent.success_response(str(uuid.uuid4()), shown, "")
        elif verdict == "limited":
            answer = sms_tencent.status_error_response(
                "LimitExceeded.PhoneNumberThirtySecondLimit",
                "the number of sms messages sent from a single mobile number within 30 seconds exceeds the "
                "upper limit",
                shown,
                "",
            )
        else:
            answer = sms_tencent.status_error_response(
                "InvalidParameterValue.IncorrectPhoneNumber", "incorrect number format", shown, ""
            )
        status: dict[str, Any] = answer["Response"]["SendStatusSet"][0]
        return status

    # ------------------------------------------------------------ pages

    def _routes(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/aliyun-sms/", self.aliyun, methods=["GET", "POST"], include_in_schema=False)
        router.add_api_route("/tencent-sms/", self.tencent, methods=["POST"], include_in_schema=False)

        @router.get("/sms/messages")
        async def messages(mobile: str = "", limit: int = 200) -> JSONResponse:
            number = parse_mobile(mobile) if mobile else None
            if mobile and number is None:
                return JSONResponse({"messages": []})
            found = await asyncio.to_thread(self.book.messages, number, max(1, min(limit, 1000)))
            return JSONResponse({"messages": [m.as_json() for m in found]})

        @router.post("/sms/rules")
        async def set_rule(request: Request) -> Response:
            """mobile + rule (fail, exempt, or empty to clear); JSON answers JSON, a form a redirect."""
            as_json = request.headers.get("content-type", "").startswith("application/json")
            body = await request.body()
            try:
                given = (
                    json.loads(body or b"{}") if as_json else dict(parse_qsl(body.decode("utf-8", "replace")))
                )
            except ValueError:
                given = None
            if not isinstance(given, dict):
                return JSONResponse({"error": "a JSON object or a form"}, 400)
            number = parse_mobile(str(given.get("mobile", "")))
            rule = str(given.get("rule") or "")
            if number is None or rule not in ("fail", "exempt", ""):
                return JSONResponse({"error": "mobile must be a mainland number, rule fail|exempt|''"}, 400)
            await asyncio.to_thread(
                self.book.set_rule, number, "fail" if rule == "fail" else "exempt" if rule else None
            )
            if as_json:
                return JSONResponse({"mobile": number, "rule": rule or None})
            return RedirectResponse("../sms", status_code=303)

        @router.get("/sms")
        async def sms_page(request: Request, mobile: str = "") -> Response:
            number = parse_mobile(mobile) if mobile else None
            # A lookup of something that is not a number finds nothing, rather than everything.
            wrong = bool(mobile) and number is None
            found = [] if wrong else await asyncio.to_thread(self.book.messages, number, 200)
            rules = await asyncio.to_thread(self.book.rules)
            return render(
                request,
                "sms.html",
                title="SMS received",
                mobile=mobile,
                number=number or "",
                messages=found,
                rules=rules,
            )

        return router


def sms_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import StandIn

    standin = SmsStandIn(SmsBook(state.folder / "sms.sqlite3"))

    async def recent() -> dict[str, Any]:
        return {"messages": await asyncio.to_thread(standin.book.messages, None, SECTION_ROWS)}

    return StandIn(
        name="SMS",
        summary="Aliyun SendSms at /aliyun-sms/, Tencent SendSms at /tencent-sms/, and what they sent",
        router=standin.router,
        links=[("messages", "/sms"), ("messages (JSON)", "/sms/messages")],
        section="sections/sms.html",
        context=recent,
        page="/sms",
    )
