"""Build an image's layer stack: its base, then each planned layer, reused from the cache or built.

The base is a debootstrap layer (images/debootstrap.py) or a parent image's whole
stack. On it go, each as one layer made in a build node (images/steps.py): the files
to copy in, every step in order, and the pre-fetch downloads (images/plan.py says
which, and the cache key of each). The manifest (images/manifest.py) describes it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freshpool.config import Image
from freshpool.images import debootstrap
from freshpool.images.base import base_image
from freshpool.images.buildlog import BuildLog, Progress
from freshpool.images.buildnode import Cancelled
from freshpool.images.errors import BuildCancelled, ImageBuildError
from freshpool.images.layers import Layer, LayerStore, TreeStats, digest_tree
from freshpool.images.manifest import (
    DoneLayer,
    StackBuild,
    stack_manifest,
    stack_size,
    write_stack_manifest,
)
from freshpool.images.plan import (
    ParentStack,
    PlannedLayer,
    base_key,
    cache_key,
    late_layers,
    plan_layers,
)
from freshpool.images.remove import remove_tree
from freshpool.images.retry import ATTEMPTS, base_delay
from freshpool.images.steps import StepRunner

LOG = "build.log"
MANIFEST = "manifest.json"
BASE_MEMO = "rootfs.layer.json"

# Called after each layer with the stack so far (top first) and its top digest.
OnLayers = Callable[[list[Path], str], None]


@dataclass
class BuildOptions:
    # Ignore cached layers (a rebuild for freshness: new packages, new clones).
    fresh: bool = False
    # Tests and benchmarks: take debootstrap bases from this build_cached() directory.
    base_cache: Path | None = None
    # Where debootstrap keeps the .debs it downloaded, for the next base.
    debootstrap_cache: Path | None = None
    attempts: int = ATTEMPTS
    retry_delay: float | None = None
    cancel: threading.Event | None = None
    progress: Progress | None = None
    # So that the layers of a build still running are known as in use and nothing
    # sweeps them.
    on_layers: OnLayers | None = None
    # Why this build runs (requested, definition changed, ...), for the log and manifest.
    why: str = ""


def build_stack(
    image: Image,
    layers: LayerStore,
    build_dir: Path,
    parent: ParentStack | None = None,
    options: BuildOptions | None = None,
) -> dict[str, Any]:
    """Build `image`'s layers into `layers`; write build_dir/build.log and manifest.json.

    Returns the manifest. Raises ImageBuildError naming the stage (a step's name),
    the exit code and the end of the log; the partial layer of a failed step is
    removed, and the layers made before it stay cached for the next try.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    return _Pipeline(image, layers, build_dir, parent, options or BuildOptions()).run()


class _Pipeline:
    def __init__(
        self,
        image: Image,
        layers: LayerStore,
        build_dir: Path,
        parent: ParentStack | None,
        options: BuildOptions,
    ) -> None:
        self.image = image
        self.store = layers
        self.build_dir = build_dir
        self.parent = parent
        self.options = options
        self.retry_delay = base_delay(options.retry_delay)
        self.log = BuildLog(options.progress, "start")
        self.steps = StepRunner(
            layers,
            self.log,
            image.name,
            attempts=max(1, options.attempts),
            retry_delay=self.retry_delay,
            cancel=options.cancel,
        )
        self.done: list[DoneLayer] = []
        # Layer directories built on so far, top first.
        self.stack: list[Path] = list(parent.layers) if parent is not None else []
        self.top = parent.digest if parent is not None else ""
        self.timings: dict[str, float] = {}

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.log.file = open(self.build_dir / LOG, "a")  # noqa: SIM115 - closed in finally
        try:
            self._introduce()
            for planned in plan_layers(self.image):
                self._layer(planned)
            built = [d.layer.path for d in self.done if d.kind != "base"]
            for planned in late_layers(self.image, self.parent, built):
                self._layer(planned)
            manifest = self._finish(time.monotonic() - started)
        except ImageBuildError as exc:
            self.log.line(f"FAILED: {exc.summary}")
            raise
        except Cancelled as exc:
            error = BuildCancelled(
                self.log.stage, f"interrupted: {exc}", log_tail=list(self.log.recent)
            )
            self.log.line(f"FAILED: {error.summary}")
            raise error from None
        except BaseException as exc:
            self.log.line(f"FAILED: {type(exc).__name__}: {exc}")
            raise
        finally:
            if self.log.file is not None:
                self.log.file.close()
                self.log.file = None
        return manifest

    def _introduce(self) -> None:
        """Say what this build is and what it starts from; build the base if it has one."""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        self.log.line(f"=== {stamp} build of image {self.image.name} in {self.build_dir}")
        if self.options.why:
            fresh = " (fresh: no cached layers)" if self.options.fresh else ""
            self.log.line(f"why: {self.options.why}{fresh}")
        if self.parent is None:
            self._base()
        else:
            self.log.line(
                f"parent: image {self.parent.image}, build {self.parent.build_id}"
                f" ({len(self.parent.layers)} layers, top {self.parent.digest})"
            )

    # ------------------------------------------------------------------ the base

    def _base(self) -> None:
        key = base_key(self.image)
        base = base_image(self.image)
        began = time.monotonic()
        self.log.start(
            "base", f"debootstrap {base.suite} ({base.variant}) + {len(base.packages)} packages"
        )
        cached = False
        if self.options.base_cache is not None:
            layer = self._linked_base(base, key, self.options.base_cache)
            cached = True
        elif not self.options.fresh and (found := self.store.lookup(key)) is not None:
            layer, cached = found, True
        else:
            layer = self._debootstrap(base, key)
        manifest = layer.about.get("manifest", {})
        self.log.emit(
            f"base layer {layer.digest}{' (cached)' if cached else ''}:"
            f" {layer.size_bytes / 1e6:.1f} MB, {len(manifest.get('installed', {}))} packages"
        )
        self._add(DoneLayer(layer, "base", "base", key, key, cached, time.monotonic() - began))

    def _linked_base(self, base: Image, key: str, cache_root: Path) -> Layer:
        cached = debootstrap.build_cached(base, cache_root, self._forward)
        # The cached tree never changes, so its digest is computed once and kept beside it.
        memo = cached / BASE_MEMO
        try:
            stats = TreeStats(**json.loads(memo.read_text()))
        except (OSError, ValueError, TypeError):
            stats = digest_tree(cached / debootstrap.ROOTFS)
            temporary = memo.with_name(f".{memo.name}.{os.getpid()}")
            temporary.write_text(json.dumps(stats.__dict__))
            os.replace(temporary, memo)
        about = {
            "kind": "base",
            "manifest": json.loads((cached / debootstrap.MANIFEST).read_text()),
        }
        return self.store.link(cached / debootstrap.ROOTFS, key, about, stats)

    def _debootstrap(self, base: Image, key: str) -> Layer:
        scratch = self.store.scratch()
        try:
            manifest = debootstrap.build_image(
                base,
                scratch / "base",
                cache_dir=self.options.debootstrap_cache,
                progress=self._forward,
                attempts=self.options.attempts,
                retry_delay=self.retry_delay,
            )
            self.log.stage = "base"
            rootfs = scratch / "base" / debootstrap.ROOTFS
            return self.steps.commit(rootfs, key, {"kind": "base", "manifest": manifest})
        finally:
            remove_tree(scratch)

    def _forward(self, stage: str, line: str) -> None:
        """Progress from the base builder: into this build's log, and a chance to stop."""
        if self.options.cancel is not None and self.options.cancel.is_set():
            raise Cancelled("the build was stopped")
        self.log.stage = f"base: {stage}"
        self.log.emit(line)

    # ------------------------------------------------------------------ the layers

    def _layer(self, planned: PlannedLayer) -> None:
        self.log.start(planned.name, _first_line(planned.script))
        key = cache_key(self.top, planned.kind, planned.content)
        began = time.monotonic()
        found = None if self.options.fresh else self.store.lookup(key)
        if found is not None:
            self.log.emit(f"cached: layer {found.digest} ({found.size_bytes / 1e6:.1f} MB)")
            self._add(DoneLayer(found, planned.kind, planned.name, key, planned.content, True, 0.0))
            return
        layer = self.steps.build(planned, key, self.stack)
        seconds = time.monotonic() - began
        self.log.emit(
            f"layer {layer.digest}: {layer.size_bytes / 1e6:.1f} MB,"
            f" {layer.entries} entries, {seconds:.1f} s"
        )
        self._add(
            DoneLayer(layer, planned.kind, planned.name, key, planned.content, False, seconds)
        )

    def _add(self, done: DoneLayer) -> None:
        self.done.append(done)
        self.stack.insert(0, done.layer.path)
        self.top = done.layer.digest
        self.timings[done.name] = round(done.seconds, 3)
        if self.options.on_layers is not None:
            self.options.on_layers(list(self.stack), self.top)

    def _finish(self, seconds: float) -> dict[str, Any]:
        self.log.start("finish", "writing the manifest")
        build = StackBuild(
            image=self.image,
            why=self.options.why,
            fresh=self.options.fresh,
            parent=self.parent,
            done=self.done,
            stack=self.stack,
            top=self.top,
            timings=self.timings,
            seconds=seconds,
            log=self.build_dir / LOG,
        )
        manifest = stack_manifest(build)
        write_stack_manifest(self.build_dir / MANIFEST, manifest)
        new = [d for d in self.done if not d.cached]
        self.log.emit(
            f"image {self.image.name}: {len(self.stack)} layers,"
            f" {stack_size(build) / 1e6:.0f} MB; {len(new)} built,"
            f" {len(self.done) - len(new)} cached, in {seconds:.1f} s"
        )
        return manifest


def _first_line(script: str) -> str:
    lines = [line.strip() for line in script.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" ..." if len(lines) > 1 else "")
