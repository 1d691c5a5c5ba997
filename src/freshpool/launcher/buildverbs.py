"""The operator's verbs on image builds: pause, roll back, delete."""

from __future__ import annotations

import logging
from pathlib import Path

from freshpool.config import Config
from freshpool.core.states import BuildState
from freshpool.images.remove import remove_tree
from freshpool.launcher.builds import ImagingError, owns
from freshpool.store import BuildRow, Store

log = logging.getLogger("freshpool.images")
B = BuildState


def pause(store: Store, config: Config, name: str, reason: str = "") -> None:
    config.image(name)
    store.set_paused(name, True, reason or "paused by operator")


def unpause(store: Store, config: Config, name: str) -> None:
    config.image(name)
    store.set_paused(name, False, "")


def rollback(store: Store, config: Config, name: str) -> tuple[BuildRow, BuildRow]:
    """Retire the serving build of `name` and serve the one before; returns (retired, serving).

    The one before is the newest older ready build, or else the newest older retired
    build still on disk (kept because a node used it).
    """
    config.image(name)
    serving = store.serving_build(name)
    if serving is None:
        raise ImagingError(f"image {name} has no ready build to roll back")
    older = [b for b in store.builds(name) if b.created_at < serving.created_at]
    ready = [b for b in older if b.state == B.READY]
    retired = [b for b in older if b.state == B.RETIRED]
    if not ready and not retired:
        raise ImagingError(
            f"image {name}: no earlier build to roll back to (builds beyond `keep` are"
            f" deleted once no node uses them)"
        )
    if not ready:
        target = store.build_transition(
            retired[0].id, B.RETIRED, B.READY, f"serving again: rolled back from {serving.id}"
        )
    else:
        target = ready[0]
    gone = store.build_transition(
        serving.id, B.READY, B.RETIRED, f"rolled back by operator to {target.id}"
    )
    log.warning("image %s: rolled back from %s to %s", name, serving.id, target.id)
    return gone, target


def delete(store: Store, config: Config, build_id: str) -> BuildRow:
    """Take a build out of service for deletion; it goes as soon as no node uses it."""
    row = store.build(build_id)
    if row.state in (B.BUILDING, B.VALIDATING):
        raise ImagingError(f"build {build_id} is {row.state}: wait for it to finish")
    if row.state == B.DELETED:
        raise ImagingError(f"build {build_id} is already deleted")
    if row.state == B.READY:
        return store.build_transition(build_id, B.READY, B.RETIRED, "deleted by operator")
    if row.state == B.FAILED:
        # Nothing runs from a failed build: its directory can go at once (its layers
        # are swept once no build refers to them).
        if owns(config, Path(row.path)):
            remove_tree(Path(row.path))
        return store.build_transition(build_id, B.FAILED, B.DELETED, "deleted by operator")
    return row
