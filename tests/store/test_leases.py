"""Provider leases, their fence, and room for a launch counted in SQL: on the real
databases (tests/store/conftest.py), with launchers as separate Store objects, each
with connections of its own, as separate processes would have."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from freshpool.core.errors import LeaseLost
from freshpool.core.states import NodeState
from freshpool.store import Fencing, NewNodes, Room, Store
from tests.store.pg import TempPostgres

N = NodeState


def fenced(store: Store, owner: str, provider: str, ttl: float = 30.0) -> Fencing:
    generation = store.take_lease(provider, owner, ttl)
    assert generation is not None
    fencing = Fencing(owner)
    fencing.hold(provider, generation)
    return fencing


def test_a_lease_has_one_owner_until_it_expires_or_is_released(store: Store) -> None:
    assert store.take_lease("cloud", "a", 30.0) == 1
    assert store.take_lease("cloud", "b", 30.0) is None
    assert store.take_lease("cloud", "a", 30.0) == 1  # its own: the same generation
    assert store.renew_leases("a", {"cloud": 1}, 30.0) == {"cloud"}
    store.release_lease("cloud", "a", 1)
    assert store.take_lease("cloud", "b", 30.0) == 2
    assert store.renew_leases("a", {"cloud": 1}, 30.0) == set()
    lease = store.leases()["cloud"]
    assert (lease.owner, lease.generation) == ("b", 2)


def test_an_expired_lease_goes_to_the_next_taker_at_a_new_generation(store: Store) -> None:
    assert store.take_lease("cloud", "a", 0.0) == 1
    assert store.take_lease("cloud", "b", 30.0) == 2


def test_heartbeats_tell_the_live_launchers(store: Store) -> None:
    store.heartbeat("a", ["cloud"])
    store.heartbeat("b", None)
    assert [(r.id, r.providers) for r in store.live_launchers(30.0)] == [
        ("a", ["cloud"]),
        ("b", None),
    ]
    store.leave("a")
    assert [r.id for r in store.live_launchers(30.0)] == ["b"]


def test_a_heartbeat_forgets_launchers_long_unseen(store: Store) -> None:
    store.heartbeat("dead", None)
    time.sleep(0.2)
    store.heartbeat("alive", None, forget_after=60.0)
    assert [r.id for r in store.launcher_rows()] == ["alive", "dead"]
    store.heartbeat("alive", None, forget_after=0.1)
    assert [r.id for r in store.launcher_rows()] == ["alive"]


def test_a_launcher_that_lost_its_lease_cannot_write_for_the_provider(store: Store) -> None:
    store.fencing = fenced(store, "a", "cloud")
    (node,) = store.new_nodes("debian", "cloud", "b1", "debian", 1)
    store.release_lease("cloud", "a", 1)
    assert store.take_lease("cloud", "b", 30.0) == 2
    with pytest.raises(LeaseLost, match="superseded"):
        store.transition(node.id, N.BUILDING, N.TESTING, "up")
    with pytest.raises(LeaseLost):
        store.new_nodes("debian", "cloud", "b1", "debian", 1)
    with pytest.raises(LeaseLost):
        store.set_instance(node.id, "i-1", None)
    with pytest.raises(LeaseLost, match="holds no lease"):
        store.new_nodes("debian", "other", "b1", "debian", 1)
    store.fencing = None
    assert [(n.id, n.state, n.external_id) for n in store.nodes()] == [(node.id, "building", None)]


def test_the_history_says_who_drove_a_provider_at_which_generation(store: Store) -> None:
    store.fencing = fenced(store, "a", "cloud", ttl=0.0)
    (node,) = store.new_nodes("debian", "cloud", "b1", "debian", 1)
    store.fencing = fenced(store, "b", "cloud")
    store.transition(node.id, N.BUILDING, N.TESTING, "up")
    store.fencing = None
    store.transition(node.id, N.TESTING, N.READY, "an unfenced write")
    assert [(e.to_state, e.launcher, e.generation) for e in store.events(node.id)] == [
        ("building", "a", 1),
        ("testing", "b", 2),
        ("ready", None, None),
    ]
    assert [(p, o, g, before) for p, o, g, _at, before in store.lease_history()] == [
        ("cloud", "a", 1, ""),
        ("cloud", "b", 2, "a"),
    ]


def test_room_caps_a_launch_in_its_own_transaction(store: Store) -> None:
    room = Room(provider_max=3, label_supply=5)
    assert len(store.new_nodes("debian", "cloud", "b1", "debian", 10, room)) == 3
    assert store.new_nodes("debian", "cloud", "b1", "debian", 1, room) == []
    other = Room(provider_max=10, label_supply=5)
    assert len(store.new_nodes("debian", "cloud-2", "b1", "debian", 10, other)) == 2
    capped = Room(label_max=6)
    assert len(store.new_nodes("debian", "cloud-3", "b1", "debian", 10, capped)) == 1


def test_one_pass_of_launches_counts_each_against_those_before_it(store: Store) -> None:
    """A pass writes its launches on every provider in one transaction: the caps hold
    across them as across separate launches, and each gets its own rows, in order."""
    supply = Room(provider_max=4, label_supply=6)
    store.new_nodes("debian", "cloud-1", "b1", "debian", 1)
    made = store.new_node_sets([
        NewNodes("debian", "cloud-1", "b1", "debian", 5, supply),
        NewNodes("debian", "cloud-2", "b1", "debian", 0, supply),
        NewNodes("debian", "cloud-2", "b1", "debian", 5, supply),
        NewNodes("other", "cloud-2", "b2", "other", 2),
        NewNodes("debian", "cloud-3", "b1", "debian", 5, supply),
    ])  # fmt: skip
    assert [len(rows) for rows in made] == [3, 0, 2, 2, 0]
    assert {(n.provider, n.label, n.build_id) for n in made[3]} == {("cloud-2", "other", "b2")}
    assert all(n.hostname == f"debian-{n.id}" for n in made[0] + made[2])
    assert [e.reason for e in store.events(made[2][0].id)] == ["launch on cloud-2"]
    assert len(store.nodes()) == 8


@pytest.fixture
def four(postgres: TempPostgres) -> Iterator[list[Store]]:
    url = postgres.new_database()
    stores = [Store(url) for _ in range(4)]
    yield stores
    for s in stores:
        s.close()


def test_four_launchers_racing_for_the_last_slot_create_one_node(four: list[Store]) -> None:
    for i, s in enumerate(four):
        s.fencing = fenced(s, f"launcher-{i}", f"cloud-{i}")
    four[0].new_nodes("debian", "cloud-0", "b1", "debian", 4)
    room = Room(label_max=5)
    start = threading.Barrier(len(four))
    made: list[int] = []

    def race(i: int) -> None:
        start.wait()
        made.extend(n.id for n in four[i].new_nodes("debian", f"cloud-{i}", "b1", "d", 1, room))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(four))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert len(four[0].nodes()) == 5
