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

from freshpool.dispatch import direct
from freshpool.drivers.base import SshAccess
from freshpool.drivers.ssh import run as ssh_run
from freshpool.launcher import Launcher
from tests.drivers.openstack.fake_cloud import FakeCloud
from tests.drivers.openstack.machines import LocalMachines
from tests.launcher.test_reliability import sim_launcher
from tests.support import run_until

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
    assert len(machines.driver.list_instances()) == len(servers(booting_cloud))
    # The pool is whole again with new nodes; none is the one the job had.
    run_until(launcher, lambda: len(launcher.store.nodes(["ready"])) == 2, timeout=180)
    assert node.id not in {n.id for n in launcher.store.nodes()}
