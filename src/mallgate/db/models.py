"""The tables of mallgate. Portable across SQLite, PostgreSQL and MySQL/MariaDB.

Times are naive UTC (MySQL has no zone-aware type); amounts are Numeric(12, 2)
in yuan, never float; indexed strings stay within 191 characters so that a
utf8mb4 index fits MySQL's key length.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements INTEGER PRIMARY KEY; the others get 64-bit ids.
Id = BigInteger().with_variant(Integer, "sqlite")
Money = Numeric(12, 2, asdecimal=True)
# A notify body may reach 64 KiB, one byte over MySQL's BLOB.
Blob = LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql", "mariadb")
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    username: Mapped[str | None] = mapped_column(String(64), unique=True)
    mobile: Mapped[str | None] = mapped_column(String(20), unique=True)
    nickname: Mapped[str] = mapped_column(String(64), default="")
    avatar: Mapped[str] = mapped_column(String(512), default="")
    group_name: Mapped[str] = mapped_column(String(32), default="普通会员")
    sex: Mapped[int] = mapped_column(Integer, default=0)
    point: Mapped[int] = mapped_column(Integer, default=0)
    balance: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    shop_count: Mapped[int] = mapped_column(Integer, default=0)
    coupon_count: Mapped[int] = mapped_column(Integer, default=0)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    spread_id: Mapped[int | None] = mapped_column(Id)
    last_ip: Mapped[str] = mapped_column(String(64), default="")
    last_login: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Identity(Base):
    """A login at one platform app: (provider, app_id, openid), with the unionid when known."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("provider", "app_id", "openid"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), index=True)
    provider: Mapped[str] = mapped_column(String(16))
    app_id: Mapped[str] = mapped_column(String(64))
    openid: Mapped[str] = mapped_column(String(128))
    unionid: Mapped[str | None] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # The Mini Program's session_key, sealed with a key derived from the server secret
    # (mallgate.secret_key.seal_session_key): never stored in clear, replaced at each login.
    session_key: Mapped[str | None] = mapped_column(Text)
    # What an Apple login tells of the person, when it does.
    email: Mapped[str | None] = mapped_column(String(191))


class Token(Base):
    """A user token; only its SHA-256 is kept, so a leaked table logs nobody in."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class Goods(Base):
    __tablename__ = "goods"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    price: Mapped[Decimal] = mapped_column(Money)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (UniqueConstraint("channel", "trade_no"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int | None] = mapped_column(Id, ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(128), default="")
    amount: Mapped[Decimal] = mapped_column(Money)
    status: Mapped[str] = mapped_column(String(24), default="unpaid", index=True)
    channel: Mapped[str | None] = mapped_column(String(16))
    trade_no: Mapped[str | None] = mapped_column(String(64))
    paid_amount: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    refunded_amount: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    paid_at: Mapped[datetime | None] = mapped_column(DateTime)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class WalletEntry(Base):
    """One movement of a wallet: a credit per paid recharge, a debit per refund of one.

    `entry_key` names the cause (`credit:<order_no>`, `refund:<channel>:<refund_no>`) and is
    unique, so the same cause can never move the balance twice.
    """

    __tablename__ = "wallet_entries"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), index=True)
    order_no: Mapped[str] = mapped_column(String(64), index=True)
    entry_key: Mapped[str] = mapped_column(String(191), unique=True)
    amount: Mapped[Decimal] = mapped_column(Money)  # negative for a debit
    created_at: Mapped[datetime] = mapped_column(DateTime)


class DuplicatePayment(Base):
    """A second payment of an already paid order, once per (channel, trade_no): it is owed back."""

    __tablename__ = "duplicate_payments"
    __table_args__ = (UniqueConstraint("channel", "trade_no"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(String(64), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    trade_no: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(Money)
    refunded_amount: Mapped[Decimal] = mapped_column(Money, default=Decimal("0.00"))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Refund(Base):
    """One refund as the platform identified it; the unique key makes a repeated notice a no-op."""

    __tablename__ = "refunds"
    __table_args__ = (UniqueConstraint("channel", "refund_no"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(String(64), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    refund_no: Mapped[str] = mapped_column(String(128))
    amount: Mapped[Decimal] = mapped_column(Money)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class RefundRequest(Base):
    """A refund the mall asked a platform for: recorded before the call, settled by the notice or a query.

    `idempotency_key` is the caller's (the same key is one refund, however often it is sent);
    `request_no` is what the platform knows the refund by (Alipay out_request_no, WeChat
    out_refund_no). `status`: requesting (recorded, call under way), pending (accepted, not yet
    done), succeeded (the state machine recorded the money back), failed (refused: nothing moved).
    """

    __tablename__ = "refund_requests"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(String(64), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    trade_no: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    request_no: Mapped[str] = mapped_column(String(64), unique=True)
    amount: Mapped[Decimal] = mapped_column(Money)
    reason: Mapped[str] = mapped_column(String(80), default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    platform_refund_id: Mapped[str] = mapped_column(String(64), default="")
    error: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class PaymentNotification(Base):
    """Every notification as received, kept for audit and replay whatever its fate."""

    __tablename__ = "payment_notifications"
    __table_args__ = (Index("ix_payment_notifications_order_no_received", "order_no", "received_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(24), default="")
    order_no: Mapped[str | None] = mapped_column(String(64))
    trade_no: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    source_ip: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(8), default="POST")
    query_string: Mapped[str] = mapped_column(LongText, default="")
    headers: Mapped[str] = mapped_column(LongText, default="{}")
    # A refused body is kept truncated; its full length and SHA-256 still identify it.
    body: Mapped[bytes] = mapped_column(Blob, default=b"")
    body_length: Mapped[int] = mapped_column(Integer, default=0)
    body_sha256: Mapped[str] = mapped_column(String(64), default="")
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    outcome: Mapped[str] = mapped_column(String(24), default="received")
    reason: Mapped[str] = mapped_column(String(255), default="")
    # The same accepted notice again, byte for byte (a platform's retry): counted here, not stored.
    repeats: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_repeat_at: Mapped[datetime | None] = mapped_column(DateTime)


class CacheEntry(Base):
    """Shared key/value cache with expiry and a lease, so one worker refreshes a token for all."""

    __tablename__ = "cache_entries"

    key: Mapped[str] = mapped_column(String(191), primary_key=True)
    value: Mapped[str] = mapped_column(LongText, default="")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)


class Counter(Base):
    """A fixed-window rate-limit counter; one row per limit key and window."""

    __tablename__ = "counters"

    key: Mapped[str] = mapped_column(String(191), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class SmsCode(Base):
    """The live code of one number and purpose; a new send replaces it."""

    __tablename__ = "sms_codes"
    __table_args__ = (UniqueConstraint("mobile", "purpose"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    mobile: Mapped[str] = mapped_column(String(20))
    purpose: Mapped[str] = mapped_column(String(16))
    code_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    used_at: Mapped[datetime | None] = mapped_column(DateTime)


class OutboxEvent(Base):
    """What must be sent because of a state change, written in the same transaction."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_pending", "sent_at", "available_at"),
        Index("ix_outbox_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(LongText)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    available_at: Mapped[datetime] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str] = mapped_column(String(255), default="")


class OutboxDelivery(Base):
    """One outbox event through one sender (webhook, subscribe message): its attempts and state."""

    __tablename__ = "outbox_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "sender", name="uq_outbox_deliveries_event_sender"),
        Index("ix_outbox_deliveries_due", "state", "next_attempt_at"),
        Index("ix_outbox_deliveries_ordering", "sender", "ordering_key", "event_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(Id)
    sender: Mapped[str] = mapped_column(String(32))
    # Deliveries of one sender with the same key go out in event order (the order number).
    ordering_key: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16))  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    give_up_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)


class WechatReply(Base):
    """An Official Account auto-reply: a keyword rule or the subscribe welcome (admin API)."""

    __tablename__ = "wechat_replies"
    __table_args__ = (Index("ix_wechat_replies_kind", "kind", "match_mode"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # subscribe | keyword
    match_mode: Mapped[str] = mapped_column(String(16), default="")  # exact | contains | "" (subscribe)
    keyword: Mapped[str] = mapped_column(String(191), default="")
    reply_type: Mapped[str] = mapped_column(String(16))  # text | image | news
    content: Mapped[str] = mapped_column(LongText)  # JSON: {"text"} | {"media_id"} | {"articles"}
    created_at: Mapped[datetime] = mapped_column(DateTime)


class WechatPush(Base):
    """A push handled once: its retries (other workers, other machines) meet this row's unique key."""

    __tablename__ = "wechat_pushes"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    dedupe_key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the push's key
    msg_type: Mapped[str] = mapped_column(String(32))
    from_user: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The plaintext reply XML once known; "" is `success`. Retries get it again (re-encrypted).
    reply: Mapped[str | None] = mapped_column(LongText)
    outcome: Mapped[str] = mapped_column(String(16), default="handling")  # handling|replied|late|failed


class WechatFollower(Base):
    """An Official Account follower as its pushes told us: who brought them (a parametric QR's scene)."""

    __tablename__ = "wechat_followers"
    __table_args__ = (UniqueConstraint("app_id", "openid"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    app_id: Mapped[str] = mapped_column(String(64))
    openid: Mapped[str] = mapped_column(String(64))
    referrer: Mapped[str] = mapped_column(String(128), default="")  # the scene of qrscene_<scene>
    subscribed_at: Mapped[datetime] = mapped_column(DateTime)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(DateTime)


class SceneCode(Base):
    """A Mini Program code's `scene`: an opaque short code naming (page, goods, sharer), made once."""

    __tablename__ = "scene_codes"
    __table_args__ = (UniqueConstraint("page", "goods_id", "sharer_id"),)

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    page: Mapped[str] = mapped_column(String(128))
    goods_id: Mapped[int] = mapped_column(Id)
    sharer_id: Mapped[int] = mapped_column(Id)
    media_path: Mapped[str] = mapped_column(String(255), default="")  # relative to the media dir; "" not yet
    created_at: Mapped[datetime] = mapped_column(DateTime)


class SubscribeGrant(Base):
    """One `accept` of a subscribe template by a user: one message may be sent against it."""

    __tablename__ = "subscribe_grants"
    __table_args__ = (Index("ix_subscribe_grants_user_template", "user_id", "template_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Id)
    template_id: Mapped[str] = mapped_column(String(128))
    granted_at: Mapped[datetime] = mapped_column(DateTime)
    used_at: Mapped[datetime | None] = mapped_column(DateTime)


def table_of(model: type[Base]) -> Table:
    """The Core table of a model, for the hot paths that skip the ORM."""
    table = model.__table__
    assert isinstance(table, Table)
    return table
