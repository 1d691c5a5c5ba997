"""Usage from real history: a store driven with known timestamps gives exactly the
node-hours those lifetimes make, on SQLite (both hand-out paths) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest import approx

from freshpool import usage
from freshpool.config import parse
from freshpool.config.pricing import Prices
from freshpool.core.states import NodeState
from freshpool.store import StaleState, Store
from tests.support import fulfil

N = NodeState
CONFIG = """
providers:
  - name: p
    driver: sim
    label-cost-per-hour: {a: 0.5}
  - name: q
    driver: sim
    cost-per-hour: 2
labels:
  - {name: a, image: i}
  - {name: b, image: i}
images:
  - name: i
"""


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def lived(store: Store) -> None:
    """Two nodes of label a on provider p: one handed to tenant team-x for an hour and
    deleted, one left ready. Times are whole seconds, so the sums are exact."""
    clock = Clock(1000.0)
    store.clock = clock
    one, two = store.new_nodes("a", "p", "", "n", 2)
    clock.at += 60
    for node in (one, two):
        store.transition(node.id, N.BUILDING, N.TESTING, "up")
    clock.at += 60
    for node in (one, two):
        store.transition(node.id, N.TESTING, N.READY, "tested")
    clock.at += 1800  # 2920
    request = store.new_request(["a"], tenant="team-x")
    handed = fulfil(store, request.id, ["p"])
    assert handed is not None and handed[0].id == one.id
    clock.at += 3600  # 6520
    store.release_set(one.id, "job done")
    clock.at += 30
    store.transition(one.id, N.USED, N.DELETING, "delete")
    clock.at += 30  # 6580
    store.remove_node(one.id, "gone")


def test_known_lifetimes_give_exactly_their_node_hours(store: Store) -> None:
    lived(store)
    found = usage.node_spans(store, 0.0, 10_000.0)
    seconds = {(k.tenant, k.state): v for k, v in usage.usage.node_seconds(found).items() if v}
    assert seconds == {
        ("", N.BUILDING): 120.0,
        ("", N.TESTING): 120.0,
        # node one ready 1800 s; node two ready from 1120 until the window ends.
        ("", N.READY): 1800.0 + 8880.0,
        ("team-x", N.IN_USE): 3600.0,
        ("team-x", N.USED): 30.0,
        ("team-x", N.DELETING): 30.0,
    }
    assert all(k.label == "a" and k.provider == "p" for k in usage.usage.node_seconds(found))


def test_a_window_counts_only_what_falls_inside_it(store: Store) -> None:
    lived(store)
    # From 3000 (one in use since 2920, two ready) to 6550 (one deleting since 6550).
    found = usage.node_spans(store, 3000.0, 6550.0)
    by = usage.report(found, lambda _p, _l: None, 3000.0, 6550.0, by="tenant")
    team = next(r for r in by.rows if r.group == "team-x")
    assert team.hours == {"idle": 0.0, "in-use": 3520 / 3600, "overhead": 30 / 3600}
    pool = next(r for r in by.rows if r.group == "")
    assert pool.states == {N.READY: 3550 / 3600}


def test_cost_uses_the_configured_price_and_unknown_stays_unknown(store: Store) -> None:
    lived(store)
    prices = Prices(parse(CONFIG))
    found = usage.node_spans(store, 0.0, 10_000.0)
    by = usage.report(found, prices, 0.0, 10_000.0, by="provider")
    (only,) = by.rows
    assert only.group == "p" and only.cost == approx(only.node_hours * 0.5)
    # Label b has no price on p and none of its own: its hours make the cost unknown.
    clock = Clock(9000.0)
    store.clock = clock
    store.new_node("b", "p", "", "n")
    found = usage.node_spans(store, 0.0, 10_000.0)
    by = usage.report(found, prices, 0.0, 10_000.0, by="label")
    b = next(r for r in by.rows if r.group == "b")
    assert b.cost is None and b.unpriced_hours == 1000 / 3600
    assert by.total.cost is None


def test_tco_prices_the_same_hours_on_each_provider_and_owned_hosts(store: Store) -> None:
    lived(store)
    config = parse(CONFIG)
    found = usage.node_spans(store, 0.0, 10_000.0)
    view = usage.tco(found, config, Prices(config), (0.0, 10_000.0), 3000.0, 1)
    costs = {o.name: o.cost for o in view.options}
    hours = (120 + 120 + 1800 + 8880 + 3600 + 60) / 3600
    assert view.node_hours == hours and view.peak_nodes == 2 and view.hosts == 2
    assert costs["p"] == approx(hours * 0.5) and costs["q"] == approx(hours * 2)
    assert costs["owned hosts"] == approx(2 * 3000.0 * 10_000 / (30 * 86400))


def test_a_failed_removal_writes_no_event(store: Store) -> None:
    lived(store)
    node = store.new_node("a", "p", "", "n")
    with pytest.raises(StaleState):
        store.remove_node(node.id, "not deleting")
    assert [e.to_state for e in store.events(node.id)] == [N.BUILDING]
    assert store.events(node.id)[0].label == "a"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0005_fills_in_events_of_nodes_that_still_have_rows(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from alembic import command

    from freshpool.store import db

    if backend == "sqlite":
        url = db.sqlite_url(tmp_path)
    else:
        url = request.getfixturevalue("postgres").new_database()
    engine = db.make_engine(url)
    with engine.begin() as conn:
        command.upgrade(db.alembic_config(conn), "0004")
        conn.exec_driver_sql(
            "INSERT INTO nodes (id, label, provider, state, hostname, created_at, state_at,"
            " tenant) VALUES (1, 'l', 'p', 'in-use', 'h', 1, 1, 't')"
        )
        conn.exec_driver_sql(
            "INSERT INTO node_events (node_id, at, from_state, to_state, reason) VALUES"
            " (1, 1, NULL, 'building', ''), (1, 2, 'ready', 'in-use', ''),"
            " (2, 1, NULL, 'building', '')"
        )
    engine.dispose()
    store = Store(url)  # upgrades to head
    try:
        kept = [(e.label, e.provider, e.tenant) for e in store.events(1)]
        assert kept == [("l", "p", ""), ("l", "p", "t")]
        # Node 2's row was gone before the migration: what it was is not known.
        assert [(e.label, e.tenant) for e in store.events(2)] == [(None, None)]
    finally:
        store.close()
