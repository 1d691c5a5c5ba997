"""change notify: on PostgreSQL every statement that changes nodes or requests NOTIFYs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 07:00:00

The one place for the rule "a commit that changes nodes or requests tells every
listener" (store/changes.py LISTENs): triggers, so no write path can forget it.
Statement-level, with a transition table, so a hand-out of 50 nodes costs one
notification per statement, and a compare-and-set that matched no row sends none
(otherwise a scheduler's pass that found nothing would wake the other schedulers,
whose passes would wake it again). PostgreSQL folds identical notifications of one
transaction into one, and delivers them at commit, never on rollback.

SQLite has no NOTIFY: its watchers read PRAGMA data_version instead.
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CHANNEL = "freshpool_changes"
TABLES = ("nodes", "requests")
# A trigger with a transition table may have one event only, so three per table.
EVENTS = {"INSERT": "NEW", "UPDATE": "NEW", "DELETE": "OLD"}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION freshpool_notify_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM changed) THEN
                PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    for table in TABLES:
        for event, which in EVENTS.items():
            op.execute(
                f"CREATE TRIGGER {table}_{event.lower()}_notify AFTER {event} ON {table}"
                f" REFERENCING {which} TABLE AS changed"
                " FOR EACH STATEMENT EXECUTE FUNCTION freshpool_notify_change()"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        for event in EVENTS:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_{event.lower()}_notify ON {table}")
    op.execute("DROP FUNCTION IF EXISTS freshpool_notify_change()")
