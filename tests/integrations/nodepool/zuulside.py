"""Zuul's side of the protocol, emulated with kazoo: the znodes and locks Zuul's
`zuul.zk.nodepool.ZooKeeperNodepool` writes and takes, with the JSON of its
`NodeRequest.toDict()` and `Node.toDict()` (Zuul itself would pin this env's
SQLAlchemy below what freshpool needs, so its code is not installed here).

What is emulated, step by step as Zuul does it:
  submit:  create /nodepool/requests/PPP- (sequential) with NodeRequest.toDict()
  accept:  on `fulfilled`, lock every node (/nodepool/nodes/<id>/lock, kazoo's Lock),
           then delete the request
  use:     read the node, set state in-use, write every key back (Node.toDict())
  return:  set state used, write back, unlock
  revise:  `reviseRequest`: only if the request's lock is free, take it, rewrite
           relative_priority (versioned), unlock
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from kazoo.client import KazooClient
from kazoo.recipe.lock import Lock

REQUESTS = "/nodepool/requests"
NODES = "/nodepool/nodes"


def request_dict(
    labels: list[str], tenant_name: str = "tenant-one", relative: int = 0
) -> dict[str, Any]:
    """NodeRequest.toDict() of a new request."""
    return {
        "node_types": labels,
        "requestor": "zuul-scheduler",
        "requestor_data": {"build_set_uuid": uuid.uuid4().hex, "job_name": "tox-py311"},
        "created_time": time.time(),
        "state": "requested",
        "state_time": time.time(),
        "relative_priority": relative,
        "event_id": uuid.uuid4().hex,
        "tenant_name": tenant_name,
        "span_info": None,
        "provider": None,
    }


class ZuulSide:
    def __init__(self, client: KazooClient) -> None:
        self.zk = client
        self.locks: dict[str, Lock] = {}

    def submit(self, labels: list[str], precedence: int = 200, **kwargs: Any) -> str:
        path = self.zk.create(f"{REQUESTS}/{precedence:0>3}-",
                              json.dumps(request_dict(labels, **kwargs)).encode(),
                              makepath=True, sequence=True)  # fmt: skip
        return str(path.rsplit("/", 1)[1])

    def submit_async(self, labels: list[str], precedence: int = 200, **kwargs: Any) -> Any:
        """As `submit`, not waiting: the create's async result (its path)."""
        return self.zk.create_async(f"{REQUESTS}/{precedence:0>3}-",
                                    json.dumps(request_dict(labels, **kwargs)).encode(),
                                    sequence=True)  # fmt: skip

    def submit_raw(self, raw: bytes, precedence: int = 200) -> str:
        path = self.zk.create(f"{REQUESTS}/{precedence:0>3}-", raw, makepath=True, sequence=True)
        return str(path.rsplit("/", 1)[1])

    def request(self, request_id: str) -> dict[str, Any] | None:
        got = self.zk.exists(f"{REQUESTS}/{request_id}")
        if got is None:
            return None
        data, _ = self.zk.get(f"{REQUESTS}/{request_id}")
        try:
            return dict(json.loads(data))
        except ValueError:
            return {"state": "unreadable"}  # a bad znode of ours, not answered yet

    def wait(self, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.request(request_id)
            if data is not None and data["state"] in ("fulfilled", "failed"):
                return data
            time.sleep(0.01)
        raise AssertionError(f"request {request_id} not settled: {self.request(request_id)}")

    def revise(self, request_id: str, relative: int) -> bool:
        """Zuul's reviseRequest: False (nothing written) if someone holds the lock."""
        lock = Lock(self.zk, f"/nodepool/requests-lock/{request_id}")
        if not lock.acquire(blocking=False):
            return False
        try:
            raw, stat = self.zk.get(f"{REQUESTS}/{request_id}")
            data = {**json.loads(raw), "relative_priority": relative}
            self.zk.set(f"{REQUESTS}/{request_id}", json.dumps(data).encode(), stat.version)
            return True
        finally:
            lock.release()

    def accept(self, request_id: str, nodes: list[str]) -> None:
        for node in nodes:
            lock = Lock(self.zk, f"{NODES}/{node}/lock")
            assert lock.acquire(blocking=True, timeout=10)
            self.locks[node] = lock
        self.zk.delete(f"{REQUESTS}/{request_id}")

    def node(self, node: str) -> dict[str, Any]:
        data, _ = self.zk.get(f"{NODES}/{node}")
        return dict(json.loads(data))

    def set_state(self, node: str, state: str) -> None:
        data = {**self.node(node), "id": node, "state": state, "user_data": None}
        self.zk.set(f"{NODES}/{node}", json.dumps(data).encode())

    def give_back(self, nodes: list[str]) -> None:
        for node in nodes:
            self.set_state(node, "used")
            self.locks.pop(node).release()
