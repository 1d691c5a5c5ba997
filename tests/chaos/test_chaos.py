"""The chaos suite: kill -9 at seeded points, then check the invariants.

CI runs the smoke size; `pytest -m chaos_full` runs the full size (sim driver with
200 kill points and 30% failing / 10% hanging calls and lying deletes, real local
driver with 20 kill points).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from freshpool.core import states
from freshpool.core.states import NodeState
from freshpool.store import Store
from freshpool.store.schema import node_events
from tests.chaos import invariants
from tests.chaos.runner import run_chaos


def test_sim_smoke_with_faults(tmp_path: Path) -> None:
    report = run_chaos(tmp_path, "sim", kills=40, seed=11, faults=True)
    assert report.kill_points == 40 and report.violations == 0
    assert report.handed_out > 0 and report.nodes_seen > report.handed_out


def test_local_smoke(tmp_path: Path, image_build_dir: Path) -> None:
    report = run_chaos(tmp_path, "local", kills=6, seed=5, image_dir=image_build_dir, subnet=218)
    assert report.kill_points == 6 and report.nodes_seen > 0


@pytest.mark.chaos_full
def test_sim_full_with_faults(tmp_path: Path) -> None:
    report = run_chaos(tmp_path, "sim", kills=200, seed=7, faults=True)
    assert report.kill_points == 200


@pytest.mark.chaos_full
def test_local_full(tmp_path: Path, image_build_dir: Path) -> None:
    report = run_chaos(tmp_path, "local", kills=20, seed=5, image_dir=image_build_dir, subnet=219)
    assert report.kill_points == 20


def test_suite_catches_a_release_that_returns_nodes_to_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Break single use on purpose: the invariants must notice."""
    broken = dict(states.NODE_TRANSITIONS)
    broken[NodeState.IN_USE] = broken[NodeState.IN_USE] | {NodeState.READY}
    monkeypatch.setattr(states, "NODE_TRANSITIONS", broken)
    monkeypatch.setattr(
        Store,
        "release_set",
        lambda store, node_id, why="released": [
            store.move(node_id, NodeState.READY, "put back (deliberately broken)")
        ],
    )
    # On a loaded machine a short run may release nothing, and then there is nothing
    # to catch: such a run is retried with the next seed, never counted as a pass.
    for seed in range(2, 7):
        root = tmp_path / f"seed-{seed}"
        try:
            run_chaos(root, "sim", kills=10, seed=seed)
        except invariants.Violation as caught:
            assert re.search(r"became ready|forbidden transition", str(caught)), caught
            return
        store = Store.open(root / "state")
        with store.engine.connect() as conn:
            put_back = conn.execute(
                select(func.count()).where(node_events.c.reason.startswith("put back"))
            ).scalar_one()
        store.close()
        assert not put_back, f"{put_back} nodes put back to ready and no violation found"
    pytest.fail("no chaos run released a node: the broken release was never exercised")


def forged(tmp_path: Path, events: list[tuple[int, str | None, str | None, str]]) -> Store:
    store = Store.open(tmp_path)
    with store.engine.begin() as conn:
        for node_id, old, new, reason in events:
            conn.execute(
                insert(node_events).values(
                    node_id=node_id, at=time.time(), from_state=old, to_state=new, reason=reason
                )
            )
    return store


def test_checker_rejects_a_node_handed_to_two_requests(tmp_path: Path) -> None:
    store = forged(
        tmp_path,
        [
            (1, None, "building", ""),
            (1, "building", "testing", ""),
            (1, "testing", "ready", ""),
            (1, "ready", "in-use", "handed to request 1"),
            (1, "in-use", "in-use", "handed to request 2"),
        ],
    )
    with pytest.raises(invariants.Violation, match="handed to requests"):
        invariants.no_node_handed_out_twice(store)


def test_checker_rejects_a_skipped_state(tmp_path: Path) -> None:
    store = forged(tmp_path, [(1, None, "building", ""), (1, "building", "ready", "")])
    with pytest.raises(invariants.Violation, match="forbidden transition building -> ready"):
        invariants.history_follows_the_state_table(store)


def test_checker_rejects_a_lost_request(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO requests (labels, state, reason, created_at, state_at)"
            " VALUES ('[\"x\"]', 'failed', '', 0, 0)"
        )
    with pytest.raises(invariants.Violation, match="without a reason"):
        invariants.no_request_lost(store)
