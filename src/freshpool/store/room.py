"""Room for a launch, counted in the launch's own transaction: the caps that hold
for the whole fleet (a provider's max-nodes, a label's max-nodes, a label's
min-ready plus waiting demand), however many launchers launch at once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, or_, select, text

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


@dataclass(frozen=True)
class NewNodes:
    """A launch's rows to write: `count` nodes of `label` on `provider` from a build,
    under `room` (None: no cap)."""

    label: str
    provider: str
    build_id: str
    hostname_prefix: str
    count: int
    room: Room | None = None


def fit(conn: Connection, asks: Sequence[NewNodes]) -> list[int]:
    """How many of each ask's new nodes fit now, the asks taken in order (each counts
    the ones before it). On PostgreSQL the labels' and then the providers' advisory
    locks are held to the transaction's end, each kind in name order, so launches that
    count the same nodes take turns without deadlocking (SQLite's write lock already
    serialises them). One grouped count serves every ask."""
    capped = [a for a in asks if a.room is not None]
    if not capped:
        return [a.count for a in asks]
    labels = sorted({a.label for a in capped})
    providers = sorted({a.provider for a in capped})
    if conn.dialect.name == "postgresql":
        keys = [f"freshpool:label:{x}" for x in labels] + [
            f"freshpool:provider:{x}" for x in providers
        ]
        # One statement: its select list is evaluated left to right, in that order.
        calls = ", ".join(f"pg_advisory_xact_lock(hashtext(:k{i}))" for i in range(len(keys)))
        conn.execute(text(f"SELECT {calls}"), {f"k{i}": key for i, key in enumerate(keys)})
    of_provider: Counter[str] = Counter()
    of_label: Counter[str] = Counter()
    supply: Counter[str] = Counter()
    query = (
        select(nodes.c.provider, nodes.c.label, nodes.c.state, func.count())
        .where(or_(nodes.c.provider.in_(providers), nodes.c.label.in_(labels)))
        .group_by(nodes.c.provider, nodes.c.label, nodes.c.state)
    )
    for provider, label, state, n in conn.execute(query):
        of_provider[provider] += n
        of_label[label] += n
        if state in NODE_SUPPLY_STATES:
            supply[label] += n
    fits = []
    for ask in asks:
        room, n = ask.room, ask.count
        if room is not None:
            if room.provider_max is not None:
                n = min(n, room.provider_max - of_provider[ask.provider])
            if room.label_max is not None:
                n = min(n, room.label_max - of_label[ask.label])
            if room.label_supply is not None:
                n = min(n, room.label_supply - supply[ask.label])
        n = max(n, 0)
        # New rows are building: on their way, so supply.
        of_provider[ask.provider] += n
        of_label[ask.label] += n
        supply[ask.label] += n
        fits.append(n)
    return fits
