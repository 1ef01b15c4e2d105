"""The WeChat APP login's console page: what the OpenSDK leaves the APP with, for ``users`` (type weixin).

The APP's WeChat login is the web OAuth of the Open Platform: the OpenSDK gets a code, the code
becomes a web access_token and openid, and ``sns/auth`` / ``sns/userinfo`` answer for it. All of
that is the WeChat OAuth stand-in's (`mallgate.sandbox.wechat_oauth_standin`, its book of codes
and tokens); this page only walks a chosen person through it for the APP app id and shows the
``openid`` and ``access_token`` to post, so tokens, errors (40003, 42001, 40001) and the unionid
shared with the Official Account and the Mini Program are the same ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mallgate.sandbox.pages import render
from mallgate.sandbox.wechat_oauth_standin import RESOURCE_KEY as OAUTH_KEY
from mallgate.sandbox.wechat_oauth_standin import WechatOAuthStandIn, _person

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

PAGE = "/wechat-app"


def wechat_app_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import WECHAT_APP_APP_ID, StandIn

    router = APIRouter(prefix=PAGE)

    def mint(form: dict[str, str]) -> dict[str, Any]:
        oauth = state.resources[OAUTH_KEY]
        assert isinstance(oauth, WechatOAuthStandIn)
        now = time.time()
        code = oauth.book.issue_code(
            WECHAT_APP_APP_ID, _person(form, WECHAT_APP_APP_ID), "snsapi_userinfo", now
        )
        params = {
            "appid": WECHAT_APP_APP_ID,
            "secret": state.keys.wechat_app_secret,
            "code": code,
            "grant_type": "authorization_code",
        }
        return oauth.book.exchange(params, now)

    def page(request: Request, minted: dict[str, Any] | None = None) -> Response:
        return render(
            request, "wechat_app.html", title="WeChat APP login", app_id=WECHAT_APP_APP_ID, minted=minted
        )

    @router.get("")
    async def show(request: Request) -> Response:
        return page(request)

    @router.post("/mint")
    async def mint_form(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        return page(request, await asyncio.to_thread(mint, form))

    return StandIn(
        name="WeChat APP login",
        summary="the OpenSDK login of the APP app id through the WeChat OAuth stand-in: "
        "an openid and web access_token to post to users",
        router=router,
        links=[("mint an APP access_token", PAGE)],
        page=PAGE,
    )
