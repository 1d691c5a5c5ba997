"""Image garbage: builds beyond `keep` retired, builds nothing uses deleted (uploads,
directory), unused layers swept, and the ready nodes of a retired build replaced."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import time
from collections import Counter
from pathlib import Path

from freshpool.config import Config
from freshpool.core.errors import NotFound, StaleState
from freshpool.core.states import BuildState, NodeState, UploadState
from freshpool.images.remove import remove_tree
from freshpool.launcher.builds import layer_store, owns
from freshpool.launcher.uploads import Uploads
from freshpool.store import BuildRow, Store, UploadRow

log = logging.getLogger("freshpool.images")
B = BuildState
U = UploadState
# Failed builds kept (with their logs and cached layers) while newer than the serving one.
FAILED_KEPT = 3
# Unused layers are swept after a build is deleted, and this often for leftovers.
SWEEP_INTERVAL = 300.0


class Garbage:
    def __init__(self, config: Config, store: Store, uploads: Uploads) -> None:
        self.config = config
        self.store = store
        self.uploads = uploads
        self.layers = layer_store(config)
        self._sweep_due = True
        self._next_sweep = 0.0

    def collect(self, building: bool) -> None:
        """Retire builds beyond `keep`, delete what nothing uses, sweep unused layers
        (not while a build runs: its layers are not recorded yet)."""
        in_use = self.store.nodes_per_build()
        builds = self.store.builds()
        live = [b for b in builds if b.state != B.DELETED]
        parents = {b.parent_build for b in live if b.parent_build}
        by_image: dict[str, list[BuildRow]] = {}
        for build in builds:
            by_image.setdefault(build.image, []).append(build)
        for name, rows in by_image.items():
            image = next((i for i in self.config.images if i.name == name), None)
            keep = image.keep if image is not None else 0
            ready = [b for b in rows if b.state == B.READY]
            for build in ready[keep:]:
                with contextlib.suppress(StaleState):
                    self.store.build_transition(
                        build.id, B.READY, B.RETIRED, f"beyond keep ({keep})"
                    )
                    build = self.store.build(build.id)
                    log.info("image %s: build %s retired (beyond keep %d)", name, build.id, keep)
            rows = self.store.builds(name)
            serving = next((b for b in rows if b.state == B.READY), None)
            failed = [b for b in rows if b.state == B.FAILED]
            for build in rows:
                if in_use.get(build.id) or build.id in parents:
                    continue
                old_failure = build.state == B.FAILED and (
                    (serving is not None and build.created_at < serving.created_at)
                    or build in failed[FAILED_KEPT:]
                )
                if build.state == B.RETIRED or old_failure:
                    self._delete_build(build)
        now = time.monotonic()
        if not building and (self._sweep_due or now >= self._next_sweep):
            self._sweep_due = False
            self._next_sweep = now + SWEEP_INTERVAL
            self._sweep_layers(in_use)

    def _delete_build(self, build: BuildRow) -> None:
        for upload in self.store.uploads(build_id=build.id):
            current: UploadRow | None = upload
            if upload.state in (U.READY, U.FAILED):
                current = self.uploads.move(upload, U.DELETING, f"build {build.id} is deleted")
            if current is not None:
                self.uploads.remove(current)
        if self.store.uploads(build_id=build.id):
            return  # the next plan looks again once the providers confirm
        self._discard_dir(Path(build.path))
        with contextlib.suppress(StaleState):
            self.store.build_transition(
                build.id, B(build.state), B.DELETED, f"deleted: {build.reason}"[:500]
            )
            log.info("image %s: build %s deleted", build.image, build.id)
        self._sweep_due = True

    def _discard_dir(self, path: Path) -> None:
        # A build registered from elsewhere (a prebuilt tree) is not ours to delete.
        if not path.exists() or not owns(self.config, path):
            return
        self.layers.trash.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, self.layers.trash / f"build-{path.name}.{secrets.token_hex(4)}")
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            remove_tree(path)
        self.layers.empty_trash()

    def _sweep_layers(self, in_use: Counter[str]) -> None:
        """Remove layers no build refers to (deleted builds still count while nodes run)."""
        referenced: set[str] = set()
        for build in self.store.builds():
            if build.state != B.DELETED or in_use.get(build.id):
                referenced.update(Path(p).name for p in build.layers or [])
        unused = [layer.digest for layer in self.layers.layers() if layer.digest not in referenced]
        if unused:
            self.layers.discard(unused)
            log.info("removed %d unused image layers", len(unused))

    def replace_retired_ready_nodes(self) -> None:
        """A retired build serves no more jobs: its ready nodes are deleted (and replaced)."""
        ready = self.store.nodes(states_in=[NodeState.READY])
        states: dict[str, str] = {}
        for build_id in {n.build_id for n in ready}:
            with contextlib.suppress(NotFound):
                states[build_id] = self.store.build(build_id).state
        for node in ready:
            if states.get(node.build_id) in (B.RETIRED, B.DELETED):
                with contextlib.suppress(StaleState):
                    self.store.transition(
                        node.id,
                        NodeState.READY,
                        NodeState.DELETING,
                        f"image build {node.build_id} was retired",
                    )
                    log.info("node %s: replaced (build %s retired)", node.id, node.build_id)
