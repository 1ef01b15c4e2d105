"""Payment routes: the Alipay and WeChat Pay notify URLs, and starting a payment (order/payment).

The notify handlers only package the request; verification, storage and the state
change happen in services (payment_decoders -> notifications -> orders), and each
answer is the channel's own success/failure, given only once the outcome is stored.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mallgate.channels import alipay, wechat_pay
from mallgate.deps import ParamsDep, RuntimeDep, UserDep, client_ip
from mallgate.envelope import ok
from mallgate.routes.lane import Endpoint
from mallgate.runtime import get_runtime
from mallgate.services import payment_decoders, payment_start
from mallgate.services.notifications import RawNotification

router = APIRouter()


async def _raw(request: Request, channel: str) -> RawNotification:
    return RawNotification(
        channel=channel,
        method=request.method,
        # latin-1 keeps the exact bytes of the query string (Alipay GET notices may be GBK).
        query_string=request.scope.get("query_string", b"").decode("latin-1"),
        body=await request.body(),
        source_ip=client_ip(request),
        headers=dict(request.headers),
    )


# The two notify URLs are plain Starlette routes: they take no parameters to validate, and
# FastAPI's per-request dependency machinery was a measurable share of a notification's cost.


async def alipay_notify(request: Request) -> Response:
    runtime = await get_runtime(request)
    result = await payment_decoders.handle(runtime, await _raw(request, payment_decoders.ALIPAY))
    return PlainTextResponse(alipay.success() if result.accepted else alipay.failure())


async def wechat_notify(request: Request) -> Response:
    runtime = await get_runtime(request)
    raw = await _raw(request, payment_decoders.WECHAT)
    result = await payment_decoders.handle(runtime, raw)
    # The refusal says only what kind of failure it was: the details are in the audit row.
    if payment_decoders.is_v2(raw.body):
        if result.accepted:
            return Response(wechat_pay.v2_success(), media_type="application/xml")
        return Response(wechat_pay.v2_fail(result.outcome), media_type="application/xml")
    if result.accepted:
        status, content = wechat_pay.v3_success()
    else:
        status, content = wechat_pay.v3_fail(result.outcome, 500 if result.outcome == "error" else 400)
    return Response(content, status_code=status, media_type="application/json" if content else None)


def notify_routes() -> list[Route]:
    """The notify URLs; app.py serves them on a lane of their own (see NotifyLane)."""
    return [
        Route("/pay/notify", Endpoint(alipay_notify, "GET", "POST")),
        Route("/wechat/notify", Endpoint(wechat_notify, "POST")),
    ]


# Also on the router, so that a URL with a trailing slash or odd casing still finds them.
for _route in notify_routes():
    router.add_route(
        _route.path, _route.endpoint, methods=list(_route.methods or []), include_in_schema=False
    )


@router.api_route("/order/payment", methods=["GET", "POST"])
async def order_payment(
    request: Request, runtime: RuntimeDep, params: ParamsDep, user: UserDep
) -> JSONResponse:
    data = await payment_start.start_payment(
        runtime,
        user,
        order_no=params.text("order_no", max_length=64),
        channel=params.text("channel", max_length=16),
        trade_type=params.text("trade_type", max_length=16).upper(),
        client_ip=client_ip(request),
    )
    return ok(data)
