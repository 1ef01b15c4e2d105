"""`share/config` (route 6 of the API document): the signed ``wx.config`` of a page, for the JS-SDK."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from mallgate.channels.wechat_api import MAX_PAGE_URL
from mallgate.deps import ParamsDep, RuntimeDep
from mallgate.envelope import ok
from mallgate.services.share import share_config

router = APIRouter()

_TRUE = ("1", "true", "yes", "on")


@router.api_route("/share/config", methods=["GET", "POST"])
async def config(runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    # Longer than any page URL we sign: the length rule is the URL check's, with its reason.
    url = params.text("url", max_length=MAX_PAGE_URL * 4)
    debug = str(params.get("debug", "")).strip().lower() in _TRUE
    return ok(await share_config(runtime, url, debug=debug))
