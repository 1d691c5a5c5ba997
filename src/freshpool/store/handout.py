"""The hand-out: one transaction queues new requests and gives pending ones ready nodes.

This is the only way a node leaves `ready` for a job. A batch of any size costs a
fixed number of statements (read the queue, insert the new requests, read the ready
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Dialect,
    Executable,
    Insert,
    Select,
    bindparam,
    func,
    insert,
    select,
)

from freshpool.core import states
from freshpool.core.states import NodeState, RequestState
from freshpool.store.base import StaleState, StoreBase, cas_statement
from freshpool.store.db import driver_errors
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
        self,
        new: Sequence[NewRequest],
        plan: Planner,
        providers: Sequence[str],
        wait: bool = True,
    ) -> HandOut:
        """Queue `new`, then hand pending requests their sets as `plan` places them.

        `plan` sees the queue and the ready nodes of `providers` inside the
        transaction and returns placements. A placement
        the pool cannot honour (on PostgreSQL another claimer may hold the rows)
        leaves that request pending. With `wait` false it raises WriteBusy, having
        done nothing, if another writer holds the lock.
        """
        now = time.time()
        with self._write(wait) as conn:
            # The queue as it was, then this hand-out's requests behind it.
            pending = _pending(conn)
            created_ids = _insert(conn, new, now)
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
    # A multi-row INSERT ... RETURNING per chunk (see _chunks). Its rows may come
    # back in any order, so each new request is matched to a returned row by its
    # content; identical requests are interchangeable, so any match among them is
    # right.
    labels_of = _labels_codec(conn.dialect)
    ids: dict[tuple[object, ...], list[int]] = {}
    pending = RequestState.PENDING.value
    rows = [
        (
            labels_of.encode(r.labels),
            r.requestor,
            r.tenant,
            r.priority,
            pending,
            now,
            now,
            r.deadline,
        )
        for r in new
    ]
    for start, size in _chunks(len(new)):
        values = tuple(value for row in rows[start : start + size] for value in row)
        returned = _rows(conn, _queue(size), values, names=_queue_names(size), raw=True)
        for request_id, labels, *rest in returned:
            ids.setdefault((labels_of.decode(labels), *rest), []).append(request_id)
    return [ids[(r.labels, r.requestor, r.tenant, r.priority, r.deadline)].pop() for r in new]


@dataclass(frozen=True)
class _LabelsCodec:
    """A request's labels to the driver's value and back, through the column type's
    own JSON processors, remembered: a pass queues many requests for few label sets,
    and encoding and decoding each one's was a tenth of the insert."""

    to_driver: Callable[[Any], Any] | None
    from_driver: Callable[[Any], Any] | None

    def encode(self, labels: tuple[str, ...]) -> Any:
        return _encoded(labels, self.to_driver)

    def decode(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):  # JSON text (SQLite); PostgreSQL's driver decodes
            return _decoded(value, self.from_driver)
        return tuple(value)


@functools.cache
def _labels_codec(dialect: Dialect) -> _LabelsCodec:
    impl = requests.c.labels.type.dialect_impl(dialect)
    return _LabelsCodec(impl.bind_processor(dialect), impl.result_processor(dialect, None))


@functools.lru_cache(maxsize=1024)
def _encoded(labels: tuple[str, ...], to_driver: Callable[[Any], Any] | None) -> Any:
    return to_driver(list(labels)) if to_driver else list(labels)


@functools.lru_cache(maxsize=1024)
def _decoded(text: str, from_driver: Callable[[Any], Any] | None) -> tuple[str, ...]:
    return tuple(from_driver(text) if from_driver else text)


def _pending(conn: Connection) -> list[RequestRow]:
    """Pending requests, oldest first."""
    # Positional: the row classes list their fields in column order (a test checks).
    return [RequestRow(*row) for row in _rows(conn, _PENDING, {})]


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
    (counts,) = _rows(conn, _ready_counts(len(pairs)), params)
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
) -> list[tuple[RequestRow, str, list[tuple[Any, ...]]]]:
    """Ready nodes (rows) for each placement, oldest first; unplaceable requests are
    left out."""
    wanted: Counter[tuple[str, str]] = Counter()
    for request, provider in placed:
        wanted.update((provider, label) for label in request.labels)
    free = {
        (provider, label): deque(
            _rows(conn, _READY_ROWS, {"provider": provider, "label": label, "count": count})
        )
        for (provider, label), count in wanted.items()
    }
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


# The statements are built once: building one costs more than running it here.
# The columns a new request is queued with.
_QUEUED = (
    "labels",
    "requestor",
    "tenant",
    "priority",
    "state",
    "created_at",
    "state_at",
    "deadline",
)
# The largest INSERT of new requests; a power of two (see _chunks).
QUEUE_ROWS = 64


def _chunks(rows: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the INSERTs for `rows` new requests: powers of two, largest
    first (37 = 32 + 4 + 1).

    An INSERT of each size is built and compiled once, and that took 1-12 ms on
    the event loop the first time (more for more rows). With a size for every
    batch (1 to 50 at 50 HTTP clients), those pauses came all through a server's
    first minutes; these sizes are seven, all seen within its first seconds.
    """
    start = 0
    while start < rows:
        size = min(QUEUE_ROWS, 1 << ((rows - start).bit_length() - 1))
        yield start, size
        start += size


@functools.lru_cache(maxsize=QUEUE_ROWS.bit_length())
def _queue(rows: int) -> Insert:
    """One INSERT of `rows` requests, returning what tells them apart."""
    names = iter(_queue_names(rows))
    return (
        insert(requests)
        .values([{column: bindparam(next(names)) for column in _QUEUED} for _ in range(rows)])
        .returning(
            requests.c.id,
            requests.c.labels,
            requests.c.requestor,
            requests.c.tenant,
            requests.c.priority,
            requests.c.deadline,
        )
    )


@functools.cache
def _queue_names(rows: int) -> tuple[str, ...]:
    """The INSERT's parameters for `rows` requests: _QUEUED's, row after row."""
    return tuple(f"{column}_{row}" for row in range(rows) for column in _QUEUED)


_PENDING = (
    select(requests)
    .where(requests.c.state == RequestState.PENDING)
    .order_by(requests.c.created_at, requests.c.id)
)
# Whole rows: a claimed node is then known without reading it again.
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
# A claim's move of one node: its values, in this order.
_MOVE = ("node", "at", "why", "request", "for_tenant")
# What a claim sets on a node row besides its state: column -> the move's value.
_CLAIM_SETS = {"state_at": "at", "reason": "why", "request_id": "request", "tenant": "for_tenant"}
_CLAIM = cas_statement(
    nodes,
    bindparam("node"),
    NodeState.READY,
    {
        "state": NodeState.IN_USE,
        **{column: bindparam(key) for column, key in _CLAIM_SETS.items()},
    },
)
# One history event per claimed node.
_HISTORY = insert(node_events).values(
    node_id=bindparam("node"),
    at=bindparam("at"),
    from_state=NodeState.READY.value,
    to_state=NodeState.IN_USE.value,
    reason=bindparam("why"),
)
# Where in a node row the claim's columns are.
_STATE = list(nodes.c.keys()).index("state")
_CLAIM_AT = [
    (list(nodes.c.keys()).index(column), _MOVE.index(key)) for column, key in _CLAIM_SETS.items()
]
# A settlement of one request: its values, in this order.
_SETTLEMENT = ("request", "at", "by", "why")
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
    conn: Connection, claims: list[tuple[RequestRow, str, list[tuple[Any, ...]]]], now: float
) -> dict[int, tuple[RequestRow, list[NodeRow]]]:
    """Move every claimed node ready -> in-use and settle its request: all or nothing."""
    states.check_node(NodeState.READY, NodeState.IN_USE)
    states.check_request(RequestState.PENDING, RequestState.FULFILLED)
    # Per claim, one move per node: the values its compare-and-set writes.
    moves_of = [
        [
            (node[0], now, f"handed to request {request.id}", request.id, request.tenant)
            for node in picked
        ]
        for request, _, picked in claims
    ]
    moves = [move for claim_moves in moves_of for move in claim_moves]
    # Compare-and-set, many rows at once: if any node left `ready` under us, or any
    # request stopped pending, the whole transaction rolls back and nothing is handed.
    if _execute_many(conn, _CLAIM, _MOVE, moves) != len(moves):
        raise StaleState("a ready node was taken during the hand-out; nothing was handed")
    _execute_many(conn, _HISTORY, _MOVE, moves)
    settles = [
        (request.id, now, provider, f"nodes {', '.join(str(n[0]) for n in picked)}")
        for request, provider, picked in claims
    ]
    if _execute_many(conn, _SETTLE, _SETTLEMENT, settles) != len(settles):
        raise StaleState("a request stopped pending during the hand-out; nothing was handed")
    return {
        request.id: (
            RequestRow(
                request.id,
                request.labels,
                request.requestor,
                request.tenant,
                request.priority,
                RequestState.FULFILLED,
                why,
                request.created_at,
                now,
                request.deadline,
                provider,
                now,
            ),
            [_claimed(node, move) for node, move in zip(picked, claim_moves, strict=True)],
        )
        for (request, provider, picked), (*_, why), claim_moves in zip(
            claims, settles, moves_of, strict=True
        )
    }


def _claimed(row: tuple[Any, ...], move: tuple[Any, ...]) -> NodeRow:
    """A picked node's row as its move left it (the compare-and-set succeeded, on a
    row that was, column for column, this one: the transaction holds it)."""
    values = list(row)
    values[_STATE] = NodeState.IN_USE.value
    for index, key in _CLAIM_AT:
        values[index] = move[key]
    return NodeRow(*values)


def _rows(
    conn: Connection,
    statement: Executable,
    params: dict[str, Any] | tuple[Any, ...],
    names: tuple[str, ...] = (),
    raw: bool = False,
) -> list[tuple[Any, ...]]:
    """The rows of `statement`, run on the driver's cursor (see _Plain), each value as
    SQLAlchemy would give it (`raw`: as the driver gives it). `params` by name, or
    a tuple of the values of parameters `names`."""
    plain = _plain(statement, conn.dialect)
    if isinstance(params, tuple):
        args = _binder(statement, conn.dialect, names)(params)
    else:
        args = plain.row(params)
    cursor = _execute(conn, plain, args, many=False)
    rows = cursor.fetchall()
    description = tuple(d[1] for d in cursor.description)
    cursor.close()
    processors = () if raw else _processors(statement, conn.dialect, description)
    if not processors:
        return rows  # type: ignore[no-any-return]
    processed = []
    for row in rows:
        values = list(row)
        for i, process in processors:
            if values[i] is not None:
                values[i] = process(values[i])
        processed.append(tuple(values))
    return processed


def _execute_many(
    conn: Connection, statement: Executable, names: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> int:
    """executemany of `statement` on the driver's cursor, each row the values of its
    parameters `names`; the number of rows changed."""
    plain = _plain(statement, conn.dialect)
    bind = _binder(statement, conn.dialect, names)
    cursor = _execute(conn, plain, [bind(row) for row in rows], many=True)
    changed: int = cursor.rowcount
    cursor.close()
    return changed


def _execute(conn: Connection, plain: _Plain, params: Any, many: bool) -> Any:
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        with driver_errors(conn.dialect, plain.sql, params):
            if many:
                cursor.executemany(plain.sql, params)
            else:
                cursor.execute(plain.sql, params)
    except BaseException:
        cursor.close()
        raise
    return cursor


@dataclass(frozen=True)
class _Plain:
    """A hand-out statement compiled once for a database and run on its driver's
    cursor. A pass runs a handful of statements, and SQLAlchemy's work around each
    execution (~40 us a statement, ~3 us a row here, against 2 us for the statement
    itself) was most of a small pass, and more beside a busy event loop. The SQL is
    still SQLAlchemy's, for whichever database the store is on. Values go to the
    driver as they are: the hand-out's are plain strings and numbers (_insert encodes
    the one JSON column with the column type's own encoder)."""

    sql: str
    # The parameters' names, in order for a positional driver.
    names: tuple[str, ...]
    order: Callable[[dict[str, Any]], tuple[Any, ...]] | None
    # The statement's own values (the states it compares and sets).
    fixed: dict[str, Any]

    def row(self, params: dict[str, Any]) -> Any:
        merged = {**self.fixed, **params}
        if self.order is None:  # a driver that takes names: just the statement's
            return {name: merged[name] for name in self.names}
        return self.order(merged)


@functools.cache
def _plain(statement: Executable, dialect: Dialect) -> _Plain:
    compiled = statement.compile(dialect=dialect)
    fixed = {k: v for k, v in compiled.params.items() if v is not None}
    if compiled.positiontup is None:
        return _Plain(compiled.string, tuple(compiled.params), None, fixed)
    names = tuple(compiled.positiontup)
    return _Plain(compiled.string, names, _picker(names), fixed)


def _picker(keys: tuple[Any, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The items at `keys`, always as a tuple (itemgetter of one key gives the item
    itself, and of none is an error)."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    return lambda items: tuple(items[key] for key in keys)


@functools.cache
def _binder(
    statement: Executable, dialect: Dialect, names: tuple[str, ...]
) -> Callable[[tuple[Any, ...]], Any]:
    """What turns the values of parameters `names` (a tuple, in that order) into the
    driver's parameters for `statement`. For a positional driver that is one
    itemgetter, worked out once: a dict per row, merged and reordered, was most of
    a claim's Python (and a third of an insert's)."""
    plain = _plain(statement, dialect)
    if plain.order is None:
        return lambda values: plain.row(dict(zip(names, values, strict=True)))
    fixed = tuple(name for name in dict.fromkeys(plain.names) if name not in names)
    tail = tuple(plain.fixed[name] for name in fixed)
    where = {name: i for i, name in enumerate(names + fixed)}
    indices = tuple(where[name] for name in plain.names)
    if not tail and indices == tuple(range(len(names))):
        return _as_they_are  # the values are in the driver's order already
    pick = _picker(indices)
    if not tail:
        return pick
    return lambda values: pick(values + tail)


def _as_they_are(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return values


@functools.cache
def _processors(
    statement: Executable, dialect: Dialect, description: tuple[Any, ...]
) -> tuple[tuple[int, Callable[[Any], Any]], ...]:
    """(column, what turns its driver value into SQLAlchemy's) for each column that
    needs it (JSON text to a list on SQLite, say); `description` holds the driver's
    type codes, which some need."""
    columns = statement.exported_columns  # type: ignore[attr-defined]
    processors = (
        column.type.dialect_impl(dialect).result_processor(dialect, code)
        for column, code in zip(columns, description, strict=True)
    )
    return tuple((i, p) for i, p in enumerate(processors) if p is not None)
