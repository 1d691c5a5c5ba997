"""The hand-out: one transaction queues new requests and gives pending ones ready nodes.

This is the only way a node leaves `ready` for a job. A batch of any size costs a
fixed number of statements (read the queue, insert the new requests, read the ready
counts, pick, claim, record history, settle the requests), so many clients asking at
once share one transaction instead of queueing for the write lock one by one.

Which request gets which provider's nodes is the caller's decision (a planner, from
core/placement.py); the store checks every claim by compare-and-set and never gives
a node to two requests.
"""

from __future__ import annotations

import functools
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, bindparam, func, insert, select

from freshpool.core import states
from freshpool.core.errors import StaleState
from freshpool.core.nodesets import needs
from freshpool.core.placement import Placement, Ready
from freshpool.core.states import NodeState, RequestState
from freshpool.store import quotas
from freshpool.store._fastpath import run
from freshpool.store.base import StoreBase, cas_statement
from freshpool.store.nodes import NodeRow
from freshpool.store.requests import PENDING, RequestRow
from freshpool.store.schema import node_events, nodes, requests

# Runs of a hand-out that another process's commit rolled back, before giving up.
HAND_OUT_TRIES = 5


@dataclass(frozen=True)
class Queue:
    """What a planner sees, inside the hand-out's transaction."""

    pending: list[RequestRow]  # every pending request, oldest first, the new ones included
    ready: Ready
    created: list[int]  # ids of the requests this hand-out queued
    # Nodes in use or held per tenant asked about, counted (and on PostgreSQL locked)
    # in this transaction: a planner enforcing tenants' quotas asks only for those.
    held_by: Callable[[Collection[str]], Counter[str]] = lambda _tenants: Counter()


Planner = Callable[[Queue], Sequence[Placement]]


@dataclass(frozen=True)
class NewRequest:
    labels: tuple[str, ...]
    requestor: str = ""
    tenant: str = ""
    priority: int = 0
    deadline: float | None = None
    ssh_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class HandOut:
    """What one hand-out did: the new requests as they now are, and every set handed over."""

    created: list[RequestRow]
    # Request id -> the request and its nodes, in the order the planner placed them.
    fulfilled: dict[int, tuple[RequestRow, list[NodeRow]]]
    # Ids of the requests still pending afterwards (those another hand-out held too).
    pending: set[int]

    def nodes_of(self, request_id: int) -> list[NodeRow]:
        got = self.fulfilled.get(request_id)
        return got[1] if got else []


def queue_only(_queue: Queue) -> list[Placement]:
    """A planner that places nothing: the hand-out only queues."""
    return []


class HandOutQueries(StoreBase):
    def new_request(
        self,
        labels: Sequence[str],
        requestor: str = "",
        tenant: str = "",
        priority: int = 0,
        deadline: float | None = None,
    ) -> RequestRow:
        """Queue one request without handing anything out (a scheduler serves it)."""
        ask = NewRequest(tuple(labels), requestor, tenant, priority, deadline)
        return self.hand_out([ask], queue_only, []).created[0]

    def hand_out(
        self,
        new: Sequence[NewRequest],
        plan: Planner,
        providers: Sequence[str],
        wait: bool = True,
    ) -> HandOut:
        """Queue `new`, then hand pending requests their sets as `plan` places them.

        `plan` sees the queue and the ready nodes of `providers` inside the
        transaction and returns placements. A placement the pool cannot honour (on
        PostgreSQL another claimer may hold the rows) leaves that request pending.
        With `wait` false it raises WriteBusy, having done nothing, if another writer
        holds the lock.

        When another process took a node or settled a request between the reads and
        the claim (PostgreSQL), the transaction rolls back whole and runs again; after
        HAND_OUT_TRIES it raises StaleState, having done nothing.
        """
        for _ in range(HAND_OUT_TRIES - 1):
            try:
                return self._hand_out_once(new, plan, providers, wait)
            except StaleState:
                continue
        return self._hand_out_once(new, plan, providers, wait)

    def _hand_out_once(
        self, new: Sequence[NewRequest], plan: Planner, providers: Sequence[str], wait: bool
    ) -> HandOut:
        now = self.clock()
        with self._write(wait) as conn:
            # The queue as it was, then this hand-out's requests behind it.
            pending = _pending(conn)
            created = _insert(conn, new, now)
            pending += created
            held = _held_elsewhere(conn, pending)
            if not pending:
                return HandOut([], {}, held)
            demand: Counter[str] = Counter()
            for request in pending:
                demand.update(request.labels)
            queue = Queue(
                pending,
                _ready(conn, providers, demand),
                [r.id for r in created],
                functools.partial(quotas.held_by, conn),
            )
            by_id = {r.id: r for r in pending}
            placed = [(by_id[rid], provider) for rid, provider in plan(queue) if rid in by_id]
            claims = _pick(conn, placed)
            fulfilled = _claim(conn, claims, now) if claims else {}
        return HandOut(
            [fulfilled[r.id][0] if r.id in fulfilled else r for r in created],
            fulfilled,
            set(by_id) - set(fulfilled) | held,
        )


def _insert(conn: Connection, new: Sequence[NewRequest], now: float) -> list[RequestRow]:
    """Insert the new requests in one statement; their rows, in the order of `new`."""
    if not new:
        return []
    values = [
        {
            "labels": list(r.labels),
            "requestor": r.requestor,
            "tenant": r.tenant,
            "priority": r.priority,
            "state": RequestState.PENDING,
            "created_at": now,
            "state_at": now,
            "deadline": r.deadline,
            "ssh_keys": list(r.ssh_keys) or None,
        }
        for r in new
    ]
    ids = [row["id"] for row in run(conn, _QUEUE, values).rows]
    return [
        RequestRow(
            id=request_id,
            labels=list(r.labels),
            requestor=r.requestor,
            tenant=r.tenant,
            priority=r.priority,
            state=RequestState.PENDING,
            reason="",
            created_at=now,
            state_at=now,
            deadline=r.deadline,
            ssh_keys=list(r.ssh_keys) or None,
        )
        for request_id, r in zip(ids, new, strict=True)
    ]


def _pending(conn: Connection) -> list[RequestRow]:
    """Pending requests, oldest first; on PostgreSQL only those no other hand-out has.

    Several API servers hand out at once there, each with its own scheduler. Without
    the lock, two would read the same pending request, claim different nodes for it,
    and the second's settle would roll its whole batch back (or, settling in another
    order, deadlock with it). SKIP LOCKED gives each the requests the others are not
    serving, and it never waits, so hand-outs cannot deadlock one another: a request
    skipped here is served by the hand-out holding it, or by the next pass.
    """
    query = PENDING_UNCLAIMED if conn.dialect.name == "postgresql" else PENDING
    return [RequestRow(**row) for row in run(conn, query, {}).rows]


def _held_elsewhere(conn: Connection, seen: Sequence[RequestRow]) -> set[int]:
    """Pending requests another hand-out holds (on PostgreSQL _pending skips them):
    still pending as far as this one knows; if the other settles them, its commit
    says so (NOTIFY). Left out, a scheduler would take them for settled and wake
    every waiter on them for nothing, each then reading its request again."""
    if conn.dialect.name != "postgresql":
        return set()
    ids = {row["id"] for row in run(conn, _PENDING_IDS, {}).rows}
    return ids - {r.id for r in seen}


def _ready(conn: Connection, providers: Sequence[str], demand: Counter[str]) -> Ready:
    """Ready nodes per (provider, label), each counted only up to the label's demand.

    More than the demand changes no decision, and counting every ready node of a big
    pool on each pass would make a hand-out's cost grow with the pool.
    """
    pairs = [(p, label) for p in providers for label in sorted(demand)]
    if not pairs:
        return Counter()
    params: dict[str, object] = {}
    for i, (provider, label) in enumerate(pairs):
        params |= {f"p{i}": provider, f"l{i}": label, f"c{i}": demand[label]}
    (counts,) = run(conn, _ready_counts(len(pairs)), params).rows
    return Counter({pair: counts[f"n{i}"] for i, pair in enumerate(pairs) if counts[f"n{i}"]})


@functools.cache
def _ready_counts(pairs: int) -> Select[Any]:
    """One row: for each i, n<i> = min(ready nodes of provider :p<i> and label :l<i>, :c<i>)."""
    counts = []
    for i in range(pairs):
        capped = (
            select(nodes.c.id)
            .where(
                nodes.c.state == NodeState.READY,
                nodes.c.label == bindparam(f"l{i}"),
                nodes.c.provider == bindparam(f"p{i}"),
            )
            .limit(bindparam(f"c{i}"))
            .subquery()
        )
        counts.append(select(func.count()).select_from(capped).scalar_subquery().label(f"n{i}"))
    return select(*counts)


Claim = tuple[RequestRow, str, list[NodeRow]]


def _pick(conn: Connection, placed: list[tuple[RequestRow, str]]) -> list[Claim]:
    """Ready nodes for each placement, oldest first; unplaceable requests are left out."""
    wanted: Counter[tuple[str, str]] = Counter()
    for request, provider in placed:
        wanted.update((provider, label) for label in request.labels)
    free = {
        key: deque(
            NodeRow(**row)
            for row in run(
                conn, _READY_ROWS, {"provider": key[0], "label": key[1], "count": count}
            ).rows
        )
        for key, count in wanted.items()
    }
    claims: list[Claim] = []
    seen: set[int] = set()
    for request, provider in placed:
        if request.id in seen:
            continue
        if any(len(free[(provider, label)]) < n for label, n in needs(tuple(request.labels))):
            continue
        seen.add(request.id)
        claims.append((request, provider, [free[(provider, x)].popleft() for x in request.labels]))
    return claims


def _claim(
    conn: Connection, claims: list[Claim], now: float
) -> dict[int, tuple[RequestRow, list[NodeRow]]]:
    """Move every claimed node ready -> in-use and settle its request: all or nothing."""
    states.check_node(NodeState.READY, NodeState.IN_USE)
    states.check_request(RequestState.PENDING, RequestState.FULFILLED)
    moves = [
        {
            "node": node.id,
            "at": now,
            "why": f"handed to request {request.id}",
            "request": request.id,
            "for_tenant": request.tenant,
            # Not `label`/`provider`: a key named for a column would join the claim's SET.
            "ev_label": node.label,
            "ev_provider": node.provider,
        }
        for request, _, picked in claims
        for node in picked
    ]
    # Compare-and-set, many rows at once: if any node left `ready` under us, or any
    # request stopped pending, the whole transaction rolls back and nothing is handed.
    if run(conn, _CLAIM, moves).rowcount != len(moves):
        raise StaleState("a ready node was taken during the hand-out; nothing was handed")
    run(conn, _HISTORY, moves)
    settles: list[dict[str, Any]] = [
        {
            "request": request.id,
            "at": now,
            "by": provider,
            "why": f"nodes {', '.join(str(n.id) for n in picked)}",
        }
        for request, provider, picked in claims
    ]
    if run(conn, _SETTLE, settles).rowcount != len(settles):
        raise StaleState("a request stopped pending during the hand-out; nothing was handed")
    return {
        request.id: _as_claimed(request, provider, picked, settle["why"], now)
        for (request, provider, picked), settle in zip(claims, settles, strict=True)
    }


def _as_claimed(
    request: RequestRow, provider: str, picked: list[NodeRow], why: str, now: float
) -> tuple[RequestRow, list[NodeRow]]:
    """The request and its nodes as the claim's compare-and-sets left them (the
    transaction holds the rows, so they need not be read again)."""
    row = RequestRow(
        **{
            **vars(request),
            "state": RequestState.FULFILLED,
            "reason": why,
            "state_at": now,
            "provider": provider,
            "fulfilled_at": now,
        }
    )
    handed = [
        NodeRow(
            **{
                **vars(node),
                "state": NodeState.IN_USE,
                "state_at": now,
                "reason": f"handed to request {request.id}",
                "request_id": request.id,
                "tenant": request.tenant,
            }
        )
        for node in picked
    ]
    return row, handed


# Built once: building a statement costs more than running it.
PENDING_UNCLAIMED = PENDING.with_for_update(skip_locked=True)
_PENDING_IDS = select(requests.c.id).where(requests.c.state == RequestState.PENDING)
_QUEUE = insert(requests).returning(requests.c.id, sort_by_parameter_order=True)
_READY_ROWS = (
    select(nodes)
    .where(
        nodes.c.state == NodeState.READY,
        nodes.c.label == bindparam("label"),
        nodes.c.provider == bindparam("provider"),
    )
    # Oldest first by id, not ready_at: the (state, label, provider) index yields
    # rows in id order, so this sorts nothing however many nodes are ready.
    .order_by(nodes.c.id)
    .limit(bindparam("count"))
    # PostgreSQL: concurrent claimers skip rows another transaction holds.
    # SQLite ignores it; BEGIN IMMEDIATE already serialises writers there.
    .with_for_update(skip_locked=True)
)
_CLAIM = cas_statement(
    nodes,
    bindparam("node"),
    NodeState.READY,
    {
        "state": NodeState.IN_USE,
        "state_at": bindparam("at"),
        "reason": bindparam("why"),
        "request_id": bindparam("request"),
        "tenant": bindparam("for_tenant"),
    },
)
_HISTORY = insert(node_events).values(
    node_id=bindparam("node"),
    at=bindparam("at"),
    from_state=NodeState.READY.value,
    to_state=NodeState.IN_USE.value,
    reason=bindparam("why"),
    label=bindparam("ev_label"),
    provider=bindparam("ev_provider"),
    tenant=bindparam("for_tenant"),
)
_SETTLE = cas_statement(
    requests,
    bindparam("request"),
    RequestState.PENDING,
    {
        "state": RequestState.FULFILLED,
        "state_at": bindparam("at"),
        "fulfilled_at": bindparam("at"),
        "provider": bindparam("by"),
        "reason": bindparam("why"),
    },
)
