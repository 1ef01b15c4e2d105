"""The logged-in user's own profile: lets a client check that its token still works."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from mallgate.deps import RuntimeDep, UserDep
from mallgate.envelope import ok
from mallgate.services import accounts

router = APIRouter()


@router.api_route("/user/info", methods=["GET", "POST"])
async def user_info(runtime: RuntimeDep, user: UserDep) -> JSONResponse:
    return ok(accounts.profile(user, zone=runtime.settings.zone))
