"""Compose the manifest.json that describes a finished build, a base or a layer stack."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from freshpool.config import Image
from freshpool.images import dpkg
from freshpool.images.base import content_key
from freshpool.images.layers import Layer, merged_entry, merged_listdir
from freshpool.images.plan import LAYER_FORMAT, WHEELS_DIR, ParentStack

# Bump when a change to the debootstrap stages changes what a base contains.
BUILDER_VERSION = 1


@dataclass
class DoneLayer:
    """A layer of the stack being built, and how it came to be there."""

    layer: Layer
    kind: str
    name: str
    key: str
    content: str
    cached: bool
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {
            "digest": self.layer.digest,
            "kind": self.kind,
            "name": self.name,
            "key": self.key,
            "content": self.content,
            "cached": self.cached,
            "size_bytes": self.layer.size_bytes,
            "disk_bytes": self.layer.disk_bytes,
            "entries": self.layer.entries,
            "seconds": round(self.seconds, 3),
        }


def base_manifest(
    image: Image,
    *,
    mirror: str,
    installed: dict[str, str],
    prefetched: dict[str, int],
    size: int,
    count: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a debootstrap base (images/debootstrap.py)."""
    return {
        "image": image.name,
        "suite": image.suite,
        "mirror": mirror,
        "variant": image.variant,
        "packages": list(image.packages),
        "prefetch": list(image.prefetch),
        "architecture": dpkg.architecture(),
        "installed": dict(sorted(installed.items())),
        "prefetched": prefetched,
        "prefetch_bytes": sum(prefetched.values()),
        "size_bytes": size,
        "file_count": count,
        "created": _now(),
        "timings": timings,
        "builder_version": BUILDER_VERSION,
        "freshpool_version": freshpool_version(),
        "content_key": content_key(image),
    }


def write_base_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write it durably: a base's manifest is the mark that the base is complete."""
    temporary = path.with_suffix(".json.tmp")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temporary, path)


@dataclass(frozen=True)
class StackBuild:
    """What the manifest of a layer stack is made from."""

    image: Image
    why: str
    fresh: bool
    parent: ParentStack | None
    done: list[DoneLayer]
    # Layer directories, top first, the parent's included.
    stack: list[Path]
    top: str
    timings: dict[str, float]
    seconds: float
    log: Path


def stack_manifest(build: StackBuild) -> dict[str, Any]:
    """The manifest of an image's layer stack (images/pipeline.py)."""
    done, parent = build.done, build.parent
    archives = merged_listdir(build.stack, "var/cache/apt/archives")
    return {
        "image": build.image.name,
        "why": build.why,
        "fresh": build.fresh,
        "digest": build.top,
        "parent": _parent(parent),
        "base": _base(done),
        "layers": [d.describe() for d in done],
        "stack": [str(p) for p in build.stack],
        "installed": _installed(build.stack),
        "prefetched": {
            "apt": [name for name in archives if name.endswith(".deb")],
            "wheels": merged_listdir(build.stack, WHEELS_DIR.lstrip("/")),
        },
        "size_bytes": stack_size(build),
        "disk_bytes": sum(d.layer.disk_bytes for d in done),
        "new_bytes": sum(d.layer.disk_bytes for d in done if not d.cached),
        "timings": {**build.timings, "total": round(build.seconds, 3)},
        "log": str(build.log),
        "created": _now(),
        "layer_format": LAYER_FORMAT,
        "freshpool_version": freshpool_version(),
    }


def stack_size(build: StackBuild) -> int:
    """Apparent bytes of the whole stack: this build's layers and its parent's."""
    parent = build.parent
    return sum(d.layer.size_bytes for d in build.done) + (parent.size_bytes if parent else 0)


def write_stack_manifest(path: Path, manifest: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, path)


def freshpool_version() -> str:
    try:
        return metadata.version("freshpool")
    except metadata.PackageNotFoundError:
        return "unknown"


def _parent(parent: ParentStack | None) -> dict[str, Any] | None:
    if parent is None:
        return None
    return {
        "image": parent.image,
        "build": parent.build_id,
        "digest": parent.digest,
        "layers": [str(p) for p in parent.layers],
    }


def _base(done: list[DoneLayer]) -> dict[str, Any]:
    """What the base's own manifest says of it; empty for a child, which has no base layer."""
    manifest: dict[str, Any] = {}
    for layer in done:
        if layer.kind == "base":
            manifest = layer.layer.about.get("manifest", {})
    keys = ("suite", "mirror", "variant", "packages", "prefetch", "architecture")
    return {k: manifest.get(k) for k in keys if k in manifest}


def _installed(stack: list[Path]) -> dict[str, str]:
    """Packages installed in the merged image, from the topmost dpkg status file."""
    status = merged_entry(stack, "var/lib/dpkg/status")
    if status is None:
        return {}
    return dpkg.installed_by_status(status)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
