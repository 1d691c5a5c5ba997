"""Node-set requests as clients make them: checked against the config, queued, cancelled.

The scheduler fulfils queued requests; this module only records them and undoes them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from freshpool.config import Config
from freshpool.store import NewRequest, NodeRow, RequestRow, Store


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request, and where (a key path like ("labels", 2))."""

    where: tuple[str | int, ...]
    message: str


def check(config: Config, labels: Sequence[str]) -> list[Problem]:
    """Everything that would keep a node set from ever being fulfilled, each with its place."""
    known = {x.name for x in config.labels}
    problems = [
        Problem(
            ("labels", i),
            f"unknown label {name!r} (known: {', '.join(sorted(known)) or 'none'})",
        )
        for i, name in enumerate(labels)
        if name not in known
    ]
    if problems:
        return problems
    wanted = Counter(labels)
    serving = [p for p in config.providers if all(p.serves(x) for x in wanted)]
    if not serving:
        return [
            Problem(
                ("labels",),
                f"no provider serves all of {', '.join(sorted(wanted))};"
                " a node set comes from one provider",
            )
        ]
    if all(len(labels) > p.max_nodes for p in serving):
        biggest = max(p.max_nodes for p in serving)
        return [
            Problem(
                ("labels",),
                f"{len(labels)} nodes asked for; no provider that serves them has room for"
                f" more than {biggest}",
            )
        ]
    return []


def new_request(
    config: Config,
    labels: Sequence[str],
    *,
    requestor: str,
    tenant: str,
    priority: int = 0,
    timeout: float | None = None,
) -> NewRequest:
    """A request to submit; the caller has run check(). Without a timeout the config's applies."""
    seconds = timeout if timeout is not None else config.request_timeout
    return NewRequest(
        tuple(labels),
        requestor=requestor,
        tenant=tenant,
        priority=priority,
        deadline=time.time() + seconds,
    )


def cancel(store: Store, request_id: int, who: str = "") -> tuple[RequestRow, list[NodeRow]]:
    """Cancel a request; nodes it already holds are deleted, never returned to ready."""
    why = f"request {request_id} cancelled" + (f" by {who}" if who else "")
    return store.cancel_request(request_id, why)


def release(store: Store, node_id: int, why: str = "released") -> list[NodeRow]:
    """The job ended: the node and the rest of its request's set become used together."""
    return store.release_set(node_id, why)
