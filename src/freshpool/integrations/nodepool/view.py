"""The node znodes: freshpool's nodes as Nodepool shows them, and what clients set there.

Ready nodes not yet handed out appear as unallocated `ready` znodes (Nodepool's
min-ready view), but not while a Zuul request waits for their label: they are about
to be handed to it, and Zuul reads only the nodes allocated to its requests. A node
handed to a Zuul request appears allocated to it. From then
on the client owns the znode's state and lock, and each change it makes is turned
into the store's move:

    in-use  -> the job started          hold     -> hold
    used    -> release                  deleting -> delete
    unlocked after being locked, or never locked and its request gone -> release

A znode goes once its node has left the pool (used, deleting, gone) and nobody
holds its lock; a znode that names us as launcher with no node behind it goes too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError, NotEmptyError

from freshpool.core.errors import NotFound, Refused
from freshpool.core.states import NodeState
from freshpool.integrations.nodepool import wire
from freshpool.integrations.nodepool.desk import znode_of
from freshpool.integrations.nodepool.zkclient import delete_tree
from freshpool.store import NodeRow, Store

log = logging.getLogger("freshpool.integrations.nodepool")
SHOWN = (NodeState.READY, NodeState.IN_USE, NodeState.HOLD)


@dataclass
class Shown:
    """A node znode we wrote, and what we last learnt of it."""

    allocated_to: str | None
    was_locked: bool = False
    acted: str = ""  # the client state we last turned into a move


class View:
    def __init__(
        self, zk: KazooClient, store: Store, launcher: str, wake: Callable[..., None]
    ) -> None:
        self.zk, self.store, self.launcher, self.wake = zk, store, launcher, wake
        self.shown: dict[int, Shown] = {}
        self.dirty: set[int] = set()
        self.resync = True
        self._watches: dict[int, Callable[[Any], None]] = {}
        self.writes: list[Any] = []
        # Called between the steps of a sync: the bridge takes new requests there, so
        # they wait for no more than one step.
        self.between: Callable[[], None] = lambda: None
        # The labels Zuul's waiting requests ask for (the desk's).
        self.wanted: Callable[[], set[str]] = set

    def forget(self) -> None:
        self.writes.clear()
        self.shown.clear()
        self.dirty.clear()
        self._watches.clear()
        self.resync = True

    def allocate(self, node: NodeRow, request: str, requestor: str) -> None:
        """Show `node` as handed to the request znode `request`."""
        data = wire.node_data(node, self.launcher, wire.READY, request, requestor)
        path = f"{wire.NODES}/{wire.node_id(node.id)}"
        # Sent, not awaited: the request's answer goes after it on the same session.
        if node.id in self.shown:
            self.writes.append(self.zk.set_async(path, wire.encode(data)))
        else:
            self.writes.append(self.zk.create_async(path, wire.encode(data), makepath=True))
        self.shown[node.id] = Shown(allocated_to=request)
        self.dirty.add(node.id)

    def requests_deleted(self, names: set[str]) -> None:
        """Look again at the nodes handed to these requests: one the client never
        locked is released now that its request is gone."""
        for node_id, shown in self.shown.items():
            if shown.allocated_to in names:
                self.dirty.add(node_id)

    def sync(self) -> None:
        """Bring the znodes in line with the store, then follow what clients changed."""
        rows = {n.id: n for n in self.store.nodes([str(s) for s in SHOWN])}
        if self.resync:
            self._adopt(rows)
        wanted = self.wanted()
        fresh = [n for n in rows.values() if n.state == NodeState.READY
                 and n.id not in self.shown and n.label not in wanted]  # fmt: skip
        creates = []
        for node in fresh:
            data = wire.encode(wire.node_data(node, self.launcher, wire.READY, None))
            path = f"{wire.NODES}/{wire.node_id(node.id)}"
            creates.append((node, self.zk.create_async(path, data, makepath=True)))
        for node, create in creates:
            try:
                create.get()
            except NodeExistsError:
                self._write(node.id, wire.node_data(node, self.launcher, wire.READY, None))
            self.shown[node.id] = Shown(allocated_to=None)
            self.dirty.add(node.id)
        self._settle_writes()
        # Those `rows` can speak for: a node handed out in `between` may have been
        # made after they were read, and is looked at in the next sync.
        known = set(self.shown)
        self.between()
        follow, gone = [], []
        for node_id, shown in list(self.shown.items()):
            if node_id not in known:
                continue
            row = rows.get(node_id)
            if row is None or (row.state != NodeState.READY and shown.allocated_to is None):
                # Gone, or handed to a client of freshpool's own: not Zuul's to see.
                gone.append(node_id)
            elif node_id in self.dirty:
                self.dirty.discard(node_id)
                follow.append((row, shown))
        self._remove_all(gone)
        self.between()
        self._follow_all(follow)
        self.resync = False

    def _settle_writes(self) -> None:
        writes, self.writes = self.writes, []
        for write in writes:
            try:
                write.get()
            except NodeExistsError:
                log.warning("a node znode we allocated existed already; rewritten next sync")

    def _follow_all(self, follow: list[tuple[NodeRow, Shown]]) -> None:
        """Read every node's znode and lock at once (then one round trip for all)."""
        reads = []
        for row, shown in follow:
            path = f"{wire.NODES}/{wire.node_id(row.id)}"
            watch = self._watch(row.id)
            data = self.zk.get_async(path, watch=watch)
            lock = self.zk.get_children_async(f"{path}/lock", watch=watch)
            reads.append((row, shown, data, lock))
        for row, shown, data, lock in reads:
            try:
                raw = data.get()[0]
            except NoNodeError:
                raw = b"{}"  # deleted under us: the client is done with it
            try:
                is_locked = bool(lock.get())
            except NoNodeError:
                # Only for the watch on its creation: not waited for.
                self.zk.exists_async(f"{wire.NODES}/{wire.node_id(row.id)}/lock",
                                     watch=self._watch(row.id))  # fmt: skip
                is_locked = False
            self._follow(row, shown, _json(raw).get("state", ""), is_locked)
            self.between()

    def _adopt(self, rows: dict[int, NodeRow]) -> None:
        """After a start or a lost session: which nodes are handed to Zuul's requests."""
        handed = [n for n in rows.values() if n.request_id is not None]
        requests = self.store.requests_in([n.request_id for n in handed if n.request_id])
        for node in handed:
            request = requests.get(node.request_id or 0)
            name = znode_of(request.requestor) if request else None
            if name is not None:
                self.shown[node.id] = Shown(allocated_to=name)
                self.dirty.add(node.id)
        self.cleanup(set(rows))

    def cleanup(self, live: set[int]) -> None:
        """Remove znodes that name us as launcher and whose node is not in the pool."""
        try:
            children = self.zk.get_children(wire.NODES)
        except NoNodeError:
            return
        for name in children:
            node_id = wire.freshpool_id(name)
            if node_id in live:
                continue
            try:
                raw, _ = self.zk.get(f"{wire.NODES}/{name}")
                ours = _json(raw).get("launcher") == self.launcher
            except NoNodeError:
                continue
            if ours:
                delete_tree(self.zk, f"{wire.NODES}/{name}")
                log.info("removed node znode %s: its node is no longer in the pool", name)

    def _write(self, node_id: int, data: dict[str, Any]) -> None:
        path = f"{wire.NODES}/{wire.node_id(node_id)}"
        try:
            self.zk.create(path, wire.encode(data), makepath=True)
        except NodeExistsError:
            self.zk.set(path, wire.encode(data))

    def _remove_all(self, node_ids: list[int]) -> None:
        """Remove these nodes' znodes, but not while a client holds a lock of one
        (returning a set node by node): that one goes after it unlocks. Two round
        trips for any number: the locks' listings, then the deletes."""
        paths = {i: f"{wire.NODES}/{wire.node_id(i)}" for i in node_ids}
        listings = [(i, self.zk.get_children_async(f"{paths[i]}/lock", watch=self._watch(i)))
                    for i in node_ids if self.shown[i].allocated_to is not None]  # fmt: skip
        held = set()
        for node_id, listing in listings:
            with contextlib.suppress(NoNodeError):  # no lock folder: nobody holds it
                if listing.get():
                    held.add(node_id)
        deletes = []
        for node_id in node_ids:
            if node_id in held:
                continue
            deletes.append((node_id, self.zk.delete_async(f"{paths[node_id]}/lock"),
                            self.zk.delete_async(paths[node_id])))  # fmt: skip
            del self.shown[node_id]
            self._watches.pop(node_id, None)
        for node_id, *calls in deletes:
            try:
                for call in calls:
                    with contextlib.suppress(NoNodeError):
                        call.get()
            except NotEmptyError:
                # A client's lock arrived between the listing and the delete.
                delete_tree(self.zk, paths[node_id])

    def _follow(self, node: NodeRow, shown: Shown, state: str, is_locked: bool) -> None:
        shown.was_locked = shown.was_locked or is_locked
        if shown.allocated_to is None:
            if state == wire.DELETING:
                self._act(node, shown, state, self._delete)
            return
        if state in (wire.USED, wire.DELETING, wire.HOLD, wire.IN_USE):
            moves = {wire.USED: self._release, wire.DELETING: self._delete,
                     wire.HOLD: self._hold, wire.IN_USE: self._start}  # fmt: skip
            self._act(node, shown, state, moves[state])
        settled = state in (wire.USED, wire.DELETING, wire.HOLD)
        if not is_locked and not settled and (shown.was_locked or self._gone(shown)):
            self._act(node, shown, "unlocked", self._release)

    def _gone(self, shown: Shown) -> bool:
        assert shown.allocated_to is not None
        return self.zk.exists(f"{wire.REQUESTS}/{shown.allocated_to}") is None

    def _act(self, node: NodeRow, shown: Shown, state: str, move: Callable[[NodeRow], Any]) -> None:
        if shown.acted == state:
            return
        shown.acted = state
        try:
            move(node)
        except (Refused, NotFound) as exc:
            log.info("node %s: %s by its znode: %s", node.id, state, exc)

    def _start(self, node: NodeRow) -> None:
        if node.state == NodeState.IN_USE:
            self.store.start_job(node.id, "zuul")

    def _release(self, node: NodeRow) -> None:
        self.store.release_set(node.id, "released through its Nodepool znode")

    def _hold(self, node: NodeRow) -> None:
        self.store.move(node.id, NodeState.HOLD, "held through its Nodepool znode")

    def _delete(self, node: NodeRow) -> None:
        self.store.move(node.id, NodeState.DELETING, "deleted through its Nodepool znode")

    def _watch(self, node_id: int) -> Callable[[Any], None]:
        # One callable per node: kazoo keeps a set of watchers per path, so following a
        # node again does not stack up watchers.
        if node_id not in self._watches:

            def fired(_event: Any) -> None:
                self.dirty.add(node_id)
                self.wake()

            self._watches[node_id] = fired
        return self._watches[node_id]


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = wire.decode(raw or b"{}")
    except wire.BadRequest:
        return {}
    return data
