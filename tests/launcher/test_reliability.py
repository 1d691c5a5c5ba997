"""Timeouts, health checks, leak cleanup, rate limits and the breaker.

Fault injection uses the sim driver (a simulated cloud kept in SQLite, as the
issue allows for faults); the health check and node-level checks use real local
nodes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from freshpool import launcher as launching
from freshpool.config import Provider, parse
from freshpool.core import timeouts
from freshpool.core.states import BuildState, NodeState
from freshpool.dispatch import direct
from freshpool.drivers.base import NodeSpec, SshAccess, load_driver
from freshpool.drivers.ssh import run as ssh_run
from freshpool.launcher import Launcher
from freshpool.launcher.gate import ProviderGate
from freshpool.store import Store
from tests.support import Pool, run_until, start

N = NodeState


def sim_launcher(
    tmp_path: Path, providers: str, label_extra: str = "", top_extra: str = "", min_ready: int = 2
) -> Launcher:
    text = f"""
state-dir: {tmp_path / "state"}
interval: 0.05
cleanup-interval: 0.05
{top_extra}
providers:
{providers}
labels:
  - name: debian
    image: img
    min-ready: {min_ready}
{label_extra}
images:
  - name: img
"""
    config = parse(text, "sim.yaml")
    store = Store.open(config.state_dir)
    build = store.new_build("img-1", "img", str(tmp_path / "no-layers"))
    store.build_transition(build.id, BuildState.BUILDING, BuildState.READY, "sim")
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    return launching.build(config, store, drivers, images=False, publish=False)


SIM = """
  - name: sim
    driver: sim
    max-nodes: 10
    boot-timeout: 0.3
"""


def history(launcher: Launcher, node_id: int) -> list[tuple[str | None, str | None, str]]:
    return [(e.from_state, e.to_state, e.reason) for e in launcher.store.events(node_id)]


# ----------------------------------------------------------------- units


def test_gate_limits_rate_and_trips_breaker() -> None:
    now = [100.0]
    provider = Provider(name="p", rate=2, breaker_threshold=3, breaker_cooldown=10)
    gate = ProviderGate(provider, clock=lambda: now[0])
    assert [gate.take() for _ in range(3)] == [True, True, False]
    assert gate.next_token_in() == pytest.approx(0.5)
    now[0] += 0.5
    assert gate.take()
    for _ in range(3):
        gate.failure("boom")
    assert gate.is_open() and not gate.take()
    now[0] += 10.1
    assert not gate.is_open()
    gate.failure("still broken")  # the trial call fails: paused again, twice as long
    assert gate.is_open()
    now[0] += 15
    assert gate.is_open()
    now[0] += 6
    gate.success()
    assert gate.take()


@pytest.mark.parametrize(
    ("state", "seconds", "target"),
    [
        (N.BUILDING, 121, N.FAILED),
        (N.TESTING, 200, N.FAILED),
        (N.READY, 11, N.DELETING),
        (N.IN_USE, 21, N.FAILED),
        (N.HOLD, 31, N.DELETING),
    ],
)
def test_every_timed_state_has_a_way_out(
    state: NodeState, seconds: float, target: NodeState
) -> None:
    config = parse("""
providers: [{name: p}]
labels: [{name: l, image: i, max-ready-age: 10, job-timeout: 20, max-hold-age: 30}]
images: [{name: i}]
""")
    label, provider = config.labels[0], config.providers[0]
    assert timeouts.overdue(state, 1, label, provider) is None
    due = timeouts.overdue(state, seconds, label, provider)
    assert due is not None and due.target == target and due.reason


# ------------------------------------------------------- with the sim cloud


def test_hung_create_times_out_and_its_leak_is_cleaned(tmp_path: Path) -> None:
    launcher = sim_launcher(tmp_path, SIM + "    sim: {timeout-rate: 1.0}\n", min_ready=1)
    driver = launcher.shared.configured["sim"]
    run_until(
        launcher,
        lambda: any(e.to_state == "failed" for n in range(1, 4) for e in launcher.store.events(n)),
        timeout=30,
    )
    reasons = [r for n in range(1, 4) for _, to, r in history(launcher, n) if to == "failed"]
    assert any("timed out" in r or "longer than" in r for r in reasons), reasons
    # Stop the faults: the pool recovers and no instance is left without a row.
    driver.settings = driver.settings.model_copy(update={"timeout_rate": 0.0})
    run_until(
        launcher,
        lambda: (
            len(launcher.store.nodes(["ready"])) == 1
            and {i.tags.node_id for i in driver.list_instances()}
            == {n.id for n in launcher.store.nodes()}
        ),
        timeout=30,
    )


def test_job_timeout_reclaims_an_in_use_node(tmp_path: Path) -> None:
    launcher = sim_launcher(tmp_path, SIM, label_extra="    job-timeout: 0.2\n", min_ready=1)
    run_until(launcher, lambda: bool(launcher.store.nodes(["ready"])))
    (node,) = direct.acquire(launcher.config, launcher.store, ["debian"], timeout=5)
    run_until(launcher, lambda: node.id not in {n.id for n in launcher.store.nodes()})
    steps = history(launcher, node.id)
    assert steps[-3][:2] == ("in-use", "failed")
    assert "job timeout" in steps[-3][2]


def test_hold_and_ready_ages_delete(tmp_path: Path) -> None:
    launcher = sim_launcher(
        tmp_path, SIM, min_ready=2, label_extra="    max-hold-age: 0.2\n    max-ready-age: 0.5\n"
    )
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 2)
    first, second = launcher.store.nodes(["ready"])
    launcher.store.move(first.id, N.HOLD, "held")
    run_until(launcher, lambda: not {first.id, second.id} & {n.id for n in launcher.store.nodes()})
    assert "max-hold-age" in history(launcher, first.id)[-2][2]
    assert "max-ready-age" in history(launcher, second.id)[-2][2]


def test_request_without_deadline_fails_after_request_timeout(tmp_path: Path) -> None:
    launcher = sim_launcher(tmp_path, SIM, min_ready=0, top_extra="request-timeout: 0.1\n")
    request = launcher.store.new_request(["debian"])
    time.sleep(0.2)
    launcher.pass_once()
    after = launcher.store.request(request.id)
    assert after.state == "failed" and "deadline" in after.reason


def test_unknown_instance_seen_twice_is_deleted(tmp_path: Path) -> None:
    launcher = sim_launcher(tmp_path, SIM, min_ready=0)
    # Started first: the sweeps only look at providers it drives (on PostgreSQL none
    # before its leases), and a stray there at the start is deleted by the recovery
    # at once, never counted as a leak the sweeps found.
    start(launcher)
    driver = launcher.shared.configured["sim"]
    stray = NodeSpec(4242, launcher.store.cluster_id, "debian", "stray", "img-1", ())
    driver.create(stray).wait(timeout=5)
    launcher.leaks.sweep()
    assert driver.list_instances(), "one sweep must not delete"
    launcher.leaks.sweep()
    run_until(launcher, lambda: not driver.list_instances())
    assert launcher.leaks.found == 1


def test_lying_deletes_are_caught_by_the_sweep(tmp_path: Path) -> None:
    launcher = sim_launcher(tmp_path, SIM + "    sim: {lie-rate: 1.0}\n", min_ready=1)
    driver = launcher.shared.configured["sim"]
    run_until(launcher, lambda: bool(launcher.store.nodes(["ready"])))
    (node,) = direct.acquire(launcher.config, launcher.store, ["debian"], timeout=5)
    launcher.store.release_set(node.id, "released")
    run_until(launcher, lambda: node.id not in {n.id for n in launcher.store.nodes()})
    assert node.id in {i.tags.node_id for i in driver.list_instances()}  # the lie
    driver.settings = driver.settings.model_copy(update={"lie_rate": 0.0})
    run_until(launcher, lambda: node.id not in {i.tags.node_id for i in driver.list_instances()})
    assert launcher.leaks.found >= 1


def test_vanished_instance_is_replaced(tmp_path: Path) -> None:
    launcher = sim_launcher(tmp_path, SIM, min_ready=1)
    run_until(launcher, lambda: bool(launcher.store.nodes(["ready"])))
    (node,) = launcher.store.nodes(["ready"])
    db = sqlite3.connect(launcher.config.state_dir / "providers" / "sim" / "sim.db")
    db.execute("DELETE FROM instances WHERE node_id = ?", (node.id,))
    db.commit()
    run_until(
        launcher,
        lambda: (
            node.id not in {n.id for n in launcher.store.nodes()}
            and len(launcher.store.nodes(["ready"])) == 1
        ),
    )
    assert any("vanished" in r for _, _, r in history(launcher, node.id))


def test_rate_limit_bounds_launches_per_pass(tmp_path: Path) -> None:
    launcher = sim_launcher(
        tmp_path, SIM.replace("max-nodes: 10", "max-nodes: 50") + "    rate: 4\n", min_ready=40
    )
    launcher.pass_once()
    assert len(launcher.store.nodes()) <= 5
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 40, timeout=60)


def test_breaker_sends_demand_to_the_healthy_provider(tmp_path: Path) -> None:
    providers = """
  - name: broken
    driver: sim
    max-nodes: 10
    breaker-threshold: 2
    breaker-cooldown: 60
    sim: {failure-rate: 1.0, leak-on-failure: 0}
  - name: healthy
    driver: sim
    max-nodes: 10
"""
    launcher = sim_launcher(tmp_path, providers, min_ready=4)
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 4, timeout=30)
    assert launcher.gates["broken"].is_open()
    assert {n.provider for n in launcher.store.nodes(["ready"])} == {"healthy"}


def test_demand_goes_first_where_the_clouds_quota_leaves_most_room(tmp_path: Path) -> None:
    # "big" allows 10 nodes by its config, but its cloud's quota only 2 (a sim quota,
    # as a cloud driver's limits() reports it); "small" allows and fits 5.
    providers = """
  - name: big
    driver: sim
    max-nodes: 10
    sim: {quota: 2}
  - name: small
    driver: sim
    max-nodes: 5
"""
    launcher = sim_launcher(tmp_path, providers, min_ready=4)
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 4, timeout=30)
    assert {n.provider for n in launcher.store.nodes(["ready"])} == {"small"}


def test_failing_deletes_trip_their_providers_breaker(tmp_path: Path) -> None:
    """Each delete's outcome reaches the gate of the provider it ran on (at its
    max-nodes, the provider gets no launches that could fail instead)."""
    provider = (
        SIM.replace("max-nodes: 10", "max-nodes: 2")
        + "    breaker-threshold: 2\n    breaker-cooldown: 60\n"
    )
    launcher = sim_launcher(tmp_path, provider, min_ready=2)
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 2)
    driver = launcher.shared.configured["sim"]
    driver.settings = driver.settings.model_copy(update={"failure_rate": 1.0})
    for node in launcher.store.nodes(["ready"]):
        launcher.store.move(node.id, N.DELETING, "test: delete it")
    run_until(launcher, launcher.gates["sim"].is_open, timeout=30)
    assert all(n.delete_attempts >= 1 for n in launcher.store.nodes([N.DELETING]))


# ---------------------------------------------------------- real local nodes


def test_health_check_replaces_a_broken_ready_node(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_ready=1, ready_command="test ! -e /etc/broken")
    text = pool.config_path.read_text().replace(
        "    min-ready: 1\n", "    min-ready: 1\n    health-interval: 0.2\n"
    )
    pool.config_path.write_text(text)
    from freshpool.config import load

    pool.config = load(pool.config_path)
    launcher = pool.launcher()
    pool.fill(launcher, 1)
    (node,) = pool.store.nodes(["ready"])
    assert ssh_run(SshAccess(**node.access), "touch /etc/broken").returncode == 0
    run_until(
        launcher,
        lambda: (
            node.id not in {n.id for n in pool.store.nodes()}
            and len(pool.store.nodes(["ready"])) == 1
        ),
        timeout=60,
    )
    failed = [e.reason for e in pool.store.events(node.id) if e.to_state == "failed"]
    assert failed and "health check" in failed[0]
