"""The fleet chaos suite (tests/chaos/fleet.py): three `serve` launchers and two
`serve --api-only` servers on one PostgreSQL, clients keeping requests in flight
through the API servers, kill -9 of launchers, API servers and clients, database
cuts, invariants from the history and from what the clients were told. The
default suite runs a small size; `pytest -m chaos_full` the full one (55 kill
points, 22 cuts, 10 API server kills, 1,000 requests in flight at once). The
checkers are shown to reject forged histories."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import insert

from freshpool.core.states import NodeState, RequestState
from freshpool.store import Store, schema
from tests.chaos import invariants
from tests.chaos.fleet import PROVIDERS, Size, run_fleet_chaos
from tests.store.pg import TempPostgres

SMOKE = Size(
    kills=3, cuts=2, api_kills=2, client_kills=1, concurrency=60, client_procs=2,
    timeouts=(2.0, 5.0),
)  # fmt: skip


def test_fleet_smoke(tmp_path: Path, postgres: TempPostgres) -> None:
    report = run_fleet_chaos(tmp_path, postgres, SMOKE, seed=3)
    assert report.kill_points >= 3 and report.cuts >= 2 and report.api_kills >= 2
    assert report.violations == 0 and report.unexpected_exits == []
    assert report.handed_out > 0 and report.accepted > 0
    # Clients saw their server die and waited on at the other for the same requests.
    assert report.moves > 0 and report.resumed_elsewhere > 0
    # Every provider was driven, and more than one launcher wrote in the history.
    assert report.lease_takes >= len(PROVIDERS) and report.generations_writing > len(PROVIDERS)


@pytest.mark.chaos_full
def test_fleet_full(tmp_path: Path, postgres: TempPostgres) -> None:
    report = run_fleet_chaos(tmp_path, postgres, Size(), seed=1)
    assert report.kill_points >= 55 and report.cuts >= 22 and report.api_kills >= 10
    assert report.pending_peak >= 900 and report.violations == 0
    assert report.resumed_elsewhere > 0


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


def told(tmp_path: Path) -> tuple[Store, dict[int, str], dict[int, tuple[str, list[int]]]]:
    """A store with three requests as clients saw them: one fulfilled with node 7,
    one failed at its deadline, one cancelled; and what the clients were told."""
    store = Store.open(tmp_path)
    ids = [store.new_request(["debian"], requestor=f"t{i}").id for i in range(3)]
    with store.engine.begin() as conn:
        conn.execute(
            insert(schema.node_events).values(
                node_id=7, at=time.time(), from_state=NodeState.READY,
                to_state=NodeState.IN_USE, reason=f"handed to request {ids[0]}", label="debian",
            )
        )  # fmt: skip
        conn.execute(
            schema.requests.update()
            .where(schema.requests.c.id == ids[0])
            .values(state=RequestState.FULFILLED)
        )
    store.finish_request(ids[1], RequestState.FAILED, "deadline passed")
    store.cancel_request(ids[2], "the client gave up")
    accepted = {ids[i]: f"t{i}" for i in range(3)}
    ended = {ids[0]: ("fulfilled", [7]), ids[1]: ("failed", []), ids[2]: ("cancelled", [])}
    return store, accepted, ended


def test_checker_accepts_requests_that_ended_as_their_clients_were_told(tmp_path: Path) -> None:
    store, accepted, ended = told(tmp_path)
    assert invariants.requests_end_as_told(store, accepted, ended, ["t9"]) == {"t0", "t1", "t2"}


def test_checker_rejects_a_request_lost_or_ended_otherwise_than_told(tmp_path: Path) -> None:
    store, accepted, ended = told(tmp_path)
    first = min(accepted)
    with pytest.raises(invariants.Violation, match="accepted and is not stored: lost"):
        invariants.requests_end_as_told(store, {**accepted, 99: "t99"}, ended, [])
    with pytest.raises(invariants.Violation, match="told failed, the store has fulfilled"):
        invariants.requests_end_as_told(store, accepted, {**ended, first: ("failed", [])}, [])
    with pytest.raises(invariants.Violation, match=r"got nodes \[8\], the history handed it \[7\]"):
        invariants.requests_end_as_told(store, accepted, {**ended, first: ("fulfilled", [8])}, [])
    with pytest.raises(invariants.Violation, match="refused by the API and stored"):
        invariants.requests_end_as_told(store, accepted, ended, ["t1"])
    again = store.new_request(["debian"], requestor="t1").id
    store.finish_request(again, RequestState.FAILED, "deadline passed")
    with pytest.raises(invariants.Violation, match="stored more than once"):
        invariants.requests_end_as_told(store, accepted, ended, [])


def test_checker_rejects_a_request_left_pending_after_the_fleet_settled(tmp_path: Path) -> None:
    store, accepted, ended = told(tmp_path)
    left = store.new_request(["debian"], requestor="t3").id
    with pytest.raises(invariants.Violation, match=rf"requests \[{left}\] still pending"):
        invariants.requests_end_as_told(store, {**accepted, left: "t3"}, ended, [])
