"""The metrics controller: after launcher passes, at most ten times a second, the
observer reads the store's new history; at most once a second what it saw is
published for the API."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, generate_latest

from freshpool import metrics
from freshpool.config import Config
from freshpool.launcher.observer import Observer
from freshpool.observed import PUBLISHED, Observed, publish
from freshpool.store import Store

# Metrics a tenth of a second late cost nobody anything; under a stream of
# hand-outs the launcher passes far more often than that. The observer looks that
# often because a node's label is known only while its row exists.
OBSERVE_EVERY = 0.1
# Writing the metrics out costs the same however little changed, and a scrape or a
# dashboard chart a second behind loses nothing.
PUBLISH_EVERY = 1.0


class PublishingController:
    name = "metrics"

    def __init__(self, config: Config, store: Store) -> None:
        self.path = config.state_dir / PUBLISHED
        self.statsd = config.statsd
        self.observer = Observer(store)
        self._next = 0.0
        self._next_publish = 0.0
        self._unpublished = False

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
        self._unpublished = True
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_EVERY
            self._unpublished = False
            publish(self.path, Observed(generate_latest(REGISTRY), self.observer.history()))

    def due(self) -> float:
        # It follows the passes, and wakes the launcher only to publish a last look.
        return self._next_publish if self._unpublished else float("inf")

    def stop(self, deadline: float) -> None:
        metrics.use_statsd(None)
