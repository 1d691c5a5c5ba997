"""The hand-out: one transaction queues new requests and gives pending ones ready nodes.

This is the only way a node leaves `ready` for a job. A batch of any size costs a
fixed number of statements (insert the new requests, read the queue and the ready
counts, pick, claim, record history, settle the requests), so many clients asking at
once share one transaction instead of queueing for the write lock one by one.

Which request gets which provider's nodes is the caller's decision (a planner: the
scheduler's fair share, or first fit); the store checks every claim by
compare-and-set and never gives a node to two requests.
"""

from __future__ import annotations

import functools
import operator
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Dialect,
    Executable,
    Select,
    bindparam,
    func,
    insert,
    literal,
    select,
)

from freshpool import states
from freshpool.states import NodeState, RequestState
from freshpool.store.base import StaleState, StoreBase, cas_statement
from freshpool.store.nodes import NodeRow
from freshpool.store.requests import RequestRow
from freshpool.store.schema import node_events, nodes, requests

# Ready nodes per (provider, label).
Ready = Counter[tuple[str, str]]
# A planner's decision: this pending request gets its set from this provider.
Placement = tuple[int, str]


@dataclass(frozen=True)
class Queue:
    """What a planner sees, inside the hand-out's transaction."""

    pending: list[RequestRow]  # every pending request, oldest first, the new ones included
    ready: Ready
    created: list[int]  # ids of the requests this hand-out queued


Planner = Callable[[Queue], Sequence[Placement]]


@dataclass(frozen=True)
class NewRequest:
    labels: tuple[str, ...]
    requestor: str = ""
    tenant: str = ""
    priority: int = 0
    deadline: float | None = None


@dataclass(frozen=True)
class HandOut:
    """What one hand-out did: the new requests as they now are, and every set handed over."""

    created: list[RequestRow]
    # Request id -> the request and its nodes, in the order the planner placed them.
    fulfilled: dict[int, tuple[RequestRow, list[NodeRow]]]
    # Ids of the requests still pending afterwards.
    pending: set[int]

    def nodes_of(self, request_id: int) -> list[NodeRow]:
        got = self.fulfilled.get(request_id)
        return got[1] if got else []


def first_fit(labels: Sequence[str], providers: Sequence[str], ready: Ready) -> str | None:
    """The first provider (in the given order) with one ready node for every label."""
    need = needs(tuple(labels))
    for provider in providers:
        if all(ready[(provider, label)] >= n for label, n in need):
            return provider
    return None


@functools.cache
def needs(labels: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(label, how many) for a node set; cached, as every pass asks it of every request."""
    return tuple(Counter(labels).items())


def first_fit_for(providers: Sequence[str], request_ids: set[int] | None = None) -> Planner:
    """A planner that serves only these requests (by default: the ones the hand-out
    queues), each from its first fitting provider.

    No fair share: for a client that claims for itself straight on the store.
    """

    def plan(queue: Queue) -> list[Placement]:
        mine = set(queue.created) if request_ids is None else request_ids
        free = Counter(queue.ready)
        placements = []
        for request in queue.pending:
            if request.id not in mine:
                continue
            provider = first_fit(request.labels, providers, free)
            if provider is not None:
                free.subtract((provider, label) for label in request.labels)
                placements.append((request.id, provider))
        return placements

    return plan


class HandOutQueries(StoreBase):
    def new_request(
        self,
        labels: Sequence[str],
        requestor: str = "",
        tenant: str = "",
        priority: int = 0,
        deadline: float | None = None,
    ) -> RequestRow:
        """Queue one request without handing anything out (the scheduler serves it)."""
        ask = NewRequest(tuple(labels), requestor, tenant, priority, deadline)
        return self.hand_out([ask], lambda _queue: [], []).created[0]

    def hand_out(
        self, new: Sequence[NewRequest], plan: Planner, providers: Sequence[str]
    ) -> HandOut:
        """Queue `new`, then hand pending requests their sets as `plan` places them.

        `plan` sees the queue and the ready nodes of `providers` inside the
        transaction and returns placements. A placement
        the pool cannot honour (on PostgreSQL another claimer may hold the rows)
        leaves that request pending.
        """
        now = time.time()
        with self._write() as conn:
            created_ids = _insert(conn, new, now)
            pending = _pending(conn, created_ids)
            pending += [
                RequestRow(
                    i,
                    list(r.labels),
                    r.requestor,
                    r.tenant,
                    r.priority,
                    RequestState.PENDING,
                    "",
                    now,
                    now,
                    r.deadline,
                )
                for i, r in zip(created_ids, new, strict=True)
            ]
            if not pending:
                return HandOut([], {}, set())
            by_id = {r.id: r for r in pending}
            demand: Counter[str] = Counter()
            for request in pending:
                demand.update(request.labels)
            queue = Queue(pending, _ready(conn, providers, demand), created_ids)
            placements = [p for p in plan(queue) if p[0] in by_id]
            claims = _pick(conn, [(by_id[rid], provider) for rid, provider in placements])
            fulfilled = _claim(conn, claims, now) if claims else {}
            created = [fulfilled[i][0] if i in fulfilled else by_id[i] for i in created_ids]
        return HandOut(created, fulfilled, {r.id for r in pending} - set(fulfilled))

    def fulfil(self, request_id: int, providers: Sequence[str]) -> list[NodeRow] | None:
        """Hand one pending request its set from the first provider that has it all ready.

        Returns the nodes, or None when no provider has them all ready now; raises
        StaleState if the request is no longer pending.
        """
        done = self.hand_out([], first_fit_for(providers, {request_id}), providers)
        if request_id in done.fulfilled:
            return done.nodes_of(request_id)
        state = self.request(request_id).state
        if state != RequestState.PENDING:
            raise StaleState(f"request {request_id} is {state}, not pending")
        return None


def _insert(conn: Connection, new: Sequence[NewRequest], now: float) -> list[int]:
    """Insert the new requests in one statement; their ids, in the order of `new`."""
    if not new:
        return []
    rows = [
        {
            "labels": list(r.labels),
            "requestor": r.requestor,
            "tenant": r.tenant,
            "priority": r.priority,
            "state": RequestState.PENDING,
            "created_at": now,
            "state_at": now,
            "deadline": r.deadline,
        }
        for r in new
    ]
    # One multi-row INSERT ... RETURNING. Its rows may come back in any order, and
    # asking for parameter order makes SQLite insert row by row, so each new request
    # is matched to a returned row by its content; identical requests are
    # interchangeable, so any match among them is right.
    ids: dict[tuple[object, ...], list[int]] = {}
    for request_id, *content in conn.execute(_QUEUE, rows):
        ids.setdefault(_content(*content), []).append(request_id)
    return [
        ids[_content(r.labels, r.requestor, r.tenant, r.priority, r.deadline)].pop() for r in new
    ]


def _content(
    labels: Sequence[str], requestor: str, tenant: str, priority: int, deadline: float | None
) -> tuple[object, ...]:
    return (tuple(labels), requestor, tenant, priority, deadline)


def _pending(conn: Connection, besides: list[int]) -> list[RequestRow]:
    """Pending requests, oldest first, except the ones this hand-out just queued."""
    # Positional: the row classes list their fields in column order (a test checks).
    return [RequestRow(*row) for row in conn.execute(_PENDING, {"besides": besides})]


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
    counts = conn.execute(_ready_counts(len(pairs)), params).one()
    return Counter({pair: n for pair, n in zip(pairs, counts, strict=True) if n})


@functools.cache
def _ready_counts(pairs: int) -> Select[tuple[int, ...]]:
    """One row: for each i, min(ready nodes of provider :p<i> and label :l<i>, :c<i>)."""
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
        counts.append(select(func.count()).select_from(capped).scalar_subquery())
    return select(*counts)


def _pick(
    conn: Connection, placed: list[tuple[RequestRow, str]]
) -> list[tuple[RequestRow, str, list[int]]]:
    """Ready node ids for each placement, oldest first; unplaceable requests are left out."""
    wanted: Counter[tuple[str, str]] = Counter()
    for request, provider in placed:
        wanted.update((provider, label) for label in request.labels)
    free = {key: deque(_ready_ids(conn, *key, count)) for key, count in wanted.items()}
    claims = []
    seen: set[int] = set()
    for request, provider in placed:
        if request.id in seen:
            continue
        if any(len(free[(provider, label)]) < n for label, n in needs(tuple(request.labels))):
            continue
        seen.add(request.id)
        claims.append((request, provider, [free[(provider, x)].popleft() for x in request.labels]))
    return claims


def _ready_ids(conn: Connection, provider: str, label: str, count: int) -> list[int]:
    return list(conn.scalars(_READY_IDS, {"provider": provider, "label": label, "count": count}))


# The statements are built once: building one costs more than running it here.
_QUEUE = insert(requests).returning(
    requests.c.id,
    requests.c.labels,
    requests.c.requestor,
    requests.c.tenant,
    requests.c.priority,
    requests.c.deadline,
)
_PENDING = (
    select(requests)
    .where(
        requests.c.state == RequestState.PENDING,
        requests.c.id.not_in(bindparam("besides", expanding=True)),
    )
    .order_by(requests.c.created_at, requests.c.id)
)
_READY_IDS = (
    select(nodes.c.id)
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
# One history event per claimed node, written by the database from the claimed rows.
_HISTORY = insert(node_events).from_select(
    ["node_id", "at", "from_state", "to_state", "reason"],
    select(
        nodes.c.id,
        bindparam("at"),
        literal(NodeState.READY.value),
        literal(NodeState.IN_USE.value),
        nodes.c.reason,
    ).where(nodes.c.id.in_(bindparam("claimed", expanding=True))),
)
_CLAIMED = select(nodes).where(nodes.c.id.in_(bindparam("claimed", expanding=True)))
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


def _claim(
    conn: Connection, claims: list[tuple[RequestRow, str, list[int]]], now: float
) -> dict[int, tuple[RequestRow, list[NodeRow]]]:
    """Move every claimed node ready -> in-use and settle its request: all or nothing."""
    states.check_node(NodeState.READY, NodeState.IN_USE)
    states.check_request(RequestState.PENDING, RequestState.FULFILLED)
    moves = [
        {
            "node": node_id,
            "at": now,
            "why": f"handed to request {request.id}",
            "request": request.id,
            "for_tenant": request.tenant,
        }
        for request, _, node_ids in claims
        for node_id in node_ids
    ]
    # Compare-and-set, many rows at once: if any node left `ready` under us, or any
    # request stopped pending, the whole transaction rolls back and nothing is handed.
    if _execute_many(conn, _CLAIM, moves) != len(moves):
        raise StaleState("a ready node was taken during the hand-out; nothing was handed")
    claimed = [m["node"] for m in moves]
    conn.execute(_HISTORY, {"at": now, "claimed": claimed})
    settles = [
        {
            "request": request.id,
            "at": now,
            "by": provider,
            "why": f"nodes {', '.join(str(n) for n in node_ids)}",
        }
        for request, provider, node_ids in claims
    ]
    if _execute_many(conn, _SETTLE, settles) != len(settles):
        raise StaleState("a request stopped pending during the hand-out; nothing was handed")
    rows = {row.id: NodeRow(*row) for row in conn.execute(_CLAIMED, {"claimed": claimed})}
    return {
        request.id: (
            RequestRow(
                request.id,
                request.labels,
                request.requestor,
                request.tenant,
                request.priority,
                RequestState.FULFILLED,
                settle["why"],
                request.created_at,
                now,
                request.deadline,
                provider,
                now,
            ),
            [rows[n] for n in node_ids],
        )
        for (request, provider, node_ids), settle in zip(claims, settles, strict=True)
    }


def _execute_many(conn: Connection, statement: Executable, rows: list[dict[str, Any]]) -> int:
    """executemany of `statement` as SQLAlchemy writes it for this database, without its
    per-row parameter processing (~5 µs a row here; these rows hold plain values).
    Returns the number of rows changed."""
    sql, in_order, fixed = _compiled(statement, conn.dialect)
    if in_order is None:
        params: list[Any] = [{**fixed, **row} for row in rows]
    else:
        params = [in_order({**fixed, **row}) for row in rows]
    return conn.exec_driver_sql(sql, params).rowcount


@functools.cache
def _compiled(
    statement: Executable, dialect: Dialect
) -> tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]] | None, dict[str, Any]]:
    """The SQL, what puts a row's values in its positional order (None for a driver
    with named parameters), and the statement's own values."""
    compiled = statement.compile(dialect=dialect)
    # The statement's own literals (the states compared and set) have values here;
    # the named bindparams the rows fill in are None.
    fixed = {k: v for k, v in compiled.params.items() if v is not None}
    order = compiled.positiontup
    # The claim and settle statements take several values (itemgetter of one key
    # would return the value, not a 1-tuple).
    assert order is None or len(order) > 1
    return compiled.string, None if order is None else operator.itemgetter(*order), fixed
