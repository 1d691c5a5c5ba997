"""The request desk: takes Zuul's request znodes, queues them as freshpool requests,
and answers each in its znode once the store has settled it.

The store is the truth. A freshpool request is named after the znode it answers
(`requestor` "nodepool <id> <czxid>", the creation zxid making it unique even if
the ensemble's data is wiped), so after a restart or a lost session the desk finds
its requests again instead of queueing a second one: a znode is fulfilled from one
freshpool request only.

A request served at once is answered under the lock taken to read it. One that
waits is let go and stays `requested` while it waits, as at a Nodepool launcher
at quota: Zuul rewrites a request only when it gets its lock (its
`reviseRequest`, for a new `relative_priority`), and Nodepool's cleanup resets a
`pending` request nobody holds. A data watch follows the client's rewrites into
the freshpool request's priority; the lock is taken again to answer, and if
another launcher took the znode meanwhile the freshpool request is cancelled
(nodes handed to it are deleted, never handed again).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from freshpool.config import Config
from freshpool.core.errors import Refused
from freshpool.core.nodesets import check
from freshpool.core.placement import Clocks, Placement
from freshpool.core.states import RequestState
from freshpool.dispatch.scheduler import Planning
from freshpool.integrations.nodepool import wire
from freshpool.integrations.nodepool.zkclient import try_locks, unlock
from freshpool.store import HandOut, NewRequest, NodeRow, Queue, RequestRow, Store, queue_only

log = logging.getLogger("freshpool.integrations.nodepool")
TAG = "nodepool"
SETTLED = (RequestState.FULFILLED, RequestState.FAILED, RequestState.CANCELLED)


@dataclass
class Held:
    """A request znode we serve, and the freshpool request that serves it."""

    request: wire.ZkRequest
    lock: str  # our contender znode while we hold its lock, else ""
    freshpool_id: int = 0


def tag_of(name: str, czxid: int) -> str:
    return f"{TAG} {name} {czxid}"


def znode_of(requestor: str) -> str | None:
    """The request znode a freshpool request answers, from its requestor."""
    parts = requestor.split(" ")
    return parts[1] if len(parts) == 3 and parts[0] == TAG else None


class Desk:
    def __init__(
        self,
        zk: KazooClient,
        store: Store,
        config: Config,
        launcher: str,
        wake: Callable[..., None],
        poke: Callable[[], None],
        allocate: Callable[[NodeRow, str, str], None],
    ) -> None:
        self.zk, self.store, self.config, self.launcher = zk, store, config, launcher
        self.wake, self.poke, self.allocate = wake, poke, allocate
        self.held: dict[str, Held] = {}
        # The request znodes at the last look, and who hears of those deleted since.
        self.present: set[str] = set()
        self.vanished: Callable[[set[str]], None] = lambda _names: None
        # Set by the watch on the requests' folder, cleared when it is read again.
        self.arrived = threading.Event()
        # Znodes looked at and not ours to take now (settled, or another's lock).
        self.passed: set[str] = set()
        # After a start or a lost session every candidate is looked up in the store.
        self.resync = True
        self.writes: list[Any] = []
        # Waiting requests whose znode the client rewrote since we last read it.
        self.revised: set[str] = set()
        self.planning = Planning(config)
        # Set once the launcher has passed: from then on the desk hands out itself.
        self.serving = threading.Event()

    def forget(self) -> None:
        """The session is gone, and with it our locks: start over from the store."""
        self.held.clear()
        self.passed.clear()
        self.writes.clear()
        self.revised.clear()
        self.resync = True

    def waiting_labels(self) -> set[str]:
        return {label for held in self.held.values() for label in held.request.labels}

    def requests_changed(self, *_args: Any) -> None:
        self.arrived.set()
        self.wake()

    def take_new(self) -> None:
        self.arrived.clear()
        try:
            children = self.zk.get_children(wire.REQUESTS, watch=self.requests_changed)
        except NoNodeError:
            self.zk.ensure_path(wire.REQUESTS)
            children = self.zk.get_children(wire.REQUESTS, watch=self.requests_changed)
        present = set(children)
        self.vanished(self.present - present)
        self.present = present
        for name in [n for n in self.held if n not in present]:
            self._vanished(self.held.pop(name))
        self.passed &= present
        new = sorted(n for n in present if n not in self.held and n not in self.passed)
        if new:
            self._take(new)

    def _take(self, names: list[str]) -> None:
        """Read the new znodes and try their locks in one round trip (the reads are
        answered before the locks' calls, which are sent after them)."""
        reads = [(n, self.zk.get_async(f"{wire.REQUESTS}/{n}")) for n in names]
        locks = try_locks(self.zk, [f"{wire.REQUEST_LOCKS}/{n}" for n in names])
        taken: list[tuple[Held, str]] = []
        for name, read in reads:
            lock = locks[f"{wire.REQUEST_LOCKS}/{name}"]
            try:
                raw, stat = read.get()
            except NoNodeError:
                raw, stat = None, None  # deleted meanwhile
            try:
                state = wire.decode(raw).get("state") if raw is not None else None
            except wire.BadRequest:
                state = wire.REQUESTED  # ours to fail, with the reason
            if raw is not None and state not in (wire.REQUESTED, wire.PENDING):
                self.passed.add(name)
            if lock is None:
                continue  # another launcher's, or one that died: looked at again later
            if raw is None or stat is None or state not in (wire.REQUESTED, wire.PENDING):
                self.writes.append(self.zk.delete_async(lock))
                continue
            got = self._parse(name, raw, lock)
            if got is not None:
                taken.append((got, tag_of(name, stat.czxid)))
        if taken:
            self._queue(taken)

    def _parse(self, name: str, raw: bytes, lock: str) -> Held | None:
        try:
            request = wire.parse_request(name, wire.decode(raw))
            problems = check(request.labels, [x.name for x in self.config.labels],
                             self.config.providers,
                             self.config.tenant_quota(request.tenant))  # fmt: skip
            if problems:
                raise wire.BadRequest("; ".join(p.message for p in problems))
        except wire.BadRequest as exc:
            try:
                data = wire.decode(raw)
            except wire.BadRequest:
                data = {}
            self._fail(name, data, lock, str(exc))
            return None
        return Held(request, lock)

    def _queue(self, taken: list[tuple[Held, str]]) -> None:
        """Find the freshpool requests already made for these (a restart); queue the
        rest and hand them ready nodes in one hand-out, answering those served at
        once; mark the others pending."""
        names = [tag for held, tag in taken if self.resync or held.request.data.get("state")
                 == wire.PENDING]  # fmt: skip
        known = {r.requestor: r.id for r in self.store.requests_by_requestor(names, [
            RequestState.PENDING, RequestState.FULFILLED, RequestState.FAILED,
            RequestState.CANCELLED])}  # fmt: skip
        fresh = [(held, tag) for held, tag in taken if tag not in known]
        done = self._hand_out([NewRequest(h.request.labels, tag, h.request.tenant,
                                          h.request.priority) for h, tag in fresh])  # fmt: skip
        for (held, _tag), row in zip(fresh, done.created, strict=True):
            held.freshpool_id = row.id
        for held, tag in taken:
            held.freshpool_id = held.freshpool_id or known[tag]
            got = done.fulfilled.get(held.freshpool_id)
            if got is not None:
                self._fulfil(held, *got)
            else:
                self._let_wait(held)
        if any(row.state == RequestState.PENDING for row in done.created):
            self.poke()  # the scheduler serves them, and wakes the launcher for them

    def _hand_out(self, asks: list[NewRequest]) -> HandOut:
        """Queue `asks`; once the launcher has passed (the store matches the providers),
        hand ready nodes to those the scheduler would serve now in any case."""
        if not asks:
            return HandOut([], {}, set())
        if not self.serving.is_set():
            return self.store.hand_out(asks, queue_only, [])
        done = self.store.hand_out(asks, Uncontended(self.planning), self.planning.providers)
        if self.planning.to_hand_over(done):
            done = self.planning.hand_over(self.store, done)
        return done

    def _let_wait(self, held: Held) -> None:
        """Release the lock of a request that waits, and watch its znode."""
        self.writes.append(self.zk.delete_async(held.lock))
        held.lock = ""
        self.held[held.request.id] = held
        self.zk.get_async(f"{wire.REQUESTS}/{held.request.id}", watch=self.rewritten)

    def rewritten(self, event: Any) -> None:
        """The watch on a waiting request's znode (kazoo's thread: only flags here)."""
        self.revised.add(str(event.path).rsplit("/", 1)[1])
        self.wake()

    def follow_revisions(self) -> None:
        """Carry the client's rewrites of waiting requests into their priority."""
        names = [n for n in self.revised if n in self.held]
        self.revised.clear()
        reads = [(n, self.zk.get_async(f"{wire.REQUESTS}/{n}", watch=self.rewritten))
                 for n in names]  # fmt: skip
        for name, read in reads:
            held = self.held[name]
            try:
                data = wire.decode(read.get()[0])
                request = wire.parse_request(name, data)
            except (NoNodeError, wire.BadRequest):
                continue  # deleted (take_new cancels it) or unreadable: as it was
            if data.get("state") not in (wire.REQUESTED, wire.PENDING):
                continue  # another launcher's now: found when we lock to answer
            moved = request.priority != held.request.priority
            if moved and self.store.reprioritise(held.freshpool_id, request.priority):
                log.info("request %s: priority %d -> %d", name, held.request.priority,
                         request.priority)  # fmt: skip
            held.request = request

    def answer(self) -> None:
        """Answer every waiting znode whose freshpool request the store has settled."""
        if self.held:
            self._answer_settled()
        self.resync = False
        self.flush()

    def _answer_settled(self) -> None:
        by_id = {h.freshpool_id: h for h in self.held.values()}
        rows = self.store.requests_in(list(by_id))
        done = [rows[i] for i in by_id if i in rows and rows[i].state in SETTLED]
        if not done:
            return
        # Locked again to answer, and read again under it: the client's last word.
        names = [by_id[r.id].request.id for r in done]
        reads = [self.zk.get_async(f"{wire.REQUESTS}/{n}") for n in names]
        # Their folders stay from when we took them.
        paths = [f"{wire.REQUEST_LOCKS}/{n}" for n in names]
        locks = try_locks(self.zk, paths, folders_exist=True)
        fulfilled = [r.id for r in done if r.state == RequestState.FULFILLED]
        nodes = self.store.request_nodes(fulfilled) if fulfilled else {}
        for row, name, read in zip(done, names, reads, strict=True):
            held = by_id[row.id]
            lock = locks[f"{wire.REQUEST_LOCKS}/{name}"]
            if lock is None:
                continue  # the client revising it, or another launcher's: next pass
            state, data = _read(read)
            if state is None:
                self.writes.append(self.zk.delete_async(lock))  # deleted: take_new cancels
                continue
            held.lock = lock
            del self.held[name]
            if state not in (wire.REQUESTED, wire.PENDING):
                self._lost_to_another(held, state)
                continue
            held.request = replace(held.request, data=data or held.request.data)
            if row.state == RequestState.FULFILLED and len(nodes[row.id]) == len(row.labels):
                self._fulfil(held, row, nodes[row.id])
            else:
                reason = row.reason or f"the request was {row.state}"
                self._fail(held.request.id, held.request.data, held.lock, reason)

    def _lost_to_another(self, held: Held, state: str) -> None:
        """Another launcher answered the znode while it waited with us: ours goes."""
        self.writes.append(self.zk.delete_async(held.lock))
        self.passed.add(held.request.id)
        log.warning("request %s is %s by another launcher: cancelling ours", held.request.id,
                    state)  # fmt: skip
        with contextlib.suppress(Refused):
            self.store.cancel_request(held.freshpool_id, "served by another Nodepool launcher")

    def _fulfil(self, held: Held, row: RequestRow, nodes: list[NodeRow]) -> None:
        ordered = _in_label_order(row.labels, nodes)
        for node in ordered:
            self.allocate(node, held.request.id, held.request.requestor)
        data = wire.answered(
            held.request.data, wire.FULFILLED, nodes=[wire.node_id(n.id) for n in ordered],
            declined_by=held.request.data.get("declined_by") or [],
        )  # fmt: skip
        self._write_answer(held.request.id, data, held.lock)
        self.passed.add(held.request.id)
        log.info("request %s fulfilled with nodes %s", held.request.id, [n.id for n in ordered])

    def _fail(self, name: str, data: dict[str, Any], lock: str, reason: str) -> None:
        declined = data.get("declined_by")
        declined = declined if isinstance(declined, list) else []
        answer = wire.answered(data, wire.FAILED, declined_by=[*declined, self.launcher],
                               nodes=[], failure_reason=reason)  # fmt: skip
        self._write_answer(name, answer, lock)
        self.passed.add(name)
        log.warning("request %s failed: %s", name, reason)

    def _write_answer(self, name: str, data: dict[str, Any], lock: str) -> None:
        """Sent now, read in `flush`: ZooKeeper applies one session's writes in order,
        so the node znodes written before are there when a client sees the answer."""
        # Our lock keeps other launchers off; the client only deletes the znode.
        self.writes.append(self.zk.set_async(f"{wire.REQUESTS}/{name}", wire.encode(data)))
        self.writes.append(self.zk.delete_async(lock))

    def flush(self) -> None:
        """Wait for the writes sent; a request the client deleted meanwhile is no loss."""
        writes, self.writes = self.writes, []
        for write in writes:
            with contextlib.suppress(NoNodeError):
                write.get()

    def _vanished(self, held: Held) -> None:
        """The client deleted a request we still serve: cancel it (nodes handed to it
        meanwhile go to deletion, never back to ready)."""
        if held.lock:
            unlock(self.zk, held.lock)
        # Settled meanwhile (failed, say): nothing to cancel.
        with contextlib.suppress(Refused):
            self.store.cancel_request(held.freshpool_id, "the Nodepool request was deleted")


@dataclass(frozen=True)
class Uncontended:
    """The scheduler's placements, kept for our requests whose order no fair-share
    clock can change: no request of another tenant at the same priority waits for
    any of their labels. Those the scheduler would serve in the same way now; the
    rest, and every request of other front doors, are left to it."""

    planning: Planning

    def __call__(self, queue: Queue) -> list[Placement]:
        placed = dict(self.planning.planner(Clocks())(queue))
        waiting = [r for r in queue.pending if r.id not in placed]
        return [
            (r.id, placed[r.id])
            for r in queue.pending
            if r.id in placed and znode_of(r.requestor) is not None
            and not any(_contends(r, w) for w in waiting)
        ]  # fmt: skip


def _contends(ours: RequestRow, other: RequestRow) -> bool:
    return (other.priority == ours.priority and other.tenant != ours.tenant
            and not set(other.labels).isdisjoint(ours.labels))  # fmt: skip


def _read(read: Any) -> tuple[str | None, dict[str, Any] | None]:
    """A request znode's state and content from an async read; (None, None) if it is
    gone, (requested, None) if it no longer parses (kept as we read it before)."""
    try:
        raw = read.get()[0]
    except NoNodeError:
        return None, None
    try:
        data = wire.decode(raw)
    except wire.BadRequest:
        return wire.REQUESTED, None
    return str(data.get("state")), data


def _in_label_order(labels: Sequence[str], nodes: Sequence[NodeRow]) -> list[NodeRow]:
    """The nodes in the order of node_types: Zuul pairs them up by position."""
    left = list(nodes)
    ordered = []
    for label in labels:
        node = next(n for n in left if n.label == label)
        left.remove(node)
        ordered.append(node)
    return ordered
