"""Upkeep of the nodes that exist: every state's timeout enforced, ready nodes
health-checked now and then, requests failed at their deadline, and labels the
config no longer has drained."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable

from freshpool.core import timeouts
from freshpool.core.errors import StaleState
from freshpool.core.states import NodeState
from freshpool.drivers.base import SshAccess
from freshpool.launcher.context import Shared
from freshpool.launcher.work import Kind, Work

log = logging.getLogger("freshpool.launcher")
N = NodeState
# Told (provider, label, ok) when a launch is given up on.
LaunchOutcome = Callable[[str, str, bool], None]


class UpkeepController:
    name = "upkeep"

    def __init__(self, shared: Shared, failed_launch: LaunchOutcome | None = None) -> None:
        self.shared = shared
        self.failed_launch = failed_launch
        config = shared.config
        # Only rows in a state for longer than its shortest limit anywhere can be overdue.
        self._shortest = timeouts.shortest(list(config.labels), list(config.providers))
        # Timeouts and health checks need second-scale precision, not every pass.
        self._next = 0.0

    def start(self) -> None:
        return None

    def due(self) -> float:
        return self._next

    def stop(self, deadline: float) -> None:
        return None

    def tick(self) -> None:
        self._expire_requests()
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.shared.config.interval
        self._enforce_timeouts()
        self._health_checks()
        self._drain_removed_labels()

    def _expire_requests(self) -> None:
        reason = "deadline passed before nodes were ready"
        config = self.shared.config
        self.shared.store.fail_overdue(time.time(), config.request_timeout, reason)

    def _enforce_timeouts(self) -> None:
        """Move on every node that stayed too long in its state (core/timeouts.py)."""
        now = time.time()
        store, work = self.shared.store, self.shared.work
        cutoffs = {str(state): now - limit for state, limit in self._shortest.items()}
        for row in store.in_state_since_before(cutoffs):
            provider = self.shared.providers.get(row.provider)
            label = self.shared.labels.get(row.label)
            if provider is None or label is None or not self.shared.drives(row.provider):
                continue
            due = timeouts.overdue(N(row.state), now - row.state_at, label, provider)
            if due is None:
                continue
            # Give up on an operation that never finished; the delete cleans up after it.
            given_up = work.pop(row.id)
            launching = given_up is not None and given_up.kind in (Kind.CREATE, Kind.TEST)
            if launching and given_up is not None and self.failed_launch is not None:
                self.failed_launch(given_up.provider, given_up.label, False)
            with contextlib.suppress(StaleState):
                store.transition(row.id, N(row.state), due.target, due.reason)
                log.warning("node %s: %s", row.id, due.reason)

    def _drain_removed_labels(self) -> None:
        """A label taken out of the config (a reload): its ready nodes are deleted and
        requests still waiting for it fail; nodes in use finish their jobs first."""
        store, labels = self.shared.store, self.shared.labels
        for row in store.nodes(["ready"], labels_not_in=list(labels)):
            if row.id not in self.shared.work and self.shared.drives(row.provider):
                with contextlib.suppress(StaleState):
                    why = f"label {row.label!r} is no longer in the config"
                    store.transition(row.id, N.READY, N.DELETING, why)
                    log.info("node %s: %s: deleting", row.id, why)
        for stored in store.pending_label_sets():
            gone = sorted(set(json.loads(stored)) - set(labels))
            if gone:
                why = f"label {', '.join(gone)} is no longer in the config"
                store.fail_pending_asking(stored, why)

    def _health_checks(self) -> None:
        """Re-test ready nodes now and then; a failing one is replaced before a job gets it."""
        now = time.time()
        for label in self.shared.config.labels:
            if label.health_interval <= 0:
                continue
            for row in self.shared.store.due_for_check(label.name, now - label.health_interval):
                driver = self.shared.drivers.get(row.provider)
                if row.id in self.shared.work or driver is None or row.external_id is None:
                    continue
                access = SshAccess(**row.access) if row.access else None
                check = driver.run_command(
                    row.external_id, access, label.ready_command, label.test_timeout
                )
                check.advance()
                self.shared.work.add(Work(row.id, row.provider, row.label, Kind.CHECK, check))
