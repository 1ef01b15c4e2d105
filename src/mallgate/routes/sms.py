"""send_sms: a verification code to a mobile number, for registering or resetting a password."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, client_ip
from mallgate.envelope import ok
from mallgate.services import sms_codes

router = APIRouter()


@router.api_route("/send_sms", methods=["GET", "POST"])
async def send_sms(request: Request, runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    await sms_codes.send_code(
        runtime,
        params.text("username", max_length=20),
        params.text("type", max_length=16),
        client_ip(request),
    )
    return ok(info="验证码已发送")
