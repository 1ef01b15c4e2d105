"""Raw payment notification -> verified PaymentEvent, for each channel.

The decoders work on a RawNotification (method, query string, headers, body) and
nothing else, so the notify routes and `mallgate notifications replay` run the very
same verification on the very same bytes. They never touch the database; the state
machine in services.orders is the only place an order changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from mallgate.channels import alipay, wechat_pay
from mallgate.channels.errors import ChannelError, MalformedNotification
from mallgate.db.models import PaymentNotification
from mallgate.runtime import Runtime
from mallgate.services import orders
from mallgate.services.notifications import Acknowledged, Decoder, RawNotification, load_raw, receive
from mallgate.services.orders import Applied, PaymentEvent
from mallgate.settings import AlipaySettings, WechatPaySettings

log = logging.getLogger("mallgate.notify")

ALIPAY = "alipay"
WECHAT = "wechat"
# Reconciliation stores what a query reported under this method; see services.reconcile.
QUERY_METHOD = "QUERY"

# The v3 freshness window for live notifications (WeChat's SDKs use the same 5 minutes).
V3_TOLERANCE_SECONDS = 300.0
# Forged serials must not turn every request into a certificate download.
CERT_REFRESH_MIN_INTERVAL = 60.0
# The download happens inside a notify request, which WeChat Pay gives 5 s.
CERT_REFRESH_TIMEOUT = 3.0


class NotConfigured(ChannelError):
    """The channel lacks the settings needed to verify it: never believe such a notice."""


def fen_to_yuan(fen: int) -> Decimal:
    """Exact: 990 fen -> Decimal('9.90')."""
    return Decimal(fen).scaleb(-2)


def yuan_to_fen(amount: Decimal) -> int:
    fen = amount.scaleb(2)
    if fen != fen.to_integral_value():
        raise ValueError(f"{amount} has more than two decimals")
    return int(fen)


# ----------------------------------------------------------------------------------------------
# Alipay


def decode_alipay(raw: RawNotification, settings: AlipaySettings) -> PaymentEvent:
    if not settings.configured:
        raise NotConfigured("Alipay is not configured (app_id / public key)")
    # Body and query string together: a GET notice carries its fields in the query, and a POST
    # that also has query fields must be judged on everything it sent (repeats are refused).
    params = alipay.parse_form(raw.body, raw.query_string)
    notice = alipay.verify_notification(
        params,
        public_key=settings.public_key,
        sign_type=settings.sign_type,
        app_id=settings.app_id,
        seller_id=settings.seller_id,
    )
    base = PaymentEvent(ALIPAY, notice.out_trade_no, "none", trade_no=notice.trade_no)
    if notice.is_refund:
        # refund_fee is cumulative, so a late or repeated refund notice cannot count twice.
        return replace(
            base,
            action="refund",
            refund_total=notice.refund_fee,
            refund_no=notice.raw.get("out_biz_no") or notice.trade_no,
            request_no=notice.raw.get("out_biz_no", ""),
        )
    if notice.is_paid:
        return replace(base, action="pay", amount=notice.total_amount)
    if notice.trade_status == "TRADE_CLOSED":
        return replace(base, action="close")
    # WAIT_BUYER_PAY, or a status Alipay may add later: authentic, nothing to change.
    return base


def alipay_decoder(settings: AlipaySettings) -> Decoder:
    return lambda raw: decode_alipay(raw, settings)


# ----------------------------------------------------------------------------------------------
# WeChat Pay


def is_v2(body: bytes) -> bool:
    """v2 notices are XML, v3 notices JSON; the first byte tells them apart."""
    return body.lstrip()[:1] == b"<"


def _check_cny(currency: str) -> None:
    # Amounts are compared in yuan; a foreign-currency amount must never equal a CNY price.
    if currency not in ("", "CNY"):
        raise MalformedNotification(f"unsupported currency {currency[:8]!r}")


def decode_wechat_v2(
    raw: RawNotification, settings: WechatPaySettings, app_ids: Collection[str] = ()
) -> PaymentEvent:
    """`app_ids`: every app id our orders may carry (Settings.wechat_pay_app_ids); default ours."""
    if not (settings.api_key and settings.mch_id):
        raise NotConfigured("WeChat Pay v2 is not configured (mch_id / api_key)")
    app_id = app_ids or settings.app_id
    fields = wechat_pay.parse_xml(raw.body)
    if "req_info" in fields:
        refund = wechat_pay.verify_v2_refund(
            raw.body, api_key=settings.api_key, app_id=app_id, mch_id=settings.mch_id
        )
        base = PaymentEvent(WECHAT, refund.out_trade_no, "none", trade_no=refund.transaction_id)
        if not refund.succeeded:
            return base
        return replace(
            base,
            action="refund",
            refund_no=refund.refund_id,
            refund_amount=fen_to_yuan(refund.refund_fee),
            request_no=refund.out_refund_no,
        )
    payment = wechat_pay.verify_v2_payment(
        raw.body, api_key=settings.api_key, app_id=app_id, mch_id=settings.mch_id
    )
    base = PaymentEvent(WECHAT, payment.out_trade_no, "none", trade_no=payment.transaction_id)
    if not payment.result_ok or payment.total_fee is None:
        return base
    _check_cny(payment.raw.get("fee_type", ""))
    return replace(base, action="pay", amount=fen_to_yuan(payment.total_fee))


def decode_wechat_v3(
    raw: RawNotification,
    settings: WechatPaySettings,
    keys: wechat_pay.V3KeyStore,
    now: float,
    tolerance: float = V3_TOLERANCE_SECONDS,
    app_ids: Collection[str] = (),
) -> PaymentEvent:
    if not (settings.api_v3_key and settings.mch_id and keys.serials):
        raise NotConfigured("WeChat Pay v3 is not configured (mch_id / APIv3 key / public key or certs)")
    try:
        notice = wechat_pay.verify_v3_notification(
            raw.headers,
            raw.body,
            keys=keys,
            api_v3_key=settings.api_v3_key,
            app_id=app_ids or settings.app_id,
            mch_id=settings.mch_id,
            now=now,
            tolerance=tolerance,
        )
    except wechat_pay.UnsupportedEvent as exc:
        # Authentic, of a kind we do not act on: refusing it would have WeChat resend it for days.
        order_no = exc.event.resource.get("out_trade_no")
        raise Acknowledged(
            f"{type(exc).__name__}: {exc}", order_no=order_no if isinstance(order_no, str) else ""
        ) from None
    base = PaymentEvent(WECHAT, notice.out_trade_no, "none", trade_no=notice.transaction_id)
    if isinstance(notice, wechat_pay.WechatV3Refund):
        if not notice.succeeded:
            return base
        return replace(
            base,
            action="refund",
            refund_no=notice.refund_id,
            refund_amount=fen_to_yuan(notice.refund),
            request_no=notice.out_refund_no,
        )
    if not notice.result_ok:
        return base
    _check_cny(notice.currency)
    return replace(base, action="pay", amount=fen_to_yuan(notice.total))


# ----------------------------------------------------------------------------------------------
# v3 keys: built once per configuration, refreshed (certificate mode) at most once at a time


@dataclass
class _KeyCache:
    store: wechat_pay.V3KeyStore
    last_refresh: float = -math.inf
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_key_caches: dict[tuple[str, ...], _KeyCache] = {}


def _cache_key(settings: WechatPaySettings) -> tuple[str, ...]:
    return (
        settings.mch_id,
        settings.api_base,
        settings.public_key_id,
        settings.public_key,
        settings.platform_certs,
    )


def _key_cache(settings: WechatPaySettings) -> _KeyCache:
    key = _cache_key(settings)
    cache = _key_caches.get(key)
    if cache is None:
        try:
            store = wechat_pay.V3KeyStore.from_settings(settings)
        except (ValueError, OSError) as exc:
            raise NotConfigured(f"WeChat Pay keys unusable: {exc}") from None
        cache = _key_caches.setdefault(key, _KeyCache(store))
    return cache


def _serial_of(raw: RawNotification) -> str:
    return next((v for k, v in raw.headers.items() if k.lower() == "wechatpay-serial"), "")


async def v3_keys(runtime: Runtime, raw: RawNotification) -> wechat_pay.V3KeyStore:
    """The key store for this notice; in certificate mode an unknown serial triggers one download.

    Concurrent notices signed by a new certificate wait on one lock and the first one
    downloads; the rest find the serial known. A minimum interval between downloads
    keeps forged serials from hammering WeChat Pay on our behalf.
    """
    settings = runtime.settings.wechat_pay
    cache = _key_cache(settings)
    serial = _serial_of(raw)
    if not serial or not cache.store.certificate_mode or cache.store.get(serial) is not None:
        return cache.store
    async with cache.lock:
        if cache.store.get(serial) is not None:
            return cache.store
        now = runtime.clock.now()
        if now - cache.last_refresh < CERT_REFRESH_MIN_INTERVAL:
            return cache.store
        cache.last_refresh = now
        fresh = cache.store.copy()
        client = wechat_pay.WechatPayClient(settings, http=runtime.http, clock=runtime.clock, keys=fresh)
        try:
            async with asyncio.timeout(CERT_REFRESH_TIMEOUT):
                added = await client.fetch_certificates()
        except TimeoutError:
            log.warning("WeChat Pay certificate refresh took over %.0f s: given up", CERT_REFRESH_TIMEOUT)
            return cache.store
        except (ChannelError, ValueError) as exc:
            log.warning("WeChat Pay certificate refresh failed: %s", exc)
            return cache.store
        # Swap in the new store whole, so a reader never sees a half-filled one.
        cache.store = fresh
        log.info("WeChat Pay certificates refreshed: %s", ", ".join(s for s, _ in added))
    return cache.store


# ----------------------------------------------------------------------------------------------
# one entry point for the routes and for replay


def _refuse(reason: str) -> Decoder:
    def decode(_raw: RawNotification) -> PaymentEvent:
        raise ChannelError(reason)

    return decode


async def decoder_for(runtime: Runtime, raw: RawNotification, *, replay: bool = False) -> Decoder:
    """The decoder for a raw notice.

    ``replay`` (an operator re-running a stored notice) keeps every check but the v3
    timestamp window: that window stops a captured request from being played to us
    again over the network, while a replay reads a row already in our own database,
    days later on purpose. The state machine makes applying it again harmless.
    """
    settings = runtime.settings
    if raw.method == QUERY_METHOD:
        # A query answer was verified when it was fetched; its signed text is not kept.
        return _refuse("query results are not replayed: run `mallgate reconcile` again")
    if raw.channel == ALIPAY:
        return alipay_decoder(settings.alipay)
    if raw.channel != WECHAT:
        return _refuse(f"unknown channel {raw.channel[:16]!r}")
    if is_v2(raw.body):
        return lambda r: decode_wechat_v2(r, settings.wechat_pay, settings.wechat_pay_app_ids)
    try:
        keys = await v3_keys(runtime, raw)
    except NotConfigured as exc:
        return _refuse(f"{type(exc).__name__}: {exc}")
    tolerance = math.inf if replay else V3_TOLERANCE_SECONDS
    now = runtime.clock.now()
    return lambda r: decode_wechat_v3(
        r, settings.wechat_pay, keys, now, tolerance, settings.wechat_pay_app_ids
    )


def claimed_order_no(raw: RawNotification) -> str | None:
    """The out_trade_no a notice names, unverified: only for filing a refused notice."""
    if raw.channel == ALIPAY:
        return alipay.parse_form(raw.body, raw.query_string).get("out_trade_no")
    if raw.channel == WECHAT and is_v2(raw.body):
        return wechat_pay.parse_xml(raw.body).get("out_trade_no")
    return None  # v3 resources are encrypted: nothing readable before verification


async def handle(runtime: Runtime, raw: RawNotification, *, replay: bool = False) -> Applied:
    """Verify, store and apply one notice; never raises (see notifications.receive)."""
    try:
        decode = await decoder_for(runtime, raw, replay=replay)
    except Exception as exc:
        # Whatever went wrong finding the keys, the notice is refused and kept, never a 500.
        log.warning("%s decoder unavailable: %s", raw.channel, type(exc).__name__)
        decode = _refuse(f"unexpected {type(exc).__name__}")
    # Alipay and WeChat Pay v2 sign inside the notice's own bytes; v3 signs in headers, with a
    # timestamp that must be fresh each time.
    in_bytes = raw.channel == ALIPAY or (raw.channel == WECHAT and is_v2(raw.body))
    applied = await receive(
        runtime, raw, decode, claimed_order_no, compact=not replay, signed_in_bytes=in_bytes
    )
    if applied.outcome == "duplicate" and applied.reason.endswith("refund due"):
        from mallgate.services import refunds  # refunds builds on this module

        refunds.schedule_duplicate_refunds(runtime)
    return applied


# ----------------------------------------------------------------------------------------------
# stored notices, for the operator (mallgate notifications ...)


async def stored_notifications(
    runtime: Runtime, *, order_no: str = "", limit: int = 50
) -> list[dict[str, Any]]:
    """The newest stored notices, optionally of one order, newest first."""
    query = select(PaymentNotification).order_by(PaymentNotification.id.desc()).limit(limit)
    if order_no:
        query = query.where(PaymentNotification.order_no == order_no)
    async with runtime.db.read() as session:
        rows = (await session.scalars(query)).all()
        zone = runtime.settings.zone
        return [{**orders.notification_view(r, zone=zone), "method": r.method} for r in rows]


async def stored_notification(runtime: Runtime, notification_id: int) -> dict[str, Any] | None:
    """One stored notice with its kept headers and body (notify bodies carry no secrets)."""
    async with runtime.db.read() as session:
        row = await session.get(PaymentNotification, notification_id)
        if row is None:
            return None
        return {
            **orders.notification_view(row, zone=runtime.settings.zone),
            "method": row.method,
            "query_string": row.query_string,
            "headers": json.loads(row.headers or "{}"),
            "body": row.body,
        }


async def replay(runtime: Runtime, notification_id: int) -> Applied | None:
    """Verify a stored notice again and run it through the state machine; safe to repeat.

    The replay is stored as a notice of its own, its source marking where it came from.
    """
    stored = await load_raw(runtime, notification_id)
    if stored is None:
        return None
    if not stored.whole:
        return Applied(False, "rejected", "only part of this refused notice was kept: nothing to verify")
    again = replace(stored.raw, source_ip=f"replay of #{notification_id}")
    return await handle(runtime, again, replay=True)
