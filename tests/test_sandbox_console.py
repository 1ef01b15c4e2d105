"""The sandbox console: one look for every page, each stand-in's recent traffic, forms that act,
redirect after POST, the service's own answer shown, escaping, the font stack, templates as package data.
"""

from __future__ import annotations

import glob
import logging
import re
import time
import tomllib
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from fastapi import APIRouter
from test_sandbox_payments import effective, sandbox_state, service_payments
from test_sandbox_sms import aliyun

import mallgate
from conftest import Server
from mallgate.channels import alipay
from mallgate.sandbox.app import MOUNT, StandIn
from mallgate.sandbox.pages import environment
from mallgate.sandbox.payments import Payments
from mallgate.sandbox.sms_standin import ALIYUN_WINDOW, SmsBook
from support import admin_create_order, admin_get_order, unique, unique_mobile

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("/", "/pay", "/sms")
CJK_FACES = (
    '"PingFang SC"',
    '"Hiragino Sans GB"',
    '"Microsoft YaHei"',
    '"Noto Sans CJK SC"',
    '"Source Han Sans SC"',
    '"WenQuanYi Micro Hei"',
)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
async def payments(server: Server) -> AsyncIterator[Payments]:
    """The service's payment stand-ins; retries a test left running are stopped after it."""
    found = service_payments(server)
    yield found
    await found.notifier.cancel_pending()


class _Page(HTMLParser):
    """What the tests read from a page: its links, and the text of each element with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.classes: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")
        if tag in ("section", "div") and values.get("id"):
            name = values["id"] or ""
            self.classes[name] = values.get("class") or ""
            self.text.setdefault(name, "")
            self._open.append((tag, name))
        elif tag in ("section", "div"):
            self._open.append((tag, None))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("section", "div") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for _, name in self._open:
            if name is not None:
                self.text[name] += data


def parsed(response: httpx.Response) -> _Page:
    assert response.status_code == 200, response.text
    page = _Page()
    page.feed(response.text)
    return page


async def form_pay(client: httpx.AsyncClient, **fields: str) -> httpx.Response:
    """The page's form as a browser sends it, then the page the 303 leads to."""
    answer = await client.post(f"{MOUNT}/pay", data=fields)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].startswith("pay?shown=")
    return await client.get(urljoin(f"{MOUNT}/pay", answer.headers["location"]))


# ---------------------------------------------------------------------------------------------
# one console


async def test_the_console_lists_every_stand_in(server: Server, client: httpx.AsyncClient) -> None:
    page = parsed(await client.get(f"{MOUNT}/"))
    standins = sandbox_state(server).standins
    assert {s.name for s in standins} >= {"Alipay", "WeChat Pay", "Pay this order", "SMS"}
    for standin in standins:
        assert standin.name in page.text[standin.anchor], standin.name
    # The forms to act: pay/refund/close, and a look-up of SMS by number.
    html = (await client.get(f"{MOUNT}/")).text
    assert '<form method="post" action="./pay"' in html and 'name="kind"' in html
    assert '<form class="inline" method="get" action="./sms"' in html and 'name="mobile"' in html


async def test_the_console_shows_recent_deliveries_and_sms(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient, payments: Payments
) -> None:
    order = await admin_create_order(client, amount="4.20")
    paid = await client.post(
        f"{MOUNT}/pay", json={"channel": "alipay", "order_no": order["order_no"], "amount": "4.20"}
    )
    assert paid.json()["data"]["delivered"] is True
    mobile = unique_mobile()
    await aliyun(server, http).send_code(mobile, "531864")
    page = parsed(await client.get(f"{MOUNT}/"))
    alipay = page.text["alipay"]
    assert order["order_no"] in alipay and "HTTP 200" in alipay and "success" in alipay
    assert order["order_no"] not in page.text["wechat-pay"]
    assert mobile in page.text["sms"] and "531864" in page.text["sms"]


async def test_every_page_has_the_banner_and_the_same_navigation(client: httpx.AsyncClient) -> None:
    navigations = []
    for path in PAGES:
        response = await client.get(f"{MOUNT}{path}")
        page = parsed(response)
        assert "SANDBOX" in response.text and 'class="sandbox-banner"' in response.text, path
        nav = response.text.split("<nav", 1)[1].split("</nav>", 1)[0]
        navigations.append(re.findall(r">([^<]+)</a>", nav))
        # Relative links: each one resolves, from this page, to a page that answers.
        for href in page.links:
            target = urljoin(f"{MOUNT}{path}", href).split("#", 1)[0]
            if target.startswith(MOUNT):
                assert (await client.get(target)).status_code == 200, (path, href)
    assert navigations[0] == navigations[1] == navigations[2]
    assert navigations[0][:2] == ["Console", "Alipay"]


async def test_a_stand_in_joins_the_console_through_its_section(
    server: Server, client: httpx.AsyncClient
) -> None:
    """What a later stand-in (WeChat, QQ, Apple) does: register a section; the console is not edited."""
    marker = unique("Q")

    async def context() -> Mapping[str, Any]:
        return {"messages": [], "marker": marker}

    standins = sandbox_state(server).standins
    joining = StandIn(
        "QQ login", "a later stand-in", APIRouter(), section="sections/sms.html", context=context
    )
    standins.append(joining)
    try:
        page = parsed(await client.get(f"{MOUNT}/"))
        assert "qq-login" in page.text and "a later stand-in" in page.text["qq-login"]
        assert "./#qq-login" in page.links
    finally:
        standins.remove(joining)


# ---------------------------------------------------------------------------------------------
# the pay form: redirect after POST, the service's own answer


async def test_the_pay_form_redirects_and_a_refresh_pays_nothing(
    client: httpx.AsyncClient, payments: Payments
) -> None:
    order = await admin_create_order(client, amount="7.10")
    shown = await form_pay(client, channel="alipay", order_no=order["order_no"], amount="7.10")
    page = parsed(shown)
    assert "outcome" in page.text and order["order_no"] in page.text["outcome"]
    assert page.classes["outcome"] == "outcome ok"
    assert "The service accepted the notification." in page.text["outcome"]
    assert "HTTP 200" in page.text["outcome"] and "success" in page.text["outcome"]
    # The form comes back filled in, ready for a refund of the same order.
    assert f'value="{order["order_no"]}"' in shown.text
    sent = len(payments.notifier.deliveries)
    trade = payments.book.get("alipay", order["order_no"])
    assert trade is not None
    trade_no = trade.trade_no
    for _ in range(2):  # what the browser's refresh does now: GET the result again
        again = await client.get(str(shown.url))
        assert again.status_code == 200 and order["order_no"] in again.text
    assert len(payments.notifier.deliveries) == sent
    assert [d.order_no for d in payments.notifier.deliveries].count(order["order_no"]) == 1
    assert trade.trade_no == trade_no
    assert (await admin_get_order(client, order["order_no"]))["status"] == "paid"


async def test_a_result_no_longer_kept_says_so(client: httpx.AsyncClient) -> None:
    page = parsed(await client.get(f"{MOUNT}/pay", params={"shown": "not-a-kept-result"}))
    assert "no longer kept" in page.text["outcome"]


async def test_a_refused_form_stays_on_the_page_and_sends_nothing(
    client: httpx.AsyncClient, payments: Payments
) -> None:
    sent = len(payments.notifier.deliveries)
    answer = await client.post(
        f"{MOUNT}/pay", data={"channel": "alipay", "order_no": unique(), "amount": "1.001"}
    )
    assert answer.status_code == 400 and "two decimals" in answer.text
    assert 'class="outcome bad"' in answer.text
    assert len(payments.notifier.deliveries) == sent


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"channel": "alipay"}, "failure"),
        ({"channel": "wechat", "wechat_version": "v2"}, "FAIL"),
        ({"channel": "wechat", "wechat_version": "v3"}, "HTTP 4"),
    ],
)
async def test_an_order_the_service_does_not_know_shows_its_refusal(
    client: httpx.AsyncClient,
    payments: Payments,
    caplog: pytest.LogCaptureFixture,
    fields: dict[str, str],
    refusal: str,
) -> None:
    order_no = unique("NOSUCH")
    with caplog.at_level(logging.INFO, logger="mallgate.sandbox"):
        page = parsed(await form_pay(client, order_no=order_no, amount="1.00", **fields))
    outcome = page.text["outcome"]
    assert page.classes["outcome"] == "outcome bad"
    assert "The service refused the notification." in outcome and refusal in outcome
    assert "accepted the notification" not in outcome and "sent" not in outcome.split()
    (delivery,) = [d for d in payments.notifier.deliveries if d.order_no == order_no]
    assert delivery.attempts[0].ok is False and str(delivery.attempts[0].status) in outcome
    lines = [r.getMessage() for r in caplog.records if r.name == "mallgate.sandbox"]
    assert any(order_no in line and refusal in line for line in lines), lines


async def test_a_cashier_redirects_and_its_refresh_notifies_nothing(
    server: Server, client: httpx.AsyncClient, payments: Payments
) -> None:
    order = await admin_create_order(client, amount="2.50")
    url = alipay.wap_pay_url(
        effective(server).alipay,
        notify_url=f"{server.api}/pay/notify",
        out_trade_no=order["order_no"],
        total_amount=Decimal("2.50"),
        subject="梨",
        return_url="https://shop.example/back",
    )
    cashier = await client.get(url)
    assert cashier.status_code == 200 and 'action="cashier/pay"' in cashier.text
    paid = await client.post(f"{MOUNT}/alipay/cashier/pay", data={"out_trade_no": order["order_no"]})
    assert paid.status_code == 303
    done = urljoin(f"{MOUNT}/alipay/cashier/pay", paid.headers["location"])
    sent = len(payments.notifier.deliveries)
    for _ in range(2):
        page = await client.get(done)
        assert page.status_code == 200 and order["order_no"] in page.text
        assert "https://shop.example/back?" in page.text and "SANDBOX" in page.text
    assert len(payments.notifier.deliveries) == sent
    assert [d.order_no for d in payments.notifier.deliveries].count(order["order_no"]) == 1


# ---------------------------------------------------------------------------------------------
# escaping, the SMS look-up


async def test_every_value_is_escaped(server: Server, client: httpx.AsyncClient, payments: Payments) -> None:
    order_no = "<script>alert(1)</script>"
    answer = await client.post(
        f"{MOUNT}/pay", json={"channel": "alipay", "order_no": order_no, "amount": "1.00"}
    )
    assert answer.status_code == 200
    mobile = unique_mobile()
    book = SmsBook(sandbox_state(server).folder / "sms.sqlite3")
    book.submit("aliyun", [mobile], "<script>alert(2)</script>", "<b>9</b>", time.time(), ALIYUN_WINDOW)
    pages = [
        await client.get(f"{MOUNT}/"),
        await client.get(f"{MOUNT}/pay"),
        await client.get(f"{MOUNT}/sms"),
        await client.get(f"{MOUNT}/sms", params={"mobile": mobile}),
        await client.get(f"{MOUNT}/sms", params={"mobile": "<script>alert(3)</script>"}),
    ]
    for page in pages:
        assert page.status_code == 200 and "<script" not in page.text and "<b>9</b>" not in page.text
    assert (
        "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0].text and "&lt;script&gt;alert(1)" in pages[1].text
    )
    assert (
        "&lt;script&gt;alert(2)&lt;/script&gt;" in pages[2].text and "&lt;b&gt;9&lt;/b&gt;" in pages[3].text
    )
    assert "&lt;script&gt;alert(3)&lt;/script&gt; is not a mainland mobile number" in pages[4].text
    # No inline script or event handler anywhere: nothing for an escaped value to reach.
    assert not re.search(r"\son[a-z]+=", "".join(p.text for p in pages))


async def test_sms_look_up_by_number(
    server: Server, client: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    first, second = unique_mobile(), unique_mobile()
    await aliyun(server, http).send_code(first, "112233")
    await aliyun(server, http).send_code(second, "445566")
    found = await client.get(f"{MOUNT}/sms", params={"mobile": "+86 " + first})
    assert found.status_code == 200 and "112233" in found.text
    assert second not in found.text and "445566" not in found.text


# ---------------------------------------------------------------------------------------------
# the look, and the templates as package data


async def test_a_cjk_font_stack_is_declared(client: httpx.AsyncClient) -> None:
    html = (await client.get(f"{MOUNT}/")).text
    assert '<html lang="zh-CN">' in html and '<meta charset="utf-8">' in html
    body = re.search(r"body \{[^}]*font:[^;]*?(system-ui[^;]*);", html)
    assert body is not None
    faces = [face.strip() for face in body.group(1).split(",")]
    assert faces[0] == "system-ui" and faces[-1] == "sans-serif"
    positions = [faces.index(face) for face in CJK_FACES]
    # macOS faces first, then Windows, then the Linux ones: the first the machine has is used.
    assert positions == sorted(positions)


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    return data


def test_templates_are_package_data() -> None:
    folder = resources.files("mallgate.sandbox") / "templates"
    assert folder.is_dir()
    listed = environment().list_templates()
    assert {"layout.html", "console.html", "pay.html", "sms.html", "sections/platform.html"} <= set(listed)
    for name in listed:
        resource = folder.joinpath(*name.split("/"))
        assert resource.is_file(), name
        environment().get_template(name)  # compiles
    # setuptools ships what these globs find (relative to the package): every template must be found.
    package = Path(mallgate.__file__).parent
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["mallgate"]
    found = [Path(p) for pattern in patterns for p in glob.glob(str(package / pattern))]
    shipped = {p.relative_to(package).as_posix() for p in found}
    assert {f"sandbox/templates/{name}" for name in listed} <= shipped


def test_jinja2_is_a_pinned_dependency() -> None:
    dependencies = [d.lower() for d in _pyproject()["project"]["dependencies"]]
    assert any(re.match(r"jinja2\b", d) for d in dependencies)
    pins = (ROOT / "constraints.txt").read_text().lower().splitlines()
    assert any(re.fullmatch(r"jinja2==[0-9.]+", line) for line in pins)


def test_autoescape_is_on_for_every_template() -> None:
    env = environment()
    assert callable(env.autoescape)
    assert all(env.autoescape(name) for name in [*env.list_templates(), "style.css", "notes.txt", None])
    assert env.from_string("{{ v }}").render(v="<i>") == "&lt;i&gt;"
