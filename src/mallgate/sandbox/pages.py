"""The few HTML pages the payment stand-ins show a person: cashiers, the pay form, the delivery log.

Plain HTML, every value escaped; links are relative so the pages work wherever
the sandbox is mounted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape

from fastapi.responses import HTMLResponse

from mallgate.clock import BEIJING
from mallgate.sandbox.notifier import Delivery

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;"
    "vertical-align:top}code{font-size:.9em}.ok{color:#080}.bad{color:#b00}"
    "button{font-size:1.2em;padding:.3em 1.5em}label{display:block;margin:.3em 0}"
    ".sandbox-banner{background:#b00;color:#fff;font-weight:bold;padding:.4em 1em;text-align:center;"
    "letter-spacing:.1em}"
)
# On every page, so nobody takes a stand-in's cashier or inbox for the real platform's.
BANNER = (
    "<div class=sandbox-banner role=alert>SANDBOX · 沙箱环境：以下均为本地模拟，不涉及真实资金与短信</div>"
)


def page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style>{BANNER}<h1>{escape(title)}</h1>{body}",
        status_code=status_code,
    )


def definition(rows: Iterable[tuple[str, str]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _time(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.fromtimestamp(at, BEIJING).strftime("%H:%M:%S.%f")[:-3]


def deliveries_table(deliveries: Sequence[Delivery]) -> str:
    if not deliveries:
        return "<p>No notifications sent yet.</p>"
    rows = []
    for d in deliveries:
        attempts = "<br>".join(
            f"#{a.number} {_time(a.at)} "
            + (
                f"<span class=ok>{a.status}</span>"
                if a.ok
                else f"<span class=bad>{a.status or a.error}</span>"
            )
            + f" <code>{escape(a.body[:120])}</code>"
            for a in d.attempts
        )
        state = d.state + (f" (next {_time(d.next_attempt_at)})" if d.next_attempt_at else "")
        rows.append(
            f"<tr><td>{d.id}{' dup ' + str(d.copy) if d.copy else ''}</td><td>{escape(d.protocol)}</td>"
            f"<td>{escape(d.kind)}</td><td>{escape(d.order_no)}</td><td>{escape(state)}</td>"
            f"<td>{attempts}</td><td><code>{escape(d.url)}</code></td></tr>"
        )
    return (
        "<table><tr><th>#</th><th>protocol</th><th>kind</th><th>order</th><th>state</th>"
        "<th>attempts</th><th>to</th></tr>" + "".join(rows) + "</table>"
    )
