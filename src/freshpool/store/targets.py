"""What the warm-pool sizing reads and writes: requests' arrival times by label, recent
launch times, and the history of each `min-ready: auto` label's target."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, insert, select

from freshpool.store.base import StoreBase
from freshpool.store.schema import label_targets, nodes, requests


@dataclass(frozen=True)
class Arrival:
    """A request's id, when it came, and the labels of its node set (one per node)."""

    id: int
    at: float
    labels: list[str]


@dataclass(frozen=True)
class TargetRow:
    id: int
    label: str
    at: float
    target: int
    previous: int | None
    rate: float
    launch_time: float
    why: str


class TargetQueries(StoreBase):
    def arrivals(self, after_id: int, since: float, limit: int = 50_000) -> list[Arrival]:
        """Requests with id > after_id created at or after `since`, oldest id first,
        whatever became of them: a request that failed or was cancelled was demand too."""
        query = (
            select(requests.c.id, requests.c.created_at, requests.c.labels)
            .where(requests.c.id > after_id, requests.c.created_at >= since)
            .order_by(requests.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [
                Arrival(int(i), float(at), list(labels)) for i, at, labels in conn.execute(query)
            ]

    def first_request_at(self) -> float | None:
        with self._read() as conn:
            found = conn.scalar(select(func.min(requests.c.created_at)))
        return float(found) if found is not None else None

    def launch_times(self, label: str, limit: int = 50) -> list[float]:
        """Seconds from row to ready of the label's newest nodes that reached ready
        (rows of deleted nodes are gone; the newest live ones are what matters)."""
        query = (
            select(nodes.c.ready_at - nodes.c.created_at)
            .where(nodes.c.label == label, nodes.c.ready_at.is_not(None))
            .order_by(nodes.c.id.desc())
            .limit(limit)
        )
        with self._read() as conn:
            return [float(s) for (s,) in conn.execute(query)]

    def record_target(
        self, label: str, at: float, target: int, previous: int | None, rate: float,
        launch_time: float, why: str,
    ) -> None:  # fmt: skip
        row = {
            "label": label, "at": at, "target": target, "previous": previous,
            "rate": rate, "launch_time": launch_time, "why": why,
        }  # fmt: skip
        with self._write() as conn:
            conn.execute(insert(label_targets).values(**row))

    def target_history(self, label: str | None = None, limit: int = 100) -> list[TargetRow]:
        """The newest target changes first, of one label or all."""
        query = select(label_targets).order_by(label_targets.c.id.desc()).limit(limit)
        if label is not None:
            query = query.where(label_targets.c.label == label)
        with self._read() as conn:
            return [TargetRow(**row._mapping) for row in conn.execute(query)]

    def latest_targets(self) -> dict[str, TargetRow]:
        """Each label's current target: its newest row."""
        newest = (
            select(func.max(label_targets.c.id)).group_by(label_targets.c.label).scalar_subquery()
        )
        query = select(label_targets).where(label_targets.c.id.in_(newest))
        with self._read() as conn:
            return {row.label: TargetRow(**row._mapping) for row in conn.execute(query)}
