"""Node rows: creation, compare-and-set transitions with history, removal."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from freshpool import states
from freshpool.states import NodeState
from freshpool.store.base import NotFound, StaleState, StoreBase, compare_and_set
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


class NodeQueries(StoreBase):
    def new_node(self, label: str, provider: str, build_id: str, hostname_prefix: str) -> NodeRow:
        now = time.time()
        with self._write() as conn:
            node_id = conn.execute(
                insert(nodes).values(
                    label=label,
                    provider=provider,
                    state=NodeState.BUILDING,
                    build_id=build_id,
                    hostname="",
                    created_at=now,
                    state_at=now,
                )
            ).inserted_primary_key[0]
            hostname = f"{hostname_prefix}-{node_id}"
            conn.execute(update(nodes).where(nodes.c.id == node_id).values(hostname=hostname))
            _event(conn, node_id, None, NodeState.BUILDING, f"launch on {provider}", now)
            return _node(conn, node_id)

    def node(self, node_id: int) -> NodeRow:
        with self._read() as conn:
            row = conn.execute(select(nodes).where(nodes.c.id == node_id)).first()
        if row is None:
            raise NotFound(f"no node {node_id}")
        return NodeRow(**row._mapping)

    def nodes(
        self,
        states_in: Sequence[str] | None = None,
        label: str | None = None,
        provider: str | None = None,
    ) -> list[NodeRow]:
        query = select(nodes).order_by(nodes.c.id)
        if states_in is not None:
            query = query.where(nodes.c.state.in_([str(s) for s in states_in]))
        if label is not None:
            query = query.where(nodes.c.label == label)
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
        states.check_node(expect, to)
        with self._write() as conn:
            return _transition(conn, node_id, expect, to, reason, values)

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
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id)
                .values(external_id=external_id, access=access)
            )

    def in_state_since_before(self, states_in: Sequence[str], before: float) -> list[NodeRow]:
        """Nodes in one of `states_in` that entered it before `before` (timeout candidates)."""
        query = select(nodes).where(
            nodes.c.state.in_([str(x) for x in states_in]), nodes.c.state_at < before
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

    def lease_delete(self, node_id: int, until: float) -> None:
        """A delete is under way until `until`; nobody starts another before then."""
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.state == NodeState.DELETING)
                .values(next_attempt_at=until)
            )

    def release_delete_leases(self, now: float) -> None:
        """After a restart, deletes the previous launcher had in flight are due again."""
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(
                    nodes.c.state == NodeState.DELETING,
                    nodes.c.next_attempt_at > now,
                    nodes.c.delete_attempts == 0,
                )
                .values(next_attempt_at=0)
            )

    def mark_checked(self, node_id: int) -> None:
        """A health check of a ready node passed."""
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.state == NodeState.READY)
                .values(checked_at=time.time())
            )

    def record_delete_failure(self, node_id: int, error: str, retry_at: float) -> None:
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.state == NodeState.DELETING)
                .values(
                    reason=error,
                    delete_attempts=nodes.c.delete_attempts + 1,
                    next_attempt_at=retry_at,
                )
            )
            _event(
                conn,
                node_id,
                NodeState.DELETING,
                NodeState.DELETING,
                f"delete failed, will retry: {error}",
                time.time(),
            )

    def remove_node(self, node_id: int, reason: str) -> None:
        """Drop a node's row; only a node in `deleting` whose instance is confirmed gone."""
        with self._write() as conn:
            gone = conn.execute(
                delete(nodes).where(nodes.c.id == node_id, nodes.c.state == NodeState.DELETING)
            ).rowcount
            if gone != 1:
                current = conn.scalar(select(nodes.c.state).where(nodes.c.id == node_id))
                raise StaleState(f"node {node_id} is {current or 'gone'}, not deleting")
            _event(conn, node_id, NodeState.DELETING, None, reason, time.time())

    def events(self, node_id: int) -> list[EventRow]:
        query = (
            select(node_events).where(node_events.c.node_id == node_id).order_by(node_events.c.id)
        )
        with self._read() as conn:
            return [EventRow(**row._mapping) for row in conn.execute(query)]


def _event(
    conn: Connection, node_id: int, old: str | None, new: str | None, reason: str, at: float
) -> None:
    conn.execute(
        insert(node_events).values(
            node_id=node_id, at=at, from_state=old, to_state=new, reason=reason
        )
    )


def _transition(
    conn: Connection,
    node_id: int,
    expect: NodeState,
    to: NodeState,
    reason: str,
    values: dict[str, Any],
) -> NodeRow:
    states.check_node(expect, to)
    now = time.time()
    if to == NodeState.READY:
        values = {**values, "ready_at": now}
    if not compare_and_set(
        conn, nodes, node_id, expect, {"state": to, "state_at": now, "reason": reason, **values}
    ):
        current = conn.scalar(select(nodes.c.state).where(nodes.c.id == node_id))
        raise StaleState(f"node {node_id} is {current or 'gone'}, not {expect}")
    _event(conn, node_id, expect, to, reason, now)
    return _node(conn, node_id)


def _node(conn: Connection, node_id: int) -> NodeRow:
    return NodeRow(**conn.execute(select(nodes).where(nodes.c.id == node_id)).one()._mapping)
