"""What the cloud drivers' tests share: a node to make, and many operations advanced
from one loop as the launcher advances them."""

from __future__ import annotations

import time
from typing import Any

from freshpool.drivers.base import NodeSpec, Operation


def node_spec(cluster: str, node_id: int, label: str = "debian") -> NodeSpec:
    return NodeSpec(node_id=node_id, cluster=cluster, label=label, hostname=f"fp-{node_id}",
                    build_id="b1", layers=())  # fmt: skip


def run_all(ops: list[Operation[Any]], timeout: float = 60) -> None:
    """Advance every operation from one loop, as the launcher does."""
    deadline = time.monotonic() + timeout
    while not all(op.done for op in ops):
        assert time.monotonic() < deadline, "operations not done in time"
        now = time.monotonic()
        for op in ops:
            if not op.done and now >= op.not_before:
                op.advance()
        time.sleep(0.002)
