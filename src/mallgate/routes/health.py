"""/healthz (the database answers, its disk has room) and /metrics (Prometheus), outside the API base path."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from mallgate import metrics as guarded_metrics
from mallgate.deps import RuntimeDep
from mallgate.disk import database_disk_full
from mallgate.envelope import fail

router = APIRouter()


@router.get("/healthz")
async def healthz(runtime: RuntimeDep) -> JSONResponse:
    try:
        await asyncio.wait_for(runtime.db.ping(), timeout=runtime.settings.db_timeout_seconds)
    except Exception:  # any failure to reach the database is "not healthy", whatever the driver raises
        return JSONResponse({"info": "database unreachable", "status": 0, "code": "db.down"}, status_code=503)
    # Reads still work on a full disk, but no notification can be stored: the balancer is told.
    full = database_disk_full(runtime.db.url)
    if full is not None:
        return fail("数据库所在磁盘已满", "disk.full", 503, reason=full.reason, free_bytes=full.free_bytes)
    return JSONResponse({"info": "ok", "status": 1, "data": {"database": runtime.db.backend}})


@router.get("/metrics")
async def metrics() -> Response:
    guarded_metrics.sync_dropped()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several uvicorn workers: sum what each wrote to the shared folder.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/floor")
async def floor() -> PlainTextResponse:
    """Does nothing: the benchmark's yardstick for what the server itself costs."""
    return PlainTextResponse("ok")
