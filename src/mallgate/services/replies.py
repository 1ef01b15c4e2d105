"""The Official Account's auto-replies: keyword rules (exact or contains) and the subscribe welcome.

Kept in the database (``wechat_replies``) so that every worker and machine answers alike, and
managed through ``/admin/wechat/replies``. Matching is case-insensitive after trimming; exact
rules win over contains rules, and among rules of one kind the newest wins.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from mallgate.clock import show_time
from mallgate.db.models import WechatReply
from mallgate.envelope import ApiError
from mallgate.params import Params
from mallgate.runtime import Runtime

KINDS: Final = ("subscribe", "keyword")
MATCHES: Final = ("exact", "contains")
REPLY_TYPES: Final = ("text", "image", "news")
MAX_TEXT: Final = 2000
MAX_ARTICLES: Final = 8
ARTICLE_FIELDS: Final = ("title", "description", "pic_url", "url")


@dataclass(frozen=True)
class Reply:
    """What to answer a push with: the reply type and its content."""

    reply_type: str
    content: Mapping[str, Any]


def _invalid(info: str, field: str) -> ApiError:
    return ApiError(info, "param.invalid", field=field)


def _choice(params: Params, name: str, allowed: Sequence[str], default: str = "") -> str:
    value = params.text(name, required=not default, default=default, max_length=16)
    if value not in allowed:
        raise _invalid(f"参数 {name} 应为 {' / '.join(allowed)} 之一", name)
    return value


def _articles(raw: Any) -> list[dict[str, str]]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise _invalid("articles 应为 JSON 数组", "articles") from None
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ARTICLES:
        raise _invalid(f"articles 应为 1 到 {MAX_ARTICLES} 篇图文的数组", "articles")
    articles: list[dict[str, str]] = []
    for item in raw:
        if not isinstance(item, dict) or not all(isinstance(item.get(k, ""), str) for k in ARTICLE_FIELDS):
            raise _invalid("每篇图文应为 {title, description, pic_url, url} 字符串对象", "articles")
        article = {k: item.get(k, "").strip() for k in ARTICLE_FIELDS}
        if not article["title"] or any(len(v) > 1024 for v in article.values()):
            raise _invalid("图文需要 title，且每项不超过 1024 个字符", "articles")
        for link in ("pic_url", "url"):
            if article[link] and urlsplit(article[link]).scheme not in ("http", "https"):
                raise _invalid(f"图文的 {link} 应为 http(s) 地址", "articles")
        articles.append(article)
    return articles


def reply_from_params(params: Params) -> tuple[str, str, str, Reply]:
    """(kind, match, keyword, reply) of an admin request, or `param.*` naming what is wrong."""
    kind = _choice(params, "kind", KINDS)
    match, keyword = "", ""
    if kind == "keyword":
        match = _choice(params, "match", MATCHES, default="exact")
        keyword = params.text("keyword", max_length=191)
    reply_type = _choice(params, "type", REPLY_TYPES, default="text")
    content: dict[str, Any]
    if reply_type == "text":
        content = {"text": params.text("text", max_length=MAX_TEXT)}
    elif reply_type == "image":
        content = {"media_id": params.text("media_id", max_length=128)}
    else:
        content = {"articles": _articles(params.get("articles"))}
    return kind, match, keyword, Reply(reply_type, content)


async def create_reply(
    session: AsyncSession, now: datetime, *, kind: str, match: str, keyword: str, reply: Reply
) -> WechatReply:
    row = WechatReply(
        kind=kind,
        match_mode=match,
        keyword=keyword,
        reply_type=reply.reply_type,
        content=json.dumps(dict(reply.content), ensure_ascii=False),
        created_at=now,
    )
    session.add(row)
    await session.flush()
    return row


async def list_replies(session: AsyncSession) -> list[WechatReply]:
    return list((await session.scalars(select(WechatReply).order_by(WechatReply.id))).all())


async def delete_reply(session: AsyncSession, reply_id: int) -> bool:
    result = await session.execute(delete(WechatReply).where(WechatReply.id == reply_id))
    return bool(getattr(result, "rowcount", 0))


def reply_view(row: WechatReply, *, zone: tzinfo) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "match": row.match_mode or None,
        "keyword": row.keyword or None,
        "type": row.reply_type,
        "content": json.loads(row.content),
        "created_at": show_time(row.created_at, zone),
    }


def _reply_of(row: WechatReply) -> Reply:
    return Reply(row.reply_type, json.loads(row.content))


@dataclass(frozen=True)
class Rules:
    """Every reply rule at one moment, ready to match without the database."""

    # (match mode, trimmed casefolded keyword, reply), the newest rule first
    keywords: tuple[tuple[str, str, Reply], ...]
    welcome: Reply | None

    def keyword_reply(self, text: str) -> Reply | None:
        """The rule a user's text matches: exact before contains, the newest first within each."""
        said = text.strip().casefold()
        if not said:
            return None
        for mode in MATCHES:
            for rule_mode, word, reply in self.keywords:
                if rule_mode == mode and word and (said == word if mode == "exact" else word in said):
                    return reply
        return None


async def load_rules(session: AsyncSession) -> Rules:
    rows = (await session.scalars(select(WechatReply).order_by(WechatReply.id.desc()))).all()
    welcome = next((row for row in rows if row.kind == "subscribe"), None)
    keywords = [row for row in rows if row.kind == "keyword"]
    return Rules(
        keywords=tuple((row.match_mode, row.keyword.strip().casefold(), _reply_of(row)) for row in keywords),
        welcome=_reply_of(welcome) if welcome is not None else None,
    )


# A push is answered from rules read at most this long ago: a read per push cost more than
# the rest of its handling. The worker that changes a rule forgets its copy at once; the
# other workers and machines see the change within this many seconds.
RULES_TTL: Final = 5.0
_RULES: Final = "replies.rules"


@dataclass
class _Cached:
    rules: asyncio.Task[Rules]
    until: float


async def current_rules(runtime: Runtime) -> Rules:
    """The rules, read once per `RULES_TTL` per process however many pushes ask at once."""
    now = runtime.clock.now()
    cached = runtime.services.get(_RULES)
    failed = isinstance(cached, _Cached) and cached.rules.done() and cached.rules.exception() is not None
    if not isinstance(cached, _Cached) or now >= cached.until or failed:
        read = asyncio.ensure_future(_read_rules(runtime))
        cached = runtime.services[_RULES] = _Cached(read, now + RULES_TTL)
    return await asyncio.shield(cached.rules)


async def _read_rules(runtime: Runtime) -> Rules:
    async with runtime.db.read() as session:
        return await load_rules(session)


def forget_rules(runtime: Runtime) -> None:
    """Called after a rule changed here: the next push reads them again."""
    runtime.services.pop(_RULES, None)
