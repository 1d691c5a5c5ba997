"""The batched hand-out on SQLite and PostgreSQL: many requests, one transaction, no sharing."""

from __future__ import annotations

import threading
from collections import Counter

from sqlalchemy import select

from freshpool.core.errors import StaleState
from freshpool.core.placement import Ready, first_fit
from freshpool.core.states import NodeState, RequestState
from freshpool.store import NewRequest, Queue, Store
from freshpool.store.schema import requests
from tests.store.pg import TempPostgres
from tests.store.test_store import ready_node


def everyone(providers: list[str]):  # type: ignore[no-untyped-def]
    """A planner that serves every pending request, oldest first, first fit."""

    def plan(queue: Queue) -> list[tuple[int, str]]:
        free: Ready = Counter(queue.ready)
        placements = []
        for request in queue.pending:
            provider = first_fit(request.labels, providers, free)
            if provider is not None:
                free.subtract((provider, label) for label in request.labels)
                placements.append((request.id, provider))
        return placements

    return plan


def test_a_batch_queues_and_serves_in_one_go_and_matches_each_caller(store: Store) -> None:
    for _ in range(3):
        ready_node(store, "a")
    ready_node(store, "b")
    asked = [
        NewRequest(("a",), requestor="job-1", tenant="x"),
        NewRequest(("a",), requestor="job-1", tenant="x"),  # identical twin
        NewRequest(("a", "b"), requestor="job-2", tenant="y", priority=5),
        NewRequest(("b",), requestor="job-3", tenant="z"),  # no b left for it
        NewRequest(("a",), requestor="job-4", tenant="x", deadline=123.5),  # no a left
    ]
    done = store.hand_out(asked, everyone(["p"]), ["p"])
    assert [(r.requestor, r.tenant, r.priority, r.deadline) for r in done.created] == [
        (n.requestor, n.tenant, n.priority, n.deadline) for n in asked
    ]
    assert len({r.id for r in done.created}) == 5
    states = [r.state for r in done.created]
    assert states == ["fulfilled"] * 3 + ["pending"] * 2
    handed = [n.id for r in done.created for n in done.nodes_of(r.id)]
    assert len(handed) == len(set(handed)) == 4
    for row in done.created:
        stored = store.request(row.id)
        assert stored == row  # what the caller got is what the store has
        for node in done.nodes_of(row.id):
            assert (node.state, node.request_id, node.tenant) == ("in-use", row.id, row.tenant)
            # The hand-out builds the claimed rows itself rather than read them again.
            assert node == store.node(node.id)
            assert [e.to_state for e in store.events(node.id)][-1] == NodeState.IN_USE
    assert done.pending == {done.created[3].id, done.created[4].id}


def test_requests_another_hand_out_holds_count_as_still_pending(postgres: TempPostgres) -> None:
    """On PostgreSQL a hand-out skips the pending requests another one holds (SKIP
    LOCKED); they are still pending all the same. A scheduler wakes the waiters of
    the requests a pass says are no longer pending: it would wake these for nothing."""
    store = Store(postgres.new_database())
    held, free = (store.new_request(["a"]) for _ in range(2))
    try:
        with store.engine.connect() as other, other.begin():
            lock = select(requests.c.id).with_for_update()
            other.execute(lock.where(requests.c.id == held.id))
            assert store.hand_out([], everyone(["p"]), ["p"]).pending == {held.id, free.id}
            # Every pending request held elsewhere: this hand-out sees none of them.
            other.execute(lock.where(requests.c.id == free.id))
            assert store.hand_out([], everyone(["p"]), ["p"]).pending == {held.id, free.id}
        store.finish_request(held.id, RequestState.FAILED, "deadline passed")
        assert store.hand_out([], everyone(["p"]), ["p"]).pending == {free.id}
    finally:
        store.close()


def test_a_batch_bigger_than_one_insert_matches_every_caller(store: Store) -> None:
    for _ in range(150):
        ready_node(store, "a")
    asked = [NewRequest(("a",), requestor=f"job-{i}") for i in range(250)]
    done = store.hand_out(asked, everyone(["p"]), ["p"])
    assert [r.requestor for r in done.created] == [n.requestor for n in asked]
    assert len({r.id for r in done.created}) == 250
    assert [r.state for r in done.created] == ["fulfilled"] * 150 + ["pending"] * 100
    handed = [n.id for r in done.created for n in done.nodes_of(r.id)]
    assert len(handed) == len(set(handed)) == 150
    assert all(store.request(r.id) == r for r in done.created)


def test_placements_the_pool_cannot_honour_leave_requests_pending(store: Store) -> None:
    node = ready_node(store, "a", "p1")
    first, second = store.hand_out(
        [NewRequest(("a",)), NewRequest(("a",))], lambda q: [], ["p1"]
    ).created

    def greedy(queue: Queue) -> list[tuple[int, str]]:
        # Both on p1 (it has one node), one twice, one on a provider with none,
        # and one that is not pending at all.
        return [
            (first.id, "p1"),
            (first.id, "p1"),
            (second.id, "p1"),
            (second.id, "p2"),
            (999, "p1"),
        ]

    done = store.hand_out([], greedy, ["p1", "p2"])
    assert list(done.fulfilled) == [first.id]
    assert [n.id for n in done.nodes_of(first.id)] == [node]
    assert store.request(second.id).state == RequestState.PENDING


def test_hand_outs_from_two_stores_at_once_never_share_a_node(store: Store) -> None:
    """Two processes' schedulers (two engines on one database) serve one queue at once."""
    for _ in range(40):
        ready_node(store)
    other = Store(store.url)
    try:
        results: list[list[int]] = []
        lock = threading.Lock()

        def serve(s: Store) -> None:
            for _ in range(15):
                done = s.hand_out([NewRequest(("l",)), NewRequest(("l",))], everyone(["p"]), ["p"])
                with lock:
                    results.extend([n.id for n in ns] for _, ns in done.fulfilled.values())

        threads = [threading.Thread(target=serve, args=(s,)) for s in (store, other, store, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        other.close()
    handed = [i for ids in results for i in ids]
    assert len(handed) == len(set(handed)) == 40
    assert store.nodes(["ready"]) == []
    by_state = Counter(r.state for r in store.list_requests(limit=1000))
    assert by_state == {RequestState.FULFILLED: 40, RequestState.PENDING: 80}
    for request_id, got in store.request_nodes(
        [r.id for r in store.list_requests(limit=1000)]
    ).items():
        assert len(got) <= 1, request_id


def quota_planning(quota: int):  # type: ignore[no-untyped-def]
    """The scheduler's own planning, with tenant `t` allowed `quota` nodes at once."""
    from freshpool.config import parse
    from freshpool.core.placement import Clocks
    from freshpool.dispatch.scheduler import Planning

    planning = Planning(
        parse(f"""
providers: [{{name: p, max-nodes: 100}}]
labels: [{{name: l, image: i, min-ready: 0}}]
images: [{{name: i}}]
tenants: [{{name: t, max-nodes: {quota}}}]
""")
    )
    return lambda: planning.planner(Clocks())


def test_a_tenants_quota_holds_with_hand_outs_racing_from_two_stores(store: Store) -> None:
    """Four hand-outs on two engines at once, each asking for tenant t (quota 3) with
    plenty of ready nodes: three nodes go to t in all, the rest of its requests wait,
    and another tenant is served beside it."""
    for _ in range(20):
        ready_node(store)
    planner = quota_planning(3)
    other = Store(store.url)
    try:

        def serve(s: Store) -> None:
            for _ in range(4):
                ask = [NewRequest(("l",), tenant="t"), NewRequest(("l",), tenant="u")]
                for _attempt in range(20):
                    try:
                        s.hand_out(ask, planner(), ["p"])
                        break
                    except StaleState:  # another engine claimed first: as the scheduler does
                        continue

        threads = [threading.Thread(target=serve, args=(s,)) for s in (store, other, store, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held = Counter(n.tenant for n in store.nodes(["in-use"]))
        assert held == {"t": 3, "u": 16}
        waiting = Counter(r.tenant for r in store.pending_requests())
        assert waiting == {"t": 13}
        # A node t gives back makes room for exactly one more of its requests.
        mine = [n for n in store.nodes(["in-use"]) if n.tenant == "t"]
        store.release_set(mine[0].id, "job done")
        done = store.hand_out([], planner(), ["p"])
        assert [r.tenant for r, _ in done.fulfilled.values()] == ["t"]
        assert Counter(n.tenant for n in store.nodes(["in-use"]))["t"] == 3
    finally:
        other.close()


def test_waiting_demand_leaves_out_what_a_tenants_quota_cannot_serve_yet(store: Store) -> None:
    ready_node(store)
    planner = quota_planning(2)
    store.hand_out([NewRequest(("l",), tenant="t")], planner(), ["p"])
    store.hand_out([NewRequest(("l", "l"), tenant="t")] * 2, planner(), ["p"])
    last = [NewRequest(("l",), tenant="t"), NewRequest(("l",), tenant="u")]
    store.hand_out(last, planner(), ["p"])
    assert store.pending_demand() == {"l": 6}
    # t holds one node, so one more of its nodes can be served: its single request.
    assert store.pending_demand({"t": 2}) == {"l": 2}
