"""Node rows: creation, compare-and-set transitions with history, removal."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from freshpool.core import states
from freshpool.core.errors import NotFound, StaleState
from freshpool.core.states import NodeState
from freshpool.store.base import StoreBase, cas_statement
from freshpool.store.fencing import Fence
from freshpool.store.room import NewNodes, Room, fit
from freshpool.store.schema import node_events, nodes


@dataclass(frozen=True)
class NodeRow:
    id: int
    label: str
    provider: str
    state: str
    build_id: str
    hostname: str
    external_id: str | None
    access: dict[str, Any] | None
    request_id: int | None
    reason: str
    created_at: float
    state_at: float
    ready_at: float | None
    delete_attempts: int
    next_attempt_at: float
    tenant: str = ""
    checked_at: float | None = None


@dataclass(frozen=True)
class EventRow:
    id: int
    node_id: int
    at: float
    from_state: str | None
    to_state: str | None
    reason: str
    # What the node was then (None in events older than schema 0005).
    label: str | None = None
    provider: str | None = None
    tenant: str | None = None
    # Who wrote it, for the launcher's fenced writes (None otherwise, and before 0009).
    launcher: str | None = None
    generation: int | None = None


@dataclass(frozen=True)
class Move:
    """One node's compare-and-set from `expect` to `to`, setting `values` besides."""

    node_id: int
    expect: NodeState
    to: NodeState
    reason: str
    values: dict[str, Any] = field(default_factory=dict)


class NodeQueries(StoreBase):
    def new_node(self, label: str, provider: str, build_id: str, hostname_prefix: str) -> NodeRow:
        (row,) = self.new_nodes(label, provider, build_id, hostname_prefix, 1)
        return row

    def new_nodes(
        self,
        label: str,
        provider: str,
        build_id: str,
        hostname_prefix: str,
        count: int,
        room: Room | None = None,
    ) -> list[NodeRow]:
        """Rows for up to `count` nodes about to be launched, in `building`, in one
        transaction: as many as `room` leaves (counted in that transaction), all if
        no room is given.

        The launcher writes a node's row before it asks the provider for the
        instance, so a crash in between leaves a row to clean up, never an
        instance nobody knows about.
        """
        ask = NewNodes(label, provider, build_id, hostname_prefix, count, room)
        return self.new_node_sets([ask])[0]

    def new_node_sets(self, asks: Sequence[NewNodes]) -> list[list[NodeRow]]:
        """`new_nodes` for several launches (a pass's, on every provider) in one
        transaction, each counting the rows of those before it; a list of rows per ask."""
        if not any(a.count > 0 for a in asks):
            return [[] for _ in asks]
        now = self.clock()
        state = NodeState.BUILDING
        with self._write() as conn:
            fence = self._fence_providers(conn, sorted({a.provider for a in asks}))
            counts = fit(conn, asks)
            rows = [
                {"label": a.label, "provider": a.provider, "state": state,
                 "build_id": a.build_id, "hostname": "", "created_at": now, "state_at": now}
                for a, n in zip(asks, counts, strict=True) for _ in range(n)
            ]  # fmt: skip
            if not rows:
                return [[] for _ in asks]
            # One statement for all (SQLAlchemy's insertmanyvalues), ids in order.
            inserted = conn.execute(_NEW_NODES, rows).all()
            made, at = [], 0
            for ask, n in zip(asks, counts, strict=True):
                made.append([NodeRow(**{**r._mapping, "hostname": f"{ask.hostname_prefix}-{r.id}"})
                             for r in inserted[at : at + n]])  # fmt: skip
                at += n
            named = [n for rows_of in made for n in rows_of]
            conn.execute(_SET_HOSTNAME, [{"node": n.id, "name": n.hostname} for n in named])
            born = [(n, None, state, f"launch on {n.provider}") for n in named]
            _events(conn, born, now, fence)
        return made

    def transitions(self, moves: Sequence[Move]) -> list[NodeRow | StaleState]:
        """Compare-and-set many nodes in one transaction (the launcher's pass moves
        hundreds at a time). For each move, in order: the row as it now is, or
        StaleState if the node was no longer in `expect` (that move changed nothing)."""
        for move in moves:
            states.check_node(move.expect, move.to)
        if not moves:
            return []
        now = self.clock()
        with self._write() as conn:
            fence = self._fence_nodes(conn, [m.node_id for m in moves])
            results = [_compare_and_set(conn, move, now) for move in moves]
            _events(
                conn,
                [
                    (r, m.expect, m.to, m.reason)
                    for m, r in zip(moves, results, strict=True)
                    if isinstance(r, NodeRow)
                ],
                now,
                fence,
            )
        return results

    def node(self, node_id: int) -> NodeRow:
        with self._read() as conn:
            return node_in(conn, node_id)

    def nodes(
        self,
        states_in: Sequence[str] | None = None,
        label: str | None = None,
        provider: str | None = None,
        labels_not_in: Sequence[str] | None = None,
    ) -> list[NodeRow]:
        query = select(nodes).order_by(nodes.c.id)
        if states_in is not None:
            query = query.where(nodes.c.state.in_([str(s) for s in states_in]))
        if label is not None:
            query = query.where(nodes.c.label == label)
        if labels_not_in is not None:
            query = query.where(nodes.c.label.not_in(list(labels_not_in)))
        if provider is not None:
            query = query.where(nodes.c.provider == provider)
        with self._read() as conn:
            return [NodeRow(**row._mapping) for row in conn.execute(query)]

    def node_counts(self) -> Counter[tuple[str, str, str]]:
        """Nodes by (provider, label, state), in one grouped query."""
        query = select(nodes.c.provider, nodes.c.label, nodes.c.state, func.count()).group_by(
            nodes.c.provider, nodes.c.label, nodes.c.state
        )
        with self._read() as conn:
            return Counter({(p, lbl, s): n for p, lbl, s, n in conn.execute(query)})

    def transition(
        self, node_id: int, expect: NodeState, to: NodeState, reason: str, **values: Any
    ) -> NodeRow:
        """Compare-and-set one node from `expect` to `to`; raises StaleState if it moved."""
        (result,) = self.transitions([Move(node_id, expect, to, reason, values)])
        if isinstance(result, StaleState):
            raise result
        return result

    def move(self, node_id: int, to: NodeState, reason: str) -> NodeRow:
        """Move a node from whatever state it is in, if the state table allows it."""
        for _ in range(10):
            current = self.node(node_id)
            states.check_node(current.state, to)
            try:
                return self.transition(node_id, NodeState(current.state), to, reason)
            except StaleState:
                continue
        raise StaleState(f"node {node_id} kept changing state; try again")

    def set_instance(
        self, node_id: int, external_id: str | None, access: dict[str, Any] | None
    ) -> None:
        """Record what the provider created, whatever state the node is in now."""
        with self._write() as conn:
            self._fence_nodes(conn, [node_id])
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id)
                .values(external_id=external_id, access=access)
            )

    def in_state_since_before(self, before: Mapping[str, float]) -> list[NodeRow]:
        """Nodes in a state of `before` that entered it before its time there (timeout
        candidates)."""
        if not before:
            return []
        query = select(nodes).where(
            or_(*(and_(nodes.c.state == str(s), nodes.c.state_at < t) for s, t in before.items()))
        )
        with self._read() as conn:
            return [NodeRow(**row._mapping) for row in conn.execute(query)]

    def due_for_check(self, label: str, before: float) -> list[NodeRow]:
        """Ready nodes of a label last tested (or made ready) before `before`."""
        last = func.coalesce(nodes.c.checked_at, nodes.c.ready_at, nodes.c.state_at)
        query = select(nodes).where(
            nodes.c.state == NodeState.READY, nodes.c.label == label, last < before
        )
        with self._read() as conn:
            return [NodeRow(**row._mapping) for row in conn.execute(query)]

    def due_for_delete(self, now: float) -> list[NodeRow]:
        """Deleting nodes whose next delete attempt is due (no live lease, no backoff)."""
        query = select(nodes).where(
            nodes.c.state == NodeState.DELETING, nodes.c.next_attempt_at <= now
        )
        with self._read() as conn:
            return [NodeRow(**row._mapping) for row in conn.execute(query)]

    def lease_deletes(self, until: dict[int, float]) -> None:
        """A delete of each node is under way until its time; nobody starts another
        before then."""
        if not until:
            return
        with self._write() as conn:
            self._fence_nodes(conn, list(until))
            conn.execute(_LEASE, [{"node": n, "until": t} for n, t in until.items()])

    def release_delete_leases(self, now: float, provider: str | None = None) -> None:
        """After a restart (or a takeover of `provider`), deletes the previous launcher
        had in flight are due again, retries as much as first tries. The row keeps
        one time for both a running delete's lease and a failed one's backoff, so a
        backoff ends here too: the new owner tries once at once, as its breakers
        (in memory, new with it) let it."""
        query = update(nodes).where(
            nodes.c.state == NodeState.DELETING,
            nodes.c.next_attempt_at > now,
        )
        if provider is not None:
            query = query.where(nodes.c.provider == provider)
        with self._write() as conn:
            if provider is not None:
                self._fence_providers(conn, [provider])
            conn.execute(query.values(next_attempt_at=0))

    def mark_checked(self, node_id: int) -> None:
        """A health check of a ready node passed."""
        with self._write() as conn:
            self._fence_nodes(conn, [node_id])
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.state == NodeState.READY)
                .values(checked_at=self.clock())
            )

    def record_delete_failure(self, node_id: int, error: str, retry_at: float) -> None:
        with self._write() as conn:
            fence = self._fence_nodes(conn, [node_id])
            row = conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.state == NodeState.DELETING)
                .values(
                    reason=error,
                    delete_attempts=nodes.c.delete_attempts + 1,
                    next_attempt_at=retry_at,
                )
                .returning(*nodes.c)
            ).first()
            if row is None:
                return
            why = f"delete failed, will retry: {error}"
            gone = NodeState.DELETING
            _events(conn, [(NodeRow(**row._mapping), gone, gone, why)], self.clock(), fence)

    def remove_node(self, node_id: int, reason: str) -> None:
        """Drop a node's row; only a node in `deleting` whose instance is confirmed gone."""
        (result,) = self.remove_nodes([(node_id, reason)])
        if result is not None:
            raise result

    def remove_nodes(self, removals: Sequence[tuple[int, str]]) -> list[StaleState | None]:
        """`remove_node` for many (node, why) in one transaction; for each, in order,
        None if removed or StaleState if the node was not deleting (and stays)."""
        if not removals:
            return []
        now = self.clock()
        results: list[StaleState | None] = []
        removed: list[tuple[NodeRow, str | None, str | None, str]] = []
        with self._write() as conn:
            fence = self._fence_nodes(conn, [node_id for node_id, _ in removals])
            for node_id, why in removals:
                row = conn.execute(_REMOVE, {"node": node_id}).first()
                if row is not None:
                    results.append(None)
                    removed.append((NodeRow(**row._mapping), NodeState.DELETING, None, why))
                    continue
                results.append(_stale(conn, node_id, NodeState.DELETING))
            _events(conn, removed, now, fence)
        return results

    def events(self, node_id: int) -> list[EventRow]:
        query = (
            select(node_events).where(node_events.c.node_id == node_id).order_by(node_events.c.id)
        )
        with self._read() as conn:
            return [EventRow(**row._mapping) for row in conn.execute(query)]


# Built once: building a statement cost several times what running it did.
_NEW_NODES = insert(nodes).returning(*nodes.c, sort_by_parameter_order=True)
_SET_HOSTNAME = (
    update(nodes).where(nodes.c.id == bindparam("node")).values(hostname=bindparam("name"))
)
_LEASE = (
    update(nodes)
    .where(nodes.c.id == bindparam("node"), nodes.c.state == NodeState.DELETING)
    .values(next_attempt_at=bindparam("until"))
)
# The removed row comes back so its event can say what the node was.
_REMOVE = (
    delete(nodes)
    .where(nodes.c.id == bindparam("node"), nodes.c.state == NodeState.DELETING)
    .returning(*nodes.c)
)
EVENT = insert(node_events).values(
    node_id=bindparam("node"),
    at=bindparam("at"),
    from_state=bindparam("old"),
    to_state=bindparam("new"),
    reason=bindparam("why"),
    label=bindparam("ev_label"),
    provider=bindparam("ev_provider"),
    tenant=bindparam("ev_tenant"),
    launcher=bindparam("ev_launcher"),
    generation=bindparam("ev_generation"),
)


def event_params(
    node: NodeRow,
    at: float,
    old: str | None,
    new: str | None,
    why: str,
    fence: Fence | None = None,
) -> dict[str, Any]:
    """One EVENT's parameters: the move, what the node was (its row as the move left
    it), and the lease a fenced write held on its provider."""
    launcher, generation = (fence or {}).get(node.provider, (None, None))
    return {
        "node": node.id,
        "at": at,
        "old": old,
        "new": new,
        "why": why,
        "ev_label": node.label,
        "ev_provider": node.provider,
        "ev_tenant": node.tenant,
        "ev_launcher": launcher,
        "ev_generation": generation,
    }


def _events(
    conn: Connection,
    events: Sequence[tuple[NodeRow, str | None, str | None, str]],
    at: float,
    fence: Fence | None = None,
) -> None:
    """History: (node row, from state, to state, why) each, all at `at`, in one
    statement, with the lease the write was fenced by."""
    if events:
        conn.execute(
            EVENT,
            [event_params(node, at, old, new, why, fence) for node, old, new, why in events],
        )


@functools.cache
def _cas_returning(expect: NodeState, to: NodeState, columns: tuple[str, ...]) -> Update:
    """The compare-and-set of a move that sets `columns` besides the state, returning
    the row as it left it."""
    return cas_statement(
        nodes,
        bindparam("node"),
        expect,
        {"state": to, **{column: bindparam(f"set_{column}") for column in columns}},
    ).returning(*nodes.c)


def _compare_and_set(conn: Connection, move: Move, now: float) -> NodeRow | StaleState:
    values = {"state_at": now, "reason": move.reason, **move.values}
    if move.to == NodeState.READY:
        values["ready_at"] = now
    columns = tuple(sorted(values))
    statement = _cas_returning(move.expect, move.to, columns)
    params = {"node": move.node_id, **{f"set_{c}": values[c] for c in columns}}
    row = conn.execute(statement, params).first()
    if row is None:
        return _stale(conn, move.node_id, move.expect)
    return NodeRow(**row._mapping)


def _stale(conn: Connection, node_id: int, expected: NodeState) -> StaleState:
    """Why a change that expected the node in `expected` found it elsewhere."""
    current = conn.scalar(select(nodes.c.state).where(nodes.c.id == node_id))
    return StaleState(f"node {node_id} is {current or 'gone'}, not {expected}")


def transition_in(
    conn: Connection,
    node_id: int,
    expect: NodeState,
    to: NodeState,
    reason: str,
    now: float,
) -> NodeRow:
    """One move inside the caller's transaction, at `now`; raises StaleState if the node moved."""
    states.check_node(expect, to)
    result = _compare_and_set(conn, Move(node_id, expect, to, reason), now)
    if isinstance(result, StaleState):
        raise result
    _events(conn, [(result, expect, to, reason)], now)
    return result


def node_in(conn: Connection, node_id: int) -> NodeRow:
    """A node's row, read inside the caller's transaction."""
    row = conn.execute(select(nodes).where(nodes.c.id == node_id)).first()
    if row is None:
        raise NotFound(f"no node {node_id}")
    return NodeRow(**row._mapping)
