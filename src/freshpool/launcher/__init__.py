"""`serve`'s main process: a runner (runner.py) passing over controllers, each with its
own error boundary: leases (which providers are this launcher's, on PostgreSQL),
demand (auto warm-pool targets), nodes (launch, test, delete), upkeep (timeouts,
health checks, request deadlines), leaks, images (builds, validation, uploads,
garbage) and metrics. `build` puts them together."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from freshpool.config import Config
from freshpool.core.backoff import DRIVER, Backoff
from freshpool.drivers.base import Driver
from freshpool.launcher.context import Shared
from freshpool.launcher.fleet import LeaseController
from freshpool.launcher.gate import ProviderGate
from freshpool.launcher.images import ImageController
from freshpool.launcher.leaks import LeakController
from freshpool.launcher.nodes import NodeController
from freshpool.launcher.publishing import PublishingController
from freshpool.launcher.runner import Controller, Runner
from freshpool.launcher.sizing import DemandController
from freshpool.launcher.upkeep import UpkeepController
from freshpool.store import Store


class Launcher(Runner):
    """The runner with serve's controllers, and handles on what they share."""

    def __init__(self, shared: Shared, after_pass: Sequence[Callable[[], None]] = ()) -> None:
        self.shared = shared
        self.nodes = NodeController(shared)
        self.leaks = LeakController(shared)
        self.demand = DemandController(shared)
        self.images: ImageController | None = None
        self.leases: LeaseController | None = None
        controllers: list[Controller] = []
        if shared.leased:
            # First: the other controllers start on the providers it took; and last
            # to stop, so its leases go only once launches are finished or undone.
            self.leases = LeaseController(shared, self._took, self._dropped)
            controllers.append(self.leases)
        # Recovery (the leak controller's start) comes before any launch.
        controllers += [
            self.leaks,
            self.demand,
            self.nodes,
            UpkeepController(shared, self.nodes.failures.outcome),
        ]
        super().__init__(shared.store, controllers, shared.config.interval, after_pass)

    def _took(self, provider: str) -> None:
        """A provider taken over after the start: recover it as a start would."""
        if self.leaks.name in self.started:
            self.leaks.recover(provider)
        if self.nodes.name in self.started:
            self.nodes.recover(provider)

    def _dropped(self, provider: str) -> None:
        self.leaks.forget(provider)

    @property
    def config(self) -> Config:
        return self.shared.config

    @property
    def drivers(self) -> Mapping[str, Driver]:
        return self.shared.drivers

    @property
    def gates(self) -> dict[str, ProviderGate]:
        return self.shared.gates

    def busy(self) -> bool:
        """Whether any driver operation is still in flight."""
        return bool(len(self.shared.work) or self.leaks.deleting)


def build(
    config: Config,
    store: Store,
    drivers: Mapping[str, Driver],
    *,
    images: bool = True,
    automatic_builds: bool = True,
    base_cache: Path | None = None,
    publish: bool = True,
    after_pass: Sequence[Callable[[], None]] = (),
    retry: Backoff = DRIVER,
) -> Launcher:
    """A launcher for `drivers`: nodes, upkeep and leaks always; the image controller
    and the metrics publisher unless turned off (tests that only move nodes)."""
    shared = Shared(config, store, dict(drivers), retry=retry, leased=store.shared_by_launchers)
    launcher = Launcher(shared, after_pass)
    if images:
        launcher.images = ImageController(
            launcher.shared, automatic=automatic_builds, base_cache=base_cache, wake=launcher.wake
        )
        launcher.controllers.append(launcher.images)
    if publish:
        launcher.controllers.append(PublishingController(config, store))
    return launcher


__all__ = ["Launcher", "Runner", "build"]
