"""Reading the store's history incrementally: node events and requests after a cursor."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from freshpool.store.base import StoreBase
from freshpool.store.requests import RequestRow
from freshpool.store.schema import node_events, nodes, requests


@dataclass(frozen=True)
class HistoryEvent:
    id: int
    node_id: int
    at: float
    from_state: str | None
    to_state: str | None
    reason: str
    # None once the node's row is gone (its label is then known from earlier events).
    label: str | None
    provider: str | None


class HistoryQueries(StoreBase):
    def events_after(self, cursor: int, limit: int = 10_000) -> list[HistoryEvent]:
        """Node events with id > cursor, oldest first, with the node's label and provider."""
        query = (
            select(
                node_events.c.id,
                node_events.c.node_id,
                node_events.c.at,
                node_events.c.from_state,
                node_events.c.to_state,
                node_events.c.reason,
                nodes.c.label,
                nodes.c.provider,
            )
            .select_from(node_events.outerjoin(nodes, nodes.c.id == node_events.c.node_id))
            .where(node_events.c.id > cursor)
            .order_by(node_events.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [HistoryEvent(**row._mapping) for row in conn.execute(query)]

    def last_event_before(self, at: float) -> int:
        """A cursor from which events_after returns the events at or after `at`."""
        with self._read() as conn:
            first = conn.scalar(select(func.min(node_events.c.id)).where(node_events.c.at >= at))
            if first is not None:
                return int(first) - 1
            return int(conn.scalar(select(func.max(node_events.c.id))) or 0)

    def requests_from(self, first_id: int) -> list[RequestRow]:
        """Requests with id >= first_id (a primary-key range: cheap however long the table)."""
        query = select(requests).where(requests.c.id >= first_id).order_by(requests.c.id)
        with self._read() as conn:
            return [RequestRow(**row._mapping) for row in conn.execute(query)]

    def last_request_id(self) -> int:
        with self._read() as conn:
            return int(conn.scalar(select(func.max(requests.c.id))) or 0)
