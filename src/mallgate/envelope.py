"""The JSON envelope the clients read: {"info", "status", "data"} and the handlers that keep it.

Business failures answer HTTP 200 with status 0 (the clients read `status`, not
the HTTP code); an authentication failure answers 401, still in the envelope.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("mallgate")


class ApiError(Exception):
    """A failure the client should read: `info` for people, `code` for programs."""

    def __init__(self, info: str, code: str = "error", http_status: int = 200, **extra: Any) -> None:
        super().__init__(info)
        self.info = info
        self.code = code
        self.http_status = http_status
        self.extra = extra


class Unauthorized(ApiError):
    def __init__(self, info: str = "请先登录", code: str = "auth.required") -> None:
        super().__init__(info, code, http_status=401)


def ok(data: Any = None, info: str = "ok") -> JSONResponse:
    body: dict[str, Any] = {"info": info, "status": 1}
    if data is not None:
        body["data"] = data
    return JSONResponse(body)


def fail_body(info: str, code: str, **extra: Any) -> dict[str, Any]:
    return {"info": info, "status": 0, "code": code, **extra}


def fail(info: str, code: str = "error", http_status: int = 200, **extra: Any) -> JSONResponse:
    return JSONResponse(fail_body(info, code, **extra), status_code=http_status)


_HTTP_INFO = {
    404: ("接口不存在", "not_found"),
    405: ("请求方法不支持", "method_not_allowed"),
    413: ("请求体过大", "body_too_large"),
    415: ("不支持的内容类型", "unsupported_media_type"),
}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return fail(exc.info, exc.code, exc.http_status, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        info, code = _HTTP_INFO.get(exc.status_code, (str(exc.detail), "http_error"))
        answer = fail(info, code, exc.status_code)
        answer.headers.update(exc.headers or {})  # 405's Allow, which clients and probes read
        return answer

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "parameters"
        return fail(f"参数错误: {where} {first.get('msg', '')}".strip(), "invalid_parameter", 200)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Only the answer: Starlette raises the exception on after this, and `guarded` logs it.
        return server_error()


def server_error() -> JSONResponse:
    return fail("服务器繁忙，请稍后再试", "server_error", 500)


def traceback_without_messages(exc: BaseException) -> str:
    """Each exception of the chain by type and frames, never by message.

    Messages carry what went wrong *with what*: SQL with its parameters (mobile numbers,
    code hashes), a platform's answer, a key. The frames say where, which is what a fix needs.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__module__ + "." + type(current).__qualname__
        frames = "".join(traceback.format_tb(current.__traceback__)).rstrip()
        parts.append(f"{name} (message withheld)\n{frames}" if frames else f"{name} (message withheld)")
        current = current.__cause__ or current.__context__
    return "\ncaused by ".join(parts)


async def guarded(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Runs `app`; an exception that escapes it is logged without its message and answered 500.

    It is not raised on: uvicorn would log it whole, message included.
    """
    if scope["type"] != "http":
        await app(scope, receive, send)
        return
    started = False

    async def tracked(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, tracked)
    except Exception as exc:
        log.error(
            "unhandled %s on %s %s\n%s",
            type(exc).__name__,
            scope.get("method", ""),
            scope.get("path", ""),
            traceback_without_messages(exc),
        )
        if not started:
            await server_error()(scope, receive, send)
