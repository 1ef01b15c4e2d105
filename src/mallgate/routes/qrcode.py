"""`qrcode`: a PNG of the given data (route 4 of the API document)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from mallgate.deps import RuntimeDep, client_ip
from mallgate.services.qrcodes import QrService

router = APIRouter()

# The URL fully determines the image, so clients and CDNs may keep it for good.
CACHE_CONTROL = "public, max-age=31536000, immutable"


@router.get("/qrcode")
async def qrcode(request: Request, runtime: RuntimeDep) -> Response:
    service = QrService.of(runtime)
    query = request.query_params
    wanted = service.parse(query.get("data"), query.get("size"), query.get("margin"), query.get("level"))
    etag = wanted.etag
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    service.check_rate(client_ip(request))
    png = service.cached_png(wanted)
    if png is None:
        # Drawing takes milliseconds even for a short code: never on the event loop.
        png = await run_in_threadpool(service.render, wanted)
    return Response(png, media_type="image/png", headers=headers)
