"""Tenants' quotas, counted inside the hand-out's transaction: the nodes each tenant's
jobs hold, however many API servers hand out at once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from sqlalchemy import Connection, func, select, text

from freshpool.core.states import NodeState
from freshpool.store.schema import nodes

# A held node still runs for the tenant that had it: it counts as a job's.
HOLDING = (NodeState.IN_USE, NodeState.HOLD)


def held_by(conn: Connection, tenants: Collection[str], lock: bool = True) -> Counter[str]:
    """Nodes in use or held per tenant of `tenants`. With `lock`, on PostgreSQL each
    tenant's advisory lock is held to the transaction's end first (in name order, so two
    hand-outs never wait on each other in a cycle): hand-outs that count the same
    tenant take turns, and both cannot fill its last slot. SQLite's write lock
    already serialises them."""
    if not tenants:
        return Counter()
    names = sorted(set(tenants))
    if lock and conn.dialect.name == "postgresql":
        for name in names:
            key = f"freshpool:tenant:{name}"
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
    query = (
        select(nodes.c.tenant, func.count())
        .where(nodes.c.state.in_([str(s) for s in HOLDING]), nodes.c.tenant.in_(names))
        .group_by(nodes.c.tenant)
    )
    return Counter({tenant: int(n) for tenant, n in conn.execute(query)})
