"""`python -m bench demand`: a week of CI demand replayed against fixed min-ready values
and `min-ready: auto`, in simulated time, with the launcher's own forecast and target
code (freshpool.core.demand).

What it models, at the level of the launcher and the scheduler: per label, ready
nodes, launches in flight and waiting requests. Each pass (every `tick` simulated
seconds; the launcher's is `interval`, 1 s by default) launches what the label
misses, as launcher/launches.py does: its target plus what waits, less what is
ready or launching, within the pool's node cap. A launch takes a log-normal time
(boot and test); a request is handed the oldest ready node at once, else waits for
the next node to come up; a job holds its node for the trace's duration, then the
node is deleted, which takes `delete_time`. For auto, each pass runs the demand
controller's rule on the arrivals so far (simulated clock), and ready nodes past a
lowered target are deleted, as launcher/sizing.py does. It does not model launch
failures, rate limits, the hand-out's milliseconds, or several labels sharing one
provider's quota beyond the common cap.

Run alone with your own trace: python -m bench.demand --trace FILE.csv
(rows `time,label[,duration]`; see bench/trace.py).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import percentile
from bench.trace import DAY, Request, TraceShape, generate, read
from freshpool.core import demand

FIXED = (0, 5, 20, 50)
AUTO = demand.Policy(min=0, max=100, target_wait=1.0, service_level=0.95)
WEEK = 7 * DAY


@dataclass(frozen=True)
class PoolModel:
    launch_median: float = 45.0
    launch_sigma: float = 0.25
    delete_time: float = 15.0
    # The most nodes the pool may run at once, every label together.
    max_nodes: int = 400
    tick: float = 5.0
    seed: int = 1
    # min-ready: {auto: {...}} for every label.
    auto: demand.Policy = AUTO


@dataclass
class _Label:
    target: int
    ready: deque[tuple[float, float]] = field(default_factory=deque)  # (created, ready_at)
    launching: int = 0
    waiting: deque[tuple[float, float]] = field(default_factory=deque)  # (arrived, duration)
    arrivals: list[float] = field(default_factory=list)
    launches: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    peak: demand.Peak | None = None
    season: tuple[float, demand.Season | None] = (-math.inf, None)


@dataclass
class Outcome:
    waits: list[float] = field(default_factory=list)
    node_s: float = 0.0
    ready_s: float = 0.0
    hand_outs: int = 0
    target_changes: int = 0

    def figures(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_idle_node_h": round(self.ready_s / 3600, 1),
            f"{prefix}_p50_wait_s": round(percentile(self.waits, 50), 2),
            f"{prefix}_p95_wait_s": round(percentile(self.waits, 95), 2),
            f"{prefix}_p99_wait_s": round(percentile(self.waits, 99), 2),
            f"{prefix}_node_h_per_handout": round(self.node_s / 3600 / max(self.hand_outs, 1), 3),
        }


class Replay:
    """One policy (a fixed min-ready, or None for auto) over one trace."""

    def __init__(self, trace: list[Request], model: PoolModel, fixed: int | None, since: float):
        self.model, self.fixed, self.since = model, fixed, since
        self.start, self.end = trace[0].at, trace[-1].at
        self.rng = random.Random(model.seed)
        names = sorted({r.label for r in trace})
        first = fixed if fixed is not None else model.auto.min
        self.labels = {name: _Label(first) for name in names}
        self.alive = 0
        self.out = Outcome()
        self.events: list[tuple[float, int, str, str, float]] = []
        self.seq = 0
        for request in trace:
            self._at(request.at, "arrive", request.label, request.duration)
        if fixed is None:
            self._at(self.start, "tick", "", 0.0)

    def _at(self, at: float, kind: str, label: str, value: float) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, label, value))

    def _span(self, begin: float, end: float) -> float:
        """The part of [begin, end) inside the measured window."""
        return max(0.0, min(end, self.end) - max(begin, self.since))

    def run(self) -> Outcome:
        # The pool was filled to its first target before the trace began.
        for name, label in self.labels.items():
            self._reconcile(label, name, self.start - 10 * self.model.launch_median)
        while self.events:
            at, _, kind, name, value = heapq.heappop(self.events)
            # Past the end only to serve what still waits (node time stops at the end).
            if at > self.end and not any(x.waiting for x in self.labels.values()):
                break
            if kind == "tick":
                self._tick(at)
                continue
            if kind == "gone":
                self.alive -= 1
                self.out.node_s += self._span(value, at)
                continue
            label = self.labels[name]
            if kind == "arrive":
                self._arrive(label, at, value)
            else:
                self._ready(label, name, at, value)
            self._reconcile(label, name, at)
        self._close()
        return self.out

    def _close(self) -> None:
        # Nodes still there at the end count up to the end.
        for _at, _, kind, _name, value in self.events:
            if kind in ("gone", "ready"):
                self.out.node_s += self._span(value, self.end)
        for label in self.labels.values():
            for created, ready_at in label.ready:
                self.out.node_s += self._span(created, self.end)
                self.out.ready_s += self._span(ready_at, self.end)

    def _hand_out(self, at: float, arrived: float, duration: float, created: float) -> None:
        if arrived >= self.since:
            self.out.waits.append(at - arrived)
            self.out.hand_outs += 1
        # The job runs, then the node is deleted; it is paid for until gone.
        self._at(at + duration + self.model.delete_time, "gone", "", created)

    def _arrive(self, label: _Label, at: float, duration: float) -> None:
        label.arrivals.append(at)
        if label.ready:
            created, ready_at = label.ready.popleft()
            self.out.ready_s += self._span(ready_at, at)
            self._hand_out(at, at, duration, created)
        else:
            label.waiting.append((at, duration))

    def _ready(self, label: _Label, name: str, at: float, created: float) -> None:
        label.launching -= 1
        label.launches.append(at - created)
        if label.waiting:
            arrived, duration = label.waiting.popleft()
            self._hand_out(at, arrived, duration, created)
        else:
            label.ready.append((created, at))

    def _reconcile(self, label: _Label, name: str, at: float) -> None:
        supply = label.launching + len(label.ready)
        missing = label.target + len(label.waiting) - supply
        room = self.model.max_nodes - self.alive
        for _ in range(max(0, min(missing, room))):
            took = self.model.launch_median * math.exp(self.rng.gauss(0, self.model.launch_sigma))
            label.launching += 1
            self.alive += 1
            self._at(at + took, "ready", name, at)
        excess = supply - label.target - len(label.waiting)
        while excess > 0 and label.ready:
            created, ready_at = label.ready.popleft()
            self.out.ready_s += self._span(ready_at, at)
            self._at(at + self.model.delete_time, "gone", "", created)
            excess -= 1

    def _tick(self, at: float) -> None:
        policy = self.model.auto
        for name, label in self.labels.items():
            launch = demand.launch_time(list(label.launches), 90.0)
            made, seen = label.season
            if at - made >= demand.SEASON_REFRESH:
                lead = demand.lead_time(policy, launch)
                seen = demand.season(label.arrivals, at, self.start, lead)
                label.season = (at, seen)
            decision = demand.decide_with(
                policy, seen, label.arrivals, at, self.start, launch, label.peak
            )
            label.peak = decision.peak
            if decision.target != label.target:
                label.target = decision.target
                if at >= self.since:
                    self.out.target_changes += 1
            self._reconcile(label, name, at)
        self._at(at + self.model.tick, "tick", "", 0.0)


def compare(trace: list[Request], model: PoolModel, since: float) -> dict[str, float]:
    """Every fixed value and auto over `trace`, measured from `since`."""
    figures: dict[str, float] = {}
    fixed: dict[int, Outcome] = {}
    for value in FIXED:
        fixed[value] = Replay(trace, model, value, since).run()
        figures.update(fixed[value].figures(f"demand_fixed{value}"))
    auto = Replay(trace, model, None, since).run()
    figures.update(auto.figures("demand_auto"))
    figures["demand_auto_target_changes"] = auto.target_changes
    # The best fixed value: the lowest p95 wait, then the fewest idle node-hours.
    best = min(FIXED, key=lambda v: (percentile(fixed[v].waits, 95), fixed[v].ready_s))
    figures["demand_best_fixed"] = best
    best_p95 = percentile(fixed[best].waits, 95)
    figures["demand_auto_p95_over_best_s"] = round(percentile(auto.waits, 95) - best_p95, 2)
    saving = 1 - auto.ready_s / fixed[best].ready_s if fixed[best].ready_s else 0.0
    figures["demand_auto_idle_saving_pct"] = round(100 * saving, 1)
    figures["demand_requests"] = len(auto.waits)
    return figures


def run(_root: Path | None = None, trace: Path | None = None, weeks: int = 3) -> dict[str, float]:
    """The generated trace (TraceShape's defaults), or the operator's `trace` file;
    the last week is measured, the rest is history (all of a trace of a week or less)."""
    requests = read(trace) if trace else generate(TraceShape(weeks=weeks))
    end = requests[-1].at
    since = end - WEEK if end - requests[0].at > WEEK + DAY else requests[0].at
    figures = compare(requests, PoolModel(), since)
    print_table(figures)
    return figures


def print_table(figures: dict[str, float]) -> None:
    print(
        f"{'policy':<10}{'idle node-h':>12}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'node-h/job':>11}"
    )
    for policy in [f"fixed{v}" for v in FIXED] + ["auto"]:
        key = f"demand_{policy}"
        print(
            f"{policy:<10}{figures[key + '_idle_node_h']:>12}{figures[key + '_p50_wait_s']:>8}"
            f"{figures[key + '_p95_wait_s']:>8}{figures[key + '_p99_wait_s']:>8}"
            f"{figures[key + '_node_h_per_handout']:>11}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.demand", description=__doc__)
    parser.add_argument("--trace", type=Path, help="CSV of time,label[,duration] rows")
    parser.add_argument("--weeks", type=int, default=3, help="weeks to generate (no --trace)")
    args = parser.parse_args()
    run(None, args.trace, args.weeks)


if __name__ == "__main__":
    main()
