"""The invariants the chaos suite checks; each is a plain assertion over the store's history.

They read node_events (which outlive node rows), so they hold over the whole run,
not just the final state.
"""

from __future__ import annotations

import re
from collections import defaultdict

from freshpool.core.states import NODE_TRANSITIONS, NodeState, RequestState
from freshpool.drivers.base import Driver
from freshpool.store import Store

HANDED = re.compile(r"handed to request (\d+)")


class Violation(AssertionError):
    pass


def history_follows_the_state_table(store: Store) -> int:
    """Every node's recorded path is a chain of allowed transitions. Returns nodes seen."""
    paths: dict[int, list[tuple[str | None, str | None]]] = defaultdict(list)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT node_id, from_state, to_state FROM node_events ORDER BY id"
        ).fetchall()
    for node_id, old, new in rows:
        paths[node_id].append((old, new))
    for node_id, path in paths.items():
        current: str | None = None
        for old, new in path:
            if old != current:
                raise Violation(f"node {node_id}: event from {old!r} but node was {current!r}")
            allowed = (
                old is None
                or new is None
                or old == new
                or NodeState(new) in NODE_TRANSITIONS[NodeState(old)]
            )
            if not allowed:
                raise Violation(f"node {node_id}: forbidden transition {old} -> {new}")
            if old is None and new != NodeState.BUILDING:
                raise Violation(f"node {node_id}: born in {new!r}")
            current = new
            if new is None:
                break
        ready_count = sum(1 for _, new in path if new == NodeState.READY)
        if ready_count > 1:
            raise Violation(f"node {node_id}: became ready {ready_count} times")
    return len(paths)


def no_node_handed_out_twice(store: Store) -> int:
    """Each node goes to at most one request, and each request's nodes are distinct."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT node_id, reason FROM node_events WHERE to_state = 'in-use'"
        ).fetchall()
    owners: dict[int, list[int]] = defaultdict(list)
    for node_id, reason in rows:
        match = HANDED.search(reason)
        if match is None:
            raise Violation(f"node {node_id}: in use without a request ({reason!r})")
        owners[node_id].append(int(match.group(1)))
    for node_id, requests in owners.items():
        if len(requests) > 1:
            raise Violation(f"node {node_id} handed to requests {requests}")
    return len(owners)


def no_request_lost(store: Store) -> dict[str, int]:
    """Every request is fulfilled, failed or cancelled with a reason, or still pending."""
    counts: dict[str, int] = defaultdict(int)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, state, reason FROM requests").fetchall()
    for request_id, state, reason in rows:
        RequestState(state)
        if state in (RequestState.FAILED, RequestState.CANCELLED) and not reason:
            raise Violation(f"request {request_id} {state} without a reason")
        counts[state] += 1
    return dict(counts)


def store_and_driver_agree(store: Store, drivers: dict[str, Driver]) -> None:
    """After convergence: every instance has a row, every live row its instance."""
    for name, driver in drivers.items():
        instances = driver.list_instances()
        listed = {i.tags.node_id for i in instances if i.tags}
        dead = [i.external_id for i in instances if not i.alive]
        rows = {n.id: n.state for n in store.nodes(provider=name)}
        if dead:
            raise Violation(f"provider {name}: leftovers of dead instances: {dead}")
        if listed - rows.keys():
            raise Violation(
                f"provider {name}: leaked instances of nodes {sorted(listed - rows.keys())}"
            )
        missing = {i for i, state in rows.items() if i not in listed}
        if missing:
            raise Violation(
                f"provider {name}: rows without instances: "
                f"{[(i, rows[i]) for i in sorted(missing)]}"
            )


def check_history(store: Store) -> dict[str, int]:
    nodes = history_follows_the_state_table(store)
    handed = no_node_handed_out_twice(store)
    requests = no_request_lost(store)
    return {
        "nodes": nodes,
        "handed_out": handed,
        **{f"requests_{k}": v for k, v in requests.items()},
    }
