"""The change watcher: another connection's commit that changes nodes or requests is
seen at the next look (PRAGMA data_version on SQLite, LISTEN/NOTIFY on PostgreSQL);
nothing committed, or a compare-and-set that matched nothing, is not."""

from __future__ import annotations

import time

import pytest

from freshpool.core.errors import StaleState
from freshpool.core.states import NodeState
from freshpool.store import Store
from tests.store.test_store import ready_node


def seen_within(watcher_changed, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    """Whether the watcher says "changed" before `seconds` pass (a NOTIFY travels a
    socket, so the look right after the commit may come before it lands)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if watcher_changed():
            return True
        time.sleep(0.01)
    return False


def quiet_for(watcher_changed, seconds: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    return not seen_within(watcher_changed, seconds)


def test_a_commit_elsewhere_is_seen_and_then_nothing_more(store: Store) -> None:
    watcher = store.change_watcher()
    try:
        assert quiet_for(watcher.changed)
        node = ready_node(store, "a")
        assert seen_within(watcher.changed)
        assert quiet_for(watcher.changed)
        store.new_request(["a"], requestor="job")
        assert seen_within(watcher.changed)
        assert quiet_for(watcher.changed)
        store.transition(node, NodeState.READY, NodeState.DELETING, "gone")
        assert seen_within(watcher.changed)
    finally:
        watcher.close()


def test_on_postgresql_a_write_that_changed_no_node_sends_nothing(
    store: Store,
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's data_version moves on every commit; schedulers there are one")
    node = ready_node(store, "a")
    watcher = store.change_watcher()
    try:
        assert quiet_for(watcher.changed)
        # A compare-and-set that finds the node moved on: a scheduler's pass that
        # found nothing must not wake the other schedulers, or they would wake it back.
        with pytest.raises(StaleState):
            store.transition(node, NodeState.IN_USE, NodeState.USED, "not in use")
        store.hand_out([], lambda _queue: [], ["p"])
        assert quiet_for(watcher.changed)
    finally:
        watcher.close()


def test_on_postgresql_a_broken_listener_says_maybe_and_listens_again(store: Store) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("LISTEN is PostgreSQL's")
    watcher = store.change_watcher()
    try:
        with store.engine.connect() as conn:
            from sqlalchemy import text

            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            )
            conn.commit()
        assert seen_within(watcher.changed), "a lost listener must say maybe"
        # Listening again: what was committed meanwhile is unknown, so "maybe" again.
        assert seen_within(watcher.changed)
        assert watcher.fileno() is not None
        assert quiet_for(watcher.changed)
        ready_node(store, "a")
        assert seen_within(watcher.changed)
    finally:
        watcher.close()
