"""`spread/qrcode` and `spread/scene`: Mini Program codes that carry who shared which goods.

WeChat's ``scene`` is at most 32 characters, and anything in it is visible to whoever
scans the code. So the scene is never the ids themselves: it is a random code
(``secrets``, 16 characters of WeChat's scene charset) stored with the page, the goods
and the sharer, so any id fits and nobody makes themselves the sharer by editing it:
an edited code names no row.

Each (page, goods, sharer) gets one code and one image, made once: the row is the
cache key and the image file under the media folder the cache. Within one process a
lock per code keeps concurrent first requests to one WeChat call; two machines
asking at the very same moment may each call once (codes never expire and are free:
WeChat's limit is 5,000 a minute), and both write the same file.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.channels.errors import ChannelError
from mallgate.channels.wechat_wxa import SCENE_SHAPE, CodeRequest, WechatWxa
from mallgate.db.models import Goods, SceneCode
from mallgate.envelope import ApiError
from mallgate.services.share import wechat_failure
from mallgate.services.wechat_tokens import WechatApp, WechatTokens

if TYPE_CHECKING:
    from mallgate.runtime import Runtime
    from mallgate.settings import Settings

# 12 random bytes: 16 URL-safe characters, all within WeChat's scene charset; 96 bits unguessable.
SCENE_BYTES: Final = 12
SPREAD_FOLDER: Final = "spread"
MEDIA_ROUTE: Final = "/media"
# Public images: readable by the web server that may serve /media/ in front of us. (Every
# other file under var/ is 0600 on purpose; the media folder is the one exception.)
MEDIA_DIR_MODE: Final = 0o755
MEDIA_FILE_MODE: Final = 0o644
_LOCKS_KEY: Final = "spread_locks"
_EXTENSIONS: Final = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"))


def media_dir(settings: Settings) -> Path:
    return settings.media_dir or settings.var_dir / "media"


def media_url(settings: Settings, relative: str) -> str:
    return f"{settings.public_url.rstrip('/')}{MEDIA_ROUTE}/{relative}"


def mini_program(runtime: Runtime) -> WechatApp:
    """The Mini Program's app; refused when it is not configured (the sandbox fills it when on)."""
    mini = runtime.settings.wechat_mini
    if not (mini.app_id and mini.app_secret):
        raise ApiError("微信小程序未配置", "wechat_mini.not_configured")
    return WechatApp(mini.app_id, mini.app_secret)


def wxa(runtime: Runtime) -> WechatWxa:
    service = runtime.services.get("wechat_wxa")
    if not isinstance(service, WechatWxa):
        service = runtime.services["wechat_wxa"] = WechatWxa(runtime.settings.wechat.api_base, runtime.http)
    return service


# --- scenes ----------------------------------------------------------------------------------


async def scene_row(session: AsyncSession, scene: str) -> SceneCode | None:
    """The stored scene of this code; None for anything else (edited, made up, malformed)."""
    scene = scene.strip()
    if not SCENE_SHAPE.fullmatch(scene):
        return None
    return await session.get(SceneCode, scene)


async def resolve_scene(session: AsyncSession, scene: str) -> int | None:
    """The sharer's user id a scanned code's scene names; None when it names none."""
    row = await scene_row(session, scene)
    return row.sharer_id if row is not None else None


async def _scene_for(runtime: Runtime, page: str, goods_id: int, sharer_id: int) -> SceneCode:
    """The one scene of (page, goods, sharer), made on first use."""
    key = (SceneCode.page == page, SceneCode.goods_id == goods_id, SceneCode.sharer_id == sharer_id)
    async with runtime.db.read() as session:
        found = (await session.execute(select(SceneCode).where(*key))).scalar_one_or_none()
    if found is not None:
        return found
    row = SceneCode(
        code=secrets.token_urlsafe(SCENE_BYTES),
        page=page,
        goods_id=goods_id,
        sharer_id=sharer_id,
        media_path="",
        created_at=runtime.clock.utcnow().replace(tzinfo=None),
    )
    try:
        async with runtime.db.transaction() as session:
            session.add(row)
    except IntegrityError:
        pass  # another request made it first: theirs stands
    else:
        return row
    async with runtime.db.read() as session:
        return (await session.execute(select(SceneCode).where(*key))).scalar_one()


# --- spread/qrcode ---------------------------------------------------------------------------


def check_page(settings: Settings, page: str) -> str:
    allowed = settings.spread.pages
    if page not in allowed:
        raise ApiError(
            f"type 应为允许的小程序页面之一：{', '.join(allowed)}", "spread.page_not_allowed", field="type"
        )
    return page


async def spread_qrcode(runtime: Runtime, sharer_id: int, goods_id: int, page: str) -> str:
    """The absolute URL of the code image for this sharer, goods and page."""
    check_page(runtime.settings, page)
    app = mini_program(runtime)
    async with runtime.db.read() as session:
        if await session.get(Goods, goods_id) is None:
            raise ApiError("商品不存在", "goods.not_found", field="id")
    row = await _scene_for(runtime, page, goods_id, sharer_id)
    folder = media_dir(runtime.settings)
    if row.media_path and (folder / row.media_path).is_file():
        return media_url(runtime.settings, row.media_path)
    locks: dict[str, asyncio.Lock] = runtime.services.setdefault(_LOCKS_KEY, {})
    try:
        async with locks.setdefault(row.code, asyncio.Lock()):
            async with runtime.db.read() as session:
                fresh = await session.get(SceneCode, row.code)
            if fresh is not None and fresh.media_path and (folder / fresh.media_path).is_file():
                return media_url(runtime.settings, fresh.media_path)
            relative = await _fetch_and_store(runtime, app, row, folder)
    finally:
        # Waiters still hold the lock object; later callers find the file.
        locks.pop(row.code, None)
    return media_url(runtime.settings, relative)


async def _fetch_and_store(runtime: Runtime, app: WechatApp, row: SceneCode, folder: Path) -> str:
    spread = runtime.settings.spread
    request = CodeRequest(
        scene=row.code,
        page=row.page,
        width=spread.width,
        env_version=spread.env_version,
        check_path=spread.check_path,
    )
    client = wxa(runtime)
    try:
        image = await WechatTokens.of(runtime).call(app, lambda token: client.code_unlimited(token, request))
    except ChannelError as exc:
        raise _code_failure(exc) from exc
    extension = next((ext for magic, ext in _EXTENSIONS if image.startswith(magic)), "png")
    relative = f"{SPREAD_FOLDER}/{row.code}.{extension}"
    await asyncio.to_thread(_write_public, folder / relative, image)

    async with runtime.db.transaction() as session:
        stored = await session.get(SceneCode, row.code)
        if stored is not None:
            stored.media_path = relative
    return relative


def _code_failure(exc: ChannelError) -> ApiError:
    from mallgate.channels.wechat_api import WechatApiError

    if isinstance(exc, WechatApiError):
        # WeChat's own message (41030 invalid page, 45009 over the rate...) tells the operator what to fix.
        message = re.split(r"\s+(?:rid|hint):", exc.errmsg)[0].strip() or "error"
        return ApiError(
            f"微信生成小程序码失败：{exc.errcode} {message}", "wechat.api_error", errcode=exc.errcode
        )
    return wechat_failure(exc)


def _write_public(path: Path, data: bytes) -> None:
    """Written whole or not at all (a reader never sees half an image), world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in (path.parent.parent, path.parent):
        os.chmod(folder, MEDIA_DIR_MODE)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MEDIA_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temporary, MEDIA_FILE_MODE)  # the umask may have taken bits away
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


async def scene_view(runtime: Runtime, scene: str) -> dict[str, str]:
    """spread/scene: the goods and sharer a code names (ids as strings, as the API writes ids)."""
    async with runtime.db.read() as session:
        row = await scene_row(session, scene)
    if row is None:
        raise ApiError("scene 无效", "spread.scene_unknown", field="scene")
    return {"goods_id": str(row.goods_id), "sharer_id": str(row.sharer_id), "page": row.page}
