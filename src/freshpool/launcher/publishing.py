"""The metrics controller: after launcher passes, at most ten times a second, the
observer reads the store's new history and what it saw is published for the API."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, generate_latest

from freshpool import metrics
from freshpool.config import Config
from freshpool.launcher.observer import Observer
from freshpool.observed import PUBLISHED, Observed, publish
from freshpool.store import Store

# Metrics a tenth of a second late cost nobody anything; under a stream of
# hand-outs the launcher passes far more often than that.
OBSERVE_EVERY = 0.1


class PublishingController:
    name = "metrics"

    def __init__(self, config: Config, store: Store) -> None:
        self.path = config.state_dir / PUBLISHED
        self.statsd = config.statsd
        self.observer = Observer(store)
        self._next = 0.0

    def start(self) -> None:
        # A previous run's figures are not this run's.
        self.path.unlink(missing_ok=True)
        metrics.use_statsd(self.statsd)

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + OBSERVE_EVERY
        self.observer.tick()
        publish(self.path, Observed(generate_latest(REGISTRY), self.observer.history()))

    def due(self) -> float:
        return float("inf")  # it follows the passes; it wakes nobody

    def stop(self, deadline: float) -> None:
        metrics.use_statsd(None)
