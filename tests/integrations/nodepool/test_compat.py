"""nodepool-compat against a real ZooKeeper (TLS) and a Zuul-side client."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from kazoo.client import KazooClient

from freshpool.core.states import NodeState
from freshpool.integrations.nodepool import bridge
from tests.api.conftest import wait_for
from tests.integrations.nodepool.conftest import CompatPool, kazoo_client
from tests.integrations.nodepool.zookeeper import ZooKeeper
from tests.integrations.nodepool.zuulside import NODES, ZuulSide

Start = Callable[..., CompatPool]
Zuul = Callable[[CompatPool], ZuulSide]


def node_ids_by_state(pool: CompatPool, state: str) -> set[int]:
    return {n.id for n in pool.store.nodes([state])}


def test_registers_and_shows_ready_nodes(compat_pool: Start, zuul_for: Zuul) -> None:
    pool = compat_pool(min_ready=2)
    client = zuul_for(pool)
    root = "/nodepool/components/pool"
    pools = wait_for(
        lambda: client.zk.exists(root) and client.zk.get_children(root), 30, "register"
    )
    data = json.loads(client.zk.get(f"/nodepool/components/pool/{pools[0]}")[0])
    assert data["id"] == "freshpool-test" and data["supported_labels"] == ["debian"]
    pool.wait_ready(2)

    def ready_znodes() -> set[str]:
        names = client.zk.get_children(NODES) if client.zk.exists(NODES) else []
        return {n for n in names if client.node(n)["state"] == "ready"}

    shown = wait_for(lambda: len(ready_znodes()) >= 2 and ready_znodes(), 30, "ready znodes")
    for name in shown:
        node = client.node(name)
        assert node["allocated_to"] is None and node["type"] == ["debian"]
    assert {int(n) for n in shown} <= node_ids_by_state(pool, "ready")


def test_multi_node_request_through_a_job(compat_pool: Start, zuul_for: Zuul) -> None:
    pool = compat_pool(min_ready=2)
    pool.wait_ready(2)
    client = zuul_for(pool)
    request = client.submit(["debian", "debian"], tenant_name="tenant-one")
    answer = client.wait(request)
    assert answer["state"] == "fulfilled", answer
    nodes = answer["nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2
    assert answer["requestor_data"]["job_name"] == "tox-py311"  # the client's keys kept
    for name in nodes:
        node = client.node(name)
        assert node["allocated_to"] == request and node["state"] == "ready"
        assert node["connection_type"] == "ssh" and node["interface_ip"]
        assert node["username"] == "root" and node["type"] == ["debian"]
        row = pool.store.node(int(name))
        assert row.state == NodeState.IN_USE and row.tenant == "tenant-one"
    client.accept(request, nodes)
    for name in nodes:
        client.set_state(name, "in-use")
    wait_for(lambda: all(pool.store.job_started_at(int(n)) for n in nodes), 30, "job start")
    client.give_back(nodes)

    def gone() -> bool:
        rows = {n.id: n.state for n in pool.store.nodes()}
        left = [n for n in nodes if rows.get(int(n)) in ("in-use", "ready")]
        return not left and not any(client.zk.exists(f"{NODES}/{n}") for n in nodes)

    wait_for(gone, 30, "nodes released and their znodes removed")


def test_unknown_label_and_bad_znodes_fail_alone(compat_pool: Start, zuul_for: Zuul) -> None:
    pool = compat_pool(min_ready=1)
    pool.wait_ready(1)
    client = zuul_for(pool)
    unknown = client.submit(["no-such-label"])
    not_json = client.submit_raw(b"{not json")
    bad_types = client.submit_raw(
        json.dumps({"node_types": "debian", "state": "requested"}).encode()
    )
    good = client.submit(["debian"])
    for request, why in ((unknown, "no-such-label"), (not_json, "not JSON"),
                         (bad_types, "node_types")):  # fmt: skip
        answer = client.wait(request)
        assert answer["state"] == "failed" and answer["declined_by"] == ["freshpool-test"]
        assert why in answer["failure_reason"]
    assert client.wait(good)["state"] == "fulfilled"


def test_a_set_larger_than_the_tenants_quota_fails_at_once(
    compat_pool: Start, zuul_for: Zuul
) -> None:
    """Tenant `capped` may hold one node: a two-node request could never be served,
    so it is declined with the reason rather than left waiting; one node is fine."""
    pool = compat_pool(min_ready=2)
    pool.wait_ready(2)
    client = zuul_for(pool)
    too_big = client.submit(["debian", "debian"], tenant_name="capped")
    one = client.submit(["debian"], tenant_name="capped")
    answer = client.wait(too_big)
    assert answer["state"] == "failed" and "max-nodes" in answer["failure_reason"]
    assert client.wait(one)["state"] == "fulfilled"


def test_client_that_dies_holding_locks(compat_pool: Start, zuul_for: Zuul) -> None:
    pool = compat_pool(min_ready=2)
    pool.wait_ready(2)
    client = zuul_for(pool)
    request = client.submit(["debian"])
    nodes = client.wait(request)["nodes"]
    client.accept(request, nodes)
    client.set_state(nodes[0], "in-use")
    client.zk.stop()  # the session ends: its locks go with it
    client.zk.close()
    node_id = int(nodes[0])
    wait_for(lambda: node_id not in node_ids_by_state(pool, "in-use"), 30, "the node released")
    watcher = zuul_for(pool)
    wait_for(lambda: not watcher.zk.exists(f"{NODES}/{nodes[0]}"), 30, "its znode removed")
    assert node_id not in node_ids_by_state(pool, "ready")  # single use: never back


def test_request_deleted_before_the_client_locked(compat_pool: Start, zuul_for: Zuul) -> None:
    pool = compat_pool(min_ready=1)
    pool.wait_ready(1)
    client = zuul_for(pool)
    request = client.submit(["debian"])
    nodes = client.wait(request)["nodes"]
    client.zk.delete(f"/nodepool/requests/{request}")
    wait_for(lambda: int(nodes[0]) not in node_ids_by_state(pool, "in-use"), 30, "release")


def test_hold_and_delete_set_by_the_client(compat_pool: Start, zuul_for: Zuul) -> None:
    pool = compat_pool(min_ready=2)
    pool.wait_ready(2)
    client = zuul_for(pool)
    request = client.submit(["debian"])
    held = client.wait(request)["nodes"][0]
    client.accept(request, [held])
    client.set_state(held, "hold")
    client.locks.pop(held).release()
    wait_for(lambda: pool.store.node(int(held)).state == NodeState.HOLD, 30, "held")

    # `nodepool delete` on a ready node: it is deleted, never handed out.
    def unallocated() -> list[str]:
        shown = [client.node(n) | {"id": n} for n in client.zk.get_children(NODES)]
        return [n["id"] for n in shown if n["state"] == "ready" and n["allocated_to"] is None]

    ready = wait_for(unallocated, 30, "a ready znode")
    client.set_state(ready[0], "deleting")
    wait_for(lambda: int(ready[0]) not in node_ids_by_state(pool, "ready"), 30, "deleted")
    assert pool.store.node(int(held)).state == NodeState.HOLD


def test_zookeeper_restart_mid_run(
    compat_pool: Start, zuul_for: Zuul, zookeeper: ZooKeeper
) -> None:
    pool = compat_pool(min_ready=2)
    pool.wait_ready(2)
    client = zuul_for(pool)
    first = client.submit(["debian"])
    first_nodes = client.wait(first)["nodes"]
    client.accept(first, first_nodes)
    zookeeper.restart()
    second = client.submit(["debian"])
    answer = client.wait(second, timeout=60)
    assert answer["state"] == "fulfilled"
    assert set(answer["nodes"]).isdisjoint(first_nodes)
    wait_for(lambda: client.zk.get_children("/nodepool/components/pool"), 30, "re-registered")
    # Every in-use node went to exactly one request; each request got one set.
    in_use = pool.store.nodes(["in-use"])
    assert len({n.id for n in in_use}) == len(in_use)
    assert pool.store.node(int(first_nodes[0])).state == NodeState.IN_USE


def test_a_waiting_request_follows_its_relative_priority(
    compat_pool: Start, zuul_for: Zuul
) -> None:
    pool = compat_pool(min_ready=1, max_nodes=1)
    pool.wait_ready(1)
    client = zuul_for(pool)
    first = client.submit(["debian"])
    taken = client.wait(first)["nodes"]
    client.accept(first, taken)
    # The pool is full: these two wait, the older one ahead.
    older = client.submit(["debian"], relative=5)
    newer = client.submit(["debian"], relative=5)

    def waiting() -> dict[str, int]:
        rows = pool.store.pending_requests()
        return {r.requestor.split(" ")[1]: r.priority for r in rows if r.requestor}

    wait_for(lambda: set(waiting()) == {older, newer}, 30, "both queued")
    # Zuul revises only a request nobody holds the lock of: we must have let go.
    assert wait_for(lambda: client.revise(newer, 0), 30, "the revise to get the lock")
    wait_for(lambda: waiting().get(newer) == 0, 30, "the new priority in the queue")
    assert waiting()[older] == -5
    client.give_back(taken)  # the pool has room again: one node, for `newer`
    assert client.wait(newer, timeout=60)["state"] == "fulfilled"
    answer = client.request(older)
    assert answer is not None and answer["state"] == "requested"
    assert older in waiting()


def test_a_held_node_later_used_is_released_and_its_znodes_go(
    compat_pool: Start, zuul_for: Zuul
) -> None:
    pool = compat_pool(min_ready=1)
    pool.wait_ready(1)
    client = zuul_for(pool)
    request = client.submit(["debian"])
    (node,) = client.wait(request)["nodes"]
    client.accept(request, [node])
    client.set_state(node, "hold")  # `zuul autohold`: kept, still locked
    wait_for(lambda: pool.store.node(int(node)).state == NodeState.HOLD, 30, "held")
    client.give_back([node])  # the hold is released: used, unlocked
    wait_for(lambda: int(node) not in node_ids_by_state(pool, "hold"), 30, "released")
    assert int(node) not in node_ids_by_state(pool, "ready")  # never handed again
    wait_for(lambda: not client.zk.exists(f"{NODES}/{node}"), 30, "its znode and lock removed")


def orphan(client: ZuulSide, node_id: int, launcher: str) -> str:
    name = f"{node_id:010d}"
    data = {"state": "ready", "launcher": launcher, "type": ["debian"], "allocated_to": None}
    client.zk.create(f"{NODES}/{name}", json.dumps(data).encode(), makepath=True)
    client.zk.create(f"{NODES}/{name}/lock", makepath=True)
    return name


def test_the_sweep_removes_our_znodes_with_no_node_only(
    compat_pool: Start, zuul_for: Zuul, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge, "CLEANUP_EVERY", bridge.IDLE)  # a sweep every pass
    pool = compat_pool(min_ready=1)
    pool.wait_ready(1)
    client = zuul_for(pool)
    ours = orphan(client, 990001, "freshpool-test")
    theirs = orphan(client, 990002, "nodepool-launcher-1")
    wait_for(lambda: not client.zk.exists(f"{NODES}/{ours}"), 30, "our orphan swept")
    assert client.zk.exists(f"{NODES}/{theirs}")
    shown = {int(n) for n in client.zk.get_children(NODES)}
    assert node_ids_by_state(pool, "ready") <= shown  # live nodes' znodes kept


def expire(zookeeper: ZooKeeper, session: KazooClient) -> None:
    """Close `session` from a second client with its id and password: the server
    expires it, and the first client learns so when it reconnects."""
    twin = kazoo_client(zookeeper, client_id=session.client_id)
    twin.stop()
    twin.close()


def requests_of(pool: CompatPool, name: str) -> list[int]:
    rows = pool.store.list_requests()
    return [r.id for r in rows if r.requestor.split(" ")[1:2] == [name]]


def test_an_expired_session_re_registers_and_fulfils_nothing_twice(
    compat_pool: Start, zuul_for: Zuul, zookeeper: ZooKeeper
) -> None:
    pool = compat_pool(min_ready=2, max_nodes=2)
    pool.wait_ready(2)
    client = zuul_for(pool)
    running = client.submit(["debian"])
    running_nodes = client.wait(running)["nodes"]
    client.accept(running, running_nodes)
    answered = client.submit(["debian"])  # answered, not yet accepted
    answered_nodes = client.wait(answered)["nodes"]
    waiting = client.submit(["debian"])  # the pool is full: it waits
    wait_for(lambda: requests_of(pool, waiting), 30, "the waiting request queued")
    leftover = orphan(client, 990003, "freshpool-test")  # as a previous run's
    bridge_zk = pool.running.compat.zk if pool.running.compat else None
    assert bridge_zk is not None
    old_session = bridge_zk.client_id[0]
    expire(zookeeper, bridge_zk)
    wait_for(lambda: bridge_zk.connected and bridge_zk.client_id[0] != old_session, 60,
             "a new session")  # fmt: skip
    pools = "/nodepool/components/pool"
    wait_for(lambda: client.zk.get_children(pools), 30, "registered again")
    wait_for(lambda: not client.zk.exists(f"{NODES}/{leftover}"), 30, "the leftover swept")
    assert client.request(answered)["nodes"] == answered_nodes  # type: ignore[index]
    client.give_back(running_nodes)  # room for the waiting one
    got = client.wait(waiting, timeout=60)
    assert got["state"] == "fulfilled"
    assert set(got["nodes"]).isdisjoint(running_nodes + answered_nodes)
    for name in (running, answered, waiting):
        assert len(requests_of(pool, name)) == 1, name  # one freshpool request each
    for name in answered_nodes + got["nodes"]:
        assert client.node(name)["allocated_to"] in (answered, waiting)
