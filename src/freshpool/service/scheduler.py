"""The request scheduler: hands pending requests their node sets by priority, fair share, age.

It runs as a launcher pass, so one thread decides every hand-out and the order holds.
Within one priority (an integer; higher is served first) tenants share the pool by
weight with start-time fair queuing: each tenant has a virtual clock that advances by
nodes / weight when it is served, and the tenant with the earliest clock goes next, so
one tenant's 500 waiting requests cannot starve another tenant's one. A tenant that
was idle rejoins at the current virtual time (idle time banks no credit). Within a
tenant, the oldest request goes first.

A request that cannot be fulfilled now keeps its place: requests behind it may not take
the ready nodes of the labels it waits for. Fulfilment itself is store.fulfil, one
transaction per request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence

from freshpool.config import Config
from freshpool.service.waiters import Waiters
from freshpool.store import RequestRow, StaleState, Store

log = logging.getLogger("freshpool.scheduler")


class FairShare:
    """Virtual clocks per tenant (start-time fair queuing)."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)
        self.clock: dict[str, float] = {}
        self.now = 0.0

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def start_of(self, tenant: str, clock: dict[str, float], now: float) -> float:
        return max(clock.get(tenant, now), now)

    def charge(self, request: RequestRow) -> None:
        start = self.start_of(request.tenant, self.clock, self.now)
        self.now = start
        self.clock[request.tenant] = start + len(request.labels) / self.weight(request.tenant)

    def order(self, pending: Iterable[RequestRow]) -> list[RequestRow]:
        """The order to serve `pending` in if each were served in turn (pure: state unchanged)."""
        by_priority: dict[int, dict[str, deque[RequestRow]]] = defaultdict(dict)
        for request in sorted(pending, key=lambda r: (r.created_at, r.id)):
            queues = by_priority[request.priority]
            queues.setdefault(request.tenant, deque()).append(request)
        clock, now = dict(self.clock), self.now
        ordered: list[RequestRow] = []
        for priority in sorted(by_priority, reverse=True):
            queues = by_priority[priority]
            while queues:
                tenant = min(
                    queues,
                    key=lambda t: (
                        self.start_of(t, clock, now),
                        queues[t][0].created_at,
                        queues[t][0].id,
                    ),
                )
                request = queues[tenant].popleft()
                if not queues[tenant]:
                    del queues[tenant]
                now = self.start_of(tenant, clock, now)
                clock[tenant] = now + len(request.labels) / self.weight(tenant)
                ordered.append(request)
        return ordered


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: Store,
        waiters: Waiters | None = None,
        short: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.waiters = waiters or Waiters()
        # Called when requests wait for nodes that are not ready (the launcher's wake).
        self.short = short
        self.fair = FairShare({t.name: t.weight for t in config.tenants})
        self._lock = threading.Lock()
        # One pass at a time, whichever thread runs it, so the order holds.
        self._passing = threading.Lock()
        self._poked = threading.Event()
        # Set after the launcher's first pass: it has recovered and reconciled every provider.
        self.started = threading.Event()

    def providers_for(self, labels: Sequence[str]) -> list[str]:
        """Providers that serve every label of a set (a set comes from one provider)."""
        return [p.name for p in self.config.providers if all(p.serves(x) for x in labels)]

    def queue(self) -> list[RequestRow]:
        """Pending requests in the order they will be served."""
        pending = self.store.pending_requests()
        with self._lock:
            return self.fair.order(pending)

    def run_pass(self) -> None:
        """Serve what can be served now; tell waiters whose request changed."""
        with self._passing:
            pending = self.store.pending_requests()
            still_pending = {r.id for r in pending}
            if pending:
                still_pending -= self._serve(pending)
            waiting = self.waiters.watched()
            if waiting:
                # Fulfilled here, failed by deadline, cancelled, or claimed by another process.
                self.waiters.notify(waiting - still_pending)

    # -------------------------------------------- running beside the launcher

    def launcher_pass(self) -> None:
        """The launcher's pass hook: nodes may have become ready; serve on our own thread."""
        self.started.set()
        self.poke()

    def poke(self) -> None:
        """Run a pass now (thread-safe): a request arrived, or a node became ready."""
        self._poked.set()

    def run(self, stop: threading.Event, idle: float = 1.0) -> None:
        """Serve requests on a thread of its own until `stop` is set.

        A hand-out then waits for no launch, test or delete the launcher is advancing:
        with real nodes, a launcher pass that starts or tests nodes takes tens of ms.
        The launcher pokes after each of its passes, the API on each new request.
        """
        while not stop.is_set():
            if self._poked.wait(idle):
                self._poked.clear()
            if self.started.is_set():
                self.run_pass()

    def _serve(self, pending: list[RequestRow]) -> set[int]:
        ready = self.store.ready_by_label()
        reserved: Counter[str] = Counter()
        served: set[int] = set()
        with self._lock:
            ordered = self.fair.order(pending)
        for request in ordered:
            need = Counter(request.labels)
            if any(ready[x] - reserved[x] < n for x, n in need.items()):
                # Keep its place: nothing behind it takes the nodes it waits for.
                reserved.update(need)
                continue
            nodes = None
            with contextlib.suppress(StaleState):
                nodes = self.store.fulfil(request.id, self.providers_for(request.labels))
            if nodes is None:
                reserved.update(need)
                continue
            ready.subtract(need)
            served.add(request.id)
            with self._lock:
                self.fair.charge(request)
            log.info(
                "request %s (%s, priority %d): nodes %s",
                request.id,
                request.tenant or "-",
                request.priority,
                ", ".join(str(n.id) for n in nodes),
            )
        if reserved and self.short is not None:
            # Some requests wait for nodes that are not ready: the launcher should look now.
            self.short()
        return served
