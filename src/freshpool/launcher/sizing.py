"""The demand controller: each `min-ready: auto` label's warm-pool target, chosen by
core/demand.py from the store's request history, recorded when it changes, and
ready nodes past a lowered target deleted.

It only reads and writes the store; the node controller launches to the target it
leaves in `Shared.ready_targets` (it runs first in each pass, so a burst's higher
target is launched for in the same pass)."""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from freshpool import metrics
from freshpool.config import Label
from freshpool.core import demand
from freshpool.core.errors import StaleState
from freshpool.core.states import NODE_SUPPLY_STATES, NodeState
from freshpool.launcher.context import Shared

log = logging.getLogger("freshpool.launcher")
N = NodeState
# History kept in memory: the seasonal forecast's days and one more.
KEEP = (demand.SEASON_DAYS + 1) * demand.DAY
# Launch times are read again this often (seconds).
LAUNCH_REFRESH = 60.0


class DemandController:
    name = "demand"

    def __init__(self, shared: Shared, clock: Callable[[], float] = time.time) -> None:
        self.shared = shared
        self.clock = clock
        self._arrivals: dict[str, list[float]] = {}
        self._cursor = 0
        self._first_seen = 0.0
        self._peaks: dict[str, demand.Peak] = {}
        self._launch: dict[str, float] = {}
        self._launch_read = -LAUNCH_REFRESH
        self._seasons: dict[str, tuple[float, demand.Season | None]] = {}
        self._next = 0.0
        self.decisions: dict[str, demand.Decision] = {}

    def _auto_labels(self) -> list[Label]:
        return [label for label in self.shared.config.labels if label.auto is not None]

    def start(self) -> None:
        labels = self._auto_labels()
        if not labels:
            return
        now = self.clock()
        store = self.shared.store
        self._first_seen = store.first_request_at() or now
        self._arrivals = {label.name: [] for label in labels}
        self._read_arrivals(now - KEEP)
        for name, row in store.latest_targets().items():
            if name in self._arrivals:
                # Go on from where the last run was, decaying from its target.
                self._peaks[name] = demand.Peak(row.target, row.at)
                self.shared.ready_targets[name] = row.target

    def due(self) -> float:
        return self._next if self._arrivals else float("inf")

    def stop(self, deadline: float) -> None:
        return None

    def tick(self) -> None:
        if not self._arrivals or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.shared.config.interval
        now = self.clock()
        self._read_arrivals(now - KEEP)
        if now - self._launch_read >= LAUNCH_REFRESH:
            self._launch_read = now
            self._launch = {n: self._launch_time(self.shared.labels[n]) for n in self._arrivals}
        for label in self._auto_labels():
            self._decide(label, now)
        self._trim()

    def _read_arrivals(self, since: float) -> None:
        while True:
            batch = self.shared.store.arrivals(self._cursor, since)
            for arrival in batch:
                for name in arrival.labels:
                    times = self._arrivals.get(name)
                    if times is not None:
                        bisect.insort(times, arrival.at)
            if not batch:
                break
            self._cursor = batch[-1].id
        for times in self._arrivals.values():
            del times[: bisect.bisect_left(times, since)]

    def _launch_time(self, label: Label) -> float:
        # Until the label has launched, assume the slowest its providers allow.
        providers = self.shared.config.providers_for(label.name)
        fallback = max((p.boot_timeout for p in providers), default=60.0) + label.test_timeout
        return demand.launch_time(self.shared.store.launch_times(label.name), fallback)

    def _policy(self, label: Label) -> demand.Policy:
        auto = label.auto
        assert auto is not None
        cap = 0
        for provider in self.shared.config.providers_for(label.name):
            total = self.shared.config.total_cap(provider)
            cap += provider.max_nodes if total is None else min(provider.max_nodes, total)
        return demand.Policy(auto.min, auto.max, auto.target_wait, auto.service_level, cap)

    def _decide(self, label: Label, now: float) -> None:
        name, policy, launch = label.name, self._policy(label), self._launch[label.name]
        arrivals = self._arrivals[name]
        made, seen = self._seasons.get(name, (-demand.SEASON_REFRESH, None))
        if now - made >= demand.SEASON_REFRESH:
            lead = demand.lead_time(policy, launch)
            seen = demand.season(arrivals, now, self._first_seen, lead)
            self._seasons[name] = (now, seen)
        decision = demand.decide_with(
            policy, seen, arrivals, now, self._first_seen, launch, self._peaks.get(name)
        )
        self._peaks[name] = decision.peak
        self.decisions[name] = decision
        previous = self.shared.ready_targets.get(name)
        if previous == decision.target:
            return
        self.shared.ready_targets[name] = decision.target
        metrics.ready_target(name, decision.target)
        why = f"{decision.why}; {decision.forecast.describe()}"
        self.shared.store.record_target(
            name, now, decision.target, previous, decision.forecast.rate, decision.launch_time, why
        )
        log.info("label %s: warm pool target %s -> %d: %s", name, previous, decision.target, why)

    def _trim(self) -> None:
        """Delete the ready nodes past a label's target and what waits for it, oldest
        first: a lowered target must cost less, not just launch less."""
        store = self.shared.store
        supply: Counter[str] = Counter()
        for (_provider, label, state), n in store.node_counts().items():
            if state in NODE_SUPPLY_STATES:
                supply[label] += n
        waiting = store.pending_demand()
        for name in self._arrivals:
            target = self.shared.ready_targets.get(name)
            if target is None:
                continue
            excess = supply[name] - target - waiting.get(name, 0)
            if excess <= 0:
                continue
            ready = [n for n in store.nodes(["ready"]) if n.label == name]
            for row in sorted(ready, key=lambda r: r.ready_at or r.state_at)[:excess]:
                if row.id in self.shared.work:
                    continue
                with contextlib.suppress(StaleState):
                    why = f"warm pool target lowered to {target}"
                    store.transition(row.id, N.READY, N.DELETING, why)
                    log.info("node %s: %s: deleting", row.id, why)
