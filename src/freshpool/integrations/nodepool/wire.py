"""What Nodepool's znodes hold, read and written as Zuul and Nodepool do: pure data, no I/O.

Zuul writes a request as its `NodeRequest.toDict()` under /nodepool/requests, named
PPP-NNNNNNNNNN (precedence, then ZooKeeper's sequence); a launcher answers in the
same znode and writes one znode per node under /nodepool/nodes. Zuul reads every
key of a node znode into its Node and writes them all back when it changes the
state, so keys we add survive its writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from freshpool.store import NodeRow

ROOT = "/nodepool"
REQUESTS = f"{ROOT}/requests"
REQUEST_LOCKS = f"{ROOT}/requests-lock"
NODES = f"{ROOT}/nodes"
POOLS = f"{ROOT}/components/pool"

# Request states (Nodepool's zk.py).
REQUESTED, PENDING, FULFILLED, FAILED = "requested", "pending", "fulfilled", "failed"
# Node states a client may set.
READY, IN_USE, USED, HOLD, DELETING = "ready", "in-use", "used", "hold", "deleting"

# Zuul's normal precedence (its PRIORITY_MAP): requests with it rank beside
# freshpool's own clients at priority 0; high and low precedence rank above and below
# every relative priority.
NORMAL_PRECEDENCE = 200
MAX_RELATIVE = 999


class BadRequest(ValueError):
    """A request znode we cannot serve as written; the text says why."""


@dataclass(frozen=True)
class ZkRequest:
    id: str
    labels: tuple[str, ...]
    tenant: str
    requestor: str
    priority: int
    # Every key as the client wrote it, kept when we answer in the same znode.
    data: dict[str, Any]


def node_id(freshpool_id: int) -> str:
    """The znode name of a freshpool node: ZooKeeper's ten-digit form, as Nodepool's."""
    return f"{freshpool_id:010d}"


def freshpool_id(name: str) -> int | None:
    return int(name) if name.isdigit() else None


def decode(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request znode is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request znode is JSON {type(data).__name__}, not an object")
    return data


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True).encode()


def parse_request(name: str, data: dict[str, Any]) -> ZkRequest:
    """A request znode's content, checked; BadRequest says what is wrong."""
    types = data.get("node_types")
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise BadRequest(f"node_types must be a non-empty list of label names, not {types!r}")
    relative = data.get("relative_priority", 0)
    if not isinstance(relative, int) or isinstance(relative, bool):
        raise BadRequest(f"relative_priority must be an integer, not {relative!r}")
    tenant = data.get("tenant_name") or ""
    requestor = data.get("requestor") or ""
    for key, value in (("tenant_name", tenant), ("requestor", requestor)):
        if not isinstance(value, str):
            raise BadRequest(f"{key} must be a string, not {value!r}")
    precedence, _, sequence = name.partition("-")
    if not (precedence.isdigit() and sequence.isdigit()):
        raise BadRequest(f"the request's name {name!r} is not PRECEDENCE-SEQUENCE")
    return ZkRequest(
        id=name,
        labels=tuple(types),
        tenant=tenant,
        requestor=requestor,
        priority=priority(int(precedence), relative),
        data=data,
    )


def priority(precedence: int, relative: int) -> int:
    """freshpool's priority (higher first) from Nodepool's order (lower first: the
    name's precedence, then relative_priority)."""
    relative = min(max(relative, 0), MAX_RELATIVE)
    return (NORMAL_PRECEDENCE - precedence) * (MAX_RELATIVE + 1) - relative


def answered(data: dict[str, Any], state: str, **changes: Any) -> dict[str, Any]:
    """The request as the client wrote it, with our answer."""
    return {**data, "state": state, "state_time": time.time(), **changes}


def node_data(
    node: NodeRow, launcher: str, state: str, allocated_to: str | None, requestor: str = ""
) -> dict[str, Any]:
    """A node znode as Nodepool writes it, with the keys Zuul reads."""
    access = node.access or {}
    host = access.get("public_host") or access.get("host") or node.hostname
    port = access.get("public_port") or access.get("port") or 22
    ipv4 = host if _is_ipv4(host) else None
    return {
        "type": [node.label],
        "state": state,
        "state_time": time.time(),
        "allocated_to": allocated_to,
        "interface_ip": host,
        "public_ipv4": ipv4,
        "private_ipv4": access.get("host") if _is_ipv4(access.get("host")) else ipv4,
        "public_ipv6": None,
        "connection_type": "ssh",
        "connection_port": port,
        "host_keys": list(access.get("host_keys") or []),
        "username": access.get("user") or "root",
        "python_path": "auto",
        "shell_type": None,
        "provider": node.provider,
        "cloud": node.provider,
        "region": None,
        "az": None,
        "pool": "freshpool",
        "launcher": launcher,
        "hostname": node.hostname,
        "external_id": node.external_id,
        "image_id": node.build_id,
        "created_time": node.created_at,
        "tenant_name": node.tenant or None,
        "requestor": requestor or None,
        "hold_job": None,
        "comment": None,
        "attributes": {"freshpool-node": node.id},
    }


def _is_ipv4(host: object) -> bool:
    if not isinstance(host, str):
        return False
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)
