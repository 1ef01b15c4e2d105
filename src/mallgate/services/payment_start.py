"""Starting a payment (order/payment): what a client needs to open Alipay's or WeChat Pay's cashier.

Nothing here changes an order: only a verified notification or a query answer
does that (services.orders). A client may ask again for the same order, e.g. to
switch channel; whichever payment arrives first wins, a second one is flagged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from mallgate.channels import alipay, wechat_pay
from mallgate.channels.errors import ChannelError
from mallgate.db.models import Order, User
from mallgate.envelope import ApiError
from mallgate.keys import load_private_key
from mallgate.runtime import Runtime
from mallgate.services import accounts, orders
from mallgate.services.payment_decoders import ALIPAY, WECHAT, yuan_to_fen

log = logging.getLogger("mallgate.pay")

TRADE_TYPES = ("JSAPI", "MINI", "APP", "H5", "NATIVE")
# What WeChat Pay v2 calls each client kind; the Mini Program pays through JSAPI too.
WECHAT_TRADE_TYPES: dict[str, wechat_pay.TradeType] = {
    "JSAPI": "JSAPI",
    "MINI": "JSAPI",
    "APP": "APP",
    "H5": "MWEB",
    "NATIVE": "NATIVE",
}
# ... and v3, by the last part of its path.
WECHAT_V3_TRADE_TYPES: dict[str, wechat_pay.V3TradeType] = {
    "JSAPI": "jsapi",
    "MINI": "jsapi",
    "APP": "app",
    "H5": "h5",
    "NATIVE": "native",
}
ALIPAY_TRADE_TYPES = ("APP", "H5")


def notify_url(runtime: Runtime, channel: str) -> str:
    settings = runtime.settings
    path = "/pay/notify" if channel == ALIPAY else "/wechat/notify"
    return settings.public_url.rstrip("/") + settings.base_path + path


@dataclass(frozen=True)
class Payable:
    """What a payment start needs of an order, read once (the session is gone afterwards)."""

    order_no: str
    amount: Decimal
    subject: str


async def _payable_order(runtime: Runtime, user: User, order_no: str) -> Payable:
    async with runtime.db.read() as session:
        order: Order | None = await orders.find_order(session, order_no)
        # Someone else's order answers like a missing one: order numbers must not be probeable.
        if order is None or (order.user_id is not None and order.user_id != user.id):
            raise ApiError("订单不存在", "order.not_found", field="order_no")
        if order.status != "unpaid":
            raise ApiError("订单已支付或已关闭，不能再支付", "order.not_payable", order_status=order.status)
        return Payable(order.order_no, order.amount, order.subject or "商城订单")


async def _wechat_openid(runtime: Runtime, user: User, app_id: str) -> str:
    """The user's openid at `app_id`, from their logins: a client never names the payer."""
    async with runtime.db.read() as session:
        identities = await accounts.identities_of(session, user.id)
    for identity in identities:
        if (
            identity.get("provider") == "wechat"
            and identity.get("app_id") == app_id
            and identity.get("openid")
        ):
            return str(identity["openid"])
    raise ApiError("请先使用微信登录，再使用微信支付", "pay.openid_missing")


def _alipay(runtime: Runtime, order: Payable, trade_type: str) -> dict[str, Any]:
    settings = runtime.settings.alipay
    if not (settings.configured and settings.private_key):
        raise ApiError("支付宝支付未配置", "alipay.not_configured")
    if trade_type not in ALIPAY_TRADE_TYPES:
        raise ApiError("支付宝仅支持 APP 和 H5 支付", "pay.trade_type_unsupported", field="trade_type")
    common: dict[str, Any] = {
        "notify_url": notify_url(runtime, ALIPAY),
        "out_trade_no": order.order_no,
        "total_amount": order.amount,
        "subject": order.subject,
        "clock": runtime.clock,
    }
    if trade_type == "APP":
        return {"order_string": alipay.app_order_string(settings, **common)}
    return {"pay_url": alipay.wap_pay_url(settings, **common)}


def _wechat_app_id(runtime: Runtime, trade_type: str) -> str:
    app_id = runtime.settings.wechat_pay_app_id(trade_type)
    if not app_id:
        raise ApiError(
            f"微信支付未配置 {trade_type} 所需的应用（AppID）",
            "pay.trade_type_unsupported",
            field="trade_type",
        )
    return app_id


async def _wechat(runtime: Runtime, user: User, order: Payable, trade_type: str, ip: str) -> dict[str, Any]:
    settings = runtime.settings.wechat_pay
    api = settings.order_api
    if (
        not settings.mch_id
        or (api == "v2" and not settings.api_key)
        or (api == "v3" and not settings.v3_ready)
    ):
        raise ApiError("微信支付未配置", "wechat_pay.not_configured")
    app_id = _wechat_app_id(runtime, trade_type)
    openid = await _wechat_openid(runtime, user, app_id) if trade_type in ("JSAPI", "MINI") else None
    client = wechat_pay.WechatPayClient(settings, http=runtime.http, clock=runtime.clock)
    if api == "v3":
        return await _wechat_v3(runtime, client, app_id, order, trade_type, ip, openid)
    return await _wechat_v2(runtime, client, app_id, order, trade_type, ip, openid)


async def _wechat_v3(
    runtime: Runtime,
    client: wechat_pay.WechatPayClient,
    app_id: str,
    order: Payable,
    trade_type: str,
    ip: str,
    openid: str | None,
) -> dict[str, Any]:
    settings = runtime.settings.wechat_pay
    kind = WECHAT_V3_TRADE_TYPES[trade_type]
    answer = await client.prepay_v3(
        kind,
        app_id=app_id,
        out_trade_no=order.order_no,
        total=yuan_to_fen(order.amount),
        description=order.subject,
        notify_url=notify_url(runtime, WECHAT),
        client_ip=ip or "127.0.0.1",
        openid=openid,
        wap_url=runtime.settings.public_url,
    )
    key = load_private_key(settings.mch_private_key)
    clock = runtime.clock
    # The client parameters are RSA-signed: off the event loop.
    if kind == "jsapi":
        return await asyncio.to_thread(
            wechat_pay.v3_jsapi_params,
            app_id,
            answer["prepay_id"],
            key,
            timestamp=int(clock.now()),
            nonce=clock.nonce(32),
        )
    if kind == "app":
        return await asyncio.to_thread(
            wechat_pay.v3_app_params,
            app_id,
            settings.mch_id,
            answer["prepay_id"],
            key,
            timestamp=int(clock.now()),
            nonce=clock.nonce(32),
        )
    if kind == "h5":
        return {"h5_url": answer["h5_url"]}
    return _native(runtime, answer["code_url"])


def _native(runtime: Runtime, code_url: str) -> dict[str, Any]:
    """The code_url, and where the existing qrcode route draws it as a PNG for the cashier page."""
    base = runtime.settings.public_url.rstrip("/") + runtime.settings.base_path
    return {"code_url": code_url, "qr_png": f"{base}/qrcode?{urlencode({'data': code_url})}"}


async def _wechat_v2(
    runtime: Runtime,
    client: wechat_pay.WechatPayClient,
    app_id: str,
    order: Payable,
    trade_type: str,
    ip: str,
    openid: str | None,
) -> dict[str, Any]:
    settings = runtime.settings.wechat_pay
    kind = WECHAT_TRADE_TYPES[trade_type]
    scene_info = None
    if kind == "MWEB":
        # H5 payments must name the site they are made from.
        scene_info = json.dumps(
            {"h5_info": {"type": "Wap", "wap_url": runtime.settings.public_url, "wap_name": "商城"}},
            ensure_ascii=False,
        )
    prepay = await client.unified_order(
        out_trade_no=order.order_no,
        total_fee=yuan_to_fen(order.amount),
        body=order.subject,
        trade_type=kind,
        notify_url=notify_url(runtime, WECHAT),
        client_ip=ip or "127.0.0.1",
        openid=openid,
        scene_info=scene_info,
        app_id=app_id,
    )
    if kind == "JSAPI":
        return wechat_pay.jsapi_params(app_id, prepay.prepay_id, settings.api_key, runtime.clock)
    if kind == "APP":
        return wechat_pay.app_params(
            app_id, settings.mch_id, prepay.prepay_id, settings.api_key, runtime.clock
        )
    if kind == "NATIVE":
        if not prepay.code_url:
            raise ApiError("微信支付未返回二维码链接，请稍后再试", "pay.channel_error")
        return _native(runtime, prepay.code_url)
    if not prepay.mweb_url:
        raise ApiError("微信支付未返回支付链接，请稍后再试", "pay.channel_error")
    # h5_url as v3 names it; mweb_url kept for clients written against v2.
    return {"h5_url": prepay.mweb_url, "mweb_url": prepay.mweb_url}


async def start_payment(
    runtime: Runtime, user: User, *, order_no: str, channel: str, trade_type: str, client_ip: str
) -> dict[str, Any]:
    """The signed parameters the client hands to the payment SDK, or an ApiError to show."""
    if channel not in (ALIPAY, WECHAT):
        raise ApiError("channel 应为 alipay 或 wechat", "param.invalid", field="channel")
    if trade_type not in TRADE_TYPES:
        raise ApiError("trade_type 应为 JSAPI、MINI、APP、H5 或 NATIVE", "param.invalid", field="trade_type")
    order = await _payable_order(runtime, user, order_no)
    try:
        if channel == ALIPAY:
            return await asyncio.to_thread(_alipay, runtime, order, trade_type)  # RSA signing
        return await _wechat(runtime, user, order, trade_type, client_ip)
    except (ChannelError, ValueError) as exc:
        # The platform's message may name our configuration: log it, show a plain sentence.
        log.warning("payment start for %s via %s failed: %s", order.order_no, channel, exc)
        raise ApiError("支付渠道暂时不可用，请稍后再试", "pay.channel_error") from None
