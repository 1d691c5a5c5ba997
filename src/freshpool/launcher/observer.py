"""Turns the store's history (node events, finished requests) into metrics and hourly charts.

Every state change is already an event row with a timestamp, written by whichever
process made it, so launch, test and delete durations and failures by cause are read
from there instead of being timed at each call site: nothing is missed, and one place
feeds Prometheus, statsd and the dashboard alike. It looks after launcher passes (in
the launcher's process, at most ten times a second; see publishing.py) and reads
only what is new since its cursor.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from freshpool import metrics
from freshpool.core.states import NodeState, RequestState
from freshpool.observed import BUCKET, WINDOW
from freshpool.store import HistoryEvent, RequestOutcome, Store

N = NodeState
# Failures by cause, from the state a node failed in.
_FAILED_FROM: dict[str | None, str] = {
    N.BUILDING: "launch",
    N.TESTING: "test",
    N.READY: "health",
    N.IN_USE: "job",
    N.HOLD: "hold",
}


@dataclass
class Bucket:
    start: float
    counts: Counter[str] = field(default_factory=Counter)
    launches: int = 0
    failures: int = 0
    waits: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "t": self.start,
            "ready": self.counts[N.READY],
            "in_use": self.counts[N.IN_USE],
            "starting": self.counts[N.BUILDING] + self.counts[N.TESTING],
            "total": sum(self.counts.values()),
            "launches": self.launches,
            "failures": self.failures,
            "requests": len(self.waits),
            "wait_p50": statistics.median(self.waits) if self.waits else None,
            "wait_max": max(self.waits) if self.waits else None,
        }


@dataclass
class _Seen:
    label: str
    provider: str
    state: str | None
    since: float
    tenant: str = ""
    # freshpool_node_seconds_total holds this node's time in `state` up to here.
    counted: float = 0.0


class Observer:
    def __init__(
        self,
        store: Store,
        every: float = 0.5,
        gauge_every: float = 10.0,
    ) -> None:
        self.store = store
        self.every = every
        self.gauge_every = gauge_every
        self._lock = threading.Lock()
        self._cursor: int | None = None
        # Requests from this id on are unseen; those in _open were pending when seen.
        self._next_request = 0
        self._open: set[int] = set()
        self._nodes: dict[int, _Seen] = {}
        self._buckets: deque[Bucket] = deque()
        self._next = 0.0
        self._next_gauge = 0.0
        self._born = time.time()
        # Node-seconds counted since the last look, by (tenant, label, provider, state).
        self._spent: defaultdict[tuple[str, str, str, str], float] = defaultdict(float)

    # ------------------------------------------------------------- the pass

    def tick(self, force: bool = False) -> None:
        """Read new node events every look; requests, counts and gauges every `every` s.

        Events are read on every look (one indexed query; nothing when nothing moved)
        because a node's label and provider are known only while its row exists: a
        look soon after each launcher pass sees nearly every row; one created and
        removed between two looks counts under an empty label.
        """
        now = time.time()
        with self._lock:
            if self._cursor is None:
                self._next = now + self.every
                self._start(now)
                return
            self._extend(now)
            self._apply_events()
            if force or now >= self._next:
                self._next = now + self.every
                self._advance(now)
            # One counter update per series, not per node: a fleet's store has tens
            # of thousands of nodes.
            for (tenant, label, provider, state), seconds in self._spent.items():
                metrics.node_seconds(tenant, label, provider, state, seconds)
            self._spent.clear()

    def history(self) -> dict[str, Any]:
        """The last hour in buckets, oldest first, for the dashboard's charts."""
        with self._lock:
            points = [b.as_dict() for b in self._buckets]
        return {"bucket_seconds": BUCKET, "window_seconds": WINDOW, "points": points}

    # ------------------------------------------------------------ internals

    def _bucket_for(self, at: float) -> Bucket | None:
        if not self._buckets or at < self._buckets[0].start:
            return None
        index = int((at - self._buckets[0].start) // BUCKET)
        return self._buckets[min(index, len(self._buckets) - 1)]

    def _extend(self, now: float) -> None:
        start = now - now % BUCKET
        if not self._buckets:
            self._buckets.append(Bucket(start - WINDOW))
        while self._buckets[-1].start < start:
            last = self._buckets[-1]
            self._buckets.append(Bucket(last.start + BUCKET, counts=Counter(last.counts)))
        while self._buckets[0].start < start - WINDOW:
            self._buckets.popleft()

    def _start(self, now: float) -> None:
        """First look: rebuild the last hour's charts; count only what happens from now on."""
        self._extend(now)
        since = self._buckets[0].start
        self._cursor = self.store.last_event_before(since)
        events = self._read_events()
        counts = self._counts()
        # Walk back from the counts now, undoing events, to get each bucket's counts.
        pending = list(events)
        for bucket in reversed(self._buckets):
            bucket.counts = Counter(counts)
            while pending and pending[-1].at >= bucket.start:
                event = pending.pop()
                if event.to_state:
                    counts[event.to_state] -= 1
                if event.from_state:
                    counts[event.from_state] += 1
        for event in events:
            previous = self._nodes.get(event.node_id)
            self._remember(event)
            self._chart(event)
            # What happened since this process started counts; older history only charts.
            if event.at >= self._born:
                self._measure(event, previous)
        # Nodes whose last change is older than the charts still take up time now.
        for row in self.store.nodes():
            if row.id not in self._nodes:
                self._nodes[row.id] = _Seen(
                    row.label, row.provider, row.state, row.state_at, row.tenant, self._born
                )
        self._next_request = self._first_request_since(since)
        self._scan_requests(count_since=self._born)

    def _apply_events(self) -> None:
        for event in self._read_events():
            previous = self._nodes.get(event.node_id)
            self._remember(event)
            self._chart(event)
            self._measure(event, previous)

    def _advance(self, now: float) -> None:
        for seen in self._nodes.values():
            self._count(seen, now)
        self._scan_requests()
        counts = self.store.node_counts()
        self._buckets[-1].counts = Counter()
        for (_provider, _label, state), n in counts.items():
            self._buckets[-1].counts[state] += n
        if now >= self._next_gauge:
            self._next_gauge = now + self.gauge_every
            metrics.node_gauges(dict(counts))

    def _read_events(self) -> list[HistoryEvent]:
        assert self._cursor is not None
        events: list[HistoryEvent] = []
        while True:
            batch = self.store.events_after(self._cursor)
            if not batch:
                return events
            events.extend(batch)
            self._cursor = batch[-1].id

    def _counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for (_provider, _label, state), n in self.store.node_counts().items():
            counts[state] += n
        return counts

    def _remember(self, event: HistoryEvent) -> None:
        seen = self._nodes.get(event.node_id)
        if seen is not None:
            self._count(seen, event.at)
        if event.to_state is None:
            self._nodes.pop(event.node_id, None)
            return
        label = event.label or (seen.label if seen else "")
        provider = event.provider or (seen.provider if seen else "")
        tenant = event.tenant if event.tenant is not None else (seen.tenant if seen else "")
        if seen is None or seen.state != event.to_state:
            # Time before this process started was never this process's to count.
            counted = max(event.at, self._born)
            self._nodes[event.node_id] = _Seen(
                label, provider, event.to_state, event.at, tenant, counted
            )

    def _count(self, seen: _Seen, until: float) -> None:
        """Add a node's time in its state up to `until` to the node-seconds counter.

        A pass counts every live node up to its own clock, and an event another process
        wrote may carry a time just before that: the overlap (at most one pass) is not
        taken back, since a counter never goes down. `freshpool usage` reads the
        history and is exact.
        """
        if seen.state is not None and until > seen.counted:
            self._spent[seen.tenant, seen.label, seen.provider, seen.state] += until - seen.counted
            seen.counted = until

    def _chart(self, event: HistoryEvent) -> None:
        bucket = self._bucket_for(event.at)
        if bucket is None:
            return
        if event.from_state is None and event.to_state == N.BUILDING:
            bucket.launches += 1
        elif event.to_state == N.FAILED:
            bucket.failures += 1

    def _measure(self, event: HistoryEvent, before: _Seen | None) -> None:
        """Prometheus/statsd observations for one new event."""
        where = self._nodes.get(event.node_id) or before
        label = where.label if where else (event.label or "")
        provider = where.provider if where else (event.provider or "")
        since = before.since if before else None
        old, new = event.from_state, event.to_state
        if old is None and new == N.BUILDING:
            metrics.launched(provider, label)
        elif old == N.BUILDING and new == N.TESTING and since is not None:
            metrics.launch_done(provider, label, event.at - since)
        elif old == N.TESTING and new in (N.READY, N.FAILED) and since is not None:
            metrics.test_done(provider, label, event.at - since)
        elif old == N.DELETING and new is None and since is not None:
            metrics.delete_done(provider, event.at - since)
        if new == N.FAILED:
            cause = "vanished" if "vanished" in event.reason else _FAILED_FROM.get(old, "other")
            metrics.failure(cause)
        elif old == N.DELETING and new == N.DELETING:
            metrics.failure("delete")

    def _chart_request(self, request: RequestOutcome) -> None:
        if request.state != RequestState.FULFILLED or request.fulfilled_at is None:
            return
        bucket = self._bucket_for(request.fulfilled_at)
        if bucket is not None:
            bucket.waits.append(request.fulfilled_at - request.created_at)

    def _first_request_since(self, since: float) -> int:
        pending = self.store.pending_requests()
        recent = [r.id for r in self.store.list_requests(limit=5000) if r.created_at >= since]
        candidates = [r.id for r in pending] + recent
        return min(candidates) if candidates else self.store.last_request_id() + 1

    def _scan_requests(self, count_since: float = 0.0) -> None:
        """Chart (and count) requests finished since the last look.

        Reads the requests that are new since the last look and those it saw pending
        that are not any more: one request waiting an hour does not make every look
        re-read the hour's requests.
        """
        rows = self.store.request_outcomes(self._next_request, self._open)
        for request in rows:
            self._next_request = max(self._next_request, request.id + 1)
            if request.state == RequestState.PENDING:
                self._open.add(request.id)
                continue
            self._open.discard(request.id)
            self._chart_request(request)
            if request.state_at < count_since:
                continue
            wait = (
                request.fulfilled_at - request.created_at
                if request.state == RequestState.FULFILLED and request.fulfilled_at
                else None
            )
            metrics.request_done(request.tenant, request.state, wait)
            if request.state == RequestState.FAILED:
                metrics.failure("deadline")
