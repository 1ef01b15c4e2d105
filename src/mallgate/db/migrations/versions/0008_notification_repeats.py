"""payment_notifications: how many times an accepted notice came again, byte for byte

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("payment_notifications") as batch:
        # A repeat of an accepted notice bumps its first row instead of storing the same bytes again.
        batch.add_column(sa.Column("repeats", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_repeat_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("payment_notifications") as batch:
        batch.drop_column("last_repeat_at")
        batch.drop_column("repeats")
