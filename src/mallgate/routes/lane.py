"""Platform callbacks served off FastAPI's stack (app.py's NotifyLane): their endpoints.

Alipay's and WeChat Pay's notify URLs and the Official Account's ``wechat.index`` are called
by servers, not shoppers' browsers: they need none of CORS, the JSON envelope's handlers or
FastAPI's dispatch, and that stack cost about half of a callback's time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response
from starlette.routing import request_response
from starlette.types import Receive, Scope, Send


class Endpoint:
    """A callback handler as an ASGI app that answers a method it does not serve itself: 405, Allow.

    Left to Starlette's Route, a wrong method raises HTTPException(405) whenever the scope
    carries an "app", which the notify lane sets and has no exception handler for: a 500.
    As an ASGI endpoint the Route passes every method here, on the lane and on the router alike.
    """

    def __init__(self, handler: Callable[[Request], Awaitable[Response]], *methods: str) -> None:
        self.handler = request_response(handler)
        self.methods = frozenset(methods) | ({"HEAD"} if "GET" in methods else frozenset())
        self.allow = ", ".join(sorted(self.methods))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            await self.handler(scope, receive, send)
            return
        answer = PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": self.allow})
        await answer(scope, receive, send)
