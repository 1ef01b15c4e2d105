"""create_app(settings) -> the ASGI app, with every route mounted."""

from __future__ import annotations

import functools
import gc
import logging
import re
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.datastructures import State
from starlette.routing import BaseRoute, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mallgate.clock import Clock
from mallgate.envelope import guarded, install_handlers
from mallgate.middleware import BodyTooLarge, Gate, too_large_body
from mallgate.routes import account, admin, health, login, oauth, payments, qrcode, sms
from mallgate.routes import admin_wechat as admin_wechat_routes
from mallgate.routes import auth as auth_routes
from mallgate.routes import share as share_routes
from mallgate.routes import share_spread as spread_routes
from mallgate.routes import templates as template_routes
from mallgate.routes import users as users_routes
from mallgate.routes import wechat_mp as wechat_mp_routes
from mallgate.runtime import Runtime
from mallgate.sandbox.app import MOUNT, create_sandbox_app, service_settings
from mallgate.services import outbox_worker, wechat_push
from mallgate.services.spread import MEDIA_ROUTE, media_dir
from mallgate.settings import Settings

log = logging.getLogger("mallgate")

# The platforms' callbacks: their bodies are small, so their limit is too.
NOTIFY_SUFFIXES = ("/pay/notify", "/wechat/notify", "/wechat.index")
DOCS_ASSETS = "/docs/assets"
# The routes read their parameters themselves (query, form or JSON alike), so the document
# cannot list them: it says where they are.
API_DESCRIPTION = (
    "Every route takes its parameters from the query string, a form body or a JSON body. "
    "Parameters, answers and error codes of each route: docs/API.md in the repository."
)
CORS_HEADERS = ["Auth-Token", "Content-Type", "Authorization", "X-Requested-With", "Accept", "Origin"]


def tune_gc() -> None:
    """Keep the cycle collector off the long-lived start-up heap.

    A full collection walks every object the libraries built at import (several
    hundred thousand), which stalled requests for up to 100 ms under load: the p99.
    Freezing moves them out of the collector's sight; a larger first threshold makes
    the young collections rarer. Request garbage is still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def api_router() -> APIRouter:
    """Every route of the API document, under the base path."""
    router = APIRouter()
    router.include_router(payments.router)
    router.include_router(account.router)
    router.include_router(qrcode.router)
    router.include_router(sms.router)
    router.include_router(login.router)
    router.include_router(oauth.router)
    router.include_router(auth_routes.router)
    router.include_router(share_routes.router)
    router.include_router(spread_routes.router)
    router.include_router(template_routes.router)
    router.include_router(users_routes.router)
    router.include_router(wechat_mp_routes.router)
    return router


HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
# The method FastAPI appends to a generated operation id: of whichever method a set yields first.
_METHOD_SUFFIX = re.compile(r"_(?:" + "|".join(HTTP_METHODS) + r")$")


def unique_operation_ids(schema: dict[str, Any]) -> dict[str, Any]:
    """One operation id per (path, method): `<name>_<path>_<method>`.

    FastAPI names an operation per route, not per method, so a route served for GET and POST
    (send_sms, user/info, order/payment) had both operations under one id: the "Duplicate
    Operation ID" warning, and clashing functions in a generated client. An id still shared
    after this names two different routes: that is warned about, as FastAPI would.
    """
    seen: dict[str, int] = {}
    for operations in schema.get("paths", {}).values():
        ids = [op.get("operationId") for m, op in operations.items() if m in HTTP_METHODS]
        for method, operation in operations.items():
            op_id = operation.get("operationId") if method in HTTP_METHODS else None
            if op_id is None:
                continue
            if ids.count(op_id) > 1:
                op_id = operation["operationId"] = f"{_METHOD_SUFFIX.sub('', op_id)}_{method}"
            seen[op_id] = seen.get(op_id, 0) + 1
    for op_id, count in seen.items():
        if count > 1:
            warnings.warn(f"Duplicate Operation ID {op_id} in /openapi.json", stacklevel=1)
    return schema


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """/openapi.json, built once, with an operation id per (path, method)."""
    if app.openapi_schema is None:
        with warnings.catch_warnings():
            # The warnings FastAPI gives for a route with several methods; fixed just below.
            warnings.filterwarnings("ignore", message="Duplicate Operation ID", category=UserWarning)
            schema = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
        app.openapi_schema = unique_operation_ids(schema)
    return app.openapi_schema


class NotifyLane:
    """Sends the platforms' notify callbacks straight to their handlers; everything else to FastAPI.

    Callbacks from Alipay and WeChat Pay need none of the client-facing stack (CORS, the
    JSON envelope's error handlers, FastAPI's dispatch), and that stack was about half of
    a notification's cost. The lane keeps what they do need: metrics and the body limit.
    """

    def __init__(self, app: FastAPI, lanes: dict[str, ASGIApp]) -> None:
        self.app = app
        self.lanes = lanes

    @property
    def state(self) -> State:
        return self.app.state

    @property
    def routes(self) -> list[BaseRoute]:
        return self.app.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope, send = head_as_get(scope, send)
        lane = self.lanes.get(scope["path"]) if scope["type"] == "http" else None
        if lane is None:
            await guarded(self.app, scope, receive, send)
            return
        scope["app"] = self.app  # handlers find the runtime through request.app
        await guarded(lane, scope, receive, send)


def create_app(
    settings: Settings | None = None, *, clock: Clock | None = None, sandbox: bool | None = None
) -> NotifyLane:
    """The service; with the sandbox on, the stand-ins are mounted at /_sandbox and used."""
    settings = settings or Settings()
    if sandbox is not None:
        settings = settings.model_copy(update={"sandbox": sandbox})
    # Refuses (SandboxRefused) a sandbox asked for beside real credentials, before any key is made.
    settings, sandbox_url = service_settings(settings)
    sandbox_app = None
    if sandbox_url is not None:
        sandbox_app = create_sandbox_app(
            settings.var_dir / "sandbox", service_url=settings.public_url.rstrip("/") + settings.base_path
        )
    runtime = Runtime.create(settings, clock)
    runtime.sandbox_url = sandbox_url

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tune_gc()
        # The outbox worker: in every process, but only the holder of the runner lease sends.
        outbox_task = outbox_worker.start(runtime)
        yield
        await outbox_worker.stop(outbox_task)
        # Starlette runs no lifespan for a mounted app: the sandbox's clients are closed here.
        if sandbox_app is not None:
            await sandbox_app.state.sandbox.aclose()
        # Pushes answered `success` at the deadline may still be finishing: give them that long again.
        await wechat_push.drain(runtime, within=settings.wechat_mp.reply_deadline_seconds)
        await runtime.close()

    # Swagger UI's scripts and styles from the fastapi-offline package: /docs works with no network.
    app = FastAPIOffline(
        docs_url="/docs",
        redoc_url=None,
        static_url=DOCS_ASSETS,
        title="mallgate",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.openapi = functools.partial(openapi_schema, app)  # type: ignore[method-assign]
    app.state.runtime = runtime
    install_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, _exc: BodyTooLarge) -> Response:
        return Response(too_large_body(), status_code=413, media_type="application/json")

    # The API first: routes are matched in order, and the notify routes are the busiest.
    app.include_router(api_router(), prefix=settings.base_path)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(admin_wechat_routes.router)
    # Public images (spread/qrcode's codes): the one folder under var/ that is not private.
    app.mount(MEDIA_ROUTE, StaticFiles(directory=media_dir(settings), check_dir=False), name="media")

    if sandbox_app is not None:
        app.mount(MOUNT, sandbox_app)

    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
        allow_headers=CORS_HEADERS,
        max_age=86400,
    )
    notify_paths = tuple(settings.base_path + s for s in NOTIFY_SUFFIXES)

    def limit_for(path: str) -> int | None:
        return settings.notify_body_limit if path.rstrip("/").endswith(notify_paths) else None

    app.add_middleware(Gate, default_limit=settings.body_limit, limit_for=limit_for)
    lanes: dict[str, ASGIApp] = {}
    for route in [*payments.notify_routes(), *wechat_mp_routes.lane_routes()]:
        path = settings.base_path + route.path
        full = Route(path, route.endpoint, methods=sorted(route.methods or ()))
        lanes[path] = Gate(_Labelled(full), default_limit=settings.notify_body_limit, limit_for=limit_for)
    return NotifyLane(app, lanes)


def head_as_get(scope: Scope, send: Send) -> tuple[Scope, Send]:
    """HEAD answered as GET without the body (RFC 9110 9.3.2); FastAPI's routes take no HEAD.

    Load balancers and `curl -I` check with HEAD, and got 405. The headers, Content-Length
    included, are the GET answer's. Only the app sees GET: the server's own scope still says
    HEAD, so it frames the answer as one. A route without GET answers 405, as for GET.
    """

    async def headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return {**scope, "method": "GET"}, headers_only


class _Labelled:
    """Puts the route in the scope, where the metrics look for its template."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        await self.route.handle(scope, receive, send)
