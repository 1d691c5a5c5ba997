"""Reading the store's history incrementally: node events and requests after a cursor."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Select, func, select

from freshpool.core.states import RequestState
from freshpool.store.base import StoreBase
from freshpool.store.schema import node_events, nodes, requests


@dataclass(frozen=True)
class HistoryEvent:
    id: int
    node_id: int
    at: float
    from_state: str | None
    to_state: str | None
    reason: str
    # What the node was at the event; None only for events older than schema 0005 whose
    # node's row is gone.
    label: str | None
    provider: str | None
    tenant: str | None = None


@dataclass(frozen=True)
class RequestOutcome:
    """What the metrics need of a request."""

    id: int
    tenant: str
    state: str
    created_at: float
    fulfilled_at: float | None
    state_at: float


_OUTCOME = [f.name for f in fields(RequestOutcome)]
# SQLite allows 32,766 parameters per statement; stay well inside.
_IDS_PER_QUERY = 1000


def _events() -> Select[Any]:
    """Node events as HistoryEvents: what the node was, from the event or (events older
    than schema 0005) from its row while it has one."""
    return select(
        node_events.c.id,
        node_events.c.node_id,
        node_events.c.at,
        node_events.c.from_state,
        node_events.c.to_state,
        node_events.c.reason,
        func.coalesce(node_events.c.label, nodes.c.label),
        func.coalesce(node_events.c.provider, nodes.c.provider),
        func.coalesce(node_events.c.tenant, nodes.c.tenant),
    ).select_from(node_events.outerjoin(nodes, nodes.c.id == node_events.c.node_id))


class HistoryQueries(StoreBase):
    def events_after(self, cursor: int, limit: int = 10_000) -> list[HistoryEvent]:
        """Node events with id > cursor, oldest first, with the node's label and provider."""
        query = _events().where(node_events.c.id > cursor).order_by(node_events.c.id).limit(limit)
        with self._read() as conn:
            return [HistoryEvent(*row) for row in conn.execute(query)]

    def events_during(self, since: float, until: float) -> list[HistoryEvent]:
        """What accounting needs of [since, until): each node's events in it, after the
        last event before `since` of every node that existed then. By node, in order."""
        before = (
            select(func.max(node_events.c.id))
            .where(node_events.c.at < since)
            .group_by(node_events.c.node_id)
        )
        alive = _events().where(node_events.c.id.in_(before), node_events.c.to_state.is_not(None))
        during = _events().where(node_events.c.at >= since, node_events.c.at < until)
        with self._read() as conn:
            rows = [HistoryEvent(*row) for q in (alive, during) for row in conn.execute(q)]
        return sorted(rows, key=lambda e: (e.node_id, e.at, e.id))

    def last_event_before(self, at: float) -> int:
        """A cursor from which events_after returns the events at or after `at`."""
        with self._read() as conn:
            first = conn.scalar(select(func.min(node_events.c.id)).where(node_events.c.at >= at))
            if first is not None:
                return int(first) - 1
            return int(conn.scalar(select(func.max(node_events.c.id))) or 0)

    def request_outcomes(
        self, first_id: int, open_ids: Collection[int] = ()
    ) -> list[RequestOutcome]:
        """Requests with id >= first_id, and those of `open_ids` no longer pending.

        Both are primary-key lookups, so the cost follows what is new or still open,
        not the table's length nor how long one request has waited.
        """
        columns = [requests.c[name] for name in _OUTCOME]
        queries = [select(*columns).where(requests.c.id >= first_id)]
        ids = sorted(open_ids)
        for at in range(0, len(ids), _IDS_PER_QUERY):
            queries.append(
                select(*columns).where(
                    requests.c.id.in_(ids[at : at + _IDS_PER_QUERY]),
                    requests.c.state != RequestState.PENDING,
                )
            )
        with self._read() as conn:
            rows = [RequestOutcome(*row) for query in queries for row in conn.execute(query)]
        return sorted(rows, key=lambda r: r.id)

    def last_request_id(self) -> int:
        with self._read() as conn:
            return int(conn.scalar(select(func.max(requests.c.id))) or 0)
