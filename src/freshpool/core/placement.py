"""Who gets which ready nodes: priority, then weighted fair share, then age; first fit.

Within one priority (an integer; higher is served first) tenants share the pool by
weight with start-time fair queuing: each tenant has a virtual clock that advances
by nodes / weight when it is served, and the tenant with the earliest clock goes
next, so one tenant's 500 waiting requests cannot starve another tenant's one. A
tenant that was idle rejoins at the current virtual time (idle time banks no
credit). Within a tenant, the oldest request goes first.

A request that cannot be fulfilled now keeps its place: requests behind it may not
take the ready nodes of the labels it waits for. A set comes whole from the first
provider (in config order) that has all of it ready.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from freshpool.core.nodesets import needs

# Ready nodes per (provider, label).
Ready = Counter[tuple[str, str]]
# This pending request gets its set from this provider.
Placement = tuple[int, str]


class Pending(Protocol):
    """What placement reads of a waiting request (the store's request rows have it)."""

    @property
    def id(self) -> int: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def tenant(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def created_at(self) -> float: ...


R = TypeVar("R", bound=Pending)


@dataclass(frozen=True)
class Clocks:
    """Each tenant's virtual clock, and the virtual time now. Immutable: a pass makes
    the next one, so a reader on another thread always sees a whole one."""

    tenants: Mapping[str, float] = field(default_factory=dict)
    now: float = 0.0


class FairShare:
    """Start-time fair queuing between tenants, by weight (a tenant not listed has 1)."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def order(self, pending: Iterable[R], clocks: Clocks) -> list[R]:
        """The order to serve `pending` in, if each were served in turn."""
        by_priority: dict[int, dict[str, deque[R]]] = defaultdict(dict)
        for request in sorted(pending, key=lambda r: (r.created_at, r.id)):
            by_priority[request.priority].setdefault(request.tenant, deque()).append(request)
        clock, now = dict(clocks.tenants), clocks.now
        ordered: list[R] = []
        for priority in sorted(by_priority, reverse=True):
            queues = by_priority[priority]
            while queues:
                if len(queues) == 1:
                    # One tenant left at this priority: the rest in age order, no search
                    # (a CI pool with one tenant asks this of every request it serves).
                    ((tenant, queue),) = queues.items()
                    for request in queue:
                        now = self._advance(clock, now, request)
                    ordered.extend(queue)
                    break
                tenant = min(
                    queues,
                    key=lambda t: (
                        max(clock.get(t, now), now),
                        queues[t][0].created_at,
                        queues[t][0].id,
                    ),
                )
                request = queues[tenant].popleft()
                if not queues[tenant]:
                    del queues[tenant]
                now = self._advance(clock, now, request)
                ordered.append(request)
        return ordered

    def charge(self, clocks: Clocks, served: Iterable[Pending]) -> Clocks:
        """The clocks after `served` were handed their sets, in that order."""
        clock, now = dict(clocks.tenants), clocks.now
        for request in served:
            now = self._advance(clock, now, request)
        return Clocks(clock, now)

    def _advance(self, clock: dict[str, float], now: float, request: Pending) -> float:
        start = max(clock.get(request.tenant, now), now)
        clock[request.tenant] = start + len(request.labels) / self.weight(request.tenant)
        return start


def first_fit(labels: Sequence[str], providers: Sequence[str], ready: Ready) -> str | None:
    """The first provider (in the given order) with one ready node for every label."""
    need = needs(tuple(labels))
    for provider in providers:
        if all(ready[(provider, label)] >= n for label, n in need):
            return provider
    return None


@dataclass(frozen=True)
class Plan:
    placements: list[Placement]
    # Some request waits for nodes that are not ready: the launcher should look now.
    blocked: bool


def place(
    ordered: Sequence[Pending],
    ready: Ready,
    providers_for: Callable[[tuple[str, ...]], Sequence[str]],
    tenant_room: Mapping[str, int] | None = None,
) -> Plan:
    """Placements for requests in serving order: each takes its set from the first
    provider that has it all, unless an earlier request waits for those labels.

    A tenant in `tenant_room` gets sets only while they fit in its room (nodes its
    quota has left); its other requests wait without holding back anyone else's.
    """
    room = dict(tenant_room or {})
    free = Counter(ready)
    total: Counter[str] = Counter()
    for (_, label), n in ready.items():
        total[label] += n
    reserved: Counter[str] = Counter()
    placements: list[Placement] = []
    for request in ordered:
        labels = tuple(request.labels)
        left = room.get(request.tenant)
        if left is not None and left < len(labels):
            continue
        need = needs(labels)
        provider = None
        if all(total[x] - reserved[x] >= n for x, n in need):
            provider = first_fit(labels, providers_for(labels), free)
        if provider is None:
            # Keep its place: nothing behind it takes the nodes it waits for.
            reserved.update(dict(need))
            continue
        for label, n in need:
            free[(provider, label)] -= n
            total[label] -= n
        if left is not None:
            room[request.tenant] = left - len(labels)
        placements.append((request.id, provider))
    return Plan(placements, blocked=bool(reserved))
