"""Request dependencies shared by the routes: the caller's IP, the logged-in user, the admin guard."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from mallgate.db.models import User
from mallgate.envelope import ApiError, Unauthorized
from mallgate.forwarded import client_address, trusted_networks
from mallgate.params import Params, read_params
from mallgate.runtime import Runtime, get_runtime
from mallgate.services import tokens

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ParamsDep = Annotated[Params, Depends(read_params)]


def client_ip(request: Request) -> str:
    """The client's full address (audit records keep it whole; limits count `forwarded.rate_key` of it)."""
    peer = request.client.host if request.client else ""
    trusted = trusted_networks(request.app.state.runtime.settings.forwarded_allow_ips)
    return client_address(peer, request.headers.getlist("x-forwarded-for"), trusted)


async def current_user(request: Request, runtime: RuntimeDep, params: ParamsDep) -> User:
    """The user of `Auth-Token` (header) or `token` (parameter), else 401 in the envelope."""
    token = request.headers.get("auth-token") or str(params.get("token") or "")
    if not token:
        raise Unauthorized()
    now = runtime.clock.utcnow().replace(tzinfo=None)
    async with runtime.db.read() as session:
        found = await tokens.resolve(session, token.strip(), now)
    if found is None:
        raise Unauthorized("登录已失效，请重新登录", "auth.invalid_token")
    user, stored = found
    if tokens.needs_touch(stored, now):
        async with runtime.db.transaction() as session:
            await tokens.touch(session, stored.id, now)
    return user


UserDep = Annotated[User, Depends(current_user)]


async def require_admin(request: Request, runtime: RuntimeDep) -> None:
    expected = runtime.settings.admin_token
    if not expected:
        # Off means absent: an unconfigured admin API does not even admit it exists.
        raise ApiError("接口不存在", "not_found", http_status=404)
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise ApiError("管理令牌无效", "admin.unauthorized", http_status=401)
