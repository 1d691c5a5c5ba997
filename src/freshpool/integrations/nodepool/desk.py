"""The request desk: takes Zuul's request znodes, queues them as freshpool requests,
and answers each in its znode once the store has settled it.

The store is the truth. A freshpool request is named after the znode it answers
(`requestor` "nodepool <id> <czxid>", the creation zxid making it unique even if
the ensemble's data is wiped), so after a restart or a lost session the desk finds
its requests again instead of queueing a second one: a znode is fulfilled from one
freshpool request only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NoNodeError

from freshpool.config import Config
from freshpool.core.errors import Refused
from freshpool.core.nodesets import check
from freshpool.core.states import RequestState
from freshpool.integrations.nodepool import wire
from freshpool.integrations.nodepool.zkclient import try_locks, unlock
from freshpool.store import NewRequest, NodeRow, RequestRow, Store, queue_only

log = logging.getLogger("freshpool.integrations.nodepool")
TAG = "nodepool"
SETTLED = (RequestState.FULFILLED, RequestState.FAILED, RequestState.CANCELLED)


@dataclass
class Held:
    """A request znode we hold the lock of, and the freshpool request that serves it."""

    request: wire.ZkRequest
    lock: str  # our contender znode
    version: int
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
        # Znodes looked at and not ours to take now (settled, or another's lock).
        self.passed: set[str] = set()
        # After a start or a lost session every candidate is looked up in the store.
        self.resync = True
        self.writes: list[Any] = []

    def forget(self) -> None:
        """The session is gone, and with it our locks: start over from the store."""
        self.held.clear()
        self.passed.clear()
        self.writes.clear()
        self.resync = True

    def take_new(self) -> None:
        try:
            children = self.zk.get_children(wire.REQUESTS, watch=self.wake)
        except NoNodeError:
            self.zk.ensure_path(wire.REQUESTS)
            children = self.zk.get_children(wire.REQUESTS, watch=self.wake)
        present = set(children)
        for name in [n for n in self.held if n not in present]:
            self._vanished(self.held.pop(name))
        self.passed &= present
        new = sorted(n for n in present if n not in self.held and n not in self.passed)
        if new:
            self._take(new)

    def _take(self, names: list[str]) -> None:
        reads = [(n, self.zk.get_async(f"{wire.REQUESTS}/{n}")) for n in names]
        candidates = []
        for name, read in reads:
            try:
                raw, stat = read.get()
            except NoNodeError:
                continue
            try:
                state = wire.decode(raw).get("state")
            except wire.BadRequest:
                state = wire.REQUESTED  # ours to fail, with the reason
            if state in (wire.REQUESTED, wire.PENDING):
                candidates.append((name, raw, stat))
            else:
                self.passed.add(name)
        locks = try_locks(self.zk, [f"{wire.REQUEST_LOCKS}/{n}" for n, _, _ in candidates])
        taken: list[tuple[Held, str]] = []
        for name, raw, stat in candidates:
            lock = locks[f"{wire.REQUEST_LOCKS}/{name}"]
            if lock is None:
                continue  # another launcher's, or one that died: looked at again later
            got = self._parse(name, raw, stat.version, lock)
            if got is not None:
                taken.append((got, tag_of(name, stat.czxid)))
        if taken:
            self._queue(taken)

    def _parse(self, name: str, raw: bytes, version: int, lock: str) -> Held | None:
        try:
            request = wire.parse_request(name, wire.decode(raw))
            problems = check(request.labels, [x.name for x in self.config.labels],
                             self.config.providers)  # fmt: skip
            if problems:
                raise wire.BadRequest("; ".join(p.message for p in problems))
        except wire.BadRequest as exc:
            try:
                data = wire.decode(raw)
            except wire.BadRequest:
                data = {}
            self._fail(name, data, lock, str(exc))
            return None
        return Held(request, lock, version)

    def _queue(self, taken: list[tuple[Held, str]]) -> None:
        """Find the freshpool requests already made for these (a restart), make the rest
        in one hand-out, and mark their znodes pending."""
        names = [tag for held, tag in taken if self.resync or held.request.data.get("state")
                 == wire.PENDING]  # fmt: skip
        known = {r.requestor: r.id for r in self.store.requests_by_requestor(names, [
            RequestState.PENDING, RequestState.FULFILLED, RequestState.FAILED,
            RequestState.CANCELLED])}  # fmt: skip
        fresh = [(held, tag) for held, tag in taken if tag not in known]
        asks = [NewRequest(h.request.labels, tag, h.request.tenant, h.request.priority)
                for h, tag in fresh]  # fmt: skip
        made = self.store.hand_out(asks, queue_only, []).created if asks else []
        for (held, _tag), row in zip(fresh, made, strict=True):
            held.freshpool_id = row.id
        for held, tag in taken:
            held.freshpool_id = held.freshpool_id or known[tag]
            self.held[held.request.id] = held
        if made:
            self.poke()
        self._mark_pending([h for h, _ in taken])

    def _mark_pending(self, taken: Sequence[Held]) -> None:
        writes = []
        for held in taken:
            data = wire.answered(held.request.data, wire.PENDING)
            path = f"{wire.REQUESTS}/{held.request.id}"
            writes.append((held, self.zk.set_async(path, wire.encode(data), held.version)))
        for held, write in writes:
            try:
                held.version = write.get().version
            except (NoNodeError, BadVersionError):
                held.version = -1  # deleted or rewritten by the client: settled below

    def answer(self) -> None:
        """Answer every held znode whose freshpool request the store has settled."""
        if not self.held:
            self.flush()
            return
        by_id = {h.freshpool_id: h for h in self.held.values()}
        rows = self.store.requests_in(list(by_id))
        done = [rows[i] for i in by_id if i in rows and rows[i].state in SETTLED]
        fulfilled = [r.id for r in done if r.state == RequestState.FULFILLED]
        nodes = self.store.request_nodes(fulfilled) if fulfilled else {}
        for row in done:
            held = by_id[row.id]
            del self.held[held.request.id]
            if row.state == RequestState.FULFILLED and len(nodes[row.id]) == len(row.labels):
                self._fulfil(held, row, nodes[row.id])
            else:
                reason = row.reason or f"the request was {row.state}"
                self._fail(held.request.id, held.request.data, held.lock, reason)
        self.resync = False
        self.flush()

    def _fulfil(self, held: Held, row: RequestRow, nodes: list[NodeRow]) -> None:
        ordered = _in_label_order(row.labels, nodes)
        for node in ordered:
            self.allocate(node, held.request.id, held.request.requestor)
        data = wire.answered(
            held.request.data, wire.FULFILLED, nodes=[wire.node_id(n.id) for n in ordered],
            declined_by=held.request.data.get("declined_by") or [],
        )  # fmt: skip
        self._write_answer(held.request.id, data, held.lock)
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
        unlock(self.zk, held.lock)
        # Settled meanwhile (failed, say): nothing to cancel.
        with contextlib.suppress(Refused):
            self.store.cancel_request(held.freshpool_id, "the Nodepool request was deleted")


def _in_label_order(labels: Sequence[str], nodes: Sequence[NodeRow]) -> list[NodeRow]:
    """The nodes in the order of node_types: Zuul pairs them up by position."""
    left = list(nodes)
    ordered = []
    for label in labels:
        node = next(n for n in left if n.label == label)
        left.remove(node)
        ordered.append(node)
    return ordered
