"""The request scheduler: every hand-out of the API process, one pass at a time.

A pass is one `store.hand_out`: the requests submitted since the last pass are
queued and every pending request that can be served is handed its set, in fair-share
order (core/placement.py), all in one transaction. Many clients asking at once share
a transaction instead of each waiting for the write lock in turn (group commit).

There is one way a pass runs: `run()`, a task on the API's event loop, takes the
inbox and passes, then waits to be poked again. Handlers submit on the same loop, so
all the handlers that are ready in one turn of the loop join one pass. On SQLite the
pass runs right there on the loop, but never waits for the write lock: if another
writer holds it, the requests go back to the inbox and the pass is tried again
after the one backoff's short wait (a pass that waited would stall every call the
loop serves). On a server database each statement is a round trip, so the pass runs
on one worker thread and the loop serves other calls meanwhile.

Before the launcher's first pass (`started`), requests are queued but not served:
the launcher has not yet reconciled the providers with the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from freshpool.config import Config
from freshpool.core.backoff import Backoff
from freshpool.core.errors import StaleState, WriteBusy
from freshpool.core.nodesets import providers_serving
from freshpool.core.placement import Clocks, FairShare, Placement, place
from freshpool.dispatch.waiters import Waiters
from freshpool.drivers.local.network import set_joiners
from freshpool.drivers.ssh import SshAccess, authorize_keys
from freshpool.store import (
    HandOut,
    NewRequest,
    NodeRow,
    Planner,
    Queue,
    RequestRow,
    Store,
    queue_only,
)

log = logging.getLogger("freshpool.scheduler")

# A request as the store has it after a pass, and the nodes handed to it (if any).
Outcome = tuple[RequestRow, list[NodeRow]]
# Waits for another writer to let go of SQLite's write lock: short, as its
# transactions are.
BUSY = Backoff(base=0.0005, cap=0.02)


class Planning:
    """What every pass needs to plan: the tenants' weights and who serves which set."""

    def __init__(self, config: Config) -> None:
        self.fair = FairShare({t.name: t.weight for t in config.tenants})
        self.quotas = config.tenant_quotas
        self.providers = [p.name for p in config.providers]
        self._config = config
        self._joiners = set_joiners(config.providers)

    @functools.cache  # noqa: B019 - one Planning per config, which lives as long as it
    def providers_for(self, labels: tuple[str, ...]) -> list[str]:
        """Providers that serve every label of a set (a set comes from one provider)."""
        return [p.name for p in providers_serving(self._config.providers, labels)]

    def order(self, pending: Sequence[RequestRow], clocks: Clocks) -> list[RequestRow]:
        return self.fair.order(pending, clocks)

    def planner(self, clocks: Clocks) -> Planned:
        return Planned(self, clocks)

    @staticmethod
    def to_hand_over(done: HandOut) -> bool:
        """Whether some set just handed out needs work before its answer goes out."""
        return any(r.ssh_keys or len(n) > 1 for r, n in done.fulfilled.values())

    def hand_over(self, store: Store, done: HandOut) -> HandOut:
        """Make each set just handed out ready for its job, before the answer goes out.

        Its nodes reach each other (and no other node: the network policy's default);
        a failure there is logged, and the launcher's leak sweep puts the rules right.
        The job's SSH keys go on every node; a set that cannot take them is cancelled
        (its nodes deleted) rather than handed over without them. Returns `done` as
        the job sees it.
        """
        failed: dict[int, str] = {}
        for request, nodes in done.fulfilled.values():
            join = self._joiners.get(nodes[0].provider) if len(nodes) > 1 else None
            if join is not None:
                try:
                    join(store.cluster_id, [n.access["host"] for n in nodes if n.access])
                except Exception:
                    log.exception("request %s: letting its nodes reach each other failed",
                                  request.id)  # fmt: skip
            if request.ssh_keys:
                why = _authorize(request.ssh_keys, nodes)
                if why:
                    failed[request.id] = why
        if not failed:
            return done
        for request_id, why in failed.items():
            log.warning("request %s: %s", request_id, why)
            with contextlib.suppress(StaleState):
                store.cancel_request(request_id, why)
        return HandOut(
            [store.request(r.id) if r.id in failed else r for r in done.created],
            {rid: got for rid, got in done.fulfilled.items() if rid not in failed},
            done.pending,
        )


@dataclass
class Planned:
    """A planner for one pass; afterwards it tells whether any request waits for nodes."""

    planning: Planning
    clocks: Clocks
    blocked: bool = field(default=False, init=False)

    def __call__(self, queue: Queue) -> list[Placement]:
        ordered = self.planning.order(queue.pending, self.clocks)
        quotas = self.planning.quotas
        capped = {r.tenant for r in queue.pending if r.tenant in quotas}
        held = queue.held_by(capped) if capped else {}
        room = {t: quotas[t] - held.get(t, 0) for t in capped}
        plan = place(ordered, queue.ready, self.planning.providers_for, room)
        self.blocked = plan.blocked
        return plan.placements


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: Store,
        waiters: Waiters | None = None,
        short: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.waiters = waiters or Waiters()
        # Called when requests wait for nodes that are not ready (the launcher's wake).
        self.short = short
        self.planning = Planning(config)
        # Replaced whole after each pass, so other threads read a consistent one.
        self.clocks = Clocks()
        self.started = threading.Event()
        # Passes made so far (for /status and tests that wait for the next one).
        self.passes = 0
        self._inbox: list[tuple[NewRequest, asyncio.Future[Outcome]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._worker = None if store.writes_never_block else ThreadPoolExecutor(1, "scheduler")

    # ------------------------------------------------------------------ asking

    async def submit(self, request: NewRequest) -> Outcome:
        """Queue a request with the next pass; returns once it is stored: fulfilled with
        its nodes when the pool had them, else still pending (it keeps its place)."""
        assert self._loop is asyncio.get_running_loop(), "submit on the scheduler's loop"
        future: asyncio.Future[Outcome] = self._loop.create_future()
        self._inbox.append((request, future))
        self._poke()
        return await future

    def poke(self) -> None:
        """A pass now, from any thread: the launcher passed, nodes may be ready."""
        loop = self._loop
        if loop is not None:
            # The loop may have stopped (the server shutting down); nobody waits then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._poke)

    def launcher_passed(self) -> None:
        """The launcher's pass ended (from any thread); from its first on, hand out."""
        self.started.set()
        self.poke()

    def queue(self) -> list[RequestRow]:
        """Pending requests in the order they will be served."""
        return self.planning.order(self.store.pending_requests(), self.clocks)

    # ------------------------------------------------------------------ passing

    def start(self) -> asyncio.Task[None]:
        """Start passing on the running loop (the API's lifespan calls this)."""
        self._loop = asyncio.get_running_loop()
        self._due = asyncio.Event()
        self._task = self._loop.create_task(self.run(), name="scheduler")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    async def run(self) -> None:
        assert self._due is not None
        busy = 0
        while True:
            await self._due.wait()
            self._due.clear()
            inbox, self._inbox = self._inbox, []
            try:
                done, planned = await self._pass([r for r, _ in inbox])
            except WriteBusy:
                # Nothing was done: try again shortly, with whatever has arrived since.
                self._inbox[:0] = inbox
                await asyncio.sleep(BUSY.delay(busy))
                busy += 1
                self._poke()
                continue
            except Exception as error:
                log.exception("scheduler pass failed")
                for _, future in inbox:
                    if not future.done():
                        future.set_exception(error)
                continue
            busy = 0
            self.passes += 1
            if self.planning.to_hand_over(done):
                done = await asyncio.to_thread(self.planning.hand_over, self.store, done)
            for (_, future), row in zip(inbox, done.created, strict=True):
                # Done already: the client went away; its request stays stored.
                if not future.done():
                    future.set_result((row, done.nodes_of(row.id)))
            self._after(done, planned)

    async def _pass(self, new: list[NewRequest]) -> tuple[HandOut, Planned | None]:
        planned = self.planning.planner(self.clocks) if self.started.is_set() else None
        plan: Planner = planned if planned is not None else queue_only
        if self._worker is None:
            return self.store.hand_out(new, plan, self.planning.providers, False), planned
        call = functools.partial(self.store.hand_out, new, plan, self.planning.providers)
        assert self._loop is not None
        return await self._loop.run_in_executor(self._worker, call), planned

    def _after(self, done: HandOut, planned: Planned | None) -> None:
        served = [request for request, _ in done.fulfilled.values()]
        self.clocks = self.planning.fair.charge(self.clocks, served)
        for request, nodes in done.fulfilled.values():
            log.info(
                "request %s (%s, priority %d): nodes %s",
                request.id,
                request.tenant or "-",
                request.priority,
                ", ".join(str(n.id) for n in nodes),
            )
        waiting = self.waiters.watched()
        if waiting:
            # Fulfilled here, failed by deadline, cancelled, or served by another process.
            self.waiters.notify(waiting - done.pending)
        if planned is not None and planned.blocked and self.short is not None:
            self.short()

    def _poke(self) -> None:
        if self._due is not None:
            self._due.set()


def _authorize(keys: Sequence[str], nodes: Sequence[NodeRow]) -> str | None:
    """Why the job's keys could not go on its nodes, or None once they are on all."""
    missing = [n.id for n in nodes if not n.access]
    if missing:
        return f"nodes {missing} have no SSH access to install the job's keys with"
    errors = authorize_keys([SshAccess(**n.access) for n in nodes if n.access], keys)
    bad = [f"node {n.id}: {e}" for n, e in zip(nodes, errors, strict=True) if e]
    return "cannot install the job's SSH keys: " + "; ".join(bad) if bad else None
