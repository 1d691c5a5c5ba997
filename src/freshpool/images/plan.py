"""Plan the layers an image needs on its base, each with the cache key that finds it again.

A layer's cache key is the digest of the layer below plus what defines the layer
(its script, environment, file contents), so an unchanged step reuses its layer and
a change redoes that step and those after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freshpool.config import Image
from freshpool.images.base import base_image
from freshpool.images.buildnode import INPUTS
from freshpool.images.errors import ImageBuildError
from freshpool.images.layers import digest_tree

# Part of every cache key: bump when the same step would now make a different layer.
LAYER_FORMAT = 1
WHEELS_DIR = "/var/cache/freshpool/wheels"
# A file to copy in: where it goes, its bytes (inline content) or its path on the host,
# and the mode it gets (None: 0644 for content, the source's own for a path).
FileEntry = tuple[str, bytes | Path, int | None]


@dataclass(frozen=True)
class ParentStack:
    """What a child image builds on: a ready build of its parent image."""

    image: str
    build_id: str
    # Layer directories, top first.
    layers: tuple[Path, ...]
    # The top layer's digest; the cache keys of the child's layers start from it.
    digest: str
    # apt packages pre-fetched in those layers: a child that updates the package
    # lists fetches them again, or they would not install offline.
    prefetch: tuple[str, ...] = ()
    size_bytes: int = 0


@dataclass(frozen=True)
class PlannedLayer:
    kind: str
    name: str
    script: str
    env: dict[str, str]
    timeout: float
    # Hash of what defines this layer beyond the layer below it.
    content: str
    files: tuple[FileEntry, ...] = ()


def cache_key(parent_digest: str, kind: str, content: str) -> str:
    text = json.dumps([LAYER_FORMAT, parent_digest, kind, content])
    return hashlib.sha256(text.encode()).hexdigest()


def base_key(image: Image) -> str:
    """The cache key of a debootstrap base: its definition, whatever the image's name."""
    base = base_image(image).model_dump(mode="json")
    base.pop("name")
    return cache_key("debootstrap", "base", stable_hash(base))


def stable_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def effective_prefetch(image: Image, parent: ParentStack | None) -> list[str]:
    """apt packages that must install offline on this image: its own and its parents'."""
    inherited = list(parent.prefetch) if parent is not None else []
    return list(dict.fromkeys([*inherited, *image.prefetch]))


def plan_layers(image: Image) -> list[PlannedLayer]:
    """The layers of the files to copy in and of each step, in build order."""
    plan: list[PlannedLayer] = []
    env = {**image.env}
    if image.files:
        entries, content = _files(image)
        script = f"tar -x -p --same-owner --no-overwrite-dir -C / -f {INPUTS}/files.tar\n"
        plan.append(PlannedLayer("files", "files", script, {}, 600.0, content, entries))
    for i, step in enumerate(image.steps, 1):
        step_env = {**env, **step.env}
        content = stable_hash({"run": step.run, "env": step_env})
        name = f"step {i}/{len(image.steps)}" + (f" ({step.name})" if step.name else "")
        plan.append(PlannedLayer("step", name, step.run, step_env, step.timeout, content))
    return plan


def late_layers(image: Image, parent: ParentStack | None, built: list[Path]) -> list[PlannedLayer]:
    """The pre-fetch layers, planned once the steps are built (`built`: their layers).

    They go last so that they match the package lists the steps left.
    """
    plan: list[PlannedLayer] = []
    packages = effective_prefetch(image, parent)
    lists_changed = any(_changes_package_lists(path) for path in built)
    if packages and ((parent is not None and image.prefetch) or lists_changed):
        words = " ".join(shlex.quote(p) for p in packages)
        # Lists a step of this build fetched are the ones to match; older ones (a
        # parent's) may name versions the mirror no longer has.
        update = "" if lists_changed else "apt-get update --error-on=any\n"
        script = f"{update}apt-get install --download-only -y {words}\n"
        content = stable_hash({"script": script, "packages": packages})
        plan.append(PlannedLayer("prefetch", "prefetch apt", script, {}, 1800.0, content))
    if image.prefetch_wheels:
        specs = " ".join(shlex.quote(s) for s in image.prefetch_wheels)
        script = (
            "if command -v pip3 >/dev/null 2>&1; then pip=pip3\n"
            "elif python3 -m pip --version >/dev/null 2>&1; then pip='python3 -m pip'\n"
            "else echo 'prefetch-wheels needs pip in the image:"
            " add python3-pip to packages or to a step' >&2; exit 127; fi\n"
            f"mkdir -p {WHEELS_DIR}\n"
            "$pip download --no-cache-dir --disable-pip-version-check"
            f" --dest {WHEELS_DIR} {specs}\n"
        )
        content = stable_hash({"wheels": image.prefetch_wheels, "env": image.env})
        plan.append(
            PlannedLayer("wheels", "prefetch wheels", script, dict(image.env), 1800.0, content)
        )
    return plan


def _files(image: Image) -> tuple[tuple[FileEntry, ...], str]:
    """The files to copy in, and a hash of their destinations, modes and contents."""
    described = []
    entries: list[FileEntry] = []
    for item in image.files:
        mode = int(item.mode, 8) if item.mode else None
        if item.content is not None:
            data = item.content.encode()
            described.append([item.dest, item.mode, hashlib.sha256(data).hexdigest()])
            entries.append((item.dest, data, mode))
            continue
        source = item.source
        assert source is not None  # the config allows exactly one of content and source
        if source.is_dir():
            summary = digest_tree(source).digest
        elif source.is_file():
            summary = hashlib.sha256(source.read_bytes()).hexdigest()
        else:
            raise ImageBuildError("files", f"{source} (for {item.dest}) does not exist")
        described.append([item.dest, item.mode, summary])
        entries.append((item.dest, source, mode))
    return tuple(entries), stable_hash(described)


def _changes_package_lists(layer: Path) -> bool:
    """Whether a layer holds new apt package lists (an `apt-get update` that fetched some)."""
    lists = layer / "var/lib/apt/lists"
    try:
        names = os.listdir(lists)
    except OSError:
        return False
    return any(name.endswith(("Packages", "Release", "Packages.lz4")) for name in names)
