"""wechat push: auto-replies, handled pushes keyed for dedupe, followers and their referrers

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "wechat_replies",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("match_mode", sa.String(length=16), nullable=False),
        sa.Column("keyword", sa.String(length=191), nullable=False),
        sa.Column("reply_type", sa.String(length=16), nullable=False),
        sa.Column("content", _LONG_TEXT, nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wechat_replies")),
    )
    with op.batch_alter_table("wechat_replies", schema=None) as batch_op:
        batch_op.create_index("ix_wechat_replies_kind", ["kind", "match_mode"], unique=False)

    op.create_table(
        "wechat_pushes",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("dedupe_key", sa.String(length=64), nullable=False),
        sa.Column("msg_type", sa.String(length=32), nullable=False),
        sa.Column("from_user", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("reply", _LONG_TEXT, nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wechat_pushes")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_wechat_pushes_dedupe_key")),
    )
    with op.batch_alter_table("wechat_pushes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_wechat_pushes_received_at"), ["received_at"], unique=False)

    op.create_table(
        "wechat_followers",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("app_id", sa.String(length=64), nullable=False),
        sa.Column("openid", sa.String(length=64), nullable=False),
        sa.Column("referrer", sa.String(length=128), nullable=False),
        sa.Column("subscribed_at", sa.DateTime(), nullable=False),
        sa.Column("unsubscribed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wechat_followers")),
        sa.UniqueConstraint("app_id", "openid", name=op.f("uq_wechat_followers_app_id_openid")),
    )


def downgrade() -> None:
    op.drop_table("wechat_followers")
    op.drop_table("wechat_pushes")
    op.drop_table("wechat_replies")
