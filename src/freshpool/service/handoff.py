"""Handing nodes to jobs: acquire (one transaction per attempt), release, hold, delete."""

from __future__ import annotations

import getpass
import os
import socket
import time

from freshpool import crashpoints
from freshpool.config import Config
from freshpool.core.states import NodeState, RequestState
from freshpool.store import NewRequest, NodeRow, StaleState, Store, first_fit_for


class AcquireTimeout(Exception):
    pass


class NothingToServe(Exception):
    """A label's image has no ready build, so no node of it can ever become ready."""


def requestor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"


def acquire(
    config: Config, store: Store, labels: list[str], timeout: float, who: str | None = None
) -> list[NodeRow]:
    """Wait up to `timeout` seconds for one ready node per label, all from one provider."""
    for name in labels:
        label = config.label(name)  # raises UnknownName with the known labels
        if store.serving_build(label.image) is None:
            raise NothingToServe(
                f"label {name!r} uses image {label.image!r}, which has no ready build;"
                f" run `freshpool image build {label.image}` (or start `freshpool serve`,"
                " which builds missing images)"
            )
    providers = [p.name for p in config.providers if all(p.serves(name) for name in labels)]
    deadline = time.time() + timeout
    new = NewRequest(tuple(labels), requestor=who or requestor(), deadline=deadline)
    watcher = store.change_watcher()
    try:
        # Queue the request and, when the pool has the set, claim it: one transaction.
        done = store.hand_out([new], first_fit_for(providers), providers)
        request_id = done.created[0].id
        got: list[NodeRow] | None = done.nodes_of(request_id) or None
        while got is None:
            if time.time() >= deadline:
                try:
                    store.finish_request(
                        request_id, RequestState.FAILED, f"no ready node within {timeout:g} s"
                    )
                except StaleState:
                    pass  # settled meanwhile (by `serve`'s scheduler?): look once more
                else:
                    raise AcquireTimeout(_why_not(store, request_id, labels, timeout))
            else:
                # Wait for another process to commit something (a node turning ready),
                # checking a cheap change counter instead of re-running the claim.
                wake = min(deadline, time.time() + 0.5)
                while time.time() < wake and not watcher.changed():
                    time.sleep(0.01)
            try:
                got = store.fulfil(request_id, providers)
            except StaleState:
                got = _settled_elsewhere(store, request_id, labels, timeout)
        crashpoints.point("handoff")
        return got
    finally:
        watcher.close()


def _settled_elsewhere(
    store: Store, request_id: int, labels: list[str], timeout: float
) -> list[NodeRow]:
    """Our request left pending without us: `serve`'s scheduler may have served it."""
    if store.request(request_id).state == RequestState.FULFILLED:
        return store.request_nodes([request_id])[request_id]
    raise AcquireTimeout(_why_not(store, request_id, labels, timeout))


def _why_not(store: Store, request_id: int, labels: list[str], timeout: float) -> str:
    reason = store.request(request_id).reason
    return (
        f"no ready {', '.join(labels)} node within {timeout:g} s"
        f"{f' ({reason})' if reason else ''}; the pool may be exhausted or still filling"
        " (see `freshpool list`)"
    )


def release(store: Store, node_id: int, why: str = "released") -> NodeRow:
    """The job is done with the node: it is used, and will be deleted, never reused."""
    return store.move(node_id, NodeState.USED, why)


def hold(store: Store, node_id: int, why: str = "held") -> NodeRow:
    return store.move(node_id, NodeState.HOLD, why)


def delete(store: Store, node_id: int, why: str = "deleted by operator") -> NodeRow:
    return store.move(node_id, NodeState.DELETING, why)
