"""Room for a launch, counted in the launch's own transaction: the caps that hold
for the whole fleet (a provider's max-nodes, a label's max-nodes, a label's
min-ready plus waiting demand), however many launchers launch at once."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, func, select, text

from freshpool.core.states import NODE_SUPPLY_STATES
from freshpool.store.schema import nodes


@dataclass(frozen=True)
class Room:
    """What a launch must fit under (None: no such cap)."""

    # Every node of the provider, whatever its state.
    provider_max: int | None = None
    # The label's nodes on their way or ready, on every provider: min-ready plus the
    # nodes waiting requests ask for. Two launchers filling the same label stop at it
    # together instead of each launching the whole shortfall.
    label_supply: int | None = None
    # Every node of the label, on every provider.
    label_max: int | None = None


def fit(conn: Connection, label: str, provider: str, count: int, room: Room) -> int:
    """How many of `count` new nodes fit now. On PostgreSQL the label's and then the
    provider's advisory lock are held to the transaction's end, so launches that
    count the same nodes take turns (SQLite's write lock already serialises them)."""
    if conn.dialect.name == "postgresql":
        for key in (f"freshpool:label:{label}", f"freshpool:provider:{provider}"):
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
    fits = count
    if room.provider_max is not None:
        used = _count(conn, nodes.c.provider == provider)
        fits = min(fits, room.provider_max - used)
    if room.label_max is not None:
        fits = min(fits, room.label_max - _count(conn, nodes.c.label == label))
    if room.label_supply is not None:
        supply = _count(conn, nodes.c.label == label, nodes.c.state.in_(sorted(NODE_SUPPLY_STATES)))
        fits = min(fits, room.label_supply - supply)
    return max(fits, 0)


def _count(conn: Connection, *where: ColumnElement[bool]) -> int:
    return int(conn.scalar(select(func.count()).select_from(nodes).where(*where)) or 0)
