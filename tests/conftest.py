"""Shared fixtures: the Debian image is built once per test session and reused."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from freshpool.config import Image

TEST_IMAGE = Image(name="debian-bookworm", packages=["python3"], prefetch=["make"])
# Survives between test sessions on a developer's machine; CI starts empty and builds once.
IMAGE_CACHE = Path(os.environ.get("FRESHPOOL_TEST_CACHE", "/var/tmp/freshpool-test-cache"))


@pytest.fixture(scope="session")
def image_build_dir() -> Path:
    """A built image directory (rootfs/ + manifest.json), built once and cached."""
    override = os.environ.get("FRESHPOOL_TEST_IMAGE_DIR")
    if override:
        return Path(override)
    from freshpool.images.build import build_image

    key = hashlib.sha256(TEST_IMAGE.model_dump_json().encode()).hexdigest()[:12]
    build_dir = IMAGE_CACHE / f"image-{key}"
    if not (build_dir / "manifest.json").exists():
        shutil.rmtree(build_dir, ignore_errors=True)
        build_image(TEST_IMAGE, build_dir, cache_dir=IMAGE_CACHE / "debootstrap")
    return build_dir


@pytest.fixture(scope="session")
def image_rootfs(image_build_dir: Path) -> Path:
    return image_build_dir / "rootfs"
