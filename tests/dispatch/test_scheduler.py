"""The scheduler on a real store: fair order over passes, group commit, the launcher's
first pass, a write lock held elsewhere, and CLI acquires in the same queue.

Real SQLite store; ready nodes are made through the store API (no instances behind
them: the scheduler only moves rows, and launching hundreds of real nodes would make
these tests slow without testing anything more of the order).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from freshpool import launcherlock
from freshpool.config import Config, parse
from freshpool.core.errors import BadInput, StaleState, WriteBusy
from freshpool.core.states import BuildState, NodeState, RequestState
from freshpool.dispatch import direct
from freshpool.dispatch.scheduler import Outcome, Scheduler
from freshpool.store import NewRequest, Store, handout
from tests.store.test_handout import everyone

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


@contextlib.asynccontextmanager
async def scheduling(cfg: Config, store: Store, started: bool = True) -> AsyncIterator[Scheduler]:
    """A scheduler passing on this loop, as the API process runs it."""
    scheduler = Scheduler(cfg, store)
    if started:
        scheduler.started.set()
    scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop()


async def a_pass(scheduler: Scheduler) -> None:
    """Poke the scheduler and wait for its next pass to end."""
    before = scheduler.passes
    scheduler.poke()
    while scheduler.passes == before:
        await asyncio.sleep(0.001)


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------- the order over passes


def test_seeded_two_tenant_scenario_is_fulfilled_in_fair_order(
    tmp_path: Path, store: Store
) -> None:
    cfg = config(tmp_path, "tenants:\n  - {name: ci, weight: 3}\n  - {name: dev, weight: 1}")
    rng = random.Random(20240611)
    # ci floods the queue first; dev's requests trickle in among ci's later ones.
    made = [store.new_request(["small"], tenant="ci") for _ in range(40)]
    for _ in range(40):
        made.append(store.new_request(["small"], tenant="dev" if rng.random() < 0.3 else "ci"))
    urgent = store.new_request(["small"], tenant="ci", priority=10)
    tenant_of = {r.id: r.tenant for r in [*made, urgent]}

    async def scenario() -> None:
        async with scheduling(cfg, store) as scheduler:
            while store.pending_requests():
                make_ready(store, "small", rng.randint(1, 3))
                await a_pass(scheduler)

    asyncio.run(scenario())
    order = fulfilment_order(store)
    assert sorted(order) == sorted(tenant_of)
    assert order[0] == urgent.id
    rest = order[1:]
    for tenant in ("ci", "dev"):  # each tenant's own requests go oldest first
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


def test_one_tenants_flood_does_not_starve_anothers_one_request(
    tmp_path: Path, store: Store
) -> None:
    flood = [store.new_request(["small"], tenant="big-ci") for _ in range(500)]

    async def scenario() -> int:
        async with scheduling(config(tmp_path), store) as scheduler:
            make_ready(store, "small")
            await a_pass(scheduler)
            lonely = store.new_request(["small"], tenant="one-dev")
            # Nodes come one at a time and the flood's jobs finish at once: holdings
            # stay at zero, yet the lone request is next.
            make_ready(store, "small")
            await a_pass(scheduler)
            return lonely.id

    lonely = asyncio.run(scenario())
    assert store.request(lonely).state == RequestState.FULFILLED
    assert store.request(flood[1].id).state == RequestState.PENDING


def test_every_node_goes_to_exactly_one_request(tmp_path: Path, store: Store) -> None:
    requests = [store.new_request(["small"] * (1 + i % 3), tenant=f"t{i % 4}") for i in range(30)]
    make_ready(store, "small", 40)

    async def scenario() -> None:
        async with scheduling(config(tmp_path), store) as scheduler:
            await a_pass(scheduler)

    asyncio.run(scenario())
    handed = store.request_nodes([r.id for r in requests])
    ids = [n.id for nodes in handed.values() for n in nodes]
    assert len(ids) == len(set(ids)) == 40 - len(store.nodes(["ready"]))
    for r in requests:
        if store.request(r.id).state == RequestState.FULFILLED:
            assert len(handed[r.id]) == len(r.labels)
            assert all(n.state == N.IN_USE and n.tenant == r.tenant for n in handed[r.id])


# ------------------------------------------------------- submitting


def test_requests_submitted_together_share_one_pass_and_each_gets_its_answer(
    tmp_path: Path, store: Store
) -> None:
    make_ready(store, "small", 5)

    async def scenario() -> tuple[list[Outcome], int]:
        async with scheduling(config(tmp_path), store) as scheduler:
            before = scheduler.passes
            asked = [
                NewRequest(("small",), requestor=f"job-{i}", tenant=f"t{i % 2}") for i in range(8)
            ]
            outcomes = await asyncio.gather(*(scheduler.submit(a) for a in asked))
            return outcomes, scheduler.passes - before

    outcomes, passes = asyncio.run(scenario())
    assert passes == 1
    assert [row.requestor for row, _ in outcomes] == [f"job-{i}" for i in range(8)]
    assert Counter(row.state for row, _ in outcomes) == {"fulfilled": 5, "pending": 3}


def test_before_the_launchers_first_pass_requests_are_queued_not_served(
    tmp_path: Path, store: Store
) -> None:
    make_ready(store, "small")

    async def scenario() -> None:
        async with scheduling(config(tmp_path), store, started=False) as scheduler:
            row, nodes = await scheduler.submit(NewRequest(("small",)))
            assert (row.state, nodes) == (RequestState.PENDING, [])
            # From another thread, as the API process's link reader calls it.
            threading.Thread(target=scheduler.launcher_passed).start()
            await until(lambda: store.request(row.id).state == RequestState.FULFILLED)

    asyncio.run(scenario())


# ------------------------------------------------------- the write lock held elsewhere


def hold_write_lock(tmp_path: Path) -> sqlite3.Connection:
    """Another process's writer, as SQLite sees it: a connection of its own, in a
    write transaction."""
    other = sqlite3.connect(tmp_path / "freshpool.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


@pytest.mark.sqlite_only
def test_a_write_that_must_not_wait_refuses_at_once_and_does_nothing(
    tmp_path: Path, store: Store
) -> None:
    make_ready(store, "small")
    ask = [NewRequest(("small",), requestor="job")]
    other = hold_write_lock(tmp_path)
    try:
        # The busy timeout is long: a write that waited would still be waiting.
        started = time.monotonic()
        with pytest.raises(WriteBusy):
            store.hand_out(ask, everyone(["local"]), ["local"], wait=False)
        assert time.monotonic() - started < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.pending_requests() == []
    assert len(store.nodes(["ready"])) == 1
    done = store.hand_out(ask, everyone(["local"]), ["local"], wait=False)
    assert [r.state for r in done.created] == [RequestState.FULFILLED]


@pytest.mark.sqlite_only
def test_a_pass_never_stalls_the_loop_while_another_process_writes(
    tmp_path: Path, store: Store
) -> None:
    """Another process holds the write lock: the loop runs on, the requests wait,
    and once the lock is free every one is served once, with nodes of its own."""
    make_ready(store, "small", 30)

    async def scenario() -> list[Outcome]:
        async with scheduling(config(tmp_path), store) as scheduler:

            def ask(name: str) -> asyncio.Task[Outcome]:
                return asyncio.create_task(scheduler.submit(NewRequest(("small",), name)))

            first = await asyncio.gather(*(ask(f"a{i}") for i in range(10)))
            other = hold_write_lock(tmp_path)
            ticks = 0
            try:
                blocked = [ask(f"b{i}") for i in range(10)]
                for _ in range(30):
                    await asyncio.sleep(0.01)
                    ticks += 1
                late = [ask(f"c{i}") for i in range(5)]
                await asyncio.sleep(0.1)
                assert not any(t.done() for t in blocked + late)
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert ticks == 30
            rest = await asyncio.wait_for(asyncio.gather(*blocked, *late), 30)
            return [*first, *rest]

    outcomes = asyncio.run(scenario())
    names = (
        [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)] + [f"c{i}" for i in range(5)]
    )
    assert [row.requestor for row, _ in outcomes] == names
    assert {row.state for row, _ in outcomes} == {RequestState.FULFILLED}
    handed = [node.id for _, nodes in outcomes for node in nodes]
    assert len(handed) == len(set(handed)) == 25
    assert len(store.nodes(["ready"])) == 5


# ------------------------------------------------------- a CLI beside `serve`


def ready_image(store: Store, tmp_path: Path) -> None:
    build = store.new_build("b", "img", str(tmp_path))
    store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "test")


def cli_acquire(cfg: Config, store: Store, got: list[object]) -> threading.Thread:
    """`freshpool acquire small` on the store, as the CLI runs it, in a thread."""

    def run() -> None:
        try:
            got.append(direct.acquire(cfg, store, ["small"], timeout=20))
        except Exception as exc:
            got.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_cli_acquire_beside_serve_waits_its_turn_behind_a_higher_priority_request(
    tmp_path: Path, store: Store
) -> None:
    """With `serve` running, `freshpool acquire` only joins the queue: the request an API
    client made first, at a higher priority, gets the first node; the CLI the next."""
    cfg = config(tmp_path)
    ready_image(store, tmp_path)

    async def scenario() -> tuple[int, list[object]]:
        with launcherlock.holding(tmp_path, launcherlock.SERVE):  # as `serve` holds it
            async with scheduling(cfg, store) as scheduler:
                api = asyncio.create_task(
                    scheduler.submit(NewRequest(("small",), "api job", priority=5))
                )
                row, _ = await api
                got: list[object] = []
                asking = cli_acquire(cfg, store, got)
                await until(lambda: len(store.pending_requests()) == 2)
                make_ready(store, "small")
                await a_pass(scheduler)
                assert store.request(row.id).state == RequestState.FULFILLED
                assert not got, "the CLI took a node ahead of a higher priority"
                make_ready(store, "small")
                await a_pass(scheduler)
                await until(lambda: bool(got))
                asking.join(10)
                return row.id, got

    api_id, got = asyncio.run(scenario())
    ((node,),) = got
    assert node.state == NodeState.IN_USE and node.request_id != api_id
    (api_node,) = store.request_nodes([api_id])[api_id]
    assert api_node.id < node.id


def test_a_cli_acquire_with_no_serve_places_its_request_itself(
    tmp_path: Path, store: Store
) -> None:
    cfg = config(tmp_path)
    ready_image(store, tmp_path)
    make_ready(store, "small")
    (node,) = direct.acquire(cfg, store, ["small"], timeout=5)
    assert node.state == NodeState.IN_USE


def test_a_cli_acquire_interrupted_while_waiting_cancels_its_request(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while `freshpool acquire` waits: its request is cancelled, so the node
    that turns ready next is not handed to a job that is no longer there."""
    cfg = config(tmp_path)
    ready_image(store, tmp_path)
    monkeypatch.setattr(direct, "LOOK_EVERY", 0.0)

    def interrupted(*_args: object) -> list[object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(direct, "_look", interrupted)
    with pytest.raises(KeyboardInterrupt):
        direct.acquire(cfg, store, ["small"], timeout=5)
    (request,) = store.list_requests()
    assert request.state == RequestState.CANCELLED
    make_ready(store, "small")
    (node,) = direct.acquire(cfg, store, ["small"], timeout=5)
    assert node.request_id != request.id
    assert store.request(request.id).state == RequestState.CANCELLED


def test_a_cli_acquire_runs_its_hand_out_again_when_another_process_settled_a_request(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a launcher can fail an overdue request while a CLI's hand-out
    reads the queue; the hand-out rolls back with StaleState and is run again, and
    neither the CLI nor its request is left hanging."""
    cfg = config(tmp_path)
    ready_image(store, tmp_path)
    make_ready(store, "small")
    real = handout._claim
    raced: list[int] = []

    def racing(*args: object, **kwargs: object) -> object:
        if not raced:
            raced.append(1)
            raise StaleState("a request stopped pending during the hand-out")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(handout, "_claim", racing)
    (node,) = direct.acquire(cfg, store, ["small"], timeout=5)
    assert raced and node.state == NodeState.IN_USE
    assert [r.state for r in store.list_requests()] == [RequestState.FULFILLED]


# ------------------------------------------------------- tenants' quotas


def test_a_tenant_at_its_quota_waits_while_others_are_served(tmp_path: Path, store: Store) -> None:
    """Tenant a may hold 2 nodes: of its three requests two are served, its third
    waits without holding back b's, and it is served once a gives a node back."""
    cfg = config(tmp_path, "tenants: [{name: a, max-nodes: 2}]")
    make_ready(store, "small", 4)

    async def scenario() -> list[Outcome]:
        async with scheduling(cfg, store) as scheduler:
            asks = [NewRequest(("small",), f"a-{i}", tenant="a") for i in range(3)]
            asks.append(NewRequest(("small",), "b-0", tenant="b"))
            return list(await asyncio.gather(*(scheduler.submit(x) for x in asks)))

    outcomes = asyncio.run(scenario())
    states = {row.requestor: row.state for row, _ in outcomes}
    assert states == {"a-0": "fulfilled", "a-1": "fulfilled", "a-2": "pending", "b-0": "fulfilled"}
    assert [n.state for n in store.nodes(["ready"])] == ["ready"]
    (first_nodes,) = [nodes for row, nodes in outcomes if row.requestor == "a-0"]
    store.release_set(first_nodes[0].id, "job done")

    async def after_release() -> None:
        async with scheduling(cfg, store) as scheduler:
            await a_pass(scheduler)

    asyncio.run(after_release())
    assert Counter(n.tenant for n in store.nodes(["in-use"])) == {"a": 2, "b": 1}
    assert store.pending_requests() == []


def test_a_set_larger_than_the_tenants_quota_is_refused_when_asked(
    tmp_path: Path, store: Store
) -> None:
    cfg = config(tmp_path, "tenants: [{name: a, max-nodes: 2}]")
    ready_image(store, tmp_path)
    with pytest.raises(BadInput, match="the tenant may hold at most 2 at once"):
        direct.acquire(cfg, store, ["small"] * 3, timeout=1, tenant="a")
    assert store.list_requests() == []
