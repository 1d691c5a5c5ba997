"""The observer: the last hour's charts rebuilt from the store's event history."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from freshpool.core.states import NodeState, RequestState
from freshpool.launcher.observer import Observer
from freshpool.store import Store
from tests.support import fulfil

N = NodeState


def test_history_is_rebuilt_from_events_and_follows_them(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    try:
        made = []
        for _ in range(3):
            row = store.new_node("debian", "local", "build", "debian")
            store.transition(row.id, N.BUILDING, N.TESTING, "up")
            store.transition(row.id, N.TESTING, N.READY, "ready command passed")
            made.append(row.id)
        store.transition(made[0], N.READY, N.FAILED, "health check failed")
        request = store.new_request(["debian"], tenant="t")
        fulfil(store, request.id, ["local"])

        # A new observer (a restarted server) sees what happened before it started.
        observer = Observer(store)
        observer.tick(force=True)
        points = observer.history()["points"]
        assert sum(p["launches"] for p in points) == 3
        assert sum(p["failures"] for p in points) == 1
        last = points[-1]
        assert (last["ready"], last["in_use"]) == (1, 1)
        assert sum(p["requests"] for p in points) == 1
        assert [p["wait_p50"] for p in points if p["requests"]] == [
            pytest.approx(store.request(request.id).fulfilled_at - request.created_at)
        ]

        # And then follows what happens next.
        row = store.new_node("debian", "local", "build", "debian")
        store.transition(row.id, N.BUILDING, N.TESTING, "up")
        store.transition(row.id, N.TESTING, N.READY, "ready command passed")
        observer.tick(force=True)
        points = observer.history()["points"]
        assert sum(p["launches"] for p in points) == 4
        assert points[-1]["ready"] == 2
        assert store.request(request.id).state == RequestState.FULFILLED
    finally:
        store.close()


def test_node_seconds_count_each_state_for_whom(tmp_path: Path) -> None:
    """Events stamped after the observer's own clock: each state's time is counted when
    the node leaves it, exactly what its events say."""
    from prometheus_client import REGISTRY

    def counted(state: str, tenant: str = "") -> float | None:
        labels = {"tenant": tenant, "label": "counted", "provider": "p", "state": state}
        return REGISTRY.get_sample_value("freshpool_node_seconds_total", labels)

    store = Store.open(tmp_path)
    try:
        at = [time.time() + 1000.0]
        store.clock = lambda: at[0]
        observer = Observer(store)
        observer.tick(force=True)
        row = store.new_node("counted", "p", "build", "n")
        observer.tick(force=True)
        at[0] += 60
        store.transition(row.id, N.BUILDING, N.TESTING, "up")
        at[0] += 120
        store.transition(row.id, N.TESTING, N.READY, "ready")
        at[0] += 1800
        request = store.new_request(["counted"], tenant="team-x")
        fulfil(store, request.id, ["p"])
        at[0] += 3600
        store.release_set(row.id, "done")
        observer.tick(force=True)
        assert (counted(N.BUILDING), counted(N.TESTING), counted(N.READY)) == (60, 120, 1800)
        assert counted(N.IN_USE, "team-x") == 3600
        assert counted(N.IN_USE) is None
    finally:
        store.close()
