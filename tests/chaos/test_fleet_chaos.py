"""The fleet chaos suite (tests/chaos/fleet.py): three `serve` launchers on one
PostgreSQL, kill -9 and database cuts, invariants from the history. The default
suite runs a small size; `pytest -m chaos_full` the full one (55 kill points, 22
cuts, 1,000 requests). The checkers are shown to reject forged histories."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import insert

from freshpool.store import Store, schema
from tests.chaos import invariants
from tests.chaos.fleet import PROVIDERS, run_fleet_chaos
from tests.store.pg import TempPostgres


def test_fleet_smoke(tmp_path: Path, postgres: TempPostgres) -> None:
    report = run_fleet_chaos(tmp_path, postgres, kills=4, cuts=3, requests=40, seed=3)
    assert report.kill_points >= 4 and report.cuts >= 3
    assert report.violations == 0 and report.unexpected_exits == []
    assert report.handed_out > 0 and sum(report.requests.values()) >= 40
    # Every provider was driven, and more than one launcher wrote in the history.
    assert report.lease_takes >= len(PROVIDERS) and report.generations_writing > len(PROVIDERS)


@pytest.mark.chaos_full
def test_fleet_full(tmp_path: Path, postgres: TempPostgres) -> None:
    report = run_fleet_chaos(tmp_path, postgres, kills=55, cuts=22, requests=1000, seed=1)
    assert report.kill_points >= 55 and report.cuts >= 22
    assert sum(report.requests.values()) >= 1000 and report.violations == 0


def test_fleet_http_clients_smoke(tmp_path: Path, postgres: TempPostgres) -> None:
    """Clients through the launchers' own APIs, a server dying under them."""
    report = run_fleet_chaos(
        tmp_path, postgres, kills=2, cuts=1, requests=20, seed=4, clients="http", client_procs=2
    )
    assert report.kill_points >= 2 and report.handed_out > 0 and report.violations == 0


def forged(tmp_path: Path, events: list[tuple], takes: list[tuple] | None = None) -> Store:
    """A store whose history is `events` (node, from, to, provider, launcher,
    generation) and `takes` (provider, owner, generation, at)."""
    store = Store.open(tmp_path)
    with store.engine.begin() as conn:
        for node_id, old, new, provider, launcher, generation in events:
            conn.execute(
                insert(schema.node_events).values(
                    node_id=node_id,
                    at=time.time(),
                    from_state=old,
                    to_state=new,
                    reason="",
                    label="debian",
                    provider=provider,
                    launcher=launcher,
                    generation=generation,
                )
            )
        for provider, owner, generation, at in takes or []:
            conn.execute(
                insert(schema.lease_takes).values(
                    provider=provider, owner=owner, generation=generation, at=at, previous=""
                )
            )
    return store


TAKES = [("p", "a", 1, 10.0), ("p", "b", 2, 20.0)]


def test_checker_rejects_an_old_lease_writing_after_a_new_one(tmp_path: Path) -> None:
    store = forged(
        tmp_path,
        [
            (1, None, "building", "p", "a", 1),
            (2, None, "building", "p", "b", 2),
            (1, "building", "testing", "p", "a", 1),
        ],
        TAKES,
    )
    with pytest.raises(invariants.Violation, match="generation 1 after event 2 at generation 2"):
        invariants.one_driver_at_a_time(store)


def test_checker_rejects_a_write_by_a_launcher_not_holding_the_generation(
    tmp_path: Path,
) -> None:
    store = forged(tmp_path, [(1, None, "building", "p", "b", 1)], TAKES)
    with pytest.raises(invariants.Violation, match="lease history gives to a"):
        invariants.one_driver_at_a_time(store)


def test_checker_accepts_one_driver_after_another(tmp_path: Path) -> None:
    store = forged(
        tmp_path,
        [(1, None, "building", "p", "a", 1), (1, "building", "failed", "p", "b", 2)],
        TAKES,
    )
    assert invariants.one_driver_at_a_time(store) == 2


def test_checker_rejects_a_provider_over_its_max_nodes(tmp_path: Path) -> None:
    born = [(i, None, "building", "p", None, None) for i in range(1, 4)]
    store = forged(tmp_path, [*born[:2], (1, "deleting", None, "p", None, None), born[2]])
    assert invariants.caps_held(store, {"p": 2}, {"debian": 2})["provider:p"] == 2
    store = forged(tmp_path / "over", born)
    with pytest.raises(invariants.Violation, match="provider:p had 3 nodes"):
        invariants.caps_held(store, {"p": 2}, {})
    with pytest.raises(invariants.Violation, match="label:debian had 3 nodes"):
        invariants.caps_held(store, {}, {"debian": 2})


def test_checker_rejects_a_slow_or_missing_takeover(tmp_path: Path) -> None:
    store = forged(tmp_path, [], TAKES)
    assert invariants.failovers(store, [(15.0, "a")], limit=6.0) == [("a", "p", 5.0)]
    with pytest.raises(invariants.Violation, match=r"taken again 5.00 s after"):
        invariants.failovers(store, [(15.0, "a")], limit=4.0)
    with pytest.raises(invariants.Violation, match="never taken again"):
        invariants.failovers(store, [(25.0, "b")], limit=4.0)
