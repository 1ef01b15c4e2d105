"""Mini Program login: `auth` (the code of wx.login -> profile with a token)."""

from __future__ import annotations

from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, client_ip
from mallgate.envelope import ok
from mallgate.params import Params
from mallgate.routes.login import _referrer
from mallgate.services import mini_login

router = APIRouter()

# Longer than any valid value, so that the service's own check names the rule that is broken.
_READ_LIMIT: Final = 1024


def _loose(params: Params, name: str, limit: int) -> str:
    """An optional extra: anything but a string of at most `limit` counts as not sent."""
    value = params.get(name)
    return value.strip() if isinstance(value, str) and len(value) <= limit else ""


def _user_info(params: Params) -> str | dict[str, Any]:
    value = params.get("userInfo")
    return value if isinstance(value, str | dict) else ""


@router.post("/auth")
async def auth(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    form = mini_login.MiniLogin(
        code=params.text("code", max_length=_READ_LIMIT),
        encrypted_data=_loose(params, "encryptedData", 16384),
        iv=_loose(params, "iv", 64),
        phone_code=params.text("phone_code", required=False, max_length=_READ_LIMIT),
        scene=_loose(params, "scene", 256),
        spread_id=_referrer(params),
    )
    profile = await mini_login.login(runtime, form, _user_info(params), client_ip(request))
    return ok(profile, info="登录成功")
