"""The invariants the chaos suite checks; each is a plain assertion over the store's history.

They read node_events (which outlive node rows), so they hold over the whole run,
not just the final state.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

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


# --------------------------------------------------------------- fleet (tests/chaos/fleet.py)


def one_driver_at_a_time(store: Store) -> int:
    """No provider was driven by two launchers at once, from the history: in each
    provider's events written under its fence, the generation never goes back (no
    write of an older lease after a newer one's), each generation belongs to one
    launcher, and that launcher is the one the lease history says took it. Returns
    how many generations wrote."""
    taken = {(p, g): owner for p, owner, g, _at, _before in store.lease_history()}
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT id, node_id, provider, launcher, generation FROM node_events"
            " WHERE generation IS NOT NULL ORDER BY id"
        ).fetchall()
    newest: dict[str, tuple[int, int]] = {}
    writers: dict[tuple[str, int], str] = {}
    for event_id, node_id, provider, launcher, generation in rows:
        seen = writers.setdefault((provider, generation), launcher)
        if seen != launcher:
            raise Violation(
                f"provider {provider}: generation {generation} written by {seen} and {launcher}"
            )
        if taken.get((provider, generation)) != launcher:
            raise Violation(
                f"provider {provider}: event {event_id} (node {node_id}) by {launcher} at"
                f" generation {generation}, which the lease history gives to"
                f" {taken.get((provider, generation), 'nobody')}"
            )
        before = newest.get(provider)
        if before is not None and generation < before[0]:
            raise Violation(
                f"provider {provider}: event {event_id} (node {node_id}) written at generation"
                f" {generation} after event {before[1]} at generation {before[0]}"
            )
        if before is None or generation > before[0]:
            newest[provider] = (generation, event_id)
    return len(writers)


def caps_held(store: Store, provider_max: dict[str, int], label_max: dict[str, int]) -> dict:
    """Replaying births and removals in the order they committed: no provider ever had
    more nodes than its max-nodes, no label more than its max-nodes. The most seen of
    each, by name."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT node_id, from_state, to_state, label, provider FROM node_events"
            " WHERE from_state IS NULL OR to_state IS NULL ORDER BY id"
        ).fetchall()
    count: dict[str, int] = defaultdict(int)
    most: dict[str, int] = defaultdict(int)
    for node_id, old, new, label, provider in rows:
        step = 1 if old is None else -1 if new is None else 0
        for key, cap in (
            (f"provider:{provider}", provider_max.get(provider)),
            (f"label:{label}", label_max.get(label)),
        ):
            count[key] += step
            most[key] = max(most[key], count[key])
            if cap is not None and count[key] > cap:
                raise Violation(f"{key} had {count[key]} nodes (max-nodes {cap}) at node {node_id}")
    return dict(most)


def failovers(
    store: Store, deaths: list[tuple[float, str]], limit: float
) -> list[tuple[str, str, float]]:
    """Each provider a launcher held when it died (time.time(), launcher) was taken
    again, by anyone, within `limit` seconds. (launcher, provider, seconds) each."""
    takes = store.lease_history()
    found = []
    for died, launcher in deaths:
        held: dict[str, str] = {}
        for provider, owner, _g, at, _before in takes:
            if at <= died:
                held[provider] = owner
        for provider in sorted(p for p, owner in held.items() if owner == launcher):
            after = [at for p, _o, _g, at, _b in takes if p == provider and at > died]
            if not after:
                raise Violation(
                    f"provider {provider} of {launcher} never taken again after it died"
                )
            found.append((launcher, provider, after[0] - died))
            if after[0] - died > limit:
                near = [(o, g, round(at - died, 2)) for p, o, g, at, _b in takes
                        if p == provider and abs(at - died) < 30]  # fmt: skip
                raise Violation(
                    f"provider {provider} of {launcher}: taken again {after[0] - died:.2f} s after"
                    f" it died (limit {limit:.2f} s); its takes near then (owner, generation,"
                    f" s after the death): {near}; deaths near then:"
                    f" {[(n, round(t - died, 2)) for t, n in deaths if abs(t - died) < 30]}"
                )
    return found


def requests_end_as_told(
    store: Store,
    accepted: dict[int, str],
    ended: dict[int, tuple[str, list[int]]],
    refused: list[str],
) -> set[str]:
    """Once the fleet settled, what clients were told against the store: every request
    an API server accepted (id -> the client's requestor tag) is stored under its
    tag and ended (each had a deadline, so none may be left pending); each one a
    client saw end (id -> state, nodes) ended so in the store, a fulfilled one's
    nodes handed to it in the history; no tag was stored twice (a POST made two
    requests), and none the API refused was stored at all (its answer said nothing
    changed). Returns every requestor tag stored."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, state, requestor FROM requests").fetchall()
        handed_rows = conn.exec_driver_sql(
            "SELECT node_id, reason FROM node_events WHERE to_state = 'in-use'"
        ).fetchall()
    stored = {request_id: (state, tag) for request_id, state, tag in rows}
    pending = [request_id for request_id, (state, _tag) in stored.items() if state == "pending"]
    if pending:
        raise Violation(f"requests {pending[:20]} still pending after the fleet settled")
    handed: dict[int, set[int]] = defaultdict(set)
    for node_id, reason in handed_rows:
        match = HANDED.search(reason)
        if match is not None:
            handed[int(match.group(1))].add(node_id)
    for request_id, tag in accepted.items():
        if request_id not in stored:
            raise Violation(f"request {request_id} ({tag}) was accepted and is not stored: lost")
        if stored[request_id][1] != tag:
            raise Violation(f"request {request_id} is {stored[request_id][1]!r}'s, told {tag!r}")
    for request_id, (state, nodes) in ended.items():
        if stored[request_id][0] != state:
            raise Violation(
                f"request {request_id}: its client was told {state}, the store has"
                f" {stored[request_id][0]}"
            )
        if state == RequestState.FULFILLED and not set(nodes) <= handed[request_id]:
            raise Violation(
                f"request {request_id}: its client got nodes {nodes}, the history handed it"
                f" {sorted(handed[request_id])}"
            )
    tags = Counter(tag for _state, tag in stored.values())
    twice = [tag for tag, n in tags.items() if n > 1 and tag]
    if twice:
        raise Violation(f"requestors {twice[:20]} each stored more than once")
    stored_refused = [tag for tag in refused if tags[tag]]
    if stored_refused:
        raise Violation(f"requests {stored_refused[:20]} refused by the API and stored")
    return set(tags)
