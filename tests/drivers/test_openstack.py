"""The openstack driver with the real openstacksdk against a stateful fake cloud over
real HTTP on loopback (openstack/fake_cloud.py says what is emulated: Keystone,
Nova, Neutron and Glance as openstacksdk calls them; servers never boot, but reach
ACTIVE with addresses and cloud-init's host keys on their console). What the driver
did is read back from the fake's state and through openstacksdk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openstack
import pytest

from freshpool.config import Provider
from freshpool.drivers.base import (
    DriverError,
    DriverUnavailable,
    Instance,
    NodeSpec,
    QuotaExceeded,
)
from freshpool.drivers.openstack import OpenStackDriver
from tests.drivers.cloud_support import node_spec, run_all
from tests.drivers.openstack.fake_cloud import FakeCloud
from tests.launcher.test_reliability import sim_launcher
from tests.support import run_until

CLUSTER = "c0ffee"
IMAGE = "debian-12-generic-amd64"


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    fake = FakeCloud()
    fake.build_delay = 0.2
    fake.serve()
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fake.clouds_yaml(tmp_path / "clouds.yaml")))
    yield fake
    fake.stop()


@pytest.fixture
def make_driver(cloud: FakeCloud, tmp_path: Path) -> Callable[..., OpenStackDriver]:
    def make(name: str = "os", boot_timeout: float = 30, **settings: Any) -> OpenStackDriver:
        body = {"cloud": "fake", "image": IMAGE, "flavor": {"name": "m1.small"},
                "networks": ["private"], "metadata": {"team": "ci"}, **settings}  # fmt: skip
        provider = Provider.model_validate({
            "name": name, "driver": "openstack", "boot-timeout": boot_timeout,
            "delete-timeout": 30, "openstack": body})  # fmt: skip
        return OpenStackDriver(provider, CLUSTER, tmp_path / "providers" / name)

    return make


def spec(node_id: int, label: str = "debian") -> NodeSpec:
    return node_spec(CLUSTER, node_id, label)


def other_server(cloud: FakeCloud, metadata: dict[str, str], flavor: str = "m1.medium") -> str:
    """A server someone else made in the project, through openstacksdk."""
    conn = openstack.connect(cloud="fake")
    image = conn.image.find_image(IMAGE)
    network = conn.network.find_network("private")
    server = conn.compute.create_server(
        name="theirs", image_id=image.id, flavor_id=conn.compute.find_flavor(flavor).id,
        networks=[{"uuid": network.id}], metadata=metadata)  # fmt: skip
    conn.compute.wait_for_server(server, wait=30, interval=0.2)
    return str(server.id)


def test_a_node_is_a_server_with_our_metadata_its_key_and_its_host_key(
    make_driver: Callable[..., OpenStackDriver], cloud: FakeCloud
) -> None:
    driver = make_driver()
    driver.check()
    instance: Instance = driver.create(spec(7)).wait(60)
    server = cloud.servers[instance.external_id]
    assert server["status"] == "ACTIVE"
    metadata = server["metadata"]
    assert metadata["freshpool-cluster"] == CLUSTER and metadata["freshpool-node"] == "7"
    assert metadata["freshpool-provider"] == "os" and metadata["team"] == "ci"
    assert server["config_drive"] in (True, "True")
    assert server["flavor"]["original_name"] == "m1.small"

    access = instance.access
    assert access is not None and access.strict_host_keys
    key = Path(access.key_path)
    data = cloud.user_data(instance.external_id)
    assert data is not None
    assert key.with_suffix(".pub").read_text().split()[1].encode() in data
    assert b"PRIVATE KEY" not in data
    # The host keys the node printed on its console are the ones pinned.
    assert sorted(access.host_keys) == sorted(cloud.host_keys(instance.external_id))
    pinned = Path(access.known_hosts_path).read_text().splitlines()
    assert all(line.startswith(f"{access.host} ") for line in pinned) and len(pinned) == 2

    listed = {i.external_id: i for i in driver.list_instances()}
    assert listed[instance.external_id].tags == spec(7).tags

    cloud.delete_delay = 2.0  # Nova takes its time: the delete waits until it is gone
    driver.delete(instance.external_id).wait(60)
    assert instance.external_id not in cloud.servers
    assert not key.exists()
    driver.delete(instance.external_id).wait(60)  # gone already: still a success


def test_launches_and_deletes_share_one_listing_per_pass(
    make_driver: Callable[..., OpenStackDriver], cloud: FakeCloud
) -> None:
    driver = make_driver(**{"host-key-checking": False})
    creates = [driver.create(spec(n)) for n in range(1, 9)]
    run_all(creates)
    instances = [op.wait() for op in creates]
    listings = sum(
        n
        for route, n in cloud.calls.items()
        if route.startswith("GET /compute/v2.1/servers/detail")
    )
    assert listings <= 4, cloud.calls  # one per pass, not one per server
    deletes = [driver.delete(i.external_id) for i in instances]
    run_all(deletes)
    for op in deletes:
        op.wait()
    assert not cloud.servers


def test_only_this_clusters_and_providers_servers_are_listed(
    make_driver: Callable[..., OpenStackDriver], cloud: FakeCloud
) -> None:
    driver = make_driver()
    stray = other_server(cloud, {"freshpool-cluster": CLUSTER, "freshpool-node": "999",
                                 "freshpool-provider": "os"})  # fmt: skip
    other_server(cloud, {"freshpool-cluster": "other", "freshpool-node": "1",
                         "freshpool-provider": "os"})  # fmt: skip
    other_server(cloud, {"freshpool-cluster": CLUSTER, "freshpool-node": "2",
                         "freshpool-provider": "os-west"})  # fmt: skip
    other_server(cloud, {})
    listed = driver.list_instances()
    assert [i.external_id for i in listed] == [stray]
    assert listed[0].tags is not None and listed[0].tags.node_id == 999


def test_a_failed_build_is_undone_and_says_why(
    make_driver: Callable[..., OpenStackDriver], cloud: FakeCloud
) -> None:
    driver = make_driver()
    cloud.fail_next_builds = 1
    with pytest.raises(DriverError, match="ERROR: No valid host was found"):
        driver.create(spec(3)).wait(60)
    assert not cloud.servers  # nothing half-created
    assert not list((driver.state_dir / "keys").glob("*"))

    # A server that never shows its host key is not used either.
    cloud.host_keys_delay = 600
    slow = make_driver(name="os-slow", boot_timeout=2)
    with pytest.raises(DriverError, match="no SSH host key on its console"):
        slow.create(spec(4)).wait(60)
    assert not cloud.servers


def test_the_quota_less_what_is_not_ours_bounds_the_nodes(
    make_driver: Callable[..., OpenStackDriver], cloud: FakeCloud
) -> None:
    cloud.max_instances, cloud.max_cores = 10, 6
    other_server(cloud, {}, flavor="m1.medium")  # 2 cores that are not ours
    driver = make_driver(flavor={"min-ram": 3000})  # the smallest fit: m1.medium, 2 cores
    ours = driver.create(spec(1)).wait(60)
    assert cloud.servers[ours.external_id]["flavor"]["original_name"] == "m1.medium"

    deadline = time.monotonic() + 20
    while driver.quota.last.get("nodes_fit") is None:
        assert time.monotonic() < deadline, driver.quota.last
        driver.limits()
        time.sleep(0.05)
    assert driver.limits().max_nodes == 2  # (6 cores - 2 not ours) // 2
    assert driver.quota.last["ours"] == 1

    # The provider's own cap, on top: 4 GiB of RAM is one m1.medium (4096 MiB).
    capped = make_driver(name="os-capped", flavor={"min-ram": 3000}, **{"max-ram": 4096})
    deadline = time.monotonic() + 20
    while capped.limits().max_nodes != 1:
        assert time.monotonic() < deadline, capped.quota.last
        time.sleep(0.05)

    # Nova refuses anyway (someone raced us): QuotaExceeded, in Nova's words.
    cloud.max_cores = 4
    with pytest.raises(QuotaExceeded, match="os: create server: 403: Quota exceeded for cores"):
        driver.create(spec(2)).wait(60)


def test_boot_from_volume_and_a_cloud_that_fails(
    make_driver: Callable[..., OpenStackDriver], cloud: FakeCloud
) -> None:
    driver = make_driver(**{"boot-from-volume": True, "volume-size": 30})
    instance = driver.create(spec(1)).wait(60)
    server = cloud.servers[instance.external_id]
    assert server["image"] in ("", None) or not server["image"]

    cloud.down = True
    with pytest.raises(DriverError, match="provider os: "):
        driver.list_instances()
    cloud.down = False
    assert [i.external_id for i in driver.list_instances()] == [instance.external_id]


def test_bad_settings_are_named_at_check(
    make_driver: Callable[..., OpenStackDriver], cloud: FakeCloud, tmp_path: Path
) -> None:
    with pytest.raises(DriverUnavailable, match="provider os: no image 'nope'"):
        make_driver(image="nope").check()
    with pytest.raises(DriverUnavailable, match=r"provider os: no flavor 'm9\.huge'"):
        make_driver(flavor={"name": "m9.huge"}).check()
    with pytest.raises(DriverUnavailable, match="provider os: no flavor with 999999 MiB"):
        make_driver(flavor={"min-ram": 999999}).check()
    with pytest.raises(DriverUnavailable, match="provider os: no network 'public'"):
        make_driver(networks=["public"]).check()
    with pytest.raises(DriverUnavailable, match=r"clouds\.yaml has no usable cloud 'elsewhere'"):
        make_driver(cloud="elsewhere")
    cloud.clouds_yaml(tmp_path / "clouds.yaml", cloud="wrong", password="not it")
    with pytest.raises(DriverUnavailable, match=r"provider os: check: .*credentials"):
        make_driver(cloud="wrong").check()
    with pytest.raises(ValueError, match="driver openstack needs an `openstack:` section"):
        Provider.model_validate({"name": "os", "driver": "openstack"})


def test_the_launchers_sweep_deletes_a_stray_of_ours(cloud: FakeCloud, tmp_path: Path) -> None:
    """The real launcher's leak sweep over the openstack driver (min-ready 0: the fake's
    servers never boot, so none is launched to be tested over SSH); the launcher starts
    while the cloud is down, and sweeps once it is back."""
    cloud.down = True
    launcher = sim_launcher(tmp_path, f"""
  - name: os
    driver: openstack
    openstack: {{cloud: fake, image: {IMAGE}, flavor: {{name: m1.small}}, networks: [private]}}
""", min_ready=0)  # fmt: skip
    passes = 0

    def passed() -> bool:
        nonlocal passes
        passes += 1
        return passes > 5

    run_until(launcher, passed)  # a cloud down is no failure of the launcher's
    cloud.down = False
    stray = other_server(cloud, {"freshpool-cluster": launcher.store.cluster_id,
                                 "freshpool-node": "41", "freshpool-provider": "os"})  # fmt: skip
    theirs = other_server(cloud, {})

    def gone() -> bool:
        with cloud.lock:
            cloud.advance()
            return stray not in cloud.servers

    run_until(launcher, gone, timeout=30)
    assert theirs in cloud.servers
