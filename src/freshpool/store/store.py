"""The store: rows for nodes, requests and image builds, changed only by compare-and-set.

Every node state change checks the one state table (freshpool.states) and is an
`UPDATE ... WHERE id=? AND state=?`, with its event row in the same transaction.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from freshpool import states
from freshpool.states import BuildState, NodeState, RequestState
from freshpool.store import db
from freshpool.store.schema import image_builds, meta, node_events, nodes, requests


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


@dataclass(frozen=True)
class BuildRow:
    id: str
    image: str
    state: str
    path: str
    reason: str
    manifest: dict[str, Any] | None
    created_at: float
    state_at: float


@dataclass(frozen=True)
class EventRow:
    id: int
    node_id: int
    at: float
    from_state: str | None
    to_state: str | None
    reason: str


class StaleState(Exception):
    """The row was not in the state the caller expected (someone else moved it first)."""


class NotFound(LookupError):
    pass


class ChangeWatcher:
    """Tells cheaply whether another process committed since the last look.

    SQLite's data_version changes on one connection when others commit, so the
    launcher wakes at once when a CLI releases a node, without re-reading tables.
    Other backends report "maybe" every time; the caller's interval bounds the cost.
    """

    def __init__(self, engine: Engine) -> None:
        self._conn = engine.raw_connection() if engine.dialect.name == "sqlite" else None
        self._last = self._version()

    def _version(self) -> int:
        if self._conn is None:
            return 0
        cur = self._conn.cursor()
        cur.execute("PRAGMA data_version")
        value = int(cur.fetchone()[0])
        cur.close()
        return value

    def changed(self) -> bool:
        if self._conn is None:
            return True
        now = self._version()
        changed, self._last = now != self._last, now
        return changed

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = db.make_engine(url)
        # Reads take a snapshot without the write lock (see db._tune_sqlite).
        self._reader = self.engine.execution_options(readonly=True)
        db.upgrade(self.engine)
        self.cluster_id = self._cluster_id()

    @classmethod
    def open(cls, state_dir: Path, url: str | None = None) -> Store:
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(url or db.sqlite_url(state_dir))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._reader.connect() as conn:
            yield conn

    def _cluster_id(self) -> str:
        with self._write() as conn:
            found = conn.scalar(select(meta.c.value).where(meta.c.key == "cluster_id"))
            if found:
                return found
            # Short enough to fit in interface and namespace names, random enough
            # that two state dirs on one host never share it.
            value = secrets.token_hex(4)
            conn.execute(insert(meta).values(key="cluster_id", value=value))
            return value

    def change_watcher(self) -> ChangeWatcher:
        return ChangeWatcher(self.engine)

    # ---------------------------------------------------------------- nodes

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

    # ------------------------------------------------------------- requests

    def new_request(
        self,
        labels: Sequence[str],
        requestor: str = "",
        tenant: str = "",
        priority: int = 0,
        deadline: float | None = None,
    ) -> RequestRow:
        now = time.time()
        with self._write() as conn:
            request_id = conn.execute(
                insert(requests).values(
                    labels=list(labels),
                    requestor=requestor,
                    tenant=tenant,
                    priority=priority,
                    state=RequestState.PENDING,
                    created_at=now,
                    state_at=now,
                    deadline=deadline,
                )
            ).inserted_primary_key[0]
            return _request(conn, request_id)

    def request(self, request_id: int) -> RequestRow:
        with self._read() as conn:
            row = conn.execute(select(requests).where(requests.c.id == request_id)).first()
        if row is None:
            raise NotFound(f"no request {request_id}")
        return RequestRow(**row._mapping)

    def pending_demand(self) -> Counter[str]:
        """How many nodes of each label pending requests still wait for."""
        query = select(requests.c.labels).where(requests.c.state == RequestState.PENDING)
        demand: Counter[str] = Counter()
        with self._read() as conn:
            for (labels,) in conn.execute(query):
                demand.update(labels)
        return demand

    def overdue_requests(self, now: float) -> list[RequestRow]:
        query = select(requests).where(
            requests.c.state == RequestState.PENDING, requests.c.deadline < now
        )
        with self._read() as conn:
            return [RequestRow(**row._mapping) for row in conn.execute(query)]

    def finish_request(self, request_id: int, to: RequestState, reason: str) -> RequestRow:
        states.check_request(RequestState.PENDING, to)
        now = time.time()
        with self._write() as conn:
            changed = conn.execute(
                update(requests)
                .where(requests.c.id == request_id, requests.c.state == RequestState.PENDING)
                .values(state=to, reason=reason, state_at=now)
            ).rowcount
            if changed != 1:
                raise StaleState(f"request {request_id} is no longer pending")
            return _request(conn, request_id)

    def fulfil(self, request_id: int, providers: Sequence[str]) -> list[NodeRow] | None:
        """Hand a pending request one ready node per label, all from one provider, atomically.

        Returns the nodes, or None when no provider has them all ready now. This is the
        only way a node leaves `ready` for a job, and it is one transaction.
        """
        now = time.time()
        with self._write() as conn:
            request = _request(conn, request_id)
            if request.state != RequestState.PENDING:
                raise StaleState(f"request {request_id} is {request.state}, not pending")
            for provider in providers:
                picked = _pick_ready(conn, provider, request.labels)
                if picked is None:
                    continue
                claimed = []
                for node_id in picked:
                    claimed.append(
                        _transition(
                            conn,
                            node_id,
                            NodeState.READY,
                            NodeState.IN_USE,
                            f"handed to request {request_id}",
                            {"request_id": request_id},
                        )
                    )
                conn.execute(
                    update(requests)
                    .where(requests.c.id == request_id)
                    .values(
                        state=RequestState.FULFILLED,
                        state_at=now,
                        reason=f"nodes {', '.join(str(n.id) for n in claimed)}",
                    )
                )
                return claimed
            return None

    # --------------------------------------------------------- image builds

    def new_build(self, build_id: str, image: str, path: str) -> BuildRow:
        now = time.time()
        with self._write() as conn:
            conn.execute(
                insert(image_builds).values(
                    id=build_id,
                    image=image,
                    state=BuildState.BUILDING,
                    path=path,
                    created_at=now,
                    state_at=now,
                )
            )
            return _build(conn, build_id)

    def build_transition(
        self,
        build_id: str,
        expect: BuildState,
        to: BuildState,
        reason: str = "",
        manifest: dict[str, Any] | None = None,
    ) -> BuildRow:
        states.check_build(expect, to)
        values: dict[str, Any] = {"state": to, "reason": reason, "state_at": time.time()}
        if manifest is not None:
            values["manifest"] = manifest
        with self._write() as conn:
            changed = conn.execute(
                update(image_builds)
                .where(image_builds.c.id == build_id, image_builds.c.state == expect)
                .values(**values)
            ).rowcount
            if changed != 1:
                raise StaleState(f"image build {build_id} is not {expect}")
            return _build(conn, build_id)

    def builds(self, image: str | None = None) -> list[BuildRow]:
        query = select(image_builds).order_by(image_builds.c.created_at.desc())
        if image is not None:
            query = query.where(image_builds.c.image == image)
        with self._read() as conn:
            return [BuildRow(**row._mapping) for row in conn.execute(query)]

    def serving_build(self, image: str) -> BuildRow | None:
        """The newest ready build of an image: the one new nodes launch from."""
        query = (
            select(image_builds)
            .where(image_builds.c.image == image, image_builds.c.state == BuildState.READY)
            .order_by(image_builds.c.created_at.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        return BuildRow(**row._mapping) if row else None


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
    changed = conn.execute(
        update(nodes)
        .where(nodes.c.id == node_id, nodes.c.state == expect)
        .values(state=to, state_at=now, reason=reason, **values)
    ).rowcount
    if changed != 1:
        current = conn.scalar(select(nodes.c.state).where(nodes.c.id == node_id))
        raise StaleState(f"node {node_id} is {current or 'gone'}, not {expect}")
    _event(conn, node_id, expect, to, reason, now)
    return _node(conn, node_id)


def _pick_ready(conn: Connection, provider: str, labels: Sequence[str]) -> list[int] | None:
    """Distinct ready nodes of one provider, one per wanted label, oldest ready first."""
    wanted = Counter(labels)
    picked: list[int] = []
    for label, count in wanted.items():
        query = (
            select(nodes.c.id)
            .where(
                nodes.c.provider == provider,
                nodes.c.label == label,
                nodes.c.state == NodeState.READY,
            )
            .order_by(nodes.c.ready_at, nodes.c.id)
            .limit(count)
            # PostgreSQL: concurrent claimers skip rows another transaction holds.
            # SQLite ignores it; BEGIN IMMEDIATE already serialises writers there.
            .with_for_update(skip_locked=True)
        )
        ids = list(conn.scalars(query))
        if len(ids) < count:
            return None
        picked.extend(ids)
    return picked


def _node(conn: Connection, node_id: int) -> NodeRow:
    return NodeRow(**conn.execute(select(nodes).where(nodes.c.id == node_id)).one()._mapping)


def _request(conn: Connection, request_id: int) -> RequestRow:
    row = conn.execute(select(requests).where(requests.c.id == request_id)).first()
    if row is None:
        raise NotFound(f"no request {request_id}")
    return RequestRow(**row._mapping)


def _build(conn: Connection, build_id: str) -> BuildRow:
    return BuildRow(
        **conn.execute(select(image_builds).where(image_builds.c.id == build_id)).one()._mapping
    )
