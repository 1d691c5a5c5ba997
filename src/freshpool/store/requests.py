"""Request rows, and the hand-out: one transaction moves ready nodes to a request."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import Connection, and_, or_, select

from freshpool.core import states
from freshpool.core.states import RequestState
from freshpool.store.base import NotFound, StaleState, StoreBase, compare_and_set
from freshpool.store.schema import requests


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


class RequestQueries(StoreBase):
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

    def overdue_requests(self, now: float, max_wait: float | None = None) -> list[RequestRow]:
        """Pending requests past their deadline, or waiting longer than `max_wait`."""
        late = requests.c.deadline < now
        if max_wait is not None:
            late = or_(
                late, and_(requests.c.deadline.is_(None), requests.c.created_at < now - max_wait)
            )
        query = select(requests).where(requests.c.state == RequestState.PENDING, late)
        with self._read() as conn:
            return [RequestRow(**row._mapping) for row in conn.execute(query)]

    def finish_request(self, request_id: int, to: RequestState, reason: str) -> RequestRow:
        states.check_request(RequestState.PENDING, to)
        now = time.time()
        with self._write() as conn:
            values = {"state": to, "reason": reason, "state_at": now}
            if not compare_and_set(conn, requests, request_id, RequestState.PENDING, values):
                raise StaleState(f"request {request_id} is no longer pending")
            return _request(conn, request_id)


def _request(conn: Connection, request_id: int) -> RequestRow:
    row = conn.execute(select(requests).where(requests.c.id == request_id)).first()
    if row is None:
        raise NotFound(f"no request {request_id}")
    return RequestRow(**row._mapping)
