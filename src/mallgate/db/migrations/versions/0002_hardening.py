"""hardening: wallet ledger keyed by cause, duplicate payments, refused bodies by length and hash

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("wallet_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("entry_key", sa.String(length=191), nullable=True))
    # '||' is OR on MySQL, and SQLite before 3.44 has no CONCAT.
    mysql = op.get_bind().dialect.name in ("mysql", "mariadb")
    joined = "CONCAT('credit:', order_no)" if mysql else "'credit:' || order_no"
    op.execute(f"UPDATE wallet_entries SET entry_key = {joined}")  # noqa: S608 - no input here
    with op.batch_alter_table("wallet_entries", schema=None) as batch_op:
        batch_op.drop_constraint("uq_wallet_entries_order_no", type_="unique")
        batch_op.alter_column("entry_key", existing_type=sa.String(length=191), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_wallet_entries_entry_key"), ["entry_key"])
        batch_op.create_index(batch_op.f("ix_wallet_entries_order_no"), ["order_no"], unique=False)

    op.create_table(
        "duplicate_payments",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("order_no", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("trade_no", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("refunded_amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_duplicate_payments")),
        sa.UniqueConstraint("channel", "trade_no", name=op.f("uq_duplicate_payments_channel_trade_no")),
    )
    with op.batch_alter_table("duplicate_payments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_duplicate_payments_order_no"), ["order_no"], unique=False)

    with op.batch_alter_table("payment_notifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body_length", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("body_sha256", sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("payment_notifications", schema=None) as batch_op:
        batch_op.drop_column("body_sha256")
        batch_op.drop_column("body_length")
    op.drop_table("duplicate_payments")
    # Debits have no place in the old ledger (one row per order): they go with the column.
    op.execute("DELETE FROM wallet_entries WHERE entry_key NOT LIKE 'credit:%'")
    with op.batch_alter_table("wallet_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_wallet_entries_order_no"))
        batch_op.drop_constraint(batch_op.f("uq_wallet_entries_entry_key"), type_="unique")
        batch_op.create_unique_constraint("uq_wallet_entries_order_no", ["order_no"])
        batch_op.drop_column("entry_key")
