"""Two hand-outs at once on one PostgreSQL, as two API servers' schedulers make them:
each serves the requests the other is not serving, and neither rolls back for it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from freshpool.core.states import RequestState
from freshpool.store import HandOut, Queue, Store
from tests.store.pg import TempPostgres
from tests.store.test_store import ready_node


@pytest.fixture
def two(postgres: TempPostgres) -> Iterator[tuple[Store, Store]]:
    url = postgres.new_database()
    a, b = Store(url), Store(url)
    yield a, b
    a.close()
    b.close()


def test_a_request_one_hand_out_is_serving_is_left_to_it(two: tuple[Store, Store]) -> None:
    a, b = two
    ready_node(a, "debian")
    ready_node(a, "debian")
    request = a.new_request(["debian"], requestor="job")
    b_done = threading.Event()
    seen_by_b: list[list[int]] = []

    def plan_a(queue: Queue) -> list[tuple[int, str]]:
        # Inside a's transaction, after a read the queue: b hands out meanwhile.
        other = threading.Thread(target=lambda: (b.hand_out([], plan_b, ["p"]), b_done.set()))
        other.start()
        other.join(30)
        return [(r.id, "p") for r in queue.pending]

    def plan_b(queue: Queue) -> list[tuple[int, str]]:
        seen_by_b.append([r.id for r in queue.pending])
        return [(r.id, "p") for r in queue.pending]

    # Unlocked, b would serve the request too, and a's settle would find it fulfilled
    # and roll a's whole batch back (StaleState).
    done: HandOut = a.hand_out([], plan_a, ["p"])
    assert b_done.is_set()
    assert seen_by_b in ([], [[]]), "b saw a request a was serving"
    assert list(done.fulfilled) == [request.id]
    assert a.request(request.id).state == RequestState.FULFILLED
    assert len(a.nodes(["ready"])) == 1
