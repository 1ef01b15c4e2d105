"""`spread/qrcode` (route 5 of the API document) and `spread/scene`: Mini Program codes naming a sharer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, UserDep
from mallgate.envelope import ok
from mallgate.services import spread

router = APIRouter()


@router.post("/spread/qrcode")
async def spread_qrcode(runtime: RuntimeDep, params: ParamsDep, user: UserDep) -> JSONResponse:
    goods_id = params.integer("id")
    assert goods_id is not None  # required
    pages = runtime.settings.spread.pages
    page = params.text("type", required=False, max_length=128, default=pages[0] if pages else "")
    return ok(await spread.spread_qrcode(runtime, user.id, goods_id, page))


@router.get("/spread/scene")
async def spread_scene(runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    # The Mini Program gets query.scene URL-encoded; our codes have nothing to encode, but a page
    # that forgot decodeURIComponent still sends them verbatim.
    return ok(await spread.scene_view(runtime, params.text("scene", max_length=64)))
