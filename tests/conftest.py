"""Shared fixtures: the Debian image is built once per test session and reused."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from freshpool.config import Image
from freshpool.config import load as load_config
from freshpool.images.debootstrap import build_cached
from freshpool.store import Store
from freshpool.store.db import DATABASE_ENV
from tests.store.pg import TempPostgres
from tests.support import Pool, destroy_cluster, pool_yaml, register_test_image

TEST_IMAGE = Image(name="debian-bookworm", packages=["python3"], prefetch=["make"])
# An image that boots as a VM (qemu nodes) and on a cloud (cloud-init reads its metadata).
VM_IMAGE = Image(
    name="debian-vm", packages=["linux-image-amd64", "iproute2", "cloud-init", "systemd-sysv"]
)
# Survives between test sessions on a developer's machine; CI starts empty and builds once.
IMAGE_CACHE = Path(os.environ.get("FRESHPOOL_TEST_CACHE", "/var/tmp/freshpool-test-cache"))


@pytest.fixture(scope="session")
def image_build_dir() -> Path:
    """A built image directory (rootfs/ + manifest.json), built once and cached."""
    override = os.environ.get("FRESHPOOL_TEST_IMAGE_DIR")
    if override:
        return Path(override)
    return build_cached(TEST_IMAGE, IMAGE_CACHE)


@pytest.fixture(scope="session")
def vm_image() -> Path:
    """A Debian build with a kernel and cloud-init (rootfs/ + manifest.json), built once
    and cached."""
    return build_cached(VM_IMAGE, IMAGE_CACHE)


@pytest.fixture(scope="session")
def image_rootfs(image_build_dir: Path) -> Path:
    return image_build_dir / "rootfs"


@pytest.fixture
def make_pool(tmp_path: Path, image_build_dir: Path) -> Iterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(**kwargs: Any) -> Pool:
        state_dir = tmp_path / f"state{len(made)}"
        path = tmp_path / f"freshpool{len(made)}.yaml"
        path.write_text(pool_yaml(state_dir, **kwargs))
        config = load_config(path)
        store = Store.open(config.state_dir)
        register_test_image(store, image_build_dir)
        pool = Pool(path, config, store)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        destroy_cluster(pool.config, pool.store)
        pool.store.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    """One throwaway PostgreSQL server per test session (unix socket only)."""
    server = TempPostgres()
    yield server
    server.stop()


# FRESHPOOL_TEST_DATABASE=postgresql: every test's store (and every freshpool process a
# test starts) is a database of its own on the session's PostgreSQL, not SQLite.
ON_POSTGRES = os.environ.get("FRESHPOOL_TEST_DATABASE", "sqlite") == "postgresql"


@pytest.fixture(autouse=True)
def test_database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if not ON_POSTGRES:
        return
    if request.node.get_closest_marker("sqlite_only"):
        pytest.skip("tests SQLite itself")
    server: TempPostgres = request.getfixturevalue("postgres")
    monkeypatch.setenv(DATABASE_ENV, server.new_database())
