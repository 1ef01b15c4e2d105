"""Mini Program subscribe messages: the users' one-time grants, and the outbox sender that spends them.

`wx.requestSubscribeMessage` lets a user accept a template once per tap; each accept
lets the Mini Program send that user one message of that template (WeChat answers
43101 to a send without one). `template/accept` records each accept as a row of
``subscribe_grants``; the sender takes the oldest unused one (a conditional UPDATE, so
two workers never spend the same grant), sends, and gives it back only when the send
failed in a way worth retrying. No grant, no openid, 43101 and the other refusals are
final: the event's subscribe delivery ends, the other senders (the webhook) go on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.channels.wechat_api import WechatApiError, WechatUnavailable
from mallgate.channels.wechat_wxa import REFUSED, SubscribeMessage
from mallgate.clock import show_time
from mallgate.db.models import Identity, Order, SubscribeGrant
from mallgate.envelope import ApiError
from mallgate.services.accounts import WECHAT
from mallgate.services.outbox_worker import Event, FinalError, TransientError, register_sender
from mallgate.services.spread import mini_program, wxa
from mallgate.services.wechat_tokens import WechatTokens

if TYPE_CHECKING:
    from mallgate.runtime import Runtime
    from mallgate.settings import Settings

log = logging.getLogger("mallgate.subscribe")

TEMPLATE_KINDS: Final = ("delivery_notice", "order_complete", "order_pay_success", "refund_notice")
# What wx.requestSubscribeMessage answers per template id; only "accept" grants a message.
ANSWERS: Final = frozenset({"accept", "reject", "ban", "filter"})
ACCEPT: Final = "accept"
# Keys of the success result that are not template ids.
_RESULT_KEYS: Final = frozenset({"errMsg", "token"})
MAX_TEMPLATES: Final = 20
# WeChat busy or over a quota: worth another try later. Every other refusal is final.
RETRYABLE: Final = frozenset({-1, 45009, 45011})
# Sends out of the outbox, by topic: which template kind.
TOPIC_KINDS: Final = {"order.paid": "order_pay_success", "order.refunded": "refund_notice"}


def template_ids(settings: Settings) -> dict[str, str]:
    """The four template ids, by kind ("" when not configured)."""
    return {kind: getattr(settings.templates, kind) for kind in TEMPLATE_KINDS}


# --- template/accept -------------------------------------------------------------------------


def parse_accept_map(raw: Any, settings: Settings) -> dict[str, str]:
    """The result map, checked whole: any unknown template id or answer refuses all of it."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ApiError("data 应为 JSON 对象", "template.invalid_map", field="data") from None
    if not isinstance(raw, dict):
        raise ApiError(
            "data 应为 JSON 对象：{模板 id: accept|reject|ban|filter}", "template.invalid_map", field="data"
        )
    answers = {k: v for k, v in raw.items() if k not in _RESULT_KEYS}
    if not answers:
        raise ApiError("缺少参数 data（wx.requestSubscribeMessage 的结果）", "param.missing", field="data")
    if len(answers) > MAX_TEMPLATES:
        raise ApiError(f"data 最多 {MAX_TEMPLATES} 个模板", "template.invalid_map", field="data")
    known = {t for t in template_ids(settings).values() if t}
    unknown = sorted(str(k) for k in answers if k not in known)
    if unknown:
        raise ApiError(f"未知的订阅模板 id：{', '.join(unknown)}", "template.unknown", field="data")
    bad = sorted(str(k) for k, v in answers.items() if v not in ANSWERS)
    if bad:
        raise ApiError(
            f"模板 {', '.join(bad)} 的结果应为 accept、reject、ban 或 filter",
            "template.invalid_answer",
            field="data",
        )
    return {str(k): str(v) for k, v in answers.items()}


async def record_grants(runtime: Runtime, user_id: int, answers: dict[str, str]) -> dict[str, Any]:
    now = runtime.clock.utcnow().replace(tzinfo=None)
    accepted = sorted(t for t, answer in answers.items() if answer == ACCEPT)
    async with runtime.db.transaction() as session:
        session.add_all(SubscribeGrant(user_id=user_id, template_id=t, granted_at=now) for t in accepted)
    async with runtime.db.read() as session:
        available = {t: await unused_grants(session, user_id, t) for t in sorted(answers)}
    return {"accepted": accepted, "available": available}


async def unused_grants(session: AsyncSession, user_id: int, template_id: str) -> int:
    rows = await session.execute(
        select(SubscribeGrant.id).where(
            SubscribeGrant.user_id == user_id,
            SubscribeGrant.template_id == template_id,
            SubscribeGrant.used_at.is_(None),
        )
    )
    return len(rows.all())


# --- spending grants -------------------------------------------------------------------------


async def take_grant(runtime: Runtime, user_id: int, template_id: str, now: datetime) -> int | None:
    """Marks the oldest unused grant used and returns its id; None when there is none."""
    for _ in range(5):
        async with runtime.db.read() as session:
            grant_id = (
                await session.execute(
                    select(SubscribeGrant.id)
                    .where(
                        SubscribeGrant.user_id == user_id,
                        SubscribeGrant.template_id == template_id,
                        SubscribeGrant.used_at.is_(None),
                    )
                    .order_by(SubscribeGrant.id)
                    .limit(1)
                )
            ).scalar_one_or_none()
        if grant_id is None:
            return None
        statement = (
            update(SubscribeGrant)
            .where(SubscribeGrant.id == grant_id, SubscribeGrant.used_at.is_(None))
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        if await runtime.db.run_write(lambda s, st=statement: s.execute(st).rowcount == 1):  # type: ignore[misc]
            return grant_id
        # Another worker spent that one between our read and our write: the next.
    return None


async def give_back(runtime: Runtime, grant_id: int) -> None:
    statement = (
        update(SubscribeGrant)
        .where(SubscribeGrant.id == grant_id)
        .values(used_at=None)
        .execution_options(synchronize_session=False)
    )
    await runtime.db.run_write(lambda session: session.execute(statement))


# --- the message -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    openid: str
    user_id: int
    order: Order


def _money(value: Any) -> str:
    return f"¥{Decimal(str(value)).quantize(Decimal('0.01'))}"


def message_values(settings: Settings, event: Event, order: Order) -> dict[str, str]:
    """Every source a data field may name, for this event."""
    payload = event.payload
    zone = settings.zone
    paid_at = order.paid_at or event.created_at
    return {
        "order_no": order.order_no,
        "subject": (order.subject or order.order_no)[:20],
        "amount": _money(payload.get("amount", order.amount)),
        "paid_at": show_time(paid_at, zone)[:16],
        "refunded_amount": _money(payload.get("refunded_amount", order.refunded_amount)),
        "refunded_at": show_time(event.created_at, zone)[:16],
    }


def build_data(settings: Settings, kind: str, values: dict[str, str]) -> dict[str, str]:
    mapping = settings.subscribe.data.get(kind, {})
    return {keyword: values[source] for keyword, source in mapping.items()}


async def _recipient(runtime: Runtime, event: Event) -> Recipient:
    order_no = str(event.payload.get("order_no", ""))
    app_id = runtime.settings.wechat_mini.app_id
    async with runtime.db.read() as session:
        order = (await session.execute(select(Order).where(Order.order_no == order_no))).scalar_one_or_none()
        if order is None:
            raise FinalError(f"order {order_no!r} not found")
        if order.user_id is None:
            raise FinalError(f"order {order_no} has no buyer")
        openid = (
            await session.execute(
                select(Identity.openid).where(
                    Identity.user_id == order.user_id, Identity.provider == WECHAT, Identity.app_id == app_id
                )
            )
        ).scalar_one_or_none()
    if not openid:
        raise FinalError(f"user {order.user_id} has no Mini Program openid")
    return Recipient(openid, order.user_id, order)


class SubscribeSender:
    """The outbox's way to the buyer's WeChat: one subscribe message per paid or refunded order."""

    name = "subscribe"

    def wants(self, event: Event) -> bool:
        return event.topic in TOPIC_KINDS

    async def send(self, runtime: Runtime, event: Event) -> None:
        kind = TOPIC_KINDS[event.topic]
        template_id = template_ids(runtime.settings)[kind]
        if not template_id:
            log.debug("event %s: MALLGATE_TEMPLATES__%s unset, no subscribe message", event.id, kind.upper())
            return
        try:
            app = mini_program(runtime)
        except ApiError as exc:
            raise FinalError("the Mini Program is not configured") from exc
        recipient = await _recipient(runtime, event)
        settings = runtime.settings
        message = SubscribeMessage(
            touser=recipient.openid,
            template_id=template_id,
            data=build_data(settings, kind, message_values(settings, event, recipient.order)),
            page=settings.subscribe.page.replace("{order_no}", recipient.order.order_no),
            miniprogram_state=settings.subscribe.miniprogram_state,
            lang=settings.subscribe.lang,
        )
        now = runtime.clock.utcnow().replace(tzinfo=None)
        grant = await take_grant(runtime, recipient.user_id, template_id, now)
        if grant is None:
            raise FinalError(f"user {recipient.user_id} has no unused grant of {kind}")
        await self._deliver(runtime, app, message, grant)

    async def _deliver(self, runtime: Runtime, app: Any, message: SubscribeMessage, grant: int) -> None:
        client = wxa(runtime)
        try:
            await WechatTokens.of(runtime).call(app, lambda token: client.send_subscribe(token, message))
        except WechatApiError as exc:
            if exc.errcode in RETRYABLE:
                await give_back(runtime, grant)
                raise TransientError(f"subscribe/send: errcode {exc.errcode}") from exc
            # 43101: WeChat has no grant for it (our record was stale); the grant stays spent.
            raise FinalError(f"subscribe/send: errcode {exc.errcode}") from exc
        except WechatUnavailable as exc:
            await give_back(runtime, grant)
            raise TransientError(f"subscribe/send: {exc}") from exc


SENDER: Final = SubscribeSender()
register_sender(SENDER)
__all__ = ["REFUSED", "SENDER", "SubscribeSender"]
