"""APP login: `users` (a WeChat, QQ or Apple SDK token -> the user profile with a token)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, client_ip
from mallgate.envelope import ok
from mallgate.routes.login import _referrer
from mallgate.services import app_login

router = APIRouter()

# An Apple identity token is about 1 KB; WeChat and QQ tokens and openids far shorter.
MAX_TOKEN = 4096
MAX_OPENID = 128


@router.post("/users")
async def app_user_login(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    profile = await app_login.login(
        runtime,
        params.text("type", max_length=16),
        params.text("openid", required=False, max_length=MAX_OPENID),
        params.text("access_token", max_length=MAX_TOKEN),
        _referrer(params),
        client_ip(request),
    )
    return ok(profile, info="登录成功")
