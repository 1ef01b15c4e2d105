"""The admin API of the Official Account's auto-replies: ``/admin/wechat/replies``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from mallgate.deps import ParamsDep, RuntimeDep, require_admin
from mallgate.envelope import ApiError, ok
from mallgate.params import ascii_int
from mallgate.services import replies

# As routes/admin.py: behind the admin token, out of the public /docs.
router = APIRouter(prefix="/admin/wechat", dependencies=[Depends(require_admin)], include_in_schema=False)


@router.post("/replies")
async def create_reply(runtime: RuntimeDep, params: ParamsDep) -> JSONResponse:
    kind, match, keyword, reply = replies.reply_from_params(params)
    async with runtime.db.transaction() as session:
        row = await replies.create_reply(
            session,
            runtime.clock.utcnow().replace(tzinfo=None),
            kind=kind,
            match=match,
            keyword=keyword,
            reply=reply,
        )
        view = replies.reply_view(row, zone=runtime.settings.zone)
    replies.forget_rules(runtime)
    return ok(view)


@router.get("/replies")
async def list_replies(runtime: RuntimeDep) -> JSONResponse:
    async with runtime.db.read() as session:
        rows = await replies.list_replies(session)
    return ok([replies.reply_view(row, zone=runtime.settings.zone) for row in rows])


@router.delete("/replies/{reply_id}")
async def delete_reply(runtime: RuntimeDep, reply_id: Annotated[str, Path()]) -> JSONResponse:
    number = ascii_int(reply_id)
    if number is None:
        raise ApiError("自动回复 id 应为整数", "param.invalid", field="id")
    async with runtime.db.transaction() as session:
        if not await replies.delete_reply(session, number):
            raise ApiError("自动回复不存在", "wechat.reply_not_found")
    replies.forget_rules(runtime)
    return ok()
