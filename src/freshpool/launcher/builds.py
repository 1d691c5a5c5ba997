"""Image builds as the store sees them: which image is due for a build, and running one.

A build goes building -> validating -> ready -> retired -> deleted, or failed. The
image controller (images.py) drives builds from the launcher's loop; `freshpool image
build` runs one in the foreground when no `serve` does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from freshpool.config import Config, Image, UnknownName
from freshpool.core.backoff import FAILED_BUILD
from freshpool.core.errors import Refused
from freshpool.core.states import BuildState
from freshpool.images.buildlog import Progress
from freshpool.images.errors import BuildCancelled, ImageBuildError
from freshpool.images.layers import LayerStore
from freshpool.images.pipeline import BuildOptions, build_stack
from freshpool.images.plan import LAYER_FORMAT, ParentStack, effective_prefetch, stable_hash
from freshpool.store import BuildRow, StaleState, Store

log = logging.getLogger("freshpool.images")
B = BuildState
INTERRUPTED = "interrupted"


class ImagingError(Refused):
    """An operator's request that cannot be done; the message says why."""


@dataclass(frozen=True)
class Due:
    """An image that should be built now, and why."""

    image: str
    why: str
    fresh: bool = False
    requested: bool = False


def images_dir(config: Config) -> Path:
    return config.state_dir / "images"


def layer_store(config: Config) -> LayerStore:
    return LayerStore(config.state_dir / "layers")


def owns(config: Config, path: Path) -> bool:
    """Whether `path` is under the state dir's images, so deleting a build may remove it."""
    mine = os.path.realpath(images_dir(config))
    return os.path.realpath(path).startswith(mine + os.sep)


def in_build_order(config: Config) -> list[Image]:
    """Every image, each after its parent."""
    ordered: list[Image] = []
    placed: set[str] = set()
    pending = list(config.images)
    while pending:
        progress = False
        for image in list(pending):
            if image.parent is None or image.parent in placed:
                ordered.append(image)
                placed.add(image.name)
                pending.remove(image)
                progress = True
        if not progress:  # a parent loop: the config check reports it
            ordered += pending
            break
    return ordered


def needed_images(config: Config) -> set[str]:
    """Images some label uses, and their parents."""
    needed: set[str] = set()
    for label in config.labels:
        name: str | None = label.image
        while name is not None and name not in needed:
            needed.add(name)
            try:
                name = config.image(name).parent
            except UnknownName:
                break
    return needed


def definition_key(image: Image, parent: BuildRow | None) -> str:
    """A hash of everything a build of `image` is made from, as far as the config tells.

    File sources count by size and modification time (hashing their content is the
    build's job); a parent counts by the build it would start from.
    """
    data = image.model_dump(mode="json", exclude={"rebuild_age", "keep"})
    data["file_stats"] = [list(_stats(Path(f.source))) for f in image.files if f.source]
    data["parent_build"] = parent.id if parent is not None else None
    data["layer_format"] = LAYER_FORMAT
    return stable_hash(data)


def _stats(path: Path) -> Iterator[tuple[str, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        yield (str(path), -1, -1)
        return
    yield (str(path), st.st_size, st.st_mtime_ns)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                yield from _stats(Path(root) / name)


def parent_stack(config: Config, store: Store, image: Image, build_id: str) -> ParentStack:
    """The layers a child image builds on: its parent's build `build_id`."""
    build = store.build(build_id)
    parent_image = config.image(image.parent) if image.parent else None
    prefetch = effective_prefetch(parent_image, None) if parent_image else []
    # The parent's own parents pre-fetched too; their packages must stay installable.
    ancestor = parent_image.parent if parent_image else None
    while ancestor is not None:
        ancestor_image = config.image(ancestor)
        prefetch = list(dict.fromkeys([*ancestor_image.prefetch, *prefetch]))
        ancestor = ancestor_image.parent
    return ParentStack(
        image=build.image,
        build_id=build.id,
        layers=build.layer_paths(),
        # Builds from before layers had digests are named by their id instead.
        digest=build.digest or f"build:{build.id}",
        prefetch=tuple(prefetch),
        size_bytes=int((build.manifest or {}).get("size_bytes", 0)),
    )


# ------------------------------------------------------------------ what to build


def due_builds(
    config: Config, store: Store, automatic: bool, now: float | None = None
) -> list[Due]:
    """Images to build now, parents first: requested ones, then (if `automatic`) those
    with no ready build, a changed definition, a failed last try whose wait is over, or
    a newest good build older than rebuild-age."""
    now = time.time() if now is None else now
    needed = needed_images(config)
    due: list[Due] = []
    for image in in_build_order(config):
        flags = store.image_row(image.name)
        if flags.paused:
            continue
        builds = store.builds(image.name)
        if any(b.state in (B.BUILDING, B.VALIDATING) for b in builds):
            continue
        parent = store.serving_build(image.parent) if image.parent else None
        if image.parent and parent is None:
            continue  # the parent is built first
        if flags.build_requested_at is not None:
            due.append(Due(image.name, "requested", fresh=flags.build_fresh, requested=True))
            continue
        if not automatic or image.name not in needed:
            continue
        reason = _automatic_reason(image, builds, parent, flags.built_at, store, now)
        if reason is not None:
            due.append(Due(image.name, reason[0], fresh=reason[1]))
    return due


def _automatic_reason(
    image: Image,
    builds: list[BuildRow],
    parent: BuildRow | None,
    built_at: float | None,
    store: Store,
    now: float,
) -> tuple[str, bool] | None:
    newest = builds[0] if builds else None
    if newest is not None and newest.state == B.FAILED and not _interrupted(newest):
        failures = 0
        for b in builds:
            if b.state != B.FAILED:
                break
            failures += 0 if _interrupted(b) else 1
        wait = FAILED_BUILD.delay(failures - 1)
        if image.rebuild_age is not None:
            wait = min(wait, image.rebuild_age)
        if now - newest.state_at < wait:
            return None
    serving = store.serving_build(image.name)
    if serving is None:
        return ("it has no ready build", False)
    assert newest is not None
    key = definition_key(image, parent)
    # Builds from before definitions were recorded have no key: only age rebuilds them.
    if newest.definition_key and newest.definition_key != key:
        return ("its definition changed", False)
    if newest.state == B.FAILED:
        return ("its last build failed", False)
    since = built_at if built_at is not None else serving.created_at
    if image.rebuild_age is not None and now - since > image.rebuild_age:
        return (f"its newest build is older than rebuild-age ({image.rebuild_age:g} s)", True)
    return None


def _interrupted(build: BuildRow) -> bool:
    """A build stopped from outside (serve stopping) failed through no fault of its own."""
    return build.reason.startswith(INTERRUPTED)


def start_build(config: Config, store: Store, due: Due) -> BuildRow:
    """The build row for a due image (raises BuildInProgress if one is unfinished)."""
    image = config.image(due.image)
    parent = store.serving_build(image.parent) if image.parent else None
    if image.parent and parent is None:
        raise ImagingError(f"image {image.name}: its parent {image.parent} has no ready build")
    why = f"{due.why}{' (fresh)' if due.fresh else ''}"
    row = store.start_build(
        image.name,
        images_dir(config),
        definition_key(image, parent),
        parent.id if parent else None,
        reason=why,
    )
    log.info("image %s: build %s started: %s", image.name, row.id, why)
    return row


def run_build(
    config: Config,
    store: Store,
    row: BuildRow,
    *,
    fresh: bool = False,
    base_cache: Path | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> BuildRow:
    """Build the layers of a `building` row; it ends `validating`, or `failed` with the reason."""
    image = config.image(row.image)
    try:
        parent = parent_stack(config, store, image, row.parent_build) if row.parent_build else None
        options = BuildOptions(
            fresh=fresh,
            base_cache=base_cache,
            debootstrap_cache=config.state_dir / "cache" / "debootstrap",
            cancel=cancel,
            progress=progress,
            why=row.reason,
            on_layers=lambda layers, top: store.record_layers(
                row.id, [str(p) for p in layers], top
            ),
        )
        manifest = build_stack(image, layer_store(config), Path(row.path), parent, options)
    except BuildCancelled as exc:
        log.warning("image %s: build %s stopped in %s", row.image, row.id, exc.stage)
        why = f"{INTERRUPTED} in {exc.stage}: freshpool stopped during the build"
        return store.build_transition(row.id, B.BUILDING, B.FAILED, why)
    except ImageBuildError as exc:
        log.error("image %s: build %s failed: %s", row.image, row.id, exc.summary)
        return store.build_transition(row.id, B.BUILDING, B.FAILED, str(exc))
    except Exception as exc:
        log.exception("image %s: build %s failed", row.image, row.id)
        return store.build_transition(row.id, B.BUILDING, B.FAILED, f"{type(exc).__name__}: {exc}")
    log.info("image %s: build %s built; validating", row.image, row.id)
    return store.build_transition(
        row.id,
        B.BUILDING,
        B.VALIDATING,
        "built; validating on a fresh node",
        manifest=manifest,
        layers=manifest["stack"],
        digest=manifest["digest"],
    )


def fail_interrupted(store: Store, why: str) -> list[BuildRow]:
    """Mark builds left `building` by a process that stopped; nothing can finish them."""
    failed = []
    for row in store.builds(states_in=[B.BUILDING]):
        try:
            failed.append(store.build_transition(row.id, B.BUILDING, B.FAILED, why))
            log.warning("image %s: build %s: %s", row.image, row.id, why)
        except StaleState:
            continue
    return failed
