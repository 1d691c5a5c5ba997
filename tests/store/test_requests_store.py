"""Node-set request queries, job start, tokens and history, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from freshpool.api import tokens
from freshpool.core.states import InvalidTransition, NodeState, RequestState
from freshpool.store import StaleState, Store
from freshpool.store.schema import requests
from tests.store.pg import TempPostgres
from tests.store.test_store import ready_node
from tests.support import fulfil

N = NodeState


def test_a_set_is_released_together_and_never_half(store: Store) -> None:
    for _ in range(3):
        ready_node(store)
    request = store.new_request(["l", "l", "l"], tenant="t")
    nodes = fulfil(store, request.id, ["p"])
    assert nodes is not None
    released = store.release_set(nodes[1].id, "job done")
    assert sorted(n.id for n in released) == sorted(n.id for n in nodes)
    assert {store.node(n.id).state for n in nodes} == {N.USED}
    with pytest.raises(InvalidTransition):
        store.release_set(nodes[0].id, "again")
    with pytest.raises(StaleState):
        store.release_request(request.id, "again")


def test_cancel_deletes_what_a_request_holds(store: Store) -> None:
    ready_node(store)
    pending = store.new_request(["l", "l"], tenant="t")
    assert fulfil(store, pending.id, ["p"]) is None
    row, deleted = store.cancel_request(pending.id, "changed my mind")
    assert (row.state, deleted) == (RequestState.CANCELLED, [])
    # Cancelling twice changes nothing.
    assert store.cancel_request(pending.id, "again")[0].state == RequestState.CANCELLED

    taken = store.new_request(["l"], tenant="t")
    (node,) = fulfil(store, taken.id, ["p"]) or []
    row, deleted = store.cancel_request(taken.id, "job aborted")
    assert row.state == RequestState.CANCELLED
    assert [(n.id, n.state) for n in deleted] == [(node.id, N.DELETING)]
    steps = [e.to_state for e in store.events(node.id)]
    assert steps == [N.BUILDING, N.TESTING, N.READY, N.IN_USE, N.DELETING]

    failed = store.new_request(["l"], tenant="t")
    store.finish_request(failed.id, RequestState.FAILED, "deadline")
    with pytest.raises(InvalidTransition):
        store.cancel_request(failed.id, "too late")


def test_a_node_runs_one_job(store: Store) -> None:
    ready_node(store)
    request = store.new_request(["l"], tenant="t")
    (node,) = fulfil(store, request.id, ["p"]) or []
    assert store.job_started_at(node.id) is None
    started = store.start_job(node.id, "build 1")
    assert started.state == N.IN_USE and started.reason == "job started: build 1"
    assert store.job_started_at(node.id) is not None
    with pytest.raises(StaleState, match="used once"):
        store.start_job(node.id, "build 2")
    store.release_set(node.id, "done")
    with pytest.raises(StaleState, match="not in-use"):
        store.start_job(node.id, "build 3")


def test_ready_counts_and_pending_queue(store: Store) -> None:
    ready_node(store, label="a")
    ready_node(store, label="a")
    ready_node(store, label="b")
    first = store.new_request(["a"], tenant="x")
    second = store.new_request(["b"], tenant="y")
    assert [r.id for r in store.pending_requests()] == [first.id, second.id]
    assert store.pending_by_tenant() == {"x": 1, "y": 1}
    assert [r.id for r in store.list_requests(tenant="y")] == [second.id]


def test_tokens_keep_only_a_digest(store: Store) -> None:
    row, secret = tokens.create(store, "ci", "for tests")
    assert row.digest == tokens.digest(secret) and secret not in row.digest
    checker = tokens.TokenChecker(store, remember=0)
    assert checker.check(secret).tenant == "ci"  # type: ignore[union-attr]
    assert checker.check(secret + "x") is None
    store.revoke_token(row.id)
    assert checker.check(secret) is None
    assert store.tokens()[0].last_used_at is not None
    with pytest.raises(tokens.BadTenant):
        tokens.create(store, "Not A Tenant")


def test_history_reads_only_what_is_new(store: Store) -> None:
    node_id = ready_node(store)
    events = store.events_after(0)
    assert [(e.node_id, e.to_state, e.label) for e in events] == [
        (node_id, N.BUILDING, "l"),
        (node_id, N.TESTING, "l"),
        (node_id, N.READY, "l"),
    ]
    assert store.events_after(events[-1].id) == []
    assert store.last_event_before(0) == events[0].id - 1
    request = store.new_request(["l"])
    assert [r.id for r in store.request_outcomes(request.id)] == [request.id]
    # A pending request it was told of is read again only once it is no longer pending.
    later = store.new_request(["l"])
    assert store.request_outcomes(later.id + 1, {request.id}) == []
    store.cancel_request(request.id, "")
    outcomes = store.request_outcomes(later.id + 1, {request.id})
    assert [(r.id, r.state) for r in outcomes] == [(request.id, "cancelled")]
    assert store.last_request_id() == later.id


def test_overdue_requests_fail_together_and_only_while_pending(store: Store) -> None:
    now = store.clock()
    late = [store.new_request(["a"], deadline=now - 1) for _ in range(3)]
    waiting_long = store.new_request(["a"])
    on_time = store.new_request(["a"], deadline=now + 60)
    cancelled = store.new_request(["a"], deadline=now - 1)
    store.cancel_request(cancelled.id, "gone")
    failed = store.fail_overdue(now, None, "deadline passed")
    assert sorted(failed) == [r.id for r in late]
    assert {store.request(r.id).reason for r in late} == {"deadline passed"}
    assert store.request(cancelled.id).state == RequestState.CANCELLED
    assert store.fail_overdue(now, None, "again") == []
    # Without a deadline, a request fails once it has waited longer than max_wait.
    assert store.fail_overdue(now + 10, 5.0, "waited too long") == [waiting_long.id]
    assert store.request(on_time.id).state == RequestState.PENDING


def test_requests_for_a_label_set_fail_by_its_stored_text(store: Store) -> None:
    ab = store.new_request(["a", "b"])
    a = store.new_request(["a"])
    sets = store.pending_label_sets()
    assert sorted(json.loads(s) for s in sets) == [["a"], ["a", "b"]]
    stored = next(s for s in sets if "b" in json.loads(s))
    assert store.fail_pending_asking(stored, "label b is no longer in the config") == [ab.id]
    assert store.request(ab.id).state == RequestState.FAILED
    assert store.request(a.id).state == RequestState.PENDING
    assert store.pending_label_sets() == [next(s for s in sets if s != stored)]


def test_a_bulk_fail_skips_a_request_another_writer_holds(postgres: TempPostgres) -> None:
    """Several launchers fail overdue requests at once: none waits behind another's
    row locks (nor a hand-out's); what one skips the next pass fails."""
    store = Store(postgres.new_database())
    try:
        now = store.clock()
        held, free = (store.new_request(["a"], deadline=now - 1) for _ in range(2))
        with store.engine.connect() as other, other.begin():
            lock = select(requests.c.id).where(requests.c.id == held.id).with_for_update()
            other.execute(lock)
            assert store.fail_overdue(now, None, "deadline passed") == [free.id]
        assert store.fail_overdue(now, None, "deadline passed") == [held.id]
    finally:
        store.close()
