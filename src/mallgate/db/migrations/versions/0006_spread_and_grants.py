"""spread and grants: the Mini Program codes' scenes and the users' subscribe-message grants

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "scene_codes",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("page", sa.String(length=128), nullable=False),
        sa.Column("goods_id", _ID, nullable=False),
        sa.Column("sharer_id", _ID, nullable=False),
        sa.Column("media_path", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_scene_codes")),
        sa.UniqueConstraint(
            "page", "goods_id", "sharer_id", name=op.f("uq_scene_codes_page_goods_id_sharer_id")
        ),
    )
    op.create_table(
        "subscribe_grants",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("template_id", sa.String(length=128), nullable=False),
        sa.Column("granted_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscribe_grants")),
    )
    with op.batch_alter_table("subscribe_grants", schema=None) as batch_op:
        batch_op.create_index("ix_subscribe_grants_user_template", ["user_id", "template_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("subscribe_grants", schema=None) as batch_op:
        batch_op.drop_index("ix_subscribe_grants_user_template")
    op.drop_table("subscribe_grants")
    op.drop_table("scene_codes")
