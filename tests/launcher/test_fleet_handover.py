"""A hand-over called off: a provider this launcher began handing to another (its
operations still in flight, so it drains first) that falls back to it before the
drain ends must launch here again. It used to stay marked draining, held by this
launcher with no launches, for good.

In process, on a real PostgreSQL: launcher a's passes are called directly; the
launcher it hands over to is a heartbeat row only (b never drives anything)."""

from __future__ import annotations

import time
from pathlib import Path

from freshpool import launcher as launching
from freshpool.config import parse
from freshpool.core.states import BuildState, NodeState
from freshpool.drivers.base import load_driver
from freshpool.launcher import Launcher
from freshpool.store import Store
from tests.store.pg import TempPostgres

TTL = 30.0  # long: only the passes this test makes decide who drives what


def test_a_provider_whose_hand_over_is_called_off_launches_again(
    tmp_path: Path, postgres: TempPostgres
) -> None:
    url = postgres.new_database()
    clouds = ["cloud-0", "cloud-1"]
    providers = "".join(
        f"  - {{name: {c}, driver: sim, max-nodes: 2,"
        f" sim: {{latency: 0.5, path: {tmp_path / (c + '.db')}}}}}\n"
        for c in clouds
    )
    config = parse(f"""
state-dir: {tmp_path / "a"}
database-url: "{url}"
launcher-id: a
lease-ttl: {TTL}
providers:
{providers}
labels: [{{name: debian, image: img, health-interval: 0, min-ready: 4}}]
images: [{{name: img}}]
""")
    store = Store(url)
    build = store.new_build("img-1", "img", str(tmp_path / "no-layers"))
    store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "test")
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    a = launching.build(config, store, drivers, images=False, publish=False)
    assert a.leases is not None
    a.pass_once()
    assert set(a.shared.drivers) == set(clouds)
    # Launches in flight on both (each create takes the sim's 1 s).
    assert {w.provider for w in a.shared.work} == set(clouds)

    store.heartbeat("b", None)
    a.leases._next = 0.0  # its next lease pass now, not a tenth of a TTL later
    a.pass_once()
    (handing,) = a.shared.draining
    assert handing in a.shared.drivers, "busy: it drains before it goes"

    # b leaves before a's operations on it finish: the provider is a's again.
    store.leave("b")
    a.leases._next = 0.0
    a.pass_once()
    assert a.shared.draining == set()
    assert {p: lease.owner for p, lease in store.leases().items()} == dict.fromkeys(clouds, "a")

    # And it launches there again: with the other provider full, the nodes
    # deleted on it can only be replaced on it.
    refill(a, store, 4)
    for row in store.nodes():
        if row.provider == handing:
            store.move(row.id, NodeState.DELETING, "test: replace them")
    refill(a, store, 4)
    assert {n.provider for n in store.nodes()} == set(clouds)
    a.stop(30)
    store.close()


def refill(a: Launcher, store: Store, ready: int) -> None:
    deadline = time.monotonic() + 60
    while len(store.nodes(["ready"])) < ready or len(store.nodes()) > ready:
        assert time.monotonic() < deadline, f"no {ready} ready nodes: {store.nodes()}"
        a.pass_once()
        time.sleep(0.05)
