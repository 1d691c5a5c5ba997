"""What the launcher's controllers share: config, store, drivers (those of the
providers this launcher drives now), provider gates, the operations in flight, and
the one way a node is failed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from freshpool.config import Config, Label, NodeLimits, Provider
from freshpool.core.backoff import DRIVER, Backoff
from freshpool.core.errors import StaleState
from freshpool.core.states import NODE_TRANSITIONS, NodeState
from freshpool.drivers.base import Driver, Instance, NodeSpec
from freshpool.launcher.gate import ProviderGate
from freshpool.launcher.work import WorkTable
from freshpool.store import BuildRow, NodeRow, Store

log = logging.getLogger("freshpool.launcher")
N = NodeState


@dataclass
class Shared:
    config: Config
    store: Store
    # Given: every configured provider's driver. After __post_init__: those of the
    # providers this launcher drives now, one dict changed in place as leases come
    # and go (controllers keep a reference to it); `configured` keeps them all.
    drivers: dict[str, Driver]
    work: WorkTable = field(default_factory=WorkTable)
    # How long a failed delete waits before its next try.
    retry: Backoff = DRIVER
    # False on SQLite, where this launcher drives every provider and no leases exist.
    leased: bool = False
    configured: dict[str, Driver] = field(init=False)
    # Held providers being handed to another launcher: nothing new starts on them.
    draining: set[str] = field(default_factory=set, init=False)
    gates: dict[str, ProviderGate] = field(init=False)
    providers: dict[str, Provider] = field(init=False)
    labels: dict[str, Label] = field(init=False)
    # `min-ready: auto` labels' current targets (the demand controller's); others
    # keep their fixed min-ready.
    ready_targets: dict[str, int] = field(default_factory=dict, init=False)
    _warned: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.configured = dict(self.drivers)
        self.drivers = {} if self.leased else dict(self.drivers)
        self.providers = {p.name: p for p in self.config.providers}
        self.labels = {x.name: x for x in self.config.labels}
        self.gates = {
            p.name: ProviderGate(p) for p in self.config.providers if p.name in self.configured
        }

    def drives(self, provider: str) -> bool:
        """Whether this launcher is to act on `provider`'s nodes now. Without leases,
        every node is ours, even one whose provider left the config (its deletes then
        wait for it, saying why)."""
        return not self.leased or provider in self.drivers

    def fail(
        self, node_id: int, expect: NodeState, reason: str, values: dict[str, Any] | None = None
    ) -> None:
        """Quarantine a node as failed (a held one goes straight to deleting: the state
        table says so); if it moved meanwhile, keep what we learnt of its instance."""
        target = N.FAILED if N.FAILED in NODE_TRANSITIONS[expect] else N.DELETING
        try:
            self.store.transition(node_id, expect, target, reason, **(values or {}))
            log.warning("node %s: %s: %s", node_id, target, reason)
        except StaleState:
            if values:
                self.store.set_instance(node_id, values["external_id"], values["access"])

    def ready_target(self, label: Label) -> int:
        """The ready nodes the label should have: its auto target, else min-ready."""
        return self.ready_targets.get(label.name, label.ready_floor)

    def warn_once(self, key: str, message: str, every: float = 60.0) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -every) >= every:
            self._warned[key] = now
            log.warning("%s", message)


def instance_values(instance: Instance) -> dict[str, Any]:
    """What a node row records of its instance."""
    return {
        "external_id": instance.external_id,
        "access": instance.access.as_dict() if instance.access else None,
    }


def node_spec(
    store: Store,
    row: NodeRow,
    build: BuildRow,
    user: str,
    image_external_id: str | None,
    limits: NodeLimits,
) -> NodeSpec:
    """What a driver needs to make the node `row` from `build`."""
    return NodeSpec(
        node_id=row.id,
        cluster=store.cluster_id,
        label=row.label,
        hostname=row.hostname,
        build_id=build.id,
        layers=build.layer_paths(),
        user=user,
        image_external_id=image_external_id,
        limits=limits,
    )
