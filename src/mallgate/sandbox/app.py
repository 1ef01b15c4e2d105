"""The local stand-in of every third party, as one ASGI app mounted at /_sandbox.

Each stand-in registers a router and its part of the console (``/_sandbox/``): a
template and the function that fills it with the stand-in's recent traffic. The
stand-ins speak the platforms' real wire protocols with the sandbox's own keys, so
the service's channel code runs unchanged against them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup
from pydantic import BaseModel

from mallgate.parties import SandboxRefused, sandbox_problems, sandbox_wanted
from mallgate.sandbox.keys import SandboxKeys
from mallgate.sandbox.pages import fragment, render, root
from mallgate.sandbox.webhook_standin import RECEIVE_PATH as WEBHOOK_RECEIVE_PATH
from mallgate.sandbox.webhook_standin import webhook_secret
from mallgate.settings import Settings

log = logging.getLogger("mallgate.sandbox")
ModelT = TypeVar("ModelT", bound=BaseModel)

MOUNT = "/_sandbox"
ALIPAY_APP_ID = "2021000000000001"
ALIPAY_SELLER_ID = "2088000000000001"
WECHATPAY_MCH_ID = "1900000001"
WECHAT_MP_APP_ID = "wx00000000000000a1"
WECHAT_MINI_APP_ID = "wx00000000000000b2"
WECHAT_APP_APP_ID = "wx00000000000000c3"
QQ_APP_ID = "100000001"
APPLE_BUNDLE_ID = "com.example.mallgate"


# What a stand-in's console section shows, gathered afresh on each view of the console.
SectionContext = Callable[[], Awaitable[Mapping[str, Any]]]


async def _nothing() -> Mapping[str, Any]:
    return {}


@dataclass
class StandIn:
    """One third party's stand-in: its routes and its part of the console.

    A new stand-in joins the console by giving ``section`` (a template under
    ``sandbox/templates/``, rendered with ``context()``'s values plus ``root``, the
    relative way to the sandbox's root) and, when it has a page of its own, ``page``
    (the navigation on every page links it); the console itself is never edited.
    """

    name: str
    summary: str
    router: APIRouter
    links: list[tuple[str, str]] = field(default_factory=list)
    section: str = ""
    context: SectionContext = _nothing
    page: str = ""

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "standin"


class Resource(Protocol):
    async def aclose(self) -> None: ...


@dataclass
class SandboxState:
    """What the stand-ins share: keys, the service they talk back to, and whatever they record."""

    keys: SandboxKeys
    folder: Path
    service_url: str = ""
    standins: list[StandIn] = field(default_factory=list)
    # What stand-ins own beyond a request (HTTP clients, background retries), by name, for
    # tests to reach and for whoever runs the sandbox to close.
    resources: dict[str, Resource] = field(default_factory=dict)

    async def aclose(self) -> None:
        for resource in self.resources.values():
            await resource.aclose()


def _fill(model: ModelT, values: dict[str, Any], kept: list[str], prefix: str) -> ModelT:
    """`model` with `values` put only where the operator left the setting unset."""
    given = {
        name for name in values if name in model.model_fields_set and getattr(model, name) not in ("", None)
    }
    kept.extend(f"{prefix}__{name.upper()}" for name in sorted(given))
    return model.model_copy(update={k: v for k, v in values.items() if k not in given})


def sandbox_settings(settings: Settings, sandbox_url: str, keys: SandboxKeys) -> tuple[Settings, list[str]]:
    """The service's settings with every third party pointed at the sandbox.

    Only what the operator left unset is filled in: a setting they gave is never
    overwritten (the names of those kept are returned, for the start-up log).
    """
    from mallgate.keys import load_private_key, public_pem

    kept: list[str] = []
    parties: dict[str, dict[str, Any]] = {
        "alipay": {
            "app_id": ALIPAY_APP_ID,
            "public_key": keys.alipay_platform_public,
            "private_key": keys.alipay_merchant_private,
            "sign_type": "RSA2",
            "seller_id": ALIPAY_SELLER_ID,
            "gateway_url": f"{sandbox_url}/alipay/gateway.do",
        },
        "wechat_pay": {
            "app_id": WECHAT_MINI_APP_ID,
            "mch_id": WECHATPAY_MCH_ID,
            "api_key": keys.wechatpay_api_key,
            "api_v3_key": keys.wechatpay_api_v3_key,
            "public_key": public_pem(load_private_key(keys.wechatpay_platform_private).public_key()),
            "public_key_id": keys.wechatpay_public_key_id,
            "mch_private_key": keys.wechatpay_merchant_private,
            "mch_serial_no": "5A000000000000000000000000000000000000A1",
            "api_base": f"{sandbox_url}/wechatpay",
        },
        "wechat_mp": {
            "app_id": WECHAT_MP_APP_ID,
            "app_secret": keys.wechat_app_secret,
            "token": keys.wechat_mp_token,
            "aes_key": keys.wechat_mp_aes_key,
        },
        "wechat_mini": {"app_id": WECHAT_MINI_APP_ID, "app_secret": keys.wechat_app_secret},
        "wechat_app": {"app_id": WECHAT_APP_APP_ID, "app_secret": keys.wechat_app_secret},
        "wechat": {"api_base": f"{sandbox_url}/wechat", "oauth_base": f"{sandbox_url}/wechat"},
        "qq": {"app_id": QQ_APP_ID, "api_base": f"{sandbox_url}/qq"},
        "apple": {"bundle_id": APPLE_BUNDLE_ID, "keys_url": f"{sandbox_url}/apple/auth/keys"},
        "sms": {"provider": "sandbox"},
        # The mall's own backend, not a third party: its URL and secret are no credential
        # (mallgate.parties), so setting them leaves the sandbox on; unset, the receiver page plays it.
        "webhook": {"url": f"{sandbox_url}{WEBHOOK_RECEIVE_PATH}", "secret": webhook_secret(keys)},
    }
    update: dict[str, Any] = {
        party: _fill(getattr(settings, party), values, kept, f"MALLGATE_{party.upper()}")
        for party, values in parties.items()
    }
    update["sandbox"] = True
    return settings.model_copy(update=update), kept


def service_settings(settings: Settings, keys: SandboxKeys | None = None) -> tuple[Settings, str | None]:
    """The settings the service runs with, and the sandbox URL when the sandbox is on.

    Raises SandboxRefused when the sandbox was asked for beside real credentials.
    """
    problems = sandbox_problems(settings)
    if problems:
        raise SandboxRefused(problems)
    if not sandbox_wanted(settings):
        return settings, None
    url = settings.public_url.rstrip("/") + MOUNT
    keys = keys or SandboxKeys.load_or_create(settings.var_dir / "sandbox")
    filled, kept = sandbox_settings(settings, url, keys)
    if kept:
        log.warning("sandbox: kept these settings as given instead of the stand-ins': %s", ", ".join(kept))
    return filled, url


def _standins(state: SandboxState) -> list[StandIn]:
    """Every stand-in of the sandbox; later parts add theirs here."""
    from mallgate.sandbox.apple_standin import apple_standin
    from mallgate.sandbox.payments import payment_standins
    from mallgate.sandbox.qq_standin import qq_standin
    from mallgate.sandbox.sms_standin import sms_standin
    from mallgate.sandbox.webhook_standin import webhook_standin
    from mallgate.sandbox.wechat_app_standin import wechat_app_standin
    from mallgate.sandbox.wechat_mini_standin import wechat_mini_standin
    from mallgate.sandbox.wechat_oauth_standin import wechat_oauth_standin
    from mallgate.sandbox.wechat_push_standin import wechat_push_standin
    from mallgate.sandbox.wechat_standin import wechat_standin
    from mallgate.sandbox.wechat_wxa_standin import wechat_wxa_standin

    return [
        *payment_standins(state),
        sms_standin(state),
        wechat_standin(state),
        wechat_oauth_standin(state),
        wechat_push_standin(state),
        wechat_wxa_standin(state),
        webhook_standin(state),
        wechat_mini_standin(state),
        wechat_app_standin(state),
        qq_standin(state),
        apple_standin(state),
    ]


@dataclass(frozen=True)
class _Section:
    standin: StandIn
    html: Markup | str


async def _sections(standins: list[StandIn], base: str) -> list[_Section]:
    """Every stand-in's part of the console, their traffic gathered side by side."""
    contexts = await asyncio.gather(*(s.context() for s in standins))
    return [
        _Section(s, fragment(s.section, {**values, "root": base}) if s.section else "")
        for s, values in zip(standins, contexts, strict=True)
    ]


def create_sandbox_app(folder: Path, service_url: str = "") -> FastAPI:
    state = SandboxState(keys=SandboxKeys.load_or_create(folder), folder=folder, service_url=service_url)
    state.standins = _standins(state)
    app = FastAPI(title="mallgate sandbox", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sandbox = state
    for standin in state.standins:
        app.include_router(standin.router)

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        return render(
            request,
            "console.html",
            title="Sandbox console",
            folder=str(folder),
            service_url=state.service_url,
            sections=await _sections(state.standins, root(request)),
        )

    return app
