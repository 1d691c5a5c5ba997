"""Handing nodes to jobs: acquire (one transaction per attempt), release, hold, delete."""

from __future__ import annotations

import getpass
import os
import socket
import time

from freshpool import crashpoints
from freshpool.config import Config
from freshpool.states import NodeState, RequestState
from freshpool.store import NodeRow, StaleState, Store


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
    request = store.new_request(labels, requestor=who or requestor(), deadline=deadline)
    watcher = store.change_watcher()
    try:
        while True:
            try:
                got = store.fulfil(request.id, providers)
            except StaleState:
                raise AcquireTimeout(_why_not(store, request.id, labels, timeout)) from None
            if got is not None:
                crashpoints.point("handoff")
                return got
            if time.time() >= deadline:
                try:
                    store.finish_request(
                        request.id, RequestState.FAILED, f"no ready node within {timeout:g} s"
                    )
                except StaleState:
                    continue  # fulfilled or failed meanwhile: look once more
                raise AcquireTimeout(_why_not(store, request.id, labels, timeout))
            # Wait for another process to commit something (a node turning ready),
            # checking a cheap change counter instead of re-running the claim.
            wake = min(deadline, time.time() + 0.5)
            while time.time() < wake and not watcher.changed():
                time.sleep(0.01)
    finally:
        watcher.close()


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
