"""A job on a node an OpenStack cloud booted: the launcher, the openstack driver and
the real openstacksdk against the fake cloud, whose servers are real local nodes
(openstack/machines.py says what of cloud-init is done for them). The node is tested
and reached over SSH with the key the driver made and the host key it pinned from
the console, handed to one job, and destroyed after it, server and machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshpool import launcher as launching
from freshpool.config import parse
from freshpool.dispatch import direct
from freshpool.drivers.base import SshAccess, load_driver
from freshpool.drivers.ssh import run as ssh_run
from freshpool.launcher import Launcher
from freshpool.store import Store
from tests.drivers.openstack.fake_cloud import FakeCloud
from tests.drivers.openstack.machines import LocalMachines
from tests.launcher.test_reliability import sim_launcher
from tests.support import destroy_cluster, register_test_image, run_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real nodes need root")
SUBNET = "10.214.91.0/24"


@pytest.fixture
def booting_cloud(image_build_dir: Path, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:  # fmt: skip
    cloud = FakeCloud()
    cloud.build_delay = 0.1
    machines = LocalMachines((image_build_dir / "rootfs",), tmp_path / "nova", SUBNET,
                             "fp-test-nova")  # fmt: skip
    cloud.hypervisor = machines
    cloud.serve()
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(cloud.clouds_yaml(tmp_path / "clouds.yaml")))
    yield cloud
    cloud.stop()
    machines.close()


def servers(cloud: FakeCloud) -> set[str]:
    with cloud.lock:
        cloud.advance()
        return set(cloud.servers)


def test_a_job_runs_once_on_a_node_the_cloud_booted(
    booting_cloud: FakeCloud, tmp_path: Path
) -> None:
    launcher: Launcher = sim_launcher(tmp_path, """
  - name: os
    driver: openstack
    boot-timeout: 120
    openstack: {cloud: fake, image: debian-12-generic-amd64, flavor: {name: m1.small},
                networks: [private]}
""", min_ready=2)  # fmt: skip
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 2, timeout=180)

    (node,) = direct.acquire(launcher.config, launcher.store, ["debian"], timeout=10)
    assert node.access is not None
    access = SshAccess(**node.access)
    assert access.strict_host_keys and access.host.startswith("10.214.91.")
    assert node.external_id in servers(booting_cloud)
    done = ssh_run(access, "test ! -e /var/tmp/used && touch /var/tmp/used && echo fresh")
    assert done.returncode == 0 and done.stdout.strip() == "fresh", done.stderr

    # The job is done: the node is deleted, its server and its machine with it.
    launcher.store.release_set(node.id, "job done")
    run_until(launcher, lambda: node.external_id not in servers(booting_cloud), timeout=60)
    machines = booting_cloud.hypervisor
    assert isinstance(machines, LocalMachines)
    assert node.external_id not in machines.machines
    # Every machine left is a live server's (new servers may still be booting).
    assert set(machines.machines) <= servers(booting_cloud)
    # The pool is whole again with new nodes; none is the one the job had.
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 2, timeout=180)
    assert node.id not in {n.id for n in launcher.store.nodes()}


def test_a_cloud_that_goes_down_is_served_around_and_lost_servers_replaced(
    booting_cloud: FakeCloud, image_build_dir: Path, tmp_path: Path
) -> None:
    """One label on the cloud and on local nodes: while the cloud is down, every
    node comes from the local provider; a server the cloud lost is replaced."""
    text = f"""
state-dir: {tmp_path / "state"}
interval: 0.05
cleanup-interval: 0.5
providers:
  - name: os
    driver: openstack
    max-nodes: 4
    boot-timeout: 120
    breaker-threshold: 2
    openstack: {{cloud: fake, image: debian-12-generic-amd64, flavor: {{name: m1.small}},
                networks: [private]}}
  - name: local
    driver: local
    max-nodes: 3
    network: {{subnet: 10.214.92.0/24, bridge: fp-test-nova-l}}
labels:
  - {{name: debian, image: debian-bookworm, min-ready: 2}}
images:
  - name: debian-bookworm
"""  # fmt: skip
    config = parse(text, "failover.yaml")
    store = Store.open(config.state_dir)
    register_test_image(store, image_build_dir)
    drivers = {p.name: load_driver(p, store.cluster_id, config.state_dir) for p in config.providers}
    launcher = launching.build(config, store, drivers, images=False, publish=False)
    try:
        # The cloud has the most room: it serves first.
        run_until(launcher, lambda: len(store.nodes(["ready"])) == 2, timeout=180)
        first = store.nodes(["ready"])
        assert {n.provider for n in first} == {"os"}

        # Lost by the cloud (no delete asked): the sweep notices, a new node comes.
        lost = first[0]
        with booting_cloud.lock:
            booting_cloud.vanish(str(lost.external_id))
        run_until(launcher, lambda: lost.id not in {n.id for n in store.nodes(["ready"])}
                  and len(store.nodes(["ready"])) == 2, timeout=120)  # fmt: skip

        # The cloud goes down; what is handed out is made good from local nodes.
        booting_cloud.down = True
        for _ in range(2):
            direct.acquire(config, store, ["debian"], timeout=10)
        run_until(launcher, lambda: len(store.nodes(["ready"])) == 2, timeout=180)
        assert {n.provider for n in store.nodes(["ready"])} == {"local"}
    finally:
        booting_cloud.down = False
        destroy_cluster(config, store)
