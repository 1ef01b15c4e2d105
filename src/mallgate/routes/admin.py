"""The admin API (CONTRACT §4), for the mall's other services and for tests."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from mallgate.db.models import User
from mallgate.deps import ParamsDep, RuntimeDep, require_admin
from mallgate.envelope import ApiError, ok
from mallgate.mobile import normalize_mobile
from mallgate.params import ascii_int, parse_amount
from mallgate.services import accounts, goods, orders, refunds

# Out of the public /docs and /openapi.json: the admin API is for the mall's own services.
router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], include_in_schema=False)

OrderNo = Annotated[str, Path(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]


@router.post("/goods")
async def create_goods(runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    name = params.text("name", max_length=128)
    price = parse_amount(params.get("price"), "price")
    async with runtime.db.transaction() as session:
        row = await goods.create_goods(
            session, runtime.clock.utcnow().replace(tzinfo=None), name=name, price=price
        )
        return ok(goods.goods_view(row))


@router.post("/orders")
async def create_order(runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    order_no = params.text("order_no", required=False, max_length=64) or None
    if order_no is not None and not all(c.isascii() and (c.isalnum() or c in "_-") for c in order_no):
        raise ApiError("order_no 只能包含字母、数字、_ 和 -", "param.invalid", field="order_no")
    amount = parse_amount(params.get("amount"))
    async with runtime.db.transaction() as session:
        order = await orders.create_order(
            session,
            runtime.clock.utcnow().replace(tzinfo=None),
            amount=amount,
            kind=params.text("kind", required=False, default="goods", max_length=16),
            order_no=order_no,
            user_id=params.integer("user_id", required=False),
            subject=params.text("subject", required=False, max_length=128),
            recharge_max=runtime.settings.recharge_max,
        )
        return ok(orders.order_view(order, zone=runtime.settings.zone))


@router.get("/orders/{order_no}")
async def get_order(runtime: RuntimeDep, order_no: OrderNo) -> JSONResponse:
    async with runtime.db.read() as session:
        order = await orders.find_order(session, order_no)
        if order is None:
            raise ApiError("订单不存在", "order.not_found")
        return ok(orders.order_view(order, zone=runtime.settings.zone))


@router.post("/orders/{order_no}/refund")
async def refund_order(runtime: RuntimeDep, order_no: OrderNo, params: ParamsDep) -> JSONResponse:
    amount = parse_amount(params.get("amount"))
    reason = params.text("reason", required=False, max_length=refunds.REASON_MAX)
    key = params.text("idempotency_key", max_length=128)
    return ok(
        await refunds.request_refund(
            runtime, order_no=order_no, amount=amount, reason=reason, idempotency_key=key
        )
    )


@router.get("/orders/{order_no}/refunds")
async def list_refunds(runtime: RuntimeDep, order_no: OrderNo) -> JSONResponse:
    return ok(await refunds.refunds_of(runtime, order_no))


@router.post("/orders/{order_no}/close")
async def close_order(runtime: RuntimeDep, order_no: OrderNo) -> JSONResponse:
    return ok(await refunds.close_order(runtime, order_no))


@router.post("/users")
async def create_user(runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    raw_mobile = params.text("mobile", required=False, max_length=20)
    mobile = normalize_mobile(raw_mobile) if raw_mobile else None
    nickname = params.text("nickname", required=False, max_length=64)
    password = params.text("password", required=False, max_length=64)
    password_hash = await accounts.hasher(runtime).hash(password) if password else None
    async with runtime.db.transaction() as session:
        if mobile and await accounts.find_by_mobile(session, mobile):
            raise ApiError("该手机号已注册", "user.exists", field="mobile")
        now = runtime.clock.utcnow().replace(tzinfo=None)
        user = await session.run_sync(
            partial(accounts.new_user, now=now, mobile=mobile, nickname=nickname, password_hash=password_hash)
        )
        return ok(accounts.profile(user, zone=runtime.settings.zone))


@router.get("/users/{user_id}")
async def get_user(runtime: RuntimeDep, user_id: Annotated[str, Path()]) -> JSONResponse:
    number = ascii_int(user_id)
    if number is None:
        raise ApiError("用户 id 应为整数", "param.invalid", field="id")
    async with runtime.db.read() as session:
        user = await session.get(User, number)
        if user is None:
            raise ApiError("用户不存在", "user.not_found")
        return ok(await accounts.admin_view(session, user, zone=runtime.settings.zone))


@router.get("/notifications")
async def list_notifications(runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    order_no = params.text("order_no", max_length=64)
    async with runtime.db.read() as session:
        return ok(await orders.notifications_for(session, order_no, zone=runtime.settings.zone))
