"""label_targets: every warm-pool target a `min-ready: auto` label was given, and why

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 03:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_targets",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("previous", sa.Integer()),
        sa.Column("rate", sa.Float(), nullable=False),
        sa.Column("launch_time", sa.Float(), nullable=False),
        sa.Column("why", sa.Text(), nullable=False, server_default=""),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_label_targets_label", "label_targets", ["label", "at"])


def downgrade() -> None:
    op.drop_index("ix_label_targets_label", table_name="label_targets")
    op.drop_table("label_targets")
