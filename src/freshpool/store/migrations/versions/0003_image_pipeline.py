"""image pipeline: build requests and the time of the newest good build, per image

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("build_requested_at", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("build_fresh", sa.Boolean(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("built_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("built_at")
        batch_op.drop_column("build_fresh")
        batch_op.drop_column("build_requested_at")
