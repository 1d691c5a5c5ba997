"""The openstack driver and the real openstacksdk against a real OpenStack: Debian 12's
Keystone, Glance, Placement, Neutron and Nova (Zed) on loopback, whose compute host
runs Nova's fake virt driver (servers are real Nova servers with real ports and
addresses, but no machine boots). Opt-in: setup.sh starts that cloud and prints the
clouds.yaml to name in FRESHPOOL_OPENSTACK_REAL_CLOUDS; without it every test here is
skipped.

    bash tests/drivers/openstack_real/setup.sh
    FRESHPOOL_OPENSTACK_REAL_CLOUDS=/tmp/openstack-real/clouds.yaml \\
        python3 -m pytest -m openstack_real tests/drivers/openstack_real

No machine boots, so nothing prints SSH host keys on the console: host-key-checking
is off, as for an emulated cloud. What the driver did is read back through
openstacksdk, as another user of the project would see it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from freshpool.config import Provider
from freshpool.drivers.base import DriverUnavailable, Instance
from freshpool.drivers.openstack import OpenStackDriver
from tests.drivers.cloud_support import node_spec, run_all

openstack = pytest.importorskip("openstack")

pytestmark = [pytest.mark.openstack_real, pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # fmt: skip

CLOUDS = os.environ.get("FRESHPOOL_OPENSTACK_REAL_CLOUDS", "")
# What setup.sh made; another cloud may name its own.
CLOUD = os.environ.get("FRESHPOOL_OPENSTACK_REAL_CLOUD", "freshpool-real")
IMAGE = os.environ.get("FRESHPOOL_OPENSTACK_REAL_IMAGE", "fp-tiny")
FLAVOR = os.environ.get("FRESHPOOL_OPENSTACK_REAL_FLAVOR", "fp.tiny")
NETWORK = os.environ.get("FRESHPOOL_OPENSTACK_REAL_NETWORK", "fp-net")
BOOT = 180.0


@pytest.fixture
def clouds(monkeypatch: pytest.MonkeyPatch) -> Path:
    if not CLOUDS or not Path(CLOUDS).is_file():
        pytest.skip("set FRESHPOOL_OPENSTACK_REAL_CLOUDS to a clouds.yaml (run "
                    "tests/drivers/openstack_real/setup.sh)")  # fmt: skip
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", CLOUDS)
    return Path(CLOUDS)


@pytest.fixture
def cluster() -> str:
    """A cluster of this test's own: servers other runs left are never ours."""
    return f"real{uuid.uuid4().hex[:8]}"


@pytest.fixture
def conn(clouds: Path, cluster: str) -> Iterator[Any]:
    """openstacksdk as the project's other users see it; whatever carries this test's
    cluster is deleted afterwards, whatever the test did."""
    c = openstack.connect(cloud=CLOUD)
    yield c
    left = [s for s in c.compute.servers(details=True)
            if (s.metadata or {}).get("freshpool-cluster") == cluster]  # fmt: skip
    for server in left:
        c.compute.delete_server(server, ignore_missing=True)
    for server in left:
        c.compute.wait_for_delete(server, wait=120)


@pytest.fixture
def make_driver(conn: Any, cluster: str, tmp_path: Path) -> Callable[..., OpenStackDriver]:
    def make(name: str = "real", **settings: Any) -> OpenStackDriver:
        body = {"cloud": CLOUD, "image": IMAGE, "flavor": {"name": FLAVOR},
                "networks": [NETWORK], "metadata": {"team": "ci"},
                "host-key-checking": False, **settings}  # fmt: skip
        provider = Provider.model_validate({
            "name": name, "driver": "openstack", "boot-timeout": BOOT,
            "delete-timeout": 120, "openstack": body})  # fmt: skip
        return OpenStackDriver(provider, cluster, tmp_path / "providers" / name)

    return make


def test_a_node_is_a_nova_server_with_our_metadata_listed_and_deleted(
    make_driver: Callable[..., OpenStackDriver], conn: Any, cluster: str
) -> None:
    driver = make_driver()
    driver.check()
    instance: Instance = driver.create(node_spec(cluster, 7)).wait(BOOT)

    server = conn.compute.get_server(instance.external_id)
    assert server.status == "ACTIVE" and server.name == "fp-7"
    metadata = server.metadata
    assert metadata["freshpool-cluster"] == cluster and metadata["freshpool-node"] == "7"
    assert metadata["freshpool-build"] == "b1" and metadata["freshpool-provider"] == "real"
    assert metadata["team"] == "ci" and metadata["Name"] == "fp-7"
    assert server.flavor["original_name"] == FLAVOR
    assert str(server.has_config_drive).lower() == "true"
    # The address is the one Neutron gave the server's port on the network asked for.
    assert instance.access is not None
    addresses = {a["addr"] for a in server.addresses[NETWORK]}
    assert instance.access.host in addresses
    network = conn.network.find_network(NETWORK)
    ports = list(conn.network.ports(device_id=server.id))
    assert [p.network_id for p in ports] == [network.id]
    assert instance.access.host in {ip["ip_address"] for ip in ports[0].fixed_ips}
    assert instance.details["status"] == "ACTIVE" and instance.details["flavor"] == FLAVOR

    listed = {i.external_id: i for i in driver.list_instances()}
    assert set(listed) == {instance.external_id}
    assert listed[instance.external_id].tags == node_spec(cluster, 7).tags
    assert listed[instance.external_id].alive

    # Nova's absolute limits, read on the driver's threads: room for at least one more.
    deadline = time.monotonic() + 60
    while driver.quota.last.get("nodes_fit") is None:
        assert time.monotonic() < deadline, f"no quota read: {driver.quota.last}"
        driver.limits()
        time.sleep(0.2)
    assert driver.quota.last["ours"] == 1
    assert 1 <= driver.limits().max_nodes <= int(driver.quota.last["instances"])

    key = Path(instance.access.key_path)
    assert key.exists()
    driver.delete(instance.external_id).wait(120)
    assert conn.compute.find_server(instance.external_id) is None
    assert list(conn.network.ports(device_id=instance.external_id)) == []
    assert driver.list_instances() == []
    assert not key.exists()
    driver.delete(instance.external_id).wait(120)  # gone already: still a success


def test_parallel_nodes_and_a_server_that_is_not_ours(
    make_driver: Callable[..., OpenStackDriver], conn: Any, cluster: str
) -> None:
    """Two launches at once, a flavor picked by size, and a server of the same cluster
    another provider made: listed by neither, deleted by neither."""
    image = conn.image.find_image(IMAGE)
    network = conn.network.find_network(NETWORK)
    flavor = conn.compute.find_flavor(FLAVOR)
    theirs = conn.compute.create_server(
        name="theirs", image_id=image.id, flavor_id=flavor.id,
        networks=[{"uuid": network.id}],
        metadata={"freshpool-cluster": cluster, "freshpool-node": "1",
                  "freshpool-provider": "someone-else"})  # fmt: skip

    driver = make_driver(flavor={"min-ram": 64, "vcpus": 1})
    driver.check()
    smallest = min(conn.compute.flavors(details=True), key=lambda f: (f.vcpus, f.ram, f.name))
    ops = [driver.create(node_spec(cluster, n)) for n in (1, 2)]
    run_all(ops, timeout=BOOT)
    made = [op.wait(1) for op in ops]  # each one's Instance, or its error raised
    ids = {i.external_id for i in made}
    assert len(ids) == 2 and theirs.id not in ids
    for server_id in ids:
        server = conn.compute.get_server(server_id)
        assert server.status == "ACTIVE"
        assert server.flavor["original_name"] == smallest.name
    assert {i.external_id for i in driver.list_instances()} == ids

    deletes = [driver.delete(i) for i in ids]
    run_all(deletes, timeout=120)
    for op in deletes:
        op.wait(1)
    assert all(conn.compute.find_server(i) is None for i in ids)
    conn.compute.wait_for_server(theirs, wait=BOOT)
    assert conn.compute.get_server(theirs.id).status == "ACTIVE"  # untouched
    assert driver.list_instances() == []


def test_check_names_what_the_cloud_does_not_have(
    make_driver: Callable[..., OpenStackDriver],
) -> None:
    with pytest.raises(DriverUnavailable, match="no image 'no-such-image'"):
        make_driver(image="no-such-image").check()
    with pytest.raises(DriverUnavailable, match="no flavor 'no-such-flavor'"):
        make_driver(flavor={"name": "no-such-flavor"}).check()
    with pytest.raises(DriverUnavailable, match="no network 'no-such-net'"):
        make_driver(networks=["no-such-net"]).check()
