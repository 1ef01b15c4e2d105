"""The one ASGI middleware in front of the app: metrics, body limits, bare OPTIONS.

One layer instead of three: every layer wraps `send` and costs a few microseconds
a request, which the notify path (thousands a second) feels.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# First: guards the workers' metrics files against a full disk before any metric holds a value.
from mallgate import metrics

REQUESTS = Counter("mallgate_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram(
    "mallgate_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# The method is the client's to choose (any token): the rest are one label, so that the label
# sets, and the workers' metrics files, stay bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyTooLarge(Exception):
    pass


def too_large_body() -> bytes:
    return json.dumps(
        {"info": "请求体过大", "status": 0, "code": "body_too_large"}, ensure_ascii=False
    ).encode()


_OK_BODY = b'{"info":"ok","status":1}'


async def _answer(send: Send, status: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """Counts requests by route template, refuses oversized bodies, answers bare OPTIONS.

    - Metrics are labelled by route template, not raw path (which would explode the label set),
      and by method only among the usual ones.
    - Bodies over the limit are refused by Content-Length before they are read, and while
      streaming when there is none (the app then answers 413 through BodyTooLarge).
    - The original answered every OPTIONS with 200; real CORS preflights (with
      Access-Control-Request-Method) are left to the CORS middleware inside.
    """

    def __init__(self, app: ASGIApp, *, default_limit: int, limit_for: Callable[[str], int | None]) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def recording_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        try:
            await self._handle(scope, receive, recording_send, lambda: response_started)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            REQUESTS.labels(template, method, str(status)).inc()
            LATENCY.labels(template).observe(time.perf_counter() - started)
            metrics.sync_dropped()

    async def _handle(self, scope: Scope, receive: Receive, send: Send, started: Callable[[], bool]) -> None:
        headers = dict(scope.get("headers") or [])
        if scope["method"] == "OPTIONS" and b"access-control-request-method" not in headers:
            await _answer(send, 200, _OK_BODY, (b"access-control-allow-origin", b"*"))
            return
        limit = self.limit_for(scope["path"]) or self.default_limit
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _answer(send, 413, too_large_body())
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            if not started():
                await _answer(send, 413, too_large_body())
