"""A pool served as `freshpool serve` serves it (sim provider, the API process, the
nodepool-compat bridge) against a real ZooKeeper over TLS, and a Zuul-side client."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient

from freshpool import launcher as launching
from freshpool import serve
from freshpool.config import Config, parse
from freshpool.core.states import BuildState
from freshpool.drivers.base import load_driver
from freshpool.store import Store
from tests.api.conftest import wait_for
from tests.integrations.nodepool.zookeeper import ZooKeeper, available
from tests.integrations.nodepool.zuulside import ZuulSide


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeper]:
    why = available()
    if why:
        pytest.skip(why)
    server = ZooKeeper(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    yield server
    server.stop()


def kazoo_client(zk: ZooKeeper, chroot: str = "", **options: Any) -> KazooClient:
    client = KazooClient(
        hosts=zk.hosts + chroot, use_ssl=True, ca=str(zk.tls.ca),
        certfile=str(zk.tls.cert), keyfile=str(zk.tls.key), timeout=10.0, **options,
    )  # fmt: skip
    client.start(timeout=30)
    return client


@dataclass
class CompatPool:
    config: Config
    store: Store
    running: serve.Running
    chroot: str

    def wait_ready(self, n: int) -> None:
        wait_for(lambda: len(self.store.nodes(["ready"])) >= n, 60, f"{n} ready nodes")


def pool_config(state_dir: Path, zk: ZooKeeper, chroot: str, min_ready: int, max_nodes: int) -> str:
    return f"""
state-dir: {state_dir}
interval: 0.2
api: {{port: 0}}
providers:
  - name: sim0
    driver: sim
    max-nodes: {max_nodes}
    max-parallel-launches: {max_nodes}
    rate: 1000
    sim: {{latency: 0, persist: true}}
labels:
  - name: debian
    image: debian-bookworm
    min-ready: {min_ready}
    health-interval: 0
images:
  - name: debian-bookworm
tenants:
  - {{name: capped, max-nodes: 1}}
nodepool-compat:
  hosts: "{zk.hosts}"
  chroot: {chroot}
  launcher-id: freshpool-test
  tls: {{ca: {zk.tls.ca}, cert: {zk.tls.cert}, key: {zk.tls.key}}}
"""


@pytest.fixture
def compat_pool(tmp_path: Path, zookeeper: ZooKeeper) -> Iterator[Callable[..., CompatPool]]:
    """Start a pool (its own chroot on the shared server); stopped after the test."""
    started: list[tuple[threading.Event, threading.Thread, CompatPool]] = []

    def start(min_ready: int = 2, max_nodes: int = 6) -> CompatPool:
        chroot = f"/t-{uuid.uuid4().hex[:8]}"
        admin = kazoo_client(zookeeper)
        admin.ensure_path(chroot)
        admin.stop()
        state_dir = tmp_path / f"state{len(started)}"
        text = pool_config(state_dir, zookeeper, chroot, min_ready, max_nodes)
        config = parse(text, "compat.yaml")
        store = Store.open(state_dir)
        row = store.new_build("test", "debian-bookworm", str(state_dir / "no-layers"))
        store.build_transition(row.id, BuildState.BUILDING, BuildState.READY, "test")
        drivers = {p.name: load_driver(p, store.cluster_id, state_dir) for p in config.providers}
        launcher = launching.build(config, store, drivers, images=False, publish=False)
        running = serve.start(config, launcher)
        stop = threading.Event()
        thread = threading.Thread(target=launcher.run, args=(stop,), daemon=True)
        thread.start()
        pool = CompatPool(config, store, running, chroot)
        started.append((stop, thread, pool))
        return pool

    yield start
    for stop, thread, pool in started:
        stop.set()
        thread.join(60)
        pool.running.stop()
        pool.store.close()


@pytest.fixture
def zuul_for(zookeeper: ZooKeeper) -> Iterator[Callable[[CompatPool], ZuulSide]]:
    """Zuul-side clients in a pool's chroot; their sessions end after the test."""
    made: list[ZuulSide] = []

    def make(pool: CompatPool) -> ZuulSide:
        made.append(ZuulSide(kazoo_client(zookeeper, pool.chroot)))
        return made[-1]

    yield make
    for side in made:
        side.zk.stop()
        side.zk.close()
