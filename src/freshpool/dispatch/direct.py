"""Taking a node set straight on the store, for a CLI on the pool's host.

With `freshpool serve` running, the request only joins the queue: serve's scheduler
serves it in its turn (priority and fair share hold for everyone), and this waits
for the store to say so. With no `serve`, nobody else hands out, so each look here
runs a pass with the same planner the scheduler uses, over the whole queue.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import time
from collections.abc import Sequence

from freshpool import crashpoints, launcherlock
from freshpool.config import Config
from freshpool.core.errors import AcquireTimeout, BadInput, NothingToServe, StaleState
from freshpool.core.nodesets import check
from freshpool.core.placement import Clocks
from freshpool.core.sshkeys import check_public_key
from freshpool.core.states import InvalidTransition, RequestState
from freshpool.dispatch.scheduler import Planning
from freshpool.store import HandOut, NewRequest, NodeRow, RequestRow, Store, queue_only

# Between two looks at the request, at most (a change in the store ends the wait).
LOOK_EVERY = 0.5


def requestor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"


def acquire(
    config: Config,
    store: Store,
    labels: Sequence[str],
    timeout: float,
    who: str | None = None,
    priority: int = 0,
    ssh_keys: Sequence[str] = (),
    tenant: str = "",
) -> list[NodeRow]:
    """Wait up to `timeout` seconds for one ready node per label, all from one provider;
    `ssh_keys` may log in to them (checked here: a bad one is BadInput)."""
    _check(config, store, labels, tenant)
    try:
        keys = tuple(check_public_key(k) for k in ssh_keys)
    except ValueError as exc:
        raise BadInput(f"ssh key: {exc}") from None
    deadline = time.time() + timeout
    new = NewRequest(
        tuple(labels),
        who or requestor(),
        tenant=tenant,
        priority=priority,
        deadline=deadline,
        ssh_keys=keys,
    )
    planning = Planning(config)
    watcher = store.change_watcher()
    try:
        done = _pass(config, store, planning, [new])
        request = done.created[0]
        got = done.nodes_of(request.id)
        try:
            while not got:
                if time.time() >= deadline:
                    _give_up(store, request, timeout)
                else:
                    # Wait for another process to commit something (a node turning
                    # ready), checking a cheap change counter, not re-running the pass.
                    wake = min(deadline, time.time() + LOOK_EVERY)
                    while time.time() < wake and not watcher.changed():
                        time.sleep(0.01)
                got = _look(config, store, planning, request.id, labels, timeout)
        except BaseException:
            # Nobody will take what this request is handed later (Ctrl-C, a failed
            # look): cancel it, so no node goes to a job that is not there.
            _abandon(store, request.id)
            raise
        crashpoints.point("handoff")
        return got
    finally:
        watcher.close()


def _abandon(store: Store, request_id: int) -> None:
    with contextlib.suppress(StaleState, InvalidTransition):
        store.cancel_request(request_id, "the client stopped waiting")


def _check(config: Config, store: Store, labels: Sequence[str], tenant: str) -> None:
    known = [x.name for x in config.labels]
    problems = check(labels, known, config.providers, config.tenant_quota(tenant))
    if problems:
        raise BadInput("; ".join(p.message for p in problems))
    for name in set(labels):
        label = config.label(name)
        if store.serving_build(label.image) is None:
            raise NothingToServe(
                f"label {name!r} uses image {label.image!r}, which has no ready build;"
                f" run `freshpool image build {label.image}` (or start `freshpool serve`,"
                " which builds missing images)"
            )


def _pass(config: Config, store: Store, planning: Planning, new: list[NewRequest]) -> HandOut:
    if launcherlock.serve_runs(config.state_dir):
        return store.hand_out(new, queue_only, [])
    done = store.hand_out(new, planning.planner(Clocks()), planning.providers)
    return planning.hand_over(store, done) if planning.to_hand_over(done) else done


def _look(
    config: Config,
    store: Store,
    planning: Planning,
    request_id: int,
    labels: Sequence[str],
    timeout: float,
) -> list[NodeRow]:
    """Our nodes if the request is fulfilled now (by a pass here or elsewhere)."""
    request = store.request(request_id)
    if request.state == RequestState.PENDING:
        done = _pass(config, store, planning, [])
        if request_id in done.fulfilled:
            return done.nodes_of(request_id)
        request = store.request(request_id)
    if request.state == RequestState.FULFILLED:
        return store.request_nodes([request_id])[request_id]
    if request.state != RequestState.PENDING:
        raise AcquireTimeout(_why_not(request, labels, timeout))
    return []


def _give_up(store: Store, request: RequestRow, timeout: float) -> None:
    try:
        failed = store.finish_request(
            request.id, RequestState.FAILED, f"no ready node within {timeout:g} s"
        )
    except StaleState:
        return  # settled meanwhile (served by `serve`?): the next look tells
    raise AcquireTimeout(_why_not(failed, failed.labels, timeout))


def _why_not(request: RequestRow, labels: Sequence[str], timeout: float) -> str:
    reason = f" ({request.reason})" if request.reason else ""
    return (
        f"no ready {', '.join(labels)} node within {timeout:g} s{reason};"
        " the pool may be exhausted or still filling (see `freshpool list`)"
    )
