"""The leak controller: on start, reconciles the store with what the providers run;
then every cleanup-interval, deletes leaked instances and replaces vanished nodes."""

from __future__ import annotations

import contextlib
import logging
import time

from freshpool import metrics
from freshpool.core.errors import StaleState
from freshpool.core.states import NodeState
from freshpool.drivers.base import Driver, DriverError, Instance, Operation
from freshpool.launcher.context import Shared
from freshpool.launcher.sweep import LeakSweeper
from freshpool.store import NodeRow

log = logging.getLogger("freshpool.launcher")
N = NodeState


class LeakController:
    name = "leaks"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.sweeper = LeakSweeper()
        self.found = 0
        self._next_sweep = 0.0
        # Deletes of instances that have no row, by (provider, external id).
        self._strays: dict[tuple[str, str], Operation[None]] = {}
        # Providers recovered since this launcher began to drive them.
        self._recovered: set[str] = set()

    def start(self) -> None:
        for name in list(self.shared.drivers):
            self.recover(name)

    def recover(self, name: str) -> None:
        """After a start or a takeover of provider `name`: adopt its known live nodes,
        fail its cut-off launches, delete its strays. Once per holding of it."""
        if name in self._recovered:
            return
        driver = self.shared.drivers[name]
        listed: dict[int, Instance] | None = None
        try:
            listed = {i.tags.node_id: i for i in driver.list_instances() if i.tags}
        except DriverError as exc:  # a cloud down at start: the sweep looks later
            log.warning("provider %s: listing at start failed: %s", name, exc)
            self.shared.gates[name].failure(f"list: {exc}")
        rows = {row.id: row for row in self.shared.store.nodes(provider=name)}
        for row in rows.values():
            self._adopt(row, listed)
        for node_id, instance in (listed or {}).items():
            if node_id not in rows:
                log.warning(
                    "provider %s: stray instance %s (node %s has no row): deleting",
                    name,
                    instance.external_id,
                    node_id,
                )
                self._delete_stray(name, instance.external_id)
        self._recovered.add(name)

    def _adopt(self, row: NodeRow, listed: dict[int, Instance] | None) -> None:
        """One node as the previous launcher left it: a launch it had in flight is
        failed (and so deleted); a live node is kept; a vanished one is failed."""
        if row.id in self.shared.work:
            return
        if row.state in (N.BUILDING, N.TESTING):
            self.shared.fail(
                row.id, N(row.state), f"launcher restarted while the node was {row.state}"
            )
        elif row.state in (N.READY, N.IN_USE, N.HOLD) and listed is not None:
            instance = listed.get(row.id)
            if instance is None or not instance.alive:
                self.shared.fail(
                    row.id, N(row.state), "instance vanished while the launcher was down"
                )
            else:
                log.info("node %s: adopted (%s)", row.id, row.state)

    def forget(self, name: str) -> None:
        """Provider `name` is no longer ours: drop its stray deletes (the next owner
        finds the strays again) and recover it afresh if it comes back."""
        self._recovered.discard(name)
        for key in [k for k in self._strays if k[0] == name]:
            del self._strays[key]

    def tick(self) -> None:
        self._advance()
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.shared.config.cleanup_interval
            self.sweep()

    def due(self) -> float:
        ops = self._strays.values()
        return min([self._next_sweep, *(op.not_before for op in ops)])

    def stop(self, deadline: float) -> None:
        while self._strays and time.monotonic() < deadline:
            self._advance()
            time.sleep(0.01)

    @property
    def deleting(self) -> int:
        """Stray instances whose delete is still in flight."""
        return len(self._strays)

    def sweep(self) -> None:
        """Delete leaked instances, replace vanished nodes, confirm gone deletes."""
        busy = self.shared.work.busy()
        for name, driver in self.shared.drivers.items():
            try:
                instances = driver.list_instances()
            except Exception as exc:  # one provider's failure must not stop the others
                log.warning("provider %s: listing instances failed: %s", name, exc)
                self.shared.gates[name].failure(f"list: {exc}")
                continue
            self._reconcile(name, driver)
            rows = self.shared.store.nodes(provider=name)
            result = self.sweeper.sweep(name, instances, rows, busy)
            for instance in result.leaked:
                if (name, instance.external_id) in self._strays:
                    continue
                log.warning(
                    "provider %s: leaked instance %s (no node row, seen twice): deleting",
                    name,
                    instance.external_id,
                )
                self.found += 1
                metrics.leaked()
                self._delete_stray(name, instance.external_id)
            for row in result.vanished:
                self.shared.fail(row.id, N(row.state), "instance vanished at the provider")
            for row in result.gone:
                with contextlib.suppress(StaleState):
                    self.shared.store.remove_node(
                        row.id, "instance no longer listed by the provider"
                    )

    def _reconcile(self, name: str, driver: Driver) -> None:
        """Repair the provider's rules; its node sets in use are the ones the store has."""

        def node_sets() -> list[list[str]]:
            sets: dict[int, list[str]] = {}
            for row in self.shared.store.nodes(provider=name):
                if row.state in (N.IN_USE, N.HOLD) and row.request_id and row.external_id:
                    sets.setdefault(row.request_id, []).append(row.external_id)
            return [members for members in sets.values() if len(members) > 1]

        try:
            driver.reconcile(node_sets)
        except Exception as exc:  # the sweep goes on; the next one tries again
            log.warning("provider %s: repairing its network rules failed: %s", name, exc)

    def _delete_stray(self, provider: str, external_id: str) -> None:
        if provider not in self.shared.drivers:
            return
        op = self.shared.drivers[provider].delete(external_id)
        op.advance()
        self._strays[(provider, external_id)] = op

    def _advance(self) -> None:
        now = time.monotonic()
        for (provider, external_id), op in list(self._strays.items()):
            if now >= op.not_before:
                op.advance()
            if not op.done:
                continue
            del self._strays[(provider, external_id)]
            if op.error:
                log.warning("stray %s on %s: delete failed: %s", external_id, provider, op.error)
            else:
                log.info("stray %s on %s: deleted", external_id, provider)
