"""Request rows and what happens to a request's node set: the pending queue, listings,
finishing, cancelling, releasing the set, and the one job a node runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Text,
    and_,
    cast,
    exists,
    func,
    or_,
    select,
    update,
)

from freshpool.core import states
from freshpool.core.errors import NotFound, StaleState
from freshpool.core.states import NodeState, RequestState
from freshpool.store.base import StoreBase, compare_and_set
from freshpool.store.nodes import EVENT, NodeRow, event_params, node_in, transition_in
from freshpool.store.quotas import held_by
from freshpool.store.schema import node_events, nodes, requests

# The one event that is not a state change: the job on an in-use node started.
JOB_STARTED = "job started"


@dataclass(frozen=True)
class RequestRow:
    id: int
    labels: list[str]
    requestor: str
    tenant: str
    priority: int
    state: str
    reason: str
    created_at: float
    state_at: float
    deadline: float | None
    provider: str | None = None
    fulfilled_at: float | None = None
    ssh_keys: list[str] | None = None


_PENDING_ROW = requests.c.state == RequestState.PENDING
# The labels column as its stored JSON text: comparable on both databases (PostgreSQL's
# json type has no equality).
_labels_text = cast(requests.c.labels, Text)
# Pending requests, oldest first: the queue every scheduler pass reads.
PENDING = select(requests).where(_PENDING_ROW).order_by(requests.c.created_at, requests.c.id)


class RequestQueries(StoreBase):
    def request(self, request_id: int) -> RequestRow:
        with self._read() as conn:
            return _request(conn, request_id)

    def pending_requests(self) -> list[RequestRow]:
        with self._read() as conn:
            return [RequestRow(**row._mapping) for row in conn.execute(PENDING)]

    def pending_demand(self, tenant_quotas: Mapping[str, int] | None = None) -> Counter[str]:
        """How many nodes of each label pending requests still wait for; of a tenant in
        `tenant_quotas`, only the oldest requests that fit in what its quota has left
        (the others cannot be served yet, so nodes for them would only wait)."""
        query = (
            select(requests.c.tenant, requests.c.labels).where(_PENDING_ROW).order_by(requests.c.id)
        )
        quotas = tenant_quotas or {}
        demand: Counter[str] = Counter()
        with self._read() as conn:
            rows = conn.execute(query).all()
            capped = {tenant for tenant, _ in rows if tenant in quotas}
            held = held_by(conn, capped, lock=False)
            room = {t: quotas[t] - held[t] for t in capped}
            for tenant, labels in rows:
                if tenant in room:
                    if room[tenant] < len(labels):
                        continue
                    room[tenant] -= len(labels)
                demand.update(labels)
        return demand

    def pending_by_tenant(self) -> Counter[str]:
        query = (
            select(requests.c.tenant, func.count()).where(_PENDING_ROW).group_by(requests.c.tenant)
        )
        with self._read() as conn:
            return Counter({tenant: n for tenant, n in conn.execute(query)})

    def list_requests(
        self,
        states_in: Sequence[str] | None = None,
        tenant: str | None = None,
        limit: int = 100,
    ) -> list[RequestRow]:
        """Newest first."""
        query = select(requests).order_by(requests.c.id.desc()).limit(limit)
        if states_in is not None:
            query = query.where(requests.c.state.in_([str(s) for s in states_in]))
        if tenant is not None:
            query = query.where(requests.c.tenant == tenant)
        with self._read() as conn:
            return [RequestRow(**row._mapping) for row in conn.execute(query)]

    def requests_in(self, request_ids: Sequence[int]) -> dict[int, RequestRow]:
        """The requests of these ids that exist, by id: one query for many."""
        if not request_ids:
            return {}
        query = select(requests).where(requests.c.id.in_(list(request_ids)))
        with self._read() as conn:
            return {row.id: RequestRow(**row._mapping) for row in conn.execute(query)}

    def requests_by_requestor(
        self, names: Sequence[str], states_in: Sequence[str]
    ) -> list[RequestRow]:
        """Requests in `states_in` whose requestor is one of `names`: how a front door
        that names its requests after the outside ones finds them again after a restart."""
        if not names:
            return []
        query = select(requests).where(
            requests.c.state.in_([str(s) for s in states_in]),
            requests.c.requestor.in_(list(names)),
        )
        with self._read() as conn:
            return [RequestRow(**row._mapping) for row in conn.execute(query)]

    def request_nodes(self, request_ids: Sequence[int]) -> dict[int, list[NodeRow]]:
        """The nodes still in the store that were handed to each request."""
        found: dict[int, list[NodeRow]] = {i: [] for i in request_ids}
        if not request_ids:
            return found
        query = select(nodes).where(nodes.c.request_id.in_(list(request_ids))).order_by(nodes.c.id)
        with self._read() as conn:
            for row in conn.execute(query):
                found[row.request_id].append(NodeRow(**row._mapping))
        return found

    def fail_overdue(self, now: float, max_wait: float | None, reason: str) -> list[int]:
        """Fail every pending request past its deadline, or waiting longer than
        `max_wait`, in one statement; the ids failed."""
        late = requests.c.deadline < now
        if max_wait is not None:
            late = or_(
                late, and_(requests.c.deadline.is_(None), requests.c.created_at < now - max_wait)
            )
        # Looked for first: most passes find none, and then take no write lock.
        with self._read() as conn:
            if (
                conn.execute(select(requests.c.id).where(_PENDING_ROW, late).limit(1)).first()
                is None
            ):
                return []
        return self._fail_pending(late, reason)

    def pending_label_sets(self) -> list[str]:
        """The distinct label lists pending requests ask for, each as stored (JSON)."""
        query = select(_labels_text).where(_PENDING_ROW).distinct()
        with self._read() as conn:
            return list(conn.execute(query).scalars())

    def fail_pending_asking(self, stored: str, reason: str) -> list[int]:
        """Fail every pending request whose labels are `stored` (as pending_label_sets
        gives them); the ids failed."""
        return self._fail_pending(_labels_text == stored, reason)

    def _fail_pending(self, which: ColumnElement[bool], reason: str) -> list[int]:
        """One statement for many: on PostgreSQL the rows another writer holds (a
        hand-out, another launcher doing the same) are skipped, not waited for; they
        are looked at again on the next pass."""
        states.check_request(RequestState.PENDING, RequestState.FAILED)
        free = select(requests.c.id).where(_PENDING_ROW, which).with_for_update(skip_locked=True)
        statement = (
            update(requests)
            .where(requests.c.id.in_(free.scalar_subquery()), _PENDING_ROW)
            .values(state=RequestState.FAILED, reason=reason, state_at=self.clock())
            .returning(requests.c.id)
        )
        with self._write() as conn:
            return list(conn.execute(statement).scalars())

    def finish_request(self, request_id: int, to: RequestState, reason: str) -> RequestRow:
        """A pending request fails (or is cancelled) without nodes."""
        states.check_request(RequestState.PENDING, to)
        values = {"state": to, "reason": reason, "state_at": self.clock()}
        with self._write() as conn:
            if not compare_and_set(conn, requests, request_id, RequestState.PENDING, values):
                raise StaleState(f"request {request_id} is no longer pending")
            return _request(conn, request_id)

    def reprioritise(self, request_id: int, priority: int) -> bool:
        """A pending request's priority changes (and its place in the queue with it);
        False if it is no longer pending."""
        with self._write() as conn:
            return compare_and_set(conn, requests, request_id, RequestState.PENDING,
                                   {"priority": priority})  # fmt: skip

    def cancel_request(self, request_id: int, reason: str) -> tuple[RequestRow, list[NodeRow]]:
        """Cancel a request; nodes already handed to it go straight to deleting, in one go.

        Returns the request and the nodes sent to deletion. Cancelling a cancelled
        request changes nothing; a failed one cannot be cancelled.
        """
        now = self.clock()
        with self._write() as conn:
            request = _request(conn, request_id)
            if request.state == RequestState.CANCELLED:
                return request, []
            states.check_request(request.state, RequestState.CANCELLED)
            values = {"state": RequestState.CANCELLED, "reason": reason, "state_at": now}
            if not compare_and_set(conn, requests, request_id, request.state, values):
                raise StaleState(f"request {request_id} changed; try again")
            deleted = [
                transition_in(conn, node_id, NodeState.IN_USE, NodeState.DELETING, reason, now)
                for node_id in _in_use_of(conn, request_id)
            ]
            return _request(conn, request_id), deleted

    def release_set(self, node_id: int, reason: str) -> list[NodeRow]:
        """The job is done: this node and every other in-use node of its request become used.

        One transaction, so a node set is never half released. This is how every
        client gives nodes back (the API, the CLI, the tests).
        """
        with self._write() as conn:
            node = node_in(conn, node_id)
            if node.state != NodeState.IN_USE or node.request_id is None:
                # A held node, or one handed out some other way: only itself.
                states.check_node(node.state, NodeState.USED)
                return [
                    transition_in(
                        conn, node_id, NodeState(node.state), NodeState.USED, reason, self.clock()
                    )
                ]
            return [
                transition_in(conn, other, NodeState.IN_USE, NodeState.USED, reason, self.clock())
                for other in _in_use_of(conn, node.request_id)
            ]

    def release_request(self, request_id: int, reason: str) -> list[NodeRow]:
        """Every in-use node of a request becomes used, in one transaction."""
        with self._write() as conn:
            request = _request(conn, request_id)
            ids = _in_use_of(conn, request_id)
            if not ids:
                raise StaleState(f"request {request_id} ({request.state}) has no node in use")
            return [
                transition_in(conn, node_id, NodeState.IN_USE, NodeState.USED, reason, self.clock())
                for node_id in ids
            ]

    def start_job(self, node_id: int, detail: str = "") -> NodeRow:
        """Record that the job on an in-use node started; a node runs one job only.

        The node stays `in-use` (it entered that state when it was handed out); the
        start is an in-use -> in-use event in its history, which `job_started_at` reads.
        """
        reason = f"{JOB_STARTED}: {detail}" if detail else JOB_STARTED
        with self._write() as conn:
            node = node_in(conn, node_id)
            if node.state != NodeState.IN_USE:
                raise StaleState(f"node {node_id} is {node.state}, not in-use")
            changed = conn.execute(
                update(nodes)
                .where(
                    nodes.c.id == node_id,
                    nodes.c.state == NodeState.IN_USE,
                    ~exists(_job_start_of(node_id)),
                )
                .values(reason=reason)
            ).rowcount
            if changed != 1:
                raise StaleState(f"node {node_id} already ran a job; a node is used once")
            at, in_use = self.clock(), NodeState.IN_USE
            conn.execute(EVENT, event_params(node, at, in_use, in_use, reason))
            return node_in(conn, node_id)

    def job_started_at(self, node_id: int) -> float | None:
        query = select(func.min(node_events.c.at)).where(
            node_events.c.id.in_(_job_start_of(node_id))
        )
        with self._read() as conn:
            found: float | None = conn.scalar(query)
            return found


def _job_start_of(node_id: int) -> Select[tuple[int]]:
    """The in-use -> in-use events of a node: its job's start."""
    return select(node_events.c.id).where(
        node_events.c.node_id == node_id,
        node_events.c.from_state == NodeState.IN_USE,
        node_events.c.to_state == NodeState.IN_USE,
    )


def _in_use_of(conn: Connection, request_id: int) -> list[int]:
    query = (
        select(nodes.c.id)
        .where(nodes.c.request_id == request_id, nodes.c.state == NodeState.IN_USE)
        .order_by(nodes.c.id)
    )
    return list(conn.scalars(query))


def _request(conn: Connection, request_id: int) -> RequestRow:
    row = conn.execute(select(requests).where(requests.c.id == request_id)).first()
    if row is None:
        raise NotFound(f"no request {request_id}")
    return RequestRow(**row._mapping)
