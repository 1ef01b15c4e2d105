"""`template` (route 10 of the API document) and `template/accept`: subscribe templates, users' grants."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, UserDep
from mallgate.envelope import ok
from mallgate.services import subscribe

router = APIRouter()


@router.api_route("/template", methods=["GET", "POST"])
async def template(runtime: RuntimeDep) -> JSONResponse:
    return ok(subscribe.template_ids(runtime.settings))


@router.post("/template/accept")
async def template_accept(runtime: RuntimeDep, params: ParamsDep, user: UserDep) -> JSONResponse:
    # The map as `data` (object or JSON string), or wx.requestSubscribeMessage's result posted as is.
    raw = params["data"] if "data" in params else dict(params)
    answers = subscribe.parse_accept_map(raw, runtime.settings)
    return ok(await subscribe.record_grants(runtime, user.id, answers))
