"""The fake cloud driven by the real openstacksdk over HTTP on loopback: proof that it
answers the calls an `openstack` driver will make the way a cloud answers them."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openstack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from keystoneauth1 import exceptions as ks_exceptions
from openstack import exceptions
from openstack.compute.v2.server import Server
from openstack.connection import Connection

from tests.drivers.openstack.fake_cloud import FakeCloud
from tests.drivers.openstack.fake_cloud_model import NO_VALID_HOST

# openstacksdk's own deprecations, warned from inside it whatever the caller does (its
# Image.find passes ignore_missing=True; Limits are fetched without a microversion).
pytestmark = [
    pytest.mark.filterwarnings(f"ignore::openstack.warnings.{category}")
    for category in ("RemovedInSDK50Warning", "RemovedInSDK60Warning", "RemovedFieldWarning")
]

IMAGE = "debian-12-generic-amd64"
USER_DATA = b"#cloud-config\nruncmd: [touch /run/freshpool]\n"


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    fake = FakeCloud()
    fake.build_delay = 0.2
    fake.serve()
    yield fake
    fake.stop()


@pytest.fixture
def clouds_yaml(cloud: FakeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("OS_"):
            monkeypatch.delenv(name)
    path = cloud.clouds_yaml(tmp_path / "clouds.yaml")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(path))
    return path


@pytest.fixture
def conn(clouds_yaml: Path) -> Iterator[Connection]:
    connection = openstack.connect(cloud="fake")
    yield connection
    connection.close()


def boot(conn: Connection, name: str = "node-1", flavor: str = "m1.small",
         **attrs: Any) -> Server:  # fmt: skip
    """Create a server the way a driver would: flavor, image and network found by name."""
    found_flavor = conn.compute.find_flavor(flavor, ignore_missing=False)
    network = conn.network.find_network("private", ignore_missing=False)
    if "block_device_mapping" not in attrs and "image_id" not in attrs:
        attrs["image_id"] = conn.image.find_image(IMAGE, ignore_missing=False).id
    return conn.compute.create_server(name=name, flavor_id=found_flavor.id,
                                      networks=[{"uuid": network.id}], **attrs)  # fmt: skip


def wait_active(conn: Connection, server: Server) -> Server:
    return conn.compute.wait_for_server(server, interval=0.05, wait=20)


def host_key_block(console: str) -> list[str]:
    lines = console.splitlines()
    start = lines.index("-----BEGIN SSH HOST KEY KEYS-----")
    return lines[start + 1 : lines.index("-----END SSH HOST KEY KEYS-----")]


def test_discovery_flavors_networks_images(cloud: FakeCloud, conn: Connection) -> None:
    names = [flavor.name for flavor in conn.compute.flavors()]
    assert names == ["m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"]
    small = conn.compute.find_flavor("m1.small", ignore_missing=False)
    assert (small.id, small.vcpus, small.ram, small.disk) == ("2", 1, 2048, 20)
    with pytest.raises(exceptions.NotFoundException):
        conn.compute.find_flavor("m9.huge", ignore_missing=False)
    network = conn.network.find_network("private", ignore_missing=False)
    assert network.id in cloud.networks
    subnet = conn.network.get_subnet(network.subnet_ids[0])
    assert subnet.cidr == "10.0.0.0/24"
    image = conn.image.find_image(IMAGE, ignore_missing=False)
    assert image.status == "active"
    assert cloud.calls["POST /identity/v3/auth/tokens"] == 1
    assert cloud.calls["GET /identity"] == 1


def test_server_boots_with_metadata_user_data_config_drive(cloud: FakeCloud,
                                                           conn: Connection) -> None:  # fmt: skip
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    public = key.public_bytes(serialization.Encoding.OpenSSH,
                              serialization.PublicFormat.OpenSSH).decode()  # fmt: skip
    conn.compute.create_keypair(name="pool", public_key=public)
    created = boot(conn, metadata={"freshpool-pool": "ci", "freshpool-node": "n1"},
                   user_data=base64.b64encode(USER_DATA).decode(), config_drive=True,
                   key_name="pool")  # fmt: skip
    assert created.admin_password
    assert conn.compute.get_server(created.id).status == "BUILD"
    server = wait_active(conn, created)
    assert server.status == "ACTIVE" and server.vm_state == "active"
    assert server.metadata == {"freshpool-pool": "ci", "freshpool-node": "n1"}
    assert server.key_name == "pool" and server.has_config_drive
    assert server.flavor.original_name == "m1.small"
    assert cloud.user_data(server.id) == USER_DATA
    address = server.addresses["private"][0]
    assert address["OS-EXT-IPS:type"] == "fixed" and address["version"] == 4
    (port,) = list(conn.network.ports(device_id=server.id))
    assert port.fixed_ips[0]["ip_address"] == address["addr"]
    assert port.mac_address == address["OS-EXT-IPS-MAC:mac_addr"]
    assert [s.id for s in conn.compute.servers()] == [server.id]


def test_console_output_has_the_host_keys(cloud: FakeCloud, conn: Connection) -> None:
    created = boot(conn, name="Node_One")
    with pytest.raises(exceptions.ConflictException, match="vm_state building"):
        conn.compute.get_server_console_output(created)
    server = wait_active(conn, created)
    output = conn.compute.get_server_console_output(server)["output"]
    assert isinstance(output, str)
    keys = host_key_block(output)
    assert keys == [f"{key} root@node-one" for key in cloud.host_keys(server.id)]
    assert [key.split()[0] for key in keys] == ["ecdsa-sha2-nistp256", "ssh-ed25519"]
    assert "Datasource DataSourceOpenStackLocal" in output
    last = conn.compute.get_server_console_output(server, length=2)["output"]
    assert last == "".join(output.splitlines(keepends=True)[-2:])


def test_host_keys_reach_the_console_late(cloud: FakeCloud, conn: Connection) -> None:
    cloud.host_keys_delay = 0.5
    server = wait_active(conn, boot(conn))
    assert "SSH HOST KEY" not in str(conn.compute.get_server_console_output(server)["output"])
    cloud.host_keys_delay = 0.0
    output = str(conn.compute.get_server_console_output(server)["output"])
    assert len(host_key_block(output)) == 2


def test_limits_count_what_exists(cloud: FakeCloud, conn: Connection) -> None:
    for name in ("a", "b"):
        boot(conn, name=name, flavor="m1.medium")
    limits = conn.compute.get_limits().absolute
    assert (limits.instances, limits.total_cores, limits.total_ram) == (10, 20, 51200)
    assert (limits.instances_used, limits.total_cores_used, limits.total_ram_used) == (
        2, 4, 8192)  # fmt: skip
    cloud.max_instances = 4
    assert conn.compute.get_limits().absolute.instances == 4


def test_quota_refusals_are_worded_as_nova_words_them(cloud: FakeCloud,
                                                      conn: Connection) -> None:  # fmt: skip
    cloud.max_instances = 1
    boot(conn, name="first")
    with pytest.raises(exceptions.ForbiddenException) as refused:
        boot(conn, name="second")
    assert refused.value.status_code == 403
    message = "Quota exceeded for instances: Requested 1, but already used 1 of 1 instances"
    assert message in str(refused.value)
    assert refused.value.response is not None
    assert refused.value.response.json() == {"forbidden": {"code": 403, "message": message}}
    cloud.max_instances, cloud.max_cores = 10, 2
    with pytest.raises(exceptions.HttpException, match="Quota exceeded for cores"):
        boot(conn, name="third", flavor="m1.medium")
    cloud.max_cores, cloud.max_ram = 20, 4096
    with pytest.raises(exceptions.HttpException, match="Quota exceeded for ram"):
        boot(conn, name="fourth", flavor="m1.medium")
    assert len(cloud.servers) == 1


def test_a_failed_build_goes_to_error(cloud: FakeCloud, conn: Connection) -> None:
    cloud.fail_next_builds = 1
    failed = boot(conn, name="doomed")
    with pytest.raises(exceptions.ResourceFailure):
        wait_active(conn, failed)
    server = conn.compute.get_server(failed.id)
    assert server.status == "ERROR" and server.fault["message"] == NO_VALID_HOST
    assert server.addresses == {} and list(conn.network.ports(device_id=server.id)) == []
    assert conn.compute.get_limits().absolute.instances_used == 1
    assert wait_active(conn, boot(conn, name="fine")).status == "ACTIVE"


def test_delete_takes_its_time(cloud: FakeCloud, conn: Connection) -> None:
    server = wait_active(conn, boot(conn))
    cloud.delete_delay = 0.5
    conn.compute.delete_server(server)
    deleting = conn.compute.get_server(server.id)
    assert deleting.task_state == "deleting"
    assert [s.id for s in conn.compute.servers()] == [server.id]
    conn.compute.wait_for_delete(server, interval=0.05, wait=10)
    assert list(conn.compute.servers()) == [] and cloud.ports == {}
    with pytest.raises(exceptions.NotFoundException, match="could not be found"):
        conn.compute.delete_server(server, ignore_missing=False)
    conn.compute.delete_server(server)


def test_a_vanished_server_is_not_found(cloud: FakeCloud, conn: Connection) -> None:
    server = wait_active(conn, boot(conn))
    cloud.vanish(server.id)
    with pytest.raises(exceptions.NotFoundException):
        conn.compute.get_server(server.id)
    with pytest.raises(exceptions.NotFoundException):
        conn.compute.find_server(server.id, ignore_missing=False)
    assert list(conn.compute.servers()) == []


def test_listing_pages_and_filters(cloud: FakeCloud, conn: Connection) -> None:
    cloud.build_delay = 60
    made = [boot(conn, name=f"web-{i}").id for i in range(3)] + [boot(conn, name="db").id]
    cloud.calls.clear()
    listed = [s.id for s in conn.compute.servers(limit=3)]
    assert listed == made[::-1]
    # Pages of 3 and 1, then openstacksdk asks once more (it was given a limit) and gets none.
    assert cloud.calls["GET /compute/v2.1/servers/detail"] == 3
    assert {s.name for s in conn.compute.servers(name="^web-")} == {"web-0", "web-1", "web-2"}
    assert [s.id for s in conn.compute.servers(details=False, name="db")] == [made[3]]
    assert len(list(conn.compute.servers(status="BUILD"))) == 4


def test_keypairs(cloud: FakeCloud, conn: Connection) -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    public = key.public_bytes(serialization.Encoding.OpenSSH,
                              serialization.PublicFormat.OpenSSH).decode()  # fmt: skip
    made = conn.compute.create_keypair(name="mine", public_key=public)
    digest = hashlib.md5(base64.b64decode(public.split()[1])).hexdigest()
    assert made.fingerprint == ":".join(digest[i : i + 2] for i in range(0, 32, 2))
    assert made.type == "ssh" and made.private_key is None
    with pytest.raises(exceptions.ConflictException, match="already exists"):
        conn.compute.create_keypair(name="mine", public_key=public)
    generated = conn.compute.create_keypair(name="theirs")
    assert str(generated.private_key).startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert str(generated.public_key).startswith("ssh-rsa ")
    assert sorted(k.name for k in conn.compute.keypairs()) == ["mine", "theirs"]
    assert conn.compute.get_keypair("mine").public_key == public
    conn.compute.delete_keypair("mine")
    with pytest.raises(exceptions.NotFoundException):
        conn.compute.find_keypair("mine", ignore_missing=False)
    assert list(cloud.keypairs) == ["theirs"]


def test_image_upload(cloud: FakeCloud, conn: Connection) -> None:
    data = bytes(range(256)) * 64
    image = conn.image.create_image(name="freshpool-debian", data=data, disk_format="raw",
                                    container_format="bare")  # fmt: skip
    fetched = conn.image.get_image(image.id)
    assert fetched.status == "active" and fetched.size == len(data)
    assert fetched.checksum == hashlib.md5(data).hexdigest()
    assert fetched.hash_algo == "sha512"
    assert fetched.hash_value == hashlib.sha512(data).hexdigest()
    assert cloud.image_data[image.id] == data
    assert conn.image.find_image("freshpool-debian", ignore_missing=False).id == image.id
    assert conn.image.download_image(image.id).content == data
    server = wait_active(conn, boot(conn, image_id=image.id))
    assert server.image.id == image.id
    conn.image.delete_image(image.id)
    with pytest.raises(exceptions.NotFoundException):
        conn.image.find_image("freshpool-debian", ignore_missing=False)
    assert cloud.calls["PUT /image/v2/images/{image_id}/file"] == 1


def test_image_pages(cloud: FakeCloud, conn: Connection) -> None:
    for i in range(30):
        cloud.add_image(f"img-{i:02}", b"x" * i)
    cloud.calls.clear()
    assert len(list(conn.image.images())) == 31
    assert cloud.calls["GET /image/v2/images"] == 2
    queued = conn.image.create_image(name="empty", disk_format="raw", container_format="bare")
    assert queued.status == "queued"
    assert [i.id for i in conn.image.images(status="queued")] == [queued.id]


def test_boot_from_volume(cloud: FakeCloud, conn: Connection) -> None:
    image = conn.image.find_image(IMAGE, ignore_missing=False)
    mapping = [{"boot_index": 0, "uuid": image.id, "source_type": "image",
                "destination_type": "volume", "volume_size": 20,
                "delete_on_termination": True}]  # fmt: skip
    server = wait_active(conn, boot(conn, block_device_mapping=mapping))
    assert not server.image
    raw = conn.compute.get(f"/servers/{server.id}", microversion="2.79").json()["server"]
    assert raw["image"] == ""
    (volume,) = server.attached_volumes
    assert volume["delete_on_termination"] is True


def test_bad_requests(cloud: FakeCloud, conn: Connection) -> None:
    with pytest.raises(exceptions.NotFoundException, match="Instance nope could not be found"):
        conn.compute.get_server("nope")
    with pytest.raises(exceptions.BadRequestException, match="Flavor 99 could not be found"):
        conn.compute.create_server(name="x", flavor_id="99", image_id="x", networks="none")
    network = conn.network.find_network("private", ignore_missing=False)
    with pytest.raises(exceptions.BadRequestException, match="is not a 'base64'"):
        boot(conn, user_data="not base64!")
    with pytest.raises(exceptions.BadRequestException, match="Invalid key_name"):
        boot(conn, key_name="missing")
    with pytest.raises(exceptions.BadRequestException, match="'networks' is a required"):
        conn.compute.create_server(name="x", flavor_id="1", image_id=network.id)
    assert cloud.servers == {}


def test_microversions(cloud: FakeCloud, conn: Connection) -> None:
    server = boot(conn)
    old = conn.compute.get(f"/servers/{server.id}", microversion="2.1")
    assert old.headers["OpenStack-API-Version"] == "compute 2.1"
    assert set(old.json()["server"]["flavor"]) == {"id", "links"}
    new = conn.compute.get(f"/servers/{server.id}", microversion="2.79")
    assert new.headers["X-OpenStack-Nova-API-Version"] == "2.79"
    assert new.json()["server"]["flavor"]["original_name"] == "m1.small"
    refused = conn.compute.get("/servers/detail", microversion="2.100")
    assert refused.status_code == 406
    assert "maximum is 2.79" in refused.json()["notAcceptable"]["message"]


def test_wrong_password(cloud: FakeCloud, clouds_yaml: Path) -> None:
    cloud.clouds_yaml(clouds_yaml, cloud="wrong", password="not-it")
    connection = openstack.connect(cloud="wrong")
    with pytest.raises(ks_exceptions.Unauthorized) as refused:
        list(connection.compute.flavors())
    assert refused.value.http_status == 401
    assert cloud.tokens == set()
    connection.close()


def test_a_lost_token_is_replaced(cloud: FakeCloud, conn: Connection) -> None:
    list(conn.compute.flavors())
    cloud.tokens.clear()
    assert len(list(conn.compute.flavors())) == 5
    assert cloud.calls["POST /identity/v3/auth/tokens"] == 2
    assert len(cloud.tokens) == 1


def test_parallel_boots_respect_the_quota(cloud: FakeCloud, conn: Connection) -> None:
    cloud.max_instances = 5
    flavor = conn.compute.find_flavor("m1.tiny", ignore_missing=False)
    image = conn.image.find_image(IMAGE, ignore_missing=False)

    def attempt(i: int) -> str:
        try:
            conn.compute.create_server(name=f"p{i}", flavor_id=flavor.id, image_id=image.id,
                                       networks="auto")  # fmt: skip
        except exceptions.ForbiddenException:
            return "refused"
        return "made"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(attempt, range(8)))
    assert outcomes == ["made"] * 5 + ["refused"] * 3
    assert cloud.calls["POST /compute/v2.1/servers"] == 8
    with cloud.lock:
        cloud.advance()
        assert len(cloud.servers) == 5 and len(cloud.ports) == 5


def test_a_503_burst(cloud: FakeCloud, conn: Connection) -> None:
    assert len(list(conn.compute.flavors())) == 5
    assert len(list(conn.image.images())) == 1
    cloud.fail_next_requests = 1
    with pytest.raises(exceptions.HttpException) as failed:
        list(conn.compute.flavors())
    assert failed.value.status_code == 503
    assert len(list(conn.compute.flavors())) == 5
    # openstacksdk retries the image service's 503s by itself (image_status_code_retries).
    cloud.calls.clear()
    cloud.fail_next_requests = 2
    assert len(list(conn.image.images())) == 1
    assert cloud.calls["GET /image/v2/images"] == 3


def test_a_cloud_that_is_down(cloud: FakeCloud, conn: Connection) -> None:
    list(conn.compute.flavors())
    cloud.down = True
    for _ in range(3):
        with pytest.raises(exceptions.HttpException) as failed:
            conn.compute.get_limits()
        assert failed.value.status_code == 503
    with pytest.raises((ks_exceptions.ClientException, exceptions.SDKException)):
        list(openstack.connect(cloud="fake").compute.servers())
    cloud.down = False
    assert conn.compute.get_limits().absolute.instances_used == 0
