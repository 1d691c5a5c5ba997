"""The store against a real SQLite file: migrations, compare-and-set, atomic hand-out."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import inspect

from freshpool.core.states import (
    BuildState,
    InvalidTransition,
    NodeState,
    RequestState,
    UploadState,
)
from freshpool.store import StaleState, Store
from freshpool.store.nodes import Move
from tests.support import fulfil

N = NodeState


def ready_node(store: Store, label: str = "l", provider: str = "p") -> int:
    node = store.new_node(label, provider, "b1", "fp-l")
    store.transition(node.id, N.BUILDING, N.TESTING, "created")
    store.transition(node.id, N.TESTING, N.READY, "tested")
    return node.id


@pytest.mark.sqlite_only
def test_migrations_create_every_table_and_wal(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    names = set(inspect(store.engine).get_table_names())
    assert {"nodes", "requests", "image_builds", "node_events", "alembic_version"} <= names
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    cluster = store.cluster_id
    store.close()
    assert Store.open(tmp_path).cluster_id == cluster  # stable across opens


def test_disallowed_transition_raises_and_changes_nothing(store: Store) -> None:
    node_id = ready_node(store)
    store.transition(node_id, N.READY, N.IN_USE, "job")
    with pytest.raises(InvalidTransition):
        store.transition(node_id, N.IN_USE, N.READY, "put back")
    with pytest.raises(InvalidTransition):
        store.move(node_id, N.READY, "put back")
    assert store.node(node_id).state == N.IN_USE


def test_compare_and_set_refuses_a_stale_expectation(store: Store) -> None:
    node_id = ready_node(store)
    store.transition(node_id, N.READY, N.IN_USE, "first")
    with pytest.raises(StaleState):
        store.transition(node_id, N.READY, N.IN_USE, "second")


def test_event_history_records_every_change(store: Store) -> None:
    node_id = ready_node(store)
    store.move(node_id, N.DELETING, "operator")
    store.remove_node(node_id, "gone")
    steps = [(e.from_state, e.to_state) for e in store.events(node_id)]
    assert steps == [
        (None, "building"),
        ("building", "testing"),
        ("testing", "ready"),
        ("ready", "deleting"),
        ("deleting", None),
    ]


def test_row_is_removed_only_from_deleting(store: Store) -> None:
    node_id = ready_node(store)
    with pytest.raises(StaleState):
        store.remove_node(node_id, "too early")
    assert store.node(node_id).state == N.READY


def test_node_ids_are_never_reused(store: Store) -> None:
    first = ready_node(store)
    store.move(first, N.DELETING, "x")
    store.remove_node(first, "gone")
    assert ready_node(store) > first


def test_new_nodes_writes_every_row_with_its_own_hostname_and_history(store: Store) -> None:
    rows = store.new_nodes("l", "p", "b1", "fp-l", 5)
    assert [r.hostname for r in rows] == [f"fp-l-{r.id}" for r in rows]
    assert len({r.id for r in rows}) == 5
    assert rows == [store.node(r.id) for r in rows]  # as written, column for column
    for row in rows:
        assert row.state == N.BUILDING
        assert [(e.from_state, e.to_state) for e in store.events(row.id)] == [(None, "building")]
    assert store.new_nodes("l", "p", "b1", "fp-l", 0) == []


def test_transitions_move_each_node_that_is_where_expected_and_only_those(store: Store) -> None:
    building = store.new_nodes("l", "p", "b1", "fp-l", 3)
    moved = ready_node(store)
    moves = [
        Move(building[0].id, N.BUILDING, N.TESTING, "up", {"external_id": "i-0"}),
        Move(moved, N.TESTING, N.READY, "tested"),  # it is ready already: stale
        Move(building[2].id, N.BUILDING, N.TESTING, "up", {"access": {"host": "h", "port": 22}}),
    ]
    first, stale, third = store.transitions(moves)
    assert isinstance(stale, StaleState)
    assert f"node {moved} is ready, not testing" in str(stale)
    assert (first.state, first.external_id, first.reason) == (N.TESTING, "i-0", "up")
    assert third.access == {"host": "h", "port": 22}
    assert store.node(building[1].id).state == N.BUILDING  # not in the batch
    # History only for the moves that happened; the stale one left none.
    assert [e.to_state for e in store.events(moved)] == ["building", "testing", "ready"]
    assert [e.to_state for e in store.events(first.id)] == ["building", "testing"]
    (ready,) = store.transitions([Move(first.id, N.TESTING, N.READY, "tested")])
    assert not isinstance(ready, StaleState) and ready.ready_at == ready.state_at
    with pytest.raises(InvalidTransition):  # checked against the state table first
        store.transitions([Move(third.id, N.TESTING, N.IN_USE, "skip the test")])
    assert store.node(third.id).state == N.TESTING


def test_remove_nodes_removes_only_deleting_rows(store: Store) -> None:
    gone, kept = ready_node(store), ready_node(store)
    store.move(gone, N.DELETING, "x")
    first, second = store.remove_nodes([(gone, "instance gone"), (kept, "wrong")])
    assert first is None and isinstance(second, StaleState)
    assert store.node(kept).state == N.READY
    with pytest.raises(LookupError):
        store.node(gone)
    assert store.events(gone)[-1].reason == "instance gone"


def test_fulfil_hands_a_node_set_from_one_provider(store: Store) -> None:
    ready_node(store, "a", "p1")  # p1 lacks a second "a"
    a1, a2, b = (
        ready_node(store, "a", "p2"),
        ready_node(store, "a", "p2"),
        ready_node(store, "b", "p2"),
    )
    request = store.new_request(["a", "b", "a"], requestor="t")
    got = fulfil(store, request.id, ["p1", "p2"])
    assert got is not None
    assert sorted(n.id for n in got) == sorted([a1, a2, b])
    assert {n.state for n in got} == {"in-use"}
    assert store.request(request.id).state == RequestState.FULFILLED
    with pytest.raises(StaleState):
        fulfil(store, request.id, ["p2"])


def test_fulfil_returns_none_when_not_all_ready(store: Store) -> None:
    ready_node(store, "a", "p")
    request = store.new_request(["a", "a"])
    assert fulfil(store, request.id, ["p"]) is None
    assert store.request(request.id).state == RequestState.PENDING
    assert [n.state for n in store.nodes()] == ["ready"]
    assert store.pending_demand() == {"a": 2}


@pytest.mark.sqlite_only
def test_migration_from_first_schema_keeps_rows(tmp_path: Path) -> None:
    from alembic import command

    from freshpool.store import db

    engine = db.make_engine(db.sqlite_url(tmp_path))
    with engine.begin() as conn:
        command.upgrade(db.alembic_config(conn), "0001")
        conn.exec_driver_sql(
            "INSERT INTO nodes (label, provider, state, hostname, created_at, state_at)"
            " VALUES ('l', 'p', 'ready', 'h', 1, 1)"
        )
    engine.dispose()
    store = Store.open(tmp_path)  # upgrades to head
    (node,) = store.nodes()
    assert (node.label, node.state, node.tenant, node.checked_at) == ("l", "ready", "", None)
    store.close()


def test_concurrent_claims_never_share_a_node(store: Store) -> None:
    """Many threads hand out a pool of 20 at once: each node goes to exactly one request."""
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(20):
        ready_node(store)

    def claim(_: int) -> list[int]:
        request = store.new_request(["l"])
        got = fulfil(store, request.id, ["p"])
        return [n.id for n in got or []]

    with ThreadPoolExecutor(max_workers=40) as workers:
        results = list(workers.map(claim, range(40)))
    won = [ids[0] for ids in results if ids]
    assert len(won) == 20 and len(set(won)) == 20
    assert store.nodes(["ready"]) == []


def test_the_store_knows_alembics_head_revision(store: Store) -> None:
    """Opening a store skips Alembic when the schema is at HEAD; HEAD must be the
    newest migration there is."""
    from alembic.script import ScriptDirectory

    from freshpool.store import db, migrations

    with store.engine.connect() as conn:
        head = ScriptDirectory.from_config(db.alembic_config(conn)).get_current_head()
        assert migrations.HEAD == head == db.current_revision(conn)

    # known_revisions() reads the same migrations Alembic does.
    with store.engine.connect() as conn:
        script = ScriptDirectory.from_config(db.alembic_config(conn))
        assert migrations.known_revisions() == sorted(r.revision for r in script.walk_revisions())


def test_a_schema_newer_than_this_freshpool_is_refused_with_what_to_do(store: Store) -> None:
    from sqlalchemy import text

    from freshpool.store import db

    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    url = store.engine.url.render_as_string(hide_password=False)
    store.close()
    with pytest.raises(db.SchemaTooNew, match="revision 0099, newer than this freshpool"):
        Store(url)


def test_a_restart_or_takeover_makes_every_delete_left_in_flight_due_again(store: Store) -> None:
    """A delete's lease (its row kept out of the next passes while it runs) dies with
    the launcher that ran it, a retry's as much as a first try's: else the provider
    that changed hands waits out the whole delete-timeout for the row, its slot in
    max-nodes held all that while."""
    first, retried, other = (ready_node(store, provider=p) for p in ("p", "p", "q"))
    for node in (first, retried, other):
        store.transition(node, N.READY, N.DELETING, "delete")
    now = time.time()
    store.record_delete_failure(retried, "the cloud said no", now - 1)
    store.lease_deletes({first: now + 60, retried: now + 60, other: now + 60})
    assert store.due_for_delete(now) == []
    store.release_delete_leases(now, "p")
    assert {n.id for n in store.due_for_delete(now)} == {first, retried}
    store.release_delete_leases(now)
    assert {n.id for n in store.due_for_delete(now)} == {first, retried, other}


def test_the_build_each_provider_launches_from(store: Store) -> None:
    """The newest ready build whose upload to the provider is ready; on a provider
    whose driver runs builds in place, also one with no upload there at all."""
    old = store.new_build("img-1", "img", "/layers/old")
    store.build_transition(old.id, BuildState.BUILDING, BuildState.READY, "built")
    time.sleep(0.01)  # the newer build is newer by its created_at
    new = store.new_build("img-2", "img", "/layers/new")
    store.build_transition(new.id, BuildState.BUILDING, BuildState.READY, "built")
    for build, provider in [(old, "cloud-a"), (new, "cloud-b"), (old, "cloud-b")]:
        upload = store.new_upload(build.id, provider)
        store.upload_transition(upload.id, UploadState.UPLOADING, UploadState.READY, "up",
                                external_id=f"ami-{build.id}-{provider}")  # fmt: skip
    store.new_upload(new.id, "cloud-a")  # still uploading: old serves there meanwhile
    store.new_upload(new.id, "host")  # in place, but an upload row that is not ready
    found = store.serving_on(
        "img", {"cloud-a": False, "cloud-b": False, "cloud-c": False, "host": True, "disk": True}
    )
    assert {p: (s.build.id, s.external_id) for p, s in found.items()} == {
        "cloud-a": (old.id, f"ami-{old.id}-cloud-a"),
        "cloud-b": (new.id, f"ami-{new.id}-cloud-b"),
        "host": (old.id, None),
        "disk": (new.id, None),
    }
    assert store.serving_on("img", {}) == {}
    assert store.serving_on("other", {"cloud-a": True}) == {}
