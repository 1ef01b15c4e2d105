"""share/config: the JS-SDK signature (WeChat's published example), the page URL rules, debug, settings."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_wechat_tokens import cold_cache, counts, delta, standin

from conftest import Server, other_server
from mallgate.channels.wechat_api import PageUrlRefused, jsapi_signature, jsapi_string, normalize_page_url
from mallgate.sandbox.app import WECHAT_MP_APP_ID
from mallgate.sandbox.wechat_standin import STABLE, TICKET
from mallgate.settings import DEFAULT_JS_API_LIST

# The JS-SDK document's example (附录1), and the signature it gives.
DOC_TICKET = "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg"
DOC_NONCE = "Wm3WZYTPz0wzccnW"
DOC_TIMESTAMP = 1414587457
DOC_URL = "http://mp.weixin.qq.com?params=value"
DOC_SIGNATURE = "0f9de62fce790f9a083d5c99e95740ceb90c27ed"


async def share(client: httpx.AsyncClient, method: str = "GET", **params: Any) -> dict[str, Any]:
    if method == "GET":
        answer = await client.get("/api/share/config", params=params)
    else:
        answer = await client.post("/api/share/config", json=params)
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def ticket_of(server: Server) -> str:
    return standin(server).book.current_ticket(WECHAT_MP_APP_ID)


# ---------------------------------------------------------------------------------------------
# the signature and the URL, alone


def test_the_published_signature_vector() -> None:
    assert (
        jsapi_string(DOC_TICKET, DOC_NONCE, DOC_TIMESTAMP, DOC_URL)
        == f"jsapi_ticket={DOC_TICKET}&noncestr={DOC_NONCE}&timestamp={DOC_TIMESTAMP}&url={DOC_URL}"
    )
    assert jsapi_signature(DOC_TICKET, DOC_NONCE, DOC_TIMESTAMP, DOC_URL) == DOC_SIGNATURE
    assert jsapi_signature(DOC_TICKET, DOC_NONCE, str(DOC_TIMESTAMP), DOC_URL) == DOC_SIGNATURE


@pytest.mark.parametrize(
    ("given", "signed"),
    [
        ("https://shop.example.com/p/1?a=1&b=2#/goods/9", "https://shop.example.com/p/1?a=1&b=2"),
        ("http://mp.weixin.qq.com?params=value", "http://mp.weixin.qq.com?params=value"),
        # Never rewritten: encoding, a default port and case stay as the page has them.
        (
            "https://Shop.example.com:443/a%20b/?q=%E4%B8%AD#x",
            "https://Shop.example.com:443/a%20b/?q=%E4%B8%AD",
        ),
        ("https://shop.example.com/#/", "https://shop.example.com/"),
    ],
)
def test_the_fragment_is_removed_and_nothing_else_changed(given: str, signed: str) -> None:
    assert normalize_page_url(given) == signed


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("javascript:alert(1)", "share.url_scheme"),
        ("ftp://shop.example.com/", "share.url_scheme"),
        ("shop.example.com/page", "share.url_scheme"),
        ("#/only-a-fragment", "share.url_missing"),
        ("https:///no-host", "share.url_invalid"),
        ("https://shop.example.com:port/", "share.url_invalid"),
        ("https://shop.example.com/a b", "share.url_invalid"),
        ("https://shop.example.com/" + "a" * 2100, "share.url_too_long"),
        ("https://evil.example.net/", "share.url_domain"),
        ("https://shop.example.com.evil.net/", "share.url_domain"),
    ],
)
def test_a_url_that_cannot_be_signed_is_refused_with_its_reason(url: str, code: str) -> None:
    with pytest.raises(PageUrlRefused) as refused:
        normalize_page_url(url, ["shop.example.com", "m.example.com"])
    assert refused.value.code == code and refused.value.reason


def test_a_host_in_the_list_is_signed() -> None:
    assert normalize_page_url("https://m.example.com/x", ["shop.example.com", "m.example.com"])


# ---------------------------------------------------------------------------------------------
# the route


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_share_config_signs_the_page_with_the_shared_ticket(
    server: Server, client: httpx.AsyncClient, method: str
) -> None:
    page = "https://shop.example.com/goods/1?from=timeline"
    body = await share(client, method, url=page + "#/detail")
    assert body["status"] == 1, body
    data = body["data"]
    assert set(data) == {"appId", "timestamp", "nonceStr", "signature", "jsApiList"}
    assert data["appId"] == WECHAT_MP_APP_ID
    assert isinstance(data["timestamp"], int) and len(str(data["timestamp"])) == 10
    assert data["jsApiList"] == list(DEFAULT_JS_API_LIST)
    assert data["signature"] == jsapi_signature(ticket_of(server), data["nonceStr"], data["timestamp"], page)


async def test_a_warm_ticket_is_not_fetched_again(server: Server, client: httpx.AsyncClient) -> None:
    await cold_cache(server)
    before = counts(server)
    for i in range(5):
        assert (await share(client, url=f"https://shop.example.com/{i}"))["status"] == 1
    assert delta(before, counts(server)) == {STABLE: 1, TICKET: 1}


async def test_debug_shows_what_was_signed_with_the_ticket_masked(
    server: Server, client: httpx.AsyncClient
) -> None:
    page = "https://shop.example.com/p?x=1"
    body = await share(client, url=page + "#frag", debug="1")
    data, debug = body["data"], body["data"]["debug"]
    ticket = ticket_of(server)
    assert debug["url"] == page and debug["received_url"] == page + "#frag"
    assert ticket not in str(body)
    assert debug["signed"] == jsapi_string(debug["ticket"], data["nonceStr"], data["timestamp"], page)
    assert debug["ticket"].startswith(ticket[:6]) and "…" in debug["ticket"]
    # Without debug, none of it.
    assert "debug" not in (await share(client, url=page))["data"]


@pytest.mark.parametrize(
    ("url", "code"),
    [("javascript:alert(1)", "share.url_scheme"), ("weixin://dl/business", "share.url_scheme")],
)
async def test_a_refused_url_answers_status_0_with_the_reason(
    client: httpx.AsyncClient, url: str, code: str
) -> None:
    body = await share(client, url=url, debug="1")
    assert body["status"] == 0 and body["code"] == code
    assert body["url"] == url and body["info"]
    assert "url" not in await share(client, url=url)


async def test_missing_url(client: httpx.AsyncClient) -> None:
    body = await share(client)
    assert body["status"] == 0 and body["code"] == "param.missing"


async def test_js_domains_and_the_api_list_come_from_the_settings(server: Server) -> None:
    wechat_mp = {"js_domains": "shop.example.com", "js_api_list": "updateAppMessageShareData,chooseWXPay"}
    async with other_server(server, wechat_mp=wechat_mp) as other:
        refused = await share(other, url="https://evil.example.net/p")
        assert refused["code"] == "share.url_domain"
        assert "evil.example.net" in refused["info"] and "shop.example.com" in refused["info"]
        allowed = await share(other, url="https://SHOP.example.com/p")
        assert allowed["status"] == 1, allowed
        assert allowed["data"]["jsApiList"] == ["updateAppMessageShareData", "chooseWXPay"]


async def test_without_the_sandbox_and_no_official_account_not_configured(server: Server) -> None:
    async with other_server(server, sandbox=False) as other:
        body = await share(other, url="https://shop.example.com/")
    assert body["status"] == 0 and body["code"] == "wechat_mp.not_configured"


async def test_wechat_refusing_the_credentials_is_a_clear_failure(server: Server) -> None:
    # The sandbox stays off (credentials given); the secret is not the stand-in's: 40001.
    settings: dict[str, Any] = {
        "sandbox": None,
        "wechat_mp": {"app_id": WECHAT_MP_APP_ID, "app_secret": "0" * 32},
        "wechat": {"api_base": f"{server.url}/_sandbox/wechat"},
    }
    async with other_server(server, **settings) as other:
        await cold_cache(server)
        body = await share(other, url="https://shop.example.com/")
    assert body["status"] == 0 and body["code"] == "wechat.api_error" and body["errcode"] == 40001
