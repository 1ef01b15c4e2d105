"""The sandbox's HTML: one Jinja2 environment over the templates shipped in ``sandbox/templates/``.

Autoescaping is on for every template, so a value (an order number, an SMS text, the
service's answer) is always text on the page, never markup. Every page extends
``layout.html``: the red SANDBOX banner and the navigation between the stand-ins.
Links are relative to the page (``root`` leads back to the console), so the pages
work wherever the sandbox is mounted, behind a proxy that strips a prefix too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from mallgate.clock import BEIJING

if TYPE_CHECKING:
    from mallgate.sandbox.app import StandIn

TEMPLATES: Final = "templates"
CONSOLE_TITLE: Final = "Console"


def clock_time(at: float | None) -> str:
    """A moment of today's traffic, to the millisecond: retries come fractions of a second apart."""
    if at is None:
        return ""
    return datetime.fromtimestamp(at, BEIJING).strftime("%H:%M:%S.%f")[:-3]


def date_time(at: float) -> str:
    return datetime.fromtimestamp(at, BEIJING).strftime("%Y-%m-%d %H:%M:%S")


@functools.cache
def environment() -> Environment:
    """The one environment: templates are compiled once and kept (they change only on install)."""
    env = Environment(
        loader=PackageLoader("mallgate.sandbox", TEMPLATES),
        # Every template escapes, whatever its name ends with; strings rendered directly too.
        autoescape=select_autoescape(("html",), default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["clock"] = clock_time
    env.filters["when"] = date_time
    return env


def route_path(request: Request) -> str:
    """The request's path inside the sandbox app ("/pay"), wherever the app is mounted."""
    path: str = request.scope["path"]
    mount: str = request.scope.get("root_path", "")
    return path[len(mount) :] if mount and path.startswith(mount) else path


def root(request: Request) -> str:
    """The relative way from this page to the sandbox's root: "./" at /pay, "../../" at /a/b/c."""
    depth = route_path(request).count("/") - 1
    return "../" * depth if depth > 0 else "./"


@dataclass(frozen=True)
class NavItem:
    title: str
    href: str
    current: bool = False


def navigation(request: Request, base: str) -> list[NavItem]:
    """The console, then every stand-in: its own page when it has one, else its console section."""
    here = route_path(request)
    state = getattr(request.app.state, "sandbox", None)
    standins: list[StandIn] = state.standins if state is not None else []
    items = [NavItem(CONSOLE_TITLE, base, here == "/")]
    for standin in standins:
        if standin.page:
            items.append(NavItem(standin.name, base + standin.page.lstrip("/"), here == standin.page))
        else:
            items.append(NavItem(standin.name, f"{base}#{standin.anchor}"))
    return items


def fragment(template: str, context: Mapping[str, Any]) -> Markup:
    """A part of a page (a stand-in's console section), already escaped."""
    return Markup(environment().get_template(template).render(context))  # noqa: S704 - autoescaped output


def render(
    request: Request, template: str, *, title: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    base = root(request)
    html = (
        environment()
        .get_template(template)
        .render(title=title, root=base, nav=navigation(request, base), **context)
    )
    return HTMLResponse(html, status_code=status_code)


def message(
    request: Request,
    title: str,
    text: str = "",
    *,
    rows: Mapping[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """A page that only says something: a cashier's error, a trade's state."""
    return render(
        request,
        "message.html",
        title=title,
        message=text,
        rows=list((rows or {}).items()),
        status_code=status_code,
    )
