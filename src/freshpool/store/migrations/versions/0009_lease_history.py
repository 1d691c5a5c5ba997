"""lease history: who drove a provider when (node_events.launcher/generation, lease_takes)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_events") as batch:
        batch.add_column(sa.Column("launcher", sa.String(256), nullable=True))
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=True))
    op.create_table(
        "lease_takes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("previous", sa.String(256), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lease_takes")
    with op.batch_alter_table("node_events") as batch:
        batch.drop_column("generation")
        batch.drop_column("launcher")
