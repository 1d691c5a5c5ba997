"""node_events: each event keeps the node's label, provider and tenant (cost accounting)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Before a hand-out a node belongs to no tenant; from it on, to the one it was handed to.
_UNCLAIMED = ("building", "testing", "ready")


def upgrade() -> None:
    with op.batch_alter_table("node_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("label", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("provider", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("tenant", sa.String(64), nullable=True))
    op.create_index("ix_node_events_at", "node_events", ["at"])
    # Events of nodes that still have a row learn what the row knows; those of nodes
    # already gone stay NULL (usage reports them under an unknown label).
    node = "SELECT nodes.{0} FROM nodes WHERE nodes.id = node_events.node_id"
    op.execute(
        f"UPDATE node_events SET label = ({node.format('label')}),"
        f" provider = ({node.format('provider')}),"
        f" tenant = CASE WHEN to_state IN {_UNCLAIMED!r} OR to_state IS NULL THEN ''"
        f" ELSE ({node.format('tenant')}) END"
        " WHERE EXISTS (SELECT 1 FROM nodes WHERE nodes.id = node_events.node_id)"
    )


def downgrade() -> None:
    op.drop_index("ix_node_events_at", table_name="node_events")
    with op.batch_alter_table("node_events", schema=None) as batch_op:
        batch_op.drop_column("tenant")
        batch_op.drop_column("provider")
        batch_op.drop_column("label")
