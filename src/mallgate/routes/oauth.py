"""Official Account web login: `oauth/url` (the consent page's URL) and `oauth` (code -> profile)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, client_ip
from mallgate.envelope import ok
from mallgate.routes.login import _referrer
from mallgate.services import wechat_oauth

router = APIRouter()

# Longer than any valid value, so that the service's own check names the rule that is broken.
_READ_LIMIT = 1024


@router.post("/oauth")
async def oauth_login(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    profile = await wechat_oauth.login(
        runtime,
        params.text("code", max_length=_READ_LIMIT),
        params.text("state", required=False, max_length=_READ_LIMIT),
        _referrer(params),
        client_ip(request),
    )
    return ok(profile, info="登录成功")


@router.get("/oauth/url")
async def oauth_url(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    scope = wechat_oauth.parse_scope(params.text("scope", required=False, default="snsapi_userinfo"))
    data = await wechat_oauth.issue_url(
        runtime,
        params.text("redirect_uri", max_length=wechat_oauth.MAX_REDIRECT_URI * 4),
        scope,
        client_ip(request),
    )
    return ok(data)
