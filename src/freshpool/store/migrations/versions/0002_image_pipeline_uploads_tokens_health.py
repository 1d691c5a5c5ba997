"""image pipeline, uploads, tokens, health

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 00:38:50.031943
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_used_at", sa.Float(), nullable=True),
        sa.Column("revoked", sa.Boolean(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("build_id", sa.String(length=128), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=True),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("state_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("build_id", "provider", name="uq_uploads_build_provider"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("image_builds", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("digest", sa.String(length=80), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("definition_key", sa.String(length=80), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("parent_build", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("layers", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("log_path", sa.Text(), server_default="", nullable=False))

    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tenant", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("checked_at", sa.Float(), nullable=True))

    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("fulfilled_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("fulfilled_at")
        batch_op.drop_column("provider")

    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("checked_at")
        batch_op.drop_column("tenant")

    with op.batch_alter_table("image_builds", schema=None) as batch_op:
        batch_op.drop_column("log_path")
        batch_op.drop_column("layers")
        batch_op.drop_column("parent_build")
        batch_op.drop_column("definition_key")
        batch_op.drop_column("digest")

    op.drop_table("uploads")
    op.drop_table("tokens")
    op.drop_table("images")
