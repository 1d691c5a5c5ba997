"""The scheduler's order: priority, then weighted fair share between tenants, then age.

Real SQLite store; ready nodes are made through the store API (no instances behind
them: the scheduler only moves rows, and launching hundreds of real nodes would make
these tests slow without testing anything more of the order).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from freshpool.config import Config, parse
from freshpool.core.states import NodeState, RequestState
from freshpool.service.scheduler import FairShare, Scheduler
from freshpool.store import NewRequest, NodeRow, RequestRow, Store, WriteBusy, first_fit_for

N = NodeState


def config(tmp_path: Path, tenants: str = "") -> Config:
    return parse(f"""
state-dir: {tmp_path}
providers: [{{name: local, max-nodes: 1000}}]
labels:
  - {{name: small, image: img, min-ready: 0}}
  - {{name: big, image: img, min-ready: 0}}
images: [{{name: img}}]
{tenants}
""")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store.open(tmp_path)
    yield store
    store.close()


def make_ready(store: Store, label: str, count: int = 1) -> None:
    for _ in range(count):
        row = store.new_node(label, "local", "build", label)
        store.transition(row.id, N.BUILDING, N.TESTING, "up")
        store.transition(row.id, N.TESTING, N.READY, "ready command passed")


def fulfilment_order(store: Store) -> list[int]:
    """Requests in the order they were served. One pass serves many at the same instant;
    within a pass the scheduler's order shows in the nodes: each takes the oldest left."""
    done = store.list_requests(states_in=[RequestState.FULFILLED], limit=10_000)
    first_node = {
        i: min(n.id for n in ns) for i, ns in store.request_nodes([r.id for r in done]).items()
    }
    return [r.id for r in sorted(done, key=lambda r: (r.fulfilled_at, first_node[r.id]))]


def row(id: int, tenant: str, priority: int = 0, size: int = 1) -> RequestRow:
    return RequestRow(id, ["small"] * size, "", tenant, priority, "pending", "", id, id, None)


# ------------------------------------------------------------------ pure order


def test_priority_first_then_alternating_tenants_then_age() -> None:
    pending = [row(i, "a") for i in range(1, 7)] + [row(7, "b"), row(8, "b"), row(9, "a", 5)]
    order = [r.id for r in FairShare({}).order(pending)]
    # 9 is newest but has the highest priority. Then a has just been served, so b goes,
    # and the two alternate: a's six do not starve b's two.
    assert order == [9, 7, 1, 8, 2, 3, 4, 5, 6]


def test_weights_split_the_pool() -> None:
    pending = [row(i, "a") for i in range(1, 9)] + [row(i, "b") for i in range(9, 13)]
    order = FairShare({"a": 2.0}).order(pending)
    tenants = "".join(r.tenant for r in order)
    assert tenants == "abaabaabaaba"


def test_a_bigger_set_costs_its_tenant_more_turns() -> None:
    pending = [row(1, "a", size=3), row(2, "a"), row(3, "b"), row(4, "b"), row(5, "b")]
    assert [r.id for r in FairShare({}).order(pending)] == [1, 3, 4, 5, 2]


def test_priority_is_compared_as_a_number() -> None:
    pending = [row(1, "a", priority=9), row(2, "a", priority=10), row(3, "a", priority=-1)]
    assert [r.id for r in FairShare({}).order(pending)] == [2, 1, 3]


def _turns(fair: FairShare, pending: list[RequestRow]) -> list[int]:
    """The order as start-time fair queuing defines it, one turn at a time: at each
    priority, the tenant with the earliest virtual start (then the oldest request)
    goes next. A model for the test below; the scheduler takes short cuts."""
    clock, now = dict(fair.clock), fair.now
    left = sorted(pending, key=lambda r: (-r.priority, r.created_at, r.id))
    ordered: list[int] = []
    while left:
        top = left[0].priority
        heads: dict[str, RequestRow] = {}
        for r in left:
            if r.priority == top:
                heads.setdefault(r.tenant, r)
        tenant = min(
            heads,
            key=lambda t: (max(clock.get(t, now), now), heads[t].created_at, heads[t].id),
        )
        request = heads[tenant]
        now = max(clock.get(tenant, now), now)
        clock[tenant] = now + len(request.labels) / fair.weight(tenant)
        ordered.append(request.id)
        left.remove(request)
    return ordered


def test_order_matches_fair_queuing_turn_by_turn() -> None:
    rng = random.Random(3)
    for _ in range(300):
        fair = FairShare({"a": 2.0, "c": 0.5})
        for tenant in rng.sample("abc", rng.randint(0, 3)):  # some history
            fair.clock[tenant] = rng.uniform(0, 5)
        fair.now = rng.uniform(0, 3)
        pending = [
            row(i, rng.choice("abc"), rng.choice([0, 0, 5, 10]), rng.randint(1, 3))
            for i in range(1, rng.randint(1, 25))
        ]
        rng.shuffle(pending)
        assert [r.id for r in fair.order(pending)] == _turns(fair, pending)


# ------------------------------------------------------- the scheduler on a store


def test_seeded_two_tenant_scenario_is_fulfilled_in_fair_order(
    tmp_path: Path, store: Store
) -> None:
    cfg = config(tmp_path, "tenants:\n  - {name: ci, weight: 3}\n  - {name: dev, weight: 1}")
    scheduler = Scheduler(cfg, store)
    rng = random.Random(20240611)
    # ci floods the queue first; dev's requests trickle in among ci's later ones.
    made: list[RequestRow] = [store.new_request(["small"], tenant="ci") for _ in range(40)]
    for _ in range(40):
        tenant = "dev" if rng.random() < 0.3 else "ci"
        made.append(store.new_request(["small"], tenant=tenant))
    urgent = store.new_request(["small"], tenant="ci", priority=10)
    tenant_of = {r.id: r.tenant for r in [*made, urgent]}
    while store.pending_requests():
        make_ready(store, "small", rng.randint(1, 3))
        scheduler.run_pass()
    order = fulfilment_order(store)
    assert sorted(order) == sorted(tenant_of)
    assert order[0] == urgent.id
    rest = order[1:]
    # Each tenant's own requests go oldest first.
    for tenant in ("ci", "dev"):
        mine = [i for i in rest if tenant_of[i] == tenant]
        assert mine == sorted(mine)
    # While both wait, ci gets 3 nodes for every 1 of dev's, never more than a turn apart.
    dev_total = sum(1 for i in rest if tenant_of[i] == "dev")
    served = {"ci": 0, "dev": 0}
    for request_id in rest:
        served[tenant_of[request_id]] += 1
        if served["dev"] == dev_total:
            break
        assert abs(served["ci"] / 3 - served["dev"]) <= 1, served
    # dev's last request is done long before ci's 70-odd are: no starvation.
    assert rest.index(max(i for i in rest if tenant_of[i] == "dev")) < 4 * dev_total + 4


def test_one_tenants_flood_does_not_starve_anothers_one_request(
    tmp_path: Path, store: Store
) -> None:
    scheduler = Scheduler(config(tmp_path), store)
    flood = [store.new_request(["small"], tenant="big-ci") for _ in range(500)]
    make_ready(store, "small")
    scheduler.run_pass()
    lonely = store.new_request(["small"], tenant="one-dev")
    # Nodes come one at a time and the flood's jobs finish at once: holdings stay at zero,
    # yet the lone request is next.
    make_ready(store, "small")
    scheduler.run_pass()
    assert store.request(lonely.id).state == RequestState.FULFILLED
    assert store.request(flood[1].id).state == RequestState.PENDING


def test_a_waiting_set_keeps_its_place_but_other_labels_go_on(tmp_path: Path, store: Store) -> None:
    scheduler = Scheduler(config(tmp_path), store)
    pair = store.new_request(["small", "small"], tenant="a")
    single = store.new_request(["small"], tenant="b")
    other = store.new_request(["big"], tenant="b")
    make_ready(store, "small")
    make_ready(store, "big")
    scheduler.run_pass()
    # The single request may not take the node the older pair waits for.
    assert store.request(pair.id).state == RequestState.PENDING
    assert store.request(single.id).state == RequestState.PENDING
    assert store.request(other.id).state == RequestState.FULFILLED
    make_ready(store, "small")
    scheduler.run_pass()
    assert store.request(pair.id).state == RequestState.FULFILLED
    assert {n.label for n in store.request_nodes([pair.id])[pair.id]} == {"small"}
    make_ready(store, "small")
    scheduler.run_pass()
    assert store.request(single.id).state == RequestState.FULFILLED


def test_every_node_goes_to_exactly_one_request(tmp_path: Path, store: Store) -> None:
    scheduler = Scheduler(config(tmp_path), store)
    requests = [store.new_request(["small"] * (1 + i % 3), tenant=f"t{i % 4}") for i in range(30)]
    make_ready(store, "small", 40)
    scheduler.run_pass()
    handed = store.request_nodes([r.id for r in requests])
    ids = [n.id for nodes in handed.values() for n in nodes]
    assert len(ids) == len(set(ids)) == 40 - len(store.nodes(["ready"]))
    for r in requests:
        if store.request(r.id).state == RequestState.FULFILLED:
            assert len(handed[r.id]) == len(r.labels)
            assert all(n.state == N.IN_USE and n.tenant == r.tenant for n in handed[r.id])


# ------------------------------------------------------- submitting to the scheduler


def running(scheduler: Scheduler) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def ask_and_wait_till_queued(
    store: Store, ask: Callable[[], object]
) -> tuple[threading.Thread, list[object]]:
    """Run `ask` on a thread; return once its request waits in the store's queue."""
    got: list[object] = []
    asking = threading.Thread(target=lambda: got.append(ask()))
    asking.start()
    deadline = time.monotonic() + 10
    while not store.pending_requests():
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.01)
    return asking, got


def test_submitted_requests_share_passes_and_each_gets_its_own_answer(
    tmp_path: Path, store: Store
) -> None:
    scheduler = Scheduler(config(tmp_path), store)
    make_ready(store, "small", 5)
    asked = [
        scheduler.submit(NewRequest(("small",), requestor=f"job-{i}", tenant=f"t{i % 2}"))
        for i in range(8)
    ]
    scheduler.run_pass()  # one pass takes all eight
    outcomes = [f.result(0) for f in asked]
    assert [row.requestor for row, _ in outcomes] == [f"job-{i}" for i in range(8)]
    assert Counter(row.state for row, _ in outcomes) == {"fulfilled": 5, "pending": 3}
    for row, nodes in outcomes:
        assert len(nodes) == (1 if row.state == "fulfilled" else 0)
        assert all(n.request_id == row.id and n.tenant == row.tenant for n in nodes)


def test_before_the_launchers_first_pass_requests_are_queued_not_served(
    tmp_path: Path, store: Store
) -> None:
    scheduler = Scheduler(config(tmp_path), store)
    make_ready(store, "small")
    stop, thread = running(scheduler)
    try:
        row, nodes = scheduler.submit(NewRequest(("small",))).result(10)
        assert (row.state, nodes) == (RequestState.PENDING, [])
        scheduler.launcher_pass()  # the launcher has recovered: serve now
        deadline = time.monotonic() + 10
        while store.request(row.id).state == RequestState.PENDING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert store.request(row.id).state == RequestState.FULFILLED
    finally:
        stop.set()
        thread.join(10)


def test_a_cli_acquire_served_by_a_running_scheduler_gets_its_nodes(
    tmp_path: Path, store: Store
) -> None:
    """`freshpool acquire` on the store while `serve` runs: whoever claims, the CLI gets it."""
    from freshpool.core.states import BuildState
    from freshpool.service import handoff

    cfg = config(tmp_path)
    build = store.new_build("b", "img", str(tmp_path))
    store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "test")
    scheduler = Scheduler(cfg, Store.open(tmp_path))
    asking, got = ask_and_wait_till_queued(
        store, lambda: handoff.acquire(cfg, store, ["small"], timeout=20)
    )
    make_ready(store, "small")
    scheduler.run_pass()  # serve's scheduler claims it before the CLI looks again
    asking.join(20)
    ((node,),) = got
    assert node.state == NodeState.IN_USE
    scheduler.store.close()


# ------------------------------------------------------- passes on the event loop


def hold_write_lock(tmp_path: Path) -> sqlite3.Connection:
    """Another process's writer, as SQLite sees it: a connection of its own, in a
    write transaction."""
    other = sqlite3.connect(tmp_path / "freshpool.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_write_that_must_not_wait_refuses_at_once_and_does_nothing(
    tmp_path: Path, store: Store
) -> None:
    make_ready(store, "small")
    ask = [NewRequest(("small",), requestor="job")]
    other = hold_write_lock(tmp_path)
    refused: list[BaseException] = []

    def hand_out() -> None:
        try:
            store.hand_out(ask, first_fit_for(["local"]), ["local"], wait=False)
        except BaseException as exc:
            refused.append(exc)

    try:
        # The busy timeout is 30 s: a write that waited would still be waiting.
        trying = threading.Thread(target=hand_out)
        trying.start()
        trying.join(10)
        assert not trying.is_alive(), "the write waited for the lock"
        assert [type(e) for e in refused] == [WriteBusy]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.pending_requests() == []
    assert len(store.nodes(["ready"])) == 1
    # The same call goes through once the lock is free, and waiting writes still wait.
    done = store.hand_out(ask, first_fit_for(["local"]), ["local"], wait=False)
    assert [r.state for r in done.created] == [RequestState.FULFILLED]


def test_passes_on_the_event_loop_never_stall_it_and_lose_nothing(
    tmp_path: Path, store: Store
) -> None:
    """Another process holds the write lock: the loop's pass hands its requests to the
    scheduler's thread, which waits its turn; requests submitted while that thread
    passes wait for it to end. The loop runs on all along; every request is served
    once, with nodes of its own."""
    scheduler = Scheduler(config(tmp_path), store)
    make_ready(store, "small", 30)
    scheduler.launcher_pass()
    stop, thread = running(scheduler)

    def ask(name: str) -> Coroutine[Any, Any, tuple[RequestRow, list[NodeRow]]]:
        return scheduler.submit_async(NewRequest(("small",), requestor=name))

    async def scenario() -> list[tuple[RequestRow, list[NodeRow]]]:
        served_at_once = await asyncio.wait_for(
            asyncio.gather(*(ask(f"a{i}") for i in range(10))), 30
        )
        other = hold_write_lock(tmp_path)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            blocked = [asyncio.create_task(ask(f"b{i}")) for i in range(10)]
            await asyncio.sleep(0.3)
            late = [asyncio.create_task(ask(f"c{i}")) for i in range(5)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in blocked + late)
            assert ticks >= 5, "the event loop stalled while another process wrote"
        finally:
            other.execute("ROLLBACK")
            other.close()
        served_after = await asyncio.wait_for(asyncio.gather(*blocked, *late), 30)
        ticker.cancel()
        return [*served_at_once, *served_after]

    try:
        outcomes = asyncio.run(scenario())
    finally:
        stop.set()
        thread.join(10)
    names = [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]
    assert [row.requestor for row, _ in outcomes] == names + [f"c{i}" for i in range(5)]
    assert {row.state for row, _ in outcomes} == {RequestState.FULFILLED}
    handed = [node.id for _, nodes in outcomes for node in nodes]
    assert len(handed) == len(set(handed)) == 25
    assert len(store.nodes(["ready"])) == 5
    assert all(store.node(n).state == NodeState.IN_USE for n in handed)


def test_after_a_launcher_pass_waiting_requests_are_served_on_the_event_loop(
    tmp_path: Path, store: Store
) -> None:
    """Nodes turn ready and the launcher passes: the loop the requests came from
    serves them, with no pass on the scheduler's thread (it is not even running)."""
    scheduler = Scheduler(config(tmp_path), store)
    scheduler.launcher_pass()  # no loop yet: a poke for a thread that is not there

    async def scenario() -> list[RequestRow]:
        asked = await asyncio.gather(
            *(scheduler.submit_async(NewRequest(("small",), requestor=f"j{i}")) for i in range(3))
        )
        assert {row.state for row, _ in asked} == {RequestState.PENDING}
        make_ready(store, "small", 2)
        # From another thread, as the front's link to the launcher calls it.
        threading.Thread(target=scheduler.launcher_pass).start()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if len(store.nodes(["ready"])) == 0:
                break
        return [store.request(row.id) for row, _ in asked]

    after = asyncio.run(scenario())
    assert [row.state for row in after] == [RequestState.FULFILLED] * 2 + [RequestState.PENDING]
    assert [n.request_id for n in store.nodes(["in-use"])] == [after[0].id, after[1].id]
