"""The launcher with real local nodes: fill, test, hand out, delete, recover after a crash."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from freshpool.core.states import NodeState
from freshpool.dispatch import direct
from freshpool.drivers import ssh
from freshpool.drivers.base import NodeSpec, SshAccess, load_driver
from tests.support import Pool, run_until, start


def test_fills_to_min_ready_with_tested_nodes(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=3)
    launcher = pool.launcher()
    pool.fill(launcher, 3)
    ready = pool.store.nodes(["ready"])
    assert len(ready) == 3
    for node in ready:
        steps = [e.to_state for e in pool.store.events(node.id)]
        assert steps == ["building", "testing", "ready"]
        result = ssh.run(SshAccess(**node.access), "hostname")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == node.hostname
    # Level-triggered: another pass with nothing missing launches nothing.
    launcher.pass_once()
    assert len(pool.store.nodes()) == 3


def test_a_pass_writes_its_launches_rows_at_once_before_any_instance(
    make_pool: Callable[..., Pool],
) -> None:
    """A pass writes all its new rows in one transaction, then calls the provider:
    a crash between the two leaves rows (recovery removes them), never an
    instance without a row. One transaction per node made a big pass slow."""
    # A lease controller renews its leases every tenth of the TTL: a long TTL keeps
    # those writes (PostgreSQL's) out of the pass counted.
    pool = make_pool(min_ready=0, extra="lease-ttl: 600\n")
    launcher = pool.launcher()
    # Started with nothing to launch: the start writes too (its recovery; on
    # PostgreSQL its heartbeat and its leases), and the pass counted is a launching one.
    start(launcher)
    rows_at_create: list[int] = []
    driver = launcher.shared.configured["local"]
    create = driver.create

    def counting_create(spec: NodeSpec):  # type: ignore[no-untyped-def]
        rows_at_create.append(len(pool.store.nodes()))
        return create(spec)

    driver.create = counting_create  # type: ignore[method-assign]
    pool.store.new_request(["debian"] * 4)
    writes = pool.store.writes_here()
    launcher.pass_once()
    assert rows_at_create == [4, 4, 4, 4]
    # The rows' transaction, and at most one each for the creates and the tests
    # that finished within the pass: never one per node.
    assert pool.store.writes_here() - writes <= 3
    pool.fill(launcher, 4)


def test_used_node_is_deleted_and_replaced_never_reused(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=2)
    launcher = pool.launcher()
    pool.fill(launcher, 2)
    (node,) = direct.acquire(pool.config, pool.store, ["debian"], timeout=5)
    pool.store.release_set(node.id, "released")
    run_until(
        launcher,
        lambda: (
            node.id not in {n.id for n in pool.store.nodes()}
            and len(pool.store.nodes(["ready"])) == 2
        ),
    )
    assert node.id not in {n.id for n in pool.store.nodes()}
    driver = launcher.shared.configured["local"]
    assert node.external_id not in {i.external_id for i in driver.list_instances()}
    history = [(e.from_state, e.to_state) for e in pool.store.events(node.id)]
    assert history[-3:] == [("in-use", "used"), ("used", "deleting"), ("deleting", None)]
    assert ("in-use", "ready") not in history


def test_an_out_of_memory_kill_is_in_the_nodes_history(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=1, extra_label="    limits: {memory: 64MiB}\n")
    launcher = pool.launcher()
    pool.fill(launcher, 1)
    (node,) = direct.acquire(pool.config, pool.store, ["debian"], timeout=5)
    # The job: tail holds 200 MiB without a newline in memory, past the node's limit.
    job = ssh.run(SshAccess(**node.access), "head -c 200M /dev/zero | tail >/dev/null")
    assert job.returncode != 0
    pool.store.release_set(node.id, "job finished")
    run_until(launcher, lambda: node.id not in {n.id for n in pool.store.nodes()})
    (deleting,) = (e for e in pool.store.events(node.id) if e.to_state == "deleting")
    assert deleting.reason.startswith("out of memory"), deleting


def test_failing_ready_command_never_serves(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=1, ready_command="exit 3")
    launcher = pool.launcher()
    seen: set[int] = set()

    def failed_one_and_cleaned() -> bool:
        seen.update(n.id for n in pool.store.nodes())
        return (
            bool(seen)
            and not pool.store.nodes()
            and bool([e for i in seen for e in pool.store.events(i) if e.to_state == "failed"])
        )

    run_until(launcher, failed_one_and_cleaned, timeout=30)
    reasons = [e.reason for i in seen for e in pool.store.events(i) if e.to_state == "failed"]
    assert any("ready command exited 3" in r for r in reasons), reasons
    assert not any(e.to_state == "ready" for i in seen for e in pool.store.events(i))
    assert launcher.shared.configured["local"].list_instances() == []


def test_restart_adopts_live_nodes_and_removes_the_rest(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=2)
    first = pool.launcher()
    pool.fill(first, 2)
    ready_ids = {n.id for n in pool.store.nodes(["ready"])}
    # A launch cut off mid-way by a crash: its row says building, the instance exists.
    build = pool.store.serving_build("debian-bookworm")
    row = pool.store.new_node("debian", "local", build.id, "debian")
    driver = first.shared.configured["local"]
    spec = NodeSpec(
        row.id,
        pool.store.cluster_id,
        "debian",
        row.hostname,
        build.id,
        (Path(build.path) / "rootfs",),
    )
    driver.create(spec).wait(timeout=30)
    # A stray: an instance with our cluster's tags and no row at all.
    stray = NodeSpec(
        999_999, pool.store.cluster_id, "debian", "stray", build.id, (Path(build.path) / "rootfs",)
    )
    driver.create(stray).wait(timeout=30)
    del first  # the "crash": nothing of the first launcher survives but the store

    second = pool.launcher()
    second.pass_once()
    run_until(
        second,
        lambda: row.id not in {n.id for n in pool.store.nodes()} and not second.leaks.deleting,
    )
    assert {n.id for n in pool.store.nodes(["ready"])} == ready_ids
    live = {i.tags.node_id for i in second.shared.configured["local"].list_instances() if i.alive}
    assert live == ready_ids
    reasons = [e.reason for e in pool.store.events(row.id) if e.to_state == "failed"]
    assert reasons == ["launcher restarted while the node was building"]


def test_vanished_ready_node_is_replaced(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=1)
    launcher = pool.launcher()
    pool.fill(launcher, 1)
    (node,) = pool.store.nodes(["ready"])
    driver = load_driver(pool.config.providers[0], pool.store.cluster_id, pool.config.state_dir)
    driver.delete(node.external_id).wait(timeout=30)  # gone behind our back
    again = pool.launcher()
    again.pass_once()
    assert pool.store.node(node.id).state in (NodeState.FAILED, NodeState.DELETING)
    run_until(again, lambda: any(n.id != node.id for n in pool.store.nodes(["ready"])))
