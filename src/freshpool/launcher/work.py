"""The driver operations this launcher is advancing: at most one per node, in one table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from freshpool.drivers.base import DoneOperation, Operation


class Kind(StrEnum):
    CREATE = "create"  # building: the instance is being made
    TEST = "test"  # testing: the ready command runs
    CHECK = "check"  # ready: a health check runs
    DELETE = "delete"  # deleting: the instance is being removed


@dataclass
class Work:
    node_id: int
    provider: str
    label: str
    kind: Kind
    op: Operation[Any]
    # Monotonic time after which the operation is given up on (deletes only).
    give_up_at: float | None = None


class WorkTable:
    def __init__(self) -> None:
        self._by_node: dict[int, Work] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_node

    def __iter__(self) -> Iterator[Work]:
        return iter(list(self._by_node.values()))

    def __len__(self) -> int:
        return len(self._by_node)

    def add(self, work: Work) -> None:
        self._by_node[work.node_id] = work

    def pop(self, node_id: int) -> Work | None:
        return self._by_node.pop(node_id, None)

    def of(self, kind: Kind) -> list[Work]:
        return [w for w in self._by_node.values() if w.kind == kind]

    def busy(self) -> set[int]:
        """Nodes whose state an operation here is about to change (health checks aside)."""
        return {i for i, w in self._by_node.items() if w.kind != Kind.CHECK}

    def launches_on(self, provider: str) -> int:
        return sum(
            1
            for w in self._by_node.values()
            if w.provider == provider and w.kind in (Kind.CREATE, Kind.TEST)
        )

    def not_before(self) -> float:
        """When advancing any operation next makes sense (monotonic; inf if none)."""
        return min((w.op.not_before for w in self._by_node.values()), default=float("inf"))

    def advance(self) -> list[Work]:
        """Advance every operation that is due; take out and return those that finished."""
        now = time.monotonic()
        finished = []
        for work in list(self._by_node.values()):
            if now >= work.op.not_before:
                work.op.advance()
            if not work.op.done and work.give_up_at is not None and now > work.give_up_at:
                work.op = DoneOperation(
                    error=TimeoutError(f"the {work.kind} did not finish in time")
                )
            if work.op.done:
                del self._by_node[work.node_id]
                finished.append(work)
        return finished
