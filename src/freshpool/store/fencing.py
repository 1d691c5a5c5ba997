"""The fence: a launcher's writes for a provider succeed only while it holds the
provider's lease at the generation it took, checked in the write's own transaction.

A launcher that stalled past its lease (a long pause, a partition) and wakes up to
find another launcher has taken over cannot change that provider's rows any more:
the check fails, the transaction rolls back, and the caller gets LeaseLost.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping

from sqlalchemy import Connection, select

from freshpool.core.errors import LeaseLost
from freshpool.store.schema import nodes, provider_leases

# What a fenced write held: provider -> (launcher, generation); its events record it.
Fence = Mapping[str, tuple[str, int]]


class Fencing:
    """The leases one launcher holds: provider -> the generation it took."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def hold(self, provider: str, generation: int) -> None:
        with self._lock:
            self._held[provider] = generation

    def drop(self, provider: str) -> None:
        with self._lock:
            self._held.pop(provider, None)

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def check(self, conn: Connection, providers: Collection[str]) -> Fence:
        """Raise LeaseLost unless every one of `providers` is still ours at our
        generation; what we hold them at. The lease rows are share-locked until the
        transaction ends, so no takeover can commit between this check and the
        caller's write."""
        wanted = sorted(set(providers))
        if not wanted:
            return {}
        held = self.held()
        query = (
            select(
                provider_leases.c.provider, provider_leases.c.owner, provider_leases.c.generation
            )
            .where(provider_leases.c.provider.in_(wanted))
            .order_by(provider_leases.c.provider)
            .with_for_update(read=True)
        )
        found = {p: (owner, gen) for p, owner, gen in conn.execute(query)}
        for provider in wanted:
            if provider not in held:
                raise LeaseLost(f"launcher {self.owner} holds no lease on provider {provider!r}")
            if found.get(provider) != (self.owner, held[provider]):
                owner, generation = found.get(provider, ("nobody", 0))
                raise LeaseLost(
                    f"provider {provider!r}: lease generation {held[provider]} of launcher"
                    f" {self.owner} was superseded (now {owner}, generation {generation})"
                )
        return {provider: (self.owner, held[provider]) for provider in wanted}

    def check_nodes(self, conn: Connection, node_ids: Collection[int]) -> Fence:
        """`check` for the providers of these nodes (a node's provider never changes)."""
        if not node_ids:
            return {}
        query = select(nodes.c.provider).where(nodes.c.id.in_(sorted(set(node_ids)))).distinct()
        return self.check(conn, [p for (p,) in conn.execute(query)])
