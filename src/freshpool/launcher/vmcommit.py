"""`freshpool image commit`: a held VM node's disk becomes a new build of an image."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

from freshpool.config import Config, Provider
from freshpool.core.errors import Refused
from freshpool.core.states import BuildState, NodeState
from freshpool.drivers.base import DriverError, Operation, load_driver
from freshpool.launcher import builds
from freshpool.store import BuildRow, NodeRow, Store

log = logging.getLogger("freshpool.images")
# Drivers whose nodes boot from a disk that commit() can fold into a new base.
DISK_DRIVERS = ("qemu",)


class CommitRefused(Refused):
    """The node or image cannot be committed; the message says why and what to do."""


class _Committer(Protocol):
    def commit(self, external_id: str, target: Path, build_id: str) -> Operation: ...


def commit_node(
    config: Config, store: Store, node_id: int, image: str | None = None, timeout: float = 600
) -> BuildRow:
    """Fold held node `node_id`'s disk into a new ready build of `image` (default: its own).

    The node's VM is shut down for a clean disk, so the node is then marked used
    (and deleted by the launcher): it cannot serve anyone again anyway.
    """
    node = store.node(node_id)
    provider, name = _committable(config, store, node, image)
    assert node.external_id is not None  # _committable refuses a node without one
    build_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-node{node_id}"
    path = builds.images_dir(config) / name / build_id
    # The qemu driver, which _committable made sure of, has commit().
    driver: _Committer = load_driver(provider, store.cluster_id, config.state_dir)  # type: ignore[assignment]
    store.new_build(build_id, name, str(path), parent_build=node.build_id)
    log.info("node %s: committing its disk as build %s of image %s", node_id, build_id, name)
    try:
        disk = driver.commit(node.external_id, path, build_id).wait(timeout)
    except BaseException as exc:
        why = str(exc) if isinstance(exc, DriverError | TimeoutError) else "interrupted"
        store.build_transition(build_id, BuildState.BUILDING, BuildState.FAILED, why)
        raise
    manifest = {
        "image": name,
        "kind": "vm-commit",
        "from_node": node_id,
        "from_build": node.build_id,
        "provider": node.provider,
        "disk": str(disk),
        "size_bytes": disk.stat().st_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    row = store.build_transition(
        build_id,
        BuildState.BUILDING,
        BuildState.READY,
        f"committed from node {node_id}",
        manifest=manifest,
    )
    store.transition(node_id, NodeState.HOLD, NodeState.USED, f"disk committed as {build_id}")
    return row


def _committable(
    config: Config, store: Store, node: NodeRow, image: str | None
) -> tuple[Provider, str]:
    """The node's provider and the image to commit into; CommitRefused, saying why,
    when the node or the image cannot take a committed disk."""
    node_id = node.id
    if node.state != NodeState.HOLD:
        raise CommitRefused(
            f"node {node_id} is {node.state}: only a held node can be committed"
            f" (freshpool hold {node_id} first)"
        )
    provider = next((p for p in config.providers if p.name == node.provider), None)
    if provider is None or provider.driver not in DISK_DRIVERS:
        driver_name = provider.driver if provider else "unknown"
        raise CommitRefused(
            f"node {node_id} runs on provider {node.provider!r} (driver {driver_name}):"
            f" only nodes of {', '.join(DISK_DRIVERS)} providers have a disk to commit"
        )
    if not node.external_id:
        raise CommitRefused(f"node {node_id} has no instance yet")
    name = image or store.build(node.build_id).image
    config.image(name)
    # Every provider that launches this image must be able to boot a VM disk.
    for label in config.labels:
        if label.image != name:
            continue
        for other in config.providers_for(label.name):
            if other.driver not in DISK_DRIVERS:
                raise CommitRefused(
                    f"image {name!r} also serves label {label.name!r} on provider"
                    f" {other.name!r} (driver {other.driver}), which cannot boot a VM disk:"
                    " commit into an image only qemu providers use (--image NAME)"
                )
    return provider, name
