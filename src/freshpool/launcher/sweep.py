"""Leak detection: compare what providers list (by our tags) with what the store knows.

An instance the store does not know, seen on two sweeps in a row, is a leak and is
deleted. A node the store believes alive whose instance is missing on two sweeps
has vanished and is failed so it gets replaced. A deleting node whose instance is
no longer listed is gone (a delete that errored may still have worked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from freshpool.core.states import NodeState
from freshpool.drivers.base import Instance
from freshpool.store import NodeRow

N = NodeState
# States in which a node's instance must exist.
EXPECT_INSTANCE = frozenset({N.TESTING, N.READY, N.IN_USE, N.HOLD})


@dataclass
class SweepResult:
    leaked: list[Instance] = field(default_factory=list)
    vanished: list[NodeRow] = field(default_factory=list)
    gone: list[NodeRow] = field(default_factory=list)


@dataclass
class LeakSweeper:
    """Remembers the previous sweep per provider, so one odd listing never deletes."""

    _unknown: dict[str, set[str]] = field(default_factory=dict)
    _missing: dict[str, set[int]] = field(default_factory=dict)

    def sweep(
        self, provider: str, instances: list[Instance], rows: list[NodeRow], busy: set[int]
    ) -> SweepResult:
        """`busy` are node ids with an operation in flight; they are left alone."""
        listed = {i.tags.node_id: i for i in instances if i.tags is not None}
        known = {row.id for row in rows}
        result = SweepResult()
        unknown_now = {
            i.external_id for i in instances if i.tags is None or i.tags.node_id not in known
        }
        before = self._unknown.get(provider, set())
        result.leaked = [i for i in instances if i.external_id in unknown_now & before]
        self._unknown[provider] = unknown_now - {i.external_id for i in result.leaked}

        missing_now: set[int] = set()
        for row in rows:
            if row.id in busy:
                continue
            alive = row.id in listed and listed[row.id].alive
            if row.state in EXPECT_INSTANCE and not alive:
                missing_now.add(row.id)
            elif row.state == N.DELETING and row.id not in listed:
                result.gone.append(row)
        before_missing = self._missing.get(provider, set())
        result.vanished = [row for row in rows if row.id in missing_now & before_missing]
        self._missing[provider] = missing_now - {row.id for row in result.vanished}
        return result
