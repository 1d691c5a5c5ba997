"""What to launch where: each label's missing nodes (its ready target plus waiting requests)
spread over the providers that serve it, within their limits and rate, with a pause
for a provider and label whose launches keep failing."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from freshpool.config import Label, Provider
from freshpool.core.backoff import DRIVER
from freshpool.core.states import NODE_SUPPLY_STATES, BuildState
from freshpool.launcher.context import Shared
from freshpool.store import Room, ServingBuild

log = logging.getLogger("freshpool.launcher")


@dataclass(frozen=True)
class Launch:
    provider: Provider
    label: Label
    serving: ServingBuild
    count: int
    # The caps the store checks again as it writes the rows (store/room.py): other
    # launchers may have launched since this plan counted.
    room: Room


class LaunchFailures:
    """Consecutive launch failures per (provider, label), and when launching may resume:
    a broken image must not turn into a tight create-fail-delete loop."""

    def __init__(self) -> None:
        self._failures: Counter[tuple[str, str]] = Counter()
        self._paused_until: dict[tuple[str, str], float] = {}

    def paused(self, provider: str, label: str) -> bool:
        return self._paused_until.get((provider, label), 0.0) > time.monotonic()

    def outcome(self, provider: str, label: str, ok: bool) -> None:
        key = (provider, label)
        if ok:
            self._failures.pop(key, None)
            self._paused_until.pop(key, None)
            return
        self._failures[key] += 1
        delay = DRIVER.delay(self._failures[key] - 1)
        self._paused_until[key] = time.monotonic() + delay
        log.warning(
            "provider %s label %s: %d launch failures in a row; next launch in %.0f s",
            provider,
            label,
            self._failures[key],
            delay,
        )


def plan_launches(shared: Shared, failures: LaunchFailures) -> tuple[list[Launch], set[str]]:
    """The launches to start now (their calls already taken from the rate limit), and
    the providers whose rate left demand unmet."""
    counts = shared.store.node_counts()
    demand = shared.store.pending_demand(shared.config.tenant_quotas)
    used: Counter[str] = Counter()
    supply: Counter[str] = Counter()
    of_label: Counter[str] = Counter()
    for (provider_name, label_name, state), n in counts.items():
        used[provider_name] += n
        of_label[label_name] += n
        if state in NODE_SUPPLY_STATES:
            supply[label_name] += n
    launches: list[Launch] = []
    throttled: set[str] = set()
    for label in shared.config.labels:
        wanted = shared.ready_target(label) + demand.get(label.name, 0)
        missing = wanted - supply[label.name]
        if label.max_nodes is not None:
            missing = min(missing, label.max_nodes - of_label[label.name])
        if missing <= 0:
            continue
        if shared.store.serving_build(label.image) is None:
            _no_build(shared, label)
            continue
        providers = _by_room(shared, label, used)
        # Only a build whose upload to the provider is ready (the image keeper's work),
        # or one in place on disk for a driver that runs builds from their layers.
        builds = shared.store.serving_on(label.image, {
            p.name: shared.drivers[p.name].serves_without_upload(label.name) for p in providers
        })  # fmt: skip
        for provider in providers:
            if missing <= 0:
                break
            if failures.paused(provider.name, label.name):
                continue
            serving = builds.get(provider.name)
            if serving is None:
                continue
            room = Room(label_supply=wanted, label_max=label.max_nodes)
            launch = _launch_on(
                shared, provider, label, serving, missing, used[provider.name], throttled, room
            )
            if launch is not None:
                launches.append(launch)
                used[provider.name] += launch.count
                missing -= launch.count
    return launches, throttled


def _launch_on(
    shared: Shared,
    provider: Provider,
    label: Label,
    serving: ServingBuild,
    missing: int,
    used: int,
    throttled: set[str],
    caps: Room,
) -> Launch | None:
    driver = shared.drivers[provider.name]
    # The driver's own limit (host RAM for VMs, addresses...) may be lower; and what
    # all the provider's nodes may take together (limits-total).
    most = min(driver.limits().max_nodes, shared.config.total_cap(provider) or used + missing)
    room = min(
        most - used,
        provider.max_parallel_launches - shared.work.launches_on(provider.name),
        missing,
    )
    if room <= 0:
        return None
    gate = shared.gates[provider.name]
    allowed = 0
    while allowed < room and gate.take():
        allowed += 1
    if allowed < room:
        throttled.add(provider.name)
    if not allowed:
        return None
    caps = Room(provider_max=most, label_supply=caps.label_supply, label_max=caps.label_max)
    return Launch(provider, label, serving, allowed, caps)


def _by_room(shared: Shared, label: Label, used: Counter[str]) -> list[Provider]:
    """The label's providers, most room first (their driver's limit, a cloud's quota
    less what is not ours among it); one whose breaker is open gets none (its demand
    goes elsewhere)."""
    mine = [
        p
        for p in shared.config.providers_for(label.name)
        if p.name in shared.drivers
        and p.name not in shared.draining
        and not shared.gates[p.name].is_open()
    ]
    return sorted(mine, key=lambda p: used[p.name] - shared.drivers[p.name].limits().max_nodes)


def _no_build(shared: Shared, label: Label) -> None:
    building = [b.id for b in shared.store.builds(label.image) if b.state == BuildState.BUILDING]
    if building:
        message = (
            f"label {label.name}: waiting for image {label.image!r}"
            f" (build {building[0]} in progress)"
        )
    else:
        message = (
            f"label {label.name}: image {label.image!r} has no ready build yet"
            " (`serve` builds it unless started with --no-build; or run"
            f" `freshpool image build {label.image}`)"
        )
    shared.warn_once(f"image:{label.image}:{bool(building)}", message)
