"""launchers and provider leases: several launchers on one PostgreSQL

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 03:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "launchers",
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("providers", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "provider_leases",
        sa.Column("provider", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("taken_at", sa.Float(), nullable=False),
        sa.Column("renewed_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("provider_leases")
    op.drop_table("launchers")
