"""Node-seconds from node history: how long each node spent in each state, for whom.

Pure arithmetic on events, no I/O. A node is in the state its last event moved it
to until its next event; the interval is charged to the label, provider and tenant
that event recorded. A node with no later event is still in that state now.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from freshpool.core.states import NodeState

DAY = 86400.0
HOUR = 3600.0

N = NodeState
# The question an operator asks: is the pool paying for machines that wait, for
# machines that work, or for getting machines ready and rid of? A held node is a
# person debugging a tenant's job, so it counts as use.
KIND_OF: dict[str, str] = {
    N.READY: "idle",
    N.IN_USE: "in-use",
    N.HOLD: "in-use",
    N.BUILDING: "overhead",
    N.TESTING: "overhead",
    N.USED: "overhead",
    N.FAILED: "overhead",
    N.DELETING: "overhead",
}
KINDS = ("idle", "in-use", "overhead")


class Event(Protocol):
    """What accounting needs of one node event (the store's HistoryEvent has it)."""

    @property
    def node_id(self) -> int: ...
    @property
    def at(self) -> float: ...
    @property
    def to_state(self) -> str | None: ...
    @property
    def label(self) -> str | None: ...
    @property
    def provider(self) -> str | None: ...
    @property
    def tenant(self) -> str | None: ...


@dataclass(frozen=True)
class Key:
    tenant: str
    label: str
    provider: str
    state: str

    def group(self, by: str) -> str:
        """This key's value for one of GROUPS."""
        value: str = getattr(self, by)
        return value


GROUPS = ("tenant", "label", "provider")


@dataclass(frozen=True)
class Span:
    """One node in one state from `start` to `end`."""

    node_id: int
    key: Key
    start: float
    end: float


def spans(events: Iterable[Event], until: float) -> Iterator[Span]:
    """The intervals between each node's events, the last one open until `until`.

    `events` are grouped by node and in order within each node (as the store reads
    them); an event with no to_state (the row removed) ends the node's last span.
    """
    current: Event | None = None
    for event in events:
        if current is not None and current.node_id == event.node_id:
            yield _span(current, event.at)
        elif current is not None:
            yield _span(current, until)
        current = event if event.to_state is not None else None
    if current is not None:
        yield _span(current, until)


def _span(event: Event, end: float) -> Span:
    key = Key(event.tenant or "", event.label or "", event.provider or "", event.to_state or "")
    return Span(event.node_id, key, event.at, max(event.at, end))


def clipped(found: Iterable[Span], since: float, until: float) -> Iterator[Span]:
    """The parts of spans inside [since, until)."""
    for span in found:
        start, end = max(span.start, since), min(span.end, until)
        if end > start:
            yield Span(span.node_id, span.key, start, end)


def node_seconds(found: Iterable[Span]) -> dict[Key, float]:
    totals: dict[Key, float] = defaultdict(float)
    for span in found:
        totals[span.key] += span.end - span.start
    return dict(totals)


def by_day(found: Iterable[Span], group: str) -> dict[tuple[float, str], float]:
    """Node-seconds per (UTC day's start, value of `group`)."""
    totals: dict[tuple[float, str], float] = defaultdict(float)
    for span in found:
        start = span.start
        while start < span.end:
            day = start - start % DAY
            end = min(span.end, day + DAY)
            totals[(day, span.key.group(group))] += end - start
            start = end
    return dict(totals)


def peak_nodes(found: Iterable[Span]) -> int:
    """The most nodes that existed at once (any state: each holds a machine)."""
    edges: list[tuple[float, int]] = []
    for span in found:
        edges += [(span.start, 1), (span.end, -1)]
    # At a tie an end comes first: a node deleted as another launches needs no second host.
    edges.sort()
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


Price = Callable[[str, str], float | None]


def cost(seconds: dict[Key, float], price: Price) -> float | None:
    """What these node-seconds cost at `price(provider, label)` per hour; None (unknown,
    never zero) if any of them has no price."""
    total = 0.0
    for key, secs in seconds.items():
        each = price(key.provider, key.label)
        if each is None:
            return None
        total += secs / HOUR * each
    return total
