"""The request scheduler: hands pending requests their node sets by priority, fair share, age.

One pass at a time decides every hand-out, so the order holds. A pass runs on the
API's event loop when it can run there without waiting (SQLite, write lock free),
else on the scheduler's own thread.
Within one priority (an integer; higher is served first) tenants share the pool by
weight with start-time fair queuing: each tenant has a virtual clock that advances by
nodes / weight when it is served, and the tenant with the earliest clock goes next, so
one tenant's 500 waiting requests cannot starve another tenant's one. A tenant that
was idle rejoins at the current virtual time (idle time banks no credit). Within a
tenant, the oldest request goes first.

A request that cannot be fulfilled now keeps its place: requests behind it may not take
the ready nodes of the labels it waits for.

A pass is one store.hand_out: the requests submitted since the last pass are queued
and every request that can be served is handed its set, all in one transaction. Many
clients asking at once therefore share a transaction instead of each waiting for the
write lock in turn (group commit); that is what keeps a hand-out at a few ms under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from functools import cache
from typing import Any

from freshpool.config import Config
from freshpool.service.waiters import Waiters
from freshpool.store import (
    HandOut,
    NewRequest,
    NodeRow,
    Planner,
    Queue,
    RequestRow,
    StaleState,
    Store,
    WriteBusy,
    first_fit,
    needs,
)

log = logging.getLogger("freshpool.scheduler")


class FairShare:
    """Virtual clocks per tenant (start-time fair queuing)."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)
        self.clock: dict[str, float] = {}
        self.now = 0.0

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def start_of(self, tenant: str, clock: dict[str, float], now: float) -> float:
        return max(clock.get(tenant, now), now)

    def charge(self, request: RequestRow) -> None:
        start = self.start_of(request.tenant, self.clock, self.now)
        self.now = start
        self.clock[request.tenant] = start + len(request.labels) / self.weight(request.tenant)

    def order(self, pending: Iterable[RequestRow]) -> list[RequestRow]:
        """The order to serve `pending` in if each were served in turn (pure: state unchanged)."""
        by_priority: dict[int, dict[str, deque[RequestRow]]] = defaultdict(dict)
        for request in sorted(pending, key=lambda r: (r.created_at, r.id)):
            queues = by_priority[request.priority]
            queues.setdefault(request.tenant, deque()).append(request)
        clock, now = dict(self.clock), self.now
        ordered: list[RequestRow] = []
        for priority in sorted(by_priority, reverse=True):
            queues = by_priority[priority]
            if len(queues) == 1:
                # One tenant at this priority: its requests in age order, its clock
                # advanced as the turns below would (no search for the next tenant:
                # a CI pool with one tenant asks that of every request it serves).
                ((tenant, queue),) = queues.items()
                weight = self.weight(tenant)
                for request in queue:
                    now = self.start_of(tenant, clock, now)
                    clock[tenant] = now + len(request.labels) / weight
                ordered.extend(queue)
                continue
            while queues:
                tenant = min(
                    queues,
                    key=lambda t: (
                        self.start_of(t, clock, now),
                        queues[t][0].created_at,
                        queues[t][0].id,
                    ),
                )
                request = queues[tenant].popleft()
                if not queues[tenant]:
                    del queues[tenant]
                now = self.start_of(tenant, clock, now)
                clock[tenant] = now + len(request.labels) / self.weight(tenant)
                ordered.append(request)
        return ordered


# A request as the store has it after a pass, and the nodes handed to it (if any).
Outcome = tuple[RequestRow, list[NodeRow]]
# Where a submitter waits: a thread on a Future, an asyncio task on its loop's future.
ReplyTo = Future[Outcome] | tuple[asyncio.AbstractEventLoop, "asyncio.Future[Outcome]"]
# A hand-out that hits a concurrent claimer (PostgreSQL) is redone this often in one pass.
HAND_OUT_TRIES = 3


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: Store,
        waiters: Waiters | None = None,
        short: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.waiters = waiters or Waiters()
        # Called when requests wait for nodes that are not ready (the launcher's wake).
        self.short = short
        self.fair = FairShare({t.name: t.weight for t in config.tenants})
        self._lock = threading.Lock()
        # One pass at a time, whichever thread runs it, so the order holds.
        self._passing = threading.Lock()
        self._poked = threading.Event()
        self._inbox: list[tuple[NewRequest, ReplyTo]] = []
        # Set by the last plan: some requests wait for nodes that are not ready.
        self._blocked = False
        # Set after the launcher's first pass: it has recovered and reconciled every
        # provider. Until then requests are queued but nothing is handed out.
        self.started = threading.Event()
        self.providers_for = cache(self._providers_for)
        self.providers = [p.name for p in config.providers]
        # Passes may run on the submitters' event loops (see _pass_on_loop): what
        # each loop's handlers submitted, and the loops whose pass waits for the
        # thread's to end.
        self._on_loop = store.writes_never_block
        self._loop_inbox: dict[asyncio.AbstractEventLoop, list[tuple[NewRequest, ReplyTo]]] = {}
        self._deferred: set[asyncio.AbstractEventLoop] = set()
        # The loop the last request came from: where launcher passes are looked at.
        self._home: asyncio.AbstractEventLoop | None = None

    def _providers_for(self, labels: tuple[str, ...]) -> list[str]:
        """Providers that serve every label of a set (a set comes from one provider)."""
        return [p.name for p in self.config.providers if all(p.serves(x) for x in labels)]

    def queue(self) -> list[RequestRow]:
        """Pending requests in the order they will be served."""
        pending = self.store.pending_requests()
        with self._lock:
            return self.fair.order(pending)

    # -------------------------------------------------------------- asking

    def submit(self, request: NewRequest) -> Future[Outcome]:
        """Queue a request with the next pass; the future resolves once it is stored.

        The outcome is the request fulfilled with its nodes when the pool had them,
        else the request still pending (it keeps its place in the queue).
        """
        future: Future[Outcome] = Future()
        with self._lock:
            self._inbox.append((request, future))
        self.poke()
        return future

    async def submit_async(self, request: NewRequest) -> Outcome:
        """submit() for asyncio callers (the API's handlers).

        On a store whose writes never block, the pass runs on the caller's event
        loop, once the handlers that are ready now have submitted theirs (see
        _pass_on_loop); otherwise on the scheduler's thread.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        if not self._on_loop:
            with self._lock:
                self._inbox.append((request, (loop, future)))
            self.poke()
            return await future
        self._home = loop
        with self._lock:
            due = self._loop_inbox.setdefault(loop, [])
            due.append((request, (loop, future)))
            first = len(due) == 1 and loop not in self._deferred
        if first:
            loop.call_soon(self._pass_on_loop, loop)
        return await future

    def _pass_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """A pass on the event loop for what its handlers submitted, if it can run
        without waiting; else it waits its turn off the loop.

        Why on the loop: beside a busy event loop, a pass on another thread waits
        for the interpreter lock after each statement (sqlite3 lets go of it for
        every step): at 50 HTTP clients a pass took 10-15 ms for 3-4 ms of work.
        Why only when nothing waits: a pass that waited for the write lock here
        would stall every call this loop serves, /healthz included. So:
        - the thread's pass is running: this one runs when it ends (run_pass);
        - another writer holds the write lock: the thread's pass serves these,
          waiting its turn as always.
        """
        with self._lock:
            if not self._loop_inbox.get(loop):
                return
            # Under the lock run_pass releases the pass under: never deferred to a
            # pass that has already looked.
            if not self._passing.acquire(blocking=False):
                self._deferred.add(loop)
                return
            inbox = self._loop_inbox.pop(loop)
        self._pass_at_once(inbox)

    def _pass_at_once(self, inbox: list[tuple[NewRequest, ReplyTo]]) -> None:
        """With the pass lock held (it is released here): a pass that does not wait
        for the write lock, or, if another writer holds it, the thread's pass for
        `inbox`, which waits its turn."""
        handed = False
        try:
            # Before the launcher's first pass the thread only queues them.
            if self.started.is_set():
                self._pass(inbox, serve=True, wait=False)
                handed = True
        except WriteBusy:
            pass
        except Exception:
            # The submitters got the error, as from the thread's passes.
            log.exception("scheduler pass failed")
            handed = True
        finally:
            self._passing.release()
        if not handed:
            with self._lock:
                self._inbox[:0] = inbox
            self.poke()

    # -------------------------------------------------------------- passes

    def run_pass(self, serve: bool = True) -> None:
        """Queue what was submitted, serve what can be served now, tell the waiters.

        With `serve` false the submitted requests are only queued.
        """
        self._passing.acquire()
        try:
            with self._lock:
                inbox, self._inbox = self._inbox, []
            self._pass(inbox, serve, wait=True)
        finally:
            with self._lock:
                self._passing.release()
                deferred, self._deferred = self._deferred, set()
        # Passes on event loops that found this one running run now.
        for loop in deferred:
            # The loop may have stopped (server shutting down); nobody waits then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._pass_on_loop, loop)

    def _pass(self, inbox: list[tuple[NewRequest, ReplyTo]], serve: bool, wait: bool) -> None:
        """One hand-out for `inbox`; raises WriteBusy (having done nothing and told
        nobody) if it was not to wait and another writer holds the lock."""
        try:
            done = self._hand_out([r for r, _ in inbox], self._plan if serve else _nothing, wait)
        except WriteBusy:
            raise
        except BaseException as error:
            _reply([(to, error) for _, to in inbox])
            raise
        _reply(
            [
                (to, (row, done.nodes_of(row.id)))
                for (_, to), row in zip(inbox, done.created, strict=True)
            ]
        )
        self._after(done)

    def _hand_out(self, new: list[NewRequest], plan: Planner, wait: bool) -> HandOut:
        for attempt in range(HAND_OUT_TRIES):
            try:
                return self.store.hand_out(new, plan, self.providers, wait)
            except StaleState:
                # Another claimer took a node between our read and our claim
                # (PostgreSQL); the transaction rolled back whole. Look again.
                if attempt == HAND_OUT_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _after(self, done: HandOut) -> None:
        with self._lock:
            for request, _ in done.fulfilled.values():
                self.fair.charge(request)
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
            # Fulfilled here, failed by deadline, cancelled, or claimed by another process.
            self.waiters.notify(waiting - done.pending)
        if self._blocked and self.short is not None:
            # Some requests wait for nodes that are not ready: the launcher should look now.
            self.short()

    def _plan(self, queue: Queue) -> list[tuple[int, str]]:
        """Placements for this pass, in fair-share order; runs inside the hand-out."""
        ready = queue.ready
        with self._lock:
            ordered = self.fair.order(queue.pending)
        free = Counter(ready)
        total: Counter[str] = Counter()
        for (_, label), n in ready.items():
            total[label] += n
        reserved: Counter[str] = Counter()
        placements = []
        for request in ordered:
            labels = tuple(request.labels)
            need = needs(labels)
            provider = None
            if all(total[x] - reserved[x] >= n for x, n in need):
                provider = first_fit(labels, self.providers_for(labels), free)
            if provider is None:
                # Keep its place: nothing behind it takes the nodes it waits for.
                reserved.update(dict(need))
                continue
            for label, n in need:
                free[(provider, label)] -= n
                total[label] -= n
            placements.append((request.id, provider))
        self._blocked = bool(reserved)
        return placements

    # -------------------------------------------- running beside the launcher

    def launcher_pass(self) -> None:
        """The launcher's pass hook: nodes may have become ready; serve what waits.

        Looked at on the event loop requests come from when passes run there, else
        on our own thread. On the thread, such a pass (nearly always with nothing
        to serve) held off the loop's passes for 4 ms at p50 while it fought the
        loop for the interpreter lock: at 50 HTTP clients a fifth of them waited.
        """
        self.started.set()
        loop = self._home
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._look_on_loop, loop)
                return
            except RuntimeError:  # that loop has closed
                self._home = None
        self.poke()

    def _look_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """A pass on the loop for requests that wait (the launcher has passed),
        unless one is due anyway; the thread's if it cannot run without waiting."""
        with self._lock:
            # Due or deferred, this loop's next pass begins after the launcher's
            # commit, and every pass serves all pending requests it can.
            if self._loop_inbox.get(loop):
                return
            if not self._passing.acquire(blocking=False):
                self.poke()
                return
        self._pass_at_once([])

    def poke(self) -> None:
        """Run a pass now (thread-safe): a request arrived, or a node became ready."""
        self._poked.set()

    def run(self, stop: threading.Event, idle: float = 1.0) -> None:
        """Serve requests on a thread of its own until `stop` is set.

        A hand-out then waits for no launch, test or delete the launcher is advancing:
        with real nodes, a launcher pass that starts or tests nodes takes tens of ms.
        Poked by submit() on each new request, by submit_async() and the launcher's
        passes only when their pass cannot run on an event loop, and by the loop's
        passes when they cannot run without waiting.
        """
        while not stop.is_set():
            if self._poked.wait(idle):
                self._poked.clear()
            try:
                # Before the launcher's first pass, requests are queued but not served.
                self.run_pass(serve=self.started.is_set())
            except Exception:
                # The submitters got the error; the next pass tries again.
                log.exception("scheduler pass failed")
                stop.wait(0.1)


def _reply(answers: list[tuple[ReplyTo, Outcome | BaseException]]) -> None:
    """Hand each submitter its outcome (or the error): threads directly, asyncio tasks
    with one call into each loop per pass (a call per task would wake the loop as
    many times and cost a syscall each)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Outcome], Any]]] = {}
    for to, answer in answers:
        if isinstance(to, Future):
            if isinstance(answer, BaseException):
                to.set_exception(answer)
            else:
                to.set_result(answer)
        else:
            by_loop.setdefault(to[0], []).append((to[1], answer))
    for loop, items in by_loop.items():
        if loop is _running_loop():
            _settle(items)
            continue
        # The loop may have stopped (server shutting down); nobody waits then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, items)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle(items: list[tuple[asyncio.Future[Outcome], Any]]) -> None:
    for future, answer in items:
        if future.done():  # cancelled: the client went away; the request stays stored
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)


def _nothing(_queue: Queue) -> list[tuple[int, str]]:
    return []
