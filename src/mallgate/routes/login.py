"""Mobile-number accounts: register and reset a password with an SMS code, log in with a password."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, client_ip
from mallgate.envelope import ok
from mallgate.params import Params, ascii_int
from mallgate.services import sms_codes

router = APIRouter()


def _referrer(params: Params) -> int | None:
    # A referrer is optional metadata: clients send "", "0" or "undefined" when there is none,
    # and none of those may block a registration.
    referrer = ascii_int(str(params.get("spread_id") or "").strip())
    return referrer or None


@router.post("/register")
async def register(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    profile = await sms_codes.register(
        runtime,
        params.text("username", max_length=20),
        params.text("code", max_length=16),
        params.text("password", max_length=128),
        _referrer(params),
        client_ip(request),
    )
    return ok(profile, info="注册成功")


@router.post("/forget")
async def forget(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    await sms_codes.reset_password(
        runtime,
        params.text("username", max_length=20),
        params.text("code", max_length=16),
        params.text("password", max_length=128),
        client_ip(request),
    )
    return ok(info="密码已重置，请重新登录")


@router.post("/public/login")
async def password_login(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    profile = await sms_codes.password_login(
        runtime,
        params.text("username", max_length=64),
        params.text("password", max_length=128),
        client_ip(request),
    )
    return ok(profile, info="登录成功")
