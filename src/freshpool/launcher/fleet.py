"""The lease controller: with several launchers on one database, this launcher's
share of the providers. Each pass it says it is alive, renews the leases it holds,
works out (core/fleet.py) which providers it should drive among the live
launchers, takes those that are free or whose owner died, and hands back, once
their operations have finished, those that now fall to another launcher.

A provider taken is recovered first (its live nodes adopted, its cut-off launches
failed, its strays deleted); a provider lost is dropped at once: its operations
are abandoned, and the fence (store/fencing.py) refuses any write still on its way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from freshpool.core.fleet import FORGET_TTLS, assign
from freshpool.launcher.context import Shared
from freshpool.store import Fencing

log = logging.getLogger("freshpool.launcher")

# Passes per lease TTL: the lease is renewed, and a dead owner's providers looked
# for, this many times within one TTL, so a takeover comes within about one TTL of
# the owner's last renewal.
PASSES_PER_TTL = 10
# A provider being handed over is released after this many TTLs even if operations
# on it are still unfinished (the next owner undoes them, as after a crash).
DRAIN_TTLS = 2.0


class LeaseController:
    name = "leases"

    def __init__(
        self,
        shared: Shared,
        on_take: Callable[[str], None],
        on_drop: Callable[[str], None],
    ) -> None:
        self.shared = shared
        self.me = shared.config.launcher_name
        self.ttl = shared.config.lease_ttl
        self.may_drive = sorted(shared.config.serve_providers or shared.configured)
        self.fencing = Fencing(self.me)
        shared.store.fencing = self.fencing
        self._on_take = on_take
        self._on_drop = on_drop
        # Providers being handed over, and when they are released regardless.
        self._draining: dict[str, float] = {}
        self._next = 0.0
        # Whether a stop is a config reload's: the next run, in this process, takes
        # the leases straight back, so they are kept rather than let go.
        self.keep_on_stop: Callable[[], bool] = lambda: False

    def start(self) -> None:
        self.tick()
        # Leases still ours from the run before (a reload) that fall to another
        # launcher now: let them go rather than have it wait for them to expire.
        held = self.fencing.held()
        for provider, lease in self.shared.store.leases().items():
            if provider in self.may_drive and lease.owner == self.me and provider not in held:
                self.shared.store.release_lease(provider, self.me, lease.generation)

    def due(self) -> float:
        return self._next

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.ttl / PASSES_PER_TTL
        store = self.shared.store
        store.heartbeat(self.me, self.may_drive, forget_after=FORGET_TTLS * self.ttl)
        held = self.fencing.held()
        if held:
            for provider in sorted(set(held) - store.renew_leases(self.me, held, self.ttl)):
                log.warning("provider %s: lease lost to another launcher; dropping it", provider)
                self._drop(provider)
        live = {row.id: row.providers for row in store.live_launchers(self.ttl)}
        owners = assign({p for allowed in live.values() for p in allowed or ()}, live)
        # Every lease first, then each recovery: a slow recovery (a cloud's listing)
        # must not leave the next provider undriven past the TTL.
        taken: list[str] = []
        try:
            for provider in self.may_drive:
                mine = owners.get(provider) == self.me
                if mine and provider not in self.fencing.held() and self._take(provider):
                    taken.append(provider)
        finally:  # a lease taken is recovered even if taking the next one failed
            for provider in taken:
                self._on_take(provider)
        for provider in sorted(self.fencing.held()):
            if owners.get(provider, self.me) != self.me:
                self._hand_over(provider, owners[provider], now)
            elif provider in self._draining:
                self._keep(provider)

    def stop(self, deadline: float) -> None:
        """Let every lease go at once, so the others take over without waiting a TTL
        (the node controller has finished or undone its launches by now); on a
        reload keep them, or the whole fleet would pass them round and back."""
        keep = self.keep_on_stop()
        for provider in sorted(self.fencing.held()):
            self._drop(provider, release=not keep)
        if not keep:
            self.shared.store.leave(self.me)

    def _take(self, provider: str) -> bool:
        """Take `provider`'s lease if it is free; whether it was (recovery is next)."""
        generation = self.shared.store.take_lease(provider, self.me, self.ttl)
        if generation is None:
            return False  # its owner is alive and has not handed it over yet
        log.info("provider %s: lease taken (generation %d)", provider, generation)
        self.fencing.hold(provider, generation)
        self.shared.drivers[provider] = self.shared.configured[provider]
        return True

    def _hand_over(self, provider: str, to: str, now: float) -> None:
        """Start nothing new on `provider`; release it once its operations finish."""
        if provider not in self._draining:
            log.info("provider %s: handing over to launcher %s", provider, to)
            self._draining[provider] = now + DRAIN_TTLS * self.ttl
            self.shared.draining.add(provider)
        busy = any(w.provider == provider for w in self.shared.work)
        if not busy or now >= self._draining[provider]:
            self._drop(provider, release=True)

    def _keep(self, provider: str) -> None:
        """A hand-over still draining when the provider fell to this launcher again
        (the one it was going to left, or the fleet changed back): it launches here
        again, or it would stay held and never launch."""
        log.info("provider %s: hand-over called off; it stays with this launcher", provider)
        del self._draining[provider]
        self.shared.draining.discard(provider)

    def _drop(self, provider: str, release: bool = False) -> None:
        generation = self.fencing.held().get(provider)
        for work in self.shared.work:
            if work.provider == provider:
                self.shared.work.pop(work.node_id)
        self.shared.drivers.pop(provider, None)
        self.shared.draining.discard(provider)
        self._draining.pop(provider, None)
        self.fencing.drop(provider)
        self._on_drop(provider)
        if release and generation is not None:
            self.shared.store.release_lease(provider, self.me, generation)
            log.info("provider %s: lease released", provider)
