"""Goods, as far as the gateway needs them (a name and a price for shares and orders)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.db.models import Goods
from mallgate.envelope import ApiError


async def create_goods(session: AsyncSession, now: datetime, *, name: str, price: Decimal) -> Goods:
    if not name:
        raise ApiError("缺少参数 name", "param.missing", field="name")
    goods = Goods(name=name, price=price, created_at=now)
    session.add(goods)
    await session.flush()
    return goods


def goods_view(goods: Goods) -> dict[str, str]:
    return {"id": str(goods.id), "name": goods.name, "price": f"{goods.price.quantize(Decimal('0.01'))}"}
