"""The observer: the last hour's charts rebuilt from the store's event history."""

from __future__ import annotations

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
