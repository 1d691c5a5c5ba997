"""The node view's sync against a real ZooKeeper (TLS) and a real store, driven step
by step where `serve`'s timing would only sometimes hit the case."""

from __future__ import annotations

import uuid
from pathlib import Path

from freshpool.core.states import NodeState
from freshpool.integrations.nodepool import wire
from freshpool.integrations.nodepool.view import View
from freshpool.store import Store
from tests.integrations.nodepool.conftest import kazoo_client
from tests.integrations.nodepool.zookeeper import ZooKeeper


def test_a_node_handed_out_after_the_sync_read_the_store_keeps_its_znode(
    tmp_path: Path, zookeeper: ZooKeeper
) -> None:
    """A sync reads the store, then takes new requests between its steps; a node made
    ready and handed to one of them meanwhile is not in what it read, and must not be
    taken for a node that left the pool (its znode removed under the client)."""
    root = f"/{uuid.uuid4().hex}"
    setup = kazoo_client(zookeeper)
    setup.ensure_path(root)
    setup.stop()
    zk = kazoo_client(zookeeper, root)
    store = Store.open(tmp_path)
    try:
        zk.ensure_path(wire.NODES)
        view = View(zk, store, "freshpool-test", lambda *_: None)
        node = store.new_node("debian", "sim", "b1", "debian")
        store.transition(node.id, NodeState.BUILDING, NodeState.TESTING, "created")

        def hand_out_meanwhile() -> None:
            if node.id not in view.shown:
                ready = store.transition(node.id, NodeState.TESTING, NodeState.READY, "tested")
                view.allocate(ready, "200-0000000001", "zuul")

        view.between = hand_out_meanwhile
        view.sync()
        path = f"{wire.NODES}/{wire.node_id(node.id)}"
        assert zk.exists(path) is not None, "the handed-out node's znode was removed"
        assert wire.decode(zk.get(path)[0])["allocated_to"] == "200-0000000001"
        view.between = lambda: None
        view.sync()  # the next sync reads it from the store and keeps it
        assert zk.exists(path) is not None
    finally:
        zk.stop()
        store.close()
