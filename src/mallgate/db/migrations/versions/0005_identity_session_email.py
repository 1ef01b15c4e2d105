"""identities: the Mini Program session_key (encrypted) and the email an Apple login gives

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("identities") as batch:
        # AES-GCM under a key derived from the server secret (mallgate.secret_key), never in clear.
        batch.add_column(sa.Column("session_key", sa.Text(), nullable=True))
        batch.add_column(sa.Column("email", sa.String(length=191), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("identities") as batch:
        batch.drop_column("email")
        batch.drop_column("session_key")
